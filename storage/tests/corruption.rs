//! Damaged objects fail with an error that names the object and the failed check; a
//! stream reader never reports a clean end for them.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;

use bytes::Bytes;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository, StorageError};

fn opts() -> RepoOptions {
    RepoOptions {
        frame_size: 64 << 10,
        workers: 2,
        ..RepoOptions::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    repo: Repository,
    key: RepoKey,
    path: PathBuf,
    pristine: Vec<u8>,
    original: Vec<u8>,
}

async fn fixture() -> Fixture {
    fixture_of(
        (0..300_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
            .collect(),
    )
    .await
}

/// A stored object holding `original`, and its pristine bytes.
async fn fixture_of(original: Vec<u8>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open(&format!("file://{}", dir.path().display()), opts()).unwrap();
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
    repo.put(
        &key,
        ContentKind::WalSegment,
        Bytes::from(original.clone()),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let path = dir.path().join(key.as_str());
    let pristine = std::fs::read(&path).unwrap();
    Fixture {
        _dir: dir,
        repo,
        key,
        path,
        pristine,
        original,
    }
}

/// The stored header length (offset 10), which depends on the recipients and the key.
fn header_len(object: &[u8]) -> usize {
    u32::from_le_bytes([object[10], object[11], object[12], object[13]]) as usize
}

/// Reads the object through the stream reader; returns the error and the bytes released.
async fn read_err(f: &Fixture) -> (StorageError, usize) {
    let mut released = 0;
    let mut r = match f.repo.reader(&f.key).await {
        Ok(r) => r,
        Err(e) => return (e, 0),
    };
    loop {
        match r.next_chunk().await {
            Ok(Some(c)) => released += c.len(),
            Ok(None) => panic!("damaged object read to a clean end"),
            Err(e) => return (e, released),
        }
    }
}

fn assert_corrupt(e: &StorageError, key: &RepoKey, check: &str) {
    let msg = e.to_string();
    assert!(matches!(e, StorageError::Corrupt { .. }), "{msg}");
    assert!(msg.contains(key.as_str()), "error names the object: {msg}");
    assert!(
        msg.contains(check),
        "error names the check {check:?}: {msg}"
    );
    assert!(!e.is_retryable());
}

async fn with_bytes(f: &Fixture, bytes: &[u8]) {
    std::fs::write(&f.path, bytes).unwrap();
}

#[tokio::test]
async fn pristine_object_reads_back() {
    let f = fixture().await;
    assert!(f.repo.get(&f.key).await.unwrap() == f.original);
}

#[tokio::test]
async fn flipped_header_byte() {
    let f = fixture().await;
    for at in [0usize, 9, 14, 20, 30] {
        let mut b = f.pristine.clone();
        b[at] ^= 0x04;
        with_bytes(&f, &b).await;
        let (e, released) = read_err(&f).await;
        assert_eq!(released, 0);
        let msg = e.to_string();
        assert!(msg.contains(f.key.as_str()), "{msg}");
        assert!(
            msg.contains("header") || msg.contains("format version"),
            "byte {at}: {msg}"
        );
        assert!(f.repo.info(&f.key).await.is_err());
    }
}

#[tokio::test]
async fn flipped_body_byte_is_located() {
    let f = fixture().await;
    let header_len = header_len(&f.pristine);
    // Inside the first frame's header, then inside its payload, then in a later frame.
    for (at, check) in [
        (header_len + 5, "frame header crc32c"),
        (header_len + 20 + 100, "frame payload crc32c"),
        (f.pristine.len() / 2, "crc32c"),
    ] {
        let mut b = f.pristine.clone();
        b[at] ^= 0x40;
        with_bytes(&f, &b).await;
        let (e, released) = read_err(&f).await;
        assert_corrupt(&e, &f.key, check);
        if let StorageError::Corrupt { offset, .. } = e {
            assert!(
                offset <= at as u64,
                "offset {offset} locates the frame holding {at}"
            );
        }
        assert!(released < f.original.len());
        // verify() and get() agree.
        assert_corrupt(&f.repo.get(&f.key).await.unwrap_err(), &f.key, "crc32c");
        assert!(f.repo.verify(&f.key).await.is_err());
    }
}

#[tokio::test]
async fn flipped_trailer_byte() {
    let f = fixture().await;
    let len = f.pristine.len();
    for (at, check) in [
        (len - 68, "trailer"),
        (len - 40, "trailer crc32c"),
        (len - 3, "trailer end magic"),
    ] {
        let mut b = f.pristine.clone();
        b[at] ^= 0x01;
        with_bytes(&f, &b).await;
        let (e, released) = read_err(&f).await;
        assert_corrupt(&e, &f.key, check);
        assert!(released < f.original.len(), "last chunk held back");
        assert!(f.repo.info(&f.key).await.is_err());
    }
}

#[tokio::test]
async fn truncation_anywhere_is_detected() {
    let f = fixture().await;
    let len = f.pristine.len();
    for cut in [0usize, 5, 36, 50, len / 2, len - 69, len - 68, len - 1] {
        with_bytes(&f, &f.pristine[..cut]).await;
        let (e, released) = read_err(&f).await;
        let msg = e.to_string();
        assert!(
            matches!(e, StorageError::Corrupt { .. }),
            "cut {cut}: {msg}"
        );
        assert!(msg.contains(f.key.as_str()), "{msg}");
        assert!(
            msg.contains("truncated") || msg.contains("magic"),
            "cut {cut}: {msg}"
        );
        assert!(released < f.original.len());
    }
    // Extra bytes after the trailer are not silently ignored either.
    let mut b = f.pristine.clone();
    b.extend_from_slice(b"junk");
    with_bytes(&f, &b).await;
    let (e, _) = read_err(&f).await;
    assert_corrupt(&e, &f.key, "object end");
}

#[tokio::test]
async fn reordered_frames_are_detected() {
    // Two objects' frames are individually valid; splicing must still be caught.
    let f = fixture().await;
    let mut b = f.pristine.clone();
    // Frames are 20 + payload; find the first two and swap their payload bytes wholesale
    // by swapping whole records of equal length when they happen to be equal sized.
    let rec = |at: usize| -> usize {
        20 + u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize
    };
    let first = header_len(&b);
    let l1 = rec(first);
    let second = first + l1;
    let l2 = rec(second);
    let mut spliced = b[..first].to_vec();
    spliced.extend_from_slice(&b[second..second + l2]);
    spliced.extend_from_slice(&b[first..first + l1]);
    spliced.extend_from_slice(&b[second + l2..]);
    b = spliced;
    with_bytes(&f, &b).await;
    let (e, _) = read_err(&f).await;
    // The stored CRC32C over the whole body catches the reordering first.
    assert_corrupt(&e, &f.key, "crc32c");
}

#[tokio::test]
async fn reordered_raw_frames_are_detected() {
    // Incompressible bytes: every frame is stored raw at the full 64 KiB, where the reader
    // combines the stored CRC32C from each record's header and payload CRC instead of
    // reading the payload again. Two whole records swapped must still be caught there.
    let random = support::random_bytes(300_000, 0x2545_F491_4F6C_DD1D);
    let f = fixture_of(random).await;
    let b = &f.pristine;
    let first = header_len(b);
    let len =
        |at: usize| 20 + u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize;
    let (l1, l2) = (len(first), len(first + len(first)));
    assert_eq!(
        l1,
        20 + (64 << 10),
        "the first frame is stored raw and whole"
    );
    assert_eq!(l1, l2, "two whole raw frames of the same length");
    let mut spliced = b[..first].to_vec();
    spliced.extend_from_slice(&b[first + l1..first + l1 + l2]);
    spliced.extend_from_slice(&b[first..first + l1]);
    spliced.extend_from_slice(&b[first + l1 + l2..]);
    with_bytes(&f, &spliced).await;
    let (e, _) = read_err(&f).await;
    assert_corrupt(&e, &f.key, "stored crc32c");
}

#[tokio::test]
async fn consistent_crcs_with_wrong_content_fail_the_sha256() {
    // Someone who rewrites the trailer consistently (valid CRCs) still cannot pass off
    // different bytes: the SHA-256 of the decoded bytes is checked at the end.
    let f = fixture().await;
    let mut b = f.pristine.clone();
    let t = b.len() - 68;
    b[t + 20] ^= 0xff; // sha256 field
    let crc = crc32c::crc32c(&b[t..t + 56]);
    b[t + 56..t + 60].copy_from_slice(&crc.to_le_bytes());
    with_bytes(&f, &b).await;
    let (e, released) = read_err(&f).await;
    assert_corrupt(&e, &f.key, "sha256");
    assert!(released < f.original.len(), "last chunk held back");
    // info() only reads the trailer, which is self-consistent: verify() is the full check.
    assert!(f.repo.info(&f.key).await.is_ok());
    assert!(f.repo.verify(&f.key).await.is_err());
}
