//! Case 7, second part: one writer per stream. Two `redis stream` on one repository, and
//! two `postgres stream` on one repository and timeline (different slots): the second
//! waits, naming the holder. Frozen (SIGSTOP, just after a renewal), the first stops
//! renewing its lease and the second takes over once it expires; woken up, the first notices it lost the lease,
//! writes nothing more and waits in turn. Killed with -9, the holder is replaced by the
//! waiter. Across both handovers the chain does not fork (`redis verify`) and the
//! point-in-time proof holds.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pg_pitr_support::{start_restored, Env, RestoreDirs};
use pg_support::{wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::process::server_temp_dir;
use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespConnection, RespValue};

/// Short leases so a takeover takes seconds (renewed every second).
const LEASE_SECS: u64 = 3;

/// The waiter's rule: it takes over only after the lease record it watches went a whole
/// lease without a change (its "was not renewed for N s" line). Measured from the freeze
/// instead, a takeover can come sooner on a loaded machine, when the holder's last renewal
/// ran late; the holder stops writing `renew_every` before that (storage/src/lease.rs).
fn assert_took_over_after_a_whole_lease(log: &str) {
    let secs: f64 = log
        .lines()
        .find_map(|l| {
            let rest = l.split("was not renewed for ").nth(1)?;
            rest.split('s').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no takeover line in\n{log}"));
    assert!(
        secs >= LEASE_SECS as f64,
        "took over after the lease was unchanged for only {secs} s\n{log}"
    );
}

/// The least time from the holder's last renewal to a takeover.
const MIN_TAKEOVER: Duration = Duration::from_secs(LEASE_SECS);

fn lease_env() -> Vec<(String, String)> {
    vec![(
        "SYNCBRIDGE_STREAM_LEASE_SECS".into(),
        LEASE_SECS.to_string(),
    )]
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Freezes `pid` (SIGSTOP) just after one of its lease renewals landed in `lease_dir`, and
/// returns the last instant at which the previous renewal was still the current object: no
/// waiter can have seen the final renewal before then, so none may take over earlier than
/// a lease's duration after it, however late a loaded machine made the renewals.
fn freeze_right_after_a_renewal(lease_dir: &std::path::Path, pid: u32) -> Instant {
    let current = || {
        let mut objects: Vec<_> = std::fs::read_dir(lease_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        objects.sort();
        objects.pop().map(|p| {
            let bytes = std::fs::read(&p).ok();
            (p, bytes)
        })
    };
    let seen = current();
    let mut before_landing = Instant::now();
    let deadline = before_landing + Duration::from_secs(60);
    loop {
        let now = Instant::now();
        if current() != seen {
            signal(pid, Signal::SIGSTOP);
            return before_landing;
        }
        before_landing = now;
        assert!(
            Instant::now() < deadline,
            "the lease in {} was never renewed",
            lease_dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn log_count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

// ------------------------------------------------------------------------------------
// Redis
// ------------------------------------------------------------------------------------

fn ok(c: &mut RespConnection, args: &[&str]) {
    let r = c.cmd(args).unwrap();
    assert!(!matches!(r, RespValue::Error(_)), "{args:?} -> {r}");
}

fn redis_phase(c: &mut RespConnection, phase: usize) {
    for i in 0..30 {
        ok(c, &["SET", &format!("marker:{phase}:{i}"), &i.to_string()]);
        ok(c, &["INCR", "counter"]);
    }
    ok(c, &["RPUSH", "list", &format!("p{phase}")]);
    ok(c, &["MULTI"]);
    ok(c, &["SET", &format!("tx:{phase}"), "1"]);
    ok(c, &["INCR", "counter"]);
    ok(c, &["EXEC"]);
}

fn redis_restore(
    repo: &str,
    target: &std::path::Path,
    to: Option<i64>,
) -> redis_support::RestoredServer {
    let target_s = target.display().to_string();
    let bin = redis_support::server_bin(RedisFlavor::Redis7);
    let to_arg = to.map(|t| format!("@{t}"));
    let mut args = vec![
        "redis", "restore", "--repo", repo, "--target", &target_s, "--start", &bin,
    ];
    if let Some(t) = &to_arg {
        args.extend(["--to-time", t.as_str()]);
    }
    let out = redis_support::run_agent(&args, &[]);
    let server = redis_support::RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", redis_support::text(&out));
    server.unwrap_or_else(|| redis_support::RestoredServer::from_output(&out))
}

#[test]
fn two_redis_streams_one_writer_handover_keeps_the_chain_and_pitr() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", tmp.path().join("repo").display());
    let env = lease_env();
    let start = |name: &str| {
        redis_support::StreamingAgent::start(
            &server.url(),
            &repo,
            "200ms",
            &env,
            tmp.path().join(name),
        )
    };
    let mut c = server.connect();
    ok(&mut c, &["SET", "before-agent", "1"]);
    let mut a = start("a.log");
    a.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut b = start("b.log");
    b.wait_for_log(
        "another writer holds the redis stream lease",
        Duration::from_secs(30),
    );
    let a_pid = a.pid();
    assert!(
        b.log_text().contains(&format!("pid {a_pid}")),
        "{}",
        b.log_text()
    );

    let mut targets: Vec<(i64, BTreeMap<String, String>)> = Vec::new();
    let target = |targets: &mut Vec<_>| {
        std::thread::sleep(Duration::from_millis(500));
        targets.push((redis_support::now_ms(), redis_support::dump(&server)));
        std::thread::sleep(Duration::from_millis(500));
    };
    redis_phase(&mut c, 0);
    target(&mut targets);
    assert!(
        !b.log_text().contains("resumed with PSYNC"),
        "{}",
        b.log_text()
    );

    // A frozen (after a quiet second, so no upload is in flight): B takes over once the
    // lease expires.
    std::thread::sleep(Duration::from_secs(1));
    let frozen = freeze_right_after_a_renewal(&tmp.path().join("repo/leases/redis-stream"), a_pid);
    redis_phase(&mut c, 1);
    b.wait_for_log("was not renewed for", Duration::from_secs(30));
    assert!(
        frozen.elapsed() >= MIN_TAKEOVER,
        "took over after {:?}",
        frozen.elapsed()
    );
    assert_took_over_after_a_whole_lease(&b.log_text());
    b.wait_for_log("resumed with PSYNC", Duration::from_secs(30));
    target(&mut targets);

    // A wakes up: it lost the lease, stops writing and waits in turn.
    signal(a_pid, Signal::SIGCONT);
    a.wait_for_log("lost the", Duration::from_secs(30));
    a.wait_for_log(
        "another writer holds the redis stream lease",
        Duration::from_secs(30),
    );
    redis_phase(&mut c, 2);
    target(&mut targets);

    // kill -9 the holder: A takes over.
    b.kill9();
    a.wait_for_log("taking over", Duration::from_secs(30));
    a.wait_for_log("resumed with PSYNC", Duration::from_secs(30));
    redis_phase(&mut c, 3);
    target(&mut targets);
    redis_phase(&mut c, 4);
    std::thread::sleep(Duration::from_millis(800));
    assert!(a.terminate(), "{}", a.log_text());
    let final_state = redis_support::dump(&server);
    // One generation: every handover resumed with PSYNC, no new snapshot.
    assert_eq!(
        log_count(&a.log_text(), "snapshot stored") + log_count(&b.log_text(), "snapshot stored"),
        1,
        "A:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );

    let out = redis_support::run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", redis_support::text(&out));
    for (i, (t, expected)) in targets.iter().enumerate() {
        let restored = redis_restore(&repo, &tmp.path().join(format!("at{i}")), Some(*t));
        let got = redis_support::dump_port(restored.port, None);
        assert_eq!(&got, expected, "state at target {i}");
    }
    let restored = redis_restore(&repo, &tmp.path().join("latest"), None);
    assert_eq!(redis_support::dump_port(restored.port, None), final_state);
}

// ------------------------------------------------------------------------------------
// PostgreSQL
// ------------------------------------------------------------------------------------

fn pg_stream(env: &Env, slot: &str, log: &str) -> AgentProcess {
    let src = env.pg.replication_url();
    let repo = env.repo_url();
    AgentProcess::spawn_env(
        &[
            "postgres",
            "stream",
            "--source",
            &src,
            "--repo",
            &repo,
            "--max-lag",
            "200ms",
            "--slot",
            slot,
            "--application-name",
            slot,
        ],
        env.dir.path().join(log),
        &lease_env(),
    )
}

fn wait_log(agent: &mut AgentProcess, needle: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .log_text()
            .contains(needle)),
        "no {needle:?} in:\n{}",
        agent.log_text()
    );
}

fn insert_phase(pg: &PgCluster, phase: u32) {
    pg.sql_blocking(&format!(
        "INSERT INTO marker(id) SELECT {phase} * 1000 + g FROM generate_series(1, 200) g"
    ));
    // One transaction per row too, so commit times are distinct for the time target.
    for i in 201..=210 {
        pg.sql_blocking(&format!(
            "INSERT INTO marker(id) VALUES ({})",
            phase * 1000 + i
        ));
    }
}

fn archive_now(env: &Env) {
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
}

fn ids(pg: &PgCluster) -> BTreeSet<u32> {
    pg.sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn two_postgres_streams_one_writer_handover_keeps_pitr() {
    let version = PgVersion::V15;
    let pg = PgCluster::builder(version)
        .wal_keep_size_mb(1024)
        .extra_conf("track_commit_timestamp = on")
        .start();
    let dir = server_temp_dir("sb-lease-");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Restores run wal-fetch as the server user: share the repository with its group.
    pg_pitr_support::share_repo_with_server_group(&dir.path().join("repo"));
    let env = Env {
        pg,
        dir,
        stream: None,
    };
    let mut a = pg_stream(&env, "sb_a", "a.log");
    wait_log(&mut a, "starting replication");
    let mut b = pg_stream(&env, "sb_b", "b.log");
    wait_log(
        &mut b,
        "another writer holds the postgres stream on timeline 00000001 lease",
    );
    assert!(b.log_text().contains("slot sb_a"), "{}", b.log_text());
    let slot_b = || {
        env.pg.query_one_blocking(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'sb_b'",
        )
    };
    let b_created_at = slot_b();

    env.pg
        .sql_blocking("CREATE TABLE marker(id int primary key, pad text default repeat('m', 100))");
    insert_phase(&env.pg, 0);
    env.backup(&["--chunk-mib", "4"]);
    insert_phase(&env.pg, 1);
    archive_now(&env);
    // While waiting, B's slot follows what the repository holds (the server need not keep
    // WAL for it that A has stored).
    wait_log(&mut b, "advanced the slot");
    assert!(
        pg_pitr_support::parse_lsn(&slot_b()) > pg_pitr_support::parse_lsn(&b_created_at),
        "{}",
        b.log_text()
    );

    // A frozen after a quiet second: B takes over once the lease expires.
    std::thread::sleep(Duration::from_secs(1));
    let a_pid = a.pid();
    let lease_root = env.repo_path().join("leases/postgres-stream");
    let timeline_dir = std::fs::read_dir(&lease_root)
        .unwrap()
        .next()
        .expect("no postgres stream lease")
        .unwrap()
        .path();
    let frozen = freeze_right_after_a_renewal(&timeline_dir, a_pid);
    insert_phase(&env.pg, 2);
    wait_log(&mut b, "was not renewed for");
    assert!(
        frozen.elapsed() >= MIN_TAKEOVER,
        "took over after {:?}\nA:\n{}\nB:\n{}",
        frozen.elapsed(),
        a.log_text(),
        b.log_text()
    );
    assert_took_over_after_a_whole_lease(&b.log_text());
    wait_log(&mut b, "starting replication");
    archive_now(&env);

    // A wakes up: it lost the lease and waits in turn.
    signal(a_pid, Signal::SIGCONT);
    wait_log(&mut a, "lost the");
    wait_log(&mut a, "another writer holds");
    insert_phase(&env.pg, 3);
    archive_now(&env);
    let mid: DateTime<Utc> = DateTime::parse_from_rfc3339(&env.pg.query_one_blocking(
        "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM marker WHERE id = 3205",
    ))
    .unwrap()
    .with_timezone(&Utc);

    // kill -9 the holder: A takes over.
    b.kill9();
    wait_log(&mut a, "taking over");
    insert_phase(&env.pg, 4);
    archive_now(&env);
    assert!(a.terminate().success(), "{}", a.log_text());
    let all = ids(&env.pg);

    // Latest: every row.
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", pg_support::text(&out));
    let restored = start_restored(version, &dirs.data());
    assert_eq!(ids(&restored), all);
    drop(restored);
    // A time between the handovers: exactly the rows committed by then.
    let dirs = RestoreDirs::new();
    let ts = mid.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let out = env.restore(&dirs.data(), &["--to-time", &ts]);
    assert!(out.status.success(), "{}", pg_support::text(&out));
    let restored = start_restored(version, &dirs.data());
    let want: BTreeSet<u32> = all.iter().copied().filter(|&id| id <= 3205).collect();
    assert_eq!(ids(&restored), want);
}

// ------------------------------------------------------------------------------------
// The lease itself on SeaweedFS (S3 conditional PUT) and on a local directory
// ------------------------------------------------------------------------------------

/// Several writers race for a lease: exactly one wins; when the winner stops renewing,
/// several waiters race for the takeover and again exactly one wins.
async fn one_winner_then_one_takeover(repo: &storage::Repository) {
    use storage::{Lease, LeaseOptions, LeaseScope};
    // Generous for a loaded 2-core machine: the first race's window stays well below the
    // lease's life, so a loser can never take over a lease whose holder still renews it.
    let opts = LeaseOptions::with_duration(Duration::from_millis(3000));
    let scope = LeaseScope::RedisStream;
    let race = |tag: &'static str, within: Duration| {
        let tries = (0..5).map(move |i| {
            let repo = repo.clone();
            async move {
                tokio::time::timeout(
                    within,
                    Lease::acquire(&repo, scope, &format!("{tag}{i}"), opts),
                )
                .await
                .ok()
                .map(|l| l.unwrap())
            }
        });
        futures::future::join_all(tries)
    };
    let mut first: Vec<_> = race("a", Duration::from_millis(2000))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(first.len(), 1, "one writer holds the lease");
    let holder = first.pop().unwrap();
    assert_eq!(holder.key(), storage::layout::lease(scope, 1));
    // The holder stops renewing (as if killed): one of the waiters takes over, with the
    // generation after the one held last (a renewal the load delayed re-takes the lease as
    // the next generation, which is correct).
    let waiters = race("b", Duration::from_secs(12));
    let held = storage::layout::parse_lease(scope, &holder.key()).unwrap();
    drop(holder);
    let second: Vec<_> = waiters.await.into_iter().flatten().collect();
    assert_eq!(second.len(), 1, "one waiter took over");
    let taken = storage::layout::parse_lease(scope, &second[0].key()).unwrap();
    assert!(taken > held, "took generation {taken} after {held}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_races_on_seaweedfs_have_one_winner() {
    let s3 = syncbridge_tests::s3::S3Server::start();
    let opts = storage::RepoOptions {
        store_config: vec![
            ("aws_access_key_id".into(), s3.access_key().into()),
            ("aws_secret_access_key".into(), s3.secret_key().into()),
            ("aws_region".into(), s3.region().into()),
            ("aws_endpoint".into(), s3.endpoint()),
            ("aws_allow_http".into(), "true".into()),
        ],
        ..storage::RepoOptions::default()
    };
    let repo = storage::Repository::open(&s3.repo_url("leases"), opts).unwrap();
    one_winner_then_one_takeover(&repo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_races_on_a_local_directory_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let repo = storage::Repository::open(&url, storage::RepoOptions::default()).unwrap();
    one_winner_then_one_takeover(&repo).await;
}
