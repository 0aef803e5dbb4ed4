//! The streaming replication sub-protocol carried inside CopyData once `START_REPLICATION`
//! has switched the connection to CopyBoth (PostgreSQL docs, "Streaming Replication
//! Protocol"; `src/backend/replication/walsender.c` `XLogSendPhysical`, `WalSndKeepalive`,
//! `ProcessStandbyReplyMessage`).
//!
//! Every integer is big-endian; timestamps are microseconds since 2000-01-01 00:00:00 UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Lsn, PgWireError};

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// A PostgreSQL `TimestampTz` on the wire: microseconds since 2000-01-01 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// The current wall clock, for status updates.
    pub fn now() -> PgTimestamp {
        PgTimestamp::from_system_time(SystemTime::now())
    }

    /// Converts a wall-clock time (saturating outside the representable range).
    pub fn from_system_time(t: SystemTime) -> PgTimestamp {
        let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        match t.duration_since(epoch) {
            Ok(d) => PgTimestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => PgTimestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// Back to wall-clock time, for lag reporting.
    pub fn to_system_time(self) -> SystemTime {
        let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        if self.0 >= 0 {
            epoch + Duration::from_micros(self.0.unsigned_abs())
        } else {
            epoch - Duration::from_micros(self.0.unsigned_abs())
        }
    }
}

/// `w`: a chunk of WAL starting at `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// LSN of the first byte of `data`.
    pub start: Lsn,
    /// The server's current end of WAL (how far behind we are).
    pub server_end: Lsn,
    /// The server's clock when it sent this.
    pub server_time: PgTimestamp,
    /// The WAL bytes, shared with the receive buffer (no copy).
    pub data: Bytes,
}

impl XLogData {
    /// The LSN just after the last byte of `data`.
    pub fn end(&self) -> Result<Lsn, PgWireError> {
        self.start.checked_add(self.data.len() as u64)
    }
}

/// `k`: the server says where it is and whether it wants an answer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    /// The server's current end of WAL.
    pub server_end: Lsn,
    /// The server's clock.
    pub server_time: PgTimestamp,
    /// Reply immediately or the server may time us out (`wal_sender_timeout`).
    pub reply_requested: bool,
}

/// A message the server sends during physical streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`.
    XLogData(XLogData),
    /// `k`.
    PrimaryKeepalive(PrimaryKeepalive),
}

impl ReplicationMessage {
    /// Parses one complete CopyData payload (the outer frame already delimits it, so a
    /// short payload is an error, not a request for more bytes).
    pub fn parse(mut payload: Bytes) -> Result<ReplicationMessage, PgWireError> {
        let Some(&tag) = payload.first() else {
            return Err(PgWireError::Truncated {
                message: "replication",
                needed: 1,
                have: 0,
            });
        };
        match tag {
            b'w' => {
                need(&payload, 25, "XLogData")?;
                payload.advance(1);
                let start = Lsn(payload.get_u64());
                let server_end = Lsn(payload.get_u64());
                let server_time = PgTimestamp(payload.get_i64());
                let msg = XLogData {
                    start,
                    server_end,
                    server_time,
                    data: payload,
                };
                msg.end()?;
                Ok(ReplicationMessage::XLogData(msg))
            }
            b'k' => {
                need(&payload, 18, "primary keepalive")?;
                if payload.len() > 18 {
                    return Err(PgWireError::TrailingBytes {
                        message: "primary keepalive",
                        extra: payload.len() - 18,
                    });
                }
                payload.advance(1);
                let server_end = Lsn(payload.get_u64());
                let server_time = PgTimestamp(payload.get_i64());
                let reply_requested = payload.get_u8() != 0;
                Ok(ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
                    server_end,
                    server_time,
                    reply_requested,
                }))
            }
            other => Err(PgWireError::UnknownMessage {
                context: "replication",
                tag: char::from(other),
            }),
        }
    }
}

/// Encodes `w` (for tests and fake servers: the inverse of [`ReplicationMessage::parse`]).
pub fn encode_xlog_data(msg: &XLogData, out: &mut BytesMut) {
    out.reserve(25 + msg.data.len());
    out.put_u8(b'w');
    out.put_u64(msg.start.0);
    out.put_u64(msg.server_end.0);
    out.put_i64(msg.server_time.0);
    out.put_slice(&msg.data);
}

/// Encodes `k` (for tests and fake servers).
pub fn encode_keepalive(msg: &PrimaryKeepalive, out: &mut BytesMut) {
    out.put_u8(b'k');
    out.put_u64(msg.server_end.0);
    out.put_i64(msg.server_time.0);
    out.put_u8(u8::from(msg.reply_requested));
}

