//! Smoke tests of the PostgreSQL part of the harness: every version starts, answers SQL with
//! the expected major version and accepts a replication connection.
#![allow(clippy::unwrap_used)]

use syncbridge_tests::pg::{PgCluster, PgVersion};

fn smoke(version: PgVersion) {
    let pg = PgCluster::start(version);
    let banner = pg.query_one_blocking("SELECT version()");
    assert!(
        banner.starts_with(&format!("PostgreSQL {}.", version.major())),
        "{version}: version() = {banner}"
    );
    let num: u32 = pg
        .query_one_blocking("SHOW server_version_num")
        .parse()
        .unwrap();
    assert_eq!(num / 10000, version.major());
    assert_eq!(pg.query_one_blocking("SHOW wal_level"), "replica");

    // A physical replication connection as the replication role, over TCP with SCRAM.
    let out = pg
        .command("psql")
        .arg(format!(
            "{} replication=database",
            pg.replication_conninfo()
        ))
        .args(["-X", "-A", "-t", "-F", "|", "-c", "IDENTIFY_SYSTEM"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{version}: IDENTIFY_SYSTEM failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = stdout.trim().split('|').collect();
    assert_eq!(fields.len(), 4, "IDENTIFY_SYSTEM row: {stdout}");
    let sysid = pg.query_one_blocking("SELECT system_identifier FROM pg_control_system()");
    assert_eq!(fields[0], sysid, "system identifier");
    assert_eq!(fields[1], "1", "timeline");
    assert!(fields[2].contains('/'), "xlogpos {}", fields[2]);
}

#[test]
fn pg14_answers_sql_and_replication() {
    smoke(PgVersion::V14);
}

#[test]
fn pg15_answers_sql_and_replication() {
    smoke(PgVersion::V15);
}

#[test]
fn pg16_answers_sql_and_replication() {
    smoke(PgVersion::V16);
}

#[test]
fn pg17_answers_sql_and_replication() {
    smoke(PgVersion::V17);
}

#[test]
fn pg18_answers_sql_and_replication() {
    smoke(PgVersion::V18);
}
