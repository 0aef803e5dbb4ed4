//! Proof that a test that dies leaves no server process behind.
//!
//! Each test re-runs its own test binary, selecting only itself, with an environment variable
//! that turns it into the child: the child starts PostgreSQL (with an open client backend),
//! Redis, Valkey and SeaweedFS, writes every pid and temp dir it can see to a file, and then
//! either panics (Drop cleans up, temp dirs included) or SIGKILLs itself (no Drop runs; the
//! per-server watchdogs clean up). The parent then checks that every one of those processes
//! is gone.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::process::{descendants, process_is_alive, wait_until_gone};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};
use syncbridge_tests::s3::S3Server;

const PID_FILE_ENV: &str = "SB_HARNESS_CLEANUP_CHILD_PID_FILE";

/// How the child dies.
#[derive(Clone, Copy)]
enum Death {
    Panic,
    Sigkill,
}

/// The child half: start everything, record it, die.
fn child_starts_servers_then_dies(pid_file: &Path, death: Death) {
    let pg = PgCluster::start(PgVersion::V17);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // An open connection, so the postmaster has a client backend (which setsid()s away).
    let client = runtime.block_on(pg.connect());
    runtime.block_on(client.simple_query("SELECT 1")).unwrap();
    let redis = RedisServer::start(RedisFlavor::Redis7);
    let valkey = RedisServer::start(RedisFlavor::Valkey9);
    let s3 = S3Server::start();

    let mut pids = Vec::new();
    for pid in [
        pg.pid().unwrap(),
        redis.pid().unwrap(),
        valkey.pid().unwrap(),
        s3.pid().unwrap(),
    ] {
        pids.push(pid);
        pids.extend(descendants(pid));
    }
    for &pid in &pids {
        assert!(process_is_alive(pid), "pid {pid} not alive before dying");
    }
    let mut report = String::new();
    for pid in &pids {
        report.push_str(&format!("pid {pid}\n"));
    }
    for dir in [pg.temp_dir(), redis.dir(), valkey.dir(), s3.dir()] {
        report.push_str(&format!("dir {}\n", dir.display()));
    }
    std::fs::write(pid_file, report).unwrap();
    match death {
        Death::Panic => panic!("deliberate panic with every server running"),
        Death::Sigkill => {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
            unreachable!("SIGKILL returned");
        }
    }
}

/// Runs `test_name` of this binary as the child and returns the recorded pids and dirs.
fn run_child(test_name: &str, death: Death) -> (Vec<u32>, Vec<PathBuf>) {
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("pids");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture"])
        .env(PID_FILE_ENV, &pid_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the child should have died:\n{stdout}\n{stderr}"
    );
    match death {
        Death::Panic => assert!(
            stderr.contains("deliberate panic") || stdout.contains("deliberate panic"),
            "the child failed before its deliberate panic:\n{stdout}\n{stderr}"
        ),
        Death::Sigkill => {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(9),
                "the child failed before killing itself:\n{stdout}\n{stderr}"
            );
        }
    }
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
    (pids, dirs)
}

#[test]
fn panicking_test_leaves_no_server_behind() {
    if let Some(pid_file) = std::env::var_os(PID_FILE_ENV) {
        child_starts_servers_then_dies(Path::new(&pid_file), Death::Panic);
        return;
    }
    let (pids, dirs) = run_child("panicking_test_leaves_no_server_behind", Death::Panic);
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

#[test]
fn sigkilled_test_leaves_no_server_behind() {
    if let Some(pid_file) = std::env::var_os(PID_FILE_ENV) {
        child_starts_servers_then_dies(Path::new(&pid_file), Death::Sigkill);
        return;
    }
    let (pids, dirs) = run_child("sigkilled_test_leaves_no_server_behind", Death::Sigkill);
    // No Drop ran: the watchdogs notice within about a second.
    let alive = wait_until_gone(&pids, Duration::from_secs(15));
    // Temp dirs cannot be removed by a dead process; tidy them up here.
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        alive.is_empty(),
        "server processes survived a SIGKILLed test: {alive:?}"
    );
}
