//! WAL streaming benchmark (issue 4), everything in the same run on the same WAL: one
//! PostgreSQL 15 cluster, seven receivers on seven slots at once:
//!
//! * `syncbridge-agent postgres stream` to a local repository (`file://`),
//! * `syncbridge-agent postgres stream` to SeaweedFS (S3),
//! * `syncbridge-agent postgres stream --compression lz4` to a local repository (the
//!   codec `pg_receivewal --compress=lz4` uses),
//! * `pg_receivewal` to a local directory, uncompressed (status every second, `-s 1`, so its
//!   reported position is as fresh as the agent's),
//! * `pg_receivewal --compress=gzip` (the method a bare `--compress=N` gives, and the only
//!   one before PostgreSQL 15) and `--compress=lz4` (new in 15, the cheapest) to local
//!   directories,
//! * `pg_receivewal --synchronous` (fsync after every write, flush reported at once: what
//!   the agent's `--synchronous` competes with) to a local directory.
//!
//! A write load (`INSERT … generate_series`, `SB_BENCH_PG_WAL_MB` MiB of WAL, default 512;
//! paced to `SB_BENCH_PG_WAL_RATE_MIB` MiB/s when set; or, with
//! `SB_BENCH_PG_WAL_LOAD=pgbench`, pgbench's TPC-B-like transactions on a scale-20 database
//! initialised before the receivers start, default 256 MiB, not paced) runs while `pg_stat_replication.flush_lag` of every receiver is sampled every 200 ms.
//! Reported per receiver: WAL MiB/s sustained (load start until its flush position reached
//! the end of WAL), lag at the end (seconds after the load until caught up), flush-lag
//! p50/p99 during the load, CPU seconds per GiB of WAL (utime+stime from /proc), peak RSS
//! (VmHWM), bytes stored (file:// and local directories); and the agent-to-pg_receivewal
//! ratios. Goals: keeps up; lag p99 < 1 s in the
//! default mode; CPU/GiB ≤ `pg_receivewal --compress=lz4` (printed as the agent/lz4 ratio);
//! RSS < 100 MiB.
//!
//! `SB_BENCH_AGENT_BASELINE=PATH` adds two receivers running another agent binary (an
//! earlier build, to file:// with zstd and with LZ4), so a change is compared with the
//! build before it in the same run rather than across runs.
//!
//! Run: `cargo build --release -p syncbridge-agent && cargo bench -p syncbridge-tests --bench
//! pg_wal_stream` (or `make bench`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use syncbridge_tests::pg::{PgCluster, PgVersion, REPLICATION_PASSWORD};
use syncbridge_tests::process::run_as_server_user;
use syncbridge_tests::s3::S3Server;

fn agent_bin() -> PathBuf {
    syncbridge_tests::agent::binary()
}

fn proc_field(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Minor page faults of the process (all its threads, `/proc/PID/stat` field 10).
fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    after
        .split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime in seconds (of the process itself; neither receiver forks workers).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Records the context switches (voluntary, involuntary) of each of the process's threads
/// in `seen`, by thread id. Called at every sample, so a thread that has exited since (a
/// blocking-pool worker idle for 10 s) still counts with its last figure: a receiver that
/// wakes for every small socket read or hands each piece of work to another thread shows
/// it here before it shows in CPU.
fn record_context_switches(pid: u32, seen: &mut BTreeMap<u32, (u64, u64)>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let now = (
            field("voluntary_ctxt_switches:"),
            field("nonvoluntary_ctxt_switches:"),
        );
        let entry = seen.entry(tid).or_default();
        *entry = (entry.0.max(now.0), entry.1.max(now.1));
    }
}

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap()
}

struct Receiver {
    name: &'static str,
    app: &'static str,
    child: Child,
    lags_ms: Vec<f64>,
    caught_up: Option<Duration>,
    cpu: f64,
    /// Context switches (voluntary, involuntary) per thread id, as last sampled.
    switches: BTreeMap<u32, (u64, u64)>,
    /// Minor page faults (`/proc/PID/stat` field 10): fresh memory being touched.
    minor_faults: u64,
    rss_kib: u64,
    /// Where it stores WAL on the local disk, if it does.
    dir: Option<PathBuf>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

/// What writes the WAL the receivers stream.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// Batches of `INSERT … generate_series` with repetitive rows: the WAL compresses
    /// 15-28× (LZ4, zstd), so the codec is a small part of each receiver's CPU.
    Insert,
    /// pgbench's TPC-B-like transactions: OLTP WAL (updates of random rows, full-page
    /// images after each checkpoint) that compresses 4× (LZ4) to 8× (zstd), where the
    /// codec's cost shows.
    Pgbench,
}

