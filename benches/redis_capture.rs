//! Redis capture benchmark (issue 6), everything in the same run on the same machine:
//!
//! * snapshot of a ≥ 1 GiB dataset (Redis 7, `rdbcompression no`): `redis-cli --rdb` to a
//!   local file vs `syncbridge-agent redis snapshot` to SeaweedFS (S3) and to `file://`,
//!   which also validate, compress (zstd 3), checksum and upload. Wall time, MiB/s, ratios,
//!   and the agent's peak RSS (VmHWM);
//! * stream lag under `redis-benchmark` load: `redis stream --max-lag 1s` to SeaweedFS; the
//!   agent logs, per stored chunk, how long its oldest command waited to become durable;
//!   p50/p99/max of that, plus whether the durable offset reached the master's offset, and
//!   the agent's peak RSS.
//!
//! Goals: capture at least as fast as `redis-cli --rdb` (ratio ≤ 1.0); lag p99 < 1 s above
//! `--max-lag`... i.e. under 2 s end to end with max-lag 1 s; RSS < 100 MiB.
//!
//! Run: `cargo build --release -p syncbridge-agent && cargo bench -p syncbridge-tests --bench
//! redis_capture` (or `make bench`). `SB_BENCH_REDIS_KEYS` (default 1100000, 1000-byte values)
//! sets the dataset size; `SB_BENCH_REDIS_LAG_ONLY=1` runs only the stream part.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncbridge_tests::redis::{RedisFlavor, RedisServer};
use syncbridge_tests::s3::S3Server;

fn agent_bin() -> PathBuf {
    syncbridge_tests::agent::binary()
}

