//! Proof that the cluster harness (`syncbridge_tests::redis_cluster`) builds real Redis 7 and
//! Valkey 9 clusters, and a cross-check of `wire::redis::cluster` against the servers: key
//! slots against `CLUSTER KEYSLOT`, `CLUSTER SHARDS` and `CLUSTER NODES` parsed into the same
//! topology, a failover and a slot migration seen in the parsed topology and slot map.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use syncbridge_tests::process::{process_is_alive, wait_until_gone};
use syncbridge_tests::redis::{parse_info, RedisFlavor, RespValue};
use syncbridge_tests::redis_cluster::RedisCluster;
use wire::redis::cluster::{
    key_hash_slot, ClusterTopology, NodeHealth, SlotMove, SlotRange, SlotRanges,
};

/// What the harness promised: per serving shard, master id, replica ids (failed ones
/// aside) and slots.
fn shape(t: &ClusterTopology) -> Vec<(String, Vec<String>, String)> {
    t.serving_shards()
        .map(|s| {
            (
                s.master.id.clone(),
                s.replicas
                    .iter()
                    .filter(|r| r.health != NodeHealth::Failed)
                    .map(|r| r.id.clone())
                    .collect(),
                s.slots.to_string(),
            )
        })
        .collect()
}

fn replication(c: &RedisCluster, i: usize) -> std::collections::BTreeMap<String, String> {
    parse_info(c.node(i).cmd(&["INFO", "replication"]).as_str().unwrap())
}

#[test]
fn three_masters_and_three_replicas_come_up_on_both_flavors() {
    for &flavor in RedisFlavor::all() {
        let c = RedisCluster::start(flavor, 3, 1);
        let expected: Vec<(String, Vec<String>, String)> = c
            .initial_slots()
            .iter()
            .enumerate()
            .map(|(m, r)| {
                (
                    c.node_id(m).to_owned(),
                    vec![c.node_id(3 + m).to_owned()],
                    r.to_string(),
                )
            })
            .collect();
        assert_eq!(
            expected.iter().map(|e| e.2.as_str()).collect::<Vec<_>>(),
            ["0-5460", "5461-10922", "10923-16383"],
            "{flavor}: slots split as redis-cli does"
        );
        let mut shard_ids = Vec::new();
        for i in 0..6 {
            let info = c.cluster_info(i);
            assert_eq!(info["cluster_state"], "ok", "{flavor} node {i}");
            assert_eq!(info["cluster_slots_assigned"], "16384");
            assert_eq!(info["cluster_known_nodes"], "6");
            assert_eq!(info["cluster_size"], "3");
            let role = replication(&c, i);
            if i >= 3 {
                assert_eq!(role["role"], "slave", "{flavor} node {i}");
                assert_eq!(role["master_link_status"], "up", "{flavor} node {i}");
                assert_eq!(
                    role["master_port"],
                    c.node(i - 3).port().to_string(),
                    "{flavor} node {i}"
                );
            }
            // A replica may list itself as a shard of its own for a moment after it settles
            // (CLUSTER SHARDS groups by the master it has heard of): ask again.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let shards = loop {
                match c.try_topology_of(i) {
                    Ok(t) => break t,
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("{flavor} node {i}: {e}; asking again");
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    Err(e) => panic!("{flavor} node {i} CLUSTER SHARDS: {e}"),
                }
            };
            let nodes = c.topology_from_nodes_of(i);
            assert_eq!(shape(&shards), expected, "{flavor} node {i} CLUSTER SHARDS");
            assert_eq!(shape(&nodes), expected, "{flavor} node {i} CLUSTER NODES");
            shards.check_coverage().unwrap();
            nodes.check_coverage().unwrap();
            assert_eq!(shards.slot_map().unwrap(), nodes.slot_map().unwrap());
            assert_eq!(shards.shards.len(), 3, "{flavor}: no slot-less master");
            for (m, s) in shards.shards.iter().enumerate() {
                assert_eq!(
                    s.master.address(),
                    Some(("127.0.0.1".to_owned(), c.node(m).port())),
                    "{flavor} node {i}"
                );
                assert_eq!(s.replicas[0].port, Some(c.node(3 + m).port()));
                assert_eq!(s.master.role, wire::redis::cluster::NodeRole::Master);
                assert_eq!(
                    nodes.shards[m].master.bus_port,
                    c.node(m).cluster_port(),
                    "{flavor}: CLUSTER NODES gives the bus port"
                );
            }
            shard_ids.push(
                shards
                    .shards
                    .iter()
                    .map(|s| s.id.clone())
                    .collect::<Vec<_>>(),
            );
        }
        // Shard ids: Valkey (and Redis 7.2+) has them, the same in every node's view and
        // equal to CLUSTER MYSHARDID; Debian's Redis 7.0 has neither.
        assert!(shard_ids.windows(2).all(|w| w[0] == w[1]), "{shard_ids:?}");
        match flavor {
            RedisFlavor::Redis7 => {
                assert!(shard_ids[0].iter().all(Option::is_none));
                assert!(matches!(
                    c.node(0).cmd(&["CLUSTER", "MYSHARDID"]),
                    RespValue::Error(_)
                ));
            }
            RedisFlavor::Valkey9 => {
                for (m, id) in shard_ids[0].iter().enumerate() {
                    let mine = c.node(m).cmd(&["CLUSTER", "MYSHARDID"]);
                    assert_eq!(id.as_deref(), mine.as_str(), "{flavor}");
                    let replica = c.node(3 + m).cmd(&["CLUSTER", "MYSHARDID"]);
                    assert_eq!(mine, replica, "{flavor}: a replica shares its shard id");
                }
            }
        }
    }
}

