//! Lays a base backup down on disk: directories first, then every data object downloaded,
//! verified (by the storage reader: frame CRC32C, object SHA-256) and written at its files'
//! offsets by up to `jobs` tasks at once, then each file's CRC32C — combined from the
//! pieces written in parallel — compared with what the backup recorded and with the
//! server's `backup_manifest`.
//!
//! Files are created by the task that first writes to them (empty files by a task of
//! their own), not up front: creating a thousand inodes is file-system work that would
//! otherwise run alone before the first byte is written. Each written range is handed to
//! the kernel for writeback at once (`posix_fadvise(DONTNEED)`, which starts the
//! write-out of dirty pages like `sync_file_range(SYNC_FILE_RANGE_WRITE)`; PostgreSQL's
//! `pg_flush_data` uses the same call where `sync_file_range` is missing), so the disk
//! is busy from the start instead of the kernel waiting for gigabytes to be dirty; the
//! same call on the piece written so far lets go of the pages already on disk, so the
//! restore recycles a bounded set of page-cache pages instead of filling memory with
//! pages it will not read (allocating fresh ones is most of the cost of a buffered write
//! on a VM). At the end every file and every directory is fsynced before the restore
//! reports success.
//!
//! `global/pg_control` is written under a temporary name and only renamed by the caller
//! once everything checked out, so a half-restored directory never starts as if it were
//! whole (PostgreSQL cannot start without `pg_control`).

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use storage::layout::{self, BackupId};
use storage::Repository;
use tokio::task::JoinSet;

use crate::pg::backup::{crc_matches, manifest_path, ServerManifestFile};
use crate::pg::backup_manifest::{BackupManifest, DataChunk, EntryKind};
use crate::pg::backup_progress::Progress;

use super::place::Modes;

/// Bytes of a piece written before its write-out is started early.
const WRITEBACK_MIN: u64 = 1 << 20;

/// Threads syncing files at the end: concurrent fsyncs share the file system's journal
/// commits, so more than `jobs` pays for a data directory of many small files.
const SYNC_THREADS: usize = 16;

/// Where `pg_control` goes until the restore is complete.
pub const PG_CONTROL_TEMP: &str = "global/pg_control.syncbridge-restore";

/// Written pieces: (entry, offset, len, crc32c).
pub type Written = Vec<(u32, u64, u64, u32)>;

/// The path of an entry on disk: the archive's root joined with the entry's path (already
/// normalised by the tar reader: relative, no `..`).
pub fn dest_path(m: &BackupManifest, roots: &[PathBuf], entry: u32) -> Result<PathBuf> {
    let e = m
        .entries
        .get(entry as usize)
        .with_context(|| format!("entry {entry} missing"))?;
    let root = roots
        .get(e.archive as usize)
        .with_context(|| format!("archive {} missing", e.archive))?;
    let is_base = m
        .tablespaces
        .get(e.archive as usize)
        .is_some_and(|t| t.oid.is_none());
    if e.path.starts_with('/') || e.path.split('/').any(|c| c == ".." || c.is_empty()) {
        bail!("backup entry {:?} is not a safe relative path", e.path);
    }
    if is_base && e.path == "global/pg_control" {
        return Ok(root.join(PG_CONTROL_TEMP));
    }
    Ok(root.join(&e.path))
}

