//! Framing of backend messages (`Byte1 tag, Int32 length including itself, body`), capped.
//!
//! `postgres_protocol::message::backend::Message::parse` reserves whatever length the peer
//! announces; the agent first cuts one whole frame here, refusing lengths above a cap before
//! anything is allocated, and only then hands the frame to the full parser.

use bytes::BytesMut;

use super::PgWireError;

/// The largest body we accept by default. A walsender's CopyData carries at most
/// `MAX_SEND_SIZE` (16 × 8 KiB) of WAL plus a header; result rows are small. BASE_BACKUP
/// data chunks are at most 32 KiB (PG ≤ 14) or `BLCKSZ`-ish multiples; 64 MiB leaves room
/// for large `TIMELINE_HISTORY` contents while bounding a hostile peer.
pub const DEFAULT_MAX_FRAME_BODY: usize = 64 * 1024 * 1024;

/// Cuts the next complete frame (header included) off the front of `buf`.
///
/// Returns `Ok(None)` while `buf` holds less than one frame (after checking the length
/// against the cap). Making room for the rest is the caller's: it knows how its buffers
/// are reused (reserving here would, on a buffer whose earlier frames are still alive,
/// allocate and copy a new one per frame).
pub fn next_frame(buf: &mut BytesMut, max_body: usize) -> Result<Option<BytesMut>, PgWireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(PgWireError::Truncated {
            message: "backend message length",
            needed: 4,
            have: len,
        });
    }
    let body = len - 4;
    if body > max_body {
        return Err(PgWireError::TooLarge {
            what: "backend message",
            announced: body as u64,
            limit: max_body as u64,
        });
    }
    let total = 1 + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// The type byte of a frame returned by [`next_frame`].
pub fn frame_tag(frame: &[u8]) -> Option<u8> {
    frame.first().copied()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_u32(4 + body.len() as u32);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn caps_before_allocating() {
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        let e = next_frame(&mut buf, 1024).unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
        assert!(buf.capacity() < 1024);
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(next_frame(&mut buf, 1024).is_err());
    }

    proptest! {
        #[test]
        fn split_anywhere_gives_same_frames(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6), cut in any::<proptest::sample::Index>()) {
            let stream: Vec<u8> = bodies.iter().enumerate().flat_map(|(i, b)| frame(b'a' + i as u8, b)).collect();
            let cut = cut.index(stream.len() + 1);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                buf.extend_from_slice(part);
                while let Some(f) = next_frame(&mut buf, 1024).unwrap() {
                    got.push(f.to_vec());
                }
            }
            prop_assert!(buf.is_empty());
            let want: Vec<Vec<u8>> = bodies.iter().enumerate().map(|(i, b)| frame(b'a' + i as u8, b)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
