//! `postgres stream` against real PostgreSQL: the repository's WAL is byte-identical to the
//! server's `pg_wal`, survives kill -9, and `--synchronous` makes commits wait for it.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{repo, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

struct Setup {
    pg: PgCluster,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(version: PgVersion) -> Setup {
        let pg = PgCluster::builder(version).wal_keep_size_mb(2048).start();
        Setup {
            pg,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn repo_url(&self) -> String {
        format!("file://{}", self.dir.path().join("repo").display())
    }

    fn start_agent(&self, extra: &[&str]) -> AgentProcess {
        let url = self.pg.replication_url();
        let repo = self.repo_url();
        let mut args = vec![
            "postgres",
            "stream",
            "--source",
            url.as_str(),
            "--repo",
            repo.as_str(),
            "--max-lag",
            "200ms",
        ];
        args.extend_from_slice(extra);
        AgentProcess::spawn(&args, self.dir.path().join("agent.log"))
    }

    /// Inserts `rows` padded rows, then switches WAL; returns the completed segment's name.
    fn load_and_switch(&self, rows: u32) -> String {
        self.pg.sql_blocking(&format!(
            "CREATE TABLE IF NOT EXISTS load(id int, pad text); INSERT INTO load SELECT g, repeat('x', 200) FROM generate_series(1, {rows}) g;"
        ));
        self.pg
            .query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())")
    }

    fn wait_for_segment(&self, agent: &mut AgentProcess, name: &str) {
        let url = self.repo_url();
        let ok = wait_until(Duration::from_secs(120), || {
            assert!(
                agent.exited().is_none(),
                "agent exited:\n{}",
                agent.log_text()
            );
            // Uploads run concurrently: a later segment may land before an earlier one, so
            // wait until everything up to `name` is there.
            let segs = repo::listing(&url).0;
            segs.iter().any(|s| s.as_str() >= name) && contiguous(&segs)
        });
        assert!(
            ok,
            "segment {name} never reached the repository:\n{}",
            agent.log_text()
        );
    }

    /// Every complete segment in the repository equals pg_wal's, and there is no gap.
    fn assert_identical_and_contiguous(&self) -> usize {
        let segs = repo::segments(&self.repo_url());
        assert!(!segs.is_empty());
        let names: Vec<&String> = segs.keys().collect();
        for w in names.windows(2) {
            let a = u64::from_str_radix(&w[0][8..], 16).unwrap();
            let b = u64::from_str_radix(&w[1][8..], 16).unwrap();
            // 16 MiB segments: 256 per xlogid
            let seq = |x: u64| (x >> 32) * 256 + (x & 0xFFFF_FFFF);
            assert_eq!(seq(b), seq(a) + 1, "gap between {} and {}", w[0], w[1]);
        }
        for (name, data) in &segs {
            let on_server = std::fs::read(self.pg.pg_wal_dir().join(name))
                .unwrap_or_else(|e| panic!("pg_wal/{name}: {e}"));
            assert_eq!(data.len(), on_server.len(), "{name} length");
            assert!(data[..] == on_server[..], "{name} differs from pg_wal");
        }
        segs.len()
    }
}

/// Whether the (sorted, one-timeline, 16 MiB) segment names have no gap.
fn contiguous(names: &[String]) -> bool {
    let seq = |n: &str| {
        u64::from_str_radix(&n[8..16], 16).unwrap() * 256
            + u64::from_str_radix(&n[16..24], 16).unwrap()
    };
    names.windows(2).all(|w| seq(&w[1]) == seq(&w[0]) + 1)
}

fn byte_identical(version: PgVersion, batches: u32, rows: u32) {
    let s = Setup::new(version);
    let mut agent = s.start_agent(&[]);
    let mut last = String::new();
    for _ in 0..batches {
        last = s.load_and_switch(rows);
    }
    s.wait_for_segment(&mut agent, &last);
    let n = s.assert_identical_and_contiguous();
    assert!(n as u32 >= batches, "{version}: only {n} segments");
    eprintln!("{version}: {n} segments byte-identical to pg_wal");
    // A clean stop leaves no partial behind for a completed segment.
    let status = agent.terminate();
    assert!(status.success(), "{}", agent.log_text());
    let (segs, parts, _) = repo::listing(&s.repo_url());
    for (seg, _) in &parts {
        assert!(
            !segs.contains(seg),
            "{version}: partial of completed segment {seg} left behind"
        );
    }
    let marker = std::fs::read_dir(s.dir.path().join("repo"))
        .unwrap()
        .count();
    assert!(marker > 0);
}

#[test]
fn pg17_wal_byte_identical_under_load() {
    byte_identical(PgVersion::V17, 6, 150_000);
}

#[test]
fn pg14_wal_byte_identical() {
    byte_identical(PgVersion::V14, 2, 60_000);
}

#[test]
fn pg15_wal_byte_identical() {
    byte_identical(PgVersion::V15, 2, 60_000);
}

#[test]
fn pg16_wal_byte_identical() {
    byte_identical(PgVersion::V16, 2, 60_000);
}

#[test]
fn pg18_wal_byte_identical() {
    byte_identical(PgVersion::V18, 2, 60_000);
}

/// LSN of a WAL file name plus an offset (16 MiB segments).
fn lsn_of(name: &str, offset: u64) -> u64 {
    let hi = u64::from_str_radix(&name[8..16], 16).unwrap();
    let lo = u64::from_str_radix(&name[16..24], 16).unwrap();
    (hi << 32) + lo * 16 * 1024 * 1024 + offset
}

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap()
}

