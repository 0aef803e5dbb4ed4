//! `redis stream` whose repository disappears: like case 9 for PostgreSQL, the stream
//! stops with an error naming the repository and does not recreate it.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::time::{Duration, Instant};

use syncbridge_tests::redis::{RedisFlavor, RedisServer};

#[test]
fn deleted_repository_stops_the_redis_stream() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let mut agent = redis_support::StreamingAgent::start(
        &server.url(),
        &repo,
        "100ms",
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    std::fs::remove_dir_all(&repo_dir).unwrap();
    let mut c = server.connect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        c.cmd(&["INCR", "counter"]).unwrap();
        if let Some(status) = agent.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the stream kept running without its repository:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = agent.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("is gone"), "{log}");
    assert!(!repo_dir.exists(), "the repository was recreated:\n{log}");
}
