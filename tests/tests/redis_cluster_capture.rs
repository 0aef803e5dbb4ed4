//! The agent pointed at one node of a real Redis Cluster / Valkey Cluster (issue 15, the
//! runbook's mistake of backing up pod 0 alone): `run` told `redis.cluster = false` detects
//! cluster mode and refuses, naming the slots it would capture and the options, before
//! writing anything (`redis stream`, `redis snapshot` and `run` otherwise capture the whole
//! cluster: redis_cluster_stream.rs, redis_cluster_run.rs); with
//! `--cluster-shard-only` it captures that node's shard, and a restore holds exactly the
//! keys of that master's slots. An ACL without `+info` / `+cluster|…` gets the ACL to add.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use redis_support::*;
use syncbridge_tests::redis::{RedisFlavor, RespValue};
use syncbridge_tests::redis_cluster::{dump_cluster, RedisCluster};

fn file_repo(dir: &Path) -> String {
    format!("file://{}", dir.join("repo").display())
}

/// Generations stored (0 when the repository was never created).
fn generations(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("repo/redis/gen"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Keys of every shape spread over all slots: strings, hash-tagged groups written with
/// MULTI/EXEC-free multi-key commands, collections and TTLs.
fn load(c: &RedisCluster, tag: &str) {
    let mut client = c.client();
    for i in 0..300 {
        let key = format!("{tag}:k:{i}");
        client.set(key.as_bytes(), format!("v{i}").as_bytes());
    }
    for i in 0..20 {
        let h = format!("{tag}:{{user{i}}}:profile");
        let l = format!("{tag}:{{user{i}}}:events");
        let t = format!("{tag}:{{user{i}}}:session");
        let r = client.cmd(
            h.as_bytes(),
            &["HSET", &h, "name", &format!("n{i}"), "age", "7"],
        );
        assert!(!matches!(r, RespValue::Error(_)), "{r}");
        let r = client.cmd(l.as_bytes(), &["RPUSH", &l, "a", "b", &i.to_string()]);
        assert!(!matches!(r, RespValue::Error(_)), "{r}");
        let r = client.cmd(t.as_bytes(), &["SET", &t, "s", "EX", "3600"]);
        assert!(r.is_ok(), "{r}");
    }
}

/// `dump_port` of a restored server, keyed like `dump_cluster` (database 0 only, no `0/`).
fn restored_dump(port: u16) -> BTreeMap<String, String> {
    dump_port(port, None)
        .into_iter()
        .map(|(k, v)| {
            let key = k
                .strip_prefix("0/")
                .unwrap_or_else(|| panic!("restored key {k} outside database 0"))
                .to_owned();
            (key, v)
        })
        .collect()
}

fn restore_and_start(repo: &str, target: &Path, flavor: RedisFlavor) -> RestoredServer {
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let out = run_agent(
        &[
            "redis", "restore", "--repo", repo, "--target", &target_s, "--start", &bin,
        ],
        &[],
    );
    let server = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    server.unwrap_or_else(|| RestoredServer::from_output(&out))
}

#[test]
fn shard_only_snapshot_restores_exactly_that_masters_keys() {
    let flavor = RedisFlavor::Redis7;
    let c = RedisCluster::start(flavor, 3, 0);
    load(&c, "snap");
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let node = c.node(1);
    let expected = dump_cluster(&[node.port()], None);
    let everything = c.dump();
    assert!(
        !expected.is_empty() && expected.len() < everything.len(),
        "{} of {} keys on the middle master",
        expected.len(),
        everything.len()
    );

    let out = run_agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &node.url(),
            "--repo",
            &repo,
            "--cluster-shard-only",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "cluster:      this shard only: slots 5461-10922 (5462 of 16384, one of 3 masters)"
        ),
        "{stdout}"
    );
    assert_eq!(generations(tmp.path()), 1);

    let restored = restore_and_start(&repo, &tmp.path().join("r"), flavor);
    assert_eq!(restored_dump(restored.port), expected);
}

