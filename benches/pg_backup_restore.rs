//! Base backup and restore throughput (issue 5), side by side in one run on one database:
//!
//! * the agent: `postgres backup` to SeaweedFS (S3) with `postgres stream` running, then
//!   `restore` from it;
//! * pgBackRest (`compress-type=zst`, `process-max` = the agent's `--jobs`): `backup
//!   --type=full` and `restore`, with its repository on the same SeaweedFS;
//! * the same two on local disk: the agent with a `file://` repository (its own `postgres
//!   stream`, slot `syncbridge_file`) against pgBackRest's `posix` repository (`repo2`), the
//!   setup where pgBackRest is at its best (no network, no TLS, no object store sharing the
//!   cores);
//!
//! pgBackRest speaks S3 only over HTTPS, so SeaweedFS serves HTTPS (a throwaway CA, which
//! both clients are given) and both tools use that endpoint: same server, same TLS cost.
//! pgBackRest 2.45 matches only DNS names in certificates, so it is pointed at `localhost`.
//! * `pg_basebackup -Ft -Z zstd` to a local directory (backup only);
//! * verify (issue 13): `syncbridge-agent verify` over the agent's S3 and `file://`
//!   repositories against `pgbackrest verify` over its `repo1` (S3) and `repo2` (posix), the
//!   same backups and WAL, `$SB_BENCH_RUNS` rounds with the order rotating; MiB/s of each
//!   repository's bytes as stored (compressed, summed from `syncbridge-agent repo ls` and
//!   `pgbackrest repo-ls --recurse`) over wall time, CPU s, agent ÷ pgBackRest per round;
//!   a verdict other than healthy fails the bench at its end;
//! * WAL replay: `$SB_BENCH_WAL_MB` (default 1024) of WAL written after the agent's backup,
//!   restored and replayed through `postgres wal-fetch` from SeaweedFS, against the same WAL
//!   through `restore_command = 'cp …'` from a local directory and already in `pg_wal`
//!   (`$SB_BENCH_REPLAY_RUNS`, default `$SB_BENCH_RUNS`, times each, order rotating; 0
//!   skips the replay part).
//!
//! Extra `postgres backup` options for the agent: `$SB_BENCH_AGENT_BACKUP_ARGS` (e.g.
//! `--compress-level 1`).
//!
//! Backups and restores run `$SB_BENCH_RUNS` times (default 3), the tools alternating, and
//! the median counts; `sync` runs before each so no tool pays for another's writeback.
//! `$SB_BENCH_DROP_CACHES=1` (root only) also drops the page cache before each step, so
//! every restore reads its repository from disk (by default the repositories written
//! just before are mostly still cached, for both tools alike). Both tools use
//! `$SB_BENCH_JOBS` workers (default: the agent's default, twice the cores): `restore
//! --jobs` and pgBackRest's `process-max`. Both fsync every restored file before they
//! report success (pgBackRest: `storageNewWriteP` without `noSyncFile` in
//! `src/command/restore/file.c`, then each directory).
//!
//! The database is `pgbench -i -s $SB_BENCH_SCALE` (default 150, about 2.2 GiB). Prints MB/s
//! per tool and the agent's ratios to the peers. The goals: backup ≥ pgBackRest's,
//! restore ≥ 1.2× pgBackRest's.
//!
//! Run: `cargo bench -p syncbridge-tests --bench pg_backup_restore` (needs `make deps` and
//! the agent built in the same profile, which `cargo bench --workspace` does).
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::process::{chown_to_server_user, run_as_server_user, server_temp_dir};
use syncbridge_tests::S3Server;

/// A background `postgres stream`, killed when the bench ends or panics (a failed
/// assertion left the streams running before).
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

fn agent_bin() -> PathBuf {
    syncbridge_tests::agent::binary()
}

fn run(cmd: &mut Command, what: &str) -> Duration {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent's own breakdown (data transfer vs waiting for WAL, write vs total).
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("duration:") || line.starts_with("restored:") {
            eprintln!("{what}: {line}");
        }
    }
    elapsed
}

