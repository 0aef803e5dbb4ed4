//! Writing WAL into the repository: keys, the "identical is a no-op, different is an error"
//! rule for segments and history files, and what the repository already holds.

use anyhow::{Context, Result};
use bytes::Bytes;
use storage::layout;
use storage::LeaseError;
use storage::{ContentKind, EncodedRecord, PutMode, RepoKey, Repository, StorageError};

use wire::pg::{SegmentName, TimelineId};

use crate::job::JobError;

/// An error that reconnecting cannot fix: the stream must stop and a human must look.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

impl From<Fatal> for JobError {
    fn from(e: Fatal) -> JobError {
        JobError::fatal(e)
    }
}

/// Why writing WAL into the repository failed, typed so the stream can tell a store to
/// wait for ([`WriteError::is_retryable`]) from one to stop for, without searching a chain.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Different content already stored, or the repository gone: stop.
    #[error(transparent)]
    Fatal(#[from] Fatal),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The store failed while doing `what`.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: StorageError,
    },
    /// The lease does not allow writing (lost, or not renewed in time).
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

impl WriteError {
    /// The store's own error, if it is one.
    fn storage(&self) -> Option<&StorageError> {
        match self {
            WriteError::Storage(e) | WriteError::Store { source: e, .. } => Some(e),
            WriteError::Lease(LeaseError::Storage { source, .. }) => Some(source),
            _ => None,
        }
    }

    /// Whether writing again may succeed (the store says its failure was transient).
    pub fn is_retryable(&self) -> bool {
        self.storage().is_some_and(StorageError::is_retryable)
    }

    /// The stream's error, classified like the store's error it holds, and explaining a
    /// write that failed because the repository directory vanished (the local store never
    /// recreates it), like [`ensure_marker`] does for a missing marker: fatal.
    pub fn explain(self, repo: &Repository) -> JobError {
        let missing = matches!(self.storage(), Some(StorageError::RepositoryMissing { .. }));
        let retryable = self.is_retryable();
        match self {
            WriteError::Fatal(f) => JobError::fatal(f),
            e if missing => JobError::fatal(
                anyhow::Error::new(e).context(gone_message(repo, "its directory no longer exists")),
            ),
            WriteError::Lease(l) => l.into(),
            // The store did not answer (as `JobError::from(StorageError)` says).
            e if retryable => JobError::unreachable(e),
            e => JobError::transient(e),
        }
    }
}

/// Checks that the repository marker is still there, before the server is told that WAL
/// is safe in the repository: a repository deleted or replaced under the stream (its
/// marker gone) stops the stream with an error, so the slot keeps the WAL.
pub async fn ensure_marker(repo: &Repository) -> Result<(), WriteError> {
    let gone = |why: String| Fatal(gone_message(repo, &why));
    match repo.exists(&layout::marker()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(gone(format!("its marker {} is missing", layout::marker())).into()),
        Err(e @ StorageError::RepositoryMissing { .. }) => Err(gone(e.to_string()).into()),
        Err(e) => Err(WriteError::Store {
            what: "checking the repository marker".into(),
            source: e,
        }),
    }
}

fn gone_message(repo: &Repository, why: &str) -> String {
    format!(
        "the repository {} is gone ({why}): it was deleted, unmounted or replaced while the stream was running; \
         stopping without confirming more WAL, so the replication slot keeps everything since the last confirmed position",
        repo.url()
    )
}

/// The repository key of a segment.
pub fn segment_key(seg: SegmentName) -> Result<RepoKey> {
    Ok(layout::wal_segment(&storage_segment(seg)?))
}

/// The repository key of bytes `[start, end)` of a segment in progress.
pub fn delta_key(seg: SegmentName, start: u32, end: u32) -> Result<RepoKey> {
    Ok(layout::wal_delta(&storage_segment(seg)?, start, end))
}

/// The repository key of a history file.
pub fn history_key(tli: TimelineId) -> Result<RepoKey> {
    Ok(layout::timeline_history(layout::TimelineId::new(
        tli.get(),
    )?))
}

fn storage_segment(seg: SegmentName) -> Result<layout::WalSegmentName> {
    layout::WalSegmentName::parse(&seg.to_string()).with_context(|| format!("segment name {seg}"))
}

