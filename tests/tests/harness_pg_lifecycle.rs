//! PgCluster lifecycle helpers: stop/start, restart, kill -9 with crash recovery, starting a
//! restored data directory, and running client programs as the server user.
#![allow(clippy::unwrap_used)]

use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::process::{process_is_alive, server_temp_dir};

#[test]
fn kill9_then_start_again_recovers_committed_rows_on_the_same_port() {
    let mut pg = PgCluster::builder(PgVersion::default_single())
        .wal_keep_size_mb(16)
        .extra_conf("max_wal_size = '64MB'")
        .start();
    assert_eq!(pg.query_one_blocking("SHOW wal_keep_size"), "16MB");
    assert_eq!(pg.query_one_blocking("SHOW max_wal_size"), "64MB");
    pg.sql_blocking("CREATE TABLE t(i int); INSERT INTO t SELECT generate_series(1, 1000);");
    let port = pg.port();
    let postmaster = pg.pid().unwrap();

    pg.kill9();
    assert!(!process_is_alive(postmaster));
    assert!(!pg.is_running());
    pg.start_again();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.query_one_blocking("SELECT count(*) FROM t"), "1000");
    assert!(
        std::fs::read_to_string(pg.log_path())
            .unwrap()
            .contains("not properly shut down"),
        "no crash recovery after kill9:\n{}",
        pg.log_tail()
    );

    pg.restart();
    assert_eq!(pg.query_one_blocking("SELECT count(*) FROM t"), "1000");
    pg.stop();
    assert!(!pg.is_running());
    assert!(std::fs::read_to_string(pg.log_path())
        .unwrap()
        .contains("database system is shut down"));
    assert!(pg.pg_wal_dir().join("archive_status").is_dir());
}

#[test]
fn a_base_backup_starts_as_a_new_cluster_from_its_data_dir() {
    // pg_basebackup comes from the Debian PostgreSQL 15 package and refuses newer servers.
    let pg = PgCluster::start(PgVersion::V15);
    pg.sql_blocking("CREATE TABLE t(i int); INSERT INTO t SELECT generate_series(1, 500);");
    let backup_root = server_temp_dir("sb-basebackup-");
    let target = backup_root.path().join("data");
    pg.run(
        "pg_basebackup",
        &[
            "-d",
            &pg.replication_conninfo(),
            "-D",
            target.to_str().unwrap(),
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        ],
    );
    pg.sql_blocking("INSERT INTO t VALUES (501)");

    let restored = PgCluster::start_from_data_dir(PgVersion::V15, &target);
    assert_ne!(restored.port(), pg.port());
    assert_eq!(restored.data_dir(), target.as_path());
    // The backup has the rows from before it was taken, not the later one.
    assert_eq!(restored.query_one_blocking("SELECT count(*) FROM t"), "500");
    assert_eq!(
        restored.query_one_blocking("SELECT system_identifier FROM pg_control_system()"),
        pg.query_one_blocking("SELECT system_identifier FROM pg_control_system()")
    );
    assert!(!restored.is_in_recovery());
    drop(restored);
    // The caller owns a data directory it handed in.
    assert!(target.join("PG_VERSION").is_file());
}

#[test]
fn a_streaming_standby_is_ready_in_recovery_and_promotes() {
    let primary = PgCluster::start(PgVersion::V15);
    primary.sql_blocking("CREATE TABLE t(i int); INSERT INTO t VALUES (1);");
    let backup_root = server_temp_dir("sb-standby-");
    let target = backup_root.path().join("data");
    // -R writes standby.signal and primary_conninfo.
    primary.run(
        "pg_basebackup",
        &[
            "-d",
            &primary.replication_conninfo(),
            "-D",
            target.to_str().unwrap(),
            "-X",
            "stream",
            "-R",
            "--checkpoint=fast",
            "--no-sync",
        ],
    );
    let standby = PgCluster::builder(PgVersion::V15)
        .existing_data_dir(&target)
        .extra_conf("hot_standby = on")
        .start();
    assert!(standby.is_in_recovery());
    primary.sql_blocking("INSERT INTO t VALUES (2)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while standby.query_one_blocking("SELECT count(*) FROM t") != "2" {
        assert!(
            std::time::Instant::now() < deadline,
            "standby did not replay"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    standby.query_one_blocking("SELECT pg_promote()");
    standby.wait_recovery_end(std::time::Duration::from_secs(30));
    standby.sql_blocking("INSERT INTO t VALUES (3)");
    assert_eq!(standby.query_one_blocking("SELECT count(*) FROM t"), "3");
}

#[test]
fn client_programs_run_as_the_server_user_against_the_cluster() {
    let pg = PgCluster::start(PgVersion::default_single());
    pg.run("pgbench", &["-i", "-s", "1", "-q"]);
    assert_eq!(
        pg.query_one_blocking("SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    let out = pg.run("psql", &["-X", "-A", "-t", "-c", "SELECT current_user"]);
    assert_eq!(out.trim(), "postgres");
}

#[tokio::test]
async fn async_helpers_work_inside_a_runtime() {
    let pg = PgCluster::start(PgVersion::default_single());
    let rows = pg.sql("SELECT 1, NULL::text UNION ALL SELECT 2, 'x'").await;
    assert_eq!(
        rows,
        vec![
            vec![Some("1".to_string()), None],
            vec![Some("2".to_string()), Some("x".to_string())]
        ]
    );
    // The blocking variants also work from inside a runtime.
    assert_eq!(pg.query_one_blocking("SELECT 40 + 2"), "42");
    let client = pg.connect().await;
    let row = client
        .query_one("SELECT $1::int + 1", &[&41i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // The replication role exists with REPLICATION and a SCRAM verifier.
    assert_eq!(
        pg.query_one("SELECT rolreplication FROM pg_roles WHERE rolname = 'replicator'")
            .await,
        "t"
    );
    assert!(pg
        .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'replicator'")
        .await
        .starts_with("SCRAM-SHA-256$"));
}
