//! A segment object that is not the WAL its key names never reaches PostgreSQL, and a
//! restore never promotes a cluster that is missing WAL (issue 11, cases 1–3):
//!
//! 1. two complete segment objects swapped (files renamed on disk, and re-stored under
//!    each other's key through the storage crate);
//! 2. a valid segment of another cluster (another `initdb`) under this repository's key;
//! 3. a valid 8 KiB object under a complete segment's key.
//!
//! For each: `postgres wal-fetch` exits 200 naming the segment and the field; `restore
//! --start` exits non-zero; a restore started by hand stops with FATAL and never promotes.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bytes::Bytes;
use pg_pitr_support::{Env, RestoreDirs};
use pg_support::{agent, text, wait_until};
use storage::layout;
use storage::{ContentKind, PutMode, RepoOptions, Repository};
use syncbridge_tests::pg::{block_on, PgCluster, PgVersion};
use syncbridge_tests::process::{free_port, run_as_server_user, server_temp_dir};

const VERSION: PgVersion = PgVersion::V15;
const SEG: usize = 16 << 20;

/// A source with a base backup and, after it, `SWITCHES` completed segments each holding
/// one committed row.
struct Fixture {
    env: Env,
    /// Segments completed after the backup, oldest first; recovery needs every one.
    after_backup: Vec<String>,
    /// Rows on the source.
    rows: u64,
}

const SWITCHES: usize = 6;

fn fixture() -> Fixture {
    let env = Env::simple(VERSION);
    env.pg.sql_blocking(
        "CREATE TABLE t(id int, pad text); INSERT INTO t SELECT g, 'base' FROM generate_series(1, 1000) g",
    );
    env.backup(&[]);
    let mut after_backup = Vec::new();
    for i in 0..SWITCHES {
        env.pg
            .sql_blocking(&format!("INSERT INTO t VALUES ({}, 'after')", 2000 + i));
        after_backup.push(
            env.pg
                .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())"),
        );
    }
    env.pg.sql_blocking("INSERT INTO t VALUES (9999, 'tail')");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let rows = env
        .pg
        .query_one_blocking("SELECT count(*) FROM t")
        .parse()
        .unwrap();
    Fixture {
        env,
        after_backup,
        rows,
    }
}

/// Runs a storage future on a fresh current-thread runtime.
fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn repo(env: &Env) -> Repository {
    Repository::open(&env.repo_url(), RepoOptions::default()).unwrap()
}

fn segment_key(name: &str) -> storage::RepoKey {
    layout::wal_segment(&layout::WalSegmentName::parse(name).unwrap())
}

fn segment_path(env: &Env, name: &str) -> PathBuf {
    env.repo_path().join(segment_key(name).to_string())
}

/// Stores `data` under `name`'s key as a valid object (written for that key).
fn put_segment(env: &Env, name: &str, data: Bytes) {
    run(repo(env).put(
        &segment_key(name),
        ContentKind::WalSegment,
        data,
        PutMode::Overwrite,
    ))
    .unwrap();
}

fn get_segment(env: &Env, name: &str) -> Bytes {
    run(repo(env).get(&segment_key(name))).unwrap()
}

/// `postgres wal-fetch [EXTRA] NAME DIR/NAME`, as a hand-written `restore_command` runs it
/// (`restore` adds `--segment-size` and `--pg-version`). Returns the output and the size
/// of what it wrote (None: nothing).
fn wal_fetch(env: &Env, name: &str, extra: &[&str]) -> (Output, Option<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join(name);
    let out = agent()
        .args([
            "postgres",
            "wal-fetch",
            "--repo",
            &env.repo_url(),
            "--prefetch",
            "0",
        ])
        .args(extra)
        .arg(name)
        .arg(&target)
        .output()
        .unwrap();
    (out, std::fs::metadata(&target).ok().map(|m| m.len()))
}

/// wal-fetch exits 200, writes nothing, and names the segment and (when given) the field.
fn assert_refused(env: &Env, name: &str, field: Option<&str>) -> String {
    let (out, written) = wal_fetch(env, name, &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(200), "{}", text(&out));
    assert_eq!(written, None, "wal-fetch wrote {name} although it failed");
    assert!(err.contains(name), "the error does not name {name}:\n{err}");
    if let Some(f) = field {
        assert!(
            err.contains(f),
            "the error does not name the field {f}:\n{err}"
        );
    }
    eprintln!(
        "wal-fetch {name}: {}",
        err.lines().next().unwrap_or_default()
    );
    err
}

