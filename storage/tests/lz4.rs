//! LZ4 frames (format version 3, `RepoOptions::lz4`): objects round-trip plain and
//! encrypted, whole and streamed, every frame that shrinks is LZ4 and says so, the header
//! records the codec, and a version 2 header claiming LZ4 is refused (version 2 readers
//! never knew it, so no version 2 object can hold it).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use storage::format::{Codec, Header, FRAME_LZ4, FRAME_ZSTD};
use storage::keys::generate_identity;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository, StorageError};
use support::{stored_frames, wal_like as data};

const FRAME: usize = 64 << 10;

fn open(dir: &Path, f: impl FnOnce(&mut RepoOptions)) -> Repository {
    let mut o = RepoOptions {
        frame_size: FRAME,
        compression_level: Some(1),
        lz4: true,
        ..RepoOptions::default()
    };
    f(&mut o);
    Repository::open(&format!("file://{}", dir.display()), o).unwrap()
}

/// The flags of every frame of the object file at `path`.
fn frame_flags(path: &Path) -> (Header, Vec<u8>) {
    let (h, frames) = stored_frames(path);
    (h, frames.iter().map(|(fh, _)| fh.flags).collect())
}

#[tokio::test]
async fn lz4_objects_round_trip_plain_and_encrypted() {
    let id = generate_identity();
    for encrypted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let repo = open(dir.path(), |o| {
            if encrypted {
                o.recipients = vec![id.to_public()];
                o.identities = vec![id.clone()];
            }
        });
        let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
        let d = data(5 * FRAME + 123);
        let info = repo
            .put(&key, ContentKind::WalSegment, d.clone(), PutMode::CreateNew)
            .await
            .unwrap();
        assert!(info.stored_len < d.len() as u64 / 2, "{info:?}");
        assert_eq!(repo.get(&key).await.unwrap(), d);
        let mut r = repo.reader(&key).await.unwrap();
        let mut streamed = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            streamed.extend_from_slice(&c);
        }
        assert!(streamed == d);
        assert!(repo.verify(&key).await.unwrap().plaintext_verified);
        assert!(info.matches_content(&[&d]));
        let (h, flags) = frame_flags(&dir.path().join(key.as_str()));
        assert_eq!((h.version, h.codec), (4, Codec::Lz4));
        assert_eq!(flags.len(), 6);
        for f in flags {
            assert_ne!(f & FRAME_LZ4, 0, "{f:02x}");
            assert_eq!(f & FRAME_ZSTD, 0, "{f:02x}");
        }
    }
}

#[tokio::test]
async fn lz4_needs_format_version_3_and_a_version_2_header_cannot_claim_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = RepoOptions {
        lz4: true,
        format_version: 2,
        ..RepoOptions::default()
    };
    let err = Repository::open(&format!("file://{}", dir.path().display()), o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LZ4 needs container format version 3"),
        "{err}"
    );

    // A version 3 LZ4 object relabelled as version 2 (header CRC and stored CRC fixed, as
    // anyone can): refused at the header, whose codec 2 version 2 does not have.
    let repo = open(dir.path(), |_| {});
    let key = RepoKey::parse("t/obj").unwrap();
    repo.put(
        &key,
        ContentKind::Other,
        data(3 * FRAME),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let path = dir.path().join(key.as_str());
    let bytes = std::fs::read(&path).unwrap();
    let (mut h, hlen) = Header::parse("k", &bytes).unwrap().unwrap();
    h.version = 2;
    let mut out = h.encode();
    out.extend_from_slice(&bytes[hlen..]);
    std::fs::write(&path, &out).unwrap();
    let e = repo.get(&key).await.unwrap_err();
    assert!(matches!(e, StorageError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("header codec"), "{e}");
    // With the codec byte cleared too, the first frame's LZ4 flag is refused.
    h.codec = Codec::None;
    let mut out = h.encode();
    out.extend_from_slice(&bytes[hlen..]);
    std::fs::write(&path, &out).unwrap();
    let e = repo.get(&key).await.unwrap_err();
    assert!(
        e.to_string().contains("no LZ4 before format version 3"),
        "{e}"
    );
}
