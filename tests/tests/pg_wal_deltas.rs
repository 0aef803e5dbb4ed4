//! Issue 12: a segment in progress is stored as a chain of delta objects, so low RPO costs
//! what is new. On a real PostgreSQL 15:
//! * the trickle workload (small commits, 20 a second) costs at most 3× the WAL produced
//!   in bytes the agent writes, in default and in synchronous mode; default mode writes at
//!   most 2 objects a second; a synchronous commit waits for about one delta write;
//! * kill -9 during a synchronous trickle loses no acknowledged commit: `restore` of the
//!   latest point has every one, through a segment that exists only as deltas;
//! * wal-fetch of that segment gives the bytes of `pg_wal`, a missing middle delta is exit
//!   200 naming it, and once the segment completes it is byte-identical and its deltas are gone;
//! * at a moderate WAL rate the complete segment is written from its deltas' frames (zstd and
//!   LZ4), and reads back as `pg_wal`'s bytes through the library, wal-fetch and `repo check`;
//!   `verify` passes and `restore` replays through such segments.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_pitr_support::{parse_lsn, start_restored, Env, RestoreDirs};
use pg_support::{agent, repo, text, wait_until, AgentProcess};
use storage::layout::{self, WalObject};
use storage::{RepoOptions, Repository};
use syncbridge_tests::pg::{PgCluster, PgVersion};