/// `repo check` fails, naming the segment's object and `what` (the binding or the field).
fn assert_repo_check_fails(env: &Env, name: &str, what: &str) {
    let url = env.repo_url();
    let out = agent()
        .args(["repo", "check", "--repo", &url, "postgres/wal"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAILED") && l.contains(name) && l.contains(what)),
        "repo check does not name {name} and {what}:\n{stdout}"
    );
}

/// `restore --start` fails naming the segment and the field; the server it may have
/// started is stopped.
fn assert_restore_start_fails(env: &Env, victim: &str, field: &str) {
    let dirs = RestoreDirs::new();
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        dirs.parent.path().display()
    );
    let bin = env.pg.bin_dir().display().to_string();
    let out = env.restore(
        &dirs.data(),
        &[
            "--start",
            &bin,
            "--start-options",
            &opts,
            "--start-timeout",
            "120s",
        ],
    );
    stop_server(env, &dirs.data());
    assert!(
        !out.status.success(),
        "restore --start succeeded over a damaged segment:\n{}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains(victim) && err.contains(field),
        "restore --start does not name {victim} and {field}:\n{}",
        text(&out)
    );
    eprintln!(
        "restore --start: {}",
        err.lines().find(|l| l.contains(victim)).unwrap_or_default()
    );
}

fn stop_server(env: &Env, data: &Path) {
    let mut stop = Command::new(env.pg.bin_dir().join("pg_ctl"));
    stop.arg("-D").arg(data).args(["-m", "immediate", "stop"]);
    run_as_server_user(&mut stop);
    let _ = stop.output();
}

fn server_running(env: &Env, data: &Path) -> bool {
    let mut status = Command::new(env.pg.bin_dir().join("pg_ctl"));
    status.arg("-D").arg(data).arg("status");
    run_as_server_user(&mut status);
    status.output().unwrap().status.success()
}

/// `restore` without `--start`, then `pg_ctl start` by hand: recovery stops with FATAL at
/// the damaged segment and the server never promotes (so it never serves fewer rows as
/// if it were the whole cluster).
fn assert_hand_start_never_promotes(fx: &Fixture, victim: &str) {
    let dirs = RestoreDirs::new();
    let out = fx.env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    start_by_hand_expecting_fatal(
        fx,
        &dirs.data(),
        &format!("could not restore file \"{victim}\""),
    );
}

/// Starts a restored directory with `pg_ctl` and checks that the server stops by itself
/// with `fatal` in its log, without ever promoting.
fn start_by_hand_expecting_fatal(fx: &Fixture, data: &Path, fatal: &str) {
    let env = &fx.env;
    let log = data.join("hand-start.log");
    let sockets = server_temp_dir("sb-sock-");
    let port = free_port();
    let mut start = Command::new(env.pg.bin_dir().join("pg_ctl"));
    start
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            sockets.path().display()
        ))
        .args(["-t", "120", "start"]);
    run_as_server_user(&mut start);
    let started = start.output().unwrap();
    // pg_ctl reports failure when the postmaster exits during recovery; either way, wait
    // for the server to be gone.
    let gone = wait_until(Duration::from_secs(120), || !server_running(env, data));
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    if !gone {
        stop_server(env, data);
    }
    assert!(
        gone,
        "the server is still running after the damaged WAL:\n{log_text}"
    );
    assert!(
        !log_text.contains("selected new timeline ID")
            && !log_text.contains("database system is ready to accept connections"),
        "the server promoted (source had {} rows):\n{log_text}",
        fx.rows
    );
    assert!(
        !data.join("pg_wal/00000002.history").exists(),
        "a new timeline was created:\n{log_text}"
    );
    assert!(
        log_text.contains(fatal),
        "recovery did not stop with {fatal:?}:\n{log_text}\npg_ctl: {}",
        text(&started)
    );
    eprintln!(
        "hand start: {}",
        log_text
            .lines()
            .find(|l| l.contains("FATAL"))
            .unwrap_or_default()
    );
}

