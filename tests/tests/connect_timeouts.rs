//! Case 11: a single-host source at a port that accepts TCP and never answers. Every
//! command that connects fails within the default 10 s connect timeout (the acceptance
//! bound is 15 s) with a message naming the host, for PostgreSQL and Redis alike.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::Output;
use std::time::{Duration, Instant};

/// Accepts connections and keeps them open without ever sending a byte.
struct SilentServer {
    port: u16,
    _thread: std::thread::JoinHandle<()>,
}

impl SilentServer {
    fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => held.push(c),
                    Err(_) => return,
                }
            }
        });
        SilentServer {
            port,
            _thread: thread,
        }
    }
}

fn run(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = syncbridge_tests::agent::command(&["PG", "SYNCBRIDGE_", "REDISCLI_"])
        .args(args)
        .output()
        .unwrap();
    (out, started.elapsed())
}

fn assert_times_out_naming(args: &[&str], endpoint: &str) {
    let (out, took) = run(args);
    let text = format!(
        "{args:?}: status {:?} after {took:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(took < Duration::from_secs(15), "{text}");
    // Not an immediate refusal: the timeout is what ended it.
    assert!(took >= Duration::from_secs(5), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(endpoint), "{text}");
    assert!(
        err.contains("timed out") || err.contains("no answer within"),
        "{text}"
    );
}

#[test]
fn postgres_single_host_connect_times_out_naming_the_host() {
    let silent = SilentServer::start();
    let endpoint = format!("127.0.0.1:{}", silent.port);
    let source = format!(
        "host=127.0.0.1 port={} user=u dbname=postgres sslmode=disable",
        silent.port
    );
    assert_times_out_naming(&["postgres", "check", "--source", &source], &endpoint);
    let dir = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    assert_times_out_naming(
        &["postgres", "stream", "--source", &source, "--repo", &repo],
        &endpoint,
    );
    // Nothing was written: the repository was never reached.
    assert!(!dir.path().join("repo").exists());
}

#[test]
fn redis_single_host_connect_times_out_naming_the_host() {
    let silent = SilentServer::start();
    let endpoint = format!("127.0.0.1:{}", silent.port);
    let source = format!("redis://127.0.0.1:{}", silent.port);
    let dir = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    assert_times_out_naming(
        &["redis", "snapshot", "--source", &source, "--repo", &repo],
        &endpoint,
    );
    assert_times_out_naming(
        &["redis", "stream", "--source", &source, "--repo", &repo],
        &endpoint,
    );
}
