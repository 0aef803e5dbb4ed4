//! How cost grows with the work (issue 12), PostgreSQL 15, three parts (`SB_BENCH_SCALING`,
//! default `rates,plan,sizes`, picks them):
//!
//! * **rates**: flush lag at increasing WAL rates. Four receivers on four slots on the same
//!   WAL: the agent (default `--max-lag 1s`) and `--synchronous`, both to `file://`, and
//!   `pg_receivewal` plain and `--synchronous` (all `-s 1`/status at once). The load is
//!   paced to `SB_BENCH_RATES_MIB` MiB/s of WAL (default `2,8,32,0`; 0 = as fast as it
//!   goes) for `SB_BENCH_RATE_SECS` (15) seconds each; `pg_stat_replication.flush_lag` is
//!   sampled every 200 ms. pg_receivewal without `--synchronous` reports a flush only when
//!   it closes a segment, so its lag is the time to fill 16 MiB: it is the peer of nothing
//!   but shows what "archive a segment at a time" means.
//! * **plan**: time of `list` and of `restore`'s planning (from start until it prints its
//!   `target:` line, before it writes anything; it is stopped there) with about 10,000 and
//!   100,000 (`SB_BENCH_PLAN_OBJECTS`) WAL objects in a `file://` repository. The cluster's
//!   WAL is moved far ahead with `pg_resetwal -l` before anything is streamed, so that the
//!   extra objects can be older segments of the same timeline right before the real ones
//!   (one real WAL object hard-linked under each name: the plan lists them and reads only
//!   the newest WAL, which is real). No peer tool plans a restore like this. `verify` is
//!   timed the same way until it starts reading objects (the extra names are copies of one
//!   object, which it would read and rightly report as damaged). Goal (issue 13): each
//!   under 2 s at 100,000 WAL objects.
//! * **sizes**: backup and restore time of `pgbench` databases of `SB_BENCH_SIZES_GIB`
//!   (default 0.5, 1, 2, and 4 when the disk has 30 GiB free) for the agent (`file://`,
//!   `postgres stream` running) and pgBackRest (`posix` repository, `compress-type=zst`,
//!   `process-max` = the agent's default restore jobs, twice the cores), `SB_BENCH_SIZE_RUNS`
//!   (1) runs each and the median, the tools alternating first, `sync` before each step.
//!
//! Run: `cargo build --release -p syncbridge-agent && cargo bench -p syncbridge-tests --bench
//! pg_scaling` (or `make bench`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use syncbridge_tests::bench_results::{BenchResults, Cell, Chart, Series};
use syncbridge_tests::pg::{PgCluster, PgVersion, REPLICATION_PASSWORD};
use syncbridge_tests::process::{chown_to_server_user, run_as_server_user, server_temp_dir};

fn agent() -> Command {
    let mut c = Command::new(syncbridge_tests::agent::binary());
    c.env("SYNCBRIDGE_LOG", "warn");
    c
}

fn env_list(name: &str, default: &str) -> Vec<f64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn run_timed(cmd: &mut Command, what: &str) -> f64 {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn start_receivers(pg: &PgCluster, repo_root: &Path) -> Vec<(&'static str, &'static str, Child)> {
    let mut out = Vec::new();
    for (name, app, extra) in [
        ("agent", "sb_default", None),
        ("agent --synchronous", "sb_sync", Some("--synchronous")),
    ] {
        let child = agent()
            .args(["postgres", "stream", "--source", &pg.replication_url()])
            .arg("--repo")
            .arg(format!("file://{}", repo_root.join(app).display()))
            .args(["--slot", app, "--application-name", app])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(repo_root.join(format!("{app}.log"))).unwrap())
            .spawn()
            .unwrap();
        out.push((name, app, child));
    }
    for (name, app, extra) in [
        ("pg_receivewal", "rw_plain", None),
        (
            "pg_receivewal --synchronous",
            "rw_sync",
            Some("--synchronous"),
        ),
    ] {
        let dir = pg.temp_dir().join(app);
        std::fs::create_dir_all(&dir).unwrap();
        chown_to_server_user(&dir);
        pg.sql_blocking(&format!(
            "SELECT pg_create_physical_replication_slot('{app}', true)"
        ));
        let mut cmd = Command::new(pg.client_binary("pg_receivewal"));
        cmd.args(["-D", dir.to_str().unwrap(), "-S", app, "--no-loop", "-s", "1", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user=replicator password={REPLICATION_PASSWORD} application_name={app}",
                pg.port()
            ))
            .args(extra);
        run_as_server_user(&mut cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        out.push((name, app, child));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: usize = pg
            .query_one_blocking("SELECT count(*) FROM pg_stat_replication")
            .parse()
            .unwrap();
        if n >= out.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} receivers connected");
        std::thread::sleep(Duration::from_millis(200));
    }
    out
}