/// Creates the directories (0700) inside the roots, which exist (the caller created and
/// locked them), including every file's parent; their final modes are set once the files
/// are verified. Files are created while the data is written ([`write_all`]); symlinks
/// are the caller's business.
pub fn prepare(m: &BackupManifest, roots: &[PathBuf]) -> Result<()> {
    let mut dirs = std::fs::DirBuilder::new();
    dirs.recursive(true).mode(0o700);
    let mut made = std::collections::HashSet::new();
    for (i, e) in m.entries.iter().enumerate() {
        let p = dest_path(m, roots, i as u32)?;
        let dir = match e.kind {
            EntryKind::Dir => p,
            EntryKind::File => match p.parent() {
                Some(parent) => parent.to_path_buf(),
                None => continue,
            },
            _ => continue,
        };
        if made.insert(dir.clone()) {
            dirs.create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Opens a file of the backup for writing, creating it (0600) if no other task has yet.
/// The target was checked empty and is locked, so nothing is there but what this restore
/// made.
fn open_for_write(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        // Other tasks write other pieces of the same file.
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Starts the write-out of the dirty pages of a range, without waiting for it, and drops
/// its pages that are already clean (see the module docs). Only a hint: the final fsync
/// is what makes the data durable, so an error is ignored.
fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        offset,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// What `write_all` did.
#[derive(Debug, Clone, Copy)]
pub struct UnpackStats {
    /// File bytes written.
    pub bytes: u64,
    /// Objects read.
    pub objects: usize,
}

/// Downloads every data object and writes its pieces, `jobs` objects at a time, then checks
/// every file.
pub async fn write_all(
    repo: &Repository,
    m: &Arc<BackupManifest>,
    roots: &Arc<Vec<PathBuf>>,
    jobs: usize,
    server_files: &[ServerManifestFile],
    modes: Modes,
) -> Result<UnpackStats> {
    let id = m.backup_id()?;
    let done = Arc::new(AtomicU64::new(0));
    let written: Arc<Mutex<Written>> = Arc::new(Mutex::new(Vec::new()));
    let total: u64 = m.chunks.iter().map(|c| c.bytes).sum();
    let mut progress = Progress::new("restore", Some(total));
    let mut set = JoinSet::new();
    // Files no object writes to (empty ones) are created meanwhile.
    let mut empty: Vec<PathBuf> = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        if e.kind == EntryKind::File && e.size == 0 {
            empty.push(dest_path(m, roots, i as u32)?);
        }
    }
    let create_empty = tokio::task::spawn_blocking(move || -> Result<()> {
        for p in empty {
            open_for_write(&p)?;
        }
        Ok(())
    });
    let mut next = 0usize;
    let jobs = jobs.max(1);
    loop {
        while set.len() < jobs && next < m.chunks.len() {
            let (repo, m2, roots, done, written, id) = (
                repo.clone(),
                m.clone(),
                roots.clone(),
                done.clone(),
                written.clone(),
                id.clone(),
            );
            let idx = next;
            set.spawn(async move {
                let chunk = &m2.chunks[idx];
                restore_chunk(&repo, &m2, &roots, &id, chunk, &done, &written)
                    .await
                    .map_err(|e| e.context(describe_chunk(&m2, &id, chunk)))
            });
            next += 1;
        }
        let tick = tokio::time::sleep(std::time::Duration::from_millis(250));
        tokio::select! {
            r = set.join_next() => match r {
                None => break,
                Some(r) => {
                    if let Err(e) = r.context("a restore task failed")? {
                        set.abort_all();
                        return Err(e);
                    }
                }
            },
            _ = tick => {}
        }
        progress.update(done.load(Ordering::Relaxed));
    }
    create_empty
        .await
        .context("the task creating empty files failed")??;
    progress.finish(done.load(Ordering::Relaxed));
    let pieces = std::mem::take(&mut *written.lock().map_err(|_| anyhow!("lock poisoned"))?);
    verify_files(m, roots, pieces, server_files, modes)?;
    sync_files(m, roots, jobs).await?;
    Ok(UnpackStats {
        bytes: done.load(Ordering::Relaxed),
        objects: m.chunks.len(),
    })
}

fn describe_chunk(m: &BackupManifest, id: &BackupId, c: &DataChunk) -> String {
    let mut names: Vec<String> = c
        .pieces
        .iter()
        .take(5)
        .filter_map(|p| m.entries.get(p.entry as usize))
        .map(|e| manifest_path(e, &m.tablespaces))
        .collect();
    if c.pieces.len() > 5 {
        names.push(format!("and {} more", c.pieces.len() - 5));
    }
    format!(
        "restoring object {} (files {})",
        layout::base_backup_chunk(id, c.seq),
        names.join(", ")
    )
}

async fn restore_chunk(
    repo: &Repository,
    m: &BackupManifest,
    roots: &[PathBuf],
    id: &BackupId,
    chunk: &DataChunk,
    done: &AtomicU64,
    written: &Mutex<Written>,
) -> Result<()> {
    let key = layout::base_backup_chunk(id, chunk.seq);
    let mut files: HashMap<u32, std::fs::File> = HashMap::new();
    let (results, _) = read_pieces(repo, &key, chunk, |p, at, part| {
        let f = match files.entry(p.entry) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let path = dest_path(m, roots, p.entry)?;
                v.insert(tokio::task::block_in_place(|| open_for_write(&path))?)
            }
        };
        tokio::task::block_in_place(|| {
            f.write_all_at(part, at)?;
            // The piece so far: starts the new bytes' write-out and lets go of the
            // pages of earlier ones already on disk. Small files are left to the
            // final fsync: a write-out each would be an I/O of its own in the task
            // that is laying down hundreds of them.
            let so_far = at - p.offset + part.len() as u64;
            if so_far >= WRITEBACK_MIN {
                start_writeback(f, p.offset, so_far);
            }
            std::io::Result::Ok(())
        })
        .with_context(|| {
            format!(
                "writing {}",
                dest_path(m, roots, p.entry)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        })?;
        done.fetch_add(part.len() as u64, Ordering::Relaxed);
        Ok(())
    })
    .await?;
    written
        .lock()
        .map_err(|_| anyhow!("lock poisoned"))?
        .extend(results);
    Ok(())
}

/// Reads data object `key` (verified by the storage reader) and cuts its bytes into the
/// pieces `chunk` records, handing each run of bytes to `sink` with the piece and the file
/// offset it goes to; returns each piece's CRC32C (for [`file_problems`]) and the object's
/// info. An object holding more or fewer bytes than its pieces is an error naming it.
/// Restore writes the pieces to files; `verify` only checks them.
pub async fn read_pieces(
    repo: &Repository,
    key: &layout::RepoKey,
    chunk: &DataChunk,
    mut sink: impl FnMut(&crate::pg::backup_manifest::Piece, u64, &[u8]) -> Result<()>,
) -> Result<(Written, storage::ObjectInfo)> {
    let mut reader = repo.reader(key).await?;
    let mut results: Written = Vec::with_capacity(chunk.pieces.len());
    let mut piece_idx = 0usize;
    let mut piece_done = 0u64;
    let mut crc = 0u32;
    while let Some(mut data) = reader.next_chunk().await? {
        while !data.is_empty() {
            let Some(p) = chunk.pieces.get(piece_idx) else {
                bail!("{key} holds more bytes than its pieces");
            };
            let take = (p.len - piece_done).min(data.len() as u64) as usize;
            let part = data.split_to(take);
            sink(p, p.offset + piece_done, &part)?;
            crc = crc32c::crc32c_append(crc, &part);
            piece_done += take as u64;
            if piece_done == p.len {
                results.push((p.entry, p.offset, p.len, crc));
                crc = 0;
                piece_done = 0;
                piece_idx += 1;
            }
        }
    }
    if piece_idx != chunk.pieces.len() {
        bail!(
            "{key} ended after {piece_idx} of {} pieces",
            chunk.pieces.len()
        );
    }
    let info = reader
        .info()
        .with_context(|| format!("{key}: the reader ended without verifying the trailer"))?;
    Ok((results, info))
}

/// Combines each file's piece CRCs in offset order and compares them with the backup's
/// record and the server's manifest; sets permissions (capped by `modes`: never setuid,
/// setgid or sticky).
fn verify_files(
    m: &BackupManifest,
    roots: &[PathBuf],
    pieces: Written,
    server_files: &[ServerManifestFile],
    modes: Modes,
) -> Result<()> {
    if let Some(p) = file_problems(m, pieces, server_files).into_iter().next() {
        bail!("{p}");
    }
    for (i, e) in m.entries.iter().enumerate() {
        if e.kind == EntryKind::Symlink {
            continue;
        }
        let path = dest_path(m, roots, i as u32)?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(modes.for_entry(e.kind, e.mode)),
        )
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// What is wrong with the backup's files given the pieces read from its data objects
/// (entry, offset, length, CRC32C): each file's pieces must cover it without a hole, and
/// their combined CRC32C and length must match `backup.json` and the server's
/// `backup_manifest`, which must list no file the backup lacks. Restore stops at the first
/// problem; `verify` reports them all.
pub fn file_problems(
    m: &BackupManifest,
    mut pieces: Written,
    server_files: &[ServerManifestFile],
) -> Vec<String> {
    let mut problems = Vec::new();
    pieces.sort_unstable_by_key(|p| (p.0, p.1));
    let mut per_entry: HashMap<u32, (u64, u32)> = HashMap::new();
    let mut broken: std::collections::HashSet<u32> = std::collections::HashSet::new();
    let name_of = |entry: u32| {
        m.entries.get(entry as usize).map_or_else(
            || format!("entry {entry}"),
            |e| manifest_path(e, &m.tablespaces),
        )
    };
    for (entry, offset, len, crc) in pieces {
        let e = per_entry.entry(entry).or_insert((0, 0));
        if e.0 != offset {
            if broken.insert(entry) {
                problems.push(format!(
                    "{}: bytes {}..{offset} are in no data object",
                    name_of(entry),
                    e.0
                ));
            }
            continue;
        }
        e.1 = if e.0 == 0 {
            crc
        } else {
            storage::crc::crc32c_combine(e.1, crc, len)
        };
        e.0 += len;
    }
    let server: HashMap<&str, &ServerManifestFile> =
        server_files.iter().map(|f| (f.path.as_str(), f)).collect();
    for (i, e) in m.entries.iter().enumerate() {
        if e.kind != EntryKind::File || broken.contains(&(i as u32)) {
            continue;
        }
        let name = manifest_path(e, &m.tablespaces);
        let (len, crc) = per_entry.get(&(i as u32)).copied().unwrap_or((0, 0));
        if len != e.size {
            problems.push(format!(
                "{name}: its data objects hold {len} bytes, the backup has {}",
                e.size
            ));
            continue;
        }
        if crc != e.crc32c {
            problems.push(format!(
                "{name}: CRC32C {crc:08x} of its bytes differs from the backup's {:08x}",
                e.crc32c
            ));
            continue;
        }
        if let Some(f) = server.get(name.as_str()) {
            if f.size != len || (f.algorithm == "CRC32C" && !crc_matches(crc, &f.checksum)) {
                problems.push(format!(
                    "{name}: does not match the server's backup_manifest (size {}, checksum {})",
                    f.size, f.checksum
                ));
            }
        }
    }
    let ours: std::collections::HashSet<String> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| manifest_path(e, &m.tablespaces))
        .collect();
    for f in server_files {
        if !ours.contains(&f.path) {
            problems.push(format!(
                "{}: listed in the server's backup_manifest but not in the backup",
                f.path
            ));
        }
    }
    problems
}

/// Makes every restored file durable, then every directory (their entries: the files'
/// names), [`SYNC_THREADS`] (or `jobs`, if more) at a time, once all are written: the
/// writeback started as each range was written has mostly finished by then, so this waits
/// for the rest.
async fn sync_files(m: &BackupManifest, roots: &[PathBuf], jobs: usize) -> Result<()> {
    let (mut files, mut dirs) = (Vec::new(), roots.to_vec());
    for (i, e) in m.entries.iter().enumerate() {
        match e.kind {
            EntryKind::File => files.push(dest_path(m, roots, i as u32)?),
            EntryKind::Dir => dirs.push(dest_path(m, roots, i as u32)?),
            _ => {}
        }
    }
    // Parents of files, in case the backup has no entry for them (`prepare` made them).
    dirs.extend(
        files
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf)),
    );
    dirs.sort();
    dirs.dedup();
    for (paths, dir) in [(files, false), (dirs, true)] {
        let per = paths.len().div_ceil(jobs.max(SYNC_THREADS)).max(1);
        let mut set = JoinSet::new();
        for group in paths.chunks(per) {
            let group = group.to_vec();
            set.spawn_blocking(move || -> Result<()> {
                for p in group {
                    let f = if dir {
                        std::fs::File::open(&p)
                    } else {
                        std::fs::OpenOptions::new().write(true).open(&p)
                    };
                    f.and_then(|f| if dir { f.sync_all() } else { f.sync_data() })
                        .with_context(|| format!("syncing {}", p.display()))?;
                }
                Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r.context("a sync task failed")??;
        }
    }
    Ok(())
}

/// Syncs a directory entry (after renames).
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Writes a small file restore adds itself (created 0600, synced).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