/// Deliver 3 on its own: restore plans the latest point, then a segment it planned with
/// disappears (wal-fetch answers "not archived", exit 1, as for any missing file).
/// PostgreSQL was given the planned end as its target, so it fails instead of promoting
/// at the hole.
#[test]
fn pg15_wal_lost_after_planning_never_promotes() {
    let fx = fixture();
    let dirs = RestoreDirs::new();
    let out = fx.env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let victim = &fx.after_backup[2];
    std::fs::remove_file(segment_path(&fx.env, victim)).unwrap();
    let (out, written) = wal_fetch(&fx.env, victim, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(written, None);
    start_by_hand_expecting_fatal(
        &fx,
        &dirs.data(),
        "recovery ended before configured recovery target was reached",
    );
}

/// Case 1: segments swapped. Renaming the files on disk swaps the objects (whatever the
/// container says about its key, the storage layer or the WAL check refuses it); storing
/// each one's bytes under the other's key through the storage crate leaves only the WAL
/// check to notice, which names `xlp_pageaddr`.
#[test]
fn pg15_swapped_segments_are_refused() {
    let fx = fixture();
    let env = &fx.env;
    let (a, b) = (&fx.after_backup[2], &fx.after_backup[3]);
    let (pa, pb) = (segment_path(env, a), segment_path(env, b));
    let tmp = pa.with_extension("swap");
    std::fs::rename(&pa, &tmp).unwrap();
    std::fs::rename(&pb, &pa).unwrap();
    std::fs::rename(&tmp, &pb).unwrap();
    // The mismatched field is the key in the header: each names the other segment.
    for (asked, holds) in [(a, b), (b, a)] {
        let err = assert_refused(env, asked, Some("written for"));
        assert!(
            err.contains(holds.as_str()),
            "does not name {holds}:\n{err}"
        );
    }
    assert_repo_check_fails(env, a, "written for");
    // Put back, then swap through the storage crate: valid objects under the wrong keys.
    std::fs::rename(&pa, &tmp).unwrap();
    std::fs::rename(&pb, &pa).unwrap();
    std::fs::rename(&tmp, &pb).unwrap();
    let (da, db) = (get_segment(env, a), get_segment(env, b));
    put_segment(env, a, db);
    put_segment(env, b, da);
    assert_refused(env, a, Some("xlp_pageaddr"));
    assert_refused(env, b, Some("xlp_pageaddr"));
    assert_repo_check_fails(env, a, "xlp_pageaddr");
    assert_restore_start_fails(env, a, "xlp_pageaddr");
    assert_hand_start_never_promotes(&fx, a);
}

/// Case 2: a valid segment of another cluster, at the same position, under this
/// repository's key: only the system identifier differs.
#[test]
fn pg15_segment_of_another_cluster_is_refused() {
    let fx = fixture();
    let env = &fx.env;
    let victim = fx.after_backup[2].clone();
    let other = PgCluster::builder(VERSION).wal_keep_size_mb(1024).start();
    let mut completed = String::new();
    for i in 0..64 {
        other.sql_blocking(&format!(
            "CREATE TABLE IF NOT EXISTS o(i int); INSERT INTO o VALUES ({i})"
        ));
        completed = other.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
        if completed >= victim {
            break;
        }
    }
    assert_eq!(
        completed, victim,
        "the other cluster never reached {victim}"
    );
    let foreign = std::fs::read(other.pg_wal_dir().join(&victim)).unwrap();
    assert_eq!(foreign.len(), SEG);
    let theirs = other.query_one_blocking("SELECT system_identifier FROM pg_control_system()");
    let ours = env
        .pg
        .query_one_blocking("SELECT system_identifier FROM pg_control_system()");
    assert_ne!(theirs, ours);
    drop(other);
    put_segment(env, &victim, Bytes::from(foreign));
    let err = assert_refused(env, &victim, Some("xlp_sysid"));
    assert!(err.contains(&theirs) && err.contains(&ours), "{err}");
    assert_repo_check_fails(env, &victim, "xlp_sysid");
    assert_restore_start_fails(env, &victim, "xlp_sysid");
    assert_hand_start_never_promotes(&fx, &victim);
}

/// Case 3: the first 8 KiB of a segment (a valid object, a valid page header) stored under
/// the complete segment's key: refused for its length, never zero-padded.
#[test]
fn pg15_short_object_under_a_complete_segment_is_refused() {
    let fx = fixture();
    let env = &fx.env;
    let victim = fx.after_backup[2].clone();
    let whole = get_segment(env, &victim);
    assert_eq!(whole.len(), SEG);
    put_segment(env, &victim, whole.slice(..8192));
    assert_refused(env, &victim, Some("length"));
    assert_repo_check_fails(env, &victim, "length");
    assert_restore_start_fails(env, &victim, "field length");
    assert_hand_start_never_promotes(&fx, &victim);
}

/// The intact repository still restores everything, and `restore --start` reports the
/// position it planned and reached (the last complete archived record).
#[test]
fn pg15_intact_wal_restores_to_the_planned_end() {
    let fx = fixture();
    let env = &fx.env;
    // Every segment after the backup passes wal-fetch's checks, with and without hints.
    let seg = SEG.to_string();
    for name in &fx.after_backup {
        for extra in [&[][..], &["--segment-size", &seg, "--pg-version", "15"][..]] {
            let (out, written) = wal_fetch(env, name, extra);
            assert!(out.status.success(), "{}", text(&out));
            assert_eq!(written, Some(SEG as u64));
        }
    }
    // With prefetching, the fetched file and the spool are the server user's alone (0600
    // files, 0700 directories), whatever the umask.
    {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("RECOVERYXLOG");
        let out = agent()
            .args([
                "postgres",
                "wal-fetch",
                "--repo",
                &env.repo_url(),
                "--prefetch",
                "2",
            ])
            .arg(&fx.after_backup[0])
            .arg(&target)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let spool_root = dir.path().join(".syncbridge-prefetch");
        let next = &fx.after_backup[1];
        let spooled = || {
            std::fs::read_dir(&spool_root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join(next))
                .find(|p| p.exists())
        };
        assert!(
            wait_until(Duration::from_secs(60), || spooled().is_some()),
            "{next} was never prefetched"
        );
        let file = spooled().unwrap();
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&target), 0o600);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert_eq!(mode(&spool_root), 0o700);
        // Stop the prefetcher: it exits once its spool is gone. It may be writing the
        // next segment while we delete, so removal is retried until the tree stays gone.
        assert!(
            wait_until(Duration::from_secs(30), || {
                std::fs::remove_dir_all(&spool_root).is_ok() || !spool_root.exists()
            }),
            "the prefetch spool could not be removed"
        );
    }
    // WAL of the right cluster but the wrong version or segment size is refused by name.
    let first = &fx.after_backup[0];
    for (extra, field) in [
        (&["--pg-version", "16"][..], "xlp_magic"),
        (&["--segment-size", "1048576"][..], "xlp_seg_size"),
    ] {
        let (out, written) = wal_fetch(env, first, extra);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(200), "{}", text(&out));
        assert!(
            written.is_none() && err.contains(first) && err.contains(field),
            "{err}"
        );
    }

    let dirs = RestoreDirs::new();
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        dirs.parent.path().display()
    );
    let bin = env.pg.bin_dir().display().to_string();
    let out = env.restore(&dirs.data(), &["--start", &bin, "--start-options", &opts]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let auto =
        std::fs::read_to_string(dirs.data().join("postgresql.auto.conf")).unwrap_or_default();
    let count = block_on(async {
        let conn = format!(
            "host=127.0.0.1 port={port} user={} password={} dbname=postgres",
            syncbridge_tests::pg::SUPERUSER,
            syncbridge_tests::pg::SUPERUSER_PASSWORD
        );
        match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                let row = client
                    .query_one("SELECT count(*) FROM t", &[])
                    .await
                    .unwrap();
                Some(row.get::<_, i64>(0) as u64)
            }
            Err(_) => None,
        }
    });
    stop_server(env, &dirs.data());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(count, Some(fx.rows), "{stdout}");
    assert!(auto.contains("recovery_target_lsn = '"), "{auto}");
    assert!(auto.contains("--pg-version 15"), "{auto}");
    assert!(
        stdout.contains("the last complete record") && stdout.contains("reached:"),
        "{stdout}"
    );
    eprintln!(
        "{}",
        stdout
            .lines()
            .filter(|l| l.starts_with("target:") || l.starts_with("reached:"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // History files: timeline 3's history stored as timeline 2's is refused, naming it;
    // a history that ends at the parent is served.
    let history_key = layout::timeline_history(layout::TimelineId::new(2).unwrap());
    let put = |content: &'static [u8]| {
        run(repo(env).put(
            &history_key,
            ContentKind::TimelineHistory,
            Bytes::from_static(content),
            PutMode::Overwrite,
        ))
        .unwrap();
    };
    put(b"1\t0/5000100\tno recovery target specified\n2\t0/6000000\tx\n");
    let (out, written) = wal_fetch(env, "00000002.history", &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(200), "{}", text(&out));
    assert!(
        written.is_none() && err.contains("00000002.history") && err.contains("history"),
        "{err}"
    );
    put(b"1\t0/5000100\tno recovery target specified\n");
    let (out, written) = wal_fetch(env, "00000002.history", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(written.is_some());
}
