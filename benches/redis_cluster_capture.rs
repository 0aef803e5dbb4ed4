//! Redis Cluster capture benchmark (issue 15), everything in the same run on the same
//! machine, a Redis 7 cluster of three masters (no replicas: they would only take CPU from
//! the two cores):
//!
//! * **snapshot**: `syncbridge-agent redis snapshot` of the whole cluster (one process, one
//!   generation per shard, every master at once, validated, zstd 3, checksummed, to
//!   `file://`) against `redis-cli --rdb` run against each master in turn to local files.
//!   `SB_BENCH_RUNS` rounds (default 2), the order alternating. Wall time, CPU seconds
//!   (`/proc`), the agent's peak RSS (VmHWM), ratio redis-cli time / agent time (≥ 1.0: the
//!   agent is at least as fast).
//! * **stream memory**: one `redis stream` process capturing the three shards (into an
//!   empty repository, so it starts with three full syncs of the whole dataset at once),
//!   then `redis-benchmark --cluster` SETs for `SB_BENCH_CLUSTER_SECS` (default 20) seconds.
//!   Peak RSS (VmHWM) after the full syncs and at the end. Goal: under 100 MiB.
//!
//! `SB_BENCH_CLUSTER_BUDGET_MIB` passes `--memory-budget-mib` to the stream (default: the
//! agent's, 64); `SB_BENCH_CLUSTER_STREAM_ONLY=1` skips the snapshot part.
//!
//! Dataset: `SB_BENCH_CLUSTER_KEYS` (default 1 100 000) keys of 1000 random bytes
//! (incompressible), about 1.1 GiB of RDB over the three masters.
//!
//! Run: `cargo build --release -p syncbridge-agent && cargo bench -p syncbridge-tests --bench
//! redis_cluster_capture`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use syncbridge_tests::bench_results::{BenchResults, Cell};
use syncbridge_tests::measure::{
    check_success, cpu_ticks, load_average, load_random_sets, median, mib, run_measured, status_kib,
};
use syncbridge_tests::redis::RedisFlavor;
use syncbridge_tests::redis_cluster::RedisCluster;
use wire::redis::cluster::key_hash_slot;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Loads `keys` keys of `len` random bytes (xorshift64*, incompressible) into the cluster:
/// one connection per master, pipelined `SET`s, each key sent to its slot's master.
fn populate(c: &RedisCluster, keys: u64, len: usize) {
    let map = c.slot_map();
    let masters = c.current_masters();
    let ports: Vec<u16> = masters.iter().map(|&m| c.node(m).port()).collect();
    let owner_index: Vec<usize> = (0..16384u16)
        .map(|s| {
            let id = map.owner(s).unwrap();
            masters.iter().position(|&m| c.node_id(m) == id).unwrap()
        })
        .collect();
    let threads: Vec<_> = (0..ports.len())
        .map(|me| {
            let port = ports[me];
            let owner_index = owner_index.clone();
            std::thread::spawn(move || {
                let mine: Vec<u64> = (0..keys)
                    .filter(|i| {
                        let key = format!("key:{i}");
                        owner_index[usize::from(key_hash_slot(key.as_bytes()))] == me
                    })
                    .collect();
                load_random_sets(port, &mine, len, 0x9E37_79B9_7F4A_7C15u64 ^ (me as u64 + 1));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// `redis-cli --rdb` against each master in turn: total time, CPU, RDB bytes, peak RSS.
fn cli_round(c: &RedisCluster, dir: &Path) -> (f64, f64, u64, u64) {
    let (mut secs, mut cpu, mut bytes, mut peak) = (0.0, 0.0, 0u64, 0u64);
    for m in c.current_masters() {
        let rdb = dir.join(format!("cli-{m}.rdb"));
        let mut cli = Command::new("redis-cli");
        cli.args(["-p", &c.node(m).port().to_string(), "--rdb"])
            .arg(&rdb);
        let r = run_measured(cli);
        check_success(&r.out, "redis-cli --rdb");
        secs += r.time.as_secs_f64();
        cpu += r.cpu;
        peak = peak.max(r.peak_kib);
        bytes += std::fs::metadata(&rdb).unwrap().len();
        std::fs::remove_file(&rdb).unwrap();
    }
    (secs, cpu, bytes, peak)
}

/// `redis snapshot` of the whole cluster into a new `file://` repository.
fn agent_round(c: &RedisCluster, dir: &Path) -> (f64, f64, u64) {
    let repo = dir.join("snap-repo");
    let mut cmd = Command::new(syncbridge_tests::agent::binary());
    cmd.args([
        "redis",
        "snapshot",
        "--source",
        &c.node(0).url(),
        "--repo",
        &format!("file://{}", repo.display()),
    ])
    .env("SYNCBRIDGE_LOG", "warn");
    let r = run_measured(cmd);
    check_success(&r.out, "redis snapshot (cluster)");
    let stdout = String::from_utf8_lossy(&r.out.stdout);
    assert!(stdout.contains("cluster:      3 shards"), "{stdout}");
    let _ = std::fs::remove_dir_all(&repo);
    (r.time.as_secs_f64(), r.cpu, r.peak_kib)
}

fn snapshot_bench(c: &RedisCluster, dir: &Path, results: &mut BenchResults) {
    let runs: usize = env_or("SB_BENCH_RUNS", 2usize).max(1);
    let mut cli_t = Vec::new();
    let mut agent_t = Vec::new();
    let mut rows = Vec::new();
    let mut rdb = 0u64;
    for round in 0..runs {
        // Alternate which goes first (page cache, other engineers' builds).
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let _ = Command::new("sync").status();
            let load = load_average();
            if which == 0 {
                let (secs, cpu, bytes, peak) = cli_round(c, dir);
                rdb = bytes;
                cli_t.push(secs);
                println!(
                    "round {round}: redis-cli --rdb x3 (in turn)      {secs:6.2}s  {:7.1} MiB/s  CPU {cpu:5.1}s  RSS {:5.1} MiB  load {load}",
                    mib(bytes) / secs,
                    peak as f64 / 1024.0
                );
                rows.push(vec![
                    Cell::num(round as f64, 0),
                    Cell::text("redis-cli --rdb, each master in turn"),
                    Cell::num(secs, 2),
                    Cell::num(cpu, 1),
                    Cell::num(peak as f64 / 1024.0, 1),
                    Cell::text(load),
                ]);
            } else {
                let (secs, cpu, peak) = agent_round(c, dir);
                agent_t.push(secs);
                println!(
                    "round {round}: agent redis snapshot -> file://   {secs:6.2}s  {:7.1} MiB/s  CPU {cpu:5.1}s  RSS {:5.1} MiB  load {load}",
                    mib(rdb.max(1)) / secs,
                    peak as f64 / 1024.0
                );
                rows.push(vec![
                    Cell::num(round as f64, 0),
                    Cell::text("agent redis snapshot (3 shards at once) -> file://"),
                    Cell::num(secs, 2),
                    Cell::num(cpu, 1),
                    Cell::num(peak as f64 / 1024.0, 1),
                    Cell::text(load),
                ]);
            }
        }
    }
    let ratio = median(&cli_t) / median(&agent_t);
    let per_round: Vec<String> = cli_t
        .iter()
        .zip(&agent_t)
        .map(|(c, a)| format!("{:.2}", c / a))
        .collect();
    println!(
        "cluster snapshot ({:.0} MiB of RDB over 3 masters, median of {runs}): redis-cli x3 {:.2}s, agent {:.2}s; speed ratio redis-cli / agent {ratio:.2} [{}] (goal >= 1.0)",
        mib(rdb),
        median(&cli_t),
        median(&agent_t),
        per_round.join(" ")
    );
    results.table(
        "Cluster snapshot: agent vs redis-cli --rdb per master",
        &[
            "round",
            "tool",
            "seconds",
            "CPU s",
            "peak RSS MiB",
            "load average",
        ],
        rows,
        Some(&format!(
            "{:.0} MiB of RDB over 3 masters; speed ratio redis-cli time / agent time: {ratio:.2} (per round {}).",
            mib(rdb),
            per_round.join(", ")
        )),
    );
    results.goal_at_least(
        "cluster snapshot speed, redis-cli --rdb ÷ agent",
        ratio,
        1.0,
    );
}

fn stream_bench(c: &RedisCluster, dir: &Path, results: &mut BenchResults) {
    let secs: u64 = env_or("SB_BENCH_CLUSTER_SECS", 20u64);
    let repo = dir.join("stream-repo");
    let log = dir.join("stream.log");
    let file = std::fs::File::create(&log).unwrap();
    let began = Instant::now();
    let mut agent = Command::new(syncbridge_tests::agent::binary())
        .args([
            "redis",
            "stream",
            "--source",
            &c.node(0).url(),
            "--repo",
            &format!("file://{}", repo.display()),
            "--max-lag",
            "1s",
        ])
        .args(
            std::env::var("SB_BENCH_CLUSTER_BUDGET_MIB")
                .map(|b| vec!["--memory-budget-mib".to_owned(), b])
                .unwrap_or_default(),
        )
        .env("SYNCBRIDGE_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let pid = agent.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    while std::fs::read_to_string(&log)
        .unwrap()
        .matches("snapshot stored")
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the three snapshots were not stored:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let synced = began.elapsed();
    let after_sync = status_kib(pid, "VmHWM:").unwrap_or(0);
    let load = load_average();
    let offsets_before: u64 = c
        .current_masters()
        .iter()
        .map(|&m| {
            c.node(m).info("replication")["master_repl_offset"]
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    let mut bench = Command::new("redis-benchmark")
        .args([
            "-p",
            &c.node(0).port().to_string(),
            "--cluster",
            "-t",
            "set",
            "-d",
            "256",
            "-c",
            "12",
            "-P",
            "16",
            "-r",
            "1000000",
            "-n",
            "1000000000",
            "-q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut rss_max = 0u64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        rss_max = rss_max.max(status_kib(pid, "VmRSS:").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = bench.kill();
    let _ = bench.wait();
    // Did the agent keep up? Every master's replica (the agent) acknowledges its offset.
    let stopped = Instant::now();
    let caught_up = loop {
        let behind = c.current_masters().iter().any(|&m| {
            let info = c.node(m).info("replication");
            let target: u64 = info["master_repl_offset"].parse().unwrap();
            let acked = info
                .get("slave0")
                .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("offset=")))
                .and_then(|o| o.parse::<u64>().ok())
                .unwrap_or(0);
            acked < target
        });
        if !behind {
            break Some(stopped.elapsed());
        }
        if stopped.elapsed() > Duration::from_secs(30) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(1));
    let peak = status_kib(pid, "VmHWM:").unwrap_or(0);
    let cpu = cpu_ticks(pid).unwrap_or(0) as f64 / 100.0;
    let offsets_after: u64 = c
        .current_masters()
        .iter()
        .map(|&m| {
            c.node(m).info("replication")["master_repl_offset"]
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();
    let _ = std::fs::remove_dir_all(&repo);
    let streamed = offsets_after - offsets_before;
    println!(
        "cluster stream: 3 full syncs in {:.1}s, peak RSS {:.1} MiB after them; {secs} s of redis-benchmark --cluster ({:.0} MiB of commands over 3 shards): RSS max {:.1} MiB, peak (VmHWM) {:.1} MiB; {}; agent CPU {cpu:.1}s; load {load}; exit {status}",
        synced.as_secs_f64(),
        after_sync as f64 / 1024.0,
        mib(streamed),
        rss_max as f64 / 1024.0,
        peak as f64 / 1024.0,
        match caught_up {
            Some(t) => format!("every shard acknowledged {:.1}s after the load", t.as_secs_f64()),
            None => "BEHIND 30 s after the load".into(),
        }
    );
    results.table(
        "One redis stream process capturing 3 shards",
        &[
            "phase",
            "seconds",
            "data MiB",
            "peak RSS (VmHWM) MiB",
            "load average",
        ],
        vec![
            vec![
                Cell::text("3 full syncs at once (empty repository)"),
                Cell::num(synced.as_secs_f64(), 1),
                Cell::text("the dataset"),
                Cell::num(after_sync as f64 / 1024.0, 1),
                Cell::text(load.clone()),
            ],
            vec![
                Cell::text("redis-benchmark --cluster SET 256 B, -c 12 -P 16"),
                Cell::num(secs as f64, 0),
                Cell::num(mib(streamed), 0),
                Cell::num(peak as f64 / 1024.0, 1),
                Cell::text(load_average()),
            ],
        ],
        Some(&format!(
            "Goal: under 100 MiB for the three streams together. {}",
            match caught_up {
                Some(t) => format!(
                    "Every shard's stream acknowledged its master's offset {:.1} s after the load stopped.",
                    t.as_secs_f64()
                ),
                None => "The stream was still behind 30 s after the load stopped.".into(),
            }
        )),
    );
    results.goal_at_most(
        "peak RSS of a 3-shard redis stream ÷ 100 MiB",
        peak as f64 / 1024.0 / 100.0,
        1.0,
    );
    assert!(
        status.success(),
        "the stream did not stop cleanly: {status}"
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run for real.
    if !std::env::args().any(|a| a == "--bench") {
        println!("redis_cluster_capture: run with `cargo bench` to measure");
        return;
    }
    let keys: u64 = env_or("SB_BENCH_CLUSTER_KEYS", 1_100_000u64);
    let c = RedisCluster::start(RedisFlavor::Redis7, 3, 0);
    let t = Instant::now();
    populate(&c, keys, 1000);
    println!(
        "dataset: {keys} keys x 1000 random bytes over 3 masters, loaded in {:.1}s (load {})",
        t.elapsed().as_secs_f64(),
        load_average()
    );
    let dir = tempfile::tempdir_in(std::env::var("SB_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
        .unwrap();
    let mut results = BenchResults::new("redis_cluster_capture", "Redis Cluster capture");
    results.note(format!(
        "Redis 7 cluster, 3 masters, {keys} keys × 1000 random bytes; `SB_BENCH_CLUSTER_KEYS`, `SB_BENCH_RUNS`, `SB_BENCH_CLUSTER_SECS` set it."
    ));
    if std::env::var_os("SB_BENCH_CLUSTER_STREAM_ONLY").is_none() {
        snapshot_bench(&c, dir.path(), &mut results);
    }
    stream_bench(&c, dir.path(), &mut results);
    results.save();
}
