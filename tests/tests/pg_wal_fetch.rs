//! `postgres wal-fetch` as restore_command: exit codes PostgreSQL relies on (1 only for a
//! truly missing file, > 125 for storage trouble or corruption), atomic writes, the newest
//! partial served as the last segment, and prefetching.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pg_support::{repo, run_agent, text, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn wal_fetch_exit_codes_partials_and_prefetch() {
    let pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(1024)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    let src = pg.replication_url();
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
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    let mut completed = Vec::new();
    for _ in 0..4 {
        pg.sql_blocking(
            "INSERT INTO t SELECT g, repeat('z', 200) FROM generate_series(1, 40000) g",
        );
        completed.push(pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())"));
    }
    // Some WAL in the segment after the last switch, left as a partial by a clean stop.
    pg.sql_blocking("INSERT INTO t VALUES (1, 'tail')");
    let tail_segment = pg.query_one_blocking("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let last = completed.last().unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(&url)
            .0
            .contains(&last)),
        "{}",
        agent.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(30), || repo::listing(&url)
            .1
            .iter()
            .any(|(s, _)| *s == tail_segment)),
        "no partial of {tail_segment}:\n{}",
        agent.log_text()
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());

    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("RECOVERYXLOG");
    let target_s = target.to_str().unwrap();

    // A stored segment: exit 0, identical to pg_wal.
    let first = &completed[0];
    let out = run_agent(&[
        "postgres",
        "wal-fetch",
        "--repo",
        &url,
        "--prefetch",
        "0",
        first,
        target_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(&target).unwrap() == std::fs::read(pg.pg_wal_dir().join(first)).unwrap());

    // Truly missing: exit 1 (a segment far ahead, a history file that never existed).
    let ahead = format!(
        "{}{:016X}",
        &first[..8],
        u64::from_str_radix(&first[8..], 16).unwrap() + 0x50
    );
    for missing in [ahead.as_str(), "00000002.history"] {
        let out = run_agent(&["postgres", "wal-fetch", "--repo", &url, missing, target_s]);
        assert_eq!(out.status.code(), Some(1), "{missing}: {}", text(&out));
    }

    // The newest partial is served as the last segment: full size, prefix equal to pg_wal.
    let out = run_agent(&[
        "postgres",
        "wal-fetch",
        "--repo",
        &url,
        "--prefetch",
        "0",
        &tail_segment,
        target_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let served = std::fs::read(&target).unwrap();
    assert_eq!(served.len(), 16 * 1024 * 1024);
    let (_, parts, _) = repo::listing(&url);
    let end = parts
        .iter()
        .filter(|(s, _)| *s == tail_segment)
        .map(|(_, o)| *o)
        .max()
        .unwrap() as usize;
    let server = std::fs::read(pg.pg_wal_dir().join(&tail_segment)).unwrap();
    assert!(
        served[..end] == server[..end],
        "partial prefix differs from pg_wal"
    );
    assert!(
        served[end..].iter().all(|&b| b == 0),
        "partial is not zero-padded"
    );

    // Prefetch: the next segments land in the spool beside %p (one directory per boot, as
    // spooled files are not fsynced), and are served from there. A spool left by an
    // earlier boot may hold torn files: it is removed, never served.
    let spool_root = out_dir.path().join(".syncbridge-prefetch");
    let old_boot = spool_root.join("00000000-0000-0000-0000-000000000000");
    std::fs::create_dir_all(&old_boot).unwrap();
    std::fs::write(old_boot.join(&completed[1]), b"torn").unwrap();
    let out = run_agent(&[
        "postgres",
        "wal-fetch",
        "--repo",
        &url,
        "--prefetch",
        "3",
        first,
        target_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let spool = spool_root.join(boot_id.trim());
    let next: Vec<String> = completed[1..].to_vec();
    assert!(
        wait_until(Duration::from_secs(30), || next
            .iter()
            .all(|n| spool.join(n).is_file())),
        "prefetch did not bring {next:?}"
    );
    assert!(!old_boot.exists(), "an earlier boot's spool is removed");
    let out = run_agent(&[
        "postgres",
        "wal-fetch",
        "--repo",
        &url,
        "--prefetch",
        "0",
        &completed[1],
        target_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !spool.join(&completed[1]).exists(),
        "served file should move out of the spool"
    );
    assert!(
        std::fs::read(&target).unwrap()
            == std::fs::read(pg.pg_wal_dir().join(&completed[1])).unwrap()
    );

    // A corrupt object: exit > 125, naming it.
    let bad_dir = dir.path().join("corrupt");
    copy_dir(&repo_dir, &bad_dir);
    let obj = find_file(&bad_dir, first).unwrap();
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&obj, bytes).unwrap();
    let bad_url = format!("file://{}", bad_dir.display());
    let out = run_agent(&[
        "postgres",
        "wal-fetch",
        "--repo",
        &bad_url,
        "--prefetch",
        "0",
        first,
        target_s,
    ]);
    assert!(out.status.code().unwrap() > 125, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(first.as_str()),
        "{}",
        text(&out)
    );

    // Storage unreachable: retried, then > 125 (never 1, which would end recovery early).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let s3 = format!(
        "s3://bucket/prefix?endpoint=http://127.0.0.1:{port}&allow_http=true&region=us-east-1"
    );
    let started = std::time::Instant::now();
    let out = pg_support::agent()
        .args([
            "postgres",
            "wal-fetch",
            "--repo",
            &s3,
            "--prefetch",
            "0",
            first,
            target_s,
        ])
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .output()
        .unwrap();
    assert!(out.status.code().unwrap() > 125, "{}", text(&out));
    eprintln!(
        "storage down: exit {:?} after {:?}",
        out.status.code(),
        started.elapsed()
    );
}
