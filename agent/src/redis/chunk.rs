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

/// A chunk's bytes as they arrive, with room kept in front for the header: the object is
/// then the same buffer (no copy of up to `max_chunk_bytes` per chunk, which was the
/// largest transient allocation of a busy stream).
#[derive(Debug, Default)]
pub struct ChunkBody {
    buf: BytesMut,
}

/// Room for the header; a larger header (a time index of tens of thousands of
/// milliseconds) falls back to one copy.
const HEADROOM: usize = 64 << 10;

impl ChunkBody {
    /// Bytes of the replication stream held.
    pub fn len(&self) -> usize {
        self.buf.len().saturating_sub(HEADROOM)
    }

    /// Nothing held yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends stream bytes; the first call reserves `expected` bytes at once (pages are
    /// only touched as they are written), so the buffer is not regrown by doubling.
    pub fn extend(&mut self, bytes: &[u8], expected: usize) {
        if self.buf.is_empty() {
            self.buf.reserve(HEADROOM + expected.max(bytes.len()));
            self.buf.put_bytes(0, HEADROOM);
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The chunk object: header then body.
    pub fn into_object(self, header: &ChunkHeader) -> Result<Bytes> {
        let json = serde_json::to_vec(header).context("encoding a chunk header")?;
        let prefix = MAGIC.len() + json.len() + 1;
        let mut buf = self.buf;
        if buf.is_empty() {
            return encode(header, &[]);
        }
        if prefix > HEADROOM {
            return encode(header, &buf[HEADROOM..]);
        }
        let at = HEADROOM - prefix;
        buf[at..at + MAGIC.len()].copy_from_slice(MAGIC);
        buf[at + MAGIC.len()..HEADROOM - 1].copy_from_slice(&json);
        buf[HEADROOM - 1] = b'\n';
        let _ = buf.split_to(at);
        Ok(buf.freeze())
    }
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
    fn a_chunk_built_in_place_is_the_encoded_chunk() {
        let mut h = ChunkHeader {
            replid: "a".repeat(40),
            start: 10,
            end: 10,
            db_at_start: 0,
            db_at_end: 3,
            commands: 0,
            time_index: vec![],
        };
        let mut body = ChunkBody::default();
        assert!(body.is_empty());
        let mut raw = Vec::new();
        for i in 0..100u64 {
            let cmd = format!("*1\r\n$4\r\nPING{i}\r\n");
            body.extend(cmd.as_bytes(), 1 << 20);
            raw.extend_from_slice(cmd.as_bytes());
            h.commands += 1;
            h.time_index.push((10 + raw.len() as u64, i as i64));
        }
        h.end = 10 + raw.len() as u64;
        assert_eq!(body.len(), raw.len());
        let expected = encode(&h, &raw).unwrap();
        assert_eq!(body.into_object(&h).unwrap(), expected);
        // A header larger than the room kept for it: one copy, same object.
        let mut body = ChunkBody::default();
        body.extend(&raw, 0);
        h.time_index = (0..10_000).map(|i| (i, i as i64)).collect();
        assert_eq!(body.into_object(&h).unwrap(), encode(&h, &raw).unwrap());
        assert_eq!(
            ChunkBody::default().into_object(&h).unwrap(),
            encode(&h, &[]).unwrap()
        );
    }

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
