//! `redis stream` pointed at one node of a real Redis Cluster / Valkey Cluster (issue 15,
//! items 1 and 2): one agent process captures every master's stream at once, each shard
//! under `redis/cluster/shards/<shard>/` with the single-server layout, and records the slot
//! map. Each shard restores alone (`redis restore --shard`) to exactly its master's keys; a
//! killed agent resumes every shard with `PSYNC`; a failover moves the shard's stream to the
//! promoted replica, which continues it with `PSYNC` (psync2), in the same generation.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use redis_support::*;
use storage::{RepoKey, RepoOptions, Repository};
use syncbridge_tests::redis::{RedisFlavor, RespValue};
use syncbridge_tests::redis_cluster::{dump_cluster, RedisCluster};
use wire::redis::cluster::{key_hash_slot, SlotMapRecord};

fn file_repo(dir: &Path) -> String {
    format!("file://{}", dir.join("repo").display())
}

/// Keys spread over all slots: strings, counters, hash-tagged groups, collections, TTLs.
fn load(c: &RedisCluster, tag: &str, n: usize) {
    let mut client = c.client();
    for i in 0..n {
        let key = format!("{tag}:k:{i}");
        client.set(key.as_bytes(), format!("v{i}").as_bytes());
        let counter = format!("counter:{}", i % 50);
        let r = client.cmd(counter.as_bytes(), &["INCR", &counter]);
        assert!(matches!(r, RespValue::Integer(_)), "{r}");
    }
    for i in 0..20 {
        let h = format!("{tag}:{{user{i}}}:profile");
        let l = format!("{tag}:{{user{i}}}:events");
        let t = format!("{tag}:{{user{i}}}:session");
        let r = client.cmd(h.as_bytes(), &["HSET", &h, "name", "n", "age", "7"]);
        assert!(!matches!(r, RespValue::Error(_)), "{r}");
        let r = client.cmd(l.as_bytes(), &["RPUSH", &l, "a", "b"]);
        assert!(!matches!(r, RespValue::Error(_)), "{r}");
        assert!(client
            .cmd(t.as_bytes(), &["SET", &t, "s", "EX", "3600"])
            .is_ok());
    }
}

/// What the repository says about the cluster: every shard's record (JSON) and the slot
/// maps, oldest first.
struct Stored {
    shards: BTreeMap<String, serde_json::Value>,
    slot_maps: Vec<SlotMapRecord>,
}

fn stored(repo: &str) -> Stored {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let repo = Repository::open(repo, RepoOptions::default()).unwrap();
        let mut shards = BTreeMap::new();
        for dir in repo
            .list_dirs(&RepoKey::parse("redis/cluster/shards").unwrap())
            .await
            .unwrap()
        {
            let key = RepoKey::parse(&format!("{dir}/shard.json")).unwrap();
            let json: serde_json::Value =
                serde_json::from_slice(&repo.get(&key).await.unwrap()).unwrap();
            shards.insert(dir.file_name().to_owned(), json);
        }
        let mut slot_maps = Vec::new();
        for meta in repo
            .list(&RepoKey::parse("redis/cluster/slotmap").unwrap())
            .await
            .unwrap()
        {
            let data = repo.get(&meta.key).await.unwrap();
            let record = SlotMapRecord::decode(&data).unwrap();
            assert_eq!(
                meta.key.file_name(),
                format!("{:020}", record.effective_unix_ms)
            );
            slot_maps.push(record);
        }
        Stored { shards, slot_maps }
    })
}

