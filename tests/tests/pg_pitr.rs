//! The PITR proof: with `postgres stream` running, a workload commits marker rows at a
//! steady rate before, during and after a base backup; for several targets T the restored
//! cluster holds exactly the markers whose transaction committed at or before T (commit
//! times from `track_commit_timestamp`, which records the commit record's own timestamp).
//! Also: after kill -9 of the primary during load, a restore of the latest point holds
//! every commit the repository acknowledged (synchronous mode).
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pg_pitr_support::{start_restored, Env, RestoreDirs};
use pg_support::text;
use syncbridge_tests::pg::{block_on, PgCluster, PgVersion};

/// (marker id, commit time) pairs.
type CommitTimes = Vec<(u32, DateTime<Utc>)>;

/// Inserts one marker per transaction every `every` until `stop` is set; returns the ids
/// whose commit was acknowledged.
fn workload(pg: &PgCluster, stop: &AtomicBool, next: &AtomicU32, every: Duration) -> Vec<u32> {
    block_on(async {
        let client = pg.connect().await;
        let mut acked = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let id = next.fetch_add(1, Ordering::SeqCst);
            match client
                .execute("INSERT INTO marker(id) VALUES ($1)", &[&(id as i32)])
                .await
            {
                Ok(_) => acked.push(id),
                Err(_) => break,
            }
            tokio::time::sleep(every).await;
        }
        acked
    })
}

/// (id, commit time) of every marker on the primary.
fn commit_times(pg: &PgCluster) -> Vec<(u32, DateTime<Utc>)> {
    pg.sql_blocking(
        "SELECT id, to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM marker ORDER BY id",
    )
    .into_iter()
    .map(|r| {
        let id: u32 = r[0].as_ref().unwrap().parse().unwrap();
        let t = DateTime::parse_from_rfc3339(r[1].as_ref().unwrap())
            .unwrap()
            .with_timezone(&Utc);
        (id, t)
    })
    .collect()
}

fn restored_ids(pg: &PgCluster) -> BTreeSet<u32> {
    pg.sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect()
}

fn restore_to(env: &Env, version: PgVersion, t: DateTime<Utc>, times: &[(u32, DateTime<Utc>)]) {
    let dirs = RestoreDirs::new();
    let ts = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let out = env.restore(&dirs.data(), &["--to-time", &ts]);
    assert!(
        out.status.success(),
        "{version}: restore to {ts} failed:\n{}",
        text(&out)
    );
    let restored = start_restored(version, &dirs.data());
    let got = restored_ids(&restored);
    let want: BTreeSet<u32> = times
        .iter()
        .filter(|(_, c)| *c <= t)
        .map(|(id, _)| *id)
        .collect();
    assert!(!want.is_empty());
    if got != want {
        let extra: Vec<_> = got.difference(&want).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        panic!(
            "{version}: restore to {ts}: {} markers, expected {}; extra {extra:?}, missing {missing:?}\n{}",
            got.len(),
            want.len(),
            text(&out)
        );
    }
    eprintln!(
        "{version}: restore to {ts}: exactly the {} markers committed at or before it",
        got.len()
    );
}

/// Runs the workload around a base backup and returns the commit times, plus the wall
/// times just before and after a segment switch made after the backup.
fn run_workload(
    env: &Env,
    before: Duration,
    after: Duration,
) -> (CommitTimes, DateTime<Utc>, DateTime<Utc>) {
    env.pg
        .sql_blocking("CREATE TABLE marker(id int primary key, pad text default repeat('m', 100))");
    let stop = AtomicBool::new(false);
    let next = AtomicU32::new(1);
    let switch = Mutex::new((Utc::now(), Utc::now()));
    std::thread::scope(|s| {
        let w = s.spawn(|| workload(&env.pg, &stop, &next, Duration::from_millis(10)));
        std::thread::sleep(before);
        env.backup(&["--chunk-mib", "4"]);
        std::thread::sleep(after / 2);
        let t0 = Utc::now();
        env.pg.query_one_blocking("SELECT pg_switch_wal()");
        let t1 = Utc::now();
        *switch.lock().unwrap() = (t0, t1);
        std::thread::sleep(after / 2);
        stop.store(true, Ordering::SeqCst);
        let acked = w.join().unwrap();
        assert!(acked.len() > 50, "workload too slow: {}", acked.len());
    });
    // One more commit so every target has a later commit to stop at, and all of it archived.
    env.pg
        .sql_blocking("INSERT INTO marker(id) VALUES (1000000)");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let times = commit_times(&env.pg);
    let (t0, t1) = *switch.lock().unwrap();
    (times, t0, t1)
}

fn pitr_env(version: PgVersion) -> Env {
    Env::new(
        PgCluster::builder(version)
            .wal_keep_size_mb(1024)
            .extra_conf("track_commit_timestamp = on"),
    )
}