impl Load {
    fn from_env() -> Load {
        match std::env::var("SB_BENCH_PG_WAL_LOAD").as_deref() {
            Err(_) | Ok("") | Ok("insert") => Load::Insert,
            Ok("pgbench") => Load::Pgbench,
            Ok(other) => panic!("SB_BENCH_PG_WAL_LOAD={other}: use insert or pgbench"),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Load::Insert => "`INSERT … generate_series`",
            Load::Pgbench => "pgbench (TPC-B-like, 4 clients, scale 20)",
        }
    }

    /// Name of the results file, so both loads have their own section in the report.
    fn bench_id(self) -> &'static str {
        match self {
            Load::Insert => "pg_wal_stream",
            Load::Pgbench => "pg_wal_stream_pgbench",
        }
    }
}

fn main() {
    let load = Load::from_env();
    let wal_mb: u64 = std::env::var("SB_BENCH_PG_WAL_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if load == Load::Pgbench { 256 } else { 512 });
    // `SB_BENCH_PG_WAL_RATE_MIB`: pace the load to this many MiB/s of WAL (default: as fast
    // as it goes). Below ~18 MiB/s a segment takes longer than `--max-lag` less the write
    // headroom (0.9 s against a fast store) to fill, so the agent ships deltas before the
    // whole segment.
    let rate: f64 = std::env::var("SB_BENCH_PG_WAL_RATE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        rate == 0.0 || load == Load::Insert,
        "SB_BENCH_PG_WAL_RATE_MIB paces the insert load only (pgbench runs unpaced)"
    );
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(256)
        .extra_conf("max_wal_senders = 10")
        .extra_conf("max_replication_slots = 10")
        .start();
    let s3 = S3Server::start();
    let work = tempfile::tempdir().unwrap();
    let src = pg.replication_url();
    let pgbench = (load == Load::Pgbench).then(|| pg.client_binary("pgbench"));
    if let Some(pgbench) = &pgbench {
        // Before any slot exists: the receivers stream the transactions' WAL, not the
        // initial load's.
        let out = Command::new(pgbench)
            .args(["-i", "-q", "-s", "20", &pg.superuser_url()])
            .output()
            .expect("pgbench (run make deps)");
        assert!(
            out.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.sql_blocking("CHECKPOINT");
    }
    let mut receivers = Vec::new();

    // `SB_BENCH_AGENT_BASELINE`: another agent binary (an earlier build) streams too, to
    // file:// with zstd and with LZ4, so a change is measured against it in the same run.
    let baseline = std::env::var_os("SB_BENCH_AGENT_BASELINE").map(PathBuf::from);
    let mut agents = vec![
        (
            "agent -> file://",
            "sb_file",
            format!("file://{}", work.path().join("repo").display()),
            "zstd",
            agent_bin(),
        ),
        (
            "agent -> SeaweedFS",
            "sb_s3",
            s3.repo_url("bench"),
            "zstd",
            agent_bin(),
        ),
        (
            "agent --compression lz4 -> file://",
            "sb_lz4",
            format!("file://{}", work.path().join("repo-lz4").display()),
            "lz4",
            agent_bin(),
        ),
    ];
    if let Some(base) = &baseline {
        agents.push((
            "baseline agent -> file://",
            "sb_base_file",
            format!("file://{}", work.path().join("repo-base").display()),
            "zstd",
            base.clone(),
        ));
        agents.push((
            "baseline agent --compression lz4 -> file://",
            "sb_base_lz4",
            format!("file://{}", work.path().join("repo-base-lz4").display()),
            "lz4",
            base.clone(),
        ));
    }
    for (name, app, repo, codec, bin) in agents {
        let child = Command::new(bin)
            .args([
                "postgres",
                "stream",
                "--source",
                &src,
                "--repo",
                &repo,
                "--slot",
                app,
                "--application-name",
                app,
                "--compression",
                codec,
            ])
            .envs(s3.env())
            .env("SYNCBRIDGE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join(format!("{app}.log"))).unwrap())
            .spawn()
            .unwrap();
        receivers.push(Receiver {
            name,
            app,
            child,
            lags_ms: Vec::new(),
            caught_up: None,
            cpu: 0.0,
            switches: BTreeMap::new(),
            minor_faults: 0,
            rss_kib: 0,
            dir: repo
                .strip_prefix("file://")
                .map(|p| PathBuf::from(p).join("postgres/wal")),
        });
    }
    for (name, app, extra) in [
        ("pg_receivewal", "rw_plain", None),
        (
            "pg_receivewal --compress=gzip",
            "rw_gzip",
            Some("--compress=gzip"),
        ),
        (
            "pg_receivewal --compress=lz4",
            "rw_lz4",
            Some("--compress=lz4"),
        ),
        (
            "pg_receivewal --synchronous",
            "rw_sync",
            Some("--synchronous"),
        ),
    ] {
        let dir = pg.temp_dir().join(app);
        std::fs::create_dir_all(&dir).unwrap();
        syncbridge_tests::process::chown_to_server_user(&dir);
        pg.sql_blocking(&format!(
            "SELECT pg_create_physical_replication_slot('{app}', true)"
        ));
        let mut cmd = Command::new(pg.client_binary("pg_receivewal"));
        cmd.args(["-D", dir.to_str().unwrap(), "-S", app, "--no-loop", "-s", "1", "-d"])
            .arg(format!("host=127.0.0.1 port={} user=replicator password={REPLICATION_PASSWORD} application_name={app}", pg.port()));
        cmd.args(extra);
        run_as_server_user(&mut cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        receivers.push(Receiver {
            name,
            app,
            child,
            lags_ms: Vec::new(),
            caught_up: None,
            cpu: 0.0,
            switches: BTreeMap::new(),
            minor_faults: 0,
            rss_kib: 0,
            dir: Some(dir),
        });
    }
    // Everyone connected?
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: usize = pg
            .query_one_blocking("SELECT count(*) FROM pg_stat_replication")
            .parse()
            .unwrap();
        if n >= receivers.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} receivers connected");
        std::thread::sleep(Duration::from_millis(200));
    }

    pg.sql_blocking("CREATE TABLE load(id int, pad text)");
    let start_lsn = parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text"));
    let target = start_lsn + wal_mb * 1024 * 1024;
    let load_started = Instant::now();
    let loader = {
        let url = pg.superuser_url();
        let pgbench = pgbench.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(conn);
                let t0 = Instant::now();
                let rows = if rate > 0.0 { 1500 } else { 20000 };
                loop {
                    if let Some(pgbench) = &pgbench {
                        // Five seconds at a time until the WAL target is passed.
                        let st = tokio::process::Command::new(pgbench)
                            .args(["-n", "-c", "4", "-j", "2", "-T", "5", "-M", "prepared", &url])
                            .stdout(Stdio::null())
                            .status()
                            .await
                            .unwrap();
                        assert!(st.success(), "pgbench failed: {st}");
                    } else {
                        client.simple_query(&format!("INSERT INTO load SELECT g, repeat('b', 300) FROM generate_series(1, {rows}) g")).await.unwrap();
                    }
                    let rows = client.simple_query("SELECT pg_current_wal_lsn()::text").await.unwrap();
                    let lsn = rows.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(parse_lsn),
                        _ => None,
                    });
                    let lsn = lsn.unwrap_or(0);
                    if lsn >= target {
                        break;
                    }
                    if rate > 0.0 {
                        let due = lsn.saturating_sub(start_lsn) as f64 / (rate * 1048576.0);
                        let ahead = due - t0.elapsed().as_secs_f64();
                        if ahead > 0.0 {
                            tokio::time::sleep(Duration::from_secs_f64(ahead)).await;
                        }
                    }
                }
                client.simple_query("SELECT pg_switch_wal()").await.unwrap();
            });
        })
    };
    let sample = |receivers: &mut Vec<Receiver>| -> BTreeMap<String, (u64, Option<f64>)> {
        let rows = pg.sql_blocking("SELECT application_name, flush_lsn::text, extract(epoch FROM flush_lag) * 1000 FROM pg_stat_replication");
        let mut out = BTreeMap::new();
        for r in rows {
            let app = r[0].clone().unwrap_or_default();
            let flush = r[1].as_deref().map(parse_lsn).unwrap_or(0);
            let lag = r[2].as_deref().and_then(|v| v.parse::<f64>().ok());
            out.insert(app, (flush, lag));
        }
        for rc in receivers.iter_mut() {
            if let Some(kb) = proc_field(rc.child.id(), "VmHWM:") {
                rc.rss_kib = rc.rss_kib.max(kb);
            }
            record_context_switches(rc.child.id(), &mut rc.switches);
        }
        out
    };
    // Lag samples with their time, for the report's plot.
    let mut lag_series: BTreeMap<&'static str, Vec<(f64, f64)>> = BTreeMap::new();
    while !loader.is_finished() {
        let s = sample(&mut receivers);
        for rc in receivers.iter_mut() {
            if let Some((_, Some(lag))) = s.get(rc.app) {
                rc.lags_ms.push(*lag);
                lag_series
                    .entry(rc.name)
                    .or_default()
                    .push((load_started.elapsed().as_secs_f64(), *lag));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    loader.join().unwrap();
    let load_time = load_started.elapsed();
    let end_lsn = parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text"));
    let wal_bytes = end_lsn - start_lsn;
    let deadline = Instant::now() + Duration::from_secs(300);
    while receivers.iter().any(|r| r.caught_up.is_none()) && Instant::now() < deadline {
        let s = sample(&mut receivers);
        for rc in receivers.iter_mut() {
            if rc.caught_up.is_none() && s.get(rc.app).is_some_and(|(f, _)| *f >= end_lsn) {
                rc.caught_up = Some(load_started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for rc in receivers.iter_mut() {
        rc.cpu = cpu_seconds(rc.child.id());
        record_context_switches(rc.child.id(), &mut rc.switches);
        rc.minor_faults = minor_faults(rc.child.id());
        let _ = rc.child.kill();
        let _ = rc.child.wait();
    }

    let gib = wal_bytes as f64 / (1u64 << 30) as f64;
    println!(
        "\nWAL streaming, PostgreSQL 15, {:.0} MiB of WAL generated by {} in {:.1} s ({:.1} MiB/s)",
        wal_bytes as f64 / 1048576.0,
        load.describe(),
        load_time.as_secs_f64(),
        wal_bytes as f64 / 1048576.0 / load_time.as_secs_f64()
    );
    println!(
        "{:<30} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9} {:>11}",
        "receiver", "MiB/s", "end lag s", "p50 ms", "p99 ms", "CPU s/GiB", "RSS MiB", "stored MiB"
    );
    let mut results = BTreeMap::new();
    let mut report_rows = Vec::new();
    for rc in receivers.iter_mut() {
        let total = rc.caught_up.map(|d| d.as_secs_f64());
        let rate = total
            .map(|t| wal_bytes as f64 / 1048576.0 / t)
            .unwrap_or(f64::NAN);
        let end_lag = total
            .map(|t| (t - load_time.as_secs_f64()).max(0.0))
            .unwrap_or(f64::NAN);
        let p50 = percentile(&mut rc.lags_ms, 0.5);
        let p99 = percentile(&mut rc.lags_ms, 0.99);
        let cpu = rc.cpu / gib;
        println!(
            "{:<30} {:>9.1} {:>10.2} {:>10.0} {:>10.0} {:>10.2} {:>9.1} {:>11}",
            rc.name,
            rate,
            end_lag,
            p50,
            p99,
            cpu,
            rc.rss_kib as f64 / 1024.0,
            rc.dir
                .as_deref()
                .map(|d| format!(
                    "{:.1}",
                    syncbridge_tests::process::dir_size(d) as f64 / 1048576.0
                ))
                .unwrap_or_else(|| "-".into())
        );
        results.insert(rc.app, (rate, cpu, p99));
        let stored = rc.dir.as_deref().map_or(f64::NAN, |d| {
            syncbridge_tests::process::dir_size(d) as f64 / 1048576.0
        });
        let rss = rc.rss_kib as f64 / 1024.0;
        report_rows.push((rc.name, rc.app, [rate, end_lag, p50, p99, cpu, rss, stored]));
    }
    let (rw_rate, rw_plain_cpu, _) = results["rw_plain"];
    let (_, rw_lz4_cpu, _) = results["rw_lz4"];
    let (_, rw_gzip_cpu, _) = results["rw_gzip"];
    let (_, rw_sync_cpu, _) = results["rw_sync"];
    println!("\nCPU s/GiB of WAL per receiver (goal: agent <= pg_receivewal --compress=lz4):");
    for rc in &receivers {
        println!("  {:<30} {:>6.2}", rc.name, results[rc.app].1);
    }
    println!("\nPer MiB of WAL: context switches (voluntary / involuntary, every thread sampled every 200 ms) and minor page faults:");
    let mib = wal_bytes as f64 / 1048576.0;
    for rc in &receivers {
        let (vol, invol) = rc
            .switches
            .values()
            .fold((0, 0), |(a, b), (v, i)| (a + v, b + i));
        println!(
            "  {:<36} {:>6.1} / {:<6.1} {:>8.1}",
            rc.name,
            vol as f64 / mib,
            invol as f64 / mib,
            rc.minor_faults as f64 / mib
        );
    }
    for app in ["sb_file", "sb_s3", "sb_lz4", "sb_base_file", "sb_base_lz4"] {
        let Some(&(rate, cpu, _)) = results.get(app) else {
            continue;
        };
        println!(
            "{app}: CPU/GiB agent/lz4 = {:.2} ({}); vs plain {:.2}, vs gzip {:.2}, vs --synchronous {:.2}; throughput vs pg_receivewal {:.2}",
            cpu / rw_lz4_cpu,
            if cpu <= rw_lz4_cpu { "goal met" } else { "ABOVE GOAL" },
            cpu / rw_plain_cpu,
            cpu / rw_gzip_cpu,
            cpu / rw_sync_cpu,
            rate / rw_rate
        );
    }

    save_results(
        load,
        wal_bytes,
        load_time.as_secs_f64(),
        &report_rows,
        lag_series,
    );
}

/// The report's copy of the tables above, plus lag over time and CPU per GiB as plots.
fn save_results(
    load: Load,
    wal_bytes: u64,
    load_secs: f64,
    rows: &[(&'static str, &'static str, [f64; 7])],
    lag_series: BTreeMap<&'static str, Vec<(f64, f64)>>,
) {
    use syncbridge_tests::bench_results::{Bar, BenchResults, Cell, Chart, Series};
    let peer = |app: &str, i: usize| {
        rows.iter()
            .find(|r| r.1 == app)
            .map_or(f64::NAN, |r| r.2[i])
    };
    let title = match load {
        Load::Insert => "WAL streaming vs pg_receivewal",
        Load::Pgbench => "WAL streaming vs pg_receivewal, pgbench WAL",
    };
    let mut out = BenchResults::new(load.bench_id(), title);
    out.note(format!(
        "PostgreSQL 15, every receiver on its own slot on the same WAL: {:.0} MiB generated by {} in {load_secs:.1} s ({:.1} MiB/s). `SB_BENCH_PG_WAL_MB` sets the amount, `SB_BENCH_PG_WAL_LOAD` (insert, pgbench) the load.",
        wal_bytes as f64 / 1048576.0,
        load.describe(),
        wal_bytes as f64 / 1048576.0 / load_secs
    ));
    out.chart(Chart::Lines {
        id: "lag".into(),
        title: "flush lag during the load (pg_stat_replication.flush_lag)".into(),
        x_label: "seconds since the load started".into(),
        y_label: "flush lag, ms".into(),
        // In the receivers' order, so each has the same colour as in the CPU plot.
        series: rows
            .iter()
            .filter_map(|(name, _, _)| {
                Some(Series {
                    name: name.to_string(),
                    points: lag_series.get(name)?.clone(),
                })
            })
            .collect(),
        log_x: false,
        log_y: false,
    });
    out.chart(Chart::Bars {
        id: "cpu".into(),
        title: "CPU seconds per GiB of WAL (lower is better)".into(),
        y_label: "CPU s / GiB (utime + stime)".into(),
        bars: rows
            .iter()
            .map(|(name, app, v)| Bar {
                group: if app.starts_with("sb_") {
                    "agent"
                } else {
                    "pg_receivewal"
                }
                .into(),
                label: name.to_string(),
                value: v[4],
                note: app
                    .starts_with("sb_")
                    .then(|| format!("{:.2}× lz4", v[4] / peer("rw_lz4", 4))),
            })
            .collect(),
    });
    out.table(
        "Per receiver",
        &[
            "receiver",
            "MiB/s until caught up",
            "vs pg_receivewal",
            "lag at end, s",
            "flush lag p50, ms",
            "flush lag p99, ms",
            "CPU s/GiB",
            "CPU vs --compress=lz4",
            "peak RSS, MiB",
            "stored, MiB",
        ],
        rows.iter()
            .map(|(name, _, v)| {
                vec![
                    Cell::text(*name),
                    Cell::num(v[0], 1),
                    Cell::ratio(v[0], peer("rw_plain", 0)),
                    Cell::num(v[1], 2),
                    Cell::num(v[2], 0),
                    Cell::num(v[3], 0),
                    Cell::num(v[4], 2),
                    Cell::ratio(v[4], peer("rw_lz4", 4)),
                    Cell::num(v[5], 1),
                    Cell::num(v[6], 1),
                ]
            })
            .collect(),
        Some("Throughput ratio: higher is better; CPU ratio: the goal is at most 1.00× `pg_receivewal --compress=lz4`. Stored is n/a for S3."),
    );
    for (name, app, v) in rows {
        if app.starts_with("sb_") && !app.starts_with("sb_base") {
            out.goal_at_most(
                &format!("CPU s/GiB, {name} ÷ pg_receivewal --compress=lz4"),
                v[4] / peer("rw_lz4", 4),
                1.0,
            );
        }
    }
    out.save();
}
