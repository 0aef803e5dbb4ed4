//! `make demo`: the agent end to end on the embedded default (`file://` repositories), against
//! throwaway PostgreSQL 15 and Redis 7 servers from `.deps/`. It streams both, takes a base
//! backup, generates load around a chosen moment T, restores both to T and checks that exactly
//! the markers written at or before T came back. Every step and check is printed; a failed
//! check exits non-zero.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::process::chown_to_server_user;
use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespConnection};

/// Markers written before the backup, between backup and T, and after T.
const BEFORE: u32 = 20;
const UP_TO_T: u32 = 40;
const AFTER_T: u32 = 60;

fn step(text: &str) {
    println!("\n==> {text}");
}

fn check(ok: bool, what: &str) -> bool {
    println!("    [{}] {what}", if ok { " ok " } else { "FAIL" });
    ok
}

fn show(args: &[&str]) {
    println!("    $ syncbridge-agent {}", args.join(" "));
}

/// Runs the agent to completion, echoing its stdout indented; panics with its output on failure.
fn agent(bin: &Path, args: &[&str]) -> String {
    show(args);
    let out = Command::new(bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "syncbridge-agent {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in stdout.lines() {
        println!("      {line}");
    }
    stdout
}

/// Starts a long-running agent command with its log in the demo folder.
fn spawn_agent(bin: &Path, args: &[&str], log: &Path) -> Child {
    show(args);
    println!("      (running in the background; log: {})", log.display());
    let file = std::fs::File::create(log).unwrap();
    Command::new(bin)
        .args(args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn write_markers(pg: &PgCluster, redis: &RedisServer, ids: std::ops::Range<u32>) {
    let mut conn = redis.connect();
    for i in ids {
        pg.sql_blocking(&format!("INSERT INTO marker (id) VALUES ({i})"));
        conn.cmd(&["SET", &format!("marker:{i}"), "1"]).unwrap();
        conn.cmd(&["INCR", "counter"]).unwrap();
        conn.cmd(&["RPUSH", "events", &i.to_string()]).unwrap();
        sleep(Duration::from_millis(20));
    }
}

fn redis_markers(conn: &mut RespConnection) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    for i in 0..AFTER_T {
        let r = conn.cmd(&["EXISTS", &format!("marker:{i}")]).unwrap();
        if r.as_int() == Some(1) {
            found.insert(i);
        }
    }
    found
}

fn main() -> ExitCode {
    let bin = syncbridge_tests::agent::binary();
    let demo_dir = syncbridge_tests::paths::repo_root().join("demo-out");
    let _ = std::fs::remove_dir_all(&demo_dir);
    std::fs::create_dir_all(&demo_dir).unwrap();
    let pg_repo = format!("file://{}/pg-repo", demo_dir.display());
    let redis_repo = format!("file://{}/redis-repo", demo_dir.display());
    let mut ok = true;

    step("starting a throwaway PostgreSQL 15 and Redis 7 on 127.0.0.1");
    let pg = PgCluster::start(PgVersion::V15);
    let redis = RedisServer::start(RedisFlavor::Redis7);
    println!(
        "    PostgreSQL on port {}, Redis on port {}",
        pg.port(),
        redis.port()
    );
    pg.sql_blocking("CREATE TABLE marker (id int PRIMARY KEY, committed_at timestamptz NOT NULL DEFAULT clock_timestamp())");

    step("streaming WAL and the Redis replication stream into file:// repositories");
    let source = pg.replication_url();
    let pg_stream = spawn_agent(
        &bin,
        &[
            "postgres", "stream", "--source", &source, "--repo", &pg_repo,
        ],
        &demo_dir.join("postgres-stream.log"),
    );
    let redis_stream = spawn_agent(
        &bin,
        &[
            "redis",
            "stream",
            "--source",
            &redis.url(),
            "--repo",
            &redis_repo,
        ],
        &demo_dir.join("redis-stream.log"),
    );
    sleep(Duration::from_secs(2));

    step(&format!(
        "load: markers 0..{BEFORE} in PostgreSQL and Redis"
    ));
    write_markers(&pg, &redis, 0..BEFORE);

    step("a base backup through the replication protocol");
    agent(
        &bin,
        &[
            "postgres", "backup", "--source", &source, "--repo", &pg_repo,
        ],
    );

    step(&format!(
        "load: markers {BEFORE}..{UP_TO_T}, then the moment T, then {UP_TO_T}..{AFTER_T}"
    ));
    write_markers(&pg, &redis, BEFORE..UP_TO_T);
    sleep(Duration::from_millis(1500));
    let t = Utc::now();
    let t_text = t.to_rfc3339_opts(SecondsFormat::Millis, true);
    println!("    T = {t_text}");
    sleep(Duration::from_millis(1500));
    write_markers(&pg, &redis, UP_TO_T..AFTER_T);
    pg.sql_blocking("SELECT pg_switch_wal()");
    println!("    waiting 3 s for the streams to store what they received (--max-lag is 1 s)");
    sleep(Duration::from_secs(3));

    step("what the PostgreSQL repository can restore");
    agent(&bin, &["list", "--repo", &pg_repo]);

    step("restoring PostgreSQL to T");
    let pg_target = demo_dir.join("pg-restore");
    std::fs::create_dir_all(&pg_target).unwrap();
    chown_to_server_user(&demo_dir);
    chown_to_server_user(&pg_target);
    let target_s = pg_target.display().to_string();
    agent(
        &bin,
        &[
            "restore",
            "--repo",
            &pg_repo,
            "--target",
            &target_s,
            "--to-time",
            &t_text,
        ],
    );
    chown_to_server_user(&pg_target);
    let restored = PgCluster::start_from_data_dir(PgVersion::V15, &pg_target);
    let deadline = Instant::now() + Duration::from_secs(120);
    while restored.query_one_blocking("SELECT pg_is_in_recovery()") == "t"
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(200));
    }
    let got: BTreeSet<u32> = restored
        .sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect();
    let want: BTreeSet<u32> = (0..UP_TO_T).collect();
    ok &= check(
        got == want,
        &format!("PostgreSQL restored to T has exactly markers 0..{UP_TO_T} ({} rows; the primary has {AFTER_T})", got.len()),
    );
    drop(restored);

    step("restoring Redis to T (multi-part AOF directory) and starting a server on it");
    let redis_target = demo_dir.join("redis-restore");
    let server = syncbridge_tests::paths::redis_server()
        .display()
        .to_string();
    let out = agent(
        &bin,
        &[
            "redis",
            "restore",
            "--repo",
            &redis_repo,
            "--target",
            &redis_target.display().to_string(),
            "--to-time",
            &t_text,
            "--start",
            &server,
        ],
    );
    let port: u16 = out
        .lines()
        .find_map(|l| l.split("running on 127.0.0.1:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the restore output names the port of the started server");
    let mut conn = RespConnection::connect(port).unwrap();
    let got = redis_markers(&mut conn);
    ok &= check(
        got == want,
        &format!(
            "Redis restored to T has exactly markers 0..{UP_TO_T} ({} keys)",
            got.len()
        ),
    );
    let counter = conn.cmd(&["GET", "counter"]).unwrap();
    ok &= check(
        counter.as_str() == Some(&UP_TO_T.to_string()),
        &format!(
            "Redis counter at T is {UP_TO_T} (restored: {:?})",
            counter.as_str()
        ),
    );
    let _ = conn.send(&["SHUTDOWN", "NOSAVE"]);

    step("stopping the streams");
    stop(pg_stream);
    stop(redis_stream);
    println!("\nRepositories and logs are in {}", demo_dir.display());
    if ok {
        println!("demo: every check passed");
        ExitCode::SUCCESS
    } else {
        println!("demo: a check FAILED");
        ExitCode::FAILURE
    }
}
