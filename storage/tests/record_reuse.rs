//! `EncodedRecord`: an object assembled from the frame records of other objects (a WAL
//! segment from its deltas' frames) plus newly encoded bytes reads back byte-identical with
//! every check passing (plain, zstd, LZ4, encrypted), its frames are the reused records
//! verbatim (short frames in the middle of the object), and a record whose bytes, length or
//! settings do not match is refused naming the object.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use bytes::Bytes;
use storage::keys::generate_identity;
use storage::{ContentKind, EncodedRecord, PutMode, RepoKey, RepoOptions, Repository};
use support::{random_bytes, stored_frames, wal_like};

const FRAME: usize = 64 << 10;

fn open(dir: &Path, f: impl FnOnce(&mut RepoOptions)) -> Repository {
    let mut o = RepoOptions {
        frame_size: FRAME,
        workers: 2,
        ..RepoOptions::default()
    };
    f(&mut o);
    Repository::open(&format!("file://{}", dir.display()), o).unwrap()
}

/// WAL-like records with a stretch of incompressible bytes in the middle.
fn data(len: usize) -> Bytes {
    let mut v = wal_like(len).to_vec();
    v[len / 3..len / 3 + 100_000].copy_from_slice(&random_bytes(100_000, 0x9E37_79B9_7F4A_7C15));
    Bytes::from(v)
}

/// Writes `bytes` as a delta object (in uneven pieces, some small enough to be copied)
/// and returns its records.
async fn delta(repo: &Repository, name: &str, bytes: Bytes) -> Vec<EncodedRecord> {
    let key = RepoKey::parse(&format!("postgres/wal/00000001/{name}")).unwrap();
    let mut w = repo
        .writer_with_len(
            &key,
            ContentKind::WalDelta,
            PutMode::Overwrite,
            Some(bytes.len() as u64),
        )
        .await
        .unwrap();
    w.keep_records().unwrap();
    let mut at = 0;
    for n in [3_000usize, 100_000, 70_000].iter().cycle() {
        if at == bytes.len() {
            break;
        }
        let n = (*n).min(bytes.len() - at);
        w.write(bytes.slice(at..at + n)).await.unwrap();
        at += n;
    }
    let (info, records) = w.finish_with_records().await.unwrap();
    assert_eq!(records.len() as u64, info.frames);
    assert_eq!(
        records.iter().map(EncodedRecord::original_len).sum::<u64>(),
        bytes.len() as u64
    );
    assert_eq!(repo.get(&key).await.unwrap(), bytes);
    records
}

/// The frame records of the object file at `path`, as stored.
fn stored_records(path: &Path) -> Vec<Vec<u8>> {
    stored_frames(path).1.into_iter().map(|(_, r)| r).collect()
}

/// The records' stored bytes, read back from the delta object files (what reuse must
/// append verbatim).
fn records_of_file(dir: &Path, name: &str) -> Vec<Vec<u8>> {
    stored_records(&dir.join(format!("postgres/wal/00000001/{name}")))
}

