//! The snapshot transfer after `+FULLRESYNC` (`readSyncBulkPayload` in Redis
//! `src/replication.c`).
//!
//! Two framings exist. Disk-based: `$<len>\r\n` then exactly `len` bytes. Diskless
//! (`repl-diskless-sync yes`, offered by the replica's `REPLCONF capa eof`):
//! `$EOF:<40 random bytes>\r\n`, the payload, then the same 40 bytes; the length is unknown
//! up front, and the closing mark may arrive split over several reads. Before the header the
//! master sends bare `\n` keep-alives while it forks and writes. The decoder yields the
//! payload as it arrives (never holding more than the 40 bytes that might be the mark) and
//! leaves whatever follows the payload in the buffer for the command stream.

use bytes::{Buf, Bytes, BytesMut};

/// Length of the diskless end mark (`RDB_EOF_MARK_SIZE`).
pub const EOF_MARK_LEN: usize = 40;

/// Longest header line accepted (`$EOF:` + 40 + CRLF, or a decimal length).
const MAX_HEADER: usize = 64;

/// How the master frames the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `$<len>`: the payload size is known.
    Sized(u64),
    /// `$EOF:<mark>`: diskless, ends at the mark. The agent must send `REPLCONF ACK` right
    /// after it, or the master sends nothing more.
    Diskless,
}

/// One step of the transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// The header was read.
    Started(Framing),
    /// The next piece of the RDB payload.
    Payload(Bytes),
    /// The payload is complete; following bytes are the command stream.
    Finished,
}

/// Why a transfer is not a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The master sent `-...` instead of a payload.
    #[error("the master aborted the transfer: {0}")]
    Aborted(String),
    /// Anything else that is not a `$` header.
    #[error("bad snapshot header from the master: {0:?}")]
    BadHeader(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Header,
    Sized { remaining: u64 },
    Diskless { mark: [u8; EOF_MARK_LEN] },
    Finished,
    Done,
}

/// Decodes the snapshot transfer; see the module docs.
#[derive(Debug, Clone)]
pub struct RdbTransferDecoder {
    state: State,
    payload_bytes: u64,
}

impl Default for RdbTransferDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl RdbTransferDecoder {
    /// A decoder waiting for the header.
    pub fn new() -> Self {
        Self {
            state: State::Header,
            payload_bytes: 0,
        }
    }

