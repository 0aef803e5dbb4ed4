//! docs/operations.md, run: the runbook's scenarios with the commands the document gives,
//! against PostgreSQL 15 and Redis 7 backed up by one `run --config` sidecar, and the
//! recovery point and time each reaches here (printed as `MEASURED` lines; the document
//! quotes them with the database sizes).
//!
//! - Weekly verification: `verify --repo URL --max-age 5m` passes on both repositories.
//! - Region failure: a copy of the repository (what bucket replication gives the other
//!   region) verifies on its own.
//! - Data corruption: `restore --to-time` (before a bad DELETE) with `--start` gives the
//!   rows back.
//! - PostgreSQL failure: the server is killed (-9) while committing; `restore` to the
//!   latest point holds every commit but the last instants (the RPO, measured).
//! - Redis failure: the same for Redis, killed while writing.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use pg_pitr_support::{share_repo_with_server_group, RestoreDirs};
use pg_support::{agent, text, wait_until, AgentProcess};
use redis_support::RestoredServer;
use syncbridge_tests::pg::{PgCluster, PgVersion, REPLICATION_PASSWORD, REPLICATION_USER};
use syncbridge_tests::process::server_temp_dir;
use syncbridge_tests::prometheus::http_get;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `restore` of a PostgreSQL repository with `--start` on a free port, as the server user;
/// returns the output, the wall time and the port.
fn pg_restore(
    pg: &PgCluster,
    repo: &str,
    dirs: &RestoreDirs,
    extra: &[&str],
) -> (Output, Duration, u16) {
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        dirs.parent.path().display()
    );
    let bin = pg.bin_dir().display().to_string();
    let data = dirs.data().display().to_string();
    let mut args = vec![
        "restore",
        "--repo",
        repo,
        "--target",
        &data,
        "--start",
        &bin,
        "--start-options",
        &opts,
    ];
    args.extend_from_slice(extra);
    let owner = syncbridge_tests::process::server_user()
        .map(|(u, g)| format!("{}:{}", u.as_raw(), g.as_raw()));
    if let Some(o) = &owner {
        args.extend(["--owner", o.as_str()]);
    }
    let began = Instant::now();
    let out = agent().args(&args).output().unwrap();
    (out, began.elapsed(), port)
}

fn restored_query(port: u16, sql: &str) -> Option<String> {
    use syncbridge_tests::pg::{SUPERUSER, SUPERUSER_PASSWORD};
    syncbridge_tests::pg::block_on(async {
        let conn = format!(
            "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres"
        );
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        let row = client.query_one(sql, &[]).await.ok()?;
        row.get::<_, Option<String>>(0)
    })
}

fn stop_restored(pg: &PgCluster, data: &Path) {
    let mut stop = std::process::Command::new(pg.bin_dir().join("pg_ctl"));
    stop.arg("-D").arg(data).args(["-m", "fast", "stop"]);
    syncbridge_tests::process::run_as_server_user(&mut stop);
    let _ = stop.output();
}

