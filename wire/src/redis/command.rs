//! The replication command stream: every write the master executes, as a RESP array of bulk
//! strings, in the order it was applied (`replicationFeedSlaves` in Redis
//! `src/replication.c`).
//!
//! The replication offset advances by each command's exact byte length, so the decoder hands
//! back the raw bytes with the parsed arguments. It remembers how far it has parsed, so a
//! 100 MB `SET` arriving in 64 KiB reads is scanned once, and caps argument counts and sizes
//! before trusting them.

use bytes::{Bytes, BytesMut};

/// Limits on what a master may send, so a corrupt stream cannot make the agent allocate
/// without bound. Defaults follow Redis' own `proto-max-bulk-len` (512 MB) and a generous
/// argument count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLimits {
    /// Largest single argument.
    pub max_bulk_len: u64,
    /// Most arguments in one command.
    pub max_args: u64,
}

impl Default for CommandLimits {
    fn default() -> Self {
        Self {
            max_bulk_len: 512 << 20,
            max_args: 16 << 20,
        }
    }
}

/// Why the stream is not a command stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not the `*<n>\r\n$<len>\r\n...` form.
    #[error("malformed replication stream at byte {at} of the command: {reason}")]
    Malformed {
        /// What was expected.
        reason: &'static str,
        /// Byte position within the command.
        at: usize,
    },
    /// A count or length above [`CommandLimits`].
    #[error("replication command exceeds the limit: {0}")]
    TooLarge(String),
}

/// One command from the master with its exact wire bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedCommand {
    /// The bytes as received; storing these reproduces the stream byte for byte.
    pub raw: Bytes,
    /// The arguments, slices of `raw`.
    pub args: Vec<Bytes>,
}

/// What a command means for chunking and restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// `MULTI`: a chunk must not be cut until the matching `EXEC`.
    Multi,
    /// `EXEC`.
    Exec,
    /// `SELECT <db>`: later commands apply to that database.
    Select(u32),
    /// `PING` keep-alive: counts for the offset, never replayed.
    Ping,
    /// `REPLCONF GETACK *`: the master asks for an immediate `REPLCONF ACK`.
    ReplconfGetAck,
    /// Another `REPLCONF`: never replayed.
    Replconf,
    /// `CLUSTER ...`: Valkey 8+ replicates `CLUSTER SETSLOT` to its replicas before running
    /// it (`clusterCommandSetSlot` in `src/cluster_legacy.c`). It is the cluster's topology,
    /// not data: a restore builds its own topology and never replays it.
    Cluster,
    /// A data command.
    Other,
}

impl ReplicatedCommand {
    /// Bytes this command advances the replication offset by.
    pub fn wire_len(&self) -> u64 {
        self.raw.len() as u64
    }

    /// The command name, upper-cased.
    pub fn name(&self) -> String {
        self.args
            .first()
            .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
            .unwrap_or_default()
    }

    /// Classifies the command.
    pub fn kind(&self) -> CommandKind {
        let Some(name) = self.args.first() else {
            return CommandKind::Other;
        };
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        if is("MULTI") {
            CommandKind::Multi
        } else if is("EXEC") {
            CommandKind::Exec
        } else if is("PING") {
            CommandKind::Ping
        } else if is("SELECT") {
            self.args
                .get(1)
                .and_then(|db| std::str::from_utf8(db).ok()?.parse().ok())
                .map_or(CommandKind::Other, CommandKind::Select)
        } else if is("CLUSTER") {
            CommandKind::Cluster
        } else if is("REPLCONF") {
            match self.args.get(1) {
                Some(sub) if sub.eq_ignore_ascii_case(b"GETACK") => CommandKind::ReplconfGetAck,
                _ => CommandKind::Replconf,
            }
        } else {
            CommandKind::Other
        }
    }

    /// True for commands a restore must not replay (`PING`, `REPLCONF`, `CLUSTER`).
    pub fn is_replication_only(&self) -> bool {
        matches!(
            self.kind(),
            CommandKind::Ping
                | CommandKind::Replconf
                | CommandKind::ReplconfGetAck
                | CommandKind::Cluster
        )
    }
}

#[derive(Debug, Clone, Default)]
struct Progress {
    /// Parsed up to here (within the buffer).
    pos: usize,
    /// Declared argument count, once read.
    count: Option<u64>,
    /// Argument ranges read so far.
    args: Vec<(usize, usize)>,
}

/// Decodes commands off the front of a buffer; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct CommandDecoder {
    limits: CommandLimits,
    progress: Progress,
}

/// Reads `<prefix><decimal>\r\n` at `buf[pos..]`.
fn read_header(buf: &[u8], pos: usize, prefix: u8) -> Result<Option<(i64, usize)>, CommandError> {
    let Some(&first) = buf.get(pos) else {
        return Ok(None);
    };
    if first != prefix {
        let reason = if prefix == b'*' {
            "expected '*' (array)"
        } else {
            "expected '$' (bulk string)"
        };
        return Err(CommandError::Malformed { reason, at: pos });
    }
    let digits_start = pos + 1;
    // A length has at most 20 characters.
    let window = &buf[digits_start..buf.len().min(digits_start + 22)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.len() >= 22 {
            return Err(CommandError::Malformed {
                reason: "length line too long",
                at: pos,
            });
        }
        return Ok(None);
    };
    let Some(&lf) = window.get(cr + 1) else {
        return Ok(None);
    };
    if lf != b'\n' {
        return Err(CommandError::Malformed {
            reason: "length line not ended by CRLF",
            at: pos,
        });
    }
    let n = std::str::from_utf8(&window[..cr])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(CommandError::Malformed {
            reason: "length is not a number",
            at: pos,
        })?;
    Ok(Some((n, digits_start + cr + 2)))
}

