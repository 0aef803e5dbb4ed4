//! What each step of the object pipeline costs on real data: CPU seconds per GiB of
//! SHA-256 (format version 2's content hash), BLAKE3 (version 3's, and 4's when encrypted),
//! XXH3-128 (version 4's), the CRC32C and its combine, and zstd at several levels (negative = zstd's fast mode), with and
//! without long-distance matching, per 1 MiB frame as the container format compresses
//! them; with the compression ratio and the decompression cost (what a restore pays).
//! Used to choose the default WAL compression level.
//!
//! CPU time is the thread's own (`/proc/thread-self/schedstat`, nanoseconds), so other
//! processes on a busy machine do not inflate it.
//!
//! Run: `cargo run --release -p storage --example codec_costs -- FILE...` (e.g. the
//! segments of a `pg_wal` directory). Not part of the test suite.
#![allow(clippy::unwrap_used, missing_docs)]

use sha2::{Digest, Sha256};
use zstd::zstd_safe::CParameter;

const FRAME: usize = 1 << 20;

/// CPU seconds this thread has run.
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e9
}

fn per_gib(bytes: usize, secs: f64) -> f64 {
    secs / (bytes as f64 / (1u64 << 30) as f64)
}

fn main() {
    let mut data = Vec::new();
    for f in std::env::args().skip(1) {
        data.extend(std::fs::read(&f).unwrap());
    }
    assert!(!data.is_empty(), "give files to measure on");
    let rounds = (256 << 20) / data.len().max(1) + 1;
    let total = data.len() * rounds;
    println!("{} MiB of input, {rounds} rounds", data.len() >> 20);

    let t = cpu();
    for _ in 0..rounds {
        std::hint::black_box(Sha256::digest(&data));
    }
    println!(
        "sha256                 {:.3} CPU s/GiB",
        per_gib(total, cpu() - t)
    );

    // BLAKE3 as the writer feeds it: one update per 1 MiB frame (format version 3, and 4
    // when encrypted).
    let t = cpu();
    for _ in 0..rounds {
        let mut h = blake3::Hasher::new();
        for f in data.chunks(FRAME) {
            h.update(f);
        }
        std::hint::black_box(h.finalize());
    }
    println!(
        "blake3                 {:.3} CPU s/GiB",
        per_gib(total, cpu() - t)
    );

    // XXH3-128 the same way (format version 4, plaintext objects).
    let t = cpu();
    for _ in 0..rounds {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for f in data.chunks(FRAME) {
            h.update(f);
        }
        std::hint::black_box(h.digest128());
    }
    println!(
        "xxh3-128               {:.3} CPU s/GiB",
        per_gib(total, cpu() - t)
    );

    let t = cpu();
    for _ in 0..rounds {
        std::hint::black_box(crc32c::crc32c(&data));
    }
    println!(
        "crc32c                 {:.3} CPU s/GiB",
        per_gib(total, cpu() - t)
    );

    // Combining CRC32Cs across a 1 MiB payload: the crate's matrix method against
    // `storage::crc` (what the stored CRC of an object and a restored file's CRC use).
    let calls = 20_000u64;
    for (name, f) in [
        (
            "crc32c_combine (crate)",
            (|a, b, n| crc32c::crc32c_combine(a, b, n as usize)) as fn(u32, u32, u64) -> u32,
        ),
        ("crc32c_combine (storage)", storage::crc::crc32c_combine),
    ] {
        let t = cpu();
        let mut acc = 0u32;
        for i in 0..calls {
            acc ^= f(acc ^ i as u32, 0x1234_5678, (1 << 20) + i);
        }
        std::hint::black_box(acc);
        println!(
            "{name:<24} {:.2} µs a call",
            (cpu() - t) * 1e6 / calls as f64
        );
    }

    // LZ4 block per 1 MiB frame (format version 3's `--compression lz4`), as the writer
    // calls it: into a reused output buffer.
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(FRAME)];
    let mut stored = 0usize;
    let t = cpu();
    for _ in 0..rounds {
        for frame in data.chunks(FRAME) {
            stored += lz4_flex::block::compress_into(frame, &mut out).unwrap();
        }
    }
    println!(
        "lz4 (lz4_flex) 1 MiB   {:.3} CPU s/GiB, ratio {:.2}",
        per_gib(total, cpu() - t),
        total as f64 / stored as f64
    );

    println!(
        "{:<22} {:>14} {:>7} {:>16}",
        "zstd per 1 MiB frame", "compress s/GiB", "ratio", "decompress s/GiB"
    );
    let variants: &[(&str, i32, bool)] = &[
        ("level 3", 3, false),
        ("level 2", 2, false),
        ("level 1", 1, false),
        ("level 1 + long", 1, true),
        ("level -1", -1, false),
        ("level -1 + long", -1, true),
        ("level -2", -2, false),
        ("level -3", -3, false),
        ("level -5", -5, false),
        ("level -8", -8, false),
    ];
    for &(name, level, long) in variants {
        let mut c = zstd::bulk::Compressor::new(level).unwrap();
        if long {
            c.set_parameter(CParameter::EnableLongDistanceMatching(true))
                .unwrap();
            c.set_parameter(CParameter::WindowLog(20)).unwrap();
        }
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(FRAME));
        let mut frames = Vec::new();
        let mut stored = 0usize;
        let t = cpu();
        for round in 0..rounds {
            for frame in data.chunks(FRAME) {
                out.clear();
                c.compress_to_buffer(frame, &mut out).unwrap();
                stored += out.len();
                if round == 0 {
                    frames.push((out.clone(), frame.len()));
                }
            }
        }
        let compress = per_gib(total, cpu() - t);
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let mut back = Vec::with_capacity(FRAME);
        let t = cpu();
        for _ in 0..rounds {
            for (z, len) in &frames {
                back.clear();
                d.decompress_to_buffer(z, &mut back).unwrap();
                assert_eq!(back.len(), *len);
            }
        }
        let decompress = per_gib(total, cpu() - t);
        println!(
            "{name:<22} {compress:>14.3} {:>7.2} {decompress:>16.3}",
            total as f64 / stored as f64
        );
    }
}