const VERSION: PgVersion = PgVersion::V15;
const SEG: u64 = 16 << 20;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Bytes the process passed to write(2) so far: repository objects, its log and its
/// status messages to the server (an upper bound of what it wrote to the repository).
fn written_by(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The delta objects of `segment` in the repository, as (start, end).
fn deltas_of(url: &str, segment: &str) -> Vec<(u32, u32)> {
    let repo = Repository::open(url, RepoOptions::default()).unwrap();
    let mut out: Vec<(u32, u32)> = block_on(repo.list(&layout::wal_prefix()))
        .unwrap()
        .into_iter()
        .filter_map(|m| match layout::parse_wal_key(&m.key) {
            Some(WalObject::Delta {
                segment: s,
                start,
                end,
            }) if s.as_str() == segment => Some((start, end)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// Starts `postgres stream` with the log at info level (the test counts its bytes). The
/// default lease: a restart after kill -9 takes over at once (the holder's pid is gone), and
/// a short lease would only make a loaded machine's slow renewals look like lost leases.
fn stream(pg: &PgCluster, url: &str, slot: &str, extra: &[&str], log: &Path) -> AgentProcess {
    let src = pg.replication_url();
    let mut args = vec![
        "postgres", "stream", "--source", &src, "--repo", url, "--slot", slot,
    ];
    args.extend_from_slice(extra);
    let env = vec![("SYNCBRIDGE_LOG".to_string(), "info".to_string())];
    AgentProcess::spawn_env(&args, log.to_path_buf(), &env)
}

/// Waits until `application_name` is the synchronous standby.
fn wait_sync(pg: &PgCluster, name: &str, agent: &AgentProcess) {
    pg.sql_blocking(&format!(
        "ALTER SYSTEM SET synchronous_standby_names = '{name}'"
    ));
    pg.sql_blocking("SELECT pg_reload_conf()");
    let ok = wait_until(Duration::from_secs(60), || {
        pg.sql_blocking(&format!(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'"
        ))
        .first()
        .and_then(|r| r[0].clone())
        .as_deref()
            == Some("sync")
    });
    assert!(ok, "{name} never became synchronous:\n{}", agent.log_text());
}

/// Starts a fresh segment and waits until the agent streams into it (its first delta).
fn fresh_segment(pg: &PgCluster, url: &str) -> String {
    pg.sql_blocking("INSERT INTO trickle VALUES (-1)");
    pg.query_one_blocking("SELECT pg_switch_wal()");
    pg.sql_blocking("INSERT INTO trickle VALUES (-2)");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(
        wait_until(Duration::from_secs(60), || !deltas_of(url, &seg).is_empty()),
        "no delta of {seg} appeared"
    );
    seg
}

/// What a trickle run observed.
struct Trickle {
    /// Commits that returned.
    acknowledged: Vec<i64>,
    /// Each commit's duration.
    latencies: Vec<Duration>,
}

/// `rate` single-row commits a second on one connection to `url` until `stop`.
fn trickle(url: String, rate: u32, stop: Arc<AtomicBool>) -> Trickle {
    block_on(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let period = Duration::from_secs(1) / rate;
        let mut next = tokio::time::Instant::now();
        let mut out = Trickle {
            acknowledged: Vec::new(),
            latencies: Vec::new(),
        };
        let mut id = 1i64;
        while !stop.load(Ordering::SeqCst) {
            next += period;
            tokio::time::sleep_until(next.max(tokio::time::Instant::now())).await;
            let t = Instant::now();
            client
                .simple_query(&format!("INSERT INTO trickle(id) VALUES ({id})"))
                .await
                .unwrap();
            out.latencies.push(t.elapsed());
            out.acknowledged.push(id);
            id += 1;
        }
        out
    })
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// One measured trickle of `secs` seconds in a fresh segment.
fn measure(pg: &PgCluster, agent: &AgentProcess, url: &str, secs: u64) -> Measured {
    let seg = fresh_segment(pg, url);
    std::thread::sleep(Duration::from_secs(1));
    let deltas_before = deltas_of(url, &seg).len();
    let lsn0 = parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text"));
    let w0 = written_by(agent.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            stop.store(true, Ordering::SeqCst);
        })
    };
    let t = trickle(pg.superuser_url(), 20, stop);
    timer.join().unwrap();
    let lsn1 = parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text"));
    // Let the last delta land (default mode waits up to --max-lag for it).
    let end_off = (lsn1 % SEG) as u32;
    assert_eq!(lsn1 / SEG, lsn0 / SEG, "the trickle left its segment");
    assert!(
        wait_until(Duration::from_secs(30), || deltas_of(url, &seg)
            .last()
            .is_some_and(|d| d.1 >= end_off)),
        "the trickle's end never became durable:\n{}",
        agent.log_text()
    );
    let w1 = written_by(agent.pid());
    let all = deltas_of(url, &seg);
    let new = &all[deltas_before..];
    // The objects themselves (the rest of what the process wrote: its lease renewals, status
    // messages to the server, its log).
    let root = Path::new(url.strip_prefix("file://").unwrap());
    let name = layout::WalSegmentName::parse(&seg).unwrap();
    let object_bytes: u64 = new
        .iter()
        .map(|(a, b)| {
            let key = layout::wal_delta(&name, *a, *b);
            std::fs::metadata(root.join(key.to_string())).unwrap().len()
        })
        .sum();
    Measured {
        wal: lsn1 - lsn0,
        wrote: w1 - w0,
        object_bytes,
        deltas: new.len(),
        commits: t.acknowledged.len(),
        commit_median: median(&t.latencies),
    }
}

struct Measured {
    /// WAL bytes produced.
    wal: u64,
    /// Bytes the agent passed to write(2).
    wrote: u64,
    /// Bytes of the delta objects stored.
    object_bytes: u64,
    deltas: usize,
    commits: usize,
    commit_median: Duration,
}

impl Measured {
    /// Prints the figures; returns the amplification (bytes written per WAL byte).
    fn report(&self, mode: &str, secs: u64) -> f64 {
        let amp = self.wrote as f64 / self.wal as f64;
        eprintln!(
            "{mode}: {} commits in {secs} s, {} bytes of WAL ({} per commit); the agent wrote {} bytes ({amp:.2}x), \
             of which {} bytes in {} delta objects ({:.2}x, {:.2} objects/s); median commit {:?}",
            self.commits,
            self.wal,
            self.wal / self.commits.max(1) as u64,
            self.wrote,
            self.object_bytes,
            self.deltas,
            self.object_bytes as f64 / self.wal as f64,
            self.deltas as f64 / secs as f64,
            self.commit_median,
        );
        amp
    }
}

#[test]
fn pg15_trickle_costs_what_is_new_in_both_modes() {
    let secs: u64 = std::env::var("SB_TRICKLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let pg = PgCluster::builder(VERSION).wal_keep_size_mb(256).start();
    // A small commit like an application's (a key, a time, a short random note): about
    // 300 bytes of WAL each, as in the measurement (0.4-0.6 MiB per 1,200 commits).
    pg.sql_blocking(
        "CREATE TABLE trickle(id bigint, at timestamptz DEFAULT now(), \
         note text DEFAULT 'trickle ' || md5(random()::text) || md5(random()::text))",
    );
    let dir = tempfile::tempdir().unwrap();

    // Default mode (--max-lag 1s).
    let url = format!("file://{}", dir.path().join("default").display());
    let mut agent = stream(
        &pg,
        &url,
        "sb_default",
        &["--max-lag", "1s"],
        &dir.path().join("default.log"),
    );
    let m = measure(&pg, &agent, &url, secs);
    let amp = m.report("default (--max-lag 1s)", secs);
    assert!(
        amp <= 3.0,
        "default mode wrote {amp:.2}x the WAL\n{}",
        agent.log_text()
    );
    assert!(
        m.deltas as u64 <= 2 * secs + 1,
        "default mode wrote {} deltas in {secs} s",
        m.deltas
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());

    // Synchronous mode, with a long --max-lag: commits must not wait for it.
    let url = format!("file://{}", dir.path().join("sync").display());
    let mut agent = stream(
        &pg,
        &url,
        "sb_sync",
        &[
            "--synchronous",
            "--max-lag",
            "5s",
            "--application-name",
            "sb_sync",
        ],
        &dir.path().join("sync.log"),
    );
    wait_sync(&pg, "sb_sync", &agent);
    // A reference: the median time of one small object write into the same kind of
    // repository, from this process.
    let probe = Repository::open(
        &format!("file://{}", dir.path().join("probe").display()),
        RepoOptions::default(),
    )
    .unwrap();
    let mut one_write = Vec::new();
    block_on(async {
        probe
            .init_marker(&storage::RepoMarker::new(storage::RepoKind::Postgres))
            .await
            .unwrap();
        for i in 0..21 {
            let key = storage::RepoKey::parse(&format!("probe/{i}")).unwrap();
            let t = Instant::now();
            probe
                .put(
                    &key,
                    storage::ContentKind::Other,
                    bytes::Bytes::from(vec![7u8; 300]),
                    storage::PutMode::Overwrite,
                )
                .await
                .unwrap();
            one_write.push(t.elapsed());
        }
    });
    let m = measure(&pg, &agent, &url, secs);
    let amp = m.report("synchronous", secs);
    let write_median = median(&one_write);
    eprintln!(
        "synchronous: median single object write from the test process {write_median:?}; a commit waited {:.1} of them",
        m.commit_median.as_secs_f64() / write_median.as_secs_f64()
    );
    assert!(
        amp <= 3.0,
        "synchronous mode wrote {amp:.2}x the WAL\n{}",
        agent.log_text()
    );
    // Grouped: never more than about one delta per commit (other WAL, e.g. running-xacts
    // records, may add a few), and a commit waits for a write, not for --max-lag.
    assert!(
        m.deltas <= m.commits + m.commits / 5 + 5,
        "{} deltas for {} commits",
        m.deltas,
        m.commits
    );
    assert!(
        m.commit_median < Duration::from_millis(1000),
        "median synchronous commit took {:?} (--max-lag is 5 s)",
        m.commit_median
    );
    pg.sql_blocking("ALTER SYSTEM RESET synchronous_standby_names");
    pg.sql_blocking("SELECT pg_reload_conf()");
    assert!(agent.terminate().success(), "{}", agent.log_text());
}

#[test]
fn pg15_kill9_during_a_synchronous_trickle_keeps_every_acknowledged_commit() {
    let mut env = Env::simple(VERSION);
    env.pg.sql_blocking("CREATE TABLE trickle(id bigint)");
    env.backup(&[]);
    // From here on a synchronous stream (the same slot and repository).
    assert!(env.stream.take().unwrap().terminate().success());
    let url = env.repo_url();
    let sync_args = [
        "--synchronous",
        "--max-lag",
        "5s",
        "--application-name",
        "sb_sync",
    ];
    let log = env.dir.path().join("sync.log");
    let slot = "syncbridge";
    let agent = stream(&env.pg, &url, slot, &sync_args, &log);
    wait_sync(&env.pg, "sb_sync", &agent);
    let tail = fresh_segment(&env.pg, &url);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, url) = (stop.clone(), env.pg.superuser_url());
        std::thread::spawn(move || trickle(url, 20, stop).acknowledged)
    };
    let mut agent = agent;
    std::thread::sleep(Duration::from_secs(3));
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let mut agent = stream(&env.pg, &url, slot, &sync_args, &log);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let acknowledged = writer.join().unwrap();
    agent.kill9();
    assert!(
        acknowledged.len() > 40,
        "only {} commits were acknowledged:\n{}",
        acknowledged.len(),
        agent.log_text()
    );

    // The tail segment exists only as a chain of deltas (continued across the restart).
    let (segs, _, _) = repo::listing(&url);
    assert!(!segs.contains(&tail), "{tail} is already complete");
    let chain = deltas_of(&url, &tail);
    assert!(chain.len() >= 2, "{chain:?}");
    assert_eq!(chain[0].0, 0);
    assert!(chain.windows(2).all(|w| w[0].1 == w[1].0), "{chain:?}");
    let chain_end = chain.last().unwrap().1 as usize;

    // wal-fetch assembles it: pg_wal's bytes up to the chain's end, zeros after.
    let fetched = tempfile::tempdir().unwrap();
    let target = fetched.path().join(&tail);
    let out = agent_cmd_wal_fetch(&url, &tail, &target);
    assert!(out.status.success(), "{}", text(&out));
    let got = std::fs::read(&target).unwrap();
    let server = std::fs::read(env.pg.pg_wal_dir().join(&tail)).unwrap();
    assert_eq!(got.len() as u64, SEG);
    assert!(
        got[..chain_end] == server[..chain_end],
        "assembled deltas differ from pg_wal"
    );
    assert!(got[chain_end..].iter().all(|b| *b == 0), "not zero-padded");

    // A copy of the repository with a middle delta missing: exit 200, naming it.
    let copy = env.dir.path().join("copy");
    let status = std::process::Command::new("cp")
        .args([
            "-a",
            env.repo_path().to_str().unwrap(),
            copy.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let name = layout::WalSegmentName::parse(&tail).unwrap();
    let (a, b) = chain[chain.len() / 2];
    std::fs::remove_file(copy.join(layout::wal_delta(&name, a, b).to_string())).unwrap();
    let copy_url = format!("file://{}", copy.display());
    let target2 = fetched.path().join("missing");
    let out = agent_cmd_wal_fetch(&copy_url, &tail, &target2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(200), "{}", text(&out));
    assert!(
        err.contains("gap") && err.contains(&format!("{tail}.delta.{a:08X}-")),
        "{err}"
    );
    assert!(!target2.exists());

    // An older build's whole partial with the same bytes (the deltas gone) is still read.
    for (a, b) in &chain {
        let key = layout::wal_delta(&name, *a, *b);
        let _ = std::fs::remove_file(copy.join(key.to_string()));
    }
    let old = Repository::open(&copy_url, RepoOptions::default()).unwrap();
    block_on(old.put(
        &layout::wal_partial(&name, chain_end as u32),
        storage::ContentKind::WalPartial,
        bytes::Bytes::copy_from_slice(&got[..chain_end]),
        storage::PutMode::CreateNew,
    ))
    .unwrap();
    let target3 = fetched.path().join("old-partial");
    let out = agent_cmd_wal_fetch(&copy_url, &tail, &target3);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&target3).unwrap() == got,
        "old partial served differently"
    );

    // restore of the latest point (through the deltas) has every acknowledged commit.
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = start_restored(VERSION, &dirs.data());
    let ids: BTreeSet<i64> = restored
        .sql_blocking("SELECT id FROM trickle")
        .into_iter()
        .filter_map(|r| r[0].as_ref().map(|v| v.parse().unwrap()))
        .collect();
    let missing: Vec<&i64> = acknowledged.iter().filter(|i| !ids.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged commits are missing after restore (first {:?})",
        missing.len(),
        acknowledged.len(),
        missing.first()
    );
    eprintln!(
        "kill -9 during a synchronous trickle: {} acknowledged commits, all restored; chain of {} deltas, {chain_end} bytes",
        acknowledged.len(),
        chain.len()
    );
    drop(restored);

    // Once the segment completes it is byte-identical to pg_wal and its deltas are gone.
    env.pg
        .sql_blocking("ALTER SYSTEM RESET synchronous_standby_names");
    env.pg.sql_blocking("SELECT pg_reload_conf()");
    let mut agent = stream(&env.pg, &url, slot, &["--max-lag", "200ms"], &log);
    env.pg.sql_blocking("INSERT INTO trickle VALUES (-3)");
    let done = env
        .pg
        .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert_eq!(done, tail);
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&tail)
            && deltas_of(&url, &tail).is_empty()),
        "{tail} never completed or its deltas stayed:\n{}",
        agent.log_text()
    );
    let stored = repo::segments(&url).remove(&tail).unwrap();
    let server = std::fs::read(env.pg.pg_wal_dir().join(&tail)).unwrap();
    assert!(stored[..] == server[..], "{tail} differs from pg_wal");
    assert!(agent.terminate().success(), "{}", agent.log_text());

    // A delta left behind by a cleanup cut short (the segment is whole) is removed by the
    // next start.
    let leftover = layout::wal_delta(&name, 0, 4096);
    let store = Repository::open(&url, RepoOptions::default()).unwrap();
    block_on(store.put(
        &leftover,
        storage::ContentKind::WalDelta,
        stored.slice(..4096),
        storage::PutMode::CreateNew,
    ))
    .unwrap();
    let agent = stream(&env.pg, &url, slot, &["--max-lag", "200ms"], &log);
    assert!(
        wait_until(Duration::from_secs(60), || !block_on(
            store.exists(&leftover)
        )
        .unwrap()),
        "{leftover} was not removed:\n{}",
        agent.log_text()
    );
}

