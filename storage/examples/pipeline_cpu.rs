//! Diagnostic for the pipeline benchmark: wall time, CPU time and page faults of the
//! pipeline vs SHA-256 + zstd + CRC32C back to back, on 64 MiB. `ONLY=pipe` skips the
//! baseline (for profiling with perf). Not part of the test suite.
#![allow(clippy::unwrap_used, missing_docs)]
use std::time::Instant;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository};

fn stat(field: usize) -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    f[field].parse().unwrap()
}

fn cpu() -> f64 {
    (stat(11) + stat(12)) / 100.0
}

fn report(what: &str, t: Instant, c: f64, m: f64) {
    println!(
        "{what:<16} wall {:.3}s cpu {:.2}s minor faults {}",
        t.elapsed().as_secs_f64(),
        cpu() - c,
        stat(7) - m
    );
}

fn main() {
    let mut data = vec![0u8; 64 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (i, b) in data.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = if i % 4 == 0 {
            x as u8
        } else {
            (i / 32 % 11) as u8
        };
    }
    let data = Bytes::from(data);
    let level = std::env::var("LEVEL")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(1);
    let pipe_only = std::env::var("ONLY").is_ok_and(|v| v == "pipe");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..3 {
        if !pipe_only {
            let (t, c, m) = (Instant::now(), cpu(), stat(7));
            let mut sha = Sha256::new();
            let mut comp = zstd::bulk::Compressor::new(level).unwrap();
            let mut crc = 0;
            for f in data.chunks(1 << 20) {
                sha.update(f);
                let z = comp.compress(f).unwrap();
                crc = crc32c::crc32c_append(crc, &z);
            }
            std::hint::black_box((sha.finalize(), crc));
            report("back_to_back", t, c, m);
        }
        for workers in [1, 2] {
            let repo = Repository::open(
                "memory://",
                RepoOptions {
                    compression_level: Some(level),
                    workers,
                    ..Default::default()
                },
            )
            .unwrap();
            let (t, c, m) = (Instant::now(), cpu(), stat(7));
            rt.block_on(async {
                let key = RepoKey::parse("x").unwrap();
                let mut w = repo
                    .writer(&key, ContentKind::Other, PutMode::Overwrite)
                    .await
                    .unwrap();
                let mut pos = 0;
                while pos < data.len() {
                    let n = (256 << 10).min(data.len() - pos);
                    w.write(data.slice(pos..pos + n)).await.unwrap();
                    pos += n;
                }
                w.finish().await.unwrap();
            });
            report(&format!("pipeline {workers}w"), t, c, m);
        }
    }
}