/// The end of WAL the repository holds (complete segments and partials).
fn durable_end(url: &str) -> u64 {
    let (segs, parts, _) = repo::listing(url);
    let a = segs
        .iter()
        .map(|s| lsn_of(s, 16 * 1024 * 1024))
        .max()
        .unwrap_or(0);
    let b = parts
        .iter()
        .map(|(s, off)| lsn_of(s, u64::from(*off)))
        .max()
        .unwrap_or(0);
    a.max(b)
}

#[test]
fn pg17_kill9_three_times_during_load_loses_nothing() {
    let s = Setup::new(PgVersion::V17);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        let url = s.pg.superuser_url();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(conn);
                client.simple_query("CREATE TABLE IF NOT EXISTS load(id int, pad text)").await.unwrap();
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    client
                        .simple_query("INSERT INTO load SELECT g, repeat('y', 200) FROM generate_series(1, 20000) g")
                        .await
                        .unwrap();
                    i += 1;
                    if i % 5 == 0 {
                        client.simple_query("SELECT pg_switch_wal()").await.unwrap();
                    }
                }
            });
        })
    };
    let mut agent = s.start_agent(&[]);
    for pause_ms in [1500u64, 2300, 900] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        assert!(
            agent.exited().is_none(),
            "agent exited:\n{}",
            agent.log_text()
        );
        agent.kill9();
        std::thread::sleep(Duration::from_millis(200));
        agent = s.start_agent(&[]);
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    loader.join().unwrap();
    // Write something first: if the loader's own last switch left the insert position at
    // the start of a segment, pg_switch_wal would be a no-op returning a position in a
    // segment that never completes.
    s.pg.sql_blocking("INSERT INTO load VALUES (0, 'end')");
    let last =
        s.pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    s.wait_for_segment(&mut agent, &last);
    let n = s.assert_identical_and_contiguous();
    let restarts = agent.log_text().matches("starting replication").count();
    assert!(
        restarts >= 4,
        "expected 4 starts in the log, saw {restarts}"
    );
    eprintln!("kill -9 x3: {n} segments, contiguous and byte-identical");
}

