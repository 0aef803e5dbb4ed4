//! The agent against real Redis 7 and Valkey 9: `redis snapshot`, `redis stream` and
//! `redis restore`, including the point-in-time proof, kill -9 and resume, and a master
//! restarted with a new replication ID.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use redis_support::*;
use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespConnection, RespValue};
use syncbridge_tests::s3::S3Server;

fn file_repo(dir: &Path) -> String {
    format!("file://{}", dir.join("repo").display())
}

fn generations(repo_dir: &Path) -> usize {
    let gen_dir = repo_dir.join("repo/redis/gen");
    std::fs::read_dir(gen_dir).map(|d| d.count()).unwrap_or(0)
}

fn ok(c: &mut RespConnection, args: &[&str]) -> RespValue {
    let r = c.cmd(args).unwrap();
    assert!(!matches!(r, RespValue::Error(_)), "{args:?} -> {r}");
    r
}

fn restore_and_start(
    repo: &str,
    target: &Path,
    to: Option<i64>,
    flavor: RedisFlavor,
    env: &[(String, String)],
) -> RestoredServer {
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let to_arg = to.map(|t| format!("@{t}"));
    let mut args = vec![
        "redis", "restore", "--repo", repo, "--target", &target_s, "--start", &bin,
    ];
    if let Some(t) = &to_arg {
        args.extend(["--to-time", t.as_str()]);
    }
    let out = run_agent(&args, env);
    // Own the server before asserting, so a failed assertion still shuts it down.
    let server = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    server.unwrap_or_else(|| RestoredServer::from_output(&out))
}