#[test]
fn runbook_scenarios_with_the_documented_commands() {
    // The sources: PostgreSQL 15 with pgbench's tables, Redis 7 with 100 000 keys.
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(1024)
        .start();
    pg.run("pgbench", &["-i", "-q", "-s", "10"]);
    pg.sql_blocking("CREATE TABLE commits (id bigint PRIMARY KEY, at timestamptz NOT NULL)");
    let pg_bytes: u64 = pg
        .query_one_blocking("SELECT sum(pg_database_size(datname)) FROM pg_database")
        .parse()
        .unwrap();
    let redis = RedisServer::start(RedisFlavor::Redis7);
    {
        let mut conn = redis.connect();
        for batch in 0..100 {
            let cmds: Vec<Vec<String>> = (0..1000)
                .map(|i| {
                    let k = batch * 1000 + i;
                    redis_support::cmd(&["SET", &format!("key:{k}"), &format!("{k:0>96}")])
                })
                .collect();
            redis_support::pipeline(&mut conn, &cmds);
        }
    }
    let redis_bytes: u64 = redis.info("memory")["used_memory"].parse().unwrap();

    // The sidecar: one `run --config` for both, file:// repositories.
    let dir = server_temp_dir("sb-ops-");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    share_repo_with_server_group(&dir.path().join("pg-repo"));
    let pg_repo = format!("file://{}", dir.path().join("pg-repo").display());
    let redis_repo = format!("file://{}", dir.path().join("redis-repo").display());
    let pw = dir.path().join("pg-password");
    std::fs::write(&pw, format!("{REPLICATION_PASSWORD}\n")).unwrap();
    let http_port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[repository]
url = "{pg_repo}"

[postgres]
source = "postgres://{REPLICATION_USER}@127.0.0.1:{pg_port}/postgres"
password_file = "{pw}"
max_lag = "1s"
backup_every = "24h"
retention = {{ keep_full = 7, keep_within = "30d" }}

[redis]
source = "redis://127.0.0.1:{redis_port}"
repository = "{redis_repo}"
max_lag = "1s"
snapshot_every = "15m"
retention = {{ keep_within = "7d" }}

[http]
listen = "127.0.0.1:{http_port}"
"#,
            pg_port = pg.port(),
            pw = pw.display(),
            redis_port = redis.port(),
        ),
    )
    .unwrap();
    let config_s = config.display().to_string();
    let mut run = AgentProcess::spawn(&["run", "--config", &config_s], dir.path().join("run.log"));
    // Ready, and the first base backup (taken at start) complete.
    let ready = wait_until(Duration::from_secs(300), || {
        http_get(http_port, "/readyz").is_some_and(|(s, _)| s == 200)
            && http_get(http_port, "/metrics").is_some_and(|(_, m)| {
                m.contains("syncbridge_backup_last_success_timestamp_seconds{")
            })
    });
    assert!(ready, "never ready with a backup:\n{}", run.log_text());

    // Weekly verification (docs/operations.md): both repositories healthy and current.
    for repo in [&pg_repo, &redis_repo] {
        let out = agent()
            .args(["verify", "--repo", repo, "--max-age", "5m"])
            .output()
            .unwrap();
        assert!(out.status.success(), "verify {repo}: {}", text(&out));
    }
    let out = agent().args(["list", "--repo", &pg_repo]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Data corruption: a bad DELETE at a known time; restore to just before it.
    std::thread::sleep(Duration::from_secs(1));
    let before_bad = pg.query_one_blocking(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
    );
    std::thread::sleep(Duration::from_millis(500));
    pg.sql_blocking("DELETE FROM pgbench_accounts WHERE aid % 2 = 0");
    let accounts_after_delete = pg.query_one_blocking("SELECT count(*) FROM pgbench_accounts");

    // PostgreSQL failure: commits for 5 s, then kill -9 right after an acknowledged one.
    let began = Instant::now();
    let mut last_acked = 0i64;
    let mut last_acked_ms = 0i64;
    while began.elapsed() < Duration::from_secs(5) {
        last_acked += 1;
        pg.sql_blocking(&format!(
            "INSERT INTO commits VALUES ({last_acked}, clock_timestamp())"
        ));
        last_acked_ms = now_ms();
    }
    let mut pg = pg;
    pg.kill9();

    // Redis failure: writes for 5 s (no WAIT: what a normal client does), then kill -9.
    let mut conn = redis.connect();
    let began = Instant::now();
    let mut redis_last = 0i64;
    let mut redis_last_ms = 0i64;
    while began.elapsed() < Duration::from_secs(5) {
        redis_last += 1;
        let t = now_ms();
        conn.cmd(&["SET", &format!("w:{redis_last}"), &t.to_string()])
            .unwrap();
        redis_last_ms = t;
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut redis = redis;
    redis.kill9();
    // The sidecar dies with them (a node failure); what it had not stored is lost.
    run.kill9();

    // PostgreSQL: restore to the latest point.
    let dirs = RestoreDirs::new();
    let (out, took, port) = pg_restore(&pg, &pg_repo, &dirs, &["--jobs", "4"]);
    let restored = restored_query(
        port,
        "SELECT max(id)::text || ' ' || (extract(epoch FROM max(at)) * 1000)::bigint::text FROM commits",
    );
    stop_restored(&pg, &dirs.data());
    assert!(out.status.success(), "{}", text(&out));
    let restored = restored.unwrap_or_else(|| panic!("no rows: {}", text(&out)));
    let (max_id, max_ms) = restored.split_once(' ').unwrap();
    let (max_id, max_ms): (i64, i64) = (max_id.parse().unwrap(), max_ms.parse().unwrap());
    assert!(max_id <= last_acked && max_id > 0);
    let pg_lost = last_acked - max_id;
    let pg_rpo_ms = last_acked_ms - max_ms;
    assert!(
        pg_rpo_ms < 5_000,
        "PostgreSQL lost {pg_rpo_ms} ms of commits ({pg_lost} rows)"
    );
    let durations = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("durations:"))
        .unwrap_or("")
        .to_owned();
    println!(
        "MEASURED postgres-failure: database {} MiB; restore --start to the latest point {:.1} s ({durations}); lost {pg_lost} of {last_acked} commits, the last {pg_rpo_ms} ms before kill -9",
        pg_bytes >> 20,
        took.as_secs_f64()
    );

    // Data corruption: restore to before the DELETE.
    let dirs = RestoreDirs::new();
    let (out, took, port) = pg_restore(&pg, &pg_repo, &dirs, &["--to-time", &before_bad]);
    let accounts = restored_query(port, "SELECT count(*)::text FROM pgbench_accounts");
    stop_restored(&pg, &dirs.data());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(accounts.as_deref(), Some("1000000"), "{}", text(&out));
    assert_eq!(accounts_after_delete, "500000");
    println!(
        "MEASURED data-corruption: restore --to-time before the DELETE {:.1} s, 1000000 accounts back (500000 after the DELETE)",
        took.as_secs_f64()
    );

    // Region failure: a replicated copy of the repository verifies on its own.
    let copy = dir.path().join("dr-region-pg-repo");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(dir.path().join("pg-repo"))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(cp.status.success(), "{}", text(&cp));
    let copy_url = format!("file://{}", copy.display());
    let out = agent()
        .args(["verify", "--repo", &copy_url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Redis: restore to the latest point.
    let target = dir.path().join("redis-restore");
    let target_s = target.display().to_string();
    let bin = redis_support::server_bin(RedisFlavor::Redis7);
    let began = Instant::now();
    let out = agent()
        .args([
            "redis",
            "restore",
            "--repo",
            &redis_repo,
            "--target",
            &target_s,
            "--start",
            &bin,
        ])
        .output()
        .unwrap();
    let took = began.elapsed();
    let server = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    let server = server.unwrap();
    let mut restored = syncbridge_tests::redis::RespConnection::connect(server.port).unwrap();
    let dbsize = restored.cmd(&["DBSIZE"]).unwrap().as_int().unwrap();
    // The newest write the restore holds (writes are numbered in order).
    let mut redis_max = 0;
    let mut redis_max_ms = 0i64;
    for i in (1..=redis_last).rev() {
        if let Some(v) = restored.cmd(&["GET", &format!("w:{i}")]).unwrap().as_str() {
            redis_max = i;
            redis_max_ms = v.parse().unwrap();
            break;
        }
    }
    assert!(redis_max > 0, "no write restored");
    assert_eq!(
        dbsize,
        100_000 + redis_max,
        "the loaded keys and every write up to the newest restored one"
    );
    let redis_rpo_ms = redis_last_ms - redis_max_ms;
    assert!(
        redis_rpo_ms < 5_000,
        "Redis lost {redis_rpo_ms} ms of writes"
    );
    println!(
        "MEASURED redis-failure: dataset {} MiB (100000 keys + {redis_last} writes); restore --start to the latest point {:.1} s; lost {} of {redis_last} writes, the last {redis_rpo_ms} ms before kill -9",
        redis_bytes >> 20,
        took.as_secs_f64(),
        redis_last - redis_max
    );
}
