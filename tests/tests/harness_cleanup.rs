//! Proof that a panicking test leaves no server process or temp dir behind.
//!
//! The test re-runs its own test binary, selecting only itself, with an environment variable
//! that turns it into the child: the child starts PostgreSQL (with an open client backend), Redis, Valkey and SeaweedFS, writes
//! every pid and temp dir it can see to a file, and panics. The parent then checks that every
//! one of those processes is gone and every directory removed.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::process::{descendants, process_is_alive, wait_until_gone};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};
use syncbridge_tests::s3::S3Server;

const PID_FILE_ENV: &str = "SB_HARNESS_PANIC_CHILD_PID_FILE";
const THIS_TEST: &str = "panicking_test_leaves_no_server_behind";

/// The child half: start everything, record it, panic.
fn child_starts_servers_then_panics(pid_file: PathBuf) {
    let pg = PgCluster::start(PgVersion::V17);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // An open connection, so the postmaster has a client backend (which setsid()s away).
    let client = runtime.block_on(pg.connect());
    runtime.block_on(client.simple_query("SELECT 1")).unwrap();
    let redis = RedisServer::start(RedisFlavor::Redis7);
    let valkey = RedisServer::start(RedisFlavor::Valkey9);
    let s3 = S3Server::start();

    let postmaster = pg.pid().unwrap();
    let mut pids = vec![postmaster];
    pids.extend(descendants(postmaster));
    for server in [&redis, &valkey] {
        let pid = server.pid().unwrap();
        pids.push(pid);
        pids.extend(descendants(pid));
    }
    let weed = s3.pid().unwrap();
    pids.push(weed);
    pids.extend(descendants(weed));
    for &pid in &pids {
        assert!(
            process_is_alive(pid),
            "pid {pid} not alive before the panic"
        );
    }
    let dirs = [pg.temp_dir(), redis.dir(), valkey.dir(), s3.dir()];
    let mut report = String::new();
    for pid in &pids {
        report.push_str(&format!("pid {pid}\n"));
    }
    for dir in dirs {
        report.push_str(&format!("dir {}\n", dir.display()));
    }
    std::fs::write(&pid_file, report).unwrap();
    panic!("deliberate panic with every server running");
}

#[test]
fn panicking_test_leaves_no_server_behind() {
    if let Some(pid_file) = std::env::var_os(PID_FILE_ENV) {
        child_starts_servers_then_panics(PathBuf::from(pid_file));
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("pids");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", THIS_TEST, "--nocapture"])
        .env(PID_FILE_ENV, &pid_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the child should have panicked:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("deliberate panic") || stdout.contains("deliberate panic"),
        "the child failed before its deliberate panic:\n{stdout}\n{stderr}"
    );

    let report = std::fs::read_to_string(&pid_file).unwrap();
    let pids: Vec<u32> = report
        .lines()
        .filter_map(|l| l.strip_prefix("pid "))
        .map(|p| p.parse().unwrap())
        .collect();
    let dirs: Vec<PathBuf> = report
        .lines()
        .filter_map(|l| l.strip_prefix("dir "))
        .map(PathBuf::from)
        .collect();
    // postmaster + its auxiliary processes and the client backend, redis, valkey, weed.
    assert!(pids.len() >= 8, "too few pids recorded: {pids:?}");
    assert_eq!(dirs.len(), 4);

    // Drop waits for the servers, so they are gone already; the grace period only covers
    // PostgreSQL backends finishing their exit after the postmaster died.
    let alive = wait_until_gone(&pids, Duration::from_secs(10));
    assert!(
        alive.is_empty(),
        "server processes survived the panic: {alive:?}"
    );
    for dir in &dirs {
        assert!(
            !dir.exists(),
            "temp dir survived the panic: {}",
            dir.display()
        );
    }
}
