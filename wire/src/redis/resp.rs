//! RESP2 for the handshake: encoding the commands a replica sends and decoding the single
//! replies it waits for (`+OK`, `-ERR ...`, `$<len>` for `INFO`). Built on `redis-protocol`.
//!
//! The command stream after the snapshot uses [`super::command::CommandDecoder`] instead: it
//! must resume cheaply across reads of multi-megabyte commands and report exact byte lengths.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::{decode::decode_bytes_mut, encode::extend_encode, types::BytesFrame};

/// Largest handshake reply buffered (an `INFO` reply is a few KiB); a peer that sends more
/// without completing a frame is not a Redis master.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// A decoded handshake reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Simple(String),
    /// `-...`
    Error(String),
    /// `:...`
    Integer(i64),
    /// `$...`, `None` for the null bulk string.
    Bulk(Option<Bytes>),
    /// `*...`
    Array(Vec<Reply>),
}

/// Why a reply could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// The bytes are not RESP2.
    #[error("malformed reply from the server: {0}")]
    Malformed(String),
    /// More than [`MAX_REPLY_BYTES`] without a complete reply.
    #[error("reply from the server exceeds {MAX_REPLY_BYTES} bytes")]
    TooLarge,
}

impl From<BytesFrame> for Reply {
    fn from(frame: BytesFrame) -> Self {
        match frame {
            BytesFrame::SimpleString(s) => Reply::Simple(String::from_utf8_lossy(&s).into_owned()),
            BytesFrame::Error(e) => Reply::Error(e.to_string()),
            BytesFrame::Integer(i) => Reply::Integer(i),
            BytesFrame::BulkString(b) => Reply::Bulk(Some(b)),
            BytesFrame::Null => Reply::Bulk(None),
            BytesFrame::Array(items) => Reply::Array(items.into_iter().map(Reply::from).collect()),
        }
    }
}

/// Appends `args` as a RESP array of bulk strings, the only form a master accepts from a replica.
pub fn encode_command(buf: &mut BytesMut, args: &[&[u8]]) {
    let frame = BytesFrame::Array(
        args.iter()
            .map(|a| BytesFrame::BulkString(Bytes::copy_from_slice(a)))
            .collect(),
    );
    // Encoding an array of bulk strings into a growable buffer cannot fail.
    let _ = extend_encode(buf, &frame, false);
}

/// Takes one complete reply off the front of `buf`; `Ok(None)` while it is incomplete.
pub fn decode_reply(buf: &mut BytesMut) -> Result<Option<Reply>, RespError> {
    match decode_bytes_mut(buf) {
        Ok(Some((frame, _, _))) => Ok(Some(frame.into())),
        Ok(None) if buf.len() > MAX_REPLY_BYTES => Err(RespError::TooLarge),
        Ok(None) => Ok(None),
        Err(e) => Err(RespError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encodes_and_decodes() {
        let mut buf = BytesMut::new();
        encode_command(&mut buf, &[b"REPLCONF", b"capa", b"eof"]);
        assert_eq!(
            &buf[..],
            b"*3\r\n$8\r\nREPLCONF\r\n$4\r\ncapa\r\n$3\r\neof\r\n"
        );
        let mut r = BytesMut::from(
            &b"+OK\r\n-NOAUTH Authentication required.\r\n$3\r\nabc\r\n+partial"[..],
        );
        assert_eq!(
            decode_reply(&mut r).unwrap(),
            Some(Reply::Simple("OK".into()))
        );
        assert_eq!(
            decode_reply(&mut r).unwrap(),
            Some(Reply::Error("NOAUTH Authentication required.".into()))
        );
        assert_eq!(
            decode_reply(&mut r).unwrap(),
            Some(Reply::Bulk(Some(Bytes::from_static(b"abc"))))
        );
        assert_eq!(decode_reply(&mut r).unwrap(), None);
        assert!(decode_reply(&mut BytesMut::from(&b"?what\r\n"[..])).is_err());
    }
}
