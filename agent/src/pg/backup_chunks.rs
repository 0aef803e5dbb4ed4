//! Cuts the tar archives of a base backup into data objects of bounded size.
//!
//! The tar stream (`src/backend/backup/basebackup.c`, one archive per tablespace) is parsed
//! as it arrives ([`wire::pg::tar::TarReader`]); headers become manifest entries and file
//! bytes go, in stream order, into the current data object until it holds `chunk_size`
//! bytes, so a 1 GiB relation segment spans several objects that restore writes in
//! parallel. Memory stays bounded: the reader never buffers file data, one object writer is
//! open at a time, and at most [`MAX_FINISHING`] finished objects are still uploading.

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use storage::layout::{self, BackupId};
use storage::{ContentKind, ObjectInfo, ObjectWriter, PutMode, Repository};
use tokio::task::JoinSet;
use wire::pg::tar::{TarEntryType, TarEvent, TarReader};

use super::backup_manifest::{BackupEntry, DataChunk, EntryKind, Piece};

/// Objects whose final upload may still be running while the next one fills.
pub const MAX_FINISHING: usize = 2;

struct OpenChunk {
    seq: u64,
    writer: ObjectWriter,
    bytes: u64,
    pieces: Vec<Piece>,
}

struct CurrentFile {
    entry: u32,
    offset: u64,
    crc: u32,
}

/// Turns tar archives into data objects plus the entry list of the manifest.
pub struct Chunker {
    repo: Repository,
    id: BackupId,
    chunk_size: u64,
    entries: Vec<BackupEntry>,
    chunks: Vec<DataChunk>,
    open: Option<OpenChunk>,
    finishing: JoinSet<Result<(u64, ObjectInfo)>>,
    finished: Vec<(u64, ObjectInfo)>,
    next_seq: u64,
    tar: TarReader,
    buf: BytesMut,
    archive: Option<u32>,
    file: Option<CurrentFile>,
    /// Tar bytes consumed (all archives), for progress.
    pub tar_bytes: u64,
    /// File bytes stored.
    pub file_bytes: u64,
}

impl Chunker {
    /// A chunker writing objects of at most `chunk_size` bytes under backup `id`.
    pub fn new(repo: Repository, id: BackupId, chunk_size: u64) -> Chunker {
        Chunker {
            repo,
            id,
            chunk_size: chunk_size.max(1),
            entries: Vec::new(),
            chunks: Vec::new(),
            open: None,
            finishing: JoinSet::new(),
            finished: Vec::new(),
            next_seq: 0,
            tar: TarReader::new(),
            buf: BytesMut::new(),
            archive: None,
            file: None,
            tar_bytes: 0,
            file_bytes: 0,
        }
    }

    /// Starts archive number `index` (of the manifest's tablespace list).
    pub fn begin_archive(&mut self, index: u32) -> Result<()> {
        if self.archive.is_some() {
            bail!("a new archive began before the previous one ended");
        }
        self.archive = Some(index);
        self.tar = TarReader::new();
        self.buf.clear();
        Ok(())
    }

    /// Feeds bytes of the current archive.
    pub async fn feed(&mut self, data: &[u8]) -> Result<()> {
        let archive = self
            .archive
            .context("archive data before the server named the archive")?;
        self.tar_bytes += data.len() as u64;
        self.buf.extend_from_slice(data);
        loop {
            let ev = self
                .tar
                .next_event(&mut self.buf)
                .with_context(|| format!("reading the tar stream of archive {archive}"))?;
            match ev {
                None => return Ok(()),
                Some(TarEvent::Entry(e)) => {
                    let kind = match e.entry_type {
                        TarEntryType::File => EntryKind::File,
                        TarEntryType::Directory => EntryKind::Dir,
                        TarEntryType::Symlink => EntryKind::Symlink,
                        other => bail!(
                            "tar entry {} has type {other:?}, which a PostgreSQL base backup never contains",
                            e.path
                        ),
                    };
                    let idx = u32::try_from(self.entries.len()).context("too many entries")?;
                    self.entries.push(BackupEntry {
                        archive,
                        path: e.path,
                        kind,
                        mode: e.mode,
                        mtime: e.mtime,
                        size: if kind == EntryKind::File { e.size } else { 0 },
                        crc32c: 0,
                        link: e.link_target,
                    });
                    if kind == EntryKind::File {
                        self.file = Some(CurrentFile {
                            entry: idx,
                            offset: 0,
                            crc: 0,
                        });
                    }
                }
                Some(TarEvent::Data(bytes)) => self.file_data(bytes).await?,
                Some(TarEvent::EntryEnd) => {
                    if let Some(f) = self.file.take() {
                        let e = &mut self.entries[f.entry as usize];
                        if f.offset != e.size {
                            bail!("{}: got {} of {} bytes", e.path, f.offset, e.size);
                        }
                        e.crc32c = f.crc;
                    }
                }
                Some(TarEvent::End) => {}
            }
        }
    }

    /// Ends the current archive; it must end between entries.
    pub fn end_archive(&mut self) -> Result<()> {
        let archive = self.archive.take().context("no archive to end")?;
        self.tar
            .finish()
            .with_context(|| format!("archive {archive} ended early"))?;
        if self.file.is_some() {
            bail!("archive {archive} ended inside a file");
        }
        Ok(())
    }

