//! `syncbridge-agent run --config FILE` (issue 14): one process streams PostgreSQL 17 and
//! Valkey 9 as the file says, serves /healthz, /readyz (503 → 200 when the streams are up,
//! 503 again while PostgreSQL is down) and /metrics (OpenMetrics text with the lag of each
//! stream), logs JSON lines, and on SIGTERM stores everything committed and exits 0 within
//! `agent.stop_timeout`. A configuration with an unknown key, a missing password file or a
//! bad duration is refused before anything starts, naming the key or the file.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::path::Path;
use std::time::{Duration, Instant};

use pg_pitr_support::{share_repo_with_server_group, start_restored, Env, RestoreDirs};
use pg_support::{agent, text, wait_until, AgentProcess};
use redis_support::{dump, dump_port, RestoredServer};
use syncbridge_tests::pg::{
    PgCluster, PgVersion, REPLICATION_PASSWORD, REPLICATION_USER, SUPERUSER, SUPERUSER_PASSWORD,
};
use syncbridge_tests::process::server_temp_dir;
use syncbridge_tests::prometheus::{http_get, promtool_check_metrics, PrometheusServer};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};
use syncbridge_tests::s3::S3Server;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the sample of `metric` whose labels contain `label`.
fn sample(metrics: &str, metric: &str, label: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(metric)?;
        if !rest.starts_with('{') || !rest.contains(label) {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn run_streams_postgres_and_valkey_serves_health_and_metrics_and_stops_cleanly() {
    let version = PgVersion::V17;
    let pg = PgCluster::builder(version).wal_keep_size_mb(1024).start();
    let dir = server_temp_dir("sb-run-");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    share_repo_with_server_group(&dir.path().join("repo"));
    let mut env = Env {
        pg,
        dir,
        stream: None,
    };
    let valkey = RedisServer::start(RedisFlavor::Valkey9);
    // PostgreSQL's repository on SeaweedFS (S3), Redis's on file://.
    let s3 = S3Server::start();
    let pg_repo = s3.repo_url("pg");
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pg-password");
    std::fs::write(&pw, format!("{REPLICATION_PASSWORD}\n")).unwrap();
    let redis_repo = format!("file://{}", work.path().join("redis-repo").display());
    let http_port = free_port();
    let config = write_config(
        work.path(),
        &format!(
            r#"
[repository]
url = "{pg_repo}"

[postgres]
source = "postgres://{REPLICATION_USER}@127.0.0.1:{pg_port}/postgres"
password_file = "{pw}"
max_lag = "200ms"
backup_every = "6s"
retention = {{ keep_full = 2 }}

[redis]
source = "redis://127.0.0.1:{redis_port}"
repository = "{redis_repo}"
max_lag = "200ms"
snapshot_every = "off"

[verify]
every = "4s"
max_age = "5m"

[http]
listen = "127.0.0.1:{http_port}"
ready_max_lag = "30s"

[agent]
stop_timeout = "20s"
log_format = "json"
"#,
            pg_port = env.pg.port(),
            pw = pw.display(),
            redis_port = valkey.port(),
        ),
    );
    let config_s = config.display().to_string();
    let mut run = AgentProcess::spawn_env(
        &["run", "--config", &config_s],
        work.path().join("run.log"),
        &s3.env(),
    );

    // Ready once both streams stream.
    let ready = wait_until(Duration::from_secs(90), || {
        http_get(http_port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert!(
        ready,
        "never ready: {:?}\n{}",
        http_get(http_port, "/readyz"),
        run.log_text()
    );
    assert_eq!(http_get(http_port, "/healthz").unwrap().0, 200);

    env.pg.sql_blocking("CREATE TABLE marker(id int)");
    // Base backups on the schedule, expire after each, verify on its own schedule.
    let scheduled = wait_until(Duration::from_secs(120), || {
        http_get(http_port, "/metrics").is_some_and(|(_, m)| {
            sample(
                &m,
                "syncbridge_backup_last_success_timestamp_seconds",
                "postgres_backup",
            )
            .is_some()
                && sample(
                    &m,
                    "syncbridge_verify_last_success_timestamp_seconds",
                    "verify",
                )
                .is_some()
        })
    });
    assert!(
        scheduled,
        "{:?}\n{}",
        http_get(http_port, "/metrics"),
        run.log_text()
    );
    for i in 0..20 {
        env.pg
            .sql_blocking(&format!("INSERT INTO marker VALUES ({i})"));
    }
    let mut conn = valkey.connect();
    for i in 0..50 {
        conn.send(&["SET", &format!("k{i}"), &format!("v{i}")])
            .unwrap();
        conn.read_reply().unwrap();
    }

    // Metrics: the lag of each stream, the durable positions, up.
    let ok = wait_until(Duration::from_secs(30), || {
        http_get(http_port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "syncbridge_redis_durable_offset", "redis_stream").is_some_and(|v| v > 0.0)
                && sample(&m, "syncbridge_wal_archived_lsn_bytes", "postgres_stream").is_some()
        })
    });
    let (status, metrics) = http_get(http_port, "/metrics").unwrap();
    assert!(ok && status == 200, "{metrics}");
    for (metric, job) in [
        ("syncbridge_wal_lag_seconds", "postgres_stream"),
        ("syncbridge_redis_lag_seconds", "redis_stream"),
        ("syncbridge_job_up", "postgres_stream"),
        ("syncbridge_job_up", "redis_stream"),
        (
            "syncbridge_wal_last_archived_timestamp_seconds",
            "postgres_stream",
        ),
        ("syncbridge_wal_bytes_total", "postgres_stream"),
        ("syncbridge_slot_retained_bytes", "postgres_stream"),
        ("syncbridge_upload_errors_total", "postgres_stream"),
        ("syncbridge_upload_errors_total", "redis_stream"),
    ] {
        assert!(
            sample(&metrics, metric, job).is_some(),
            "no {metric} for {job}:\n{metrics}"
        );
    }
    assert_eq!(
        sample(&metrics, "syncbridge_job_up", "postgres_stream"),
        Some(1.0)
    );
    assert!(
        metrics.contains(&format!("repository=\"{pg_repo}\"")),
        "{metrics}"
    );
    promtool_check_metrics(&metrics)
        .unwrap_or_else(|e| panic!("promtool check metrics: {e}\n{metrics}"));

    // A real Prometheus scrapes it; PromQL through its HTTP API returns the agent's lag.
    let prometheus = PrometheusServer::scraping(&format!("127.0.0.1:{http_port}"));
    let mut answer = serde_json::Value::Null;
    let scraped = wait_until(Duration::from_secs(60), || {
        answer = prometheus.query("syncbridge_wal_lag_seconds");
        answer["status"] == "success"
            && answer["data"]["result"].as_array().is_some_and(|r| {
                r.iter().any(|s| {
                    s["metric"]["job"] == "syncbridge"
                        && s["metric"]["exported_job"] == "postgres_stream"
                })
            })
    });
    assert!(scraped, "Prometheus has no lag from the agent: {answer}");
    let up = prometheus.query("up");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    drop(prometheus);

    // More scheduled backups than the policy keeps: expire follows each one.
    let list = |url: &str| -> serde_json::Value {
        let out = agent()
            .args(["list", "--repo", url, "--output", "json"])
            .envs(s3.env())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let expired = wait_until(Duration::from_secs(120), || {
        run.log_text().matches("base backup complete").count() >= 3
    });
    assert!(expired, "{}", run.log_text());
    let backups = list(&pg_repo)["postgres"]["backups"]
        .as_array()
        .unwrap()
        .len();
    assert!(
        (1..=2).contains(&backups),
        "{backups} backups kept with keep_full = 2"
    );
    assert!(run.log_text().contains("expired"), "{}", run.log_text());
    assert!(sample(
        &http_get(http_port, "/metrics").unwrap().1,
        "syncbridge_first_recoverability_timestamp_seconds",
        "postgres_backup"
    )
    .is_some());

    // PostgreSQL down: not ready, alive; back up: ready again.
    env.pg.stop();
    let unready = wait_until(Duration::from_secs(60), || {
        http_get(http_port, "/readyz")
            .is_some_and(|(s, b)| s == 503 && b.contains("postgres_stream: not ready"))
    });
    assert!(
        unready,
        "{:?}\n{}",
        http_get(http_port, "/readyz"),
        run.log_text()
    );
    assert_eq!(http_get(http_port, "/healthz").unwrap().0, 200);
    assert!(run.exited().is_none(), "{}", run.log_text());
    env.pg.start_again();
    let ready = wait_until(Duration::from_secs(90), || {
        http_get(http_port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert!(
        ready,
        "{:?}\n{}",
        http_get(http_port, "/readyz"),
        run.log_text()
    );

    // A burst, then SIGTERM at once: everything committed is stored, exit 0 in time.
    for i in 100..140 {
        env.pg
            .sql_blocking(&format!("INSERT INTO marker VALUES ({i})"));
        conn.send(&["SET", &format!("k{i}"), &format!("v{i}")])
            .unwrap();
        conn.read_reply().unwrap();
    }
    let rows: u64 = env
        .pg
        .query_one_blocking("SELECT count(*) FROM marker")
        .parse()
        .unwrap();
    // Redis replication is asynchronous: a write is the agent's once WAIT counts its ack
    // (what WAIT means for any replica); the agent acks only what it has stored.
    assert_eq!(conn.cmd(&["WAIT", "1", "10000"]).unwrap().as_int(), Some(1));
    let source_keys = dump(&valkey);
    let stopping = Instant::now();
    let status = run.terminate();
    let took = stopping.elapsed();
    assert!(status.success(), "{status:?}\n{}", run.log_text());
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let log = run.log_text();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(!log.contains('\u{1b}'), "escape codes in the piped log");

    // PostgreSQL: restore to the latest point (from S3: the agent starts the server, whose
    // restore_command takes the store's credentials from its environment) has every row.
    let dirs = RestoreDirs::new();
    let port = free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        dirs.parent.path().display()
    );
    let bin = env.pg.bin_dir().display().to_string();
    let data = dirs.data().display().to_string();
    let mut args = vec![
        "restore",
        "--repo",
        &pg_repo,
        "--target",
        &data,
        "--jobs",
        "3",
        "--start",
        &bin,
        "--start-options",
        &opts,
    ];
    let owner = syncbridge_tests::process::server_user()
        .map(|(u, g)| format!("{}:{}", u.as_raw(), g.as_raw()));
    if let Some(o) = &owner {
        args.extend(["--owner", o.as_str()]);
    }
    let out = agent().args(&args).envs(s3.env()).output().unwrap();
    let got = syncbridge_tests::pg::block_on(async {
        let conn = format!(
            "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres"
        );
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT count(*) FROM marker", &[])
            .await
            .ok()?;
        Some(row.get::<_, i64>(0) as u64)
    });
    let mut stop = std::process::Command::new(env.pg.bin_dir().join("pg_ctl"));
    stop.arg("-D")
        .arg(dirs.data())
        .args(["-m", "immediate", "stop"]);
    syncbridge_tests::process::run_as_server_user(&mut stop);
    let _ = stop.output();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(got, Some(rows), "rows after restore:\n{}", text(&out));

    // Valkey: the latest point has every key.
    let target = work.path().join("redis-restore");
    let target_s = target.display().to_string();
    let bin = redis_support::server_bin(RedisFlavor::Valkey9);
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
    let server = RestoredServer::try_from_output(&out);
    assert!(out.status.success(), "{}", text(&out));
    let server = server.unwrap();
    assert_eq!(dump_port(server.port, None), source_keys);
}

#[test]
fn bad_configurations_are_refused_before_anything_starts() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let base = format!(
        "[repository]\nurl = \"file://{}\"\n\n[postgres]\nsource = \"postgres://replicator@127.0.0.1:1/postgres\"\n",
        repo.display()
    );
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "unknown key",
            format!("{base}max_lagg = \"1s\"\n"),
            &["max_lagg", "line 6"],
        ),
        (
            "missing password file",
            format!("{base}password_file = \"/nonexistent/secret/pg-password\"\n"),
            &["/nonexistent/secret/pg-password"],
        ),
        (
            "bad duration",
            format!("{base}max_lag = \"fast\"\n"),
            &["postgres.max_lag", "fast"],
        ),
        (
            "unknown section",
            format!("{base}\n[postgress]\nslot = \"x\"\n"),
            &["postgress"],
        ),
    ];
    for (what, body, needles) in cases {
        let config = write_config(work.path(), &body);
        let out = agent()
            .args(["run", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for n in needles {
            assert!(err.contains(n), "{what}: no {n:?} in:\n{err}");
        }
        assert!(!repo.exists(), "{what}: the repository was created");
    }
    // An environment override and --set are checked the same way.
    let config = write_config(work.path(), &base);
    let out = agent()
        .args(["run", "--config", config.to_str().unwrap(), "--check"])
        .env("SYNCBRIDGE_POSTGRES_MAX_LAG", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres.max_lag"));
    let out = agent()
        .args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--check",
            "--set",
            "postgres.max_lag=2s",
        ])
        .env("SYNCBRIDGE_POSTGRES_MAX_LAG", "soon")
        .output()
        .unwrap();
    assert!(out.status.success(), "--set wins: {}", text(&out));
}

/// A `run` sidecar's configuration streaming `pg_port` into `repo` (file://), serving HTTP on
/// `http_port`.
fn sidecar_config(
    dir: &Path,
    name: &str,
    repo: &str,
    pg_port: u16,
    pw: &Path,
    http_port: u16,
) -> String {
    let body = format!(
        r#"
[repository]
url = "{repo}"

[postgres]
source = "postgres://{REPLICATION_USER}@127.0.0.1:{pg_port}/postgres"
password_file = "{pw}"
max_lag = "200ms"

[http]
listen = "127.0.0.1:{http_port}"
"#,
        pw = pw.display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Two sidecars, beside a primary and its streaming standby, on one repository: only the
/// primary's streams (the other waits, not ready); after the standby is promoted and the old
/// primary stopped, the standby's sidecar takes over on timeline 2 by itself, and a restore
/// across the switch has every row.
#[test]
fn beside_a_standby_run_waits_and_takes_over_after_the_failover() {
    // pg_basebackup (client programs ship with 15 only here) makes the standby.
    let version = PgVersion::V15;
    let pg = PgCluster::builder(version).wal_keep_size_mb(1024).start();
    let dir = server_temp_dir("sb-run-failover-");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    share_repo_with_server_group(&dir.path().join("repo"));
    let mut env = Env {
        pg,
        dir,
        stream: None,
    };
    let insert = |pg: &PgCluster, from: u32, to: u32, tli: u32| {
        pg.sql_blocking(&format!(
            "INSERT INTO m SELECT g, {tli} FROM generate_series({from}, {to}) g"
        ));
    };
    env.pg
        .sql_blocking("CREATE TABLE m(id int primary key, tli int)");
    insert(&env.pg, 1, 100, 1);
    let standby = pg_support::standby_of(&env.pg, version);

    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pg-password");
    std::fs::write(&pw, REPLICATION_PASSWORD).unwrap();
    let url = env.repo_url();
    let (port_a, port_b) = (free_port(), free_port());
    let conf_a = sidecar_config(work.path(), "a", &url, env.pg.port(), &pw, port_a);
    let conf_b = sidecar_config(work.path(), "b", &url, standby.port(), &pw, port_b);
    let mut a = AgentProcess::spawn(&["run", "--config", &conf_a], work.path().join("a.log"));
    let mut b = AgentProcess::spawn(&["run", "--config", &conf_b], work.path().join("b.log"));
    let ready = |port: u16| http_get(port, "/readyz").is_some_and(|(s, _)| s == 200);
    assert!(
        wait_until(Duration::from_secs(90), || ready(port_a)),
        "{}",
        a.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(30), || http_get(port_b, "/readyz")
            .is_some_and(|(s, body)| s == 503 && body.contains("standby"))),
        "{:?}\n{}",
        http_get(port_b, "/readyz"),
        b.log_text()
    );
    env.backup(&[]);
    insert(&env.pg, 101, 200, 1);
    let end1 = env
        .pg
        .query_one_blocking("SELECT pg_current_wal_lsn()::text");
    env.wait_archived(&end1);
    assert!(
        wait_until(Duration::from_secs(60), || standby.query_one_blocking(
            &format!("SELECT pg_last_wal_replay_lsn() >= '{end1}'::pg_lsn")
        ) == "t"),
        "standby did not catch up"
    );
    assert!(
        !b.log_text().contains("starting replication"),
        "the standby's sidecar streamed:\n{}",
        b.log_text()
    );

    // Failover: the old primary stops, the standby is promoted and takes writes.
    env.pg.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    assert!(wait_until(Duration::from_secs(30), || standby
        .query_one_blocking("SELECT pg_is_in_recovery()")
        == "f"));
    insert(&standby, 201, 300, 2);
    let seg = standby.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(seg.starts_with("00000002"), "{seg}");
    assert!(
        wait_until(Duration::from_secs(120), || pg_support::repo::listing(&url)
            .0
            .contains(&seg)),
        "{seg} never arrived:\nA:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(ready(port_b), "{:?}", http_get(port_b, "/readyz"));
    assert!(!ready(port_a), "the old primary's sidecar says ready");
    assert!(a.exited().is_none() && b.exited().is_none());

    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = start_restored(version, &dirs.data());
    let row = restored
        .sql_blocking("SELECT count(*), max(id), count(*) FILTER (WHERE tli = 2) FROM m")
        .remove(0);
    assert_eq!(
        row,
        vec![Some("300".into()), Some("300".into()), Some("100".into())]
    );
    drop(restored);
    assert!(a.terminate().success(), "{}", a.log_text());
    assert!(b.terminate().success(), "{}", b.log_text());
}

fn redis_sidecar_config(
    dir: &Path,
    name: &str,
    repo: &str,
    port: u16,
    policy: &str,
    http_port: u16,
) -> String {
    let body = format!(
        r#"
[redis]
source = "redis://127.0.0.1:{port}"
repository = "{repo}"
max_lag = "200ms"
snapshot_every = "off"
on_replica = "{policy}"

[http]
listen = "127.0.0.1:{http_port}"
"#
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Redis: a sidecar beside a replica with `on_replica = "wait"` waits, not ready, while the
/// one beside the master streams; after the replica is promoted and the master is gone it
/// takes over (PSYNC continues the same history) and the restore has every write. With
/// `follow`, a stream given the replica streams from its master.
#[test]
fn beside_a_redis_replica_run_waits_or_follows_the_master() {
    let mut master = RedisServer::start(RedisFlavor::Redis7);
    let replica = RedisServer::start(RedisFlavor::Redis7);
    assert!(replica
        .cmd(&["REPLICAOF", "127.0.0.1", &master.port().to_string()])
        .is_ok());
    assert!(
        wait_until(Duration::from_secs(30), || replica
            .info("replication")
            .get("master_link_status")
            .is_some_and(|s| s == "up")),
        "the replica never linked"
    );
    let work = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", work.path().join("repo").display());
    let (port_a, port_b, port_c) = (free_port(), free_port(), free_port());
    let conf_a = redis_sidecar_config(work.path(), "a", &repo, master.port(), "wait", port_a);
    let conf_b = redis_sidecar_config(work.path(), "b", &repo, replica.port(), "wait", port_b);
    let follow_repo = format!("file://{}", work.path().join("follow-repo").display());
    let conf_c = redis_sidecar_config(
        work.path(),
        "c",
        &follow_repo,
        replica.port(),
        "follow",
        port_c,
    );
    let mut a = AgentProcess::spawn(&["run", "--config", &conf_a], work.path().join("a.log"));
    let mut b = AgentProcess::spawn(&["run", "--config", &conf_b], work.path().join("b.log"));
    let mut c = AgentProcess::spawn(&["run", "--config", &conf_c], work.path().join("c.log"));
    let ready = |port: u16| http_get(port, "/readyz").is_some_and(|(s, _)| s == 200);
    assert!(
        wait_until(Duration::from_secs(60), || ready(port_a) && ready(port_c)),
        "A:\n{}\nC:\n{}",
        a.log_text(),
        c.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(30), || http_get(port_b, "/readyz")
            .is_some_and(|(s, body)| s == 503 && body.contains("replica"))),
        "{:?}\n{}",
        http_get(port_b, "/readyz"),
        b.log_text()
    );
    assert!(
        c.log_text().contains("streaming from its master"),
        "{}",
        c.log_text()
    );

    let mut conn = master.connect();
    for i in 0..50 {
        assert!(conn
            .cmd(&["SET", &format!("k{i}"), &format!("v{i}")])
            .unwrap()
            .is_ok());
    }
    // The replica has every write, then the master goes and the replica is promoted.
    assert_eq!(conn.cmd(&["WAIT", "1", "10000"]).unwrap().as_int(), Some(1));
    let master_keys = dump(&master);
    assert!(
        wait_until(Duration::from_secs(30), || dump(&replica) == master_keys),
        "the replica did not catch up"
    );
    // C stored what it followed: restore its repository.
    assert!(c.terminate().success(), "{}", c.log_text());
    let restore = |repo: &str, name: &str| {
        let target = work.path().join(name);
        let target_s = target.display().to_string();
        let bin = redis_support::server_bin(RedisFlavor::Redis7);
        let out = agent()
            .args([
                "redis", "restore", "--repo", repo, "--target", &target_s, "--start", &bin,
            ])
            .output()
            .unwrap();
        let server = RestoredServer::try_from_output(&out);
        assert!(out.status.success(), "{}", text(&out));
        let server = server.unwrap();
        dump_port(server.port, None)
    };
    assert_eq!(restore(&follow_repo, "follow-restore"), master_keys);

    master.stop();
    assert!(replica.cmd(&["REPLICAOF", "NO", "ONE"]).is_ok());
    let mut conn = replica.connect();
    for i in 50..100 {
        assert!(conn
            .cmd(&["SET", &format!("k{i}"), &format!("v{i}")])
            .unwrap()
            .is_ok());
    }
    let source_keys = dump(&replica);
    assert_eq!(source_keys.len(), 100);
    assert!(
        wait_until(Duration::from_secs(60), || ready(port_b)),
        "{:?}\n{}",
        http_get(port_b, "/readyz"),
        b.log_text()
    );
    // B stores every write the promoted replica took (WAIT counts the agent's ack).
    assert!(
        wait_until(Duration::from_secs(30), || conn
            .cmd(&["WAIT", "1", "1000"])
            .unwrap()
            .as_int()
            == Some(1)),
        "{}",
        b.log_text()
    );
    assert!(!ready(port_a), "the old master's sidecar says ready");
    assert!(b.terminate().success(), "{}", b.log_text());
    assert!(a.terminate().success(), "{}", a.log_text());
    assert_eq!(restore(&repo, "restore"), source_keys);
}
