//! Issue 15, item 5 ("sidecar and metrics") against real Redis 7 / Valkey 9 clusters (three
//! masters, three replicas): `run --config` streams every shard of a cluster (detected from
//! the source, or `redis.cluster = true`) through the same job as `redis stream`; `/metrics`
//! labels every per-shard Redis series with `shard` and `/readyz` has one line per shard;
//! `verify` and `list` check and show every shard and the slot-map history; `expire` keeps
//! the shards' generations together, so a kept moment restores on every shard and an
//! expired one is refused.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redis_support::*;
use syncbridge_tests::prometheus::{http_get, promtool_check_metrics};
use syncbridge_tests::redis::{RedisFlavor, RespValue};
use syncbridge_tests::redis_cluster::RedisCluster;

fn file_repo(dir: &Path) -> String {
    format!("file://{}", dir.join("repo").display())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// Keys spread over all slots, counters and hash-tagged groups.
fn load(c: &RedisCluster, tag: &str, n: usize) {
    let mut client = c.client();
    for i in 0..n {
        let key = format!("{tag}:k:{i}");
        client.set(key.as_bytes(), format!("v{i}").as_bytes());
        let counter = format!("counter:{}", i % 30);
        let r = client.cmd(counter.as_bytes(), &["INCR", &counter]);
        assert!(matches!(r, RespValue::Integer(_)), "{r}");
    }
    for i in 0..10 {
        let h = format!("{tag}:{{user{i}}}:profile");
        let r = client.cmd(h.as_bytes(), &["HSET", &h, "name", "n", "age", "7"]);
        assert!(!matches!(r, RespValue::Error(_)), "{r}");
    }
}

/// `run --config FILE`, its output appended to `log`; SIGKILLed on drop.
struct RunAgent {
    child: std::process::Child,
    log: PathBuf,
}

impl RunAgent {
    fn start(config: &Path, log: PathBuf) -> RunAgent {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = agent()
            .args(["run", "--config"])
            .arg(config)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        RunAgent { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; whether it exited 0.
    fn terminate(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "run did not stop:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `metric{...}` whose label set is exactly `labels` (in order).
fn sample(metrics: &str, metric: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{metric}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// `redis restore --shard` of one shard, started; its keys (database 0).
fn restore_shard(
    repo: &str,
    shard: &str,
    target: &Path,
    to_time: Option<&str>,
    flavor: RedisFlavor,
) -> Result<BTreeMap<String, String>, String> {
    let target_s = target.display().to_string();
    let bin = server_bin(flavor);
    let mut args = vec![
        "redis", "restore", "--repo", repo, "--shard", shard, "--target", &target_s, "--start",
        &bin,
    ];
    if let Some(t) = to_time {
        args.extend(["--to-time", t]);
    }
    let out = run_agent(&args, &[]);
    let server = RestoredServer::try_from_output(&out);
    if !out.status.success() {
        return Err(text(&out));
    }
    let server = server.unwrap();
    Ok(dump_port(server.port, None)
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("0/").unwrap().to_owned(), v))
        .collect())
}

/// Every shard restored (latest moment), together.
fn restore_all(repo: &str, dir: &Path, flavor: RedisFlavor) -> BTreeMap<String, String> {
    let mut union = BTreeMap::new();
    for shard in ["s01", "s02", "s03"] {
        let got = restore_shard(repo, shard, &dir.join(format!("r-{shard}")), None, flavor)
            .unwrap_or_else(|e| panic!("{shard}: {e}"));
        assert!(got.len() > 20, "{shard}: {} keys", got.len());
        union.extend(got);
    }
    union
}

/// `run` beside a replica of a Redis 7 cluster, without saying it is one: the cluster is
/// detected and every shard streamed; `/readyz` says so per shard; `/metrics` (checked by
/// promtool) carries each shard's Redis series with a `shard` label, and the job's own
/// `job_up` without one; after SIGTERM every shard restores to the cluster's data.
#[test]
fn run_streams_every_shard_of_a_detected_cluster_with_shard_labelled_metrics() {
    let flavor = RedisFlavor::Redis7;
    let c = RedisCluster::start(flavor, 3, 1);
    load(&c, "before", 200);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let http = free_port();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nsource = \"{}\"\nrepository = \"{repo}\"\nmax_lag = \"200ms\"\nsnapshot_every = \"off\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
            c.node(4).url()
        ),
    )
    .unwrap();
    let mut a = RunAgent::start(&config, tmp.path().join("run.log"));
    let ready = || http_get(http, "/readyz");
    assert!(
        wait_until(Duration::from_secs(60), || ready()
            .is_some_and(|(s, _)| s == 200)),
        "{:?}\n{}",
        ready(),
        a.log_text()
    );
    let (_, body) = ready().unwrap();
    for shard in ["s01", "s02", "s03"] {
        assert!(
            body.contains(&format!("redis_stream shard {shard}: ready")),
            "{body}"
        );
    }
    assert!(body.contains("redis_stream: ready"), "{body}");
    load(&c, "during", 200);

    let base = format!("job=\"redis_stream\",repository=\"{repo}\"");
    // Every shard's stream has stored past its snapshot.
    let metrics = || http_get(http, "/metrics").unwrap().1;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let m = metrics();
            ["s01", "s02", "s03"].iter().all(|s| {
                sample(
                    &m,
                    "syncbridge_redis_bytes_total",
                    &format!("{base},shard=\"{s}\""),
                )
                .is_some_and(|v| v > 0.0)
            })
        }),
        "{}",
        metrics()
    );
    let m = metrics();
    promtool_check_metrics(&m).unwrap_or_else(|e| panic!("promtool: {e}\n{m}"));
    for s in ["s01", "s02", "s03"] {
        let l = format!("{base},shard=\"{s}\"");
        assert_eq!(sample(&m, "syncbridge_job_up", &l), Some(1.0), "{s}\n{m}");
        for metric in [
            "syncbridge_redis_durable_offset",
            "syncbridge_redis_last_chunk_timestamp_seconds",
            "syncbridge_redis_lag_seconds",
            "syncbridge_upload_errors_total",
            "syncbridge_job_retries_total",
        ] {
            assert!(sample(&m, metric, &l).is_some(), "{metric} {s}\n{m}");
        }
    }
    // The job itself: up, without a shard label; its stream series are its shards' only.
    assert_eq!(sample(&m, "syncbridge_job_up", &base), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "syncbridge_redis_durable_offset", &base),
        None,
        "{m}"
    );
    assert_eq!(
        sample(&m, "syncbridge_redis_bytes_total", &base),
        None,
        "{m}"
    );
    // OpenMetrics (what Prometheus asks for) has the same labels.
    let om = {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
        use std::io::{Read, Write};
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    };
    assert!(om.contains("shard=\"s02\""), "{om}");

    std::thread::sleep(Duration::from_millis(600));
    let expected = c.dump();
    assert!(a.terminate(), "{}", a.log_text());
    let log = a.log_text();
    assert!(log.contains("streaming shard s01 from its master"), "{log}");
    // `agent.memory_budget_mib` (64 MiB) split between the three shards.
    assert!(
        log.contains("memory budget split between 3 shards"),
        "{log}"
    );
    assert_eq!(restore_all(&repo, tmp.path(), flavor), expected);
}

