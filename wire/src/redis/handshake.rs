//! The master's answer to `PSYNC` (`slaveTryPartialResynchronization` in Redis
//! `src/replication.c`).
//!
//! The master may send bare `\n` keep-alives while it prepares the answer; they are skipped
//! here and never count toward the replication offset.

use bytes::{Buf, BytesMut};

use super::offset::ReplicationOffset;
use super::resp::{decode_reply, Reply, RespError};

/// A successful answer to `PSYNC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsyncReply {
    /// A snapshot follows; the command stream after it starts at `offset`.
    FullResync {
        /// The master's replication ID (40 hex characters).
        replid: String,
        /// The offset of the snapshot.
        offset: ReplicationOffset,
    },
    /// The master continues from the offset asked for. A new ID (after a failover) must be
    /// adopted for the next `PSYNC`.
    Continue {
        /// The master's replication ID if it changed.
        replid: Option<String>,
    },
}

/// Why `PSYNC` did not start a sync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsyncError {
    /// The server is a replica that lost its own master; retry later.
    #[error("the server is a replica without a link to its master (-NOMASTERLINK); retry later")]
    NoMasterLink,
    /// The server is loading its dataset; retry later.
    #[error("the server is loading its dataset (-LOADING); retry later")]
    Loading,
    /// Any other error reply (ACL denial, `-ERR`).
    #[error("the server refused PSYNC: {0}")]
    Refused(String),
    /// A reply that is not a PSYNC answer.
    #[error("unexpected reply to PSYNC: {0}")]
    Unexpected(String),
    /// Not RESP.
    #[error(transparent)]
    Resp(#[from] RespError),
}

impl PsyncError {
    /// Whether waiting and retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, PsyncError::NoMasterLink | PsyncError::Loading)
    }
}

/// Checks a replication ID: 40 hexadecimal characters (`CONFIG_RUN_ID_SIZE`).
pub fn is_replid(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Takes the PSYNC answer off the front of `buf`, skipping keep-alive newlines;
/// `Ok(None)` while incomplete.
pub fn decode_psync_reply(buf: &mut BytesMut) -> Result<Option<PsyncReply>, PsyncError> {
    let newlines = buf
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    buf.advance(newlines);
    let Some(reply) = decode_reply(buf)? else {
        return Ok(None);
    };
    match reply {
        Reply::Simple(line) => parse_line(&line).map(Some),
        Reply::Error(e) if e.starts_with("NOMASTERLINK") => Err(PsyncError::NoMasterLink),
        Reply::Error(e) if e.starts_with("LOADING") => Err(PsyncError::Loading),
        Reply::Error(e) => Err(PsyncError::Refused(e)),
        other => Err(PsyncError::Unexpected(format!("{other:?}"))),
    }
}

fn parse_line(line: &str) -> Result<PsyncReply, PsyncError> {
    let unexpected = || PsyncError::Unexpected(line.to_owned());
    let mut words = line.split(' ');
    match words.next() {
        Some("FULLRESYNC") => {
            let replid = words
                .next()
                .filter(|r| is_replid(r))
                .ok_or_else(unexpected)?;
            let offset = words
                .next()
                .and_then(|o| o.parse().ok())
                .ok_or_else(unexpected)?;
            Ok(PsyncReply::FullResync {
                replid: replid.to_owned(),
                offset,
            })
        }
        Some("CONTINUE") => match words.next() {
            None | Some("") => Ok(PsyncReply::Continue { replid: None }),
            Some(r) if is_replid(r) => Ok(PsyncReply::Continue {
                replid: Some(r.to_owned()),
            }),
            Some(_) => Err(unexpected()),
        },
        _ => Err(unexpected()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn decodes_every_answer_split_anywhere() {
        let cases: Vec<(String, Result<PsyncReply, PsyncError>)> = vec![
            (
                format!("\n\n+FULLRESYNC {ID} 1234\r\n"),
                Ok(PsyncReply::FullResync {
                    replid: ID.into(),
                    offset: ReplicationOffset(1234),
                }),
            ),
            (
                "+CONTINUE\r\n".into(),
                Ok(PsyncReply::Continue { replid: None }),
            ),
            (
                format!("\n+CONTINUE {ID}\r\n"),
                Ok(PsyncReply::Continue {
                    replid: Some(ID.into()),
                }),
            ),
            (
                "-NOMASTERLINK Can't SYNC while not connected with my master\r\n".into(),
                Err(PsyncError::NoMasterLink),
            ),
            (
                "-LOADING Redis is loading the dataset in memory\r\n".into(),
                Err(PsyncError::Loading),
            ),
            (
                "-NOPERM no permission\r\n".into(),
                Err(PsyncError::Refused("NOPERM no permission".into())),
            ),
            (
                "+FULLRESYNC short 1\r\n".into(),
                Err(PsyncError::Unexpected("FULLRESYNC short 1".into())),
            ),
        ];
        for (wire, expected) in cases {
            for split in 0..=wire.len() {
                let mut buf = BytesMut::from(&wire.as_bytes()[..split]);
                let mut got = decode_psync_reply(&mut buf);
                if let Ok(None) = got {
                    buf.extend_from_slice(&wire.as_bytes()[split..]);
                    got = decode_psync_reply(&mut buf);
                }
                let got = got.map(|r| r.unwrap());
                assert_eq!(got, expected, "{wire:?} split at {split}");
            }
        }
    }
}
