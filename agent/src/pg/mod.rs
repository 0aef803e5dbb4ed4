//! PostgreSQL: the replication connection, WAL streaming into the repository and
//! `restore_command` support.

pub mod archive;
pub mod backup;
pub mod backup_chunks;
pub mod backup_manifest;
pub mod backup_progress;
pub mod channel_binding;
pub mod cli;
pub mod conn;
pub mod conninfo;
pub mod partial;
mod rcvlowat;
pub mod stream;
pub mod tls;
pub mod wal_fetch;
