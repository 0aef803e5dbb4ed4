//! `expire` with running streams (issue 13, Deliver 4 and its acceptance): Redis 7 and
//! Valkey 9 streams rotating generations with a short `--snapshot-every`, `--keep-full 2`
//! keeps exactly the newest two, every moment in them restores exactly and a moment in an
//! expired one is refused with the earliest restorable time; and `expire` run again and
//! again while `postgres stream` and `redis stream` store a write load loses nothing: the
//! PITR proofs hold afterwards.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_pitr_support::{start_restored, Env, RestoreDirs};
use redis_support::{dump, dump_port, now_ms, server_bin, RestoredServer, StreamingAgent};
use serde_json::Value;
use syncbridge_tests::pg::PgVersion;
use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespConnection, RespValue};

/// Files below `dir` (a `file://` store may keep emptied directories).
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn run(args: &[&str]) -> Output {
    pg_support::agent().args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    pg_support::text(out)
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn list_json(url: &str) -> Value {
    let out = run(&["list", "--repo", url, "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn parse_time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .to_utc()
}

/// The time a refusal names as "the earliest restorable time is T".
fn earliest_named(stderr: &str) -> DateTime<Utc> {
    let rest = stderr
        .split("the earliest restorable time is ")
        .nth(1)
        .unwrap_or_else(|| panic!("no earliest restorable time named: {stderr}"));
    let word = rest.split_whitespace().next().unwrap();
    parse_time(word.trim_end_matches([',', ';', '.', ')']))
}

/// (id, snapshot time in Unix ms) of every generation, oldest first.
fn generations(v: &Value) -> Vec<(String, i64)> {
    v["redis"]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["id"].as_str().unwrap().to_string(),
                parse_time(g["snapshot_time"].as_str().unwrap()).timestamp_millis(),
            )
        })
        .collect()
}

fn ok(c: &mut RespConnection, args: &[&str]) -> RespValue {
    let r = c.cmd(args).unwrap();
    assert!(!matches!(r, RespValue::Error(_)), "{args:?} -> {r}");
    r
}

/// `redis restore --to-time @ms` (or the latest point) started with the flavor's server.
fn redis_restore(repo: &str, target: &Path, to: Option<i64>, flavor: RedisFlavor) -> Output {
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let to_arg = to.map(|t| format!("@{t}"));
    let mut args = vec![
        "redis", "restore", "--repo", repo, "--target", &target_s, "--start", &bin,
    ];
    if let Some(t) = &to_arg {
        args.extend(["--to-time", t.as_str()]);
    }
    run(&args)
}

fn redis_restored_state(
    repo: &str,
    target: &Path,
    to: Option<i64>,
    flavor: RedisFlavor,
) -> BTreeMap<String, String> {
    let out = redis_restore(repo, target, to, flavor);
    // Own the server before asserting, so a failed assertion still shuts it down.
    let server = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    let server = server.unwrap_or_else(|| RestoredServer::from_output(&out));
    dump_port(server.port, None)
}

fn phase_writes(c: &mut RespConnection, phase: usize) {
    for i in 0..10 {
        ok(c, &["SET", &format!("marker:{phase}:{i}"), &i.to_string()]);
    }
    ok(c, &["INCR", "counter"]);
    ok(c, &["RPUSH", "list", &format!("p{phase}")]);
    ok(c, &["MULTI"]);
    ok(c, &["SET", &format!("tx:{phase}"), "1"]);
    ok(c, &["INCR", "counter"]);
    ok(c, &["EXEC"]);
    if phase % 3 == 2 {
        ok(c, &["DEL", &format!("marker:{}:0", phase - 1)]);
    }
}