#[tokio::test]
async fn segment_from_delta_records_reads_back_identical() {
    let id = generate_identity();
    let cases: [(&str, Option<i32>, bool, bool); 5] = [
        ("plain", None, false, false),
        ("zstd", Some(1), false, false),
        ("lz4", Some(1), true, false),
        ("zstd-encrypted", Some(3), false, true),
        ("lz4-encrypted", Some(1), true, true),
    ];
    for (name, level, lz4, encrypted) in cases {
        let dir = tempfile::tempdir().unwrap();
        let repo = open(dir.path(), |o| {
            o.compression_level = level;
            o.lz4 = lz4;
            if encrypted {
                o.recipients = vec![id.to_public()];
                o.identities = vec![id.clone()];
            }
        });
        let all = data(1_000_000);
        // Two deltas with frames of every length: whole frames, a short last frame each.
        let d1 = delta(&repo, "d1", all.slice(..200_000)).await;
        let d2 = delta(&repo, "d2", all.slice(200_000..530_001)).await;
        let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
        let mut w = repo
            .writer_with_len(
                &key,
                ContentKind::WalSegment,
                PutMode::CreateNew,
                Some(all.len() as u64),
            )
            .await
            .unwrap();
        // All of d1's records; of d2's only the whole frames (its short last frame's bytes
        // are encoded again, together with the bytes after it); then new bytes.
        let mut at = 0u64;
        let mut reused = Vec::new();
        for (r, file) in d1.iter().zip(records_of_file(dir.path(), "d1")) {
            let n = r.original_len();
            w.append_encoded(r, vec![all.slice(at as usize..(at + n) as usize)])
                .await
                .unwrap();
            reused.push(file);
            at += n;
        }
        for (r, file) in d2.iter().zip(records_of_file(dir.path(), "d2")) {
            let n = r.original_len();
            if n == FRAME as u64 {
                // Given in two pieces at another cut: the same bytes all the same.
                let (s, e) = (at as usize, (at + n) as usize);
                let plain = vec![all.slice(s..s + 1_000), all.slice(s + 1_000..e)];
                w.append_encoded(r, plain).await.unwrap();
                reused.push(file);
            } else {
                w.write(all.slice(at as usize..(at + n) as usize))
                    .await
                    .unwrap();
            }
            at += n;
        }
        w.write(all.slice(at as usize..)).await.unwrap();
        let info = w.finish().await.unwrap();
        assert!(info.matches_content(&[&all]), "{name}");
        // Short frames in the middle: more frames than whole frames need.
        assert!(
            info.frames > all.len().div_ceil(FRAME) as u64,
            "{name}: {} frames",
            info.frames
        );
        let stored = stored_records(&dir.path().join(key.as_str()));
        assert_eq!(stored.len() as u64, info.frames, "{name}");
        for r in &reused {
            assert!(
                stored.contains(r),
                "{name}: a reused record is not stored verbatim"
            );
        }
        // Every reader: whole, streamed in chunks, verified, info from header and trailer.
        assert_eq!(repo.get(&key).await.unwrap(), all, "{name}");
        let mut r = repo.reader(&key).await.unwrap();
        let mut streamed = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            assert!(c.len() <= FRAME);
            streamed.extend_from_slice(&c);
        }
        assert_eq!(streamed, all, "{name}");
        let verified = repo.verify(&key).await.unwrap();
        assert!(verified.plaintext_verified, "{name}");
        assert_eq!(verified.info.frames, info.frames, "{name}");
        assert_eq!(repo.info(&key).await.unwrap().sha256, info.sha256, "{name}");
    }
}

#[tokio::test]
async fn records_that_do_not_match_are_refused_naming_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path(), |o| o.compression_level = Some(1));
    let all = data(300_000);
    let records = delta(&repo, "d", all.slice(..2 * FRAME)).await;
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000002").unwrap();
    let writer = || async {
        repo.writer(&key, ContentKind::WalSegment, PutMode::CreateNew)
            .await
            .unwrap()
    };

    // Same length, other bytes: refused before anything is stored.
    let mut w = writer().await;
    let mut other = all.slice(..FRAME).to_vec();
    other[FRAME / 2] ^= 1;
    let err = w
        .append_encoded(&records[0], vec![Bytes::from(other)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(key.as_str()), "{err}");
    assert!(
        err.contains("not the 65536 bytes it was made from"),
        "{err}"
    );
    let err = w.finish().await.unwrap_err().to_string();
    assert!(err.contains(key.as_str()), "{err}");
    assert!(!repo.exists(&key).await.unwrap(), "nothing stored");

    // Bytes of another record (the right length), and a wrong length.
    let mut w = writer().await;
    let err = w
        .append_encoded(&records[0], vec![all.slice(FRAME..2 * FRAME)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the"), "{err}");
    let mut w2 = writer().await;
    let err = w2
        .append_encoded(&records[0], vec![all.slice(..FRAME - 1)])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(key.as_str()) && err.contains("not the"),
        "{err}"
    );

    // A repository view with another codec or frame size: its writers refuse the record.
    for (what, other) in [
        ("level", open(dir.path(), |o| o.compression_level = Some(5))),
        (
            "frame size",
            open(dir.path(), |o| {
                o.compression_level = Some(1);
                o.frame_size = 2 * FRAME;
            }),
        ),
    ] {
        let mut w = other
            .writer(&key, ContentKind::WalSegment, PutMode::CreateNew)
            .await
            .unwrap();
        let err = w
            .append_encoded(&records[0], vec![all.slice(..FRAME)])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(key.as_str()) && err.contains("other settings"),
            "{what}: {err}"
        );
    }
    assert!(!repo.exists(&key).await.unwrap(), "nothing stored");
}