/// Writes `chunks` as one object without first concatenating them (WAL arrives in pieces of
/// the receive buffer; copying a 16 MiB segment per upload would be wasted work).
pub async fn put_chunks(
    repo: &Repository,
    key: &RepoKey,
    kind: ContentKind,
    chunks: &[Bytes],
    mode: PutMode,
) -> Result<(), StorageError> {
    put_chunks_reusing(repo, key, kind, chunks, &[], mode).await
}

/// Frame records of a segment's deltas that the complete segment may reuse, each with the
/// offset in the segment of the bytes it holds, in order.
pub type Reusable = Vec<(u64, EncodedRecord)>;

/// [`put_chunks`], appending the records in `reuse` for the bytes they hold instead of
/// compressing those bytes again (only the content hash is computed over them again); the
/// bytes between them are encoded as usual. A record that does not fit (overlapping the
/// previous one, or past the end) is skipped and its bytes are encoded.
pub async fn put_chunks_reusing(
    repo: &Repository,
    key: &RepoKey,
    kind: ContentKind,
    chunks: &[Bytes],
    reuse: &[(u64, EncodedRecord)],
    mode: PutMode,
) -> Result<(), StorageError> {
    let len = chunks.iter().map(|c| c.len() as u64).sum();
    let mut w = repo.writer_with_len(key, kind, mode, Some(len)).await?;
    let mut at = 0u64;
    for (offset, record) in reuse {
        let end = offset + record.original_len();
        if *offset < at || end > len {
            continue;
        }
        for c in slice_chunks(chunks, at, *offset) {
            w.write(c).await?;
        }
        w.append_encoded(record, slice_chunks(chunks, *offset, end))
            .await?;
        at = end;
    }
    for c in slice_chunks(chunks, at, len) {
        w.write(c).await?;
    }
    w.finish().await.map(|_| ())
}

/// Writes a delta like [`put_chunks`] (overwriting) and returns its frame records, for the
/// complete segment to reuse.
pub async fn put_delta(
    repo: &Repository,
    key: &RepoKey,
    chunks: &[Bytes],
) -> Result<Vec<EncodedRecord>, StorageError> {
    let len = chunks.iter().map(|c| c.len() as u64).sum();
    let mut w = repo
        .writer_with_len(key, ContentKind::WalDelta, PutMode::Overwrite, Some(len))
        .await?;
    w.keep_records()?;
    for c in chunks {
        w.write(c.clone()).await?;
    }
    Ok(w.finish_with_records().await?.1)
}

/// Bytes `[from, to)` of the concatenation of `chunks`, as slices of them (no copy).
fn slice_chunks(chunks: &[Bytes], from: u64, to: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for c in chunks {
        let end = at + c.len() as u64;
        if end > from && at < to {
            let s = from.saturating_sub(at) as usize;
            let e = (to.min(end) - at) as usize;
            out.push(c.slice(s..e));
        }
        at = end;
        if at >= to {
            break;
        }
    }
    out
}

/// Stores an object that must never change once written (a complete segment or a history
/// file), reusing the frame records in `reuse` (see [`put_chunks_reusing`]): writing
/// identical bytes again is a no-op; different bytes are a [`Fatal`] error and the existing
/// object is left alone.
pub async fn put_immutable(
    repo: &Repository,
    key: &RepoKey,
    kind: ContentKind,
    chunks: &[Bytes],
    reuse: &[(u64, EncodedRecord)],
) -> Result<(), WriteError> {
    match put_chunks_reusing(repo, key, kind, chunks, reuse, PutMode::CreateNew).await {
        Ok(()) => Ok(()),
        Err(StorageError::AlreadyExists { .. }) => {
            let theirs = repo.info(key).await.map_err(|e| WriteError::Store {
                what: format!("reading the existing {key}"),
                source: e,
            })?;
            // Hashed only here (the way the stored object hashes: SHA-256, BLAKE3 or
            // XXH3-128 by its version and encryption): the storage pipeline already hashes
            // every write once.
            let ours = theirs.digest_of(chunks);
            let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
            if ours == theirs.sha256
                && len == theirs.original_len
                && (theirs.content_hash().collision_resistant()
                    || stored_bytes_equal(repo, key, chunks).await?)
            {
                tracing::debug!(%key, "already in the repository with identical content");
                return Ok(());
            }
            let kept = keep_conflicting_copy(repo, key, kind, chunks).await;
            let how = if ours == theirs.sha256 {
                format!(
                    "its digest matches the streamed bytes' by {}, but read back its bytes differ or fail their checks",
                    theirs.content_hash().name()
                )
            } else {
                format!(
                    "stored digest {}, {} bytes; the streamed bytes would have digest {}, {len} bytes",
                    theirs.sha256_hex(),
                    theirs.original_len,
                    hex::encode(ours),
                )
            };
            Err(Fatal(format!(
                "{key} already exists in the repository with DIFFERENT content ({how}). \
                 The stored object was not overwritten; {kept}. Is another cluster or agent writing to this repository?"
            ))
            .into())
        }
        Err(e) => Err(WriteError::Store {
            what: format!("storing {key}"),
            source: e,
        }),
    }
}

