//! `postgres stream` faults: a slot already in use, `wal_level = minimal`, the server
//! restarting under the agent, and a repository belonging to another cluster.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{repo, run_agent, stream_args, text, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

#[test]
fn slot_in_use_and_foreign_repository_are_refused_clearly() {
    let pg = PgCluster::start(PgVersion::V17);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = pg.replication_url();
    let mut first = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("a.log"));
    assert!(
        wait_until(Duration::from_secs(30), || first
            .log_text()
            .contains("starting replication")),
        "{}",
        first.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = run_agent(&stream_args(&src, &url));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        text(&out)
    );
    assert!(first.exited().is_none(), "{}", first.log_text());
    first.kill9();

    // The same repository pointed at another cluster.
    let other = PgCluster::start(PgVersion::V17);
    let other_src = other.replication_url();
    let out = run_agent(&stream_args(&other_src, &url));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to mix clusters"), "{}", text(&out));
}

#[test]
fn wal_level_minimal_is_explained() {
    let pg = PgCluster::builder(PgVersion::V16)
        .extra_conf("wal_level = minimal")
        .extra_conf("max_wal_senders = 0")
        .extra_conf("wal_keep_size = 0")
        .extra_conf("max_replication_slots = 0")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let out = run_agent(&stream_args(&pg.replication_url(), &url));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_wal_senders") && err.contains("wal_level"),
        "{}",
        text(&out)
    );
}

#[test]
fn server_restart_is_survived_without_gaps() {
    let mut pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(1024)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("a.log"));
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('r', 200) FROM generate_series(1, 40000) g");
    let before = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&before)),
        "{}",
        agent.log_text()
    );
    pg.stop();
    std::thread::sleep(Duration::from_secs(2));
    pg.start_again();
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('s', 200) FROM generate_series(1, 40000) g");
    let after = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(120), || {
            let segs = repo::listing(&url).0;
            segs.contains(&after) && pg_support::contiguous(&segs)
        }),
        "after restart {after} never arrived:\n{}",
        agent.log_text()
    );
    assert!(agent.exited().is_none());
    let log = agent.log_text();
    assert!(log.contains("retrying in"), "{log}");
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
}

#[test]
fn invalidated_slot_is_reported_not_papered_over() {
    let pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(0)
        .extra_conf("max_slot_wal_keep_size = 32MB")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("a.log"));
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .iter()
            .any(|s| *s >= seg)),
        "{}",
        agent.log_text()
    );
    agent.kill9();
    // While the agent is away, far more WAL than the slot may keep.
    for _ in 0..6 {
        pg.sql_blocking(
            "INSERT INTO t SELECT g, repeat('l', 200) FROM generate_series(1, 40000) g",
        );
        pg.query_one_blocking("SELECT pg_switch_wal()");
    }
    pg.sql_blocking("CHECKPOINT");
    assert!(
        wait_until(Duration::from_secs(30), || pg.query_one_blocking(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'syncbridge'"
        ) == "lost"),
        "slot was not invalidated"
    );
    let out = run_agent(&stream_args(&src, &url));
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalidated") && err.contains("new base backup"),
        "{}",
        text(&out)
    );
}

#[test]
fn lost_wal_range_is_named_when_the_slot_starts_past_the_repository() {
    let pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(1024)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("a.log"));
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        agent.log_text()
    );
    assert!(agent.terminate().success());
    // The slot is dropped (as after a failover to a server without it) and WAL moves on.
    pg.sql_blocking("SELECT pg_drop_replication_slot('syncbridge')");
    for _ in 0..3 {
        pg.sql_blocking(
            "INSERT INTO t SELECT g, repeat('g', 200) FROM generate_series(1, 40000) g",
        );
        pg.query_one_blocking("SELECT pg_switch_wal()");
    }
    // A new slot reserves WAL from the last checkpoint's redo point: move it past the gap.
    pg.sql_blocking("CHECKPOINT");
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("b.log"));
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .log_text()
            .contains("is missing from the repository")),
        "{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(log.contains("take a new base backup"), "{log}");
    assert!(
        agent.exited().is_none(),
        "the stream goes on after reporting the gap:\n{log}"
    );
}

#[test]
fn agent_started_before_the_server_waits_for_it() {
    let mut pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(512)
        .start();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("a.log"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.exited().is_none(),
        "gave up while the server was down:\n{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("retrying in"),
        "{}",
        agent.log_text()
    );
    pg.start_again();
    pg.sql_blocking("CREATE TABLE t(id int)");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(90), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        agent.log_text()
    );
}

/// Case 9: the `file://` repository is deleted while `postgres stream` runs. The stream
/// stops with an error naming the repository, does not recreate the directory, and the
/// slot stays where it was (no WAL is confirmed into a repository no command can read).
#[test]
fn deleted_repository_stops_the_stream_and_the_slot_stays() {
    stream_loses_its_repository(|repo| std::fs::remove_dir_all(repo).unwrap(), false);
}

/// Like case 9 with only the marker removed (what an emptied S3 prefix looks like): the
/// stream stops before confirming more WAL.
#[test]
fn deleted_marker_stops_the_stream_and_the_slot_stays() {
    stream_loses_its_repository(
        |repo| std::fs::remove_file(repo.join("syncbridge-repo")).unwrap(),
        true,
    );
}

fn stream_loses_its_repository(delete: impl Fn(&std::path::Path), dir_stays: bool) {
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(0)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), dir.path().join("a.log"));
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('d', 200) FROM generate_series(1, 20000) g");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        agent.log_text()
    );
    // Let the slot catch up with everything written so far.
    let slot_lsn = || {
        pg.query_one_blocking(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'syncbridge'",
        )
    };
    let current = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    assert!(
        wait_until(Duration::from_secs(30), || {
            let confirmed = slot_lsn();
            pg.query_one_blocking(&format!(
                "SELECT '{confirmed}'::pg_lsn >= '{current}'::pg_lsn"
            )) == "t"
        }),
        "slot never caught up: {}",
        agent.log_text()
    );

    delete(&repo_dir);
    let before = slot_lsn();
    // More WAL, in a segment of its own, that must not be confirmed.
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('e', 200) FROM generate_series(1, 20000) g");
    pg.query_one_blocking("SELECT pg_switch_wal()");
    assert!(
        wait_until(Duration::from_secs(30), || agent.exited().is_some()),
        "the stream kept running without its repository:\n{}",
        agent.log_text()
    );
    let status = agent.exited().unwrap();
    let log = agent.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("is gone") && log.contains("slot"), "{log}");
    assert_eq!(
        repo_dir.exists(),
        dir_stays,
        "the repository directory was recreated:\n{log}"
    );
    assert!(!repo_dir.join("syncbridge-repo").exists(), "{log}");
    assert_eq!(slot_lsn(), before, "the slot advanced:\n{log}");
}