/// The number of frames of the complete segment `seg` (from its trailer).
fn segment_frames(url: &str, seg: &str) -> u64 {
    let repo = Repository::open(url, RepoOptions::default()).unwrap();
    let key = layout::wal_segment(&layout::WalSegmentName::parse(seg).unwrap());
    block_on(repo.info(&key)).unwrap().frames
}

#[test]
fn pg15_a_segment_shipped_as_deltas_is_stored_from_their_frames() {
    // WAL at a moderate rate (a few MiB/s): the segment goes out as deltas of about a MiB,
    // then whole. Its stored object reuses the deltas' frames (each delta ends in a short
    // frame, so the segment has more than 16 frames of 1 MiB) and reads back as pg_wal's
    // bytes through every reader: the library, wal-fetch and repo check.
    for compression in ["zstd", "lz4"] {
        let pg = PgCluster::builder(VERSION).wal_keep_size_mb(256).start();
        pg.sql_blocking("CREATE TABLE paced(id int, note text)");
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("repo").display());
        let log = dir.path().join("stream.log");
        let args = ["--max-lag", "400ms", "--compression", compression];
        let mut streamer = stream(&pg, &url, "sb_paced", &args, &log);
        pg.sql_blocking("INSERT INTO paced VALUES (0, 'start')");
        pg.query_one_blocking("SELECT pg_switch_wal()");
        pg.sql_blocking("INSERT INTO paced VALUES (0, 'start')");
        let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_current_wal_lsn())");
        let offset =
            || parse_lsn(&pg.query_one_blocking("SELECT pg_current_wal_lsn()::text")) % SEG;
        let mut batch = 0;
        while offset() < 10 << 20 {
            batch += 1;
            pg.sql_blocking(&format!(
                "INSERT INTO paced SELECT g, md5(g::text) || repeat('w', 60) \
                 FROM generate_series({}, {}) g",
                batch * 10_000,
                batch * 10_000 + 7_000
            ));
            std::thread::sleep(Duration::from_millis(350));
        }
        let deltas = deltas_of(&url, &seg).len();
        let done = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
        assert_eq!(done, seg, "the load left its segment");
        assert!(
            wait_until(Duration::from_secs(60), || repo::listing(&url)
                .0
                .contains(&seg)
                && deltas_of(&url, &seg).is_empty()),
            "{seg} never completed or its deltas stayed:\n{}",
            streamer.log_text()
        );
        assert!(streamer.terminate().success(), "{}", streamer.log_text());
        let frames = segment_frames(&url, &seg);
        eprintln!(
            "{compression}: {batch} batches, {deltas}+ deltas, the segment has {frames} frames"
        );
        assert!(deltas >= 3, "{compression}: only {deltas} deltas of {seg}");
        assert!(
            frames > 16,
            "{compression}: {frames} frames: the deltas' frames were not reused"
        );
        let server = std::fs::read(pg.pg_wal_dir().join(&seg)).unwrap();
        let stored = repo::segments(&url).remove(&seg).unwrap();
        assert!(
            stored[..] == server[..],
            "{compression}: {seg} differs from pg_wal"
        );
        let target = dir.path().join(&seg);
        let out = agent_cmd_wal_fetch(&url, &seg, &target);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            std::fs::read(&target).unwrap() == server,
            "{compression}: wal-fetch of {seg} differs from pg_wal"
        );
        let out = agent()
            .args(["repo", "check", "--repo", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn pg15_restore_and_verify_read_segments_stored_from_delta_frames() {
    // A base backup, then WAL at a moderate rate through two segments (the stream's
    // --max-lag 200ms ships deltas of a few hundred KB, whose frames the segments reuse):
    // `verify` checks every object and `restore` replays through them to the last row.
    let mut env = Env::simple(VERSION);
    env.pg.sql_blocking("CREATE TABLE paced(id int, note text)");
    env.backup(&[]);
    let url = env.repo_url();
    let first = env
        .pg
        .query_one_blocking("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let mut rows = 0;
    for batch in 0..24 {
        env.pg.sql_blocking(&format!(
            "INSERT INTO paced SELECT g, md5(g::text) || repeat('w', 60) \
             FROM generate_series({}, {}) g",
            batch * 10_000,
            batch * 10_000 + 9_999
        ));
        rows += 10_000;
        std::thread::sleep(Duration::from_millis(150));
    }
    let last = env
        .pg
        .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    let end = env
        .pg
        .query_one_blocking("SELECT pg_current_wal_lsn()::text");
    env.wait_archived(&end);
    assert!(env.stream.take().unwrap().terminate().success());
    // The segments the load went through are stored whole, with short frames from deltas.
    let (segs, _, _) = repo::listing(&url);
    let loaded: Vec<&String> = segs
        .iter()
        .filter(|s| s.as_str() >= first.as_str() && s.as_str() <= last.as_str())
        .collect();
    assert!(loaded.len() >= 2, "{loaded:?}");
    let reused = loaded
        .iter()
        .filter(|s| segment_frames(&url, s) > 16)
        .count();
    assert!(reused >= 1, "no segment of {loaded:?} reuses delta frames");

    let out = agent().args(["verify", "--repo", &url]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let dirs = RestoreDirs::new();
    let out = env.restore(&dirs.data(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = start_restored(VERSION, &dirs.data());
    let count = restored.query_one_blocking("SELECT count(*) FROM paced");
    assert_eq!(count, rows.to_string(), "rows after restore");
    eprintln!(
        "{} segments stored, {reused} with reused delta frames; {rows} rows restored",
        loaded.len()
    );
}

fn agent_cmd_wal_fetch(url: &str, name: &str, target: &Path) -> std::process::Output {
    agent()
        .args([
            "postgres",
            "wal-fetch",
            "--repo",
            url,
            "--prefetch",
            "0",
            name,
        ])
        .arg(target)
        .output()
        .unwrap()
}
