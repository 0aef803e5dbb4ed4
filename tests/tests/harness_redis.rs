//! Smoke tests of the Redis/Valkey part of the harness.
#![allow(clippy::unwrap_used)]

use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespValue};

fn smoke(flavor: RedisFlavor) {
    let server = RedisServer::start(flavor);
    assert_eq!(server.cmd(&["PING"]), RespValue::Simple("PONG".into()));
    let version = server.server_version();
    assert!(
        version.starts_with(&format!("{}.", flavor.expected_major())),
        "{flavor}: {} = {version}",
        flavor.version_field()
    );
    assert!(server.cmd(&["SET", "k", "v"]).is_ok());
    assert_eq!(server.cmd(&["GET", "k"]).as_str(), Some("v"));
    assert_eq!(
        server.info("replication").get("role").map(String::as_str),
        Some("master")
    );
}

#[test]
fn redis7_answers_ping_and_reports_its_version() {
    smoke(RedisFlavor::Redis7);
}

#[test]
fn valkey9_answers_ping_and_reports_its_version() {
    smoke(RedisFlavor::Valkey9);
}

#[test]
fn password_is_required_and_used_by_the_helpers() {
    for &flavor in RedisFlavor::all() {
        let server = RedisServer::builder(flavor).password("s3cret").start();
        assert!(server.url().contains(":s3cret@127.0.0.1:"));
        // An unauthenticated connection is refused...
        let mut raw = syncbridge_tests::redis::RespConnection::connect(server.port()).unwrap();
        match raw.cmd(&["GET", "k"]).unwrap() {
            RespValue::Error(e) => assert!(e.starts_with("NOAUTH"), "{flavor}: {e}"),
            other => panic!("{flavor}: expected NOAUTH, got {other}"),
        }
        // ...and the helper authenticates.
        assert_eq!(server.cmd(&["PING"]), RespValue::Simple("PONG".into()));
    }
}

#[test]
fn kill9_and_restart_keep_port_and_data_on_disk() {
    let mut server = RedisServer::builder(RedisFlavor::Redis7)
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .start();
    let port = server.port();
    let old_pid = server.pid().unwrap();
    assert!(server.cmd(&["SET", "durable", "1"]).is_ok());
    server.kill9();
    assert!(
        server.try_cmd(&["PING"]).is_err(),
        "server still answers after kill9"
    );
    assert!(!syncbridge_tests::process::process_is_alive(old_pid));
    server.start_again();
    assert_eq!(server.port(), port);
    assert_eq!(server.cmd(&["GET", "durable"]).as_str(), Some("1"));
    server.restart();
    assert_eq!(server.cmd(&["GET", "durable"]).as_str(), Some("1"));
}