/// The port of the master a shard record names last.
fn master_port(record: &serde_json::Value) -> u16 {
    let masters = record["masters"].as_array().unwrap();
    let address = masters.last().unwrap()["address"].as_str().unwrap();
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Generations stored for `shard`.
fn generations(dir: &Path, shard: &str) -> usize {
    std::fs::read_dir(dir.join(format!("repo/redis/cluster/shards/{shard}/redis/gen")))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `redis restore --shard` of one shard, started; its keys as `dump_cluster` names them.
fn restore_shard(
    repo: &str,
    shard: &str,
    target: &Path,
    flavor: RedisFlavor,
) -> BTreeMap<String, String> {
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let out = run_agent(
        &[
            "redis", "restore", "--repo", repo, "--shard", shard, "--target", &target_s, "--start",
            &bin,
        ],
        &[],
    );
    let server = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    let server = server.unwrap();
    dump_port(server.port, None)
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

/// Every shard restores alone to exactly what its current master holds, every key on the
/// shard the last slot map gives its slot, and together they are the whole cluster.
fn check_every_shard(c: &RedisCluster, repo: &str, dir: &Path, flavor: RedisFlavor) -> Stored {
    let s = stored(repo);
    assert_eq!(
        s.shards.keys().map(String::as_str).collect::<Vec<_>>(),
        ["s01", "s02", "s03"]
    );
    let map = &s.slot_maps.last().expect("a slot map record").map;
    map.check_complete().unwrap();
    assert_eq!(map.owners(), ["s01", "s02", "s03"]);
    let mut union = BTreeMap::new();
    for (shard, record) in &s.shards {
        let port = master_port(record);
        let master = c.index_of_port(port).unwrap();
        let expected = dump_cluster(&[c.node(master).port()], None);
        assert!(expected.len() > 50, "{shard}: {} keys", expected.len());
        let got = restore_shard(repo, shard, &dir.join(format!("r-{shard}")), flavor);
        assert_eq!(got, expected, "shard {shard} (master on port {port})");
        for key in got.keys() {
            assert_eq!(
                map.owner(key_hash_slot(key.as_bytes())),
                Some(shard.as_str()),
                "{key}"
            );
        }
        union.extend(got);
    }
    assert_eq!(union, c.dump());
    s
}

#[test]
fn stream_captures_every_shard_and_the_slot_map() {
    let flavor = RedisFlavor::Valkey9;
    let c = RedisCluster::start(flavor, 3, 1);
    load(&c, "before", 300);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    // Any node will do, a replica too: the agent finds the masters.
    let mut agent = StreamingAgent::start_with(
        &c.node(4).url(),
        &repo,
        &["--max-lag", "200ms"],
        &[],
        tmp.path().join("stream.log"),
    );
    agent.wait_for_log_count("snapshot stored", 3, Duration::from_secs(60));
    load(&c, "during", 300);
    std::thread::sleep(Duration::from_millis(800));
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("slot map recorded"), "{log}");
    for shard in ["s01", "s02", "s03"] {
        assert!(
            log.contains(&format!("streaming shard {shard} from its master")),
            "{log}"
        );
        assert_eq!(generations(tmp.path(), shard), 1, "{shard}");
    }
    let s = check_every_shard(&c, &repo, tmp.path(), flavor);
    // The map of lineages matches the cluster's map of masters, and was recorded once.
    assert_eq!(s.slot_maps.len(), 1);
    let by_master = c.slot_map();
    for (shard, record) in &s.shards {
        let id = record["masters"].as_array().unwrap().last().unwrap()["node_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            s.slot_maps[0].map.slots_of(shard),
            by_master.slots_of(&id),
            "{shard}"
        );
        // Valkey names its shards: the id is kept as evidence.
        assert_eq!(record["shard_ids"].as_array().unwrap().len(), 1, "{record}");
    }
    // `redis verify --shard` passes each shard.
    for shard in ["s01", "s02", "s03"] {
        let out = run_agent(&["redis", "verify", "--repo", &repo, "--shard", shard], &[]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn killed_agent_resumes_every_shard_with_psync() {
    let flavor = RedisFlavor::Redis7;
    let c = RedisCluster::start(flavor, 3, 1);
    load(&c, "before", 200);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let mut agent = StreamingAgent::start_with(
        &c.node(0).url(),
        &repo,
        &["--max-lag", "100ms"],
        &[],
        tmp.path().join("a1.log"),
    );
    agent.wait_for_log_count("snapshot stored", 3, Duration::from_secs(60));
    let writer = {
        let c2 = c.client();
        std::thread::spawn(move || {
            let mut client = c2;
            for i in 0..1500 {
                let key = format!("under-load:{i}");
                client.set(key.as_bytes(), b"x");
                let counter = format!("load-counter:{}", i % 30);
                client.cmd(counter.as_bytes(), &["INCR", &counter]);
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(30));
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    let mut agent = StreamingAgent::start_with(
        &c.node(1).url(),
        &repo,
        &["--max-lag", "100ms"],
        &[],
        tmp.path().join("a2.log"),
    );
    agent.wait_for_log_count("resumed with PSYNC", 3, Duration::from_secs(60));
    writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(agent.terminate(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(!log.contains("new generation"), "{log}");
    assert!(!log.contains("snapshot stored"), "{log}");
    for shard in ["s01", "s02", "s03"] {
        assert_eq!(generations(tmp.path(), shard), 1, "{shard}");
    }
    let s = check_every_shard(&c, &repo, tmp.path(), flavor);
    // Nothing changed: the restarted agent recognised every shard and wrote no new map.
    assert_eq!(s.slot_maps.len(), 1);
    let total: i64 = c
        .dump()
        .iter()
        .filter(|(k, _)| k.starts_with("load-counter:"))
        .map(|(_, v)| {
            v.trim_start_matches("string \"")
                .trim_end_matches('"')
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 1500);
}