fn pitr_proof(version: PgVersion, full: bool) {
    let env = pitr_env(version);
    let (before, after) = if full {
        (Duration::from_secs(3), Duration::from_secs(8))
    } else {
        (Duration::from_secs(1), Duration::from_secs(3))
    };
    let started = Instant::now();
    let (times, switch_before, switch_after) = run_workload(&env, before, after);
    eprintln!(
        "{version}: {} markers in {:.1}s",
        times.len(),
        started.elapsed().as_secs_f64()
    );
    let workload: Vec<_> = times
        .iter()
        .filter(|(id, _)| *id < 1_000_000)
        .cloned()
        .collect();
    // Long after the backup: exactly at a commit time (inclusive), near the end.
    let late = workload[workload.len() - 5].1;
    restore_to(&env, version, late, &times);
    if full {
        // Just before the segment switch: midway between the last two commits before it.
        let pre: Vec<_> = workload
            .iter()
            .filter(|(_, c)| *c < switch_before)
            .collect();
        let a = pre[pre.len() - 2].1;
        let b = pre[pre.len() - 1].1;
        restore_to(&env, version, a + (b - a) / 2, &times);
        // Right after the switch: the first commit after it.
        let post = workload.iter().find(|(_, c)| *c > switch_after).unwrap().1;
        restore_to(&env, version, post, &times);
        // --to-xid: one writer, so the markers up to that transaction's are exactly kept.
        let (id, _) = workload[workload.len() * 3 / 4];
        let xid = env
            .pg
            .query_one_blocking(&format!("SELECT xmin::text FROM marker WHERE id = {id}"));
        let dirs = RestoreDirs::new();
        let out = env.restore(&dirs.data(), &["--to-xid", &xid]);
        assert!(
            out.status.success(),
            "restore to xid {xid}:\n{}",
            text(&out)
        );
        let restored = start_restored(version, &dirs.data());
        let got = restored_ids(&restored);
        let want: BTreeSet<u32> = times
            .iter()
            .filter(|(i, _)| *i <= id)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(got, want, "{version}: restore to xid {xid} (marker {id})");
        eprintln!("{version}: restore to xid {xid}: exactly markers 1..={id}");
    }
}

#[test]
fn pg17_pitr_proof_three_targets() {
    pitr_proof(PgVersion::V17, true);
}

#[test]
fn pg14_pitr_proof() {
    pitr_proof(PgVersion::V14, false);
}

#[test]
fn pg15_pitr_proof() {
    pitr_proof(PgVersion::V15, false);
}

#[test]
fn pg16_pitr_proof() {
    pitr_proof(PgVersion::V16, false);
}

#[test]
fn pg18_pitr_proof() {
    pitr_proof(PgVersion::V18, false);
}

/// Synchronous streaming: a commit returns only once its WAL is in the repository. Kill -9
/// the primary during load; the latest restore holds every acknowledged commit.
#[test]
fn pg17_kill9_primary_latest_restore_has_every_acknowledged_commit() {
    let version = PgVersion::V17;
    // synchronous_standby_names is set once the synchronous stream runs (the harness's own
    // set-up commits would otherwise wait for it).
    let mut env = Env::new(PgCluster::builder(version).wal_keep_size_mb(1024));
    // Restart the stream in synchronous mode.
    drop(env.stream.take());
    let url = env.pg.replication_url();
    let repo = env.repo_url();
    env.stream = Some(pg_support::AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &url,
            "--repo",
            &repo,
            "--synchronous",
        ],
        env.dir.path().join("stream-sync.log"),
    ));
    env.pg
        .sql_blocking("ALTER SYSTEM SET synchronous_standby_names = 'syncbridge'");
    env.pg.sql_blocking("SELECT pg_reload_conf()");
    let sync = pg_support::wait_until(Duration::from_secs(60), || {
        env.pg.query_one_blocking(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'syncbridge' AND sync_state = 'sync'",
        ) == "1"
    });
    assert!(
        sync,
        "the stream never became a synchronous standby:\n{}",
        env.stream_log()
    );
    env.pg
        .sql_blocking("CREATE TABLE marker(id int primary key, pad text default repeat('k', 100))");
    env.backup(&[]);
    let stop = AtomicBool::new(false);
    let next = AtomicU32::new(1);
    let acked = std::thread::scope(|s| {
        let w = s.spawn(|| workload(&env.pg, &stop, &next, Duration::from_millis(2)));
        std::thread::sleep(Duration::from_secs(3));
        // SIGKILL the postmaster (the workload still holds the cluster; its backends see
        // the postmaster die and exit).
        let pid = env.pg.pid().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        stop.store(true, Ordering::SeqCst);
        w.join().unwrap()
    });
    assert!(
        acked.len() > 20,
        "only {} commits acknowledged",
        acked.len()
    );
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(
        out.status.success(),
        "restore failed:\n{}\n{}",
        text(&out),
        env.stream_log()
    );
    // The copied configuration would make the restored server wait for a synchronous standby.
    let conf = dirs.data().join("postgresql.auto.conf");
    let mut text_conf = std::fs::read_to_string(&conf).unwrap();
    text_conf.push_str("\nsynchronous_standby_names = ''\n");
    std::fs::write(&conf, text_conf).unwrap();
    let restored = start_restored(version, &dirs.data());
    let got = restored_ids(&restored);
    let missing: Vec<_> = acked.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged commits missing after restore: {missing:?} (restored {} of {} acknowledged)",
        got.len(),
        acked.len()
    );
    eprintln!(
        "{version}: kill -9 during load: all {} acknowledged commits restored ({} rows)",
        acked.len(),
        got.len()
    );
}
