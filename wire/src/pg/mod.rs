//! PostgreSQL physical replication, sans-IO.
//!
//! Everything the agent needs to understand what a walsender sends, without a socket:
//! WAL positions and segment naming (`src/include/access/xlog_internal.h`), timeline history
//! files (`src/backend/access/transam/timeline.c`), the CopyData sub-protocol of streaming
//! replication (`src/backend/replication/walsender.c`, protocol docs "Streaming Replication
//! Protocol"), the result rows of replication commands, the typed copy messages of
//! `BASE_BACKUP` (PostgreSQL 15+, `src/backend/backup/basebackup_copy.c`) and the tar stream
//! a base backup is made of (`src/port/tar.c`), and the checks that a WAL object is the WAL
//! its name says ([`page`]).
//!
//! Parsers that read a byte stream ([`frame::BackendFrame`], [`tar::TarReader`]) return
//! `Ok(None)` while the buffer holds too little, and never reserve more than a fixed cap
//! because a peer announced a length.

pub mod basebackup;
pub mod commands;
mod error;
pub mod frame;
pub mod lsn;
pub mod page;
pub mod replication;
pub mod results;
pub mod segment;
pub mod splitter;
pub mod tar;
pub mod timeline;
pub mod xlog;

pub use error::PgWireError;
pub use lsn::Lsn;
pub use replication::{
    PgTimestamp, PrimaryKeepalive, ReplicationMessage, StandbyStatusUpdate, XLogData,
};
pub use results::{QueryResult, ResultCollector};
pub use segment::{SegmentName, WalFileName, WalSegmentSize};
pub use splitter::{SegmentSlice, SegmentSplitter};
pub use timeline::{HistoryEntry, TimelineHistory, TimelineId};
