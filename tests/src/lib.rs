//! The test harness: throwaway PostgreSQL, Redis/Valkey and SeaweedFS servers on 127.0.0.1.
//!
//! Every integration test (tests/tests/*.rs) starts the real servers it needs through this
//! crate. Servers listen on 127.0.0.1 on free ports, keep their files in a temp dir, and are
//! stopped (with every process they forked) and removed on drop, also while a test panics.
//! The binaries come from `.deps/paths.env`, written by `make deps`; a missing one fails the
//! test with a message saying `run make deps` — a test never passes by skipping.
//!
//! ```no_run
//! use syncbridge_tests::pg::{PgCluster, PgVersion};
//! let pg = PgCluster::start(PgVersion::V17);
//! assert_eq!(pg.query_one_blocking("SELECT 1"), "1");
//! ```

pub mod paths;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod s3;

pub use pg::{PgCluster, PgClusterBuilder, PgVersion};
pub use proxy::{Fault, FaultProxy, FaultRule};
pub use redis::{RedisFlavor, RedisServer, RedisServerBuilder, RespValue};
pub use s3::{S3Server, TempRepo};