/// CPU seconds (user + system) of this process's waited-for children so far: fields
/// `cutime` and `cstime` of `/proc/self/stat`, which include the children's own waited-for
/// children (pgBackRest's worker processes).
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(13) + tick(14)) as f64 / 100.0
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn lsn_to_u64(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

const MIB: f64 = (1u64 << 20) as f64;

/// Bytes of every object in an agent repository as stored (`repo ls`: time, size, key).
fn agent_repo_bytes(agent: &std::path::Path, repo: &str, env: &[(String, String)]) -> u64 {
    let out = Command::new(agent)
        .args(["repo", "ls", "--repo", repo])
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "repo ls {repo}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Bytes of every file in a pgBackRest repository (`repo-ls --recurse --output=json`).
fn pgbr_repo_bytes(cmd: &mut Command) -> u64 {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pgbackrest repo-ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listing
        .as_object()
        .map(|entries| {
            entries
                .values()
                .filter(|e| e["type"] == "file")
                .filter_map(|e| e["size"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("pg_backup_restore: bench");
        return;
    }
    let scale: u32 = std::env::var("SB_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let work = server_temp_dir("sb-bench-br-");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = work.path().join("pgbackrest.conf");
    let s3 = S3Server::start_with_https();
    let s3_env = s3.https_env();
    let s3_port: u16 = s3
        .https_endpoint()
        .and_then(|e| e.rsplit(':').next().and_then(|p| p.parse().ok()))
        .unwrap();
    // The CA must be readable by the server user that runs pgBackRest.
    let ca = work.path().join("s3-ca.crt");
    std::fs::copy(s3.ca_cert().unwrap(), &ca).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    for d in ["pgbr-lock", "pgbr-log", "pgbr-spool"] {
        std::fs::create_dir_all(work.path().join(d)).unwrap();
        chown_to_server_user(&work.path().join(d));
    }
    // Workers for both tools' restores (and pgBackRest's backups): the agent's default.
    let jobs: usize = std::env::var("SB_BENCH_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
                .clamp(2, 32)
        });
    let pgbr_posix = work.path().join("pgbr-posix");
    std::fs::create_dir_all(&pgbr_posix).unwrap();
    chown_to_server_user(&pgbr_posix);
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(4096)
        .extra_conf("archive_mode = on")
        .extra_conf(format!(
            "archive_command = 'pgbackrest --config={} --stanza=bench archive-push %p'",
            conf.display()
        ))
        .extra_conf("max_wal_size = 4GB")
        .start();
    std::fs::write(
        &conf,
        format!(
            "[global]\nrepo1-type=s3\nrepo1-path=/pgbackrest\nrepo1-s3-bucket={}\nrepo1-s3-endpoint=localhost\nrepo1-storage-port={s3_port}\nrepo1-s3-region={}\nrepo1-s3-key={}\nrepo1-s3-key-secret={}\nrepo1-s3-uri-style=path\nrepo1-storage-ca-file={}\nrepo1-retention-full=9\nrepo2-type=posix\nrepo2-path={}\nrepo2-retention-full=9\ncompress-type=zst\nprocess-max={jobs}\nstart-fast=y\nlock-path={}\nlog-path={}\nspool-path={}\nlog-level-console=warn\nlog-level-file=off\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
            s3.bucket(),
            s3.region(),
            s3.access_key(),
            s3.secret_key(),
            ca.display(),
            pgbr_posix.display(),
            work.path().join("pgbr-lock").display(),
            work.path().join("pgbr-log").display(),
            work.path().join("pgbr-spool").display(),
            pg.data_dir().display(),
            pg.port(),
            pg.socket_dir().display()
        ),
    )
    .unwrap();
    // Holds the S3 secret: readable by the server user only.
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
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
    run(&mut pgbr(&["stanza-create"]), "pgbackrest stanza-create");

    eprintln!("pgbench -i -s {scale} ...");
    let t = Instant::now();
    pg.run("pgbench", &["-i", "-q", "-s", &scale.to_string()]);
    pg.sql_blocking("CHECKPOINT");
    let db_bytes: u64 = pg
        .query_one_blocking("SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
        .parse()
        .unwrap();
    eprintln!(
        "database: {:.0} MB (init {:.0}s)",
        db_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    // The agent, to SeaweedFS.
    let repo = s3.repo_url("bench");
    let agent = agent_bin();
    let mut stream = Command::new(&agent);
    stream
        .args([
            "postgres",
            "stream",
            "--source",
            &pg.replication_url(),
            "--repo",
            &repo,
        ])
        .envs(s3_env.clone())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("stream.log")).unwrap());
    let mut stream = KillOnDrop(stream.spawn().unwrap());
    // The agent, to a file:// repository on the same disk, with its own stream and slot.
    let file_repo_dir = work.path().join("agent-repo");
    let file_repo = format!("file://{}", file_repo_dir.display());
    let file_stream = Command::new(&agent)
        .args([
            "postgres",
            "stream",
            "--source",
            &pg.replication_url(),
            "--repo",
            &file_repo,
            "--slot",
            "syncbridge_file",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("stream-file.log")).unwrap())
        .spawn()
        .unwrap();
    let mut file_stream = KillOnDrop(file_stream);
    let runs: usize = std::env::var("SB_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    // Each tool runs `runs` times, alternating, and the median counts: this machine's
    // speed swings between minutes. Dirty pages are flushed before every timed step so
    // no tool pays for the previous one's writeback.
    let drop_caches = std::env::var("SB_BENCH_DROP_CACHES").is_ok_and(|v| v == "1");
    let flush = || {
        let _ = Command::new("sync").status();
        if drop_caches {
            std::fs::write("/proc/sys/vm/drop_caches", "3")
                .expect("SB_BENCH_DROP_CACHES=1 needs root");
        }
    };
    let agent_backup_cmd = |repo: &str| {
        let mut c = Command::new(&agent);
        c.args([
            "postgres",
            "backup",
            "--source",
            &pg.replication_url(),
            "--repo",
            repo,
        ])
        .args(
            std::env::var("SB_BENCH_AGENT_BACKUP_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .envs(s3_env.clone());
        c
    };
    let (mut agent_backups, mut pgbr_backups) = (Vec::new(), Vec::new());
    let (mut agent_file_backups, mut pgbr_posix_backups) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        flush();
        agent_backups.push(run(&mut agent_backup_cmd(&repo), "agent backup"));
        // pgBackRest, to the same SeaweedFS.
        flush();
        pgbr_backups.push(run(
            &mut pgbr(&["backup", "--type=full", "--repo=1"]),
            "pgbackrest backup",
        ));
        flush();
        agent_file_backups.push(run(
            &mut agent_backup_cmd(&file_repo),
            "agent backup (file://)",
        ));
        flush();
        pgbr_posix_backups.push(run(
            &mut pgbr(&["backup", "--type=full", "--repo=2"]),
            "pgbackrest backup (posix)",
        ));
    }

    // pg_basebackup -Ft -Z zstd to a local directory.
    let bb_dir = work.path().join("basebackup");
    flush();
    let bb = run(
        Command::new(pg.client_binary("pg_basebackup"))
            .arg("-d")
            .arg(pg.replication_conninfo())
            .arg("-D")
            .arg(&bb_dir)
            .args(["-Ft", "-Z", "zstd", "-X", "none", "-c", "fast"]),
        "pg_basebackup",
    );

    // Restores (of the newest backup each), into fresh directories removed afterwards:
    // agent and pgBackRest from SeaweedFS, agent from file:// and pgBackRest from posix.
    // The first restore after the backups is often the slowest, whichever tool runs it
    // (writeback and page reclaim from the backups), so the order rotates every round.
    let restore_cases = ["agent s3", "pgbr s3", "agent file", "pgbr posix"];
    let mut restores: Vec<Vec<Duration>> = vec![Vec::new(); restore_cases.len()];
    let mut restore_cpu: Vec<Vec<f64>> = vec![Vec::new(); restore_cases.len()];
    for i in 0..runs {
        for k in 0..restore_cases.len() {
            let case = (i + k) % restore_cases.len();
            let target = work.path().join(format!("restore-{i}-{case}"));
            flush();
            let cpu_before = children_cpu();
            let took = match restore_cases[case] {
                "agent s3" | "agent file" => run(
                    Command::new(&agent)
                        .args(["restore", "--jobs", &jobs.to_string(), "--repo"])
                        .arg(if case == 0 { &repo } else { &file_repo })
                        .arg("--target")
                        .arg(&target)
                        .envs(s3_env.clone()),
                    restore_cases[case],
                ),
                _ => {
                    std::fs::create_dir_all(&target).unwrap();
                    chown_to_server_user(&target);
                    run(
                        &mut pgbr(&[
                            "restore",
                            if case == 1 { "--repo=1" } else { "--repo=2" },
                            &format!("--pg1-path={}", target.display()),
                            "--type=immediate",
                        ]),
                        restore_cases[case],
                    )
                }
            };
            let cpu = children_cpu() - cpu_before;
            eprintln!(
                "round {i}: {} {:.1}s, CPU {cpu:.1}s",
                restore_cases[case],
                took.as_secs_f64()
            );
            restores[case].push(took);
            restore_cpu[case].push(cpu);
            let _ = std::fs::remove_dir_all(&target);
        }
    }
    let (agent_restores, pgbr_restores) = (restores[0].clone(), restores[1].clone());
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let all = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "runs (s): agent backup [{}], pgBackRest backup [{}], agent restore [{}], pgBackRest restore [{}]",
        all(&agent_backups),
        all(&pgbr_backups),
        all(&agent_restores),
        all(&pgbr_restores)
    );
    eprintln!(
        "runs (s): agent backup file:// [{}], pgBackRest backup posix [{}], agent restore file:// [{}], pgBackRest restore posix [{}]",
        all(&agent_file_backups),
        all(&pgbr_posix_backups),
        all(&restores[2]),
        all(&restores[3])
    );
    let (agent_file_backup, pgbr_posix_backup) =
        (median(&agent_file_backups), median(&pgbr_posix_backups));
    let (agent_file_restore, pgbr_posix_restore) = (median(&restores[2]), median(&restores[3]));
    // Per-round ratios: the two tools of a round ran minutes apart at most.
    let round_ratios = |agent: &[Duration], peer: &[Duration]| {
        agent
            .iter()
            .zip(peer)
            .map(|(a, p)| format!("{:.2}", p.as_secs_f64() / a.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "restore ratio per round: S3 [{}], file:// vs posix [{}]",
        round_ratios(&restores[0], &restores[1]),
        round_ratios(&restores[2], &restores[3])
    );
    let median_cpu = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "restore CPU s (median): agent <- SeaweedFS {:.1}, pgBackRest <- SeaweedFS {:.1}, agent <- file:// {:.1}, pgBackRest <- posix {:.1} (SeaweedFS's own not counted)",
        median_cpu(&restore_cpu[0]),
        median_cpu(&restore_cpu[1]),
        median_cpu(&restore_cpu[2]),
        median_cpu(&restore_cpu[3])
    );
    let (agent_backup, pgbr_backup) = (median(&agent_backups), median(&pgbr_backups));
    let (agent_restore, pgbr_restore) = (median(&agent_restores), median(&pgbr_restores));
    // The report's copy (bench-report): MB/s per tool, ratios to the peers; saved now so
    // a failure in the replay part below keeps them.
    {
        use syncbridge_tests::bench_results::{Bar, BenchResults, Cell, Chart};
        let rate = |d: Duration| mbps(db_bytes, d);
        let mut out =
            BenchResults::new("pg_backup_restore", "Base backup and restore vs pgBackRest");
        out.note(format!(
            "`pgbench -i -s {scale}`: {:.0} MB. Backups and restores {runs}× each, tools alternating, `sync` before each, medians; both repositories on the same SeaweedFS over HTTPS; pgBackRest `compress-type=zst`, `process-max={jobs}`. Saved before the WAL replay part, so a failure there keeps these.",
            db_bytes as f64 / 1e6,
        ));
        let bar = |group: &str, label: &str, d: Duration, peer: Option<Duration>| Bar {
            group: group.into(),
            label: label.into(),
            value: rate(d),
            note: peer.map(|p| format!("{:.2}×", p.as_secs_f64() / d.as_secs_f64())),
        };
        out.chart(Chart::Bars {
            id: "throughput".into(),
            title: "backup and restore, MB/s of database (higher is better)".into(),
            y_label: "MB/s".into(),
            bars: vec![
                bar("backup", "agent (S3)", agent_backup, Some(pgbr_backup)),
                bar("backup", "pgBackRest (S3)", pgbr_backup, None),
                bar("backup", "pg_basebackup -Z zstd (local)", bb, None),
                bar("restore", "agent (S3)", agent_restore, Some(pgbr_restore)),
                bar("restore", "pgBackRest (S3)", pgbr_restore, None),
            ],
        });
        let row = |what: &str, tool: &str, d: Duration, peer: Option<Duration>| {
            vec![
                Cell::text(what),
                Cell::text(tool),
                Cell::num(d.as_secs_f64(), 1),
                Cell::num(rate(d), 1),
                peer.map_or(Cell::text(""), |p| Cell::ratio(rate(d), rate(p))),
            ]
        };
        out.table(
            "Backup and restore (medians)",
            &["step", "tool", "seconds", "MB/s", "agent vs pgBackRest"],
            vec![
                row(
                    "backup",
                    "agent -> SeaweedFS",
                    agent_backup,
                    Some(pgbr_backup),
                ),
                row("backup", "pgBackRest -> SeaweedFS", pgbr_backup, None),
                row("backup", "pg_basebackup -Ft -Z zstd -> local", bb, None),
                row(
                    "restore",
                    "agent <- SeaweedFS",
                    agent_restore,
                    Some(pgbr_restore),
                ),
                row("restore", "pgBackRest <- SeaweedFS", pgbr_restore, None),
            ],
            Some("Goals: backup at least 1.00×, restore at least 1.20× pgBackRest."),
        );
        out.goal_at_least(
            "backup speed, agent ÷ pgBackRest (S3)",
            pgbr_backup.as_secs_f64() / agent_backup.as_secs_f64(),
            1.0,
        );
        out.goal_at_least(
            "restore speed, agent ÷ pgBackRest (S3)",
            pgbr_restore.as_secs_f64() / agent_restore.as_secs_f64(),
            1.2,
        );
        out.save_merged();
    }

    println!(
        "database size                 {:>8.0} MB  (median of {runs} alternating runs per tool)",
        db_bytes as f64 / 1e6
    );
    println!(
        "backup  agent -> SeaweedFS      {:>8.1} MB/s  ({:.1}s)",
        mbps(db_bytes, agent_backup),
        agent_backup.as_secs_f64()
    );
    println!(
        "backup  pgBackRest -> SeaweedFS {:>7.1} MB/s  ({:.1}s)",
        mbps(db_bytes, pgbr_backup),
        pgbr_backup.as_secs_f64(),
    );
    println!(
        "backup  pg_basebackup -Z zstd  {:>8.1} MB/s  ({:.1}s, {:.0} MB)",
        mbps(db_bytes, bb),
        bb.as_secs_f64(),
        syncbridge_tests::process::dir_size(&bb_dir) as f64 / 1e6
    );
    println!(
        "restore agent <- SeaweedFS      {:>8.1} MB/s  ({:.1}s)",
        mbps(db_bytes, agent_restore),
        agent_restore.as_secs_f64()
    );
    println!(
        "restore pgBackRest <- SeaweedFS {:>8.1} MB/s  ({:.1}s)",
        mbps(db_bytes, pgbr_restore),
        pgbr_restore.as_secs_f64()
    );
    println!(
        "backup  agent -> file://        {:>8.1} MB/s  ({:.1}s)",
        mbps(db_bytes, agent_file_backup),
        agent_file_backup.as_secs_f64()
    );
    println!(
        "backup  pgBackRest -> posix     {:>8.1} MB/s  ({:.1}s)",
        mbps(db_bytes, pgbr_posix_backup),
        pgbr_posix_backup.as_secs_f64()
    );
    println!(
        "restore agent <- file://        {:>8.1} MB/s  ({:.1}s, --jobs {jobs})",
        mbps(db_bytes, agent_file_restore),
        agent_file_restore.as_secs_f64()
    );
    println!(
        "restore pgBackRest <- posix     {:>8.1} MB/s  ({:.1}s, process-max {jobs})",
        mbps(db_bytes, pgbr_posix_restore),
        pgbr_posix_restore.as_secs_f64()
    );
    println!(
        "ratios: file:// vs posix: backup agent/pgBackRest {:.2}, restore agent/pgBackRest {:.2} (goal >= 1.2){}",
        pgbr_posix_backup.as_secs_f64() / agent_file_backup.as_secs_f64(),
        pgbr_posix_restore.as_secs_f64() / agent_file_restore.as_secs_f64(),
        if drop_caches { "; page cache dropped before each step" } else { "" }
    );
    println!(
        "ratios: backup agent/pgBackRest {:.2} (goal >= 1), agent/pg_basebackup {:.2}; restore agent/pgBackRest {:.2} (goal >= 1.2)",
        pgbr_backup.as_secs_f64() / agent_backup.as_secs_f64(),
        bb.as_secs_f64() / agent_backup.as_secs_f64(),
        pgbr_restore.as_secs_f64() / agent_restore.as_secs_f64()
    );

    // `SB_BENCH_REPLAY_RUNS=0` skips the WAL replay part below.
    let replay_runs: usize = std::env::var("SB_BENCH_REPLAY_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(runs);

    // Verify (issue 13): `syncbridge-agent verify` over the agent's repositories against
    // `pgbackrest verify` over pgBackRest's, same data (the backups and WAL above), same
    // run, both storages. Each reads its whole repository back: every backup file and WAL
    // object checked against its checksums. Speed is the bytes of the repository as stored
    // (compressed, listed by each tool's own `ls`) over the wall time; the order rotates
    // every round, `sync` before each.
    let verify_cases = ["agent s3", "pgbr s3", "agent file", "pgbr posix"];
    let verify_bytes: Vec<u64> = verify_cases
        .iter()
        .map(|case| match *case {
            "agent s3" => agent_repo_bytes(&agent, &repo, &s3_env),
            "agent file" => agent_repo_bytes(&agent, &file_repo, &s3_env),
            "pgbr s3" => pgbr_repo_bytes(&mut pgbr(&[
                "repo-ls",
                "--recurse",
                "--output=json",
                "--repo=1",
            ])),
            _ => pgbr_repo_bytes(&mut pgbr(&[
                "repo-ls",
                "--recurse",
                "--output=json",
                "--repo=2",
            ])),
        })
        .collect();
    eprintln!(
        "repository bytes as stored: {}",
        verify_cases
            .iter()
            .zip(&verify_bytes)
            .map(|(c, b)| format!("{c} {:.0} MiB", *b as f64 / MIB))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut verifies: Vec<Vec<Duration>> = vec![Vec::new(); verify_cases.len()];
    let mut verify_cpu: Vec<Vec<f64>> = vec![Vec::new(); verify_cases.len()];
    // What each tool said the last time (exit status and its summary), for the report: a
    // verify that finds damage in these healthy repositories is a bug, shown and failed.
    let mut verdicts: Vec<String> = vec![String::new(); verify_cases.len()];
    let mut verify_failed = Vec::new();
    for i in 0..runs {
        for k in 0..verify_cases.len() {
            let case = (i + k) % verify_cases.len();
            let mut cmd = match verify_cases[case] {
                "agent s3" | "agent file" => {
                    let mut c = Command::new(&agent);
                    c.args(["verify", "--jobs", &jobs.to_string(), "--repo"])
                        .arg(if case == 0 { &repo } else { &file_repo })
                        .envs(s3_env.clone());
                    c
                }
                "pgbr s3" => pgbr(&["verify", "--repo=1", "--output=text"]),
                _ => pgbr(&["verify", "--repo=2", "--output=text"]),
            };
            flush();
            let cpu_before = children_cpu();
            let t = Instant::now();
            let out = cmd.output().unwrap();
            let took = t.elapsed();
            let cpu = children_cpu() - cpu_before;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            // pgBackRest 2.45 exits 0 even when it found damage and says so in its text
            // output (`status: error`); the agent exits 1 (damaged) or 2 (stale).
            let healthy = out.status.success() && !stdout.contains("status: error");
            verdicts[case] = if healthy {
                "healthy".into()
            } else {
                format!("**{}**", out.status)
            };
            if !healthy {
                eprintln!(
                    "verify {} found a problem ({}):\n{stdout}\n{stderr}",
                    verify_cases[case], out.status
                );
                verify_failed.push(verify_cases[case]);
            }
            eprintln!(
                "round {i}: verify {} {:.1}s, {:.1} MiB/s, CPU {cpu:.1}s",
                verify_cases[case],
                took.as_secs_f64(),
                verify_bytes[case] as f64 / MIB / took.as_secs_f64()
            );
            verifies[case].push(took);
            verify_cpu[case].push(cpu);
        }
    }
    // `SB_BENCH_VERIFY_PROFILE=DIR`, after the timed rounds: `perf record -g` of the agent's
    // verify of its `file://` repository into DIR, and `perf stat` (task-clock of every
    // process of the tool) of it and of pgBackRest's verify of `posix`, a cross-check of
    // the CPU seconds above.
    if let Some(dir) = std::env::var_os("SB_BENCH_VERIFY_PROFILE") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let agent_verify = |wrap: &[&str]| {
            let mut c = Command::new("perf");
            c.args(wrap)
                .arg(&agent)
                .args(["verify", "--jobs", &jobs.to_string(), "--repo", &file_repo])
                .stdout(std::process::Stdio::null());
            let out = c.output().unwrap();
            String::from_utf8_lossy(&out.stderr).to_string()
        };
        let rec = dir.join("agent-verify.perf.data");
        agent_verify(&[
            "record",
            "-F",
            "999",
            "-g",
            "-o",
            rec.to_str().unwrap(),
            "--",
        ]);
        let stat = agent_verify(&["stat", "-e", "task-clock", "--"]);
        let pgbr_stat = pgbr(&["verify", "--repo=2", "--output=text"]);
        let pgbr_prog = pgbr_stat.get_program().to_owned();
        let pgbr_args: Vec<_> = pgbr_stat.get_args().map(|a| a.to_owned()).collect();
        let mut wrapped = Command::new("perf");
        wrapped
            .args(["stat", "-e", "task-clock", "--"])
            .arg(pgbr_prog)
            .args(pgbr_args)
            .current_dir(work.path())
            .stdout(std::process::Stdio::null());
        run_as_server_user(&mut wrapped);
        let pgbr_out = wrapped.output().unwrap();
        let text = format!(
            "agent verify file://:\n{stat}\npgbackrest verify posix:\n{}",
            String::from_utf8_lossy(&pgbr_out.stderr)
        );
        std::fs::write(dir.join("perf-stat.txt"), &text).unwrap();
        eprintln!("{text}\nprofile: perf report -i {}", rec.display());
    }
    let mibps = |bytes: u64, d: Duration| bytes as f64 / MIB / d.as_secs_f64().max(1e-9);
    // Per round, speed agent ÷ pgBackRest (each over its own repository's bytes).
    let verify_ratio = |a: usize, p: usize, round: usize| {
        mibps(verify_bytes[a], verifies[a][round]) / mibps(verify_bytes[p], verifies[p][round])
    };
    let per_round = |a: usize, p: usize| {
        (0..runs)
            .map(|r| format!("{:.2}", verify_ratio(a, p, r)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "verify runs (s): {}",
        verify_cases
            .iter()
            .zip(&verifies)
            .map(|(c, v)| format!("{c} [{}]", all(v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "verify speed ratio agent/pgBackRest per round: S3 [{}], file:// vs posix [{}]",
        per_round(0, 1),
        per_round(2, 3)
    );
    let verify_med: Vec<Duration> = verifies.iter().map(|v| median(v)).collect();
    let verify_cpu_med: Vec<f64> = verify_cpu.iter().map(|v| median_cpu(v)).collect();
    for (case, name) in [
        (0, "agent <- SeaweedFS     "),
        (1, "pgBackRest <- SeaweedFS"),
        (2, "agent <- file://       "),
        (3, "pgBackRest <- posix    "),
    ] {
        println!(
            "verify  {name} {:>8.1} MiB/s  ({:.1}s, {:.0} MiB, CPU {:.1}s)",
            mibps(verify_bytes[case], verify_med[case]),
            verify_med[case].as_secs_f64(),
            verify_bytes[case] as f64 / MIB,
            verify_cpu_med[case],
        );
    }
    println!(
        "ratios: verify MiB/s agent/pgBackRest: S3 {:.2}, file:// vs posix {:.2}; CPU s agent/pgBackRest: S3 {:.2}, file:// vs posix {:.2}",
        mibps(verify_bytes[0], verify_med[0]) / mibps(verify_bytes[1], verify_med[1]),
        mibps(verify_bytes[2], verify_med[2]) / mibps(verify_bytes[3], verify_med[3]),
        verify_cpu_med[0] / verify_cpu_med[1],
        verify_cpu_med[2] / verify_cpu_med[3],
    );
    {
        use syncbridge_tests::bench_results::{Bar, BenchResults, Cell, Chart};
        let mut out =
            BenchResults::new("pg_backup_restore", "Base backup and restore vs pgBackRest");
        out.note(format!(
            "Verify: each tool reads back its whole repository ({runs} full backups of the {:.0} MB database and the WAL since), `syncbridge-agent verify --jobs {jobs}` against `pgbackrest verify` (`process-max={jobs}`), {runs} round(s), order rotating, `sync` before each, medians. MiB/s = the repository's bytes as stored (compressed; summed from `syncbridge-agent repo ls` and `pgbackrest repo-ls --recurse`) ÷ wall time; CPU s of the tool's processes (SeaweedFS's own not counted).{}",
            db_bytes as f64 / 1e6,
            if drop_caches { " Page cache dropped before each." } else { " The repositories were written minutes before and are partly in the page cache, for both tools alike." }
        ));
        let names = [
            ("agent", "SeaweedFS (S3)"),
            ("pgBackRest", "SeaweedFS (S3)"),
            ("agent", "file://"),
            ("pgBackRest", "posix"),
        ];
        let peer = |case: usize| (case % 2 == 0).then_some(case + 1);
        out.chart(Chart::Bars {
            id: "verify".into(),
            title: "verify, MiB/s of repository read and checked (higher is better)".into(),
            y_label: "MiB/s".into(),
            bars: (0..4)
                .map(|case| Bar {
                    group: if case < 2 {
                        "SeaweedFS (S3)"
                    } else {
                        "local disk (file://, posix)"
                    }
                    .into(),
                    label: names[case].0.into(),
                    value: mibps(verify_bytes[case], verify_med[case]),
                    note: peer(case).map(|p| {
                        format!(
                            "{:.2}×",
                            mibps(verify_bytes[case], verify_med[case])
                                / mibps(verify_bytes[p], verify_med[p])
                        )
                    }),
                })
                .collect(),
        });
        out.table(
            "Verify (medians)",
            &[
                "tool",
                "repository",
                "MiB stored",
                "seconds",
                "MiB/s",
                "MiB/s vs pgBackRest",
                "CPU s",
                "CPU vs pgBackRest",
                "per-round speed ratios",
                "verdict",
            ],
            (0..4)
                .map(|case| {
                    let speed = mibps(verify_bytes[case], verify_med[case]);
                    vec![
                        Cell::text(names[case].0),
                        Cell::text(names[case].1),
                        Cell::num(verify_bytes[case] as f64 / MIB, 0),
                        Cell::num(verify_med[case].as_secs_f64(), 1),
                        Cell::num(speed, 1),
                        peer(case).map_or(Cell::text(""), |p| {
                            Cell::ratio(speed, mibps(verify_bytes[p], verify_med[p]))
                        }),
                        Cell::num(verify_cpu_med[case], 1),
                        peer(case).map_or(Cell::text(""), |p| {
                            Cell::ratio(verify_cpu_med[case], verify_cpu_med[p])
                        }),
                        peer(case).map_or(Cell::text(""), |p| Cell::text(per_round(case, p))),
                        Cell::text(verdicts[case].clone()),
                    ]
                })
                .collect(),
            Some("Speed ratio above 1.00×: the agent checks its repository faster than pgBackRest checks its own; CPU ratio below 1.00×: it needs less CPU. The two repositories hold the same backups and WAL but not the same bytes (each tool's own format and compression), hence MiB/s rather than seconds. The issue sets no bound, so no goal."),
        );
        out.save_merged();
    }

    if replay_runs == 0 {
        stream.stop();
        file_stream.stop();
        assert!(
            verify_failed.is_empty(),
            "verify reported damage in a healthy repository: {verify_failed:?} (see above)"
        );
        return;
    }

    // WAL replay through wal-fetch: about $SB_BENCH_WAL_MB of WAL after the agent's backup,
    // then a restore of the latest point started by the agent (`--start`), which reports
    // how long replay took.
    let wal_mb: u64 = std::env::var("SB_BENCH_WAL_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let lsn_before = pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    let rows = wal_mb * 1_000_000 / 600;
    pg.sql_blocking(&format!(
        "CREATE TABLE filler(id bigint, pad text); INSERT INTO filler SELECT g, repeat('w', 500) FROM generate_series(1, {rows}) g"
    ));
    let lsn_after = pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    // A record after it, so that `lsn_after` lies inside complete, archived WAL (the
    // restores below stop there).
    pg.sql_blocking("CHECKPOINT");
    let lsn_archived = pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    let wal_bytes = lsn_to_u64(&lsn_after) - lsn_to_u64(&lsn_before);
    let t = Instant::now();
    loop {
        let out = Command::new(&agent)
            .args(["list", "--repo", &repo])
            .envs(s3_env.clone())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let archived = text
            .lines()
            .find_map(|l| l.split("to LSN ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .map(lsn_to_u64)
            .unwrap_or(0);
        if archived >= lsn_to_u64(&lsn_archived) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "WAL never archived:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let sock = work.path().join("replay-sock");
    std::fs::create_dir_all(&sock).unwrap();
    chown_to_server_user(&sock);
    let owner = syncbridge_tests::process::server_user()
        .map(|(u, g)| format!("{}:{}", u.as_raw(), g.as_raw()));
    // A fresh restore to the end of the written WAL: recovery settings call wal-fetch.
    // An explicit --to-lsn, not the latest point: the CHECKPOINT before each replay adds
    // WAL after the local copy below was made, which `cp` could not deliver.
    let restore_latest = |target: &std::path::Path| {
        let mut r = Command::new(&agent);
        r.args([
            "restore",
            "--repo",
            &repo,
            "--to-lsn",
            lsn_after.trim(),
            "--target",
        ])
        .arg(target)
        .envs(s3_env.clone());
        if let Some(o) = &owner {
            r.args(["--owner", o]);
        }
        run(&mut r, "agent restore (for replay)");
    };
    // Starts a restored cluster and times it from `pg_ctl start` until it has promoted:
    // the same clock for both ways of feeding WAL.
    let timed_replay = |target: &std::path::Path| -> f64 {
        let port = syncbridge_tests::process::free_port();
        let t = Instant::now();
        let mut start = Command::new(pg.bin_dir().join("pg_ctl"));
        start
            .arg("-D")
            .arg(target)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1",
                sock.display()
            ))
            .arg("-l")
            .arg(target.join("replay.log"))
            .args(["-W", "start"])
            // restore_command (wal-fetch) takes the repository credentials from here.
            .envs(s3_env.clone());
        run_as_server_user(&mut start);
        assert!(start.status().unwrap().success(), "pg_ctl start (replay)");
        loop {
            let out = Command::new(pg.client_binary("psql"))
                .args(["-XAtq", "-h"])
                .arg(&sock)
                .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-c", "SELECT pg_is_in_recovery()"])
                .env("PGPASSWORD", syncbridge_tests::pg::SUPERUSER_PASSWORD)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "f" {
                break;
            }
            let log = std::fs::read_to_string(target.join("replay.log")).unwrap_or_default();
            assert!(
                !log.contains("startup process failure") && t.elapsed() < Duration::from_secs(600),
                "replay did not finish: {log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = t.elapsed().as_secs_f64();
        let mut stop = Command::new(pg.bin_dir().join("pg_ctl"));
        stop.arg("-D").arg(target).args(["-m", "immediate", "stop"]);
        run_as_server_user(&mut stop);
        let _ = stop.output();
        secs
    };
    let listed = Command::new(&agent)
        .args(["repo", "ls", "--repo", &repo, "postgres/wal/"])
        .envs(s3_env.clone())
        .output()
        .unwrap();
    let mut names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|k| k.rsplit('/').next())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect();
    // The newest WAL may only exist as a partial: wal-fetch serves it under the next name.
    if let Some(last) = names.last() {
        let next = u64::from_str_radix(&last[16..], 16).unwrap() + 1;
        names.push(format!("{}{next:08X}", &last[..16]));
    }
    // The same WAL on local disk, fetched once: for the two controls below.
    let archive = work.path().join("wal-archive");
    std::fs::create_dir_all(&archive).unwrap();
    for name in &names {
        let dest = archive.join(name);
        let ok = Command::new(&agent)
            .args(["postgres", "wal-fetch", "--repo", &repo, "--prefetch", "0"])
            .arg(name)
            .arg(&dest)
            .envs(s3_env.clone())
            .status()
            .unwrap()
            .success();
        if ok {
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    chown_to_server_user(&archive);
    // Three ways to feed the same replay, each started the same way and timed on one clock:
    // * wal-fetch: the restore as written, `restore_command` = wal-fetch from SeaweedFS;
    // * cp: `restore_command = 'cp <local archive>/%f %p'`, the cheapest restore_command
    //   there is: what PostgreSQL's one-file-at-a-time restore_command protocol costs;
    // * pg_wal: every segment already in pg_wal and restore_command turned off: replay
    //   alone, nothing fetched.
    // If wal-fetch keeps replay fed, it is close to cp. The order rotates per run, and
    // before each the source's checkpoint and all dirty pages are flushed.
    // `SB_BENCH_REPLAY_NOFSYNC=1` adds wal-fetch and cp with the restored server's
    // `fsync = off`, to show what PostgreSQL's own fsync of every segment restored through
    // restore_command (durable_rename in KeepFileRestoredFromArchive) costs.
    let mut ways = vec!["wal-fetch", "cp", "pg_wal"];
    if std::env::var("SB_BENCH_REPLAY_NOFSYNC").is_ok_and(|v| v == "1") {
        ways.extend(["wal-fetch fsync=off", "cp fsync=off"]);
    }
    let mut replays: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    for i in 0..replay_runs {
        for k in 0..ways.len() {
            let way = (i + k) % ways.len();
            let target = work.path().join(format!("restore-replay-{i}-{way}"));
            restore_latest(&target);
            let auto_conf = target.join("postgresql.auto.conf");
            let mut conf = std::fs::read_to_string(&auto_conf).unwrap();
            if ways[way].starts_with("cp") {
                conf.push_str(&format!(
                    "restore_command = 'cp {}/%f %p'\n",
                    archive.display()
                ));
            }
            if ways[way] == "pg_wal" {
                for name in &names {
                    let dest = target.join("pg_wal").join(name);
                    if std::fs::copy(archive.join(name), &dest).is_ok() {
                        chown_to_server_user(&dest);
                    }
                }
                conf.push_str("restore_command = 'false'\n");
            }
            if ways[way].ends_with("fsync=off") {
                conf.push_str("fsync = off\n");
            }
            std::fs::write(&auto_conf, conf).unwrap();
            pg.sql_blocking("CHECKPOINT");
            flush();
            replays[way].push(timed_replay(&target));
            let _ = std::fs::remove_dir_all(&target);
        }
    }
    for (way, runs) in ways.iter().zip(&replays) {
        eprintln!("replay runs (s): {way} {runs:.1?}");
    }
    let median_f = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (replay_secs, cp_replay_secs, local_replay_secs) = (
        median_f(&replays[0]),
        median_f(&replays[1]),
        median_f(&replays[2]),
    );

    stream.stop();
    file_stream.stop();

    println!(
        "replay  {:.0} MB of WAL, start to promoted: through wal-fetch from SeaweedFS {replay_secs:.1}s ({:.1} MB/s); restore_command cp from a local directory {cp_replay_secs:.1}s; already in pg_wal {local_replay_secs:.1}s. wal-fetch/cp {:.2}, wal-fetch/pg_wal {:.2}",
        wal_bytes as f64 / 1e6,
        wal_bytes as f64 / 1e6 / replay_secs,
        replay_secs / cp_replay_secs,
        replay_secs / local_replay_secs,
    );
    for (way, runs) in ways.iter().zip(&replays).skip(3) {
        println!("replay  {way}: {:.1}s", median_f(runs));
    }

    // The report's copy of the replay figures (bench-report).
    {
        use syncbridge_tests::bench_results::{BenchResults, Cell};
        let mut out =
            BenchResults::new("pg_backup_restore", "Base backup and restore vs pgBackRest");
        out.note(format!(
            "Replay: {:.0} MB of WAL written after the agent's backup, from `pg_ctl start` to promoted, {replay_runs} run(s) per way, order rotating.",
            wal_bytes as f64 / 1e6
        ));
        out.table(
            "WAL replay, start to promoted (medians)",
            &["WAL fed by", "seconds", "MB/s of WAL", "vs restore_command cp"],
            ways.iter()
                .zip(&replays)
                .map(|(way, r)| {
                    let secs = median_f(r);
                    vec![
                        Cell::text(*way),
                        Cell::num(secs, 1),
                        Cell::num(wal_bytes as f64 / 1e6 / secs, 1),
                        Cell::ratio(cp_replay_secs, secs),
                    ]
                })
                .collect(),
            Some("Ratio above 1.00×: faster than the cheapest restore_command; `pg_wal` is replay with nothing to fetch."),
        );
        out.save_merged();
    }
    assert!(
        verify_failed.is_empty(),
        "verify reported damage in a healthy repository: {verify_failed:?} (see above)"
    );
}
