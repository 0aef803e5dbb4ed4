//! `restore` refuses, before writing anything, what it cannot restore honestly — and a
//! damaged base backup object stops the restore before PostgreSQL could start, naming it.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use std::path::Path;

use pg_pitr_support::{Env, RestoreDirs};
use pg_support::text;
use syncbridge_tests::pg::PgVersion;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn backup_id(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("backup:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn untouched(dir: &Path) -> bool {
    !dir.exists() || std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Commits a row and switches WAL `n` times; returns the last segment completed.
fn switch_segments(env: &Env, n: usize) -> String {
    let mut last = String::new();
    for i in 0..n {
        env.pg.sql_blocking(&format!(
            "CREATE TABLE IF NOT EXISTS t(id int, at timestamptz); INSERT INTO t VALUES ({i}, now())"
        ));
        last = env
            .pg
            .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    }
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    last
}

#[test]
fn refusals_name_the_missing_piece() {
    let env = Env::simple(PgVersion::V16);
    let dirs = RestoreDirs::new();

    // Nothing to restore yet.
    let out = env.restore(&dirs.data(), &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no complete base backup")
            || stderr(&out).contains("not a SyncBridge repository"),
        "{}",
        text(&out)
    );

    switch_segments(&env, 1);
    let before_backup = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let out = env.backup(&[]);
    let id = backup_id(&out);
    switch_segments(&env, 4);

    // Earlier than the oldest backup.
    let t = before_backup.to_rfc3339();
    let out = env.restore(&dirs.data(), &["--to-time", &t]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("earlier than the oldest backup") && stderr(&out).contains(&id),
        "{}",
        text(&out)
    );
    assert!(untouched(&dirs.data()));

    // Beyond the archived WAL: says the latest restorable time.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let out = env.restore(&dirs.data(), &["--to-time", &future]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("latest restorable time is"),
        "{}",
        text(&out)
    );
    assert!(untouched(&dirs.data()));

    // A non-empty target without --force.
    std::fs::create_dir_all(dirs.data()).unwrap();
    std::fs::write(dirs.data().join("keep-me"), b"x").unwrap();
    let out = env.restore(&dirs.data(), &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not empty"), "{}", text(&out));
    assert!(dirs.data().join("keep-me").exists());
    std::fs::remove_file(dirs.data().join("keep-me")).unwrap();

    // Delete a segment after the backup: the latest point needs it.
    let wal_dir = env.repo_path().join("postgres/wal/00000001");
    let mut segs: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.len() == 24)
        .collect();
    segs.sort();
    let victim = segs[segs.len() - 2].clone();
    std::fs::remove_file(wal_dir.join(&victim)).unwrap();
    // `list` shows the backup and the hole.
    let listing = pg_support::agent()
        .args(["list", "--repo", &env.repo_url()])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(listing.status.success(), "{}", text(&listing));
    assert!(
        listed.contains(&id) && listed.contains("HOLE") && listed.contains(&victim),
        "{listed}"
    );
    let out = env.restore(&dirs.data(), &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&victim) && stderr(&out).contains("missing"),
        "{}",
        text(&out)
    );
    assert!(untouched(&dirs.data()));
    let out = env.restore(&dirs.data(), &["--to-time", &future]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&victim), "{}", text(&out));
    assert!(untouched(&dirs.data()));
    eprintln!("refusal: {}", stderr(&out));
}

#[test]
fn corrupt_backup_object_fails_before_start_naming_it() {
    let env = Env::simple(PgVersion::V15);
    env.pg.sql_blocking(
        "CREATE TABLE big(id int, pad text); INSERT INTO big SELECT g, repeat('y', 300) FROM generate_series(1, 40000) g",
    );
    let out = env.backup(&["--chunk-mib", "2"]);
    let id = backup_id(&out);
    let data = env.repo_path().join("postgres/base").join(&id).join("data");
    let mut objects: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    objects.sort();
    assert!(objects.len() >= 3, "{objects:?}");
    let victim = objects[objects.len() / 2].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&victim, &bytes).unwrap();

    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        err.contains(&format!("postgres/base/{id}/data/{name}")),
        "error does not name the object:\n{err}"
    );
    assert!(err.contains("base/"), "error does not name a file:\n{err}");
    // Not startable: no pg_control, the in-progress marker is there.
    assert!(!dirs.data().join("global/pg_control").exists());
    assert!(dirs.data().join("syncbridge-restore.in-progress").exists());
}

/// Without the stream the backup's WAL never arrives: the backup says so after the bounded
/// wait, writes no backup.json, and restore never picks it.
#[test]
fn backup_without_wal_is_left_incomplete() {
    let mut env = Env::simple(PgVersion::V15);
    env.pg.sql_blocking("CREATE TABLE t(id int)");
    env.pg.query_one_blocking("SELECT pg_switch_wal()");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    drop(env.stream.take());
    let out = env.try_backup(&["--wal-timeout-secs", "3"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("postgres stream") && err.contains("incomplete") && err.contains("missing"),
        "{err}"
    );
    let listing = pg_support::agent()
        .args(["list", "--repo", &env.repo_url()])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listing.stdout).to_string();
    assert!(listed.contains("incomplete"), "{listed}");
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no complete base backup"),
        "{}",
        text(&out)
    );
    eprintln!("refusal: {err}");
}