/// Runs a command to completion, sampling the peak RSS (VmHWM, KiB) of the process.
fn run_measured(mut cmd: Command) -> (Duration, u64, std::process::Output) {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = vm_hwm_kib(pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (elapsed, peak.load(Ordering::Relaxed), out)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Drops terminal colour sequences (`ESC [ ... m`) from a log.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn check(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn snapshot_bench(s3: &S3Server, tmp: &std::path::Path) {
    let keys: u64 = std::env::var("SB_BENCH_REDIS_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_100_000);
    let server = RedisServer::builder(RedisFlavor::Redis7)
        .args(["--rdbcompression", "no"])
        .start();
    let t = Instant::now();
    assert!(server
        .cmd(&["DEBUG", "POPULATE", &keys.to_string(), "key", "1000"])
        .is_ok());
    println!(
        "dataset: {keys} keys x 1000 bytes loaded in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // redis-cli --rdb, the peer tool.
    let rdb = tmp.join("cli.rdb");
    let mut cli = Command::new("redis-cli");
    cli.args(["-p", &server.port().to_string(), "--rdb"])
        .arg(&rdb);
    let (cli_time, cli_rss, out) = run_measured(cli);
    check(&out, "redis-cli --rdb");
    let size = std::fs::metadata(&rdb).unwrap().len();
    std::fs::remove_file(&rdb).unwrap();
    println!(
        "redis-cli --rdb (local file):        {:6.2}s  {:7.1} MiB/s  RSS {:5.1} MiB  ({:.0} MiB RDB)",
        cli_time.as_secs_f64(),
        mib(size) / cli_time.as_secs_f64(),
        cli_rss as f64 / 1024.0,
        mib(size)
    );

    let mut report_rows = vec![("redis-cli --rdb (local file)", cli_time, cli_rss)];
    for (name, repo, env) in [
        (
            "agent snapshot -> SeaweedFS (S3)",
            s3.repo_url("bench-snapshot"),
            s3.env(),
        ),
        (
            "agent snapshot -> file://",
            format!("file://{}", tmp.join("repo").display()),
            Vec::new(),
        ),
    ] {
        let mut cmd = Command::new(agent_bin());
        cmd.args([
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &repo,
        ])
        .envs(env);
        cmd.env("SYNCBRIDGE_LOG", "warn");
        let (time, rss, out) = run_measured(cmd);
        check(&out, name);
        println!(
            "{name:<36} {:6.2}s  {:7.1} MiB/s  RSS {:5.1} MiB  ratio to redis-cli {:.2}",
            time.as_secs_f64(),
            mib(size) / time.as_secs_f64(),
            rss as f64 / 1024.0,
            time.as_secs_f64() / cli_time.as_secs_f64()
        );
        report_rows.push((name, time, rss));
    }
    let _ = std::fs::remove_dir_all(tmp.join("repo"));
    // The report's copy (bench-report).
    {
        use syncbridge_tests::bench_results::{Bar, BenchResults, Cell, Chart};
        let mut out = BenchResults::new("redis_capture", "Redis snapshot and stream");
        out.note(format!(
            "Redis 7, {keys} keys × 1000 bytes (`DEBUG POPULATE`, `rdbcompression no`), {:.0} MiB of RDB. `SB_BENCH_REDIS_KEYS` sets the size.",
            mib(size)
        ));
        let secs = |d: Duration| d.as_secs_f64();
        out.chart(Chart::Bars {
            id: "snapshot".into(),
            title: "snapshot, MiB/s of RDB (higher is better)".into(),
            y_label: "MiB/s".into(),
            bars: report_rows
                .iter()
                .map(|(name, d, _)| Bar {
                    group: "snapshot".into(),
                    label: name.to_string(),
                    value: mib(size) / secs(*d),
                    note: name
                        .starts_with("agent")
                        .then(|| format!("{:.2}×", secs(cli_time) / secs(*d))),
                })
                .collect(),
        });
        out.table(
            "Snapshot",
            &[
                "tool",
                "seconds",
                "MiB/s",
                "speed vs redis-cli --rdb",
                "peak RSS, MiB",
            ],
            report_rows
                .iter()
                .map(|(name, d, rss)| {
                    vec![
                        Cell::text(*name),
                        Cell::num(secs(*d), 2),
                        Cell::num(mib(size) / secs(*d), 1),
                        Cell::ratio(secs(cli_time), secs(*d)),
                        Cell::num(*rss as f64 / 1024.0, 1),
                    ]
                })
                .collect(),
            Some("Goal: at least 1.00× `redis-cli --rdb` (speed ratio: higher is better)."),
        );
        for (name, d, _) in report_rows.iter().skip(1) {
            out.goal_at_least(
                &format!("snapshot speed, {name} ÷ redis-cli --rdb"),
                secs(cli_time) / secs(*d),
                1.0,
            );
        }
        out.save_merged();
    }
}

fn lag_bench(s3: &S3Server, tmp: &std::path::Path) {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let log = tmp.join("stream.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut agent = Command::new(agent_bin())
        .args([
            "redis",
            "stream",
            "--source",
            &server.url(),
            "--repo",
            &s3.repo_url("bench-stream"),
        ])
        .args(["--max-lag", "1s"])
        .envs(s3.env())
        .env(
            "SYNCBRIDGE_LOG",
            "info,syncbridge_agent::redis::stream=debug",
        )
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let pid = agent.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("snapshot stored")
    {
        assert!(
            Instant::now() < deadline,
            "agent did not start:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &server.port().to_string(),
            "-t",
            "set,incr,lpush,hset",
            "-n",
            "400000",
            "-P",
            "16",
            "-d",
            "100",
            "-r",
            "100000",
            "-q",
        ])
        .output()
        .unwrap();
    check(&out, "redis-benchmark");
    let load = t.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let rss = vm_hwm_kib(pid).unwrap_or(0);
    let master_offset: u64 = server.info("replication")["master_repl_offset"]
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(agent.wait().unwrap().success());
    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    let mut lags: Vec<i64> = text
        .lines()
        .filter(|l| l.contains("chunk stored"))
        .filter_map(|l| {
            l.split("lag_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    lags.sort_unstable();
    let durable: u64 = text
        .lines()
        .rev()
        .find_map(|l| {
            l.split("durable=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    println!(
        "stream under redis-benchmark ({:.1}s, {:.0} MiB of commands): {} chunks, oldest-command lag p50 {} ms, p99 {} ms, max {} ms; RSS {:.1} MiB; durable offset {} of {} ({})",
        load.as_secs_f64(),
        mib(master_offset),
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(0),
        rss as f64 / 1024.0,
        durable,
        master_offset,
        if durable >= master_offset { "caught up" } else { "BEHIND" }
    );
    // The report's copy (bench-report); no peer tool streams Redis, so no ratio.
    {
        use syncbridge_tests::bench_results::{BenchResults, Cell};
        let mut out = BenchResults::new("redis_capture", "Redis snapshot and stream");
        out.table(
            "Stream under redis-benchmark (`--max-lag 1s`, to SeaweedFS)",
            &["load, s", "commands, MiB", "chunks", "lag p50, ms", "lag p99, ms", "lag max, ms", "peak RSS, MiB", "caught up"],
            vec![vec![
                Cell::num(load.as_secs_f64(), 1),
                Cell::num(mib(master_offset), 0),
                Cell::num(lags.len() as f64, 0),
                Cell::num(percentile(&lags, 0.5) as f64, 0),
                Cell::num(percentile(&lags, 0.99) as f64, 0),
                Cell::num(lags.last().copied().unwrap_or(0) as f64, 0),
                Cell::num(rss as f64 / 1024.0, 1),
                Cell::text(if durable >= master_offset { "yes" } else { "NO" }),
            ]],
            Some("Lag: how long the oldest command of each stored chunk waited to become durable. Goal: p99 under 2 s with `--max-lag 1s`."),
        );
        out.save_merged();
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run for real.
    if !std::env::args().any(|a| a == "--bench") {
        println!("redis_capture: run with `cargo bench` to measure");
        return;
    }
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("SB_BENCH_REDIS_LAG_ONLY").is_none() {
        snapshot_bench(&s3, tmp.path());
    }
    lag_bench(&s3, tmp.path());
}
