//! `list --output json` of a PostgreSQL and a Redis repository parses and matches the
//! documented schema (docs/list-json.md, `syncbridge.list/1`): exactly the keys of the
//! documented example at every level, with its types, and values that match what was
//! stored.
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

/// The example document of docs/list-json.md, its comments removed.
fn documented() -> Value {
    let doc = include_str!("../../docs/list-json.md");
    let block = doc
        .split("```jsonc")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/list-json.md has a jsonc block");
    let mut json = String::new();
    for line in block.lines() {
        let chars: Vec<(usize, char)> = line.char_indices().collect();
        let mut in_string = false;
        let mut cut = line.len();
        for (i, &(at, ch)) in chars.iter().enumerate() {
            if ch == '"' && (i == 0 || chars[i - 1].1 != '\\') {
                in_string = !in_string;
            }
            if !in_string && ch == '/' && chars.get(i + 1).map(|c| c.1) == Some('/') {
                cut = at;
                break;
            }
        }
        json.push_str(&line[..cut]);
        json.push('\n');
    }
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("docs/list-json.md: {e}\n{json}"))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `actual` has exactly the keys the documented example `doc` has, at every level (each
/// array element against the documented element), each of the documented type; a value
/// may be `null` (the schema says which are null in which repositories).
fn assert_documented(doc: &Value, actual: &Value, path: &str) {
    match (doc, actual) {
        (_, Value::Null) => {}
        (Value::Object(d), Value::Object(a)) => {
            let documented: Vec<&String> = d.keys().collect();
            let printed: Vec<&String> = a.keys().collect();
            let mut documented_sorted = documented.clone();
            documented_sorted.sort();
            let mut printed_sorted = printed.clone();
            printed_sorted.sort();
            assert_eq!(
                printed_sorted, documented_sorted,
                "{path}: the keys printed are not the keys docs/list-json.md documents"
            );
            for (k, dv) in d {
                assert_documented(dv, &a[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(d), Value::Array(a)) => {
            if let Some(element) = d.first() {
                for (i, e) in a.iter().enumerate() {
                    assert_documented(element, e, &format!("{path}[{i}]"));
                }
            }
        }
        (d, a) => assert_eq!(
            json_kind(a),
            json_kind(d),
            "{path}: {a} is not of the documented type (example: {d})"
        ),
    }
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
    assert_documented(&documented(), &v, "$");
    let repo = &v["repository"];
    assert_eq!(repo["kind"], "postgres");
    assert_eq!(repo["url"], env.repo_url().as_str());
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
    assert_eq!(b["pinned"], false);
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
    assert!(
        wal[0]["first_segment"].as_str().unwrap() <= wal[0]["last_segment"].as_str().unwrap(),
        "{v:#}"
    );
    assert_eq!(
        pg_pitr_support::parse_lsn(wal[0]["end_lsn"].as_str().unwrap()),
        pg_pitr_support::parse_lsn(v["restorable"]["last_lsn"].as_str().unwrap()),
        "the newest WAL ends where the restorable range does: {v:#}"
    );
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
    // WAL without a hole: one span, the whole range.
    let spans = r["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 1, "{v:#}");
    assert_eq!(spans[0]["timeline"], 1);
    assert_eq!(spans[0]["from_lsn"], r["first_lsn"]);
    assert_eq!(spans[0]["to_lsn"], r["last_lsn"]);
    assert_eq!(time(&spans[0]["from_time"]), time(&r["first_time"]));
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
    assert_documented(&documented(), &v, "$");
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
    assert_eq!(g["pinned"], false);
    assert!(
        g["source"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", server.port())),
        "{v:#}"
    );
    assert!(v["restorable"]["first_lsn"].is_null(), "{v:#}");
    assert!(v["restorable"]["spans"].is_null(), "{v:#}");
    assert!(v["redis"]["incomplete_generations"]
        .as_array()
        .unwrap()
        .is_empty());
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