#[test]
fn pg17_synchronous_commit_waits_for_the_repository() {
    let s = Setup::new(PgVersion::V17);
    let mut agent = s.start_agent(&["--synchronous"]);
    // Set after start-up: the harness's own setup commits would wait for a standby.
    s.pg.sql_blocking("ALTER SYSTEM SET synchronous_standby_names = 'syncbridge'");
    s.pg.sql_blocking("SELECT pg_reload_conf()");
    let ok = wait_until(Duration::from_secs(60), || {
        s.pg.sql_blocking(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'syncbridge'",
        )
        .first()
        .and_then(|r| r[0].clone())
        .as_deref()
            == Some("sync")
    });
    assert!(
        ok,
        "agent never became the synchronous standby:\n{}",
        agent.log_text()
    );

    let url = s.pg.superuser_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let burst = rt.block_on(async move { tokio::time::timeout(Duration::from_secs(120), async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.simple_query("CREATE TABLE marks(id int)").await.unwrap();
        let started = std::time::Instant::now();
        let mut last = String::new();
        for i in 0..200 {
            let msgs = client
                .simple_query(&format!("BEGIN; INSERT INTO marks VALUES ({i}); SELECT pg_current_wal_insert_lsn()::text; COMMIT;"))
                .await
                .unwrap();
            for m in msgs {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    last = r.get(0).unwrap().to_string();
                }
            }
        }
        (last, started.elapsed())
    }).await });
    let Ok((last_sequential, elapsed)) = burst else {
        panic!("commits still waiting after 120 s:\n{}", agent.log_text());
    };
    // Then 8 clients committing at once: commits waiting together share uploads.
    let url = s.pg.superuser_url();
    let concurrent = rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(120), async move {
            let started = std::time::Instant::now();
            let mut tasks = Vec::new();
            for c in 0..8 {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    let mut max = 0u64;
                    for i in 0..25 {
                        let id = 1000 + c * 100 + i;
                        let msgs = client
                            .simple_query(&format!("BEGIN; INSERT INTO marks VALUES ({id}); SELECT pg_current_wal_insert_lsn()::text; COMMIT;"))
                            .await
                            .unwrap();
                        for m in msgs {
                            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                                max = max.max(parse_lsn(r.get(0).unwrap()));
                            }
                        }
                    }
                    max
                }));
            }
            let mut max = 0;
            for t in tasks {
                max = max.max(t.await.unwrap());
            }
            (max, started.elapsed())
        })
        .await
    });
    let Ok((last_concurrent, concurrent_elapsed)) = concurrent else {
        panic!(
            "concurrent commits still waiting after 120 s:\n{}",
            agent.log_text()
        );
    };
    eprintln!(
        "synchronous, 8 clients x 25 commits: {concurrent_elapsed:?} ({:?} per commit, {:?} per round of 8)",
        concurrent_elapsed / 200,
        concurrent_elapsed / 25
    );
    let last_before_commit = format!(
        "{:X}/{:X}",
        last_concurrent.max(parse_lsn(&last_sequential)) >> 32,
        last_concurrent.max(parse_lsn(&last_sequential)) & 0xFFFF_FFFF
    );
    // Stop the agent the moment the last commit returned: what it acknowledged must be stored.
    agent.kill9();
    let end = durable_end(&s.repo_url());
    let before = parse_lsn(&last_before_commit);
    assert!(
        end > before,
        "repository ends at {end:X}, but a commit after {before:X} was acknowledged"
    );
    eprintln!("synchronous: 200 commits in {elapsed:?} ({:?} per commit); repository end {end:X} > last commit start {before:X}", elapsed / 200);
    // The stored partial matches the server's WAL byte for byte up to its end.
    let (segs, parts, _) = repo::listing(&s.repo_url());
    let newest = parts
        .iter()
        .max_by_key(|(seg, off)| lsn_of(seg, u64::from(*off)));
    if let Some((seg, off)) = newest {
        if !segs.contains(seg) {
            let data = repo::partial_content(&s.repo_url(), seg, *off);
            let server = std::fs::read(s.pg.pg_wal_dir().join(seg)).unwrap();
            let off = *off as usize;
            assert!(
                data[..off] == server[..off],
                "partial {seg} up to {off:X} differs from pg_wal"
            );
        }
    }
}