/// Keys of every shape the hash slot rules distinguish.
fn tricky_keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for i in 0..1500 {
        keys.push(format!("key:{i}").into_bytes());
        keys.push(format!("{{user{}}}.following.{i}", i % 40).into_bytes());
    }
    for i in 0..100 {
        for k in [
            format!("{{user1000}}.followers{i}"),
            format!("foo{{}}{{bar}}{i}"),
            format!("foo{{{{bar}}}}zap{i}"),
            format!("{{{i}"),
            format!("}}{i}{{"),
            format!("a{{b{i}}}c}}"),
            format!("{{}}{i}"),
        ] {
            keys.push(k.into_bytes());
        }
        let mut binary = vec![0u8, 0xff, b'{', i as u8, b'}', 0x80];
        binary.extend_from_slice(&(i as u32).to_le_bytes());
        keys.push(binary);
    }
    keys.push(Vec::new());
    keys.push(b"{user1000}.following".to_vec());
    keys.push(b"{user1000}.followers".to_vec());
    keys
}

#[test]
fn keys_land_on_the_nodes_owning_their_slots() {
    for &flavor in RedisFlavor::all() {
        let c = RedisCluster::start(flavor, 3, 0);
        let keys = tricky_keys();
        // Computed slot == the server's, for every key (pipelined).
        let mut conn = c.node(0).connect();
        for k in &keys {
            conn.send(&[&b"CLUSTER"[..], b"KEYSLOT", k]).unwrap();
        }
        for k in &keys {
            let server = conn.read_reply().unwrap().as_int().unwrap();
            assert_eq!(
                i64::from(key_hash_slot(k)),
                server,
                "{flavor}: slot of {:?}",
                String::from_utf8_lossy(k)
            );
        }
        assert_eq!(
            key_hash_slot(b"{user1000}.following"),
            key_hash_slot(b"{user1000}.followers")
        );

        let mut client = c.client();
        let distinct: std::collections::BTreeSet<&Vec<u8>> = keys.iter().collect();
        for k in &distinct {
            let mut value = b"v:".to_vec();
            value.extend_from_slice(k);
            client.set(k, &value);
        }
        assert_eq!(
            client.redirects(),
            0,
            "{flavor}: the slot map routed every key"
        );
        let map = c.slot_map();
        let mut per_node = [0i64; 3];
        for k in &distinct {
            let owner = c.index_of_id(map.owner_of_key(k).unwrap()).unwrap();
            per_node[owner] += 1;
            let mut value = b"v:".to_vec();
            value.extend_from_slice(k);
            // The owner answers directly...
            let direct = c.node(owner).cmd(&[&b"GET"[..], k]);
            assert_eq!(direct, RespValue::Bulk(value), "{flavor}");
            // ...any other master redirects to it, naming the slot we computed.
            let other = (owner + 1) % 3;
            match c.node(other).cmd(&[&b"GET"[..], k]) {
                RespValue::Error(e) => {
                    let expect = format!(
                        "MOVED {} 127.0.0.1:{}",
                        key_hash_slot(k),
                        c.node(owner).port()
                    );
                    assert_eq!(e, expect, "{flavor}");
                }
                other => panic!("{flavor}: non-owner answered {other}"),
            }
        }
        // The cluster dump sees every key once, on its owner.
        let dump = c.dump();
        assert_eq!(dump.len(), distinct.len(), "{flavor}");
        assert_eq!(
            dump["{user1000}.following"],
            format!("string {:?}", "v:{user1000}.following")
        );
        for (i, &n) in per_node.iter().enumerate() {
            assert_eq!(
                c.node(i).cmd(&["DBSIZE"]).as_int(),
                Some(n),
                "{flavor} node {i}"
            );
            assert!(
                n > 500,
                "{flavor}: keys spread over every shard: {per_node:?}"
            );
        }
    }
}

