//! `expire` (issue 13): PostgreSQL with three base backups and marker rows between them,
//! `--keep-full 2` removes the oldest backup and the WAL before the second backup's start;
//! a restore to a moment after the second backup gives exactly the markers committed by
//! then, one before it is refused naming the earliest restorable time; `--dry-run` deletes
//! nothing and says what goes, what stays and the bytes freed, with `--keep-full` and with
//! `--keep-within` (which keeps the backup that restores the window's start). Redis: five generations, `--keep-full 2` keeps exactly the newest two.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use std::collections::BTreeSet;
use std::time::Duration;

use pg_pitr_support::{start_restored, Env, RestoreDirs};
use pg_support::{agent, repo, text};
use serde_json::Value;
use syncbridge_tests::pg::PgVersion;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

/// Files below `dir` (a `file://` store may keep emptied directories).
fn files_under(dir: &std::path::Path) -> usize {
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

/// The time a refusal names as "the earliest restorable time is T".
fn earliest_named(stderr: &str) -> chrono::DateTime<chrono::Utc> {
    let rest = stderr
        .split("the earliest restorable time is ")
        .nth(1)
        .unwrap_or_else(|| panic!("no earliest restorable time named: {stderr}"));
    let word = rest.split_whitespace().next().unwrap();
    parse_time(word.trim_end_matches([',', ';', '.', ')']))
}

fn parse_time(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .to_utc()
}

/// Bytes as the agent prints them (`pg::backup_progress::human`).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn run(args: &[&str]) -> std::process::Output {
    agent().args(args).output().unwrap()
}

