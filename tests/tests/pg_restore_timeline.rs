//! Restore across a failover: a base backup taken on timeline 1, the primary fails over to
//! its standby, WAL continues on timeline 2 (streamed from a multi-host source), and
//! `restore` follows the history file to the newest timeline by default, or stays on the
//! timeline `--timeline` names.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use std::time::Duration;

use pg_pitr_support::{start_restored, Env, RestoreDirs};
use pg_support::{repo, standby_of, stream_args, text, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

fn insert(pg: &PgCluster, from: u32, to: u32, tli: u32) {
    pg.sql_blocking(&format!(
        "INSERT INTO m SELECT g, {tli} FROM generate_series({from}, {to}) g"
    ));
}

/// (rows, highest id, rows written on timeline 2) of the restored cluster.
fn contents(pg: &PgCluster) -> (String, String, String) {
    let row = pg
        .sql_blocking("SELECT count(*), max(id), count(*) FILTER (WHERE tli = 2) FROM m")
        .remove(0);
    let col = |i: usize| row[i].clone().unwrap_or_default();
    (col(0), col(1), col(2))
}

#[test]
fn restore_follows_the_failover_or_stays_on_the_named_timeline() {
    // pg_basebackup (client programs ship with 15 only here) refuses newer servers.
    let version = PgVersion::V15;
    let mut env = Env::simple(version);
    env.pg
        .sql_blocking("CREATE TABLE m(id int primary key, tli int)");
    insert(&env.pg, 1, 100, 1);
    env.backup(&[]);
    let standby = standby_of(&env.pg, version);
    insert(&env.pg, 101, 200, 1);

    // From now on the stream takes a multi-host source, as it would in production.
    assert!(env.stream.take().unwrap().terminate().success());
    let src = env.pg.replication_url().replace(
        &format!("127.0.0.1:{}", env.pg.port()),
        &format!("127.0.0.1:{},127.0.0.1:{}", env.pg.port(), standby.port()),
    ) + "?target_session_attrs=read-write";
    let url = env.repo_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), env.dir.path().join("s2.log"));
    let end1 = env
        .pg
        .query_one_blocking("SELECT pg_current_wal_lsn()::text");
    env.wait_archived(&end1);
    assert!(
        wait_until(Duration::from_secs(60), || standby.query_one_blocking(
            &format!("SELECT pg_last_wal_replay_lsn() >= '{end1}'::pg_lsn")
        ) == "t"),
        "standby did not catch up"
    );

    // Failover.
    env.pg.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    assert!(wait_until(Duration::from_secs(30), || standby
        .query_one_blocking("SELECT pg_is_in_recovery()")
        == "f"));
    insert(&standby, 201, 300, 2);
    let seg = standby.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(seg.starts_with("00000002"), "{seg}");
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{seg} never arrived:\n{}",
        agent.log_text()
    );
    assert!(agent.exited().is_none(), "{}", agent.log_text());

    // The latest point: the backup from timeline 1, then timeline 2 through its history.
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = start_restored(version, &dirs.data());
    assert_eq!(
        contents(&restored),
        ("300".into(), "300".into(), "100".into()),
        "{}",
        text(&out)
    );
    drop(restored);

    // --timeline 1: everything the old primary committed, nothing from after the failover.
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &["--timeline", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = start_restored(version, &dirs.data());
    assert_eq!(
        contents(&restored),
        ("200".into(), "200".into(), "0".into()),
        "{}",
        text(&out)
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());
}