#[test]
fn failover_is_observed_in_the_parsed_topology() {
    for &flavor in RedisFlavor::all() {
        let mut c = RedisCluster::start(flavor, 3, 1);
        let mut client = c.client();
        for i in 0..300 {
            client.set(format!("before:{i}").as_bytes(), b"1");
        }
        // Replication ids of master 0 before: psync2 keeps them as replid2 on the replica
        // that takes over (`shiftReplicationId` in Redis `src/replication.c`).
        let old = replication(&c, 0);
        let before = c.slot_map();
        let shard_id_before = c.topology_of(1).shards[0].id.clone();

        // 1. Coordinated failover: replica 3 takes over from master 0.
        c.failover(3, false);
        let after = c.slot_map();
        assert_eq!(
            before.diff(&after),
            vec![SlotMove {
                slots: c.initial_slots()[0],
                from: Some(c.node_id(0).to_owned()),
                to: Some(c.node_id(3).to_owned()),
            }],
            "{flavor}"
        );
        for i in [1, 2, 4, 5] {
            let t = c.topology_of(i);
            let s = &t.shards[t.shard_of_slot(0).unwrap()];
            assert_eq!(s.master.id, c.node_id(3), "{flavor} node {i}");
            assert_eq!(
                s.replicas.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                [c.node_id(0)],
                "{flavor} node {i}: the old master follows the new one"
            );
            assert_eq!(shape(&t), shape(&c.topology_from_nodes_of(i)), "{flavor}");
        }
        // The shard id (Valkey) survives the failover; Redis 7.0 has none.
        let t = c.topology_of(1);
        assert_eq!(
            t.shards[t.shard_of_slot(0).unwrap()].id,
            shard_id_before,
            "{flavor}"
        );
        assert_eq!(shard_id_before.is_some(), flavor == RedisFlavor::Valkey9);
        let new = replication(&c, 3);
        assert_eq!(new["role"], "master");
        assert_eq!(
            new["master_replid2"], old["master_replid"],
            "{flavor}: the promoted replica continues the old master's history"
        );
        assert_ne!(new["master_replid"], old["master_replid"]);
        assert_eq!(replication(&c, 0)["master_replid"], new["master_replid"]);
        for i in 0..300 {
            assert_eq!(
                client.get(format!("before:{i}").as_bytes()).as_deref(),
                Some(&b"1"[..])
            );
        }

        // 2. A master dies (kill -9) and its replica is forced to take over.
        let before = c.slot_map();
        c.kill9(1);
        c.failover(4, true);
        let after = c.slot_map();
        assert_eq!(
            before.diff(&after),
            vec![SlotMove {
                slots: c.initial_slots()[1],
                from: Some(c.node_id(1).to_owned()),
                to: Some(c.node_id(4).to_owned()),
            }],
            "{flavor}"
        );
        // The dead master is flagged failed once the others agree (after node timeout).
        let deadline = Instant::now() + Duration::from_secs(60);
        let dead = c.node_id(1).to_owned();
        let failed_in = |t: &ClusterTopology| {
            t.shards.iter().any(|s| {
                std::iter::once(&s.master)
                    .chain(&s.other_masters)
                    .chain(&s.replicas)
                    .any(|n| n.id == dead && n.health == NodeHealth::Failed)
            })
        };
        // (Until then Valkey's CLUSTER SHARDS may be ambiguous: two live masters in a shard.)
        while !(c.try_topology_of(0).is_ok_and(|t| failed_in(&t))
            && failed_in(&c.topology_from_nodes_of(0)))
        {
            assert!(
                Instant::now() < deadline,
                "{flavor}: node 1 never flagged failed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let t = c.topology_of(0);
        let s4 = t.shard_of_master(c.node_id(4)).unwrap();
        match flavor {
            // Redis 7.0 groups CLUSTER SHARDS by master: the dead master is a slot-less shard.
            RedisFlavor::Redis7 => {
                let s1 = t.shard_of_master(&dead).unwrap();
                assert_ne!(s1, s4);
                assert!(t.shards[s1].slots.is_empty());
            }
            // Valkey groups by shard id: the dead master stays in its shard.
            RedisFlavor::Valkey9 => {
                assert_eq!(t.shards[s4].other_masters.len(), 1, "{t:?}");
                assert_eq!(t.shards[s4].other_masters[0].id, dead);
            }
        }
        // Back from the dead, it rejoins as the new master's replica.
        c.restart_node(1);
        c.wait_stable();
        let t = c.topology();
        let s = &t.shards[t.shard_of_master(c.node_id(4)).unwrap()];
        assert_eq!(
            s.replicas.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            [dead.as_str()],
            "{flavor}"
        );
        assert!(s.other_masters.is_empty());
        t.check_coverage().unwrap();
    }
}

/// `n` hash tags whose slots lie in `slots`.
fn tags_in(slots: SlotRange, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("t{i}"))
        .filter(|t| slots.contains(key_hash_slot(t.as_bytes())))
        .take(n)
        .collect()
}

#[test]
fn slot_migration_under_load_is_observed_as_a_slot_map_diff() {
    for &flavor in RedisFlavor::all() {
        // No replicas: the move is the same with them, and this test is the heaviest.
        let c = RedisCluster::start(flavor, 3, 0);
        let moved = SlotRange::new(0, 99).unwrap();
        let tags = tags_in(moved, 40);
        let mut client = c.client();
        for (i, t) in tags.iter().enumerate() {
            for j in 0..20 {
                client.set(
                    format!("{{{t}}}:pre:{j}").as_bytes(),
                    format!("{i}").as_bytes(),
                );
            }
        }
        for i in 0..500 {
            client.set(format!("other:{i}").as_bytes(), b"x");
        }
        let keys_on_0 = c.node(0).cmd(&["DBSIZE"]).as_int().unwrap();
        let before = c.slot_map();

        // A writer keeps writing keys in the moving slots all along.
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let mut writer_client = c.client();
        let mut mid_map = None;
        let (acked, redirects) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut n: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    let t = &tags[(n as usize) % tags.len()];
                    writer_client.set(format!("{{{t}}}:load:{n}").as_bytes(), &n.to_le_bytes());
                    n += 1;
                    written.store(n, Ordering::SeqCst);
                }
                (n, writer_client.redirects())
            });
            // Waits for the writer to pass `n` writes; returns early if it died (its panic
            // then surfaces at join) instead of spinning forever.
            let wait_for = |n: u64| {
                while written.load(Ordering::SeqCst) < n && !writer.is_finished() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            // Under load: the writer is going before, during and after the move.
            wait_for(200);
            // Half-way, a master that is neither source nor target already sees the first
            // half moved (SETSLOT NODE reached it directly).
            let mut mid = None;
            c.migrate_slots_observed(0, 1, moved.slots(), |slot| {
                if slot == 49 {
                    mid = Some(c.topology_from_nodes_of(2).slot_map().unwrap());
                }
            });
            mid_map = mid;
            wait_for(written.load(Ordering::SeqCst) + 200);
            stop.store(true, Ordering::SeqCst);
            writer.join().unwrap()
        });
        assert!(redirects > 0, "{flavor}: the writer was redirected");

        let after = c.slot_map();
        assert_eq!(
            before.diff(&after),
            vec![SlotMove {
                slots: moved,
                from: Some(c.node_id(0).to_owned()),
                to: Some(c.node_id(1).to_owned()),
            }],
            "{flavor}"
        );
        assert_eq!(
            before.diff(&mid_map.unwrap()),
            vec![SlotMove {
                slots: SlotRange::new(0, 49).unwrap(),
                from: Some(c.node_id(0).to_owned()),
                to: Some(c.node_id(1).to_owned()),
            }],
            "{flavor}: half-way"
        );
        assert_eq!(
            after.slots_of(c.node_id(0)),
            SlotRanges::from_ranges([SlotRange::new(100, 5460).unwrap()])
        );
        for i in 0..3 {
            let t = c.topology_from_nodes_of(i);
            assert_eq!(t.slot_map().unwrap(), after, "{flavor} node {i} agrees");
        }
        // Every key once, on its new owner, with its value: nothing lost by the move.
        let mut client = c.client();
        for (i, t) in tags.iter().enumerate() {
            for j in 0..20 {
                let k = format!("{{{t}}}:pre:{j}");
                assert_eq!(
                    c.node(1).cmd(&["GET", &k]),
                    RespValue::Bulk(format!("{i}").into_bytes()),
                    "{flavor}: {k} on the new owner"
                );
                assert_eq!(c.node(0).cmd(&["EXISTS", &k]).as_int(), None, "MOVED");
            }
        }
        for n in 0..acked {
            let t = &tags[(n as usize) % tags.len()];
            let k = format!("{{{t}}}:load:{n}");
            assert_eq!(
                client.get(k.as_bytes()),
                Some(n.to_le_bytes().to_vec()),
                "{flavor}: {k}"
            );
        }
        let others_moved = (0..500)
            .filter(|i| moved.contains(key_hash_slot(format!("other:{i}").as_bytes())))
            .count();
        let moved_keys = (tags.len() * 20 + others_moved) as i64;
        assert_eq!(
            c.node(0).cmd(&["DBSIZE"]).as_int().unwrap(),
            keys_on_0 - moved_keys,
            "{flavor}: the source kept only its other keys"
        );
    }
}