fn snapshot_round_trip(flavor: RedisFlavor) {
    let server = RedisServer::start(flavor);
    load_dataset(&server);
    let before = dump(&server);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let out = run_agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &repo,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for (db, (keys, expires)) in keyspace(&server) {
        assert!(
            stdout.contains(&format!("db{db}:          keys={keys} expires={expires}")),
            "{flavor}: {stdout}"
        );
    }
    assert!(stdout.contains("diskless"), "{stdout}");
    // Valkey 9 sends its own format only to replicas that announce `REPLCONF version`.
    let expected_format = match flavor {
        RedisFlavor::Redis7 => "REDIS0010",
        RedisFlavor::Valkey9 => "VALKEY080",
    };
    assert!(stdout.contains(expected_format), "{stdout}");
    // --format rdb is allowed: nothing follows the snapshot.
    let target = tmp.path().join("restore");
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let out = run_agent(
        &[
            "redis", "restore", "--repo", &repo, "--target", &target_s, "--format", "rdb",
            "--start", &bin,
        ],
        &[],
    );
    let restored = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    let restored = restored.unwrap_or_else(|| RestoredServer::from_output(&out));
    assert_eq!(dump_port(restored.port, None), before, "{flavor}");
    // verify-rdb on the restored file agrees.
    let out = run_agent(
        &[
            "redis",
            "verify-rdb",
            &target.join("dump.rdb").display().to_string(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn redis7_snapshot_restores_every_type_identically() {
    snapshot_round_trip(RedisFlavor::Redis7);
}

#[test]
fn valkey9_snapshot_restores_every_type_identically() {
    snapshot_round_trip(RedisFlavor::Valkey9);
}

/// Random values (issue 12): the snapshot's frames are judged incompressible and stored raw
/// (about the snapshot's own size, no zstd pass), and restore gives every value back byte
/// for byte.
#[test]
fn incompressible_snapshot_is_stored_raw_and_restores_identically() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let mut conn = server.connect();
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut values = Vec::new();
    for i in 0..48 {
        let mut v = Vec::with_capacity(64 << 10);
        while v.len() < 64 << 10 {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            v.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let key = format!("blob:{i}");
        let r = conn
            .cmd(&[b"SET".as_slice(), key.as_bytes(), v.as_slice()])
            .unwrap();
        assert!(r.is_ok(), "SET {key}: {r}");
        values.push((key, v));
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let out = run_agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &repo,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    // `snapshot:     <key> (REDIS0010, <size> bytes, <stored> stored, sha256 …)`
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("snapshot:"))
        .unwrap_or_else(|| panic!("no snapshot line: {stdout}"));
    let numbers: Vec<u64> = line
        .split(['(', ','])
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    let [size, stored] = numbers[..] else {
        panic!("cannot read sizes from {line:?}");
    };
    assert!(size > 3 << 20, "{line}");
    assert!(
        stored >= size && stored < size + size / 100,
        "random values are stored raw: {line}"
    );
    let target = tmp.path().join("restore");
    let target_s = target.display().to_string();
    let bin = server_bin(RedisFlavor::Redis7);
    let out = run_agent(
        &[
            "redis", "restore", "--repo", &repo, "--target", &target_s, "--format", "rdb",
            "--start", &bin,
        ],
        &[],
    );
    let restored = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    let restored = restored.unwrap_or_else(|| RestoredServer::from_output(&out));
    let mut check = RespConnection::connect(restored.port).unwrap();
    for (key, v) in &values {
        assert_eq!(
            check.cmd(&["GET", key.as_str()]).unwrap(),
            RespValue::Bulk(v.clone()),
            "{key}"
        );
    }
}

#[test]
fn snapshot_to_seaweedfs_with_the_documented_minimal_acl() {
    let s3 = S3Server::start();
    for &flavor in RedisFlavor::all() {
        let server = RedisServer::builder(flavor).password("adminpw").start();
        load_dataset(&server);
        let mut admin = server.connect();
        ok(
            &mut admin,
            &[
                "ACL",
                "SETUSER",
                "backup",
                "on",
                ">backuppw",
                "+psync",
                "+replconf",
                "+sync",
                "+ping",
                "+info",
                "+cluster|myid",
                "+cluster|shards",
                "+cluster|nodes",
            ],
        );
        let source = format!("redis://backup:backuppw@127.0.0.1:{}", server.port());
        let repo = s3.repo_url(&format!("acl-{}", flavor.expected_major()));
        let out = run_agent(
            &["redis", "snapshot", "--source", &source, "--repo", &repo],
            &s3.env(),
        );
        assert!(out.status.success(), "{flavor}: {}", text(&out));
        // A wrong password is a clear error.
        let bad = format!("redis://backup:nope@127.0.0.1:{}", server.port());
        let out = run_agent(
            &["redis", "snapshot", "--source", &bad, "--repo", &repo],
            &s3.env(),
        );
        assert!(!out.status.success());
        assert!(
            text(&out).contains("authentication as backup failed"),
            "{}",
            text(&out)
        );
        let tmp = tempfile::tempdir().unwrap();
        let restored = restore_and_start(&repo, &tmp.path().join("r"), None, flavor, &s3.env());
        assert_eq!(dump_port(restored.port, None), dump(&server), "{flavor}");
    }
}

/// One step of the PITR workload: markers, counters, every collection, MULTI/EXEC, TTLs,
/// two databases.
fn workload(c: &mut RespConnection, phase: usize) {
    for i in 0..40 {
        ok(c, &["SET", &format!("marker:{phase}:{i}"), &i.to_string()]);
    }
    for _ in 0..7 {
        ok(c, &["INCR", "counter"]);
    }
    ok(c, &["SELECT", "1"]);
    ok(c, &["INCRBY", "counter:db1", &(phase * 3 + 1).to_string()]);
    ok(c, &["SELECT", "0"]);
    ok(c, &["RPUSH", "list", &format!("p{phase}")]);
    ok(
        c,
        &["HSET", "hash", &format!("f{phase}"), &format!("v{phase}")],
    );
    ok(c, &["SADD", "set", &format!("m{phase}")]);
    ok(
        c,
        &["ZADD", "zset", &phase.to_string(), &format!("z{phase}")],
    );
    ok(c, &["XADD", "stream", "*", "phase", &phase.to_string()]);
    ok(c, &["MULTI"]);
    ok(c, &["SET", &format!("tx:{phase}"), "1"]);
    ok(c, &["INCR", "counter"]);
    ok(c, &["LPUSH", "list", &format!("tx{phase}")]);
    ok(c, &["EXEC"]);
    ok(c, &["SET", &format!("ttl:{phase}"), "v", "EX", "3600"]);
    if phase == 2 {
        ok(c, &["DEL", "hash"]);
        ok(c, &["SREM", "set", "m0"]);
    }
}

fn pitr(flavor: RedisFlavor) {
    let server = RedisServer::start(flavor);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut c = server.connect();
    ok(&mut c, &["SET", "before-agent", "1"]);
    ok(&mut c, &["RPUSH", "list", "seed"]);
    let mut agent = StreamingAgent::start(
        &server.url(),
        &repo,
        "200ms",
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let first_snapshot = now_ms();
    let mut targets: Vec<(i64, BTreeMap<String, String>)> = Vec::new();
    for phase in 0..4 {
        workload(&mut c, phase);
        std::thread::sleep(Duration::from_millis(400));
        targets.push((now_ms(), dump(&server)));
        std::thread::sleep(Duration::from_millis(400));
    }
    // Traffic after the last target: the stream must reach past it.
    workload(&mut c, 4);
    std::thread::sleep(Duration::from_millis(800));
    assert!(agent.terminate(), "{}", agent.log_text());
    let final_state = dump(&server);

    for (i, (t, expected)) in targets.iter().enumerate() {
        let restored = restore_and_start(
            &repo,
            &tmp.path().join(format!("at{i}")),
            Some(*t),
            flavor,
            &[],
        );
        let got = dump_port(restored.port, None);
        let markers = got.keys().filter(|k| k.contains("marker:")).count();
        assert_eq!(markers, 40 * (i + 1), "{flavor}: markers at target {i}");
        assert_eq!(&got, expected, "{flavor}: state at target {i}");
    }
    let restored = restore_and_start(&repo, &tmp.path().join("latest"), None, flavor, &[]);
    assert_eq!(
        dump_port(restored.port, None),
        final_state,
        "{flavor}: latest"
    );
    drop(restored);
    // One appendonly.aof with an RDB preamble, for servers without multi-part AOF.
    let single = tmp.path().join("single");
    let (single_s, bin, at) = (
        single.display().to_string(),
        server_bin(flavor),
        format!("@{}", targets[2].0),
    );
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            &single_s,
            "--to-time",
            &at,
            "--format",
            "aof-single",
            "--start",
            &bin,
        ],
        &[],
    );
    let restored = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    // The server upgrades the single file into its own appendonlydir when it starts.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("single/appendonly.aof"),
        "{}",
        text(&out)
    );
    let restored = restored.unwrap_or_else(|| RestoredServer::from_output(&out));
    assert_eq!(
        dump_port(restored.port, None),
        targets[2].1,
        "{flavor}: aof-single"
    );

    // Refusals name the times involved.
    let target = tmp.path().join("refused").display().to_string();
    let early = format!("@{}", first_snapshot - 60_000);
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            &target,
            "--to-time",
            &early,
        ],
        &[],
    );
    assert!(
        !out.status.success() && text(&out).contains("no generation starts at or before"),
        "{}",
        text(&out)
    );
    let late = format!("@{}", now_ms() + 3_600_000);
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            &target,
            "--to-time",
            &late,
        ],
        &[],
    );
    assert!(
        !out.status.success() && text(&out).contains("latest restorable time"),
        "{}",
        text(&out)
    );
    let mid = format!("@{}", targets[1].0);
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            &target,
            "--to-time",
            &mid,
            "--format",
            "rdb",
        ],
        &[],
    );
    assert!(
        !out.status.success() && text(&out).contains("--format aof"),
        "{}",
        text(&out)
    );
}

