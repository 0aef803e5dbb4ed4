//! One error type for the PostgreSQL codecs, so callers match on what went wrong, not where.

/// Why bytes from a PostgreSQL server (or a name from a repository) were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PgWireError {
    /// An LSN string is not `X/Y` with 1–8 hex digits each side.
    #[error("invalid LSN {text:?}: expected X/Y with 1-8 hex digits on each side")]
    InvalidLsn {
        /// The offending text.
        text: String,
    },
    /// A WAL segment size outside what PostgreSQL allows.
    #[error(
        "invalid WAL segment size {bytes} bytes: must be a power of two between 1 MiB and 1 GiB"
    )]
    InvalidSegmentSize {
        /// The offending size.
        bytes: u64,
    },
    /// `SHOW wal_segment_size` answered something we cannot read.
    #[error("cannot read wal_segment_size {text:?}: expected e.g. 16MB or 1GB")]
    InvalidSegmentSizeSetting {
        /// The offending setting value.
        text: String,
    },
    /// Timeline 0 does not exist in PostgreSQL.
    #[error("invalid timeline {0}: timelines start at 1")]
    InvalidTimeline(u64),
    /// A WAL file name that is neither a segment nor a history file.
    #[error("invalid WAL file name {name:?}: {reason}")]
    InvalidFileName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A line of a timeline history file that cannot be parsed.
    #[error("timeline history line {line}: {reason}")]
    InvalidHistory {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An arithmetic result would leave the 64-bit WAL address space.
    #[error("LSN overflow: {0}")]
    LsnOverflow(String),
    /// A message ended before all of its fields.
    #[error("{message} message truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Which message.
        message: &'static str,
        /// Bytes required.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// A message carried bytes after its last field.
    #[error("{message} message has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// Which message.
        message: &'static str,
        /// How many.
        extra: usize,
    },
    /// A CopyData payload whose first byte we do not know.
    #[error("unknown {context} message type {tag:?}")]
    UnknownMessage {
        /// Which sub-protocol.
        context: &'static str,
        /// The type byte.
        tag: char,
    },
    /// A string field without its NUL terminator, or not UTF-8.
    #[error("{message}: {reason}")]
    BadString {
        /// Which message.
        message: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A peer announced a length above our cap; nothing was allocated.
    #[error("{what} of {announced} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was announced.
        what: &'static str,
        /// The announced length.
        announced: u64,
        /// Our cap.
        limit: u64,
    },
    /// A result row does not have the shape a replication command returns.
    #[error("{command} result: {reason}")]
    BadRow {
        /// The command whose result this is.
        command: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// XLogData that does not continue where the previous one ended.
    #[error("WAL discontinuity: expected data at {expected}, got {got}")]
    Discontinuity {
        /// Where the next byte should start.
        expected: String,
        /// Where it started.
        got: String,
    },
    /// A broken tar stream.
    #[error("tar stream at offset {offset}: {reason}")]
    Tar {
        /// Byte offset in the archive where the problem was found.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}