    /// Payload bytes yielded so far.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// True after [`TransferEvent::Finished`] was returned.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next event off `buf`; `Ok(None)` when more input is needed (or after the end).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<TransferEvent>, TransferError> {
        match &mut self.state {
            State::Header => {
                let newlines = buf.iter().take_while(|&&b| b == b'\n').count();
                buf.advance(newlines);
                let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if buf.len() > MAX_HEADER {
                        return Err(TransferError::BadHeader(
                            String::from_utf8_lossy(&buf[..MAX_HEADER]).into_owned(),
                        ));
                    }
                    return Ok(None);
                };
                let line = buf.split_to(end + 2);
                let line = &line[..end];
                let text = || String::from_utf8_lossy(line).into_owned();
                if line.first() == Some(&b'-') {
                    return Err(TransferError::Aborted(
                        String::from_utf8_lossy(&line[1..]).into_owned(),
                    ));
                }
                if line.first() != Some(&b'$') {
                    return Err(TransferError::BadHeader(text()));
                }
                let framing = if let Some(mark) = line.strip_prefix(b"$EOF:") {
                    let mark: [u8; EOF_MARK_LEN] = mark
                        .try_into()
                        .map_err(|_| TransferError::BadHeader(text()))?;
                    self.state = State::Diskless { mark };
                    Framing::Diskless
                } else {
                    let len = std::str::from_utf8(&line[1..])
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| TransferError::BadHeader(text()))?;
                    self.state = if len == 0 {
                        State::Finished
                    } else {
                        State::Sized { remaining: len }
                    };
                    Framing::Sized(len)
                };
                Ok(Some(TransferEvent::Started(framing)))
            }
            State::Sized { remaining } => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (*remaining).min(buf.len() as u64);
                *remaining -= n;
                if *remaining == 0 {
                    self.state = State::Finished;
                }
                self.payload_bytes += n;
                Ok(Some(TransferEvent::Payload(
                    buf.split_to(n as usize).freeze(),
                )))
            }
            State::Diskless { mark } => {
                // SIMD substring search: this runs over every byte of a diskless snapshot.
                if let Some(at) = memchr::memmem::find(buf, &mark[..]) {
                    let payload = buf.split_to(at).freeze();
                    buf.advance(EOF_MARK_LEN);
                    self.state = State::Finished;
                    if payload.is_empty() {
                        return self.decode(buf);
                    }
                    self.payload_bytes += payload.len() as u64;
                    return Ok(Some(TransferEvent::Payload(payload)));
                }
                // Everything but a possible mark prefix at the end is payload.
                let safe = buf.len().saturating_sub(EOF_MARK_LEN - 1);
                if safe == 0 {
                    return Ok(None);
                }
                self.payload_bytes += safe as u64;
                Ok(Some(TransferEvent::Payload(buf.split_to(safe).freeze())))
            }
            State::Finished => {
                self.state = State::Done;
                Ok(Some(TransferEvent::Finished))
            }
            State::Done => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// (payload, framing, bytes left for the command stream)
    type Outcome = (Vec<u8>, Option<Framing>, Vec<u8>);

    /// Feeds `wire` in the given pieces.
    fn run(wire: &[u8], cuts: &[usize]) -> Result<Outcome, TransferError> {
        let mut dec = RdbTransferDecoder::new();
        let mut buf = BytesMut::new();
        let mut payload = Vec::new();
        let mut framing = None;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut fed = 0;
        for p in points {
            buf.extend_from_slice(&wire[fed..p]);
            fed = p;
            while let Some(ev) = dec.decode(&mut buf)? {
                match ev {
                    TransferEvent::Started(f) => framing = Some(f),
                    TransferEvent::Payload(b) => payload.extend_from_slice(&b),
                    TransferEvent::Finished => {
                        // The rest is the command stream.
                        let mut rest = buf.to_vec();
                        rest.extend_from_slice(&wire[fed..]);
                        assert!(dec.is_done());
                        return Ok((payload, framing, rest));
                    }
                }
            }
        }
        panic!("transfer never finished");
    }

    fn diskless(mark: &[u8; 40], body: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut w = b"\n\n\n$EOF:".to_vec();
        w.extend_from_slice(mark);
        w.extend_from_slice(b"\r\n");
        w.extend_from_slice(body);
        w.extend_from_slice(mark);
        w.extend_from_slice(tail);
        w
    }

    #[test]
    fn sized_and_diskless_split_at_every_point() {
        let body: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let mut sized = b"\n\n$300\r\n".to_vec();
        sized.extend_from_slice(&body);
        sized.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        let mark = [b'm'; 40];
        let disk = diskless(&mark, &body, b"");
        for split in 0..=sized.len() {
            let (p, f, rest) = run(&sized, &[split]).unwrap();
            assert_eq!((p.as_slice(), f), (&body[..], Some(Framing::Sized(300))));
            assert_eq!(rest, b"*1\r\n$4\r\nPING\r\n");
        }
        for split in 0..=disk.len() {
            let (p, f, rest) = run(&disk, &[split]).unwrap();
            assert_eq!((p.as_slice(), f), (&body[..], Some(Framing::Diskless)));
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn errors_are_reported() {
        assert_eq!(
            run(b"-ERR fork failed\r\n", &[]).unwrap_err(),
            TransferError::Aborted("ERR fork failed".into())
        );
        assert!(matches!(
            run(b"+OK\r\n", &[]),
            Err(TransferError::BadHeader(_))
        ));
        assert!(matches!(
            run(b"$EOF:short\r\n", &[]),
            Err(TransferError::BadHeader(_))
        ));
        assert!(matches!(
            run(b"$-5\r\n", &[]),
            Err(TransferError::BadHeader(_))
        ));
    }

    proptest! {
        #[test]
        fn diskless_payload_survives_any_pieces(
            body in proptest::collection::vec(any::<u8>(), 0..2000),
            mark in proptest::array::uniform32(any::<u8>()),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            // Masters send 40 random hex characters (`getRandomHexChars`).
            let mut m = [0u8; 40];
            for (i, b) in mark.iter().chain(mark.iter()).take(40).enumerate() {
                m[i] = b"0123456789abcdef"[usize::from(b & 15)];
            }
            let wire = diskless(&m, &body, b"*1\r\n$4\r\nPING\r\n");
            let (p, f, rest) = run(&wire, &cuts).unwrap();
            prop_assert_eq!(p, body);
            prop_assert_eq!(f, Some(Framing::Diskless));
            prop_assert_eq!(rest, b"*1\r\n$4\r\nPING\r\n".to_vec());
        }
    }
}