/// Lag at increasing WAL rates.
fn rates(out: &mut BenchResults) {
    let rates = env_list("SB_BENCH_RATES_MIB", "2,8,32,0");
    let secs: f64 = env_list("SB_BENCH_RATE_SECS", "15")
        .first()
        .copied()
        .unwrap_or(15.0);
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(1024)
        .extra_conf("max_wal_senders = 10")
        .extra_conf("max_replication_slots = 10")
        .start();
    let work = tempfile::tempdir().unwrap();
    let mut receivers = start_receivers(&pg, work.path());
    pg.sql_blocking("CREATE TABLE load(id int, pad text)");
    // (receiver name) -> [(achieved MiB/s, p50, p99)]
    let mut by_receiver: BTreeMap<&'static str, Vec<(f64, f64, f64)>> = BTreeMap::new();
    let mut achieved = Vec::new();
    for &rate in &rates {
        let url = pg.superuser_url();
        let start_lsn = parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text"));
        let started = Instant::now();
        let loader = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let t0 = Instant::now();
                while t0.elapsed().as_secs_f64() < secs {
                    // About 0.5 MiB of WAL per statement.
                    client
                        .simple_query("INSERT INTO load SELECT g, repeat('b', 300) FROM generate_series(1, 1500) g")
                        .await
                        .unwrap();
                    if rate > 0.0 {
                        let rows = client
                            .simple_query("SELECT pg_current_wal_lsn()::text")
                            .await
                            .unwrap();
                        let lsn = rows
                            .iter()
                            .find_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(r) => {
                                    r.get(0).map(parse_lsn)
                                }
                                _ => None,
                            })
                            .unwrap_or(start_lsn);
                        let due = (lsn - start_lsn) as f64 / (rate * 1048576.0);
                        let ahead = due - t0.elapsed().as_secs_f64();
                        if ahead > 0.0 {
                            tokio::time::sleep(Duration::from_secs_f64(ahead)).await;
                        }
                    }
                }
            })
        });
        let mut lags: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        while !loader.is_finished() {
            for r in pg.sql_blocking(
                "SELECT application_name, extract(epoch FROM flush_lag) * 1000 FROM pg_stat_replication",
            ) {
                if let (Some(app), Some(lag)) = (r[0].clone(), r[1].as_deref()) {
                    if let Ok(v) = lag.parse::<f64>() {
                        lags.entry(app).or_default().push(v);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        loader.join().unwrap();
        let wal =
            parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text")) - start_lsn;
        let got = wal as f64 / 1048576.0 / started.elapsed().as_secs_f64();
        achieved.push((rate, got));
        for (name, app, _) in &receivers {
            let v = lags
                .get_mut(*app)
                .map(|v| v.as_mut_slice())
                .unwrap_or(&mut []);
            let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
            by_receiver.entry(name).or_default().push((got, p50, p99));
        }
        println!(
            "rate {}: {got:.1} MiB/s of WAL; flush lag p50/p99 ms: {}",
            if rate > 0.0 {
                format!("{rate} MiB/s")
            } else {
                "unpaced".into()
            },
            receivers
                .iter()
                .map(|(name, _, _)| {
                    let (_, p50, p99) = by_receiver[name].last().unwrap();
                    format!("{name} {p50:.0}/{p99:.0}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Let everyone catch up before the next rate.
        let end = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline
            && pg.query_one_blocking(&format!(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name <> 'rw_plain' AND (flush_lsn IS NULL OR flush_lsn < '{end}')"
            )) != "0"
        {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for (_, _, c) in receivers.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    out.note(format!(
        "**Lag at increasing WAL rates**: PostgreSQL 15, four receivers on the same WAL, the load paced to each target rate for {secs:.0} s (0 = unpaced); `flush_lag` sampled every 200 ms."
    ));
    out.chart(Chart::Lines {
        id: "lag-by-rate".into(),
        title: "flush lag p99 by WAL rate (log scales)".into(),
        x_label: "WAL rate achieved, MiB/s".into(),
        y_label: "flush lag p99, ms".into(),
        series: by_receiver
            .iter()
            .map(|(name, v)| Series {
                name: name.to_string(),
                points: v.iter().map(|(r, _, p99)| (*r, *p99)).collect(),
            })
            .collect(),
        log_x: true,
        log_y: true,
    });
    let peer_of = |name: &str| {
        if name.ends_with("--synchronous") {
            "pg_receivewal --synchronous"
        } else {
            "pg_receivewal"
        }
    };
    let mut rows = Vec::new();
    for (i, (target, got)) in achieved.iter().enumerate() {
        for (name, v) in &by_receiver {
            let peer = &by_receiver[peer_of(name)][i];
            rows.push(vec![
                Cell::text(if *target > 0.0 {
                    format!("{target}")
                } else {
                    "unpaced".into()
                }),
                Cell::num(*got, 1),
                Cell::text(*name),
                Cell::num(v[i].1, 0),
                Cell::num(v[i].2, 0),
                if name.starts_with("agent") {
                    Cell::ratio(v[i].2, peer.2)
                } else {
                    Cell::text("")
                },
            ]);
        }
    }
    out.table(
        "Flush lag by WAL rate",
        &[
            "target MiB/s",
            "achieved MiB/s",
            "receiver",
            "p50, ms",
            "p99, ms",
            "p99 ÷ pg_receivewal's (same mode; below 1 is better)",
        ],
        rows,
        Some("pg_receivewal without `--synchronous` reports a flush only when it closes a 16 MiB segment, so its lag is the time to fill one; the agent's default mode stores what it has every `--max-lag` (1 s)."),
    );
}

fn segment_name(segno: u64) -> String {
    format!("{:08X}{:08X}{:08X}", 1, segno / 256, segno % 256)
}

/// Planning time of `list` and `restore` with many WAL objects.
fn plan(out: &mut BenchResults) {
    let counts = env_list("SB_BENCH_PLAN_OBJECTS", "10000,100000");
    // The real WAL starts at segment 0x200 * 256 (log 0x200): room for 131,072 older names.
    const FIRST_REAL: u64 = 0x200 * 256;
    let mut pg = PgCluster::builder(PgVersion::V15)
        .extra_conf("max_wal_senders = 10")
        .start();
    pg.stop();
    let mut reset = Command::new(pg.bin_dir().join("pg_resetwal"));
    reset
        .arg("-l")
        .arg(segment_name(FIRST_REAL))
        .arg("-D")
        .arg(pg.data_dir());
    run_as_server_user(&mut reset);
    run_timed(&mut reset, "pg_resetwal -l");
    pg.start_again();
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let mut stream = agent()
        .args([
            "postgres",
            "stream",
            "--source",
            &pg.replication_url(),
            "--repo",
            &repo,
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("stream.log")).unwrap())
        .spawn()
        .unwrap();
    pg.sql_blocking("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g");
    run_timed(
        agent().args([
            "postgres",
            "backup",
            "--source",
            &pg.replication_url(),
            "--repo",
            &repo,
        ]),
        "agent backup",
    );
    pg.sql_blocking("INSERT INTO t SELECT g FROM generate_series(1, 100000) g");
    let end = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    pg.sql_blocking("SELECT pg_switch_wal()");
    let t = Instant::now();
    loop {
        let text = String::from_utf8_lossy(
            &agent()
                .args(["list", "--repo", &repo])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        let archived = text
            .lines()
            .find_map(|l| l.split("to LSN ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .map(parse_lsn)
            .unwrap_or(0);
        if archived >= parse_lsn(&end) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "WAL never archived:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = stream.kill();
    let _ = stream.wait();
    let wal_dir = repo_dir.join("postgres/wal/00000001");
    let real: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    // ext4 allows 65,000 links to one inode: a fresh copy of the object every 60,000.
    let model = wal_dir.join(real.iter().min().unwrap());
    let mut copies = Vec::new();
    let timed_list = || run_timed(agent().args(["list", "--repo", &repo]), "list");
    let mut n = 0usize;
    let timed_plan = |n: usize| {
        let target = work.path().join(format!("target-{n}"));
        let t = Instant::now();
        let mut child = agent()
            .args(["restore", "--repo", &repo, "--target"])
            .arg(&target)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut secs = f64::NAN;
        for line in stdout.lines() {
            let line = line.unwrap();
            if line.starts_with("target:") {
                secs = t.elapsed().as_secs_f64();
                let _ = child.kill();
                break;
            }
        }
        let status = child.wait().unwrap();
        assert!(
            secs.is_finite(),
            "restore printed no plan ({status}): {}",
            std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default()
        );
        let _ = std::fs::remove_dir_all(&target);
        secs
    };
    let timed_verify = || verify_planning_secs(&repo, &repo_dir);
    let mut points = vec![(
        real.len() as f64,
        timed_list(),
        timed_plan(0),
        timed_verify(),
    )];
    for &want in &counts {
        let want = (want as usize).min(FIRST_REAL as usize - 1);
        while n < want {
            n += 1;
            if n % 60_000 == 1 {
                let copy = work.path().join(format!("model-{}", copies.len()));
                std::fs::copy(&model, &copy).unwrap();
                copies.push(copy);
            }
            std::fs::hard_link(
                copies.last().unwrap(),
                wal_dir.join(segment_name(FIRST_REAL - n as u64)),
            )
            .unwrap();
        }
        // Warm the directory cache the same way for both commands.
        let _ = timed_list();
        let total = (n + real.len()) as f64;
        points.push((total, timed_list(), timed_plan(n), timed_verify()));
    }
    for (objects, list, restore, verify) in &points {
        println!("{objects:.0} WAL objects: list {list:.2}s, restore planning {restore:.2}s, verify planning {verify:.2}s");
    }
    out.note("**Planning with many WAL objects**: `file://` repository, one base backup, its real WAL plus older segment names of the same timeline (hard links of one real object). `list` runs to completion; `restore` is timed until it prints its plan's `target:` line and stopped there, before writing. `verify` is timed until it opens its first object to read (the process's open files polled every 5 ms) and stopped there: its listing, the manifests and its list of what to read, not the reading (the extra names are copies of one object under other segments' names, which verify would rightly read and report as damaged).".to_string());
    out.chart(Chart::Lines {
        id: "planning".into(),
        title: "list, restore and verify planning time by WAL objects (log scales)".into(),
        x_label: "WAL objects in the repository".into(),
        y_label: "seconds".into(),
        series: vec![
            Series {
                name: "list".into(),
                points: points.iter().map(|p| (p.0, p.1)).collect(),
            },
            Series {
                name: "restore, until the plan is printed".into(),
                points: points.iter().map(|p| (p.0, p.2)).collect(),
            },
            Series {
                name: "verify, until it starts reading".into(),
                points: points.iter().map(|p| (p.0, p.3)).collect(),
            },
        ],
        log_x: true,
        log_y: true,
    });
    out.table(
        "Planning time by WAL objects",
        &[
            "WAL objects",
            "list, s",
            "restore planning, s",
            "verify planning, s",
            "list: ms per 10,000 more",
            "restore: ms per 10,000 more",
            "verify: ms per 10,000 more",
        ],
        points
            .iter()
            .map(|(o, l, r, v)| {
                let (o0, l0, r0, v0) = points[0];
                let per = |v: f64, v0: f64| {
                    if *o > o0 {
                        Cell::num((v - v0) / (o - o0) * 1e4 * 1e3, 0)
                    } else {
                        Cell::text("")
                    }
                };
                vec![
                    Cell::num(*o, 0),
                    Cell::num(*l, 2),
                    Cell::num(*r, 2),
                    Cell::num(*v, 2),
                    per(*l, l0),
                    per(*r, r0),
                    per(*v, v0),
                ]
            })
            .collect(),
        Some("No peer tool plans a restore from a listing like this, so no ratio. Growth should be linear in the objects (the same ms per 10,000 at both counts) and small next to the restore itself. Goal (issue 13): catalog planning under 2 s at 100,000 WAL objects."),
    );
    // Issue 13: the catalog's planning at 100,000 WAL objects stays under 2 s; checked at
    // the largest count measured (the default's 100,000 fake plus the real ones).
    if let Some((objects, list, restore, verify)) = points.last().filter(|p| p.0 >= 100_000.0) {
        out.goal_at_most_secs(
            &format!("`list` at {objects:.0} WAL objects (`file://`)"),
            *list,
            PLAN_GOAL_SECS,
        );
        out.goal_at_most_secs(
            &format!("`restore` planning at {objects:.0} WAL objects (`file://`)"),
            *restore,
            PLAN_GOAL_SECS,
        );
        out.goal_at_most_secs(
            &format!("`verify` planning at {objects:.0} WAL objects (`file://`)"),
            *verify,
            PLAN_GOAL_SECS,
        );
    }
    let met = |secs: f64| {
        if secs <= PLAN_GOAL_SECS {
            "met"
        } else {
            "NOT MET"
        }
    };
    for (objects, list, restore, verify) in &points {
        if *objects >= 100_000.0 {
            println!(
                "goal (issue 13) planning under {PLAN_GOAL_SECS:.0} s at {objects:.0} WAL objects: list {list:.2}s {}, restore planning {restore:.2}s {}, verify planning {verify:.2}s {}",
                met(*list),
                met(*restore),
                met(*verify),
            );
        }
    }
}

/// Issue 13: planning from the catalog at 100,000 WAL objects, at most this many seconds.
const PLAN_GOAL_SECS: f64 = 2.0;

/// Seconds `verify` takes to list the repository, load the backups' manifests and make its
/// list of objects to read: from the start until it has a data object of `repo_dir` open
/// (its open files polled every 5 ms), when it is stopped.
fn verify_planning_secs(repo: &str, repo_dir: &Path) -> f64 {
    let t = Instant::now();
    let mut child = agent()
        .args(["verify", "--repo", repo])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fd_dir = format!("/proc/{}/fd", child.id());
    let reading = |fd_dir: &str| {
        std::fs::read_dir(fd_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|p| {
                    p.starts_with(repo_dir)
                        && !p.ends_with("backup.json")
                        && !p.ends_with("syncbridge-repo")
                        && p.is_file()
                })
            })
    };
    loop {
        if reading(&fd_dir) {
            let secs = t.elapsed().as_secs_f64();
            let _ = child.kill();
            let _ = child.wait();
            return secs;
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Finished before it was seen reading (a tiny repository): the whole run is
            // an upper bound of its planning.
            let secs = t.elapsed().as_secs_f64();
            let err = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
            assert!(status.code().is_some(), "verify killed ({status}): {err}");
            return secs;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "verify did not start reading in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Backup and restore time by database size.
fn sizes(out: &mut BenchResults) {
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .clamp(2, 32);
    let work = server_temp_dir("sb-bench-scaling-");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let free_gib = nix::sys::statvfs::statvfs(work.path())
        .map(|s| s.blocks_available() as f64 * s.fragment_size() as f64 / (1u64 << 30) as f64)
        .unwrap_or(0.0);
    let sizes = match std::env::var("SB_BENCH_SIZES_GIB") {
        Ok(_) => env_list("SB_BENCH_SIZES_GIB", ""),
        Err(_) if free_gib >= 30.0 => vec![0.5, 1.0, 2.0, 4.0],
        Err(_) => vec![0.5, 1.0, 2.0],
    };
    let size_runs = env_list("SB_BENCH_SIZE_RUNS", "1")
        .first()
        .map_or(1, |v| (*v as usize).max(1));
    let conf = work.path().join("pgbackrest.conf");
    for d in ["pgbr-repo", "pgbr-lock", "pgbr-log", "pgbr-spool"] {
        std::fs::create_dir_all(work.path().join(d)).unwrap();
        chown_to_server_user(&work.path().join(d));
    }
    let pg = PgCluster::builder(PgVersion::V15)
        .extra_conf("archive_mode = on")
        .extra_conf(format!(
            "archive_command = 'pgbackrest --config={} --stanza=bench archive-push %p'",
            conf.display()
        ))
        .extra_conf("max_wal_size = 2GB")
        .start();
    std::fs::write(
        &conf,
        format!(
            "[global]\nrepo1-type=posix\nrepo1-path={}\ncompress-type=zst\nprocess-max={jobs}\nstart-fast=y\nlock-path={}\nlog-path={}\nspool-path={}\nlog-level-console=warn\nlog-level-file=off\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
            work.path().join("pgbr-repo").display(),
            work.path().join("pgbr-lock").display(),
            work.path().join("pgbr-log").display(),
            work.path().join("pgbr-spool").display(),
            pg.data_dir().display(),
            pg.port(),
            pg.socket_dir().display()
        ),
    )
    .unwrap();
    chown_to_server_user(&conf);
    let pgbr = |args: &[&str]| {
        let mut c = Command::new("pgbackrest");
        c.arg(format!("--config={}", conf.display()))
            .arg("--stanza=bench")
            .args(args)
            .current_dir(work.path());
        run_as_server_user(&mut c);
        c
    };
    run_timed(&mut pgbr(&["stanza-create"]), "pgbackrest stanza-create");
    let repo = format!("file://{}", work.path().join("agent-repo").display());
    let mut stream = agent()
        .args([
            "postgres",
            "stream",
            "--source",
            &pg.replication_url(),
            "--repo",
            &repo,
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("stream.log")).unwrap())
        .spawn()
        .unwrap();
    // (GiB, agent backup, pgBackRest backup, agent restore, pgBackRest restore)
    let mut rows: Vec<(f64, [f64; 4])> = Vec::new();
    for (i, gib) in sizes.iter().enumerate() {
        // pgbench: about 15 MiB per scale unit with its indexes.
        let scale = ((gib * 1024.0 / 15.0).round() as u64).max(1);
        eprintln!("pgbench -i -s {scale} ...");
        pg.run("pgbench", &["-i", "-q", "-s", &scale.to_string()]);
        pg.sql_blocking("CHECKPOINT");
        let db: u64 = pg
            .query_one_blocking("SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
            .parse()
            .unwrap();
        let db_gib = db as f64 / (1u64 << 30) as f64;
        // Neither tool's backup may wait for the WAL of the load: both have it first.
        let switched = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
        let now = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
        let deadline = Instant::now() + Duration::from_secs(600);
        while pg.query_one_blocking(&format!(
            "SELECT (SELECT count(*) FROM pg_stat_replication WHERE flush_lsn >= '{now}') = 1 AND coalesce((SELECT last_archived_wal >= '{switched}' FROM pg_stat_archiver), false)"
        )) != "t"
        {
            assert!(Instant::now() < deadline, "WAL of the load never archived by both tools");
            std::thread::sleep(Duration::from_millis(200));
        }
        // `SB_BENCH_SIZE_RUNS` rounds (default 1), the tools taking turns going first; the
        // median of each step counts.
        let mut all: [Vec<f64>; 4] = Default::default();
        for round in 0..size_runs {
            let agent_first = (i + round) % 2 == 0;
            for agent_turn in [agent_first, !agent_first] {
                sync();
                if agent_turn {
                    all[0].push(run_timed(
                        agent().args([
                            "postgres",
                            "backup",
                            "--source",
                            &pg.replication_url(),
                            "--repo",
                            &repo,
                        ]),
                        "agent backup",
                    ));
                } else {
                    all[1].push(run_timed(
                        &mut pgbr(&["backup", "--type=full"]),
                        "pgbackrest backup",
                    ));
                }
            }
            for agent_turn in [agent_first, !agent_first] {
                sync();
                if agent_turn {
                    let target = work.path().join(format!("restore-agent-{i}"));
                    all[2].push(run_timed(
                        agent()
                            .args(["restore", "--repo", &repo, "--target"])
                            .arg(&target),
                        "agent restore",
                    ));
                    let _ = std::fs::remove_dir_all(&target);
                } else {
                    let target = work.path().join(format!("restore-pgbr-{i}"));
                    std::fs::create_dir_all(&target).unwrap();
                    chown_to_server_user(&target);
                    all[3].push(run_timed(
                        &mut pgbr(&[
                            "restore",
                            &format!("--pg1-path={}", target.display()),
                            "--type=immediate",
                        ]),
                        "pgbackrest restore",
                    ));
                    let _ = std::fs::remove_dir_all(&target);
                }
            }
        }
        let t: [f64; 4] = std::array::from_fn(|k| percentile(&mut all[k], 0.5));
        println!(
            "{db_gib:.2} GiB: backup agent {:.1}s, pgBackRest {:.1}s ({:.2}×); restore agent {:.1}s, pgBackRest {:.1}s ({:.2}×)",
            t[0], t[1], t[1] / t[0], t[2], t[3], t[3] / t[2]
        );
        rows.push((db_gib, t));
    }
    let _ = stream.kill();
    let _ = stream.wait();
    out.note(format!(
        "**Backup and restore by database size**: `pgbench -i` databases, the agent to `file://` with `postgres stream` running, pgBackRest to a `posix` repository (`compress-type=zst`, `process-max={jobs}`, the agent's default restore jobs); {size_runs} run(s) per size (`SB_BENCH_SIZE_RUNS`, median), the tools alternating first, `sync` before each step. {free_gib:.0} GiB were free at the start (4 GiB is included from 30 GiB free; `SB_BENCH_SIZES_GIB` sets the list)."
    ));
    let names = [
        "agent backup",
        "pgBackRest backup",
        "agent restore",
        "pgBackRest restore",
    ];
    out.chart(Chart::Lines {
        id: "time-by-size".into(),
        title: "backup and restore time by database size".into(),
        x_label: "database, GiB".into(),
        y_label: "seconds".into(),
        series: names
            .iter()
            .enumerate()
            .map(|(k, name)| Series {
                name: name.to_string(),
                points: rows.iter().map(|(g, t)| (*g, t[k])).collect(),
            })
            .collect(),
        log_x: false,
        log_y: false,
    });
    out.table(
        "Backup and restore time by database size",
        &[
            "database, GiB",
            "agent backup, s",
            "pgBackRest backup, s",
            "backup speed vs pgBackRest",
            "agent restore, s",
            "pgBackRest restore, s",
            "restore speed vs pgBackRest",
        ],
        rows.iter()
            .map(|(g, t)| {
                vec![
                    Cell::num(*g, 2),
                    Cell::num(t[0], 1),
                    Cell::num(t[1], 1),
                    Cell::ratio(t[1], t[0]),
                    Cell::num(t[2], 1),
                    Cell::num(t[3], 1),
                    Cell::ratio(t[3], t[2]),
                ]
            })
            .collect(),
        Some("Speed ratio = pgBackRest's time / the agent's: above 1.00× the agent is faster. Time should grow linearly with the size; a ratio that falls with size means the agent scales worse."),
    );
    if let Some((g, t)) = rows.last() {
        out.goal_at_least(
            &format!("backup speed at {g:.1} GiB, agent ÷ pgBackRest (file:// vs posix)"),
            t[1] / t[0],
            1.0,
        );
        out.goal_at_least(
            &format!("restore speed at {g:.1} GiB, agent ÷ pgBackRest (file:// vs posix)"),
            t[3] / t[2],
            1.2,
        );
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("pg_scaling: run with `cargo bench` to measure");
        return;
    }
    let parts = std::env::var("SB_BENCH_SCALING").unwrap_or_else(|_| "rates,plan,sizes".into());
    // One result file per part, so that a part run alone replaces only its own section.
    for part in parts.split(',').map(str::trim) {
        let t = Instant::now();
        let (f, title): (fn(&mut BenchResults), &str) = match part {
            "rates" => (rates, "Cost growth: lag by WAL rate"),
            "plan" => (plan, "Cost growth: planning time by WAL objects"),
            "sizes" => (
                sizes,
                "Cost growth: backup and restore time by database size",
            ),
            other => panic!("SB_BENCH_SCALING: unknown part {other:?} (rates, plan, sizes)"),
        };
        let mut out = BenchResults::new(&format!("pg_scaling_{part}"), title);
        f(&mut out);
        out.wall_secs = t.elapsed().as_secs_f64();
        out.save();
        eprintln!("part {part}: {:.0} s", t.elapsed().as_secs_f64());
    }
}
