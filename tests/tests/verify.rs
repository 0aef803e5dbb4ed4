//! `verify` (issue 13): exit 0 on a healthy PostgreSQL and Redis repository; exit 1 naming
//! the object for each damage (a WAL segment missing in the middle, a flipped byte, a
//! missing and a swapped base backup data object, a Redis chunk removed from the middle of
//! the chain); exit 2 on a stream stopped longer ago than `--max-age`, damage winning over
//! staleness; `--output json` parses and has the fields of docs/verify-json.md.
//!
//! One PostgreSQL server and repository are built once; each damage is made on a copy of
//! the `file://` repository directory.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use pg_pitr_support::Env;
use pg_support::{agent, text};
use redis_support::StreamingAgent;
use serde_json::Value;
use syncbridge_tests::pg::PgVersion;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

fn verify(url: &str, extra: &[&str]) -> Output {
    agent()
        .args(["verify", "--repo", url])
        .args(extra)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `verify` exits with `code` and its output names `key` on a DAMAGED line.
fn assert_names(out: &Output, code: i32, key: &str, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}:\n{}", text(out));
    let s = stdout(out);
    assert!(
        s.lines()
            .any(|l| l.starts_with("DAMAGED") && l.contains(key)),
        "{what}: no DAMAGED line names {key}:\n{}",
        text(out)
    );
}

/// A copy of the repository directory `from`, as a URL and a path.
fn copy_repo(from: &Path, scratch: &Path, name: &str) -> (String, PathBuf) {
    let to = scratch.join(name);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success());
    (format!("file://{}", to.display()), to)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn key_of(repo: &Path, file: &Path) -> String {
    file.strip_prefix(repo).unwrap().display().to_string()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", text(out)))
}

/// The fields docs/verify-json.md documents, with their types.
fn assert_schema(v: &Value, kind: &str) {
    assert_eq!(v["schema"], "syncbridge.verify/1", "{v:#}");
    assert_eq!(v["kind"], kind);
    assert!(v["url"].is_string());
    for f in [
        "objects",
        "objects_verified",
        "objects_damaged",
        "bytes_verified",
        "backups",
        "timelines",
        "generations",
    ] {
        assert!(v[f].is_u64(), "{f}: {v:#}");
    }
    assert!(v["elapsed_seconds"].is_f64(), "{v:#}");
    assert!(v["problems"].is_array(), "{v:#}");
    assert!(v["stale"].is_boolean(), "{v:#}");
    assert!(v["status"].is_string(), "{v:#}");
    chrono::DateTime::parse_from_rfc3339(v["started"].as_str().unwrap()).unwrap();
    chrono::DateTime::parse_from_rfc3339(v["newest_time"].as_str().unwrap()).unwrap();
    assert!(v["age_seconds"].as_f64().unwrap() >= 0.0, "{v:#}");
}

