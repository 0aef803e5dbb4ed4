//! The test harness: throwaway PostgreSQL, Redis/Valkey and SeaweedFS servers on 127.0.0.1.
//!
//! Every integration test (`tests/tests/<area>_<topic>.rs`) starts the real servers it needs
//! through this crate:
//!
//! - [`pg::PgCluster`]: PostgreSQL 14–18 ([`pg::PgVersion`]), `wal_level=replica`, a
//!   `replicator` role with a SCRAM password, replication allowed over TCP; run as the
//!   unprivileged user `syncbridge-test` when the tests run as root. Stop/start, `kill9`,
//!   restored data directories, client programs (`psql`, `pgbench`, `pg_basebackup`).
//! - [`redis::RedisServer`]: Redis 7 or Valkey 9 ([`redis::RedisFlavor`]), optional password,
//!   and a small synchronous RESP2 client ([`redis::RespConnection`]).
//! - [`redis_cluster::RedisCluster`]: a Redis 7 or Valkey 9 cluster of N masters with R
//!   replicas each; failover, slot migration, a cluster-aware client.
//! - [`s3::S3Server`]: SeaweedFS with a fresh bucket and its own credentials; `object_store`
//!   builder, AWS environment and `s3://` URL. [`s3::TempRepo`] is a `file://` repository.
//! - [`proxy::FaultProxy`]: an HTTP proxy that fails, resets or delays chosen requests, for
//!   retry tests.
//!
//! Rules every server follows:
//! - It listens on 127.0.0.1 on a free port, keeps its files in its own temp dir, and is
//!   stopped (with every process it forked) and its temp dir removed on drop, also while a
//!   test panics. A watchdog kills it if the test process dies without unwinding.
//! - The binaries come from `.deps/paths.env`, written by `make deps`; a missing one fails the
//!   test with a message saying `run make deps`. A test never passes by skipping.
//! - Failures panic with the server's log tail: this is test code, and a panic is the clearest
//!   report.
//!
//! Version matrices: iterate [`pg::PgVersion::from_env`] (all of 14–18 unless
//! `SB_PG_VERSIONS=14,18` narrows it) for behaviour that depends on the server version, and use
//! [`pg::PgVersion::default_single`] for the rest.
//!
//! ```no_run
//! use syncbridge_tests::pg::{PgCluster, PgVersion};
//! let pg = PgCluster::start(PgVersion::V17);
//! assert_eq!(pg.query_one_blocking("SELECT 1"), "1");
//! let agent_conninfo = pg.replication_url(); // postgres://replicator:...@127.0.0.1:PORT/postgres
//! # let _ = agent_conninfo;
//! ```
#![warn(missing_docs)]

pub mod agent;
pub mod bench_report;
pub mod bench_results;
pub mod measure;
pub mod paths;
pub mod pg;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod s3;
pub mod tls;

pub use pg::{PgCluster, PgClusterBuilder, PgVersion};
pub use proxy::{Fault, FaultProxy, FaultRule};
pub use redis::{RedisFlavor, RedisServer, RedisServerBuilder, RespValue};
pub use s3::{S3Server, TempRepo};