#[test]
fn dropping_a_cluster_removes_every_node_and_directory() {
    let c = RedisCluster::start(RedisFlavor::Valkey9, 2, 1);
    let pids: Vec<u32> = c.nodes().iter().map(|n| n.pid().unwrap()).collect();
    let dirs: Vec<std::path::PathBuf> = c.nodes().iter().map(|n| n.dir().to_owned()).collect();
    for d in &dirs {
        assert!(d.join("nodes.conf").exists(), "{}", d.display());
    }
    assert!(pids.iter().all(|&p| process_is_alive(p)));
    drop(c);
    assert!(wait_until_gone(&pids, Duration::from_secs(10)).is_empty());
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

/// A raw replica link (`SYNC`) to `node`, past the RDB payload: what the agent will read.
fn replica_link(node: &syncbridge_tests::RedisServer) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::{BufRead, Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", node.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(&syncbridge_tests::redis::encode_command(&["SYNC"]))
        .unwrap();
    let mut r = std::io::BufReader::new(stream);
    // Bare newlines are keep-alives while the master prepares the snapshot.
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if !line.trim().is_empty() {
            break;
        }
    }
    let len: usize = line.trim().strip_prefix('$').unwrap().parse().unwrap();
    let mut rdb = vec![0u8; len];
    r.read_exact(&mut rdb).unwrap();
    r
}

