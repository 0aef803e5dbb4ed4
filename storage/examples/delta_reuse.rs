//! What reusing a WAL segment's delta frames costs in stored size, by the smallest frame
//! reused: each segment given is cut into deltas of a fixed size (the sizes `postgres
//! stream` ships at a given WAL rate), every delta is written as its own object keeping its
//! frame records, then the complete segment is written from the records of at least
//! `threshold` original bytes (the rest encoded again, as `postgres stream` does). Prints
//! the complete segment's stored bytes and frame count per delta size and threshold,
//! against the segment written from scratch ("none"), for zstd level 1 and LZ4, and the
//! process CPU time of writing the complete segments.
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
    let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
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
            w.append_encoded(r, vec![seg.slice(off..end)]).await.unwrap();
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
    // Delta sizes: one commit (--synchronous trickle), half a second of a 20 commit/s
    // trickle, and half a second (--max-lag 1s) at 1, 4 and 12 MiB/s.
    let sizes = [300usize, 3_000, 512 << 10, 2 << 20, 6 << 20];
    let thresholds = [Some(0u64), Some(16 << 10), Some(64 << 10), Some(256 << 10), None];
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
            let name = std::path::Path::new(f).file_name().unwrap().to_string_lossy();
            for delta in sizes {
                let records = deltas(&repo, &seg, delta).await;
                let mut line = format!("{codec} {name} deltas of {delta:>8} B:");
                for t in thresholds {
                    let c = cpu();
                    let (stored, frames) = complete(&repo, &seg, &records, t).await;
                    let secs = cpu() - c;
                    let t = t.map_or("none".to_string(), |t| format!("{}K", t >> 10));
                    line += &format!(" | >={t}: {stored} B {frames} fr {secs:.2}s");
                }
                println!("{line}");
            }
        }
    }
}