impl CommandDecoder {
    /// A decoder with default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder with explicit limits.
    pub fn with_limits(limits: CommandLimits) -> Self {
        Self {
            limits,
            progress: Progress::default(),
        }
    }

    /// Bytes of an incomplete command already buffered and parsed.
    pub fn pending_bytes(&self) -> usize {
        self.progress.pos
    }

    /// Takes the next complete command off the front of `buf`; `Ok(None)` while incomplete.
    /// `buf` must only grow at its end between calls.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<ReplicatedCommand>, CommandError> {
        let p = &mut self.progress;
        let count = match p.count {
            Some(c) => c,
            None => {
                let Some((n, next)) = read_header(buf, 0, b'*')? else {
                    return Ok(None);
                };
                if n < 1 {
                    return Err(CommandError::Malformed {
                        reason: "command with no arguments",
                        at: 0,
                    });
                }
                let n = n as u64;
                if n > self.limits.max_args {
                    return Err(CommandError::TooLarge(format!("{n} arguments")));
                }
                p.count = Some(n);
                p.pos = next;
                p.args = Vec::with_capacity(n.min(64) as usize);
                n
            }
        };
        while (p.args.len() as u64) < count {
            let Some((len, start)) = read_header(buf, p.pos, b'$')? else {
                return Ok(None);
            };
            if len < 0 {
                return Err(CommandError::Malformed {
                    reason: "null argument",
                    at: p.pos,
                });
            }
            let len = len as u64;
            if len > self.limits.max_bulk_len {
                return Err(CommandError::TooLarge(format!("argument of {len} bytes")));
            }
            let end = start + len as usize;
            let Some(crlf) = buf.get(end..end + 2) else {
                return Ok(None);
            };
            if crlf != b"\r\n" {
                return Err(CommandError::Malformed {
                    reason: "argument not followed by CRLF",
                    at: end,
                });
            }
            p.args.push((start, end));
            p.pos = end + 2;
        }
        let raw = buf.split_to(p.pos).freeze();
        let args = p.args.iter().map(|&(s, e)| raw.slice(s..e)).collect();
        self.progress = Progress::default();
        Ok(Some(ReplicatedCommand { raw, args }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::redis::resp::encode_command;
    use proptest::prelude::*;

    fn decode_all(wire: &[u8], cuts: &[usize]) -> Result<Vec<ReplicatedCommand>, CommandError> {
        let mut dec = CommandDecoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut fed = 0;
        for p in points {
            buf.extend_from_slice(&wire[fed..p]);
            fed = p;
            while let Some(c) = dec.decode(&mut buf)? {
                out.push(c);
            }
        }
        assert!(buf.is_empty(), "leftover bytes");
        Ok(out)
    }

    #[test]
    fn kinds_and_lengths() {
        let mut w = BytesMut::new();
        encode_command(&mut w, &[b"SELECT", b"3"]);
        encode_command(&mut w, &[b"multi"]);
        encode_command(&mut w, &[b"SET", b"k", b"v\r\nwith crlf"]);
        encode_command(&mut w, &[b"EXEC"]);
        encode_command(&mut w, &[b"PING"]);
        encode_command(&mut w, &[b"REPLCONF", b"GETACK", b"*"]);
        encode_command(&mut w, &[b"cluster", b"SETSLOT", b"7", b"NODE", b"abc"]);
        let cmds = decode_all(&w, &[]).unwrap();
        let kinds: Vec<_> = cmds.iter().map(ReplicatedCommand::kind).collect();
        assert_eq!(
            kinds,
            [
                CommandKind::Select(3),
                CommandKind::Multi,
                CommandKind::Other,
                CommandKind::Exec,
                CommandKind::Ping,
                CommandKind::ReplconfGetAck,
                CommandKind::Cluster
            ]
        );
        let replayed: Vec<_> = cmds.iter().map(|c| !c.is_replication_only()).collect();
        assert_eq!(replayed, [true, true, true, true, false, false, false]);
        assert_eq!(
            cmds.iter().map(ReplicatedCommand::wire_len).sum::<u64>(),
            w.len() as u64
        );
        assert_eq!(&cmds[2].args[2][..], b"v\r\nwith crlf");
        assert_eq!(cmds[4].wire_len(), 14);
    }

    #[test]
    fn rejects_garbage_and_limits() {
        assert!(decode_all(b"\n", &[]).is_err());
        assert!(decode_all(b"*1\r\n$3\r\nabcX\n", &[]).is_err());
        assert!(decode_all(b"*0\r\n", &[]).is_err());
        let mut dec = CommandDecoder::with_limits(CommandLimits {
            max_bulk_len: 4,
            max_args: 2,
        });
        assert!(dec.decode(&mut BytesMut::from(&b"*3\r\n"[..])).is_err());
        let mut dec = CommandDecoder::with_limits(CommandLimits {
            max_bulk_len: 4,
            max_args: 2,
        });
        assert!(dec
            .decode(&mut BytesMut::from(&b"*1\r\n$5\r\n"[..]))
            .is_err());
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_commands(
            cmds in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut wire = BytesMut::new();
            for c in &cmds {
                let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
                encode_command(&mut wire, &args);
            }
            let whole = decode_all(&wire, &[]).unwrap();
            let split = decode_all(&wire, &cuts).unwrap();
            prop_assert_eq!(&whole, &split);
            let got: Vec<Vec<Vec<u8>>> =
                split.iter().map(|c| c.args.iter().map(|a| a.to_vec()).collect()).collect();
            prop_assert_eq!(got, cmds);
        }
    }
}