/// Reads replicated commands until one named `name` (any case) about `key`; returns the
/// name as sent.
fn wait_for_command(
    r: &mut std::io::BufReader<std::net::TcpStream>,
    names: &[&str],
    key: &[u8],
) -> String {
    loop {
        let RespValue::Array(args) = syncbridge_tests::redis::read_value(r).unwrap() else {
            continue;
        };
        let name = String::from_utf8_lossy(args[0].as_bytes().unwrap()).to_uppercase();
        if names.contains(&name.as_str()) && args.get(1).and_then(RespValue::as_bytes) == Some(key)
        {
            return name;
        }
    }
}

/// What a resharding puts in the replication streams the agent reads (docs/design/
/// redis-cluster.md): the target's stream carries the key's `RESTORE` (as `RESTORE-ASKING`,
/// the form MIGRATE sends in cluster mode), the source's stream its `DEL`.
#[test]
fn migrate_puts_restore_in_the_target_stream_and_del_in_the_source_stream() {
    for &flavor in RedisFlavor::all() {
        let c = RedisCluster::start(flavor, 2, 0);
        let key = b"{moving}:key";
        let slot = key_hash_slot(key);
        let from = c.node_for_key(key);
        let to = 1 - from;
        c.set(key, b"value");
        let mut source = replica_link(c.node(from));
        let mut target = replica_link(c.node(to));
        c.migrate_slots(from, to, [slot]);
        let restore = wait_for_command(&mut target, &["RESTORE", "RESTORE-ASKING"], key);
        let del = wait_for_command(&mut source, &["DEL", "UNLINK"], key);
        assert_eq!(
            (restore.as_str(), del.as_str()),
            ("RESTORE-ASKING", "DEL"),
            "{flavor}"
        );
        assert_eq!(c.get(key).as_deref(), Some(&b"value"[..]));
    }
}