    async fn file_data(&mut self, mut bytes: Bytes) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            bail!("tar data outside a regular file");
        };
        file.crc = crc32c::crc32c_append(file.crc, &bytes);
        let entry = file.entry;
        while !bytes.is_empty() {
            if self.open.is_none() {
                self.open_chunk().await?;
            }
            let Some(open) = self.open.as_mut() else {
                bail!("no open data object");
            };
            let room = self.chunk_size - open.bytes;
            let take = (bytes.len() as u64).min(room) as usize;
            let part = bytes.split_to(take);
            let Some(file) = self.file.as_mut() else {
                bail!("tar data outside a regular file");
            };
            match open.pieces.last_mut() {
                Some(p) if p.entry == entry && p.offset + p.len == file.offset => {
                    p.len += take as u64
                }
                _ => open.pieces.push(Piece {
                    entry,
                    offset: file.offset,
                    len: take as u64,
                }),
            }
            file.offset += take as u64;
            open.bytes += take as u64;
            self.file_bytes += take as u64;
            open.writer
                .write(part)
                .await
                .with_context(|| format!("writing {}", open.writer.key()))?;
            if open.bytes >= self.chunk_size {
                self.close_chunk().await?;
            }
        }
        Ok(())
    }

    async fn open_chunk(&mut self) -> Result<()> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let key = layout::base_backup_chunk(&self.id, seq);
        let writer = self
            .repo
            .writer(&key, ContentKind::BaseBackupData, PutMode::CreateNew)
            .await
            .with_context(|| format!("starting {key}"))?;
        self.open = Some(OpenChunk {
            seq,
            writer,
            bytes: 0,
            pieces: Vec::new(),
        });
        Ok(())
    }

    async fn close_chunk(&mut self) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        while self.finishing.len() >= MAX_FINISHING {
            self.reap_one().await?;
        }
        let seq = open.seq;
        let writer = open.writer;
        // The writer's finish future is not `Send`, so it runs on a blocking thread of its
        // own; that lets the next object fill while this one's last part uploads.
        let handle = tokio::runtime::Handle::current();
        self.finishing.spawn_blocking(move || {
            let key = writer.key().clone();
            let info = handle
                .block_on(writer.finish())
                .with_context(|| format!("finishing {key}"))?;
            Ok((seq, info))
        });
        self.chunks.push(DataChunk {
            seq,
            bytes: open.bytes,
            stored_bytes: 0,
            sha256: String::new(),
            pieces: open.pieces,
        });
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<()> {
        if let Some(r) = self.finishing.join_next().await {
            let done = r.context("a data object upload task failed")??;
            self.finished.push(done);
        }
        Ok(())
    }

    /// Closes the last object, waits for every upload and returns the manifest's entries
    /// and chunks.
    pub async fn finish(mut self) -> Result<(Vec<BackupEntry>, Vec<DataChunk>)> {
        if self.archive.is_some() {
            bail!("the backup ended inside an archive");
        }
        self.close_chunk().await?;
        while !self.finishing.is_empty() {
            self.reap_one().await?;
        }
        for (seq, info) in self.finished {
            let c = self
                .chunks
                .iter_mut()
                .find(|c| c.seq == seq)
                .context("finished an unknown data object")?;
            if info.original_len != c.bytes {
                bail!(
                    "{} holds {} bytes, expected {}",
                    info.key,
                    info.original_len,
                    c.bytes
                );
            }
            c.stored_bytes = info.stored_len;
            c.sha256 = info.sha256_hex();
        }
        Ok((self.entries, self.chunks))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use wire::pg::tar::build::{padded, ustar_header};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_files_are_split_and_small_ones_grouped() {
        let repo = Repository::open("memory://", storage::RepoOptions::default()).unwrap();
        let id = BackupId::parse("t1").unwrap();
        let mut tar = Vec::new();
        tar.extend_from_slice(&ustar_header("base", b'5', 0, 0o700, 1, ""));
        let big: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        tar.extend_from_slice(&ustar_header(
            "base/1",
            b'0',
            big.len() as u64,
            0o600,
            1,
            "",
        ));
        tar.extend_from_slice(&padded(&big));
        tar.extend_from_slice(&ustar_header("PG_VERSION", b'0', 3, 0o600, 1, ""));
        tar.extend_from_slice(&padded(b"17\n"));
        tar.extend_from_slice(&ustar_header("pg_tblspc/16385", b'2', 0, 0o777, 1, "/ts"));
        let mut c = Chunker::new(repo.clone(), id.clone(), 1000);
        c.begin_archive(0).unwrap();
        for piece in tar.chunks(77) {
            c.feed(piece).await.unwrap();
        }
        c.end_archive().unwrap();
        let (entries, chunks) = c.finish().await.unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].crc32c, crc32c::crc32c(&big));
        assert_eq!(entries[3].link.as_deref(), Some("/ts"));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.iter().map(|c| c.bytes).sum::<u64>(), 2503);
        assert_eq!(
            chunks[2].pieces,
            vec![
                Piece {
                    entry: 1,
                    offset: 2000,
                    len: 500
                },
                Piece {
                    entry: 2,
                    offset: 0,
                    len: 3
                }
            ]
        );
        let last = repo.get(&layout::base_backup_chunk(&id, 2)).await.unwrap();
        assert_eq!(&last[..500], &big[2000..]);
        assert_eq!(&last[500..], b"17\n");
    }
}
