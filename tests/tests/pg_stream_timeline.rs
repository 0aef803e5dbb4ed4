//! A standby made from a base backup is promoted and the agent is pointed at it: the history
//! file and the new timeline are archived, and the WAL stays continuous across the switch.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{repo, standby_of, stream_args, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

fn seq(name: &str) -> u64 {
    let hi = u64::from_str_radix(&name[8..16], 16).unwrap();
    let lo = u64::from_str_radix(&name[16..24], 16).unwrap();
    hi * 256 + lo
}

/// `postgres stream` from `src` into `url`.
fn stream_agent(src: &str, url: &str, log: std::path::PathBuf) -> AgentProcess {
    AgentProcess::spawn(&stream_args(src, url), log)
}

/// The LSN where timeline 2 begins, from the archived `00000002.history`, as text and number.
fn switch_point(url: &str) -> (String, u64) {
    let history = String::from_utf8(repo::history(url, 2).to_vec()).unwrap();
    let switch = history
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string();
    let (hi, lo) = switch.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap();
    (switch, lsn)
}

/// Writes on `pg`, switches segment and waits until the agent, still running, has
/// archived that segment, which must be on the timeline `tli_hex` (8 hex digits).
fn write_and_wait_archived(pg: &PgCluster, url: &str, agent: &mut AgentProcess, tli_hex: &str) {
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('w', 200) FROM generate_series(1, 40000) g");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(seg.starts_with(tli_hex), "{seg}");
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(url)
            .0
            .contains(&seg)),
        "{seg} never arrived:\n{}",
        agent.log_text()
    );
    assert!(agent.exited().is_none(), "{}", agent.log_text());
}

#[test]
fn promoted_standby_continues_on_the_new_timeline() {
    // pg_basebackup (client programs ship with 15 only here) refuses newer servers.
    let version = PgVersion::V15;
    let mut primary = PgCluster::builder(version).wal_keep_size_mb(1024).start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = primary.replication_url();
    let mut agent = stream_agent(&src, &url, dir.path().join("agent.log"));
    primary.sql_blocking("CREATE TABLE t(id int, pad text)");
    write_and_wait_archived(&primary, &url, &mut agent, "00000001");

    // A standby from a base backup, streaming from the primary.
    let standby = standby_of(&primary, version);
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
    let mut agent = stream_agent(&src2, &url, dir.path().join("agent2.log"));
    write_and_wait_archived(&standby, &url, &mut agent, "00000002");
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
    let (switch, switch_lsn) = switch_point(&url);
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
    let standby = standby_of(&primary, version);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = standby.replication_url();
    // Streaming from a standby on purpose (cascading replication): --on-standby stream.
    let mut args = stream_args(&src, &url);
    args.extend(["--on-standby", "stream"]);
    let mut agent = AgentProcess::spawn(&args, dir.path().join("agent.log"));
    write_and_wait_archived(&primary, &url, &mut agent, "00000001");
    primary.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    write_and_wait_archived(&standby, &url, &mut agent, "00000002");
    let log = agent.log_text();
    assert!(log.contains("end of timeline"), "{log}");
    let (segs, parts, hist) = repo::listing(&url);
    assert!(hist.contains(&2), "{hist:?}");
    let tli1: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000001")).collect();
    let tli2: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000002")).collect();
    assert_eq!(seq(tli1.last().unwrap()) + 1, seq(tli2[0]), "{segs:?}");
    // The old timeline's last segment was finished as a partial up to the switch point.
    let (switch, switch_lsn) = switch_point(&url);
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

/// A source listing both nodes with `target_session_attrs=read-write`, as a Patroni user
/// would write it: the agent streams from the primary, and when the primary goes and the
/// standby is promoted it finds the new primary by itself, without a restart, and the
/// repository stays continuous across the timeline switch.
#[test]
fn multi_host_source_follows_a_failover_without_restart() {
    let version = PgVersion::V15;
    let mut primary = PgCluster::builder(version).wal_keep_size_mb(1024).start();
    primary.sql_blocking("CREATE TABLE t(id int, pad text)");
    let standby = standby_of(&primary, version);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("repo").display());
    // The standby is listed first: read-write must skip it while it is a standby.
    let src = primary.replication_url().replace(
        &format!("127.0.0.1:{}", primary.port()),
        &format!("127.0.0.1:{},127.0.0.1:{}", standby.port(), primary.port()),
    ) + "?target_session_attrs=read-write";
    let mut agent = stream_agent(&src, &url, dir.path().join("agent.log"));
    write_and_wait_archived(&primary, &url, &mut agent, "00000001");
    // The slot is on the primary, not the standby.
    assert_eq!(
        primary.query_one_blocking(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'syncbridge' AND active"
        ),
        "1",
        "{}",
        agent.log_text()
    );
    assert_eq!(
        standby.query_one_blocking("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    let target = primary.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    assert!(
        wait_until(Duration::from_secs(60), || standby.query_one_blocking(
            &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")
        ) == "t"),
        "standby did not catch up"
    );

    // Failover: the primary stops (a fast shutdown sends the standby everything), the
    // standby is promoted. The agent keeps running.
    primary.stop();
    assert_eq!(standby.query_one_blocking("SELECT pg_promote()"), "t");
    assert!(wait_until(Duration::from_secs(30), || standby
        .query_one_blocking("SELECT pg_is_in_recovery()")
        == "f"));
    write_and_wait_archived(&standby, &url, &mut agent, "00000002");
    let (segs, _parts, hist) = repo::listing(&url);
    assert!(hist.contains(&2), "{hist:?}\n{}", agent.log_text());
    let tli1: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000001")).collect();
    let tli2: Vec<&String> = segs.iter().filter(|s| s.starts_with("00000002")).collect();
    for w in tli1.windows(2).chain(tli2.windows(2)) {
        assert_eq!(seq(w[1]), seq(w[0]) + 1, "gap: {segs:?}");
    }
    assert_eq!(seq(tli1.last().unwrap()) + 1, seq(tli2[0]), "{segs:?}");
    for (name, bytes) in &repo::segments(&url) {
        let dir = if name.starts_with("00000002") {
            standby.pg_wal_dir()
        } else {
            primary.pg_wal_dir()
        };
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bytes[..] == on_disk[..], "{name} differs from pg_wal");
    }
    assert!(agent.terminate().success(), "{}", agent.log_text());
}
