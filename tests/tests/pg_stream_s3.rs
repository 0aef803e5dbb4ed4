//! `postgres stream` into SeaweedFS (S3): byte-identical WAL under load, and a repository
//! outage that stalls the stream (with a warning naming the retained bytes) and then
//! catches up without a gap.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{repo, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
use syncbridge_tests::S3Server;

#[test]
fn pg17_to_seaweedfs_byte_identical_through_an_outage() {
    let s3 = S3Server::start();
    // This test process reads the repository directly (not through the proxy).
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    let proxy = FaultProxy::start(s3.port());
    let pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(2048)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let url = s3.repo_url("pg17");
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn_env(
        &[
            "postgres",
            "stream",
            "--source",
            &src,
            "--repo",
            &url,
            "--max-lag",
            "200ms",
        ],
        dir.path().join("agent.log"),
        &s3.env_with_endpoint(&proxy.url()),
    );
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    let mut last = String::new();
    for _ in 0..4 {
        pg.sql_blocking(
            "INSERT INTO t SELECT g, repeat('w', 200) FROM generate_series(1, 100000) g",
        );
        last = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    }
    assert!(
        wait_until(Duration::from_secs(120), || {
            let segs = repo::listing(&url).0;
            segs.contains(&last) && pg_support::contiguous(&segs)
        }),
        "{last} never reached S3:\n{}",
        agent.log_text()
    );

    // The store goes down: every request fails. The stream must stall, warn, and not die.
    proxy.add_rule(FaultRule::any_method(Fault::SlowDown503).always());
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('o', 200) FROM generate_series(1, 100000) g");
    let during = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(90), || agent
            .log_text()
            .contains("stalled")),
        "no stall warning:\n{}",
        agent.log_text()
    );
    assert!(agent.exited().is_none(), "{}", agent.log_text());
    assert!(!repo::listing(&url).0.contains(&during));
    proxy.clear_rules();
    assert!(
        wait_until(Duration::from_secs(120), || {
            let segs = repo::listing(&url).0;
            segs.contains(&during) && pg_support::contiguous(&segs)
        }),
        "{during} never arrived after the outage:\n{}",
        agent.log_text()
    );
    assert!(proxy.injected_total() > 0);

    let segs = repo::segments(&url);
    let names: Vec<&String> = segs.keys().collect();
    for w in names.windows(2) {
        let a = u64::from_str_radix(&w[0][16..], 16).unwrap();
        let b = u64::from_str_radix(&w[1][16..], 16).unwrap();
        assert_eq!(b, a + 1, "gap between {} and {}", w[0], w[1]);
    }
    for (name, data) in &segs {
        assert!(
            data[..] == std::fs::read(pg.pg_wal_dir().join(name)).unwrap()[..],
            "{name} differs"
        );
    }
    eprintln!(
        "S3: {} segments byte-identical, {} requests failed during the outage",
        segs.len(),
        proxy.injected_total()
    );
}
