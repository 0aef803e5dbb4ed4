//! `expire` under stress (issue 13, Deliver 4): pinned backups and generations survive any
//! policy until unpinned (`postgres backup --pin`, `backup pin|unpin`), also when the pin is
//! set while expire runs; a kill -9 in the middle of deleting (the test hook
//! `SYNCBRIDGE_TEST_DELETE_DELAY_MS`) leaves no backup that looks complete and is not, every
//! backup still listed restores, and the next run finishes the job but leaves alone an
//! incomplete directory that may still be written; a refusal before the earliest kept
//! moment names that moment. PostgreSQL 15, Redis 7.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_pitr_support::{start_restored, Env, RestoreDirs};
use pg_support::{agent, repo, text, wait_until, AgentProcess};
use serde_json::Value;
use syncbridge_tests::pg::PgVersion;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

/// Files below `dir` (a `file://` store may keep emptied directories).
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                files_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn run(args: &[&str]) -> Output {
    agent().args(args).output().unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn list_json(url: &str) -> Value {
    let out = run(&["list", "--repo", url, "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ids(v: &Value, part: &str, what: &str) -> Vec<String> {
    v[part][what]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b.as_str()
                .unwrap_or_else(|| b["id"].as_str().unwrap())
                .to_string()
        })
        .collect()
}

fn pinned(v: &Value, part: &str, what: &str, id: &str) -> bool {
    v[part][what]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {v}"))["pinned"]
        .as_bool()
        .unwrap()
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .to_utc()
}

/// The time a refusal names as "the earliest restorable time is T".
fn earliest_named(stderr: &str) -> DateTime<Utc> {
    let rest = stderr
        .split("the earliest restorable time is ")
        .nth(1)
        .unwrap_or_else(|| panic!("no earliest restorable time named: {stderr}"));
    let word = rest.split_whitespace().next().unwrap();
    parse_time(word.trim_end_matches([',', ';', '.', ')']))
}

fn markers(pg: &syncbridge_tests::pg::PgCluster) -> BTreeSet<u32> {
    pg.sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect()
}

/// Restores to `to` (a time) and returns the markers the restored server holds.
fn pg_restore_markers(env: &Env, version: PgVersion, to: &str) -> BTreeSet<u32> {
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &["--to-time", to]);
    assert!(out.status.success(), "restore to {to}: {}", text(&out));
    let restored = start_restored(version, &dirs.data());
    markers(&restored)
}

/// Three base backups with marker rows between them: marker `i` before backup `i`, marker
/// `10 + i` after it, then a quiet moment `times[i]` (every marker up to it committed,
/// none after it); marker 99 last. Returns the backup ids and the moments.
fn three_backups(env: &Env, extra: &[&str], pin_first: bool) -> (Vec<String>, Vec<String>) {
    env.pg.sql_blocking("CREATE TABLE marker(id int)");
    let mut backups = Vec::new();
    let mut times = Vec::new();
    for i in 0..3 {
        env.pg
            .sql_blocking(&format!("INSERT INTO marker VALUES ({i})"));
        let mut args = extra.to_vec();
        if pin_first && i == 0 {
            args.push("--pin");
        }
        let out = env.backup(&args);
        if pin_first && i == 0 {
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("(complete, pinned)"),
                "{}",
                text(&out)
            );
        }
        let v = list_json(&env.repo_url());
        backups.push(ids(&v, "postgres", "backups")[i].clone());
        env.pg
            .sql_blocking(&format!("INSERT INTO marker VALUES ({})", 10 + i));
        std::thread::sleep(Duration::from_millis(400));
        times.push(now_text());
        std::thread::sleep(Duration::from_millis(400));
        env.pg.query_one_blocking("SELECT pg_switch_wal()");
    }
    // A commit after the last moment, so recovery can stop at it.
    env.pg.sql_blocking("INSERT INTO marker VALUES (99)");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    (backups, times)
}