/// With a password: replicas sync (`masterauth`), the client and `MIGRATE` authenticate.
#[test]
fn a_cluster_with_a_password_comes_up_and_moves_slots() {
    let c = RedisCluster::builder(RedisFlavor::Redis7, 2, 1)
        .password("s3cret-cluster")
        .start();
    assert!(matches!(
        syncbridge_tests::redis::RespConnection::connect(c.node(0).port())
            .unwrap()
            .cmd(&["GET", "x"])
            .unwrap(),
        RespValue::Error(e) if e.starts_with("NOAUTH")
    ));
    let mut client = c.client();
    for i in 0..200 {
        client.set(format!("k{i}").as_bytes(), b"v");
    }
    // Keys in the moving slots, so MIGRATE (with AUTH) has work.
    let tags = tags_in(SlotRange::new(0, 9).unwrap(), 5);
    for t in &tags {
        client.set(format!("{{{t}}}:x").as_bytes(), b"moved");
    }
    let before = c.slot_map();
    c.migrate_slots(0, 1, 0..10);
    assert_eq!(before.diff(&c.slot_map()).len(), 1);
    for t in &tags {
        let k = format!("{{{t}}}:x");
        assert_eq!(
            c.node(1).cmd(&["GET", &k]),
            RespValue::Bulk(b"moved".to_vec())
        );
    }
    let mut client = c.client();
    for i in 0..200 {
        assert_eq!(
            client.get(format!("k{i}").as_bytes()).as_deref(),
            Some(&b"v"[..])
        );
    }
}

const CHILD_PID_FILE_ENV: &str = "SB_HARNESS_CLUSTER_CHILD_PID_FILE";

/// A test process SIGKILLed with a cluster running (no Drop runs) leaves no node behind:
/// each node's watchdog kills it. The test re-runs itself as the child, as
/// `harness_cleanup.rs` does for single servers.
#[test]
fn sigkilled_test_leaves_no_cluster_node_behind() {
    if let Some(pid_file) = std::env::var_os(CHILD_PID_FILE_ENV) {
        let c = RedisCluster::start(RedisFlavor::Valkey9, 2, 1);
        let mut report = String::new();
        for n in c.nodes() {
            report.push_str(&format!(
                "pid {}\ndir {}\n",
                n.pid().unwrap(),
                n.dir().display()
            ));
        }
        std::fs::write(pid_file, report).unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
        unreachable!("SIGKILL returned");
    }
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("pids");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkilled_test_leaves_no_cluster_node_behind",
            "--nocapture",
        ])
        .env(CHILD_PID_FILE_ENV, &pid_file)
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the child failed before killing itself:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&pid_file).unwrap();
    let pids: Vec<u32> = report
        .lines()
        .filter_map(|l| l.strip_prefix("pid "))
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "{report}");
    let alive = wait_until_gone(&pids, Duration::from_secs(15));
    // A dead process removes no temp dir; tidy up here.
    for dir in report.lines().filter_map(|l| l.strip_prefix("dir ")) {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        alive.is_empty(),
        "cluster nodes survived a SIGKILLed test: {alive:?}"
    );
}