/// `r`: what we tell the server. `flush` is what the server may recycle up to (and, in
/// synchronous replication, what commits wait for), so it must only ever name durable WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last byte + 1 received.
    pub write: Lsn,
    /// Last byte + 1 durable (in the repository, for us).
    pub flush: Lsn,
    /// Last byte + 1 applied; we apply nothing, so `INVALID` or `flush`.
    pub apply: Lsn,
    /// Our clock.
    pub client_time: PgTimestamp,
    /// Ask the server to answer with a keepalive at once (used to measure round trips).
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Encoded length: tag + 3 LSNs + clock + flag.
    pub const LEN: usize = 34;

    /// Appends the CopyData payload (without the outer `d` frame).
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(Self::LEN);
        out.put_u8(b'r');
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time.0);
        out.put_u8(u8::from(self.reply_requested));
    }

    /// Parses an encoded update (for tests and fake servers).
    pub fn parse(mut payload: Bytes) -> Result<StandbyStatusUpdate, PgWireError> {
        need(&payload, Self::LEN, "standby status update")?;
        if payload[0] != b'r' {
            return Err(PgWireError::UnknownMessage {
                context: "standby",
                tag: char::from(payload[0]),
            });
        }
        payload.advance(1);
        Ok(StandbyStatusUpdate {
            write: Lsn(payload.get_u64()),
            flush: Lsn(payload.get_u64()),
            apply: Lsn(payload.get_u64()),
            client_time: PgTimestamp(payload.get_i64()),
            reply_requested: payload.get_u8() != 0,
        })
    }
}

fn need(payload: &[u8], needed: usize, message: &'static str) -> Result<(), PgWireError> {
    if payload.len() < needed {
        return Err(PgWireError::Truncated {
            message,
            needed,
            have: payload.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timestamps_use_the_2000_epoch() {
        let t = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS + 1);
        assert_eq!(PgTimestamp::from_system_time(t), PgTimestamp(1_000_000));
        assert_eq!(PgTimestamp(1_000_000).to_system_time(), t);
        assert_eq!(
            PgTimestamp::from_system_time(UNIX_EPOCH),
            PgTimestamp(-946_684_800_000_000)
        );
    }

    #[test]
    fn standby_status_update_layout() {
        let mut out = BytesMut::new();
        StandbyStatusUpdate {
            write: Lsn(0x0102030405060708),
            flush: Lsn(2),
            apply: Lsn(3),
            client_time: PgTimestamp(4),
            reply_requested: true,
        }
        .encode(&mut out);
        assert_eq!(out.len(), StandbyStatusUpdate::LEN);
        assert_eq!(&out[..9], &[b'r', 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(out[33], 1);
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert!(ReplicationMessage::parse(Bytes::new()).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"w1234")).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"k")).is_err());
        let e = ReplicationMessage::parse(Bytes::from_static(b"z")).unwrap_err();
        assert!(e.to_string().contains("'z'"), "{e}");
        // XLogData whose end would wrap the address space
        let mut out = BytesMut::new();
        encode_xlog_data(
            &XLogData {
                start: Lsn(u64::MAX),
                server_end: Lsn(0),
                server_time: PgTimestamp(0),
                data: Bytes::from_static(b"ab"),
            },
            &mut out,
        );
        assert!(ReplicationMessage::parse(out.freeze()).is_err());
    }

    proptest! {
        #[test]
        fn xlogdata_round_trips(start in 0u64..u64::MAX / 2, end: u64, t: i64, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let msg = XLogData { start: Lsn(start), server_end: Lsn(end), server_time: PgTimestamp(t), data: Bytes::from(data) };
            let mut out = BytesMut::new();
            encode_xlog_data(&msg, &mut out);
            prop_assert_eq!(ReplicationMessage::parse(out.freeze()).unwrap(), ReplicationMessage::XLogData(msg));
        }

        #[test]
        fn keepalive_round_trips(end: u64, t: i64, reply: bool) {
            let msg = PrimaryKeepalive { server_end: Lsn(end), server_time: PgTimestamp(t), reply_requested: reply };
            let mut out = BytesMut::new();
            encode_keepalive(&msg, &mut out);
            prop_assert_eq!(ReplicationMessage::parse(out.freeze()).unwrap(), ReplicationMessage::PrimaryKeepalive(msg));
        }

        #[test]
        fn status_update_round_trips(w: u64, f: u64, a: u64, t: i64, reply: bool) {
            let msg = StandbyStatusUpdate { write: Lsn(w), flush: Lsn(f), apply: Lsn(a), client_time: PgTimestamp(t), reply_requested: reply };
            let mut out = BytesMut::new();
            msg.encode(&mut out);
            prop_assert_eq!(StandbyStatusUpdate::parse(out.freeze()).unwrap(), msg);
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplicationMessage::parse(Bytes::from(data));
        }
    }
}
