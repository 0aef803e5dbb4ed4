//! Memory of the sidecar (issue 14): `syncbridge-agent run --config` with both streams
//! (PostgreSQL 15 to `file://`, Valkey 9 to `file://`) under load, the RSS sampled every
//! 100 ms and the peak (`VmHWM`) read before it stops. The goal is a peak under 100 MiB.
//!
//! Load, `SB_BENCH_SIDECAR_SECS` (default 30) seconds at once on both: `pgbench -c 4` on a
//! scale-20 database (`pgbench -i` first, so the stream also carries the bulk load), and
//! `redis-benchmark` SETs of 256-byte values over 8 connections, pipelined 16 deep.
//!
//! Run: `cargo build --release -p syncbridge-agent && cargo bench -p syncbridge-tests --bench
//! run_sidecar` (or `make bench`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use syncbridge_tests::bench_results::{BenchResults, Cell, Chart, Series};
use syncbridge_tests::measure::status_kib;
use syncbridge_tests::pg::{PgCluster, PgVersion, REPLICATION_PASSWORD, REPLICATION_USER};
use syncbridge_tests::process::free_port;
use syncbridge_tests::prometheus::http_get;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

fn main() {
    let secs: u64 = std::env::var("SB_BENCH_SIDECAR_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(2048)
        .start();
    let valkey = RedisServer::start(RedisFlavor::Valkey9);
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pg-password");
    std::fs::write(&pw, REPLICATION_PASSWORD).unwrap();
    let http = free_port();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[repository]\nurl = \"file://{}\"\n\n[postgres]\nsource = \"postgres://{REPLICATION_USER}@127.0.0.1:{}/postgres\"\npassword_file = \"{}\"\n\n[redis]\nsource = \"redis://127.0.0.1:{}\"\nrepository = \"file://{}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
            work.path().join("pg-repo").display(),
            pg.port(),
            pw.display(),
            valkey.port(),
            work.path().join("redis-repo").display(),
        ),
    )
    .unwrap();
    let mut agent = Command::new(syncbridge_tests::agent::binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("SYNCBRIDGE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = agent.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(http, "/readyz").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "run never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let idle_kib = status_kib(pid, "VmRSS:").unwrap_or(0);

    // Sample RSS while the load runs.
    let began = Instant::now();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut points = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    points.push((began.elapsed().as_secs_f64(), kib as f64 / 1024.0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            points
        })
    };
    let redis_load = Command::new("redis-benchmark")
        .args([
            "-p",
            &valkey.port().to_string(),
            "-t",
            "set",
            "-d",
            "256",
            "-c",
            "8",
            "-P",
            "16",
            "-r",
            "1000000",
            "-n",
            "100000000",
            "-q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    pg.run("pgbench", &["-i", "-q", "-s", "20"]);
    let wal_start = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    pg.run(
        "pgbench",
        &["-c", "4", "-j", "2", "-T", &secs.to_string(), "-n"],
    );
    let mut redis_load = redis_load;
    let _ = redis_load.kill();
    let _ = redis_load.wait();
    let wal_end = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    let wal_bytes = pg.query_one_blocking(&format!(
        "SELECT pg_wal_lsn_diff('{wal_end}', '{wal_start}')::bigint"
    ));
    std::thread::sleep(Duration::from_secs(2));
    let peak_kib = status_kib(pid, "VmHWM:").unwrap_or(0);
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let points = sampler.join().unwrap();
    let metrics = http_get(http, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    let redis_offset = metrics
        .lines()
        .find(|l| l.starts_with("syncbridge_redis_durable_offset{"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();

    let peak_mib = peak_kib as f64 / 1024.0;
    println!(
        "run_sidecar: peak RSS {peak_mib:.1} MiB (idle {:.1} MiB) over {secs} s of pgbench -c 4 and redis-benchmark; WAL {} MiB since pgbench -i, Redis stream offset {redis_offset}; exit {status}",
        idle_kib as f64 / 1024.0,
        wal_bytes.parse::<u64>().unwrap_or(0) >> 20,
    );
    let mut results = BenchResults::new("run_sidecar", "Memory of run --config with both streams");
    results
        .table(
            "Peak memory of the sidecar",
            &[
                "load",
                "idle RSS MiB",
                "peak RSS MiB",
                "WAL MiB (pgbench run)",
            ],
            vec![vec![
                Cell::text(format!(
                    "pgbench -c 4 ({secs} s) + redis-benchmark SET 256 B"
                )),
                Cell::num(idle_kib as f64 / 1024.0, 1),
                Cell::num(peak_mib, 1),
                Cell::num(wal_bytes.parse::<f64>().unwrap_or(0.0) / 1048576.0, 0),
            ]],
            Some("VmHWM of the one `run` process streaming PostgreSQL 15 and Valkey 9 to file://"),
        )
        .goal_at_most("peak RSS of run ÷ 100 MiB", peak_mib / 100.0, 1.0)
        .chart(Chart::Lines {
            id: "run_sidecar_rss".into(),
            title: "RSS of run under load".into(),
            x_label: "seconds".into(),
            y_label: "MiB".into(),
            series: vec![Series {
                name: "syncbridge-agent run".into(),
                points,
            }],
            log_x: false,
            log_y: false,
        });
    results.save();
    assert!(status.success(), "run did not stop cleanly: {status}");
}
