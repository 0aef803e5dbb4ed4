//! Helpers shared by the storage integration tests: test data and a look at an object
//! file's frame records as stored.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use bytes::Bytes;
use storage::format::{FrameHeader, Header, FRAME_HEADER_LEN};

/// WAL-like: records of text with counters, compressible but not trivially.
pub fn wal_like(len: usize) -> Bytes {
    let mut v: Vec<u8> = (0..len / 24 + 1)
        .flat_map(|i: usize| format!("rec {i:010} lsn {:06x}\n", i * 7).into_bytes())
        .collect();
    v.truncate(len);
    Bytes::from(v)
}

/// Incompressible bytes, the same for the same `seed` (xorshift64; no `rand` needed for
/// test data that only has to defeat the codecs).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The header of the object file at `path` and each frame record's header and stored bytes
/// (frame header and payload), in stored order.
pub fn stored_frames(path: &Path) -> (Header, Vec<(FrameHeader, Vec<u8>)>) {
    let bytes = std::fs::read(path).unwrap();
    let (h, mut at) = Header::parse("k", &bytes).unwrap().unwrap();
    let mut frames = Vec::new();
    while bytes[at] == b'F' {
        let fh =
            FrameHeader::parse("k", &bytes[at..at + FRAME_HEADER_LEN], 0, h.frame_size).unwrap();
        let end = at + FRAME_HEADER_LEN + fh.stored_len as usize;
        frames.push((fh, bytes[at..end].to_vec()));
        at = end;
    }
    (h, frames)
}
