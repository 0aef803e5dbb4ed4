//! The replication offset: how many bytes of the master's command stream a replica has
//! processed (`master_repl_offset` in `INFO replication`, `REPLCONF ACK <offset>`).

use std::fmt;
use std::str::FromStr;

/// A byte position in a master's replication stream, scoped by its replication ID.
///
/// `PSYNC <replid> <offset + 1>` resumes after the last byte the agent made durable, and
/// `REPLCONF ACK <offset>` tells the master how far the agent has read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ReplicationOffset(pub u64);

impl ReplicationOffset {
    /// The offset after `bytes` more bytes of the stream.
    #[must_use]
    pub fn advance(self, bytes: u64) -> Self {
        Self(self.0.saturating_add(bytes))
    }

    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The offset `PSYNC` asks for to continue after this one (Redis sends `offset + 1`).
    #[must_use]
    pub fn psync_start(self) -> Self {
        self.advance(1)
    }
}

impl fmt::Display for ReplicationOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ReplicationOffset {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}
