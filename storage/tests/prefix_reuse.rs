//! `EncodedPrefix`: a longer object that starts with the frames of a shorter one (WAL
//! partials growing into a segment) is byte-identical to the same object written from
//! scratch, verifies as a whole, and a prefix from other settings is refused.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use storage::keys::generate_identity;
use storage::{ContentKind, EncodedPrefix, PutMode, RepoKey, RepoOptions, Repository};

const FRAME: usize = 64 << 10;

fn opts() -> RepoOptions {
    RepoOptions {
        frame_size: FRAME,
        workers: 2,
        ..RepoOptions::default()
    }
}

fn data(len: usize) -> Bytes {
    (0..len as u32)
        .map(|i| (i % 251) as u8 ^ (i >> 11) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Writes `bytes[..len]` in 10 000-byte pieces, reusing `prefix`; returns the next prefix.
async fn write_growing(
    repo: &Repository,
    key: &RepoKey,
    bytes: &Bytes,
    len: usize,
    prefix: Option<&EncodedPrefix>,
) -> EncodedPrefix {
    let mut w = repo
        .writer_with_len(
            key,
            ContentKind::WalPartial,
            PutMode::Overwrite,
            Some(len as u64),
        )
        .await
        .unwrap();
    w.reuse_prefix(prefix).await.unwrap();
    let mut pos = prefix.map_or(0, |p| p.len() as usize);
    while pos < len {
        let n = 10_000.min(len - pos);
        w.write(bytes.slice(pos..pos + n)).await.unwrap();
        pos += n;
    }
    let (info, next) = w.finish_with_prefix().await.unwrap();
    assert_eq!(info.original_len, len as u64);
    assert!(info.matches_content(&[&bytes[..len]]));
    assert_eq!(next.len() as usize, len / FRAME * FRAME);
    next
}

#[tokio::test]
async fn growing_object_reuses_frames_and_equals_a_fresh_write() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let repo = Repository::open(&url, opts()).unwrap();
    let all = data(FRAME * 5 + 777);
    let key = RepoKey::parse("postgres/wal/00000001/grow").unwrap();
    let fresh_key = RepoKey::parse("postgres/wal/00000001/fresh").unwrap();
    let mut prefix: Option<EncodedPrefix> = None;
    // Lengths below a frame, on a frame boundary, just past one, and the whole thing.
    for len in [1000, FRAME, FRAME + 1, 3 * FRAME - 5, 3 * FRAME, all.len()] {
        let next = write_growing(&repo, &key, &all, len, prefix.as_ref()).await;
        assert!(next.len() >= prefix.as_ref().map_or(0, |p| p.len()));
        prefix = Some(next);
        assert_eq!(repo.get(&key).await.unwrap(), all.slice(..len), "len {len}");
        repo.put(
            &fresh_key,
            ContentKind::WalPartial,
            all.slice(..len),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        let stored = std::fs::read(dir.path().join("postgres/wal/00000001/grow")).unwrap();
        let fresh = std::fs::read(dir.path().join("postgres/wal/00000001/fresh")).unwrap();
        // Headers and trailer digests name their own keys; the frames must be identical.
        let body = |b: &[u8]| {
            let hlen = u32::from_le_bytes([b[10], b[11], b[12], b[13]]) as usize;
            (
                b[hlen..b.len() - 68].to_vec(),
                b[b.len() - 68..][..20].to_vec(),
            )
        };
        assert!(
            body(&stored) == body(&fresh),
            "len {len}: stored frames differ from a fresh write"
        );
        repo.verify(&key).await.unwrap();
    }
}

#[tokio::test]
async fn encrypted_growing_object_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let id = generate_identity();
    let repo = Repository::open(
        &url,
        RepoOptions {
            recipients: vec![id.to_public()],
            identities: vec![id],
            ..opts()
        },
    )
    .unwrap();
    let all = data(FRAME * 3 + 5);
    let key = RepoKey::parse("postgres/wal/00000001/enc").unwrap();
    let first = write_growing(&repo, &key, &all, 2 * FRAME + 1, None).await;
    write_growing(&repo, &key, &all, all.len(), Some(&first)).await;
    assert_eq!(repo.get(&key).await.unwrap(), all);
}

#[tokio::test]
async fn prefix_from_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let repo = Repository::open(&url, opts()).unwrap();
    let other = Repository::open(
        &url,
        RepoOptions {
            compression_level: Some(7),
            ..opts()
        },
    )
    .unwrap();
    let all = data(FRAME * 2);
    let key = RepoKey::parse("postgres/wal/00000001/x").unwrap();
    let prefix = write_growing(&repo, &key, &all, FRAME * 2, None).await;
    let mut w = other
        .writer(&key, ContentKind::WalPartial, PutMode::Overwrite)
        .await
        .unwrap();
    let err = w.reuse_prefix(Some(&prefix)).await.unwrap_err().to_string();
    assert!(err.contains("other repository settings"), "{err}");
    let w = repo
        .writer(&key, ContentKind::WalPartial, PutMode::Overwrite)
        .await
        .unwrap();
    let err = w.finish_with_prefix().await.unwrap_err().to_string();
    assert!(err.contains("needs reuse_prefix"), "{err}");
}