#[test]
fn pg15_pinned_backup_survives_expire_until_unpinned() {
    let version = PgVersion::V15;
    let env = Env::simple(version);
    let (b, times) = three_backups(&env, &[], true);
    let url = env.repo_url();
    let before = list_json(&url);
    assert!(pinned(&before, "postgres", "backups", &b[0]));
    assert!(!pinned(&before, "postgres", "backups", &b[1]));
    let listing = run_ok(&["list", "--repo", &url]);
    assert!(
        listing
            .lines()
            .any(|l| l.contains(b[0].as_str()) && l.ends_with("PINNED")),
        "{listing}"
    );

    // --keep-full 1 keeps the newest and the pinned oldest; the one between goes.
    let out = run_ok(&["expire", "--repo", &url, "--keep-full", "1"]);
    assert!(
        out.contains(&format!("keep    backup {} (pinned)", b[0])),
        "{out}"
    );
    assert!(out.contains(&format!("expire  backup {}", b[1])), "{out}");
    let after = list_json(&url);
    assert_eq!(
        ids(&after, "postgres", "backups"),
        [b[0].clone(), b[2].clone()]
    );
    assert!(after["postgres"]["wal"][0]["holes"]
        .as_array()
        .unwrap()
        .is_empty());
    // The pinned backup still restores its moments (the WAL from its start is kept).
    assert_eq!(
        pg_restore_markers(&env, version, &times[0]),
        [0, 10].into_iter().collect()
    );

    // Unpin it, pin the newest instead: the next expire removes the old one.
    let out = run_ok(&["backup", "unpin", "--repo", &url, &b[0]]);
    assert!(
        out.contains(&format!("unpinned base backup {}", b[0])),
        "{out}"
    );
    let out = run_ok(&["backup", "unpin", "--repo", &url, &b[0]]);
    assert!(out.contains("was not pinned"), "{out}");
    run_ok(&["backup", "pin", "--repo", &url, &b[2]]);
    let out = run(&["backup", "pin", "--repo", &url, "20000101T000000Z"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("no complete base backup 20000101T000000Z"),
        "{}",
        text(&out)
    );
    let mid = list_json(&url);
    assert!(!pinned(&mid, "postgres", "backups", &b[0]));
    assert!(pinned(&mid, "postgres", "backups", &b[2]));
    let out = run_ok(&["expire", "--repo", &url, "--keep-full", "1"]);
    assert!(out.contains(&format!("expire  backup {}", b[0])), "{out}");
    let last = list_json(&url);
    assert_eq!(ids(&last, "postgres", "backups"), [b[2].clone()]);
    assert!(pinned(&last, "postgres", "backups", &b[2]));
    assert_eq!(
        files_under(&env.repo_path().join(format!("postgres/base/{}", b[0]))),
        0
    );
}

/// A base backup pinned while `expire` is removing an older one stays, and so does the WAL
/// it restores with: the WAL to remove is decided again from the backups actually removed
/// (planned from `--keep-full 1`, it would have gone up to the newest backup's start).
#[test]
fn pg15_backup_pinned_while_expire_runs_keeps_its_wal() {
    let version = PgVersion::V15;
    let env = Env::simple(version);
    // 1 MiB data objects: removing the oldest backup takes a while with the test hook.
    let (b, times) = three_backups(&env, &["--chunk-mib", "1"], false);
    let url = env.repo_url();
    let dir0 = env.repo_path().join(format!("postgres/base/{}", b[0]));
    let mut expire = AgentProcess::spawn_env(
        &["expire", "--repo", &url, "--keep-full", "1"],
        env.dir.path().join("expire.log"),
        &[(
            "SYNCBRIDGE_TEST_DELETE_DELAY_MS".to_string(),
            "300".to_string(),
        )],
    );
    // The oldest is being removed; the second's turn comes next: pin it now.
    assert!(
        wait_until(Duration::from_secs(60), || !dir0
            .join("backup.json")
            .exists()),
        "{}",
        expire.log_text()
    );
    run_ok(&["backup", "pin", "--repo", &url, &b[1]]);
    assert!(
        wait_until(Duration::from_secs(120), || expire.exited().is_some()),
        "{}",
        expire.log_text()
    );
    let log = expire.log_text();
    assert!(
        log.contains(&format!(
            "keep    backup {} (pinned while expire ran)",
            b[1]
        )),
        "{log}"
    );
    assert!(log.contains("expired 1 backups"), "{log}");
    let v = list_json(&url);
    assert_eq!(ids(&v, "postgres", "backups"), [b[1].clone(), b[2].clone()]);
    assert!(pinned(&v, "postgres", "backups", &b[1]));
    assert_eq!(files_under(&dir0), 0);
    // The WAL from the pinned backup's start on is all there; only older WAL went.
    let start =
        pg_pitr_support::parse_lsn(v["postgres"]["backups"][0]["start_lsn"].as_str().unwrap());
    let segs = repo::listing(&url).0;
    let segno = |s: &str| {
        u64::from_str_radix(&s[16..24], 16).unwrap()
            + (u64::from_str_radix(&s[8..16], 16).unwrap() << 8)
    };
    assert!(segs.iter().any(|s| segno(s) == start >> 24), "{segs:?}");
    assert!(segs.iter().all(|s| segno(s) >= start >> 24), "{segs:?}");
    assert!(pg_support::contiguous(&segs), "{segs:?}");
    run_ok(&["verify", "--repo", &url]);
    assert_eq!(
        pg_restore_markers(&env, version, &times[1]),
        [0, 1, 10, 11].into_iter().collect()
    );
}

#[test]
fn redis_pinned_generation_survives_expire_until_unpinned() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let mut c = server.connect();
    for i in 0..3 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".to_string()])
            .unwrap();
        run_ok(&[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &url,
        ]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let g = ids(&list_json(&url), "redis", "generations");
    assert_eq!(g.len(), 3);
    let out = run_ok(&["backup", "pin", "--repo", &url, &g[0]]);
    assert!(
        out.contains(&format!("pinned generation {}", g[0])),
        "{out}"
    );
    let v = list_json(&url);
    assert!(pinned(&v, "redis", "generations", &g[0]));
    assert!(!pinned(&v, "redis", "generations", &g[2]));
    let out = run_ok(&["expire", "--repo", &url, "--keep-full", "1"]);
    assert!(
        out.contains(&format!("keep    generation {} (pinned)", g[0])),
        "{out}"
    );
    assert_eq!(
        ids(&list_json(&url), "redis", "generations"),
        [g[0].clone(), g[2].clone()]
    );
    run_ok(&["backup", "unpin", "--repo", &url, &g[0]]);
    run_ok(&["expire", "--repo", &url, "--keep-full", "1"]);
    assert_eq!(
        ids(&list_json(&url), "redis", "generations"),
        [g[2].clone()]
    );
    assert_eq!(
        files_under(&dir.path().join(format!("repo/redis/gen/{}", g[0]))),
        0
    );

    // A pin set while expire runs still holds: the pin is read again before each removal.
    for i in 3..6 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".to_string()])
            .unwrap();
        run_ok(&[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &url,
        ]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let g = ids(&list_json(&url), "redis", "generations");
    assert_eq!(g.len(), 4);
    let mut expire = AgentProcess::spawn_env(
        &["expire", "--repo", &url, "--keep-full", "1"],
        dir.path().join("expire.log"),
        &[(
            "SYNCBRIDGE_TEST_DELETE_DELAY_MS".to_string(),
            "2000".to_string(),
        )],
    );
    let gen0 = dir.path().join(format!("repo/redis/gen/{}", g[0]));
    assert!(
        wait_until(Duration::from_secs(30), || !gen0
            .join("generation.json")
            .exists()),
        "{}",
        expire.log_text()
    );
    run_ok(&["backup", "pin", "--repo", &url, &g[1]]);
    assert!(
        wait_until(Duration::from_secs(60), || expire.exited().is_some()),
        "{}",
        expire.log_text()
    );
    let log = expire.log_text();
    assert!(
        log.contains(&format!(
            "keep    generation {} (pinned while expire ran)",
            g[1]
        )),
        "{log}"
    );
    assert_eq!(
        ids(&list_json(&url), "redis", "generations"),
        [g[1].clone(), g[3].clone()]
    );
}

#[test]
fn pg15_expire_killed_mid_delete_leaves_no_false_backup_and_the_next_run_finishes() {
    let version = PgVersion::V15;
    let env = Env::simple(version);
    // 1 MiB data objects: the oldest backup has a few dozen, so a kill lands mid-way.
    let (b, times) = three_backups(&env, &["--chunk-mib", "1"], false);
    let url = env.repo_url();
    let dir0 = env.repo_path().join(format!("postgres/base/{}", b[0]));
    let n0 = files_under(&dir0);
    assert!(n0 >= 8, "{n0} objects in backup {}", b[0]);

    let mut expire = AgentProcess::spawn_env(
        &["expire", "--repo", &url, "--keep-full", "1"],
        env.dir.path().join("expire.log"),
        &[(
            "SYNCBRIDGE_TEST_DELETE_DELAY_MS".to_string(),
            "300".to_string(),
        )],
    );
    let mid = wait_until(Duration::from_secs(60), || {
        !dir0.join("backup.json").exists() && files_under(&dir0) + 2 <= n0
    });
    expire.kill9();
    assert!(mid, "expire never got going:\n{}", expire.log_text());
    let left = files_under(&dir0);
    assert!(
        left > 0,
        "expire finished before the kill:\n{}",
        expire.log_text()
    );
    // The tombstone says an expire was removing it.
    assert!(dir0.join("expiring").exists());

    // The half-deleted backup is not complete; the others are untouched; the objects that
    // are left are intact.
    let v = list_json(&url);
    assert_eq!(ids(&v, "postgres", "backups"), [b[1].clone(), b[2].clone()]);
    assert_eq!(ids(&v, "postgres", "incomplete_backups"), [b[0].clone()]);
    let listing = run_ok(&["list", "--repo", &url]);
    assert!(
        listing.contains(&format!("{}  incomplete", b[0])),
        "{listing}"
    );
    run_ok(&["repo", "check", "--repo", &url]);
    run_ok(&["verify", "--repo", &url]);
    // Every backup still listed restores its moments exactly.
    assert_eq!(
        pg_restore_markers(&env, version, &times[1]),
        [0, 1, 10, 11].into_iter().collect()
    );

    // An incomplete directory without a tombstone, freshly written, may be a backup still
    // being written (one overlapping another): the next run leaves it alone.
    let busy = env.repo_path().join("postgres/base/20000101T000000Z/data");
    std::fs::create_dir_all(&busy).unwrap();
    let some_chunk =
        std::fs::read_dir(env.repo_path().join(format!("postgres/base/{}/data", b[2])))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
    std::fs::copy(&some_chunk, busy.join(some_chunk.file_name().unwrap())).unwrap();

    // The next run removes the leftovers and finishes the job.
    let out = run_ok(&["expire", "--repo", &url, "--keep-full", "1"]);
    assert!(out.contains("leave   20000101T000000Z"), "{out}");
    assert_eq!(files_under(busy.parent().unwrap()), 1);
    assert!(
        out.contains(&format!("remove  {} (left by an interrupted expire", b[0])),
        "{out}"
    );
    assert!(out.contains(&format!("expire  backup {}", b[1])), "{out}");
    let v = list_json(&url);
    assert_eq!(ids(&v, "postgres", "backups"), [b[2].clone()]);
    assert_eq!(
        ids(&v, "postgres", "incomplete_backups"),
        ["20000101T000000Z"]
    );
    assert_eq!(files_under(&dir0), 0);
    std::fs::remove_dir_all(busy.parent().unwrap()).unwrap();
    let newest = &v["postgres"]["backups"][0];
    let cut = pg_pitr_support::parse_lsn(newest["start_lsn"].as_str().unwrap()) >> 24;
    let segs = repo::listing(&url).0;
    let segno = |s: &str| {
        u64::from_str_radix(&s[16..24], 16).unwrap()
            + (u64::from_str_radix(&s[8..16], 16).unwrap() << 8)
    };
    assert!(segs.iter().all(|s| segno(s) >= cut), "{segs:?}");
    assert!(pg_support::contiguous(&segs), "{segs:?}");
    run_ok(&["repo", "check", "--repo", &url]);
    run_ok(&["verify", "--repo", &url]);
    assert_eq!(
        pg_restore_markers(&env, version, &times[2]),
        [0, 1, 2, 10, 11, 12].into_iter().collect()
    );
    // Before the kept backup: refused, naming the earliest restorable time.
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &["--to-time", &times[1]]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        earliest_named(&String::from_utf8_lossy(&out.stderr)),
        parse_time(newest["stop_time"].as_str().unwrap()),
        "{}",
        text(&out)
    );
}

#[test]
fn redis_expire_killed_mid_delete_leaves_no_false_generation_and_the_next_run_finishes() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let mut c = server.connect();
    for i in 0..4 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".to_string()])
            .unwrap();
        run_ok(&[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &url,
        ]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = list_json(&url);
    let g = ids(&before, "redis", "generations");
    assert_eq!(g.len(), 4);
    let gen0 = dir.path().join(format!("repo/redis/gen/{}", g[0]));
    let mut expire = AgentProcess::spawn_env(
        &["expire", "--repo", &url, "--keep-full", "2"],
        dir.path().join("expire.log"),
        &[(
            "SYNCBRIDGE_TEST_DELETE_DELAY_MS".to_string(),
            "3000".to_string(),
        )],
    );
    let mid = wait_until(Duration::from_secs(30), || {
        !gen0.join("generation.json").exists()
    });
    expire.kill9();
    assert!(mid, "expire never got going:\n{}", expire.log_text());
    assert!(
        gen0.join("snapshot.rdb").exists() && gen0.join("expiring").exists(),
        "{}",
        expire.log_text()
    );
    let v = list_json(&url);
    assert_eq!(ids(&v, "redis", "generations"), &g[1..]);
    assert_eq!(ids(&v, "redis", "incomplete_generations"), [g[0].clone()]);
    run_ok(&["repo", "check", "--repo", &url]);
    run_ok(&["verify", "--repo", &url]);
    run_ok(&["redis", "verify", "--repo", &url]);

    let out = run_ok(&["expire", "--repo", &url, "--keep-full", "2"]);
    assert!(out.contains(&format!("remove  {}", g[0])), "{out}");
    let v = list_json(&url);
    assert_eq!(ids(&v, "redis", "generations"), &g[2..]);
    assert!(ids(&v, "redis", "incomplete_generations").is_empty());
    assert_eq!(files_under(&gen0), 0);
    // The newest restores; a moment of an expired generation is refused, naming the
    // earliest restorable time.
    let target = dir.path().join("restored");
    run_ok(&[
        "restore",
        "--repo",
        &url,
        "--target",
        target.to_str().unwrap(),
    ]);
    let t1 = parse_time(
        before["redis"]["generations"][1]["snapshot_time"]
            .as_str()
            .unwrap(),
    );
    let out = run(&[
        "redis",
        "restore",
        "--repo",
        &url,
        "--target",
        dir.path().join("refused").to_str().unwrap(),
        "--to-time",
        &format!("@{}", t1.timestamp_millis()),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        earliest_named(&String::from_utf8_lossy(&out.stderr)),
        parse_time(
            v["redis"]["generations"][0]["snapshot_time"]
                .as_str()
                .unwrap()
        ),
        "{}",
        text(&out)
    );
}