fn list_json(url: &str) -> Value {
    let out = run(&["list", "--repo", url, "--output", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn pg16_expire_keep_full_two_keeps_every_moment_after_the_second_backup() {
    let version = PgVersion::V16;
    let env = Env::simple(version);
    env.pg.sql_blocking("CREATE TABLE marker(id int)");
    // Marker `i` before backup `i`, marker `10 + i` after it, then a quiet moment
    // `times[i]`: every marker up to it committed, none after it.
    let mut backups = Vec::new();
    let mut times = Vec::new();
    for i in 0..3 {
        env.pg
            .sql_blocking(&format!("INSERT INTO marker VALUES ({i})"));
        env.backup(&[]);
        backups.push(
            list_json(&env.repo_url())["postgres"]["backups"][i]["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        env.pg
            .sql_blocking(&format!("INSERT INTO marker VALUES ({})", 10 + i));
        std::thread::sleep(Duration::from_millis(400));
        times.push(chrono::Utc::now());
        std::thread::sleep(Duration::from_millis(400));
        env.pg.query_one_blocking("SELECT pg_switch_wal()");
    }
    // A commit after the last moment, so recovery can stop at it.
    env.pg.sql_blocking("INSERT INTO marker VALUES (99)");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let url = env.repo_url();
    let before = list_json(&url);
    let second = &before["postgres"]["backups"][1];
    let second_start = pg_pitr_support::parse_lsn(second["start_lsn"].as_str().unwrap());
    let segs_before = repo::listing(&url).0;

    // --dry-run prints the plan and deletes nothing.
    let out = run(&["expire", "--repo", &url, "--keep-full", "2", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains(&format!("expire  backup {}", backups[0])),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("keep    backup {}", backups[2])),
        "{plan}"
    );
    assert_eq!(repo::listing(&url).0, segs_before);
    // It says how much the expired backup frees.
    let freed = human(
        before["postgres"]["backups"][0]["stored_bytes"]
            .as_u64()
            .unwrap(),
    );
    assert!(
        plan.contains(&format!("1 expired ({freed} of backups)")),
        "{freed}: {plan}"
    );
    // --keep-within with the window starting at `times[1]` (after the second backup ended,
    // before the third began): the second backup is kept as the one that restores the
    // window's start, the third as the newest, the first goes.
    let window = (chrono::Utc::now() - times[1]).num_milliseconds();
    let out = run(&[
        "expire",
        "--repo",
        &url,
        "--keep-within",
        &format!("{window}ms"),
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains(&format!(
            "keep    backup {} (restores the start of --keep-within)",
            backups[1]
        )),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("keep    backup {} (newest)", backups[2])),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("expire  backup {}", backups[0])),
        "{plan}"
    );
    assert_eq!(repo::listing(&url).0, segs_before);
    // No policy: refused.
    let out = run(&["expire", "--repo", &url]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--keep-full"),
        "{}",
        text(&out)
    );

    let out = run(&["expire", "--repo", &url, "--keep-full", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = list_json(&url);
    let ids: Vec<&str> = after["postgres"]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [backups[1].as_str(), backups[2].as_str()]);
    assert!(after["postgres"]["incomplete_backups"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        files_under(
            &env.repo_path()
                .join(format!("postgres/base/{}", backups[0]))
        ),
        0
    );
    // The WAL before the second backup's start is gone, the rest is there without a hole.
    let segs_after = repo::listing(&url).0;
    let segno = |s: &str| {
        u64::from_str_radix(&s[16..24], 16).unwrap()
            + (u64::from_str_radix(&s[8..16], 16).unwrap() << 8)
    };
    let cut = second_start >> 24;
    assert!(segs_after.iter().all(|s| segno(s) >= cut), "{segs_after:?}");
    assert!(segs_before.iter().any(|s| segno(s) < cut));
    assert!(pg_support::contiguous(&segs_after), "{segs_after:?}");
    assert!(after["postgres"]["wal"][0]["holes"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        after["restorable"]["first_time"],
        before["postgres"]["backups"][1]["stop_time"]
    );

    // The latest point still restores every marker; a moment before the second backup
    // ended is refused.
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = start_restored(version, &dirs.data());
    let got: BTreeSet<u32> = restored
        .sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, [0, 1, 2, 10, 11, 12, 99].into_iter().collect());
    drop(restored);
    // A moment after the second backup (now the oldest): exactly the markers committed by
    // then.
    let t1 = times[1].to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &["--to-time", &t1]);
    assert!(out.status.success(), "restore to {t1}: {}", text(&out));
    let restored = start_restored(version, &dirs.data());
    let got: BTreeSet<u32> = restored
        .sql_blocking("SELECT id FROM marker")
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, [0, 1, 10, 11].into_iter().collect(), "at {t1}");
    drop(restored);
    let early = before["postgres"]["backups"][0]["stop_time"]
        .as_str()
        .unwrap();
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &["--to-time", early]);
    assert!(
        !out.status.success(),
        "restore before the oldest kept backup passed:\n{}",
        text(&out)
    );
    // The refusal names the earliest restorable time: the end of the oldest kept backup.
    assert_eq!(
        earliest_named(&String::from_utf8_lossy(&out.stderr)),
        parse_time(second["stop_time"].as_str().unwrap()),
        "{}",
        text(&out)
    );

    // The expired repository verifies: every object, both kept backups, WAL from the oldest
    // kept backup's start.
    let out = run(&["verify", "--repo", &url]);
    assert!(out.status.success(), "verify after expire: {}", text(&out));

    // A second run finds nothing more to do.
    let out = run(&["expire", "--repo", &url, "--keep-full", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 expired"),
        "{}",
        text(&out)
    );
}

#[test]
fn redis_expire_keep_full_two_keeps_the_newest_two_generations() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let mut c = server.connect();
    for i in 0..5 {
        c.cmd(&["SET".to_string(), format!("k{i}"), "v".to_string()])
            .unwrap();
        let out = run(&[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &url,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = list_json(&url);
    let gens: Vec<String> = before["redis"]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(gens.len(), 5);
    let out = run(&["expire", "--repo", &url, "--keep-full", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = list_json(&url);
    let kept: Vec<&str> = after["redis"]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, [gens[3].as_str(), gens[4].as_str()]);
    for g in &gens[..3] {
        let left = files_under(&dir.path().join(format!("repo/redis/gen/{g}")));
        assert_eq!(left, 0, "{g} left behind");
    }
    // The newest still restores.
    let target = dir.path().join("restored");
    let out = run(&[
        "restore",
        "--repo",
        &url,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // A hostile bucket writer swaps the two kept generations' manifests: every reader of
    // the catalog refuses, naming the swapped object, and nothing is restored.
    let manifest = |g: &str| {
        dir.path()
            .join(format!("repo/redis/gen/{g}/generation.json"))
    };
    let (a, b) = (manifest(&gens[3]), manifest(&gens[4]));
    let a_bytes = std::fs::read(&a).unwrap();
    std::fs::copy(&b, &a).unwrap();
    std::fs::write(&b, a_bytes).unwrap();
    let swapped = format!("redis/gen/{}/generation.json", gens[3]);
    let target = dir.path().join("restored-after-swap");
    for args in [
        vec!["list", "--repo", &url],
        vec![
            "restore",
            "--repo",
            &url,
            "--target",
            target.to_str().unwrap(),
        ],
        vec!["expire", "--repo", &url, "--keep-full", "1", "--dry-run"],
    ] {
        let out = run(&args);
        assert!(
            !out.status.success(),
            "{args:?} accepted a swapped manifest: {}",
            text(&out)
        );
        assert!(text(&out).contains(&swapped), "{args:?}: {}", text(&out));
    }
    assert_eq!(
        files_under(&target),
        0,
        "a restore wrote files from a swapped manifest"
    );
}
