//! Redis and Valkey: the agent attaches to a master as a replica, stores the RDB snapshot
//! it sends and then every write command, so any moment can be restored.
//!
//! - [`source`] parses the `--source` URL; [`tls`] sets up `rediss://`.
//! - [`link`] is the replica connection and handshake (the ACL it needs is documented there).
//! - [`cluster`] tells a Redis Cluster node from a single server, and refuses to capture one
//!   shard silently.
//! - [`cluster_stream`] captures a whole Redis Cluster: one stream per shard, the slot-map
//!   history.
//! - [`snapshot`] stores one validated snapshot generation.
//! - [`manifest`] reads and writes `generation.json`.
//! - [`exec_time`] bounds when the master executed each command, for the time index.
//! - [`chunk`] encodes command-stream chunk objects with their time index.
//! - [`stream`] runs `redis stream`, resumable from the repository alone.
//! - [`restore`] rebuilds server files for a moment in time.
//! - [`cluster_restore`] restores a Redis Cluster capture to a moment, one directory per
//!   shard, and with `--start` assembles a cluster on them; [`server_proc`] starts servers.
//! - [`verify`] proves every generation restorable (`redis verify`).
//! - [`admin`] is a one-shot client for `INFO` on a restored server.
//! - [`cli`] defines `syncbridge-agent redis …`.

pub mod admin;
pub mod chunk;
pub mod cli;
pub mod cluster;
pub mod cluster_job;
pub mod cluster_moves;
pub mod cluster_restore;
pub mod cluster_stream;
pub mod cluster_verify;
pub mod exec_time;
pub mod link;
pub mod manifest;
pub mod restore;
pub mod server_proc;
pub mod snapshot;
pub mod source;
pub mod stream;
pub mod tls;
pub mod verify;