/// Five generations or more from a stream rotating every 3 s; `--keep-full 2` keeps the
/// newest two; each recorded moment restores exactly when its generation is kept and is
/// refused, naming the earliest restorable time, when it was expired.
fn five_generations_keep_two(flavor: RedisFlavor) {
    let server = RedisServer::start(flavor);
    let tmp = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", tmp.path().join("repo").display());
    let mut c = server.connect();
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &["--max-lag", "200ms", "--snapshot-every", "3s"],
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut targets: Vec<(i64, BTreeMap<String, String>)> = Vec::new();
    let mut phase = 0;
    loop {
        phase_writes(&mut c, phase);
        phase += 1;
        // Once the agent has stored the writes (WAIT counts its acknowledgement) it has
        // read them, so they are indexed before now, on a loaded machine too. (While it
        // switches generations it is connected twice: WAIT may count 2.)
        let waited = ok(&mut c, &["WAIT", "1", "60000"]);
        assert!(waited.as_int() >= Some(1), "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
        targets.push((now_ms(), dump(&server)));
        std::thread::sleep(Duration::from_millis(250));
        let gens = generations(&list_json(&repo));
        // Stop once there are five and the newest has a recorded moment: a rotation
        // before the stop leaves that one second newest, and the newest is proven by the
        // latest point below.
        if gens.len() >= 5 && targets.iter().any(|(t, _)| *t > gens.last().unwrap().1) {
            break;
        }
        assert!(
            phase < 400,
            "{flavor}: no fifth generation:\n{}",
            agent.log_text()
        );
    }
    phase_writes(&mut c, phase);
    let waited = ok(&mut c, &["WAIT", "1", "60000"]);
    assert!(waited.as_int() >= Some(1), "{}", agent.log_text());
    let final_state = dump(&server);
    assert!(agent.terminate(), "{}", agent.log_text());

    let before = generations(&list_json(&repo));
    let n = before.len();
    assert!(n >= 5, "{before:?}");
    let out = run_ok(&["expire", "--repo", &repo, "--keep-full", "2"]);
    assert!(
        out.contains(&format!("expired {} generations", n - 2)),
        "{out}"
    );
    let after = generations(&list_json(&repo));
    assert_eq!(after, before[n - 2..], "{flavor}");
    for (id, _) in &before[..n - 2] {
        let dir = tmp.path().join(format!("repo/redis/gen/{id}"));
        assert_eq!(files_under(&dir), 0, "{id} left behind");
    }

    let mut restored_in = BTreeSet::new();
    let mut refused = 0;
    for (i, (t, expected)) in targets.iter().enumerate() {
        let generation = before.iter().rposition(|(_, s)| s <= t).unwrap();
        let target = tmp.path().join(format!("at{i}"));
        if generation >= n - 2 {
            let got = redis_restored_state(&repo, &target, Some(*t), flavor);
            assert_eq!(
                &got, expected,
                "{flavor}: moment {i} in generation {generation}"
            );
            restored_in.insert(generation);
        } else {
            let out = redis_restore(&repo, &target, Some(*t), flavor);
            assert!(
                !out.status.success(),
                "{flavor}: moment {i}: {}",
                text(&out)
            );
            assert_eq!(
                earliest_named(&String::from_utf8_lossy(&out.stderr)).timestamp_millis(),
                before[n - 2].1,
                "{}",
                text(&out)
            );
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "{flavor}: no moment fell in an expired generation"
    );
    assert!(
        restored_in.contains(&(n - 2)),
        "{flavor}: no moment restored in generation {}",
        before[n - 2].0
    );
    // The latest point (in the newest generation) is the state the stream stopped at.
    let got = redis_restored_state(&repo, &tmp.path().join("latest"), None, flavor);
    assert_eq!(got, final_state, "{flavor}: latest");
}

#[test]
fn redis7_expire_keeps_the_newest_two_of_five_streamed_generations() {
    five_generations_keep_two(RedisFlavor::Redis7);
}

#[test]
fn valkey9_expire_keeps_the_newest_two_of_five_streamed_generations() {
    five_generations_keep_two(RedisFlavor::Valkey9);
}

/// A write loop another thread can pause at a quiet moment (between two writes).
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    pause: AtomicBool,
    paused: AtomicBool,
    /// Writes acknowledged so far (write `n` is the n-th, from 1).
    done: AtomicU64,
}

impl Load {
    /// Whether to stop; waits while paused.
    fn next(&self) -> bool {
        while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            self.paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        self.paused.store(false, Ordering::SeqCst);
        self.stop.load(Ordering::SeqCst)
    }

    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while !self.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

fn markers(pg: &syncbridge_tests::pg::PgCluster) -> BTreeSet<u64> {
    pg.sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn expire_during_running_pg_and_redis_streams_under_load_loses_nothing() {
    let version = PgVersion::V15;
    let env = Env::simple(version);
    env.pg.sql_blocking("CREATE TABLE marker(id bigint)");
    let pg_url = env.repo_url();
    let server = RedisServer::start(RedisFlavor::Redis7);
    let redis_repo = format!("file://{}", env.dir.path().join("redis-repo").display());
    let mut redis_agent = StreamingAgent::start_with(
        &server.url(),
        &redis_repo,
        &["--max-lag", "200ms", "--snapshot-every", "1s"],
        &[],
        env.dir.path().join("redis-stream.log"),
    );
    redis_agent.wait_for_log("snapshot stored", Duration::from_secs(60));

    let pg_load = Arc::new(Load::default());
    let redis_load = Arc::new(Load::default());
    let pg_thread = {
        let load = pg_load.clone();
        let conninfo = env.pg.superuser_conninfo();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut n = 0u64;
                while !load.next() {
                    n += 1;
                    client
                        .simple_query(&format!("INSERT INTO marker VALUES ({n})"))
                        .await
                        .unwrap();
                    load.done.store(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        })
    };
    let redis_thread = {
        let load = redis_load.clone();
        let mut c = server.connect();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !load.next() {
                n += 1;
                ok(&mut c, &["SET", &format!("ts:{n}"), &now_ms().to_string()]);
                ok(&mut c, &["INCR", "counter"]);
                load.done.store(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // Backups, rotations and expires while both streams store the load.
    let mut pg_expired = 0;
    let mut redis_expired = 0;
    for _ in 0..3 {
        env.backup(&[]);
        let out = run_ok(&["expire", "--repo", &pg_url, "--keep-full", "1"]);
        pg_expired += usize::from(out.contains("expire  backup"));
        for _ in 0..3 {
            let out = run_ok(&["expire", "--repo", &redis_repo, "--keep-full", "2"]);
            let n: usize = out
                .lines()
                .find_map(|l| l.strip_prefix("expired "))
                .and_then(|l| l.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap();
            redis_expired += n;
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(pg_expired >= 2, "the PostgreSQL expires removed nothing");
    assert!(redis_expired >= 2, "the Redis expires removed nothing");

    // A quiet moment after the newest backup: what is committed by then, and no more, is
    // what a restore to it must give.
    pg_load.pause();
    redis_load.pause();
    let mut c = server.connect();
    let waited = ok(&mut c, &["WAIT", "1", "60000"]);
    assert!(waited.as_int() >= Some(1), "{}", redis_agent.log_text());
    std::thread::sleep(Duration::from_millis(400));
    let t_ms = now_ms();
    let t = DateTime::from_timestamp_millis(t_ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let pg_at_t = pg_load.done.load(Ordering::SeqCst);
    let redis_at_t = dump(&server);
    std::thread::sleep(Duration::from_millis(400));
    pg_load.resume();
    redis_load.resume();
    std::thread::sleep(Duration::from_millis(1500));
    pg_load.stop.store(true, Ordering::SeqCst);
    redis_load.stop.store(true, Ordering::SeqCst);
    pg_thread.join().unwrap();
    redis_thread.join().unwrap();
    let pg_final = pg_load.done.load(Ordering::SeqCst);
    assert!(pg_final > pg_at_t && pg_at_t > 0);

    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let waited = ok(&mut c, &["WAIT", "1", "60000"]);
    assert!(waited.as_int() >= Some(1), "{}", redis_agent.log_text());
    let redis_final = dump(&server);
    assert!(redis_agent.terminate(), "{}", redis_agent.log_text());

    // The repositories: one backup and WAL without a hole; generations chain whole.
    let v = list_json(&pg_url);
    assert_eq!(v["postgres"]["backups"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        v["postgres"]["wal"][0]["holes"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    let r = list_json(&redis_repo);
    let gens = r["redis"]["generations"].as_array().unwrap();
    assert!(gens.len() >= 2, "{r}");
    assert!(gens.iter().all(|g| g["orphan_chunks"] == 0), "{r}");
    run_ok(&["redis", "verify", "--repo", &redis_repo]);

    // PITR proofs: exactly the markers committed by T; at the latest point, every one.
    let restored = |to: Option<&str>| {
        let dirs = RestoreDirs::new();
        let extra: Vec<&str> = to.map(|t| vec!["--to-time", t]).unwrap_or_default();
        let out = env.restore(&dirs.data(), &extra);
        assert!(out.status.success(), "{}", text(&out));
        let pg = start_restored(version, &dirs.data());
        markers(&pg)
    };
    assert_eq!(restored(Some(&t)), (1..=pg_at_t).collect(), "at {t}");
    assert_eq!(restored(None), (1..=pg_final).collect(), "latest");
    let flavor = RedisFlavor::Redis7;
    let at = env.dir.path().join("redis-at-t");
    assert_eq!(
        redis_restored_state(&redis_repo, &at, Some(t_ms), flavor),
        redis_at_t,
        "Redis at {t}"
    );
    let latest = env.dir.path().join("redis-latest");
    assert_eq!(
        redis_restored_state(&redis_repo, &latest, None, flavor),
        redis_final,
        "Redis latest"
    );
}
