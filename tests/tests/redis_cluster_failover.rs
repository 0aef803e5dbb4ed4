//! A master of a Redis Cluster / Valkey Cluster killed (`kill -9`) while clients keep
//! writing (issue 15, acceptance "failover under load"): its replica is promoted
//! (`CLUSTER FAILOVER FORCE`), the agent moves the shard's stream to it, and a whole-cluster
//! restore to moments after the failover equals the cluster's keys at those moments, key by
//! key.
//!
//! Replication is asynchronous, so at the kill the agent (one more replica of the dead
//! master) and the promoted replica may each hold writes the other lacks:
//!
//! - **The agent is behind** (`agent_behind_the_promoted_replica_continues_with_psync`): the
//!   agent is stopped (SIGSTOP) while a burst is written, so the replica holds more than the
//!   agent at the kill. The promoted replica keeps the old replication id as `replid2`
//!   (psync2) and its backlog covers the gap: the shard continues with `PSYNC`, in the same
//!   generation, and the writes only the replica had arrive through it.
//! - **The agent is ahead** (`agent_ahead_of_the_promoted_replica_takes_a_new_generation`):
//!   the replica is stopped while a burst the master acknowledges is written; the agent
//!   reads it, the replica never does, and the cluster loses it with the master. The
//!   promoted replica refuses `PSYNC` at the agent's offset (past its history), so the shard
//!   takes a new generation; a restore to a moment before the kill still holds the burst
//!   (what the old master held then), and no moment after the failover does.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis_support::*;
use syncbridge_tests::redis::{RedisFlavor, RespConnection, RespValue};
use syncbridge_tests::redis_cluster::{dump_cluster, RedisCluster};
use wire::redis::cluster::{key_hash_slot, ClusterTopology, SLOT_COUNT};

/// Servers a cluster restore started, shut down when the test ends.
struct RestoredCluster {
    ports: Vec<u16>,
}

impl RestoredCluster {
    fn from_output(out: &std::process::Output) -> RestoredCluster {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ports = stdout
            .lines()
            .filter(|l| l.starts_with("server:"))
            .filter_map(|l| l.split("on 127.0.0.1:").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .filter_map(|p| p.parse().ok())
            .collect();
        RestoredCluster { ports }
    }
}

impl Drop for RestoredCluster {
    fn drop(&mut self) {
        for port in &self.ports {
            if let Ok(mut c) = RespConnection::connect(*port) {
                let _ = c.send(&["SHUTDOWN", "NOSAVE"]);
                let _ = c.read_reply();
            }
        }
    }
}

/// A client that survives a master's death: on a connection error or a redirect it reads
/// the slot owners again from any live node (the harness client keeps retrying the dead
/// port).
struct LoadClient {
    ports: Vec<u16>,
    owner: Vec<u16>,
    conns: HashMap<u16, RespConnection>,
    /// Commands retried after a connection error or `CLUSTERDOWN`: the load ran into the
    /// kill.
    retries: u64,
}

impl LoadClient {
    fn new(ports: Vec<u16>) -> LoadClient {
        let mut c = LoadClient {
            ports,
            owner: vec![0; usize::from(SLOT_COUNT)],
            conns: HashMap::new(),
            retries: 0,
        };
        assert!(c.refresh(), "no node gave a complete slot map");
        c
    }

    /// Reads the owners of every slot from the first live node whose view is complete.
    fn refresh(&mut self) -> bool {
        for &port in &self.ports {
            let Ok(mut conn) = RespConnection::connect(port) else {
                continue;
            };
            let Ok(reply) = conn.cmd(&["CLUSTER", "NODES"]) else {
                continue;
            };
            let Some(text) = reply.as_str() else { continue };
            let Ok(topology) = ClusterTopology::from_cluster_nodes(text) else {
                continue;
            };
            let mut owner = vec![0u16; usize::from(SLOT_COUNT)];
            for shard in topology.serving_shards() {
                let Some((_, port)) = shard.master.address() else {
                    continue;
                };
                for s in shard.slots.slots() {
                    owner[usize::from(s)] = port;
                }
            }
            if owner.iter().all(|&p| p != 0) {
                self.owner = owner;
                return true;
            }
        }
        false
    }

