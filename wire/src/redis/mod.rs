//! The Redis/Valkey replica protocol, without I/O.
//!
//! A replica (here: the agent) sends `PSYNC`, the master answers `+FULLRESYNC <replid>
//! <offset>` or `+CONTINUE [<replid>]`, then for a full sync transfers the RDB snapshot
//! (`$<len>\r\n<bytes>` or, diskless, `$EOF:<40-byte mark>\r\n<bytes><mark>`, possibly after
//! bare `\n` keep-alives), then streams every write as a RESP array of bulk strings. The
//! replication offset counts the bytes of that command stream. See Redis
//! `src/replication.c` (`syncWithMaster`, `readSyncBulkPayload`, `replicationFeedSlaves`) and
//! <https://redis.io/docs/latest/operate/oss_and_stack/reference/protocol-spec/>.
//!
//! - [`resp`]: encoding commands and decoding single replies during the handshake.
//! - [`handshake`]: the `PSYNC` reply.
//! - [`transfer`]: the RDB payload in both framings, yielded slice by slice.
//! - [`command`]: the command stream, one command and its exact byte length at a time.
//! - [`rdb`]: a streaming validator for the snapshot itself.
//! - [`cluster`]: Redis Cluster topology: key hash slots, `CLUSTER SHARDS` / `CLUSTER NODES`,
//!   the slot map, its coverage check, serialisation and diff.

pub mod cluster;
pub mod command;
pub mod handshake;
pub mod offset;
pub mod rdb;
pub mod resp;
pub mod transfer;

pub use command::{CommandDecoder, CommandKind, ReplicatedCommand};
pub use handshake::PsyncReply;
pub use offset::ReplicationOffset;
pub use transfer::{RdbTransferDecoder, TransferEvent};
