//! What reusing a WAL segment's delta frames costs in stored size, by the smallest frame
//! reused: each segment given is cut into deltas of a fixed size (the sizes `postgres
//! stream` ships at a given WAL rate), every delta is written as its own object keeping its
//! frame records, then the complete segment is written from the records of at least
//! `threshold` original bytes (the rest encoded again, as `postgres stream` does). Prints
//! the complete segment's stored bytes and frame count per delta size and threshold,
//! against the segment written from scratch ("none"), for zstd level 1 and LZ4, and the
//! process CPU seconds of writing one complete segment (mean of 5; 10 ms ticks).
//!
//! Run: `cargo run --release -p storage --example delta_reuse -- SEGMENT...` (segments of
//! a `pg_wal` directory). Not part of the test suite; the figures are in
//! benches/README.md (pg_wal_stream, "WAL encoded once").
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::Bytes;
use storage::{ContentKind, EncodedRecord, PutMode, RepoKey, RepoOptions, Repository};

/// utime + stime of this process, seconds (the frame workers are other threads).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Writes `seg` as deltas of `delta` bytes; returns every record with its offset.
async fn deltas(repo: &Repository, seg: &Bytes, delta: usize) -> Vec<(u64, EncodedRecord)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < seg.len() {
        let end = (at + delta).min(seg.len());
        let key = RepoKey::parse(&format!("postgres/wal/00000001/d.{at:08X}")).unwrap();
        let mut w = repo
            .writer_with_len(
                &key,
                ContentKind::WalDelta,
                PutMode::Overwrite,
                Some((end - at) as u64),
            )
            .await
            .unwrap();
        w.keep_records().unwrap();
        w.write(seg.slice(at..end)).await.unwrap();
        let (_, records) = w.finish_with_records().await.unwrap();
        repo.delete(&key).await.unwrap();
        let mut off = at as u64;
        for r in records {
            let n = r.original_len();
            out.push((off, r));
            off += n;
        }
        at = end;
    }
    out
}

/// Writes the complete segment reusing the records of at least `threshold` bytes
/// (`None`: from scratch); returns (stored bytes, frames).
async fn complete(
    repo: &Repository,
    seg: &Bytes,
    records: &[(u64, EncodedRecord)],
    threshold: Option<u64>,
) -> (u64, u64) {
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
    let mut w = repo
        .writer_with_len(
            &key,
            ContentKind::WalSegment,
            PutMode::Overwrite,
            Some(seg.len() as u64),
        )
        .await
        .unwrap();
    let mut at = 0usize;
    if let Some(min) = threshold {
        for (off, r) in records.iter().filter(|(_, r)| r.original_len() >= min) {
            let (off, end) = (*off as usize, (*off + r.original_len()) as usize);
            if off > at {
                w.write(seg.slice(at..off)).await.unwrap();
            }
            w.append_encoded(r, vec![seg.slice(off..end)])
                .await
                .unwrap();
            at = end;
        }
    }
    w.write(seg.slice(at..)).await.unwrap();
    let info = w.finish().await.unwrap();
    (info.stored_len, info.frames)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    assert!(!files.is_empty(), "give WAL segments");
    // Delta sizes (0.5-0.9 s of WAL at the default --max-lag 1s, by the store's speed): `SIZES` or a
    // range from one commit (--synchronous trickle) to 12 MiB/s, off frame boundaries.
    let sizes: Vec<usize> = std::env::var("SIZES")
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or_else(|_| {
            vec![
                300, 3_000, 20_000, 50_000, 100_003, 300_007, 700_001, 6_300_001,
            ]
        });
    let thresholds = [
        Some(0u64),
        Some(16 << 10),
        Some(64 << 10),
        Some(256 << 10),
        None,
    ];
    const ROUNDS: u32 = 5;
    for (codec, lz4) in [("zstd 1", false), ("lz4", true)] {
        let repo = Repository::open(
            "memory:///",
            RepoOptions {
                compression_level: Some(1),
                lz4,
                workers: 1,
                ..RepoOptions::default()
            },
        )
        .unwrap();
        for f in &files {
            let seg = Bytes::from(std::fs::read(f).unwrap());
            let name = std::path::Path::new(f)
                .file_name()
                .unwrap()
                .to_string_lossy();
            for &delta in &sizes {
                let records = deltas(&repo, &seg, delta).await;
                let mut line = format!("{codec} {name} deltas of {delta:>8} B:");
                for t in thresholds {
                    let c = cpu();
                    let mut result = (0, 0);
                    for _ in 0..ROUNDS {
                        result = complete(&repo, &seg, &records, t).await;
                    }
                    let (stored, frames) = result;
                    let secs = (cpu() - c) / f64::from(ROUNDS);
                    let t = t.map_or("none".to_string(), |t| format!("{}K", t >> 10));
                    line += &format!(" | >={t}: {stored} B {frames} fr {secs:.2}s");
                }
                println!("{line}");
            }
        }
    }
}