    /// Runs `cmds` (pipelined, on the node owning `key`'s slot) until every reply is not an
    /// error; panics after 30 s.
    fn run(&mut self, key: &str, cmds: &[Vec<String>]) {
        let slot = usize::from(key_hash_slot(key.as_bytes()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "{cmds:?} failed for 30 s");
            let port = self.owner[slot];
            let conn = match self.conns.entry(port) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    match RespConnection::connect(port) {
                        Ok(c) => e.insert(c),
                        Err(_) => {
                            self.retries += 1;
                            std::thread::sleep(Duration::from_millis(50));
                            self.refresh();
                            continue;
                        }
                    }
                }
            };
            let replies: std::io::Result<Vec<RespValue>> = (|| {
                for c in cmds {
                    conn.send(c)?;
                }
                cmds.iter().map(|_| conn.read_reply()).collect()
            })();
            let replies = match replies {
                Ok(r) => r,
                Err(_) => {
                    self.conns.remove(&port);
                    self.retries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                    self.refresh();
                    continue;
                }
            };
            let error = replies.iter().find_map(|r| match r {
                RespValue::Error(e) => Some(e.clone()),
                RespValue::Array(items) => items.iter().find_map(|i| match i {
                    RespValue::Error(e) => Some(e.clone()),
                    _ => None,
                }),
                _ => None,
            });
            match error {
                None => return,
                Some(e) if e.starts_with("MOVED") || e.starts_with("EXECABORT") => {
                    self.refresh();
                }
                Some(e) if e.starts_with("CLUSTERDOWN") || e.starts_with("TRYAGAIN") => {
                    self.retries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                    self.refresh();
                }
                Some(e) => panic!("{cmds:?}: {e}"),
            }
        }
    }
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

/// The workload: idempotent writes (a retried command after a connection error does
/// nothing twice) over all slots: timestamped markers, a MULTI/EXEC on hash-tagged keys,
/// keys with a TTL, deletions.
struct Load {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<u64>>,
}

impl Load {
    fn start(ports: Vec<u16>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, p, pd, w) = (stop.clone(), pause.clone(), paused.clone(), written.clone());
        let handle = std::thread::spawn(move || {
            let mut client = LoadClient::new(ports);
            let mut i: u64 = 0;
            while !s.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    pd.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                pd.store(false, Ordering::SeqCst);
                let now = now_ms().to_string();
                let key = format!("load:{}", i % 3000);
                client.run(&key, &[cmd(&["SET", &key, &format!("{i}@{now}")])]);
                if i % 10 == 0 {
                    let g = i % 40;
                    let a = format!("{{grp{g}}}:a");
                    let b = format!("{{grp{g}}}:b");
                    client.run(
                        &a,
                        &[
                            cmd(&["MULTI"]),
                            cmd(&["SET", &a, &i.to_string()]),
                            cmd(&["HSET", &b, "at", &now, "i", &i.to_string()]),
                            cmd(&["EXEC"]),
                        ],
                    );
                }
                if i % 25 == 0 {
                    let t = format!("ttl:{}", i % 200);
                    client.run(&t, &[cmd(&["SET", &t, &now, "EX", "3600"])]);
                }
                if i % 50 == 7 {
                    let gone = format!("load:{}", (i / 2) % 3000);
                    client.run(&gone, &[cmd(&["DEL", &gone])]);
                }
                i += 1;
                w.store(i, Ordering::SeqCst);
                if i % 200 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            client.retries
        });
        Load {
            stop,
            pause,
            paused,
            written,
            handle: Some(handle),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Stops writing for `f` (between two commands).
    fn paused<T>(&self, f: impl FnOnce() -> T) -> T {
        self.pause.store(true, Ordering::SeqCst);
        while !self.paused.load(Ordering::SeqCst) {
            assert!(
                self.handle.as_ref().is_some_and(|h| !h.is_finished()),
                "the load ended"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = f();
        self.pause.store(false, Ordering::SeqCst);
        out
    }

    /// Stops the load; returns how many commands it retried.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn info_field(port: u16, field: &str) -> String {
    let mut conn = RespConnection::connect(port).unwrap();
    let info = conn.cmd(&["INFO", "replication"]).unwrap();
    info.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO replication of port {port}"))
        .trim()
        .to_owned()
}

/// The offsets the replicas of the node on `port` acknowledged (`INFO replication`).
fn replica_offsets(port: u16) -> Vec<u64> {
    let mut conn = RespConnection::connect(port).unwrap();
    let info = conn.cmd(&["INFO", "replication"]).unwrap();
    info.as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("slave"))
        .filter_map(|l| {
            l.split(',')
                .find_map(|f| f.strip_prefix("offset="))
                .and_then(|o| o.parse().ok())
        })
        .collect()
}

/// Waits until every replica of every current master (the agent's stream among them)
/// acknowledged the master's offset.
fn wait_stored(c: &RedisCluster) {
    for &m in &c.current_masters() {
        let port = c.node(m).port();
        let target: u64 = info_field(port, "master_repl_offset").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let offsets = replica_offsets(port);
            if !offsets.is_empty() && offsets.iter().all(|&o| o >= target) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "port {port}: replicas at {offsets:?}, master at {target}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn restore_cluster(repo: &str, target: &Path, to: i64, flavor: RedisFlavor) -> RestoredCluster {
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let at = format!("@{to}");
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            repo,
            "--target",
            &target_s,
            "--to-time",
            &at,
            "--start",
            &bin,
        ],
        &[],
    );
    let restored = RestoredCluster::from_output(&out);
    assert!(out.status.success(), "{}: {}", target.display(), text(&out));
    assert!(
        text(&out).contains("cluster_state:ok, 16384 slots assigned"),
        "{}",
        text(&out)
    );
    restored
}

/// Keys that differ, by name only (values may be large).
fn diff(expected: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> String {
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    let differ: Vec<_> = got
        .iter()
        .filter(|(k, v)| expected.get(*k).is_some_and(|e| e != *v))
        .map(|(k, _)| k)
        .collect();
    format!("missing {missing:?}, extra {extra:?}, different {differ:?}")
}

/// Lines of `log` about `shard` (the shard's span names it) that contain `needle`.
fn shard_lines(log: &str, shard: &str, needle: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("shard{{shard={shard}}}")) && l.contains(needle))
        .count()
}

