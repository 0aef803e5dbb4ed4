//! `list --output json` of a PostgreSQL and a Redis repository parses and has the fields of
//! the documented schema (docs/list-json.md, `syncbridge.list/1`), with values that match
//! what was stored.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use pg_pitr_support::Env;
use pg_support::{agent, text};
use serde_json::Value;
use syncbridge_tests::pg::PgVersion;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

fn list_json(url: &str) -> Value {
    let out = agent()
        .args(["list", "--repo", url, "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc)
}

#[test]
fn postgres_list_json_matches_the_schema_and_the_repository() {
    let env = Env::simple(PgVersion::V15);
    env.pg
        .sql_blocking("CREATE TABLE t(id int); INSERT INTO t SELECT generate_series(1, 100)");
    env.backup(&[]);
    env.pg.sql_blocking("INSERT INTO t VALUES (101)");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let v = list_json(&env.repo_url());
    assert_eq!(v["schema"], "syncbridge.list/1");
    let repo = &v["repository"];
    assert_eq!(repo["kind"], "postgres");
    assert_eq!(repo["encrypted"], false);
    assert_eq!(repo["repository_id"].as_str().unwrap().len(), 32);
    let sysid = env
        .pg
        .query_one_blocking("SELECT system_identifier::text FROM pg_control_system()");
    assert_eq!(repo["system_identifier"], sysid.as_str());
    assert!(v["redis"].is_null());
    let pg = &v["postgres"];
    let backups = pg["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 1, "{v:#}");
    let b = &backups[0];
    for field in ["id", "start_lsn", "stop_lsn", "server_version"] {
        assert!(b[field].is_string(), "{field}: {b:#}");
    }
    assert!(time(&b["start_time"]) <= time(&b["stop_time"]));
    assert_eq!(b["timeline"], 1);
    assert!(b["size_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(b["stored_bytes"].as_u64().unwrap() > 0);
    // Only the main data directory (no oid, no location): no user tablespace.
    assert!(
        b["tablespaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["location"].is_null()),
        "{b:#}"
    );
    assert!(pg["incomplete_backups"].as_array().unwrap().is_empty());
    let wal = pg["wal"].as_array().unwrap();
    assert_eq!(wal.len(), 1);
    assert_eq!(wal[0]["timeline"], 1);
    assert!(wal[0]["holes"].as_array().unwrap().is_empty(), "{v:#}");
    assert!(wal[0]["segments"].as_u64().unwrap() >= 1);
    assert_eq!(pg["wal_conflicts"], serde_json::json!([]), "{v:#}");
    let r = &v["restorable"];
    assert_eq!(time(&r["first_time"]), time(&b["stop_time"]));
    assert_eq!(r["first_lsn"], b["stop_lsn"]);
    assert_eq!(r["timeline"], 1);
    let parse = |s: &str| pg_pitr_support::parse_lsn(s);
    assert!(
        parse(r["last_lsn"].as_str().unwrap()) >= parse(&lsn),
        "{v:#}"
    );
    assert!(time(&r["last_time"]) >= time(&b["stop_time"]));
}

#[test]
fn redis_list_json_matches_the_schema_and_the_repository() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let mut c = server.connect();
    for i in 0..50 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".to_string()])
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let out = agent()
        .args([
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v = list_json(&url);
    assert_eq!(v["schema"], "syncbridge.list/1");
    assert_eq!(v["repository"]["kind"], "redis");
    assert!(v["postgres"].is_null());
    let gens = v["redis"]["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 1, "{v:#}");
    let g = &gens[0];
    assert_eq!(g["keys"], 50);
    assert_eq!(g["replication_id"].as_str().unwrap().len(), 40);
    assert_eq!(g["end_offset"], g["snapshot_offset"]);
    assert_eq!(g["chunks"], 0);
    assert_eq!(g["orphan_chunks"], 0);
    assert!(g["snapshot_bytes"].as_u64().unwrap() > 0);
    assert!(g["stored_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        time(&v["restorable"]["first_time"]),
        time(&g["snapshot_time"])
    );
    // Text output speaks Redis too.
    let out = agent().args(["list", "--repo", &url]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("generations:") && t.contains("50 keys"), "{t}");
}