/// `redis stream` of the whole cluster until `n` more "snapshot stored" lines, then `work`,
/// then SIGTERM.
fn stream_while(c: &RedisCluster, repo: &str, log: PathBuf, work: impl FnOnce()) {
    let before = std::fs::read_to_string(&log).unwrap_or_default();
    let resumed = before.matches("resumed with PSYNC").count();
    let stored = before.matches("snapshot stored").count();
    let mut a = StreamingAgent::start_with(
        &c.node(0).url(),
        repo,
        &["--max-lag", "200ms", "--snapshot-every", "off"],
        &[],
        log,
    );
    // Every shard streaming: from a new snapshot, or resumed from the stored one.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = a.log_text();
        let n = t.matches("resumed with PSYNC").count() - resumed
            + t.matches("snapshot stored").count()
            - stored;
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(100));
    }
    work();
    assert!(a.terminate(), "{}", a.log_text());
}

/// Retention on a cluster capture (Valkey 9): two generations per shard (a stream, during
/// which slots move, then `redis snapshot` of the cluster, then the stream resumed on the
/// new generations).
/// `expire --keep-within 1h` keeps both; `expire --keep-full 1` removes every shard's
/// first generation together: a moment of the second restores on every shard, exactly,
/// and a moment of the first is refused clearly, per shard and for the whole cluster; the
/// slot map replaced before the oldest kept moment goes, and the capture verifies healthy.
#[test]
fn expire_keeps_the_shards_generations_together() {
    let flavor = RedisFlavor::Valkey9;
    let c = RedisCluster::start(flavor, 3, 0);
    load(&c, "zero", 100);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let log = tmp.path().join("stream.log");
    let mut t1 = 0;
    stream_while(&c, &repo, log.clone(), || {
        load(&c, "one", 100);
        // Slots move: a second slot map, in effect from here on.
        c.migrate_slots(0, 1, 0..8u16);
        std::thread::sleep(Duration::from_millis(2500));
        load(&c, "one-b", 50);
        std::thread::sleep(Duration::from_millis(800));
        t1 = now_ms();
        std::thread::sleep(Duration::from_millis(50));
    });
    let out = run_agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &c.node(1).url(),
            "--repo",
            &repo,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut t2 = 0;
    let mut at_t2 = BTreeMap::new();
    stream_while(&c, &repo, log.clone(), || {
        load(&c, "two", 100);
        std::thread::sleep(Duration::from_millis(800));
        at_t2 = c.dump();
        t2 = now_ms();
        std::thread::sleep(Duration::from_millis(50));
        load(&c, "after", 20);
        std::thread::sleep(Duration::from_millis(600));
    });
    // Complete generations: those with a manifest (an expired one's directory may stay).
    let gens = |shard: &str| {
        std::fs::read_dir(
            tmp.path()
                .join(format!("repo/redis/cluster/shards/{shard}/redis/gen")),
        )
        .unwrap()
        .filter(|d| d.as_ref().unwrap().path().join("generation.json").exists())
        .count()
    };
    for s in ["s01", "s02", "s03"] {
        assert_eq!(gens(s), 2, "{s}");
    }
    let slot_maps = || {
        std::fs::read_dir(tmp.path().join("repo/redis/cluster/slotmap"))
            .unwrap()
            .count()
    };
    assert_eq!(slot_maps(), 2);

    let out = run_agent(&["expire", "--repo", &repo, "--keep-within", "1h"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    for s in ["s01", "s02", "s03"] {
        assert_eq!(gens(s), 2, "{s}: {}", text(&out));
    }
    let out = run_agent(
        &["expire", "--repo", &repo, "--keep-full", "1", "--dry-run"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    for s in ["s01", "s02", "s03"] {
        assert!(
            all.contains(&format!("expire  shard {s} generation")),
            "{all}"
        );
        assert_eq!(gens(s), 2, "{s}: dry run");
    }
    let out = run_agent(&["expire", "--repo", &repo, "--keep-full", "1"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    for s in ["s01", "s02", "s03"] {
        assert_eq!(gens(s), 1, "{s}: {}", text(&out));
    }
    // The first slot map went; the one in effect at the oldest kept moment stays.
    assert_eq!(slot_maps(), 1, "{}", text(&out));
    let out = run_agent(&["verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));

    // A kept moment, on every shard: exactly the cluster's data then.
    let t2s = format!("@{t2}");
    let mut union = BTreeMap::new();
    for s in ["s01", "s02", "s03"] {
        let got = restore_shard(
            &repo,
            s,
            &tmp.path().join(format!("t2-{s}")),
            Some(&t2s),
            flavor,
        )
        .unwrap_or_else(|e| panic!("{s}: {e}"));
        union.extend(got);
    }
    assert_eq!(union, at_t2);
    // An expired moment: refused, saying where the backup now begins.
    let t1s = format!("@{t1}");
    for s in ["s01", "s02", "s03"] {
        let e = restore_shard(
            &repo,
            s,
            &tmp.path().join(format!("t1-{s}")),
            Some(&t1s),
            flavor,
        )
        .unwrap_err();
        assert!(e.contains("no generation starts at or before"), "{s}: {e}");
        assert!(e.contains("expired"), "{s}: {e}");
    }
    let target = tmp.path().join("t1-all").display().to_string();
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            &target,
            "--to-time",
            &t1s,
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no generation starts at or before"),
        "{}",
        text(&out)
    );
}

/// A runtime for the few direct repository writes of a test.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", text(out)))
}

/// `verify` and `redis verify` (no `--shard`) on a Redis 7 cluster capture with two slot
/// maps (slots moved while streaming): healthy, per shard in text and JSON; `list` shows
/// the slot-map history. Then a slot map naming a shard the repository does not hold, and
/// a damaged snapshot of one shard, are each named by key, the damage counted on its shard.
#[test]
fn verify_and_list_check_every_shard_and_the_slot_map_history() {
    let flavor = RedisFlavor::Redis7;
    let c = RedisCluster::start(flavor, 3, 0);
    load(&c, "zero", 100);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    stream_while(&c, &repo, tmp.path().join("stream.log"), || {
        load(&c, "one", 100);
        c.migrate_slots(0, 1, 0..8u16);
        // The topology is read every second.
        std::thread::sleep(Duration::from_millis(2500));
        load(&c, "two", 50);
        std::thread::sleep(Duration::from_millis(600));
    });

    let out = run_agent(&["verify", "--repo", &repo, "--output", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let v = json_of(&out);
    assert_eq!(v["schema"], "syncbridge.verify/1");
    assert_eq!(v["kind"], "redis");
    assert_eq!(v["status"], "healthy", "{v:#}");
    assert_eq!(v["generations"], 3, "{v:#}");
    assert_eq!(v["cluster"]["slot_maps"], 2, "{v:#}");
    let shards = v["cluster"]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3, "{v:#}");
    for (s, name) in shards.iter().zip(["s01", "s02", "s03"]) {
        assert_eq!(s["shard"], name);
        assert_eq!(s["generations"], 1);
        assert_eq!(s["problems"], 0);
        chrono::DateTime::parse_from_rfc3339(s["newest_time"].as_str().unwrap()).unwrap();
    }
    let out = run_agent(&["verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("(Redis Cluster)"), "{all}");
    assert!(all.contains("cluster:     3 shards, 2 slot maps"), "{all}");
    assert!(all.contains("  s02  1 generations"), "{all}");
    let out = run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    for s in ["s01", "s02", "s03"] {
        assert!(
            all.contains(&format!("shard {s}: 1 generations, OK")),
            "{all}"
        );
    }
    assert!(all.contains("slot maps: 2 records, OK"), "{all}");

    // list: the slot-map history, in JSON and text.
    let out = run_agent(&["list", "--repo", &repo, "--output", "json"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let l = json_of(&out);
    let maps = l["redis"]["cluster"]["slot_maps"]
        .as_array()
        .unwrap_or_else(|| panic!("{l:#}"));
    assert_eq!(maps.len(), 2, "{l:#}");
    assert!(maps.iter().all(|m| m["complete"] == true), "{l:#}");
    assert_eq!(maps[1]["ranges"][0]["slots"], "0-7", "{l:#}");
    assert_eq!(maps[1]["ranges"][0]["shard"], "s02", "{l:#}");
    let out = run_agent(&["list", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0-7"), "{}", text(&out));

    // A slot map giving s03's slots to a shard the repository does not hold.
    let bad_key = block_on(async {
        use storage::{layout, ContentKind, PutMode, RepoOptions, Repository};
        let r = Repository::open(&repo, RepoOptions::default()).unwrap();
        let listed = r.list(&layout::redis_slot_maps_prefix()).await.unwrap();
        let last = listed.last().unwrap();
        let data = r.get(&last.key).await.unwrap();
        let mut record = wire::redis::cluster::SlotMapRecord::decode(&data).unwrap();
        record.map = record
            .map
            .map_owners(|o| if o == "s03" { "s07".into() } else { o.into() })
            .unwrap();
        record.effective_unix_ms += 1000;
        let key = layout::redis_slot_map(record.effective_unix_ms);
        r.put(
            &key,
            ContentKind::RedisManifest,
            bytes::Bytes::from(record.encode()),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        key.to_string()
    });
    // And a flipped byte in s02's snapshot.
    let gen_dir = std::fs::read_dir(tmp.path().join("repo/redis/cluster/shards/s02/redis/gen"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let snap = gen_dir.join("snapshot.rdb");
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&snap, bytes).unwrap();

    let out = run_agent(&["verify", "--repo", &repo, "--output", "json"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v = json_of(&out);
    assert_eq!(v["status"], "damaged", "{v:#}");
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["key"] == bad_key.as_str()
                && p["problem"].as_str().unwrap().contains("\"s07\"")),
        "{v:#}"
    );
    assert!(
        problems.iter().any(|p| p["key"]
            .as_str()
            .unwrap()
            .starts_with("redis/cluster/shards/s02/redis/gen/")
            && p["key"].as_str().unwrap().ends_with("snapshot.rdb")),
        "{v:#}"
    );
    let shards = v["cluster"]["shards"].as_array().unwrap();
    assert!(shards[1]["problems"].as_u64().unwrap() >= 1, "{v:#}");
    assert_eq!(shards[0]["problems"], 0, "{v:#}");
    assert_eq!(shards[2]["problems"], 0, "{v:#}");
    let out = run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("shard s02: 1 generations, 1 DAMAGED"), "{all}");
    assert!(all.contains(&bad_key), "{all}");
    assert!(
        all.contains("damaged: shards s02; the slot-map history"),
        "{all}"
    );
}

/// `run` with `redis.cluster = true` and `cluster_seeds` on a Valkey 9 cluster, new
/// generations every 2 s and `retention = { keep_full = 1 }`: every shard streams, the
/// scheduled expire keeps the shards' generations together and publishes the cluster's
/// first recoverable moment; after SIGTERM the capture verifies healthy and every shard
/// restores to the cluster's data.
#[test]
fn run_with_cluster_true_and_retention_keeps_every_shard_restorable() {
    let flavor = RedisFlavor::Valkey9;
    let c = RedisCluster::start(flavor, 3, 0);
    load(&c, "before", 100);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let http = free_port();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nsource = \"{}\"\ncluster = true\ncluster_seeds = [\"127.0.0.1:{}\"]\nrepository = \"{repo}\"\nmax_lag = \"200ms\"\nsnapshot_every = \"2s\"\nretention = {{ keep_full = 1 }}\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
            c.node(0).url(),
            c.node(1).port()
        ),
    )
    .unwrap();
    let out = run_agent(
        &["run", "--config", config.to_str().unwrap(), "--check"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut a = RunAgent::start(&config, tmp.path().join("run.log"));
    assert!(
        wait_until(Duration::from_secs(60), || http_get(http, "/readyz")
            .is_some_and(|(s, _)| s == 200)),
        "{:?}\n{}",
        http_get(http, "/readyz"),
        a.log_text()
    );
    // Writes keep coming, so each shard takes new generations; expire keeps them together.
    let generations_of = |shard: &str| {
        std::fs::read_dir(
            tmp.path()
                .join(format!("repo/redis/cluster/shards/{shard}/redis/gen")),
        )
        .map(|d| {
            d.filter(|e| e.as_ref().unwrap().path().join("generation.json").exists())
                .count()
        })
        .unwrap_or(0)
    };
    let mut expired = false;
    for round in 0..30 {
        load(&c, &format!("round{round}"), 20);
        std::thread::sleep(Duration::from_millis(500));
        let log = a.log_text();
        if log.matches("expired 1 generations").count() >= 3 {
            expired = true;
            break;
        }
    }
    assert!(expired, "{}", a.log_text());
    let m = http_get(http, "/metrics").unwrap().1;
    promtool_check_metrics(&m).unwrap_or_else(|e| panic!("promtool: {e}\n{m}"));
    let first = sample(
        &m,
        "syncbridge_first_recoverability_timestamp_seconds",
        &format!("job=\"redis_expire\",repository=\"{repo}\""),
    );
    assert!(first.is_some_and(|t| t > 1e9), "{m}");
    std::thread::sleep(Duration::from_millis(600));
    let expected = c.dump();
    assert!(a.terminate(), "{}", a.log_text());
    for s in ["s01", "s02", "s03"] {
        let n = generations_of(s);
        assert!(
            (1..=3).contains(&n),
            "{s}: {n} generations\n{}",
            a.log_text()
        );
    }
    let out = run_agent(&["verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(restore_all(&repo, tmp.path(), flavor), expected);
}

/// `redis.cluster = true` beside a server that is not a cluster node: `run` fails at once,
/// saying so, having written nothing.
#[test]
fn run_with_cluster_true_beside_a_single_server_fails_clearly() {
    let server = syncbridge_tests::redis::RedisServer::start(RedisFlavor::Redis7);
    let tmp = tempfile::tempdir().unwrap();
    let repo = file_repo(tmp.path());
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nsource = \"{}\"\ncluster = true\nrepository = \"{repo}\"\n",
            server.url()
        ),
    )
    .unwrap();
    let out = run_agent(&["run", "--config", config.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains(&format!(
            "redis.cluster = true, but 127.0.0.1:{} is not a Redis Cluster node",
            server.port()
        )),
        "{all}"
    );
    assert!(!tmp.path().join("repo/redis").exists(), "{all}");
}
