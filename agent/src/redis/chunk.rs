//! Command-stream chunk objects: `redis/gen/<id>/chunks/<start>-<end>`.
//!
//! A chunk holds the replication stream bytes in `(start, end]` exactly as the master sent
//! them (so offsets stay checkable), behind a one-line JSON header that says which database
//! was selected at the start, which replication ID the bytes belong to, and a time index:
//! `(offset, unix ms)` pairs, one per millisecond of traffic, each at a command boundary
//! outside MULTI/EXEC. A restore to time T replays up to the last index entry at or before
//! T, so it never splits a transaction.
//!
//! Layout: `SBRC1\n`, the JSON header, `\n`, then the raw bytes.

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8] = b"SBRC1\n";

/// What a chunk says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// Replication ID these offsets belong to (adopted after `+CONTINUE <new id>`).
    pub replid: String,
    /// Offset before the first byte.
    pub start: u64,
    /// Offset after the last byte.
    pub end: u64,
    /// Database selected at `start` (the stream only says `SELECT` when it changes).
    pub db_at_start: u32,
    /// Database selected at `end`.
    pub db_at_end: u32,
    /// Commands in the chunk.
    pub commands: u64,
    /// `(offset after a command, arrival time in Unix ms)`, ascending; only at points
    /// outside MULTI/EXEC.
    pub time_index: Vec<(u64, i64)>,
}

/// Serialises a chunk.
pub fn encode(header: &ChunkHeader, body: &[u8]) -> Result<Bytes> {
    let json = serde_json::to_vec(header).context("encoding a chunk header")?;
    let mut out = BytesMut::with_capacity(MAGIC.len() + json.len() + 1 + body.len());
    out.put_slice(MAGIC);
    out.put_slice(&json);
    out.put_u8(b'\n');
    out.put_slice(body);
    Ok(out.freeze())
}

/// Parses a chunk and checks its length against its offsets.
pub fn decode(key: &str, data: Bytes) -> Result<(ChunkHeader, Bytes)> {
    let Some(rest) = data.strip_prefix(MAGIC) else {
        bail!("{key} is not a command chunk (bad magic)")
    };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        bail!("{key}: chunk header is not terminated")
    };
    let header: ChunkHeader =
        serde_json::from_slice(&rest[..nl]).with_context(|| format!("{key}: bad chunk header"))?;
    let body_start = MAGIC.len() + nl + 1;
    let body = data.slice(body_start..);
    if header.end < header.start || body.len() as u64 != header.end - header.start {
        bail!(
            "{key}: chunk says offsets {}..{} but holds {} bytes",
            header.start,
            header.end,
            body.len()
        );
    }
    Ok((header, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_length_check() {
        let h = ChunkHeader {
            replid: "r".into(),
            start: 10,
            end: 24,
            db_at_start: 0,
            db_at_end: 2,
            commands: 1,
            time_index: vec![(24, 1000)],
        };
        let body = b"*1\r\n$4\r\nPING\r\n";
        let c = encode(&h, body).unwrap();
        let (h2, b2) = decode("k", c.clone()).unwrap();
        assert_eq!((h2, &b2[..]), (h, &body[..]));
        assert!(decode("k", c.slice(..c.len() - 1)).is_err());
        assert!(decode("k", Bytes::from_static(b"nope")).is_err());
    }
}
