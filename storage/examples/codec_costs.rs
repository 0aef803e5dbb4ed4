//! What each step of the object pipeline costs on real data: CPU seconds per GiB of
//! SHA-256, CRC32C and zstd at several levels (negative = zstd's fast mode), with the
//! compression ratio. Used to choose the default WAL compression level.
//!
//! Run: `cargo run --release -p storage --example codec_costs -- FILE...` (e.g. the
//! segments of a `pg_wal` directory). Not part of the test suite.
#![allow(clippy::unwrap_used, missing_docs)]
use std::time::Instant;

use sha2::{Digest, Sha256};

const FRAME: usize = 1 << 20;

fn per_gib(bytes: usize, secs: f64) -> f64 {
    secs / (bytes as f64 / (1u64 << 30) as f64)
}

fn main() {
    let mut data = Vec::new();
    for f in std::env::args().skip(1) {
        data.extend(std::fs::read(&f).unwrap());
    }
    assert!(!data.is_empty(), "give files to measure on");
    let rounds = (512 << 20) / data.len().max(1) + 1;
    let total = data.len() * rounds;
    println!("{} MiB of input, {rounds} rounds", data.len() >> 20);

    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(Sha256::digest(&data));
    }
    println!(
        "sha256           {:.3} s/GiB",
        per_gib(total, t.elapsed().as_secs_f64())
    );

    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(crc32c::crc32c(&data));
    }
    println!(
        "crc32c           {:.3} s/GiB",
        per_gib(total, t.elapsed().as_secs_f64())
    );

    for level in [3, 1, -1, -2, -4, -8] {
        let mut c = zstd::bulk::Compressor::new(level).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(FRAME));
        let mut stored = 0usize;
        let t = Instant::now();
        for _ in 0..rounds {
            for frame in data.chunks(FRAME) {
                out.clear();
                c.compress_to_buffer(frame, &mut out).unwrap();
                stored += out.len();
            }
        }
        println!(
            "zstd {level:>3}         {:.3} s/GiB, ratio {:.2}",
            per_gib(total, t.elapsed().as_secs_f64()),
            total as f64 / stored as f64
        );
    }
}