#[test]
fn pg_verify_healthy_then_names_each_damage_and_stops_the_clock() {
    let mut env = Env::simple(PgVersion::V15);
    env.pg.sql_blocking(
        "CREATE TABLE t(id int, pad text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 60000) g",
    );
    // Small data objects: several, so two can be swapped.
    env.backup(&["--chunk-mib", "1"]);
    let mut switched = Vec::new();
    for i in 0..4 {
        env.pg
            .sql_blocking(&format!("INSERT INTO t VALUES ({}, 'after')", 100_000 + i));
        switched.push(
            env.pg
                .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())"),
        );
    }
    env.pg.sql_blocking("INSERT INTO t VALUES (0, 'tail')");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    // Verified while the stream writes (segments completing, their deltas removed): an
    // object the stream removes meanwhile is no damage.
    let url = env.repo_url();
    let busy = agent()
        .args(["verify", "--repo", &url, "--jobs", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for i in 0..3 {
        env.pg
            .sql_blocking(&format!("INSERT INTO t VALUES ({}, 'during')", 200_000 + i));
        env.pg.query_one_blocking("SELECT pg_switch_wal()");
    }
    let out = busy.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The stream stops: the repository no longer changes (and its clock starts).
    env.stream = None;
    let stopped = Instant::now();
    let repo = env.repo_path();
    let scratch = tempfile::tempdir().unwrap();

    // Healthy: exit 0, text and JSON.
    let out = verify(&url, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout(&out).contains("status:      healthy"),
        "{}",
        text(&out)
    );
    let out = verify(&url, &["--output", "json", "--jobs", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_schema(&v, "postgres");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["backups"], 1);
    assert_eq!(v["timelines"], 1);
    assert_eq!(v["stale"], false);
    assert!(v["max_age_seconds"].is_null());
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    // Every object but the marker's neighbours that are not data (none here) is read.
    assert_eq!(v["objects_verified"], v["objects"], "{v:#}");
    assert!(v["bytes_verified"].as_u64().unwrap() > 1 << 20);

    let base = repo.join("postgres/base");
    let backup_dir = std::fs::read_dir(&base)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let data = files_in(&backup_dir.join("data"));
    assert!(data.len() >= 3, "{data:?}");
    let wal_dir = repo.join("postgres/wal/00000001");

    // A WAL segment missing in the middle.
    let (u, r) = copy_repo(&repo, scratch.path(), "missing-wal");
    std::fs::remove_file(r.join("postgres/wal/00000001").join(&switched[1])).unwrap();
    let out = verify(&u, &[]);
    let key = format!("postgres/wal/00000001/{}", switched[1]);
    assert_names(&out, 1, &key, "missing WAL segment");
    assert!(stdout(&out).contains("missing"), "{}", text(&out));
    // Damage wins over staleness.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(stopped.elapsed()));
    let out = verify(&u, &["--max-age", "2s"]);
    assert_names(&out, 1, &key, "missing WAL segment, stale too");

    // A flipped byte in a WAL segment.
    let (u, r) = copy_repo(&repo, scratch.path(), "flipped");
    let victim = r.join("postgres/wal/00000001").join(&switched[2]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let out = verify(&u, &[]);
    assert_names(
        &out,
        1,
        &format!("postgres/wal/00000001/{}", switched[2]),
        "flipped byte",
    );
    assert!(wal_dir.join(&switched[2]).exists());

    // A flipped byte in a backup data object.
    let (u, r) = copy_repo(&repo, scratch.path(), "flipped-data");
    let victim = r.join(key_of(&repo, &data[1]));
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let out = verify(&u, &[]);
    assert_names(&out, 1, &key_of(&repo, &data[1]), "flipped byte in data");

    // A damaged backup.json: named, and the rest still verified.
    let (u, r) = copy_repo(&repo, scratch.path(), "flipped-manifest");
    let manifest_key = key_of(&repo, &backup_dir.join("backup.json"));
    let victim = r.join(&manifest_key);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let out = verify(&u, &[]);
    assert_names(&out, 1, &manifest_key, "flipped byte in backup.json");

    // A missing backup data object.
    let (u, r) = copy_repo(&repo, scratch.path(), "missing-data");
    std::fs::remove_file(r.join(key_of(&repo, &data[1]))).unwrap();
    let out = verify(&u, &[]);
    assert_names(&out, 1, &key_of(&repo, &data[1]), "missing data object");
    assert!(stdout(&out).contains("missing"), "{}", text(&out));

    // Two data objects' contents exchanged: both named.
    let (u, r) = copy_repo(&repo, scratch.path(), "swapped-data");
    let (a, b) = (
        r.join(key_of(&repo, &data[0])),
        r.join(key_of(&repo, &data[2])),
    );
    let tmp = r.join("swap.tmp");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    let out = verify(&u, &[]);
    assert_names(&out, 1, &key_of(&repo, &data[0]), "swapped data objects");
    assert_names(&out, 1, &key_of(&repo, &data[2]), "swapped data objects");
    let v = json(&verify(&u, &["--output", "json"]));
    assert_eq!(v["status"], "damaged");
    assert!(v["objects_damaged"].as_u64().unwrap() >= 2, "{v:#}");
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["key"].is_string() && p["problem"].is_string()),
        "{v:#}"
    );

    // Stale but intact: exit 2; a limit it meets: exit 0.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(stopped.elapsed()));
    let out = verify(&url, &["--max-age", "2s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stdout(&out).contains("STALE"), "{}", text(&out));
    let v = json(&verify(&url, &["--max-age", "2s", "--output", "json"]));
    assert_eq!(v["status"], "stale");
    assert_eq!(v["stale"], true);
    assert_eq!(v["max_age_seconds"], 2.0);
    assert!(v["age_seconds"].as_f64().unwrap() > 2.0, "{v:#}");
    let out = verify(&url, &["--max-age", "1h"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// A Redis repository with a stopped stream: a snapshot and at least four chunks.
struct RedisRepo {
    _server: RedisServer,
    dir: tempfile::TempDir,
    stopped: Instant,
}

impl RedisRepo {
    fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn chunks(&self) -> Vec<PathBuf> {
        let gens = self.path().join("redis/gen");
        let mut all = Vec::new();
        for g in std::fs::read_dir(gens).into_iter().flatten() {
            let c = g.unwrap().path().join("chunks");
            if c.is_dir() {
                all.extend(files_in(&c));
            }
        }
        all
    }
}

fn redis_repo() -> RedisRepo {
    redis_repo_verified_while_streaming(false)
}

/// [`redis_repo`]; with `busy`, `verify` also runs while the stream stores chunks under
/// traffic and must find nothing wrong.
fn redis_repo_verified_while_streaming(busy: bool) -> RedisRepo {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let mut agent = StreamingAgent::start(
        &server.url(),
        &url,
        "100ms",
        &[],
        dir.path().join("agent.log"),
    );
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut c = server.connect();
    let mut repo = RedisRepo {
        _server: server,
        dir,
        stopped: Instant::now(),
    };
    for phase in 0..8 {
        for i in 0..20 {
            c.cmd(&["SET".to_string(), format!("k:{phase}:{i}"), "v".repeat(50)])
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(250));
        if phase >= 3 && repo.chunks().len() >= 4 {
            break;
        }
    }
    if busy {
        let v = pg_support::agent()
            .args(["verify", "--repo", &url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for i in 0..20 {
            c.cmd(&["SET".to_string(), format!("busy:{i}"), "v".repeat(50)])
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = v.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    std::thread::sleep(Duration::from_millis(400));
    assert!(agent.terminate(), "{}", agent.log_text());
    repo.stopped = Instant::now();
    assert!(repo.chunks().len() >= 3, "{}", agent.log_text());
    repo
}

#[test]
fn redis_verify_healthy_repository_exits_0_with_the_json_schema() {
    let r = redis_repo_verified_while_streaming(true);
    let out = verify(&r.url(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = verify(&r.url(), &["--output", "json", "--max-age", "1h"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_schema(&v, "redis");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["generations"], 1);
    assert_eq!(v["newest_kind"], "chunk");
    assert_eq!(v["max_age_seconds"], 3600.0);
    assert_eq!(v["objects_verified"], v["objects"], "{v:#}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    // `redis verify` (the same checks) agrees.
    let out = agent()
        .args(["redis", "verify", "--repo", &r.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn redis_verify_names_a_chunk_missing_from_the_middle_of_the_chain() {
    let r = redis_repo();
    let chunks = r.chunks();
    let middle = &chunks[chunks.len() / 2];
    let key = key_of(&r.path(), middle);
    std::fs::remove_file(middle).unwrap();
    let out = verify(&r.url(), &[]);
    assert_names(&out, 1, &key, "chunk missing from the chain");
    // The chunk after the gap is named as off the chain too.
    let next = key_of(&r.path(), &chunks[chunks.len() / 2 + 1]);
    assert_names(&out, 1, &next, "chunk after the gap");
    let v = json(&verify(&r.url(), &["--output", "json"]));
    assert_eq!(v["status"], "damaged");
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["key"] == key.as_str()),
        "{v:#}"
    );
}

#[test]
fn redis_verify_of_a_stopped_stream_is_stale_with_exit_2() {
    let r = redis_repo();
    std::thread::sleep(Duration::from_secs(3).saturating_sub(r.stopped.elapsed()));
    let out = verify(&r.url(), &["--max-age", "2s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let v = json(&verify(&r.url(), &["--max-age", "2s", "--output", "json"]));
    assert_eq!(v["status"], "stale");
    assert_eq!(v["stale"], true);
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    let out = verify(&r.url(), &["--max-age", "10m"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// Across a failover the check follows the history file: healthy with WAL on timelines 1
/// and 2; the history file removed, or a timeline-2 segment missing in the middle, is named.
#[test]
fn pg_verify_follows_the_history_chain_after_a_failover() {
    use pg_support::{repo, standby_of, stream_args, wait_until, AgentProcess};
    let version = PgVersion::V15;
    let mut env = Env::simple(version);
    env.pg.sql_blocking("CREATE TABLE m(id int)");
    env.backup(&[]);
    let standby = standby_of(&env.pg, version);
    assert!(env.stream.take().unwrap().terminate().success());
    let src = env.pg.replication_url().replace(
        &format!("127.0.0.1:{}", env.pg.port()),
        &format!("127.0.0.1:{},127.0.0.1:{}", env.pg.port(), standby.port()),
    ) + "?target_session_attrs=read-write";
    let url = env.repo_url();
    let mut agent = AgentProcess::spawn(&stream_args(&src, &url), env.dir.path().join("s2.log"));
    env.pg.sql_blocking("INSERT INTO m VALUES (1)");
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
    env.pg.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    assert!(wait_until(Duration::from_secs(30), || standby
        .query_one_blocking("SELECT pg_is_in_recovery()")
        == "f"));
    let mut on_two = Vec::new();
    for i in 0..3 {
        standby.sql_blocking(&format!("INSERT INTO m VALUES ({})", 10 + i));
        on_two.push(standby.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())"));
    }
    let last = on_two.last().unwrap().clone();
    assert!(last.starts_with("00000002"), "{last}");
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(&url)
            .0
            .contains(&last)),
        "{last} never arrived:\n{}",
        agent.log_text()
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());

    let v = json(&verify(&url, &["--output", "json"]));
    assert_eq!(v["status"], "healthy", "{v:#}");
    assert_eq!(v["timelines"], 2, "{v:#}");

    let scratch = tempfile::tempdir().unwrap();
    let (u, r) = copy_repo(&env.repo_path(), scratch.path(), "no-history");
    std::fs::remove_file(r.join("postgres/wal/00000002/00000002.history")).unwrap();
    let out = verify(&u, &[]);
    assert_names(
        &out,
        1,
        "postgres/wal/00000002/00000002.history",
        "history file removed",
    );

    let (u, r) = copy_repo(&env.repo_path(), scratch.path(), "hole-on-two");
    std::fs::remove_file(r.join("postgres/wal/00000002").join(&on_two[1])).unwrap();
    let out = verify(&u, &[]);
    assert_names(
        &out,
        1,
        &format!("postgres/wal/00000002/{}", on_two[1]),
        "segment missing on timeline 2",
    );
}

/// A long verification reports progress on stderr (every 5 s when not on a terminal): the
/// objects verified so far out of those listed. The test hook slows every object read so a
/// small repository takes long (four generations' manifests read one at a time, 2.5 s each).
#[test]
fn verify_of_a_long_run_reports_progress_on_stderr() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let mut c = server.connect();
    for i in 0..4 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".to_string()])
            .unwrap();
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
    }
    let v = json(&verify(&url, &["--output", "json"]));
    assert_eq!(v["status"], "healthy", "{v:#}");
    let total = v["objects"].as_u64().unwrap();
    let out = agent()
        .args(["verify", "--repo", &url, "--jobs", "1"])
        .env("SYNCBRIDGE_TEST_READ_DELAY_MS", "2500")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("verify: "))
        .collect();
    assert!(!progress.is_empty(), "no progress line:\n{}", text(&out));
    for l in &progress {
        let counts = l["verify: ".len()..].split_whitespace().next().unwrap();
        let (done, of) = counts.split_once('/').unwrap();
        assert_eq!(of.parse::<u64>().unwrap(), total, "{l}");
        assert!(done.parse::<u64>().unwrap() <= total, "{l}");
        assert!(
            l.contains(" objects (") && l.contains("stored) verified"),
            "{l}"
        );
    }
}

/// A snapshot whose container is intact (checksums, key binding) but whose content is not a
/// valid RDB, as a writer with the repository's keys could leave it: `verify` runs it
/// through the RDB validator and names it.
#[test]
fn redis_verify_names_a_snapshot_that_is_not_a_valid_rdb() {
    use storage::{layout, ContentKind, PutMode, RepoKey, RepoOptions, Repository};
    let server = RedisServer::start(RedisFlavor::Redis7);
    let mut c = server.connect();
    for i in 0..20 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".repeat(40)])
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = Repository::open(&url, RepoOptions::default()).unwrap();
    let listed = rt
        .block_on(repo.list(&layout::redis_generations_prefix()))
        .unwrap();
    let key: RepoKey = listed
        .into_iter()
        .map(|m| m.key)
        .find(|k| k.as_str().ends_with("/snapshot.rdb"))
        .unwrap();
    let rdb = rt.block_on(repo.get(&key)).unwrap();
    // Cut short: a valid container holding the first half of the RDB.
    let half = bytes::Bytes::copy_from_slice(&rdb[..rdb.len() / 2]);
    rt.block_on(repo.put(&key, ContentKind::RedisSnapshot, half, PutMode::Overwrite))
        .unwrap();
    let out = verify(&url, &[]);
    assert_names(&out, 1, key.as_str(), "a snapshot that is not a valid RDB");
    let v = json(&verify(&url, &["--output", "json"]));
    assert_eq!(v["status"], "damaged", "{v:#}");
}
