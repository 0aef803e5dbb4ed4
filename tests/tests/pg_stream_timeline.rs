//! A standby made from a base backup is promoted and the agent is pointed at it: the history
//! file and the new timeline are archived, and the WAL stays continuous across the switch.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{repo, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

fn seq(name: &str) -> u64 {
    let hi = u64::from_str_radix(&name[8..16], 16).unwrap();
    let lo = u64::from_str_radix(&name[16..24], 16).unwrap();
    hi * 256 + lo
}

#[test]
fn promoted_standby_continues_on_the_new_timeline() {
    // pg_basebackup (client programs ship with 15 only here) refuses newer servers.
    let version = PgVersion::V15;
    let mut primary = PgCluster::builder(version).wal_keep_size_mb(1024).start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = primary.replication_url();
    let mut agent = AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &src,
            "--repo",
            &url,
            "--max-lag",
            "200ms",
        ],
        dir.path().join("agent.log"),
    );
    primary.sql_blocking("CREATE TABLE t(id int, pad text)");
    primary
        .sql_blocking("INSERT INTO t SELECT g, repeat('p', 200) FROM generate_series(1, 40000) g");
    let seg = primary.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        agent.log_text()
    );

    // A standby from a base backup, streaming from the primary.
    let standby_dir = primary.temp_dir().join("standby");
    primary.run(
        "pg_basebackup",
        &[
            "-D",
            standby_dir.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    );
    let standby = PgCluster::builder(version)
        .wal_keep_size_mb(1024)
        .existing_data_dir(&standby_dir)
        .start();
    primary
        .sql_blocking("INSERT INTO t SELECT g, repeat('q', 200) FROM generate_series(1, 20000) g");
    let target = primary.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    assert!(
        wait_until(Duration::from_secs(60), || standby.query_one_blocking(
            &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
        ) == "t"),
        "standby did not catch up"
    );
    // The agent has everything the standby has, then both old processes go.
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.terminate().success(), "{}", agent.log_text());
    primary.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    assert!(wait_until(Duration::from_secs(30), || standby
        .query_one_blocking("SELECT pg_is_in_recovery()")
        == "f"));

    // Point the agent at the new primary.
    let src2 = standby.replication_url();
    let agent = AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &src2,
            "--repo",
            &url,
            "--max-lag",
            "200ms",
        ],
        dir.path().join("agent2.log"),
    );
    standby
        .sql_blocking("INSERT INTO t SELECT g, repeat('n', 200) FROM generate_series(1, 40000) g");
    let new_seg = standby.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(new_seg.starts_with("00000002"), "{new_seg}");
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(&url)
            .0
            .contains(&new_seg)),
        "{new_seg} never arrived:\n{}",
        agent.log_text()
    );
    let (segs, parts, hist) = repo::listing(&url);
    assert!(
        hist.contains(&2),
        "no 00000002.history in the repository: {hist:?}\n{}",
        agent.log_text()
    );

    // Continuity: timeline 1 runs without gaps up to the switch segment, timeline 2 from it.
    let tli1: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000001")).collect();
    let tli2: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000002")).collect();
    for w in tli1.windows(2).chain(tli2.windows(2)) {
        assert_eq!(
            seq(w[1]),
            seq(w[0]) + 1,
            "gap between {} and {}",
            w[0],
            w[1]
        );
    }
    let first2 = seq(tli2[0]);
    let last1 = tli1.last().map(|s| seq(s)).unwrap();
    assert_eq!(
        last1 + 1,
        first2,
        "timeline 1 ends at segment {last1:X}, timeline 2 starts at {first2:X}"
    );
    // The history file is archived verbatim, and timeline 2 starts in the switch segment.
    let history = repo::history(&url, 2);
    assert_eq!(
        history[..],
        std::fs::read(standby.pg_wal_dir().join("00000002.history")).unwrap()[..]
    );
    let text = String::from_utf8(history.to_vec()).unwrap();
    let switch = text
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string();
    let (hi, lo) = switch.split_once('/').unwrap();
    let switch_lsn =
        (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap();
    assert_eq!(
        switch_lsn / (16 << 20),
        first2,
        "switch point {switch} is not in the first segment of timeline 2"
    );

    // Byte-identical: timeline 2 against the new primary, timeline 1 against the old one.
    let data = repo::segments(&url);
    for (name, bytes) in &data {
        let dir = if name.starts_with("00000002") {
            standby.pg_wal_dir()
        } else {
            primary.pg_wal_dir()
        };
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bytes[..] == on_disk[..], "{name} differs from pg_wal");
    }
    eprintln!(
        "timeline switch: {} segments on timeline 1, {} on timeline 2, partials {parts:?}",
        tli1.len(),
        tli2.len()
    );
}

#[test]
fn streaming_from_a_standby_follows_its_promotion() {
    let version = PgVersion::V15;
    let mut primary = PgCluster::builder(version).wal_keep_size_mb(1024).start();
    primary.sql_blocking("CREATE TABLE t(id int, pad text)");
    let standby_dir = primary.temp_dir().join("standby");
    primary.run(
        "pg_basebackup",
        &[
            "-D",
            standby_dir.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    );
    let standby = PgCluster::builder(version)
        .wal_keep_size_mb(1024)
        .existing_data_dir(&standby_dir)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = standby.replication_url();
    let mut agent = AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &src,
            "--repo",
            &url,
            "--max-lag",
            "200ms",
        ],
        dir.path().join("agent.log"),
    );
    primary
        .sql_blocking("INSERT INTO t SELECT g, repeat('p', 200) FROM generate_series(1, 40000) g");
    let seg = primary.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        agent.log_text()
    );
    primary.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    standby
        .sql_blocking("INSERT INTO t SELECT g, repeat('n', 200) FROM generate_series(1, 40000) g");
    let new_seg = standby.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(new_seg.starts_with("00000002"), "{new_seg}");
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(&url)
            .0
            .contains(&new_seg)),
        "{new_seg} never arrived:\n{}",
        agent.log_text()
    );
    assert!(agent.exited().is_none(), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(log.contains("end of timeline"), "{log}");
    let (segs, parts, hist) = repo::listing(&url);
    assert!(hist.contains(&2), "{hist:?}");
    let tli1: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000001")).collect();
    let tli2: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000002")).collect();
    assert_eq!(seq(tli1.last().unwrap()) + 1, seq(tli2[0]), "{segs:?}");
    // The old timeline's last segment was finished as a partial up to the switch point.
    let history = String::from_utf8(repo::history(&url, 2).to_vec()).unwrap();
    let switch = history
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string();
    let (hi, lo) = switch.split_once('/').unwrap();
    let switch_lsn =
        (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap();
    let off = (switch_lsn % (16 << 20)) as u32;
    assert!(
        parts
            .iter()
            .any(|(s, o)| s.starts_with("00000001") && seq(s) == seq(tli2[0]) && *o == off),
        "no timeline-1 partial ending at the switch point {switch}: {parts:?}"
    );
    for (name, bytes) in &repo::segments(&url) {
        let on_disk = std::fs::read(standby.pg_wal_dir().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bytes[..] == on_disk[..], "{name} differs from pg_wal");
    }
}