fn wait_shard_log(agent: &StreamingAgent, shard: &str, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shard_lines(&agent.log_text(), shard, needle) < n {
        assert!(
            Instant::now() < deadline,
            "{shard}: {needle:?} not logged {n} times:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn generations(dir: &Path, shard: &str) -> usize {
    std::fs::read_dir(dir.join(format!("repo/redis/cluster/shards/{shard}/redis/gen")))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), sig).unwrap();
}

/// `n` keys (`{prefix}:<i>`) whose slots node `node` owns.
fn keys_on(c: &RedisCluster, node: usize, prefix: &str, n: usize) -> Vec<String> {
    let map = c.slot_map();
    let id = c.node_id(node).to_owned();
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .filter(|k| map.owner_of_key(k.as_bytes()) == Some(id.as_str()))
        .take(n)
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AtTheKill {
    /// The agent holds less of the dead master's stream than the promoted replica.
    AgentBehind,
    /// The agent holds writes the promoted replica never received.
    AgentAhead,
}

fn failover_under_load(flavor: RedisFlavor, case: AtTheKill) {
    // A backlog that holds the burst below: the promoted replica can serve the agent's gap.
    let mut c = RedisCluster::builder(flavor, 3, 1)
        .arg("--repl-backlog-size")
        .arg("64mb")
        .start();
    {
        let mut client = c.client();
        for i in 0..300 {
            let key = format!("base:{i}");
            client.set(key.as_bytes(), b"0");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", tmp.path().join("repo").display());
    let mut agent = StreamingAgent::start_with(
        &c.node(0).url(),
        &repo,
        &[
            "--max-lag",
            "100ms",
            "--cluster-seed",
            &format!("127.0.0.1:{}", c.node(1).port()),
        ],
        &[],
        tmp.path().join("stream.log"),
    );
    agent.wait_for_log_count("snapshot stored", 3, Duration::from_secs(60));
    // Node 0 (shard s01, slots 0-5460) dies; `replica` replicates it.
    let victim = 0;
    let replica_id = c
        .topology()
        .serving_shards()
        .find(|s| s.master.id == c.node_id(victim))
        .unwrap()
        .replicas[0]
        .id
        .clone();
    let replica = c.index_of_id(&replica_id).unwrap();
    let victim_port = c.node(victim).port();
    let ports: Vec<u16> = c.nodes().iter().map(|n| n.port()).collect();
    let load = Load::start(ports);
    std::thread::sleep(Duration::from_millis(700));

    let burst = keys_on(&c, victim, "burst", 24);
    let mut direct = RespConnection::connect(victim_port).unwrap();
    let mut before_kill = None;
    let mut in_gap = None;
    match case {
        AtTheKill::AgentBehind => {
            // The agent reads nothing for a while; the replica reads everything.
            signal(agent.pid(), Signal::SIGSTOP);
            let value = "b".repeat(128 * 1024);
            for k in &burst {
                assert!(direct.cmd(&["SET", k, &value]).unwrap().is_ok());
            }
            std::thread::sleep(Duration::from_millis(200));
            c.kill9(victim);
            signal(agent.pid(), Signal::SIGCONT);
        }
        AtTheKill::AgentAhead => {
            // The replica reads nothing; the master acknowledges the burst and the agent
            // reads it, more than the replica's socket can hold.
            let replica_pid = c.node(replica).pid().unwrap();
            signal(replica_pid, Signal::SIGSTOP);
            let value = "a".repeat(1024 * 1024);
            for k in &burst {
                assert!(direct.cmd(&["SET", k, &value]).unwrap().is_ok());
            }
            let target: u64 = info_field(victim_port, "master_repl_offset")
                .parse()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !replica_offsets(victim_port).iter().any(|&o| o >= target) {
                assert!(
                    Instant::now() < deadline,
                    "the agent did not read the burst"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
            before_kill = Some(now_ms());
            std::thread::sleep(Duration::from_millis(100));
            c.kill9(victim);
            signal(replica_pid, Signal::SIGCONT);
            // Between the kill and the new generation the shard's stream has a gap.
            std::thread::sleep(Duration::from_millis(300));
            in_gap = Some(now_ms());
        }
    }
    let written_at_kill = load.written();
    c.failover(replica, true);
    agent.wait_for_log(
        "the shard's master changed (a failover)",
        Duration::from_secs(30),
    );
    match case {
        AtTheKill::AgentBehind => wait_shard_log(&agent, "s01", "resumed with PSYNC", 1),
        AtTheKill::AgentAhead => {
            wait_shard_log(&agent, "s01", "cannot continue from offset", 1);
            wait_shard_log(&agent, "s01", "snapshot stored", 2);
        }
    }
    std::thread::sleep(Duration::from_millis(800));
    // Moments after the failover, the load paused just long enough to read the cluster.
    let moment = |load: &Load| {
        load.paused(|| {
            wait_stored(&c);
            std::thread::sleep(Duration::from_millis(300));
            let t = now_ms();
            let dump = c.dump();
            std::thread::sleep(Duration::from_millis(300));
            (t, dump)
        })
    };
    let first = moment(&load);
    std::thread::sleep(Duration::from_millis(800));
    let second = moment(&load);
    std::thread::sleep(Duration::from_millis(500));
    let written = load.written();
    let retries = load.finish();
    assert!(
        written > written_at_kill + 100,
        "the load went on after the failover: {written_at_kill} then {written}"
    );
    assert!(retries > 0, "the load ran into the dead master");
    wait_stored(&c);
    let last = c.dump();
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();

    // The burst: only the replica's copy survives the kill.
    let survived = burst
        .iter()
        .filter(|k| last.contains_key(k.as_str()))
        .count();
    match case {
        AtTheKill::AgentBehind => {
            assert_eq!(survived, burst.len(), "the replica had read the burst");
            assert_eq!(generations(tmp.path(), "s01"), 1);
            assert!(!log.contains("new generation"), "{log}");
            assert_eq!(shard_lines(&log, "s01", "snapshot stored"), 1, "{log}");
        }
        AtTheKill::AgentAhead => {
            assert!(
                survived < burst.len(),
                "the cluster lost part of the burst with the master"
            );
            assert_eq!(generations(tmp.path(), "s01"), 2);
            // Before the kill, the old master held the whole burst: so does the shard's
            // restore to then.
            let at = format!("@{}", before_kill.unwrap());
            let target = tmp.path().join("s01-before-kill");
            let target_s = target.display().to_string();
            let out = run_agent(
                &[
                    "redis",
                    "restore",
                    "--repo",
                    &repo,
                    "--shard",
                    "s01",
                    "--to-time",
                    &at,
                    "--target",
                    &target_s,
                    "--start",
                    &server_bin(flavor),
                ],
                &[],
            );
            let server = RestoredServer::try_from_output(&out);
            assert!(out.status.success(), "{}", text(&out));
            let held = dump_port(server.unwrap().port, None);
            for k in &burst {
                assert!(held.contains_key(&format!("0/{k}")), "{k} before the kill");
            }
            // A moment after the kill, before the new generation, is refused: the old
            // generation holds writes the cluster lost and is not extended past its end.
            let at = format!("@{}", in_gap.unwrap());
            let target = tmp.path().join("in-gap");
            let target_s = target.display().to_string();
            let out = run_agent(
                &[
                    "redis",
                    "restore",
                    "--repo",
                    &repo,
                    "--target",
                    &target_s,
                    "--to-time",
                    &at,
                ],
                &[],
            );
            assert!(!out.status.success(), "{}", text(&out));
            assert!(
                text(&out).contains("shard s01") && text(&out).contains("falls in a gap"),
                "{}",
                text(&out)
            );
        }
    }
    for shard in ["s02", "s03"] {
        assert_eq!(generations(tmp.path(), shard), 1, "{shard}");
    }
    // Two moments under load (a moment after the last write is past the end of the
    // backup: the time index ends at the last command).
    for (name, (t, expected)) in [("first", first), ("second", second)] {
        let restored = restore_cluster(&repo, &tmp.path().join(name), t, flavor);
        assert_eq!(restored.ports.len(), 3);
        let got = dump_cluster(&restored.ports, None);
        assert!(
            got == expected,
            "moment {name}: {}\n{}",
            diff(&expected, &got),
            log
        );
    }
}

#[test]
fn agent_behind_the_promoted_replica_continues_with_psync() {
    failover_under_load(RedisFlavor::Valkey9, AtTheKill::AgentBehind);
}

#[test]
fn agent_ahead_of_the_promoted_replica_takes_a_new_generation() {
    failover_under_load(RedisFlavor::Redis7, AtTheKill::AgentAhead);
}