/// Whether the object at `key` holds exactly the bytes of `chunks`, read back and compared
/// frame by frame (memory: one frame). For an object whose digest matches by a hash that
/// only catches accidents (format version 4, plaintext): someone who can write to the bucket
/// could have put a colliding object there first, which must stop the stream loudly, as a
/// different digest does, rather than be taken for ours. An object that fails its checks
/// when read (damaged, or not what its key says) is not ours either.
async fn stored_bytes_equal(
    repo: &Repository,
    key: &RepoKey,
    chunks: &[Bytes],
) -> Result<bool, WriteError> {
    match compare_stored(repo, key, chunks).await {
        Err(e) if e.is_corrupt() => {
            tracing::warn!(%key, "the stored object does not read back intact: {e}");
            Ok(false)
        }
        other => other.map_err(|e| WriteError::Store {
            what: format!("reading the existing {key} back to compare it"),
            source: e,
        }),
    }
}

async fn compare_stored(
    repo: &Repository,
    key: &RepoKey,
    chunks: &[Bytes],
) -> Result<bool, StorageError> {
    let mut reader = repo.reader(key).await?;
    let mut ours = chunks.iter().filter(|c| !c.is_empty());
    let mut current: &[u8] = &[];
    while let Some(piece) = reader.next_chunk().await? {
        let mut theirs: &[u8] = &piece;
        while !theirs.is_empty() {
            if current.is_empty() {
                match ours.next() {
                    Some(c) => current = c,
                    None => return Ok(false),
                }
            }
            let n = current.len().min(theirs.len());
            if current[..n] != theirs[..n] {
                return Ok(false);
            }
            (current, theirs) = (&current[n..], &theirs[n..]);
        }
    }
    Ok(current.is_empty() && ours.next().is_none())
}