#[test]
fn shard_only_stream_logs_its_slots_and_warns_when_they_change() {
    let flavor = RedisFlavor::Valkey9;
    let c = RedisCluster::start(flavor, 3, 0);
    load(&c, "before");
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let node = c.node(0);
    let mut agent = StreamingAgent::start_with(
        &node.url(),
        &repo,
        &["--max-lag", "200ms", "--cluster-shard-only"],
        &[],
        tmp.path().join("stream.log"),
    );
    agent.wait_for_log("streaming this shard only", Duration::from_secs(60));
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "127.0.0.1:{} is one of 3 masters of a Redis/Valkey Cluster and owns 5461 of 16384 slots (0-5460)",
            node.port()
        )),
        "{log}"
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    load(&c, "during");

    // Ten slots move to the streamed master (their keys arrive as RESTORE in its stream);
    // the agent sees the new ranges on its next connection.
    c.migrate_slots(1, 0, 5461..5471);
    let mut admin = node.connect();
    let killed = admin.cmd(&["CLIENT", "KILL", "TYPE", "replica"]).unwrap();
    assert!(
        matches!(killed, RespValue::Integer(n) if n >= 1),
        "{killed}"
    );
    agent.wait_for_log(
        "the slots of the streamed shard changed",
        Duration::from_secs(60),
    );
    let log = agent.log_text();
    assert!(log.contains("owns 5471 of 16384 slots (0-5470)"), "{log}");
    load(&c, "after");
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.terminate(), "{}", agent.log_text());

    let expected = dump_cluster(&[node.port()], None);
    assert!(expected.keys().any(|k| k.starts_with("after:")));
    let restored = restore_and_start(&repo, &tmp.path().join("r"), flavor);
    assert_eq!(restored_dump(restored.port), expected);
}

#[test]
fn an_acl_without_info_or_cluster_gets_the_acl_to_add() {
    let c = RedisCluster::start(RedisFlavor::Redis7, 3, 0);
    let node = c.node(0);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let source = format!("redis://backup:backuppw@127.0.0.1:{}", node.port());
    let mut admin = node.connect();
    // Each step grants one more command: the ACL documented before cluster detection, then
    // +info, then +cluster|myid (CLUSTER SHARDS refused falls back to CLUSTER NODES).
    let steps: [(&[&str], Option<&str>); 5] = [
        (&[], Some("INFO cluster")),
        (&["+info"], Some("CLUSTER MYID")),
        (&["+info", "+cluster|myid"], Some("CLUSTER NODES")),
        // Without +cluster|shards: the topology comes from CLUSTER NODES.
        (&["+info", "+cluster|myid", "+cluster|nodes"], None),
        // The documented ACL.
        (
            &[
                "+info",
                "+cluster|myid",
                "+cluster|shards",
                "+cluster|nodes",
            ],
            None,
        ),
    ];
    for (extra, refused) in steps {
        let mut acl = vec![
            "ACL",
            "SETUSER",
            "backup",
            "reset",
            "on",
            ">backuppw",
            "+psync",
            "+replconf",
            "+sync",
            "+ping",
        ];
        acl.extend(extra);
        assert!(admin.cmd(&acl).unwrap().is_ok());
        // Shard only: the user exists on this node alone.
        let out = run_agent(
            &[
                "redis",
                "snapshot",
                "--source",
                &source,
                "--repo",
                &repo,
                "--cluster-shard-only",
            ],
            &[],
        );
        let all = text(&out);
        assert_eq!(out.status.success(), refused.is_none(), "{extra:?}: {all}");
        match refused {
            Some(command) => {
                assert!(
                    all.contains(&format!("127.0.0.1:{} refused {command}", node.port())),
                    "{extra:?}: {all}"
                );
                assert!(
                    all.contains("+info +cluster|myid +cluster|shards +cluster|nodes"),
                    "{extra:?}: {all}"
                );
            }
            // Detection passed: this master's slots are captured.
            None => assert!(
                all.contains(
                    "cluster:      this shard only: slots 0-5460 (5461 of 16384, one of 3 masters)"
                ),
                "{extra:?}: {all}"
            ),
        }
        if refused.is_some() {
            assert_eq!(generations(tmp.path()), 0, "{all}");
        }
    }
}

/// `run --config` with `redis.cluster = false`: the redis job refuses a cluster node (the process exits non-zero, having
/// written nothing); `--set redis.cluster_shard_only=true` streams that node's shard.
#[test]
fn run_with_cluster_false_refuses_a_cluster_node_unless_cluster_shard_only() {
    let c = RedisCluster::start(RedisFlavor::Redis7, 3, 0);
    load(&c, "run");
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let node = c.node(2);
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nsource = \"{}\"\nrepository = \"{repo}\"\nmax_lag = \"200ms\"\ncluster = false\n",
            node.url()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let out = agent().args(["run", "--config", &config]).output().unwrap();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains(&format!(
            "127.0.0.1:{} is one of 3 masters of a Redis/Valkey Cluster and owns 5461 of 16384 slots (10923-16383)",
            node.port()
        )),
        "{all}"
    );
    assert!(all.contains("redis.cluster_shard_only = true"), "{all}");
    assert_eq!(generations(tmp.path()), 0, "{all}");

    let log = tmp.path().join("run.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = agent()
        .args(["run", "--config", &config, "--set"])
        .arg("redis.cluster_shard_only=true")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(read().contains("streaming this shard only") && read().contains("snapshot stored")) {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("run did not stream the shard:\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", read());
    assert!(read().contains("slots=10923-16383"), "{}", read());
    assert_eq!(generations(tmp.path()), 1);
}