#[test]
fn redis7_point_in_time_restore_matches_the_state_at_each_target() {
    pitr(RedisFlavor::Redis7);
}

#[test]
fn valkey9_point_in_time_restore_matches_the_state_at_each_target() {
    pitr(RedisFlavor::Valkey9);
}

#[test]
fn killed_agent_resumes_with_psync_and_loses_nothing() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut agent = StreamingAgent::start(
        &server.url(),
        &repo,
        "100ms",
        &[],
        tmp.path().join("a1.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let port = server.port();
    let writer = std::thread::spawn(move || {
        let mut c = RespConnection::connect(port).unwrap();
        for i in 0..3000 {
            ok(&mut c, &["SET", &format!("marker:{i}"), "x"]);
            ok(&mut c, &["INCR", "counter"]);
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    let mut agent = StreamingAgent::start(
        &server.url(),
        &repo,
        "100ms",
        &[],
        tmp.path().join("a2.log"),
    );
    agent.wait_for_log("resumed with PSYNC", Duration::from_secs(60));
    writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(agent.terminate(), "{}", agent.log_text());
    assert!(
        !agent.log_text().contains("new generation"),
        "{}",
        agent.log_text()
    );
    assert_eq!(generations(tmp.path()), 1);
    let restored = restore_and_start(&repo, &tmp.path().join("r"), None, RedisFlavor::Redis7, &[]);
    let got = dump_port(restored.port, None);
    assert_eq!(
        got.get("0/counter").map(String::as_str),
        Some("string \"3000\"")
    );
    assert_eq!(got, dump(&server));
}

#[test]
fn master_restarted_with_a_new_replid_starts_a_new_generation() {
    let mut server = RedisServer::start(RedisFlavor::Valkey9);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    // One agent process throughout: it reconnects on its own.
    let mut agent =
        StreamingAgent::start(&server.url(), &repo, "100ms", &[], tmp.path().join("a.log"));
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    assert!(server.cmd(&["SET", "old", "1"]).is_ok());
    std::thread::sleep(Duration::from_millis(400));
    // No persistence: the restarted master has an empty dataset and a new replication ID.
    server.restart();
    assert!(server.cmd(&["SET", "new", "2"]).is_ok());
    agent.wait_for_log_count("snapshot stored", 2, Duration::from_secs(90));
    assert!(
        agent.log_text().contains("new generation"),
        "{}",
        agent.log_text()
    );
    assert!(server.cmd(&["SET", "after", "3"]).is_ok());
    std::thread::sleep(Duration::from_millis(400));
    assert!(agent.terminate());
    assert_eq!(generations(tmp.path()), 2);
    let restored = restore_and_start(
        &repo,
        &tmp.path().join("r"),
        None,
        RedisFlavor::Valkey9,
        &[],
    );
    assert_eq!(dump_port(restored.port, None), dump(&server));
}

#[test]
fn snapshot_every_rotates_generations_and_every_moment_stays_restorable() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut c = server.connect();
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &["--max-lag", "200ms", "--snapshot-every", "1s"],
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut targets = Vec::new();
    for phase in 0..6 {
        workload(&mut c, phase);
        std::thread::sleep(Duration::from_millis(300));
        targets.push((now_ms(), dump(&server)));
        std::thread::sleep(Duration::from_millis(300));
    }
    workload(&mut c, 6);
    std::thread::sleep(Duration::from_millis(800));
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("switched to the new generation"), "{log}");
    assert!(generations(tmp.path()) >= 3, "{log}");
    for (i, (t, expected)) in targets.iter().enumerate() {
        let restored = restore_and_start(
            &repo,
            &tmp.path().join(format!("at{i}")),
            Some(*t),
            RedisFlavor::Redis7,
            &[],
        );
        assert_eq!(&dump_port(restored.port, None), expected, "target {i}");
    }
}

#[test]
fn redis7_snapshot_over_tls_with_a_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    syncbridge_tests::tls::make_test_certs(&certs);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = |f: &str| certs.join(f).display().to_string();
    let server = RedisServer::builder(RedisFlavor::Redis7)
        .args([
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &c("server.crt"),
        ])
        .args([
            "--tls-key-file",
            &c("server.key"),
            "--tls-ca-cert-file",
            &c("ca.crt"),
        ])
        .start();
    load_dataset(&server);
    let repo = file_repo(tmp.path());
    let source = format!("rediss://127.0.0.1:{tls_port}");
    let (ca, cert, key) = (c("ca.crt"), c("client.crt"), c("client.key"));
    let out = run_agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &source,
            "--repo",
            &repo,
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let restored = restore_and_start(&repo, &tmp.path().join("r"), None, RedisFlavor::Redis7, &[]);
    assert_eq!(dump_port(restored.port, None), dump(&server));
    // Without the client certificate the server refuses; without the CA the chain fails.
    let out = run_agent(
        &[
            "redis", "snapshot", "--source", &source, "--repo", &repo, "--tls-ca", &ca,
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let out = run_agent(
        &["redis", "snapshot", "--source", &source, "--repo", &repo],
        &[],
    );
    assert!(
        !out.status.success() && text(&out).contains("TLS handshake"),
        "{}",
        text(&out)
    );
}

/// Largest output buffer (`omem`) the master holds for a replica right now.
fn replica_omem(server: &RedisServer) -> u64 {
    let list = server.cmd(&["CLIENT", "LIST", "TYPE", "replica"]);
    list.as_str()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|f| f.strip_prefix("omem=")?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn slow_store_is_absorbed_by_the_spool_and_nothing_is_lost() {
    use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let env = s3.env_with_endpoint(&proxy.url());
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let repo = s3.repo_url("spool");
    let spool_s = spool.display().to_string();
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &["--max-lag", "100ms", "--spool", &spool_s],
        &env,
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    // From now on every PUT to the store takes 1.5 s.
    proxy.add_rule(FaultRule::method("PUT", Fault::Delay(Duration::from_millis(1500))).always());
    let mut c = server.connect();
    let value = "v".repeat(4000);
    let mut max_spooled = 0;
    let mut max_omem = 0;
    // About 8 MB/s for 5 s, pipelined in small batches: a rate the agent easily reads,
    // but 40 MB in all, far more than the socket buffers hold while the store stalls.
    for batch in 0..100 {
        for i in 0..100 {
            c.send(&["SET", &format!("marker:{batch}:{i}"), &value])
                .unwrap();
        }
        for _ in 0..100 {
            assert!(c.read_reply().unwrap().is_ok());
        }
        max_omem = max_omem.max(replica_omem(&server));
        max_spooled = max_spooled.max(std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(
        max_spooled > 0,
        "the spool was never used:\n{}",
        agent.log_text()
    );
    // The agent kept reading: the master never buffered more than a few commands for it.
    assert!(
        max_omem < 1 << 20,
        "master output buffer for the agent reached {max_omem} bytes"
    );
    proxy.clear_rules();
    // Every write is acknowledged by the agent once it is stored (WAIT counts it): only
    // then is stopping it a test of "nothing is lost" rather than of how far behind a
    // loaded machine let it fall (SIGTERM stores what was received, not what the master
    // still had to send).
    let waited = c.cmd(&["WAIT", "1", "60000"]).unwrap();
    assert_eq!(
        waited.as_int(),
        Some(1),
        "the agent never stored everything:\n{}",
        agent.log_text()
    );
    assert!(agent.terminate(), "{}", agent.log_text());
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool not drained"
    );
    let restored = restore_and_start(
        &repo,
        &tmp.path().join("r"),
        None,
        RedisFlavor::Redis7,
        &s3.env(),
    );
    assert_eq!(dump_port(restored.port, None), dump(&server));
}

#[test]
fn full_spool_is_reported_reading_pauses_and_nothing_is_lost() {
    use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let env = s3.env_with_endpoint(&proxy.url());
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool").display().to_string();
    let repo = s3.repo_url("fullspool");
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &[
            "--max-lag",
            "100ms",
            "--spool",
            &spool,
            "--spool-limit-mib",
            "1",
        ],
        &env,
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    proxy.add_rule(FaultRule::method("PUT", Fault::Delay(Duration::from_millis(1000))).always());
    let mut c = server.connect();
    let value = "w".repeat(4000);
    for batch in 0..40 {
        for i in 0..100 {
            c.send(&["SET", &format!("k:{batch}:{i}"), &value]).unwrap();
        }
        for _ in 0..100 {
            assert!(c.read_reply().unwrap().is_ok());
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    agent.wait_for_log("the spool is full", Duration::from_secs(30));
    proxy.clear_rules();
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.terminate(), "{}", agent.log_text());
    let restored = restore_and_start(
        &repo,
        &tmp.path().join("r"),
        None,
        RedisFlavor::Redis7,
        &s3.env(),
    );
    assert_eq!(dump_port(restored.port, None), dump(&server));
}

#[test]
fn verify_proves_generations_and_names_a_missing_chunk() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut agent = StreamingAgent::start(
        &server.url(),
        &repo,
        "100ms",
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut c = server.connect();
    // Each phase in its own chunk: wait until the agent stored it (on a loaded machine the
    // agent may otherwise read several phases at once and cut one chunk for them).
    let chunk_count = || {
        std::fs::read_dir(tmp.path().join("repo/redis/gen"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|g| std::fs::read_dir(g.path().join("chunks")).ok())
            .map(|d| d.count())
            .sum::<usize>()
    };
    for phase in 0..4 {
        let before = chunk_count();
        workload(&mut c, phase);
        assert!(
            {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    if chunk_count() > before {
                        break true;
                    }
                    if std::time::Instant::now() > deadline {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
            "phase {phase} was never stored:\n{}",
            agent.log_text()
        );
    }
    assert!(agent.terminate(), "{}", agent.log_text());
    let out = run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" OK: "),
        "{}",
        text(&out)
    );

    // Lose a chunk in the middle: verify names the gap, restore past it refuses.
    let gen_dir = std::fs::read_dir(tmp.path().join("repo/redis/gen"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut chunks: Vec<_> = std::fs::read_dir(gen_dir.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    chunks.sort();
    assert!(chunks.len() >= 3, "{chunks:?}");
    std::fs::remove_file(&chunks[1]).unwrap();
    let out = run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("DAMAGED") && text(&out).contains("gap"),
        "{}",
        text(&out)
    );
    let target = tmp.path().join("r").display().to_string();
    let late = format!("@{}", now_ms());
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            &target,
            "--to-time",
            &late,
        ],
        &[],
    );
    assert!(
        !out.status.success() && text(&out).contains("gap before it"),
        "{}",
        text(&out)
    );
}

#[test]
fn wait_returns_once_the_agent_has_stored_the_write() {
    let server = RedisServer::start(RedisFlavor::Valkey9);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut agent = StreamingAgent::start(
        &server.url(),
        &repo,
        "200ms",
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut c = server.connect();
    ok(&mut c, &["SET", "acked", "1"]);
    // WAIT sends REPLCONF GETACK; the agent answers with the offset it has stored.
    let started = std::time::Instant::now();
    let n = ok(&mut c, &["WAIT", "1", "10000"]).as_int();
    assert_eq!(n, Some(1), "{}", agent.log_text());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Stored means restorable: kill -9 now and the write is there.
    agent.kill9();
    let restored = restore_and_start(
        &repo,
        &tmp.path().join("r"),
        None,
        RedisFlavor::Valkey9,
        &[],
    );
    assert_eq!(
        dump_port(restored.port, None)
            .get("0/acked")
            .map(String::as_str),
        Some("string \"1\"")
    );
}

#[test]
fn failover_continue_with_a_new_replid_is_adopted_without_a_new_snapshot() {
    let master = RedisServer::start(RedisFlavor::Redis7);
    let replica = RedisServer::builder(RedisFlavor::Redis7)
        .args(["--replicaof", "127.0.0.1", &master.port().to_string()])
        .start();
    let synced = |s: &RedisServer| {
        s.info("replication")
            .get("master_link_status")
            .map(String::as_str)
            == Some("up")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !synced(&replica) {
        assert!(std::time::Instant::now() < deadline, "replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    // The agent hangs off the replica, which is then promoted (a failover).
    let mut agent = StreamingAgent::start(
        &replica.url(),
        &repo,
        "100ms",
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    assert!(master.cmd(&["SET", "before", "1"]).is_ok());
    std::thread::sleep(Duration::from_millis(500));
    let old_id = replica.info("replication")["master_replid"].clone();
    assert!(replica.cmd(&["REPLICAOF", "NO", "ONE"]).is_ok());
    let new_id = replica.info("replication")["master_replid"].clone();
    assert_ne!(old_id, new_id);
    assert!(replica.cmd(&["SET", "after", "2"]).is_ok());
    agent.wait_for_log(&new_id, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("resumed with PSYNC") && !log.contains("new generation"),
        "{log}"
    );
    assert_eq!(generations(tmp.path()), 1);
    let restored = restore_and_start(&repo, &tmp.path().join("r"), None, RedisFlavor::Redis7, &[]);
    assert_eq!(dump_port(restored.port, None), dump(&replica));
}

/// SIGTERM right after a pipelined burst, without WAIT: every write the master had
/// acknowledged to its client is in the restore. The master propagates a write to its
/// replicas in the same event-loop turn as it answers the client, so those bytes are in
/// the agent's socket (or on their way) when the signal lands; the stop drains them.
#[test]
fn sigterm_right_after_a_burst_stores_every_acknowledged_write() {
    let server = RedisServer::start(RedisFlavor::Valkey9);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut agent = StreamingAgent::start(
        &server.url(),
        &repo,
        "1s",
        &[],
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut c = server.connect();
    let value = "v".repeat(512);
    const N: usize = 20_000;
    for i in 0..N {
        c.send(&["SET", &format!("burst:{i}"), &value]).unwrap();
    }
    c.send(&["INCR", "burst:last"]).unwrap();
    for _ in 0..=N {
        let r = c.read_reply().unwrap();
        assert!(!matches!(r, RespValue::Error(_)), "{r}");
    }
    // Every write is acknowledged: stop now, no WAIT.
    assert!(agent.terminate(), "{}", agent.log_text());
    assert!(
        agent
            .log_text()
            .contains("stopping: storing what the master has already sent"),
        "{}",
        agent.log_text()
    );
    let restored = restore_and_start(
        &repo,
        &tmp.path().join("r"),
        None,
        RedisFlavor::Valkey9,
        &[],
    );
    let got = dump_port(restored.port, None);
    assert_eq!(
        got.get("0/burst:last").map(String::as_str),
        Some("string \"1\""),
        "the last acknowledged write is missing"
    );
    assert_eq!(got, dump(&server));
}

/// A slow repository between `+FULLRESYNC` and the snapshot (here its marker check takes
/// 0.8 s per request) must not open a gap between two generations: a restore to a moment
/// in it has every write made up to that moment. A generation's snapshot time is when the
/// master forked, not when the agent got round to reading the snapshot.
/// The new generation's connection reads the commands that followed its snapshot only after
/// the snapshot is stored; they keep the times the old connection read them at.
#[test]
fn moments_while_a_new_generation_waits_for_a_slow_store_are_restorable() {
    use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let env = s3.env_with_endpoint(&proxy.url());
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = s3.repo_url("gap");
    let mut c = server.connect();
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &["--max-lag", "100ms", "--snapshot-every", "1s"],
        &env,
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    for method in ["GET", "PUT", "HEAD"] {
        proxy.add_rule(
            FaultRule::method(method, Fault::Delay(Duration::from_millis(800)))
                .path_contains("syncbridge-repo")
                .always(),
        );
    }
    let mut targets = Vec::new();
    for phase in 0..16 {
        workload(&mut c, phase);
        std::thread::sleep(Duration::from_millis(250));
        targets.push((now_ms(), dump(&server)));
        std::thread::sleep(Duration::from_millis(100));
    }
    // A write after the last moment, so the stream provably covers it.
    ok(&mut c, &["SET", "after", "1"]);
    // (While it switches generations the agent is connected twice: WAIT may count 2.)
    let waited = c.cmd(&["WAIT", "1", "60000"]).unwrap();
    assert!(waited.as_int() >= Some(1), "{}", agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("switched to the new generation"), "{log}");
    assert_moments_restore(&repo, tmp.path(), &targets, &s3.env(), &log);
}

/// Restores each `(moment, expected dump)`; on a mismatch, says which moment and shows the
/// repository's generations and the agent's log.
fn assert_moments_restore(
    repo: &str,
    dir: &std::path::Path,
    targets: &[(i64, std::collections::BTreeMap<String, String>)],
    env: &[(String, String)],
    log: &str,
) {
    for (i, (t, expected)) in targets.iter().enumerate() {
        let restored = restore_and_start(
            repo,
            &dir.join(format!("at{i}")),
            Some(*t),
            RedisFlavor::Redis7,
            env,
        );
        let got = dump_port(restored.port, None);
        if let Some(diff) = dump_difference(expected, &got) {
            let list = run_agent(&["list", "--repo", repo], env);
            panic!(
                "target {i} (@{t}): {diff}\nlist:\n{}\nlog:\n{log}",
                text(&list)
            );
        }
    }
}

/// While the upload queue is full (a slow store, no spool) the agent stops reading, and
/// commands are read late. Their times must still be when the master executed them (the
/// offset probe bounds it), or a restore to a moment just after a write would leave it out
/// and succeed.
#[test]
fn moments_while_reading_waits_for_a_slow_store_are_restorable() {
    use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let env = s3.env_with_endpoint(&proxy.url());
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = s3.repo_url("late");
    let mut c = server.connect();
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &["--max-lag", "100ms"],
        &env,
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    proxy.add_rule(
        FaultRule::method("PUT", Fault::Delay(Duration::from_millis(1500)))
            .path_contains("/chunks/")
            .always(),
    );
    let mut targets = Vec::new();
    for phase in 0..10 {
        // Writes spread over about 300 ms: a chunk every 25 ms, four uploads in flight
        // of 1.5 s each, so the queue is full and reading waits.
        for part in 0..10 {
            for i in 0..5 {
                ok(&mut c, &["SET", &format!("late:{phase}:{part}:{i}"), "1"]);
            }
            ok(&mut c, &["INCR", "counter"]);
            std::thread::sleep(Duration::from_millis(30));
        }
        std::thread::sleep(Duration::from_millis(300));
        targets.push((now_ms(), dump(&server)));
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&mut c, &["SET", "after", "1"]);
    let waited = c.cmd(&["WAIT", "1", "60000"]).unwrap();
    assert!(waited.as_int() >= Some(1), "{}", agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert_moments_restore(&repo, tmp.path(), &targets, &s3.env(), &log);
}

/// When the spool is full the agent stops reading and commands arrive seconds late; the
/// offset probe (`INFO replication` on its own connection) still dates each command by when
/// the master had executed it, so every moment restores exactly.
#[test]
fn moments_while_a_full_spool_holds_reading_back_are_restorable() {
    use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let env = s3.env_with_endpoint(&proxy.url());
    let server = RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = s3.repo_url("spoolfull");
    let spool = tmp.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let mut c = server.connect();
    let mut agent = StreamingAgent::start_with(
        &server.url(),
        &repo,
        &[
            "--max-lag",
            "100ms",
            "--spool",
            spool_s,
            "--spool-limit-mib",
            "1",
        ],
        &env,
        tmp.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    proxy.add_rule(
        FaultRule::method("PUT", Fault::Delay(Duration::from_millis(1000)))
            .path_contains("/chunks/")
            .always(),
    );
    let value = "v".repeat(16 << 10);
    let mut targets = Vec::new();
    for phase in 0..6 {
        // 640 KiB a phase in 10 parts: the 1 MiB spool fills and reading stops.
        for part in 0..10 {
            for i in 0..4 {
                ok(&mut c, &["SET", &format!("big:{phase}:{part}:{i}"), &value]);
            }
            ok(&mut c, &["INCR", "counter"]);
            std::thread::sleep(Duration::from_millis(30));
        }
        std::thread::sleep(Duration::from_millis(300));
        targets.push((now_ms(), dump(&server)));
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&mut c, &["SET", "after", "1"]);
    let waited = c.cmd(&["WAIT", "1", "90000"]).unwrap();
    assert!(waited.as_int() >= Some(1), "{}", agent.log_text());
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("the spool is full"), "{log}");
    assert_moments_restore(&repo, tmp.path(), &targets, &s3.env(), &log);
}