/// Saves our differing version of `key` where nothing restores from it: in the repository
/// under `postgres/conflicts/` (it survives the agent's container), or in $TMPDIR when the
/// repository will not take it. Says where it went, for the error message.
async fn keep_conflicting_copy(
    repo: &Repository,
    key: &RepoKey,
    kind: ContentKind,
    chunks: &[Bytes],
) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let repo_err = match layout::parse_wal_key(key) {
        Some(object) => {
            let conflict = layout::wal_conflict(&object, stamp);
            match put_chunks(repo, &conflict, kind, chunks, PutMode::CreateNew).await {
                Ok(()) => return format!("our version was saved as {conflict}"),
                Err(e) => format!("saving it as {conflict} failed: {e}"),
            }
        }
        None => format!("{key} is not a WAL key"),
    };
    let saved =
        std::env::temp_dir().join(format!("syncbridge-conflict-{}.{stamp}", key.file_name()));
    match std::fs::write(&saved, chunks.concat()) {
        Ok(()) => format!("our version was saved to {} ({repo_err})", saved.display()),
        Err(e) => format!(
            "our version could not be saved ({repo_err}; {}: {e})",
            saved.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use wire::pg::WalSegmentSize;

    fn chunks(text: &[u8]) -> Vec<Bytes> {
        text.chunks(3).map(Bytes::copy_from_slice).collect()
    }

    /// The key of segment 3 of timeline 1 (16 MiB segments).
    fn segment_3_key() -> RepoKey {
        let seg = SegmentName::parse(
            "000000010000000000000003",
            WalSegmentSize::new(16 << 20).unwrap(),
        )
        .unwrap();
        segment_key(seg).unwrap()
    }

    #[tokio::test]
    async fn immutable_objects_keep_both_versions_on_conflict() {
        let repo = Repository::open("memory:///", storage::RepoOptions::default()).unwrap();
        let key = segment_3_key();
        let kind = ContentKind::WalSegment;
        put_immutable(&repo, &key, kind, &chunks(b"original wal"), &[])
            .await
            .unwrap();
        // The same bytes again (a restart re-sending a segment): a no-op.
        put_immutable(&repo, &key, kind, &chunks(b"original wal"), &[])
            .await
            .unwrap();

        let err = put_immutable(&repo, &key, kind, &chunks(b"diverged wal"), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Fatal(_)), "{err:#}");
        let text = err.to_string();
        assert!(
            text.contains("DIFFERENT") && text.contains(key.as_str()),
            "{text}"
        );
        // The stored object is untouched; ours is in the repository, outside postgres/wal/.
        assert_eq!(repo.get(&key).await.unwrap(), &b"original wal"[..]);
        let saved = repo
            .list(&RepoKey::parse("postgres/conflicts").unwrap())
            .await
            .unwrap();
        assert_eq!(saved.len(), 1, "{saved:?}");
        assert!(text.contains(saved[0].key.as_str()), "{text}");
        assert!(saved[0]
            .key
            .file_name()
            .starts_with("000000010000000000000003."));
        assert_eq!(repo.get(&saved[0].key).await.unwrap(), &b"diverged wal"[..]);
        let wal =
            crate::catalog::pg::WalInventory::load(&repo, WalSegmentSize::new(16 << 20).unwrap())
                .await
                .unwrap();
        assert_eq!(wal.timelines[&1].segments.len(), 1);
    }

    #[tokio::test]
    async fn stored_bytes_are_compared_whatever_the_pieces() {
        // Plaintext format 4 objects match by XXH3, which only catches accidents: a match
        // is confirmed by reading the object back (several frames here).
        let opts = storage::RepoOptions {
            frame_size: 1000,
            ..storage::RepoOptions::default()
        };
        let repo = Repository::open("memory:///", opts).unwrap();
        let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000003").unwrap();
        let data: Vec<u8> = (0..10_007u32).map(|i| (i % 251) as u8).collect();
        put_chunks(
            &repo,
            &key,
            ContentKind::WalSegment,
            &[Bytes::from(data.clone())],
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        assert!(!repo
            .info(&key)
            .await
            .unwrap()
            .content_hash()
            .collision_resistant());
        for split in [1usize, 3, 999, 1000, 1001, 10_007] {
            let pieces: Vec<Bytes> = data.chunks(split).map(Bytes::copy_from_slice).collect();
            assert!(
                stored_bytes_equal(&repo, &key, &pieces).await.unwrap(),
                "{split}"
            );
        }
        let mut other = data.clone();
        other[5_000] ^= 1;
        let longer = [Bytes::from(data.clone()), Bytes::from_static(b"x")];
        for pieces in [
            vec![Bytes::from(other)],
            vec![Bytes::copy_from_slice(&data[..10_006])],
            longer.to_vec(),
            vec![],
        ] {
            assert!(!stored_bytes_equal(&repo, &key, &pieces).await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_damaged_segment_matching_by_its_trailer_is_not_taken_for_ours() {
        // A complete segment already stored whose trailer (digest, length) still matches the
        // streamed bytes but whose payload was damaged: read back, it fails its checks, so
        // it is a conflict (our copy kept aside, the stream stopped naming it), never a no-op.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let opts = storage::RepoOptions {
            compression_level: None,
            ..storage::RepoOptions::default()
        };
        let repo = Repository::open(&url, opts).unwrap();
        let key = segment_3_key();
        let kind = ContentKind::WalSegment;
        let data = chunks(&[b'w'; 4000]);
        put_immutable(&repo, &key, kind, &data, &[]).await.unwrap();
        let path = dir.path().join(key.as_str());
        let mut stored = std::fs::read(&path).unwrap();
        let n = stored.len();
        stored[n - 68 - 100] ^= 1; // a payload byte (raw frame), trailer untouched
        std::fs::write(&path, &stored).unwrap();

        let err = put_immutable(&repo, &key, kind, &data, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Fatal(_)), "{err:#}");
        let text = err.to_string();
        assert!(
            text.contains("DIFFERENT")
                && text.contains(key.as_str())
                && text.contains("fail their checks"),
            "{text}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            stored,
            "the stored object was rewritten"
        );
        let saved = repo
            .list(&RepoKey::parse("postgres/conflicts").unwrap())
            .await
            .unwrap();
        assert_eq!(saved.len(), 1, "{saved:?}");
        assert_eq!(
            repo.get(&saved[0].key).await.unwrap(),
            Bytes::from(vec![b'w'; 4000])
        );
    }
}
