//! Container format versions mixed in one repository (storage/FORMAT.md, "Version 2
//! repositories, mixed versions"): a repository streamed by a writer of format version 2
//! (`SYNCBRIDGE_FORMAT_VERSION=2`, what an older build wrote), then version 3 (BLAKE3
//! content hash, `SYNCBRIDGE_FORMAT_VERSION=3`), then by this build's default (version 4,
//! XXH3-128 content hash), then with `--compression lz4` (version 4, LZ4 frames), reads with
//! every command: `wal-fetch` returns the bytes of `pg_wal` for segments of
//! every kind, `repo check` calls the repository healthy and `verify` reads every object
//! back without naming one (it names only the missing base backup: none is taken here);
//! stored version 2 objects are never rewritten, and damage to one is still caught by its
//! SHA-256 binding.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::path::Path;
use std::time::Duration;

use pg_support::{repo, run_agent, text, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

/// The container version in the header of the object file at `path` (bytes 8..10, LE).
fn version_of(path: &Path) -> u16 {
    let b = std::fs::read(path).unwrap();
    u16::from_le_bytes([b[8], b[9]])
}

fn segment_file(repo_dir: &Path, name: &str) -> std::path::PathBuf {
    repo_dir.join("postgres/wal").join(&name[..8]).join(name)
}

/// Streams until `segments` more segments are stored, with `env` and `extra` arguments;
/// returns their names.
fn stream_segments(
    pg: &PgCluster,
    url: &str,
    log: &Path,
    env: &[(String, String)],
    extra: &[&str],
    segments: usize,
) -> Vec<String> {
    let src = pg.replication_url();
    let mut args = vec![
        "postgres",
        "stream",
        "--source",
        &src,
        "--repo",
        url,
        "--max-lag",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let mut agent = AgentProcess::spawn_env(&args, log.to_path_buf(), env);
    let mut done = Vec::new();
    for _ in 0..segments {
        pg.sql_blocking(
            "INSERT INTO t SELECT g, repeat('v', 200) FROM generate_series(1, 20000) g",
        );
        done.push(pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())"));
    }
    let last = done.last().unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(url)
            .0
            .contains(&last)),
        "{}",
        agent.log_text()
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());
    done
}

#[test]
fn a_repository_streamed_as_version_2_then_3_then_4_reads_with_every_command() {
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(512)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");

    let v2_env = [("SYNCBRIDGE_FORMAT_VERSION".to_string(), "2".to_string())];
    let old = stream_segments(&pg, &url, &dir.path().join("v2.log"), &v2_env, &[], 2);
    assert_eq!(version_of(&repo_dir.join("syncbridge-repo")), 2);
    for s in &old {
        assert_eq!(version_of(&segment_file(&repo_dir, s)), 2, "{s}");
    }
    let v2_bytes = std::fs::read(segment_file(&repo_dir, &old[1])).unwrap();

    // Version 3 on request. The restart continues the chain of version 2 deltas the stop
    // left (the segment in progress) with version 3 ones; stored version 2 objects are left
    // alone.
    let v3_env = [("SYNCBRIDGE_FORMAT_VERSION".to_string(), "3".to_string())];
    let blake3 = stream_segments(&pg, &url, &dir.path().join("v3.log"), &v3_env, &[], 2);
    for s in &blake3 {
        assert_eq!(version_of(&segment_file(&repo_dir, s)), 3, "{s}");
    }
    // This build's default: version 4, after version 3 deltas.
    let new = stream_segments(&pg, &url, &dir.path().join("v4.log"), &[], &[], 2);
    for s in &new {
        assert_eq!(version_of(&segment_file(&repo_dir, s)), 4, "{s}");
    }
    let lz4 = stream_segments(
        &pg,
        &url,
        &dir.path().join("lz4.log"),
        &[],
        &["--compression", "lz4"],
        2,
    );
    for s in &lz4 {
        let b = std::fs::read(segment_file(&repo_dir, s)).unwrap();
        // Version 4, header codec 2 (LZ4), and smaller than the segment.
        assert_eq!((u16::from_le_bytes([b[8], b[9]]), b[15]), (4, 2), "{s}");
        assert!(b.len() < 8 << 20, "{s}: {} bytes", b.len());
    }
    assert_eq!(
        std::fs::read(segment_file(&repo_dir, &old[1])).unwrap(),
        v2_bytes,
        "a stored version 2 segment was rewritten"
    );
    // The marker keeps saying which version created the repository.
    assert_eq!(version_of(&repo_dir.join("syncbridge-repo")), 2);

    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("RECOVERYXLOG");
    for s in old.iter().chain(&blake3).chain(&new).chain(&lz4) {
        let out = run_agent(&[
            "postgres",
            "wal-fetch",
            "--repo",
            &url,
            "--prefetch",
            "0",
            s,
            target.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{s}: {}", text(&out));
        assert!(
            std::fs::read(&target).unwrap() == std::fs::read(pg.pg_wal_dir().join(s)).unwrap(),
            "{s} differs from pg_wal"
        );
    }
    let out = run_agent(&["repo", "check", "--repo", &url]);
    assert!(out.status.success(), "{}", text(&out));
    // `verify` reads every object back; the one problem it may name is that this
    // repository has no base backup (none was taken here), never an object.
    let out = run_agent(&["verify", "--repo", &url]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let damaged: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("DAMAGED"))
        .collect();
    assert!(
        damaged
            .iter()
            .all(|l| l.contains("postgres/base: no complete base backup")),
        "{}",
        text(&out)
    );
    let checked = report
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("checked:"))
        .unwrap_or_else(|| panic!("{}", text(&out)));
    let mut words = checked.split_whitespace();
    let (n, of, total) = (words.next(), words.next(), words.next());
    assert!(
        of == Some("of") && n == total && n.is_some(),
        "{}",
        text(&out)
    );

    // A version 2 object whose trailer digest was changed (its CRC recomputed, so only the
    // digest can tell) is still refused, by its SHA-256 binding.
    let path = segment_file(&repo_dir, &old[0]);
    let intact = std::fs::read(&path).unwrap();
    let mut bytes = intact.clone();
    let at = bytes.len() - 68;
    let mut t = storage::format::Trailer::parse("k", &bytes[at..], 0).unwrap();
    t.sha256[0] ^= 1;
    bytes[at..].copy_from_slice(&t.encode());
    std::fs::write(&path, bytes).unwrap();
    let out = run_agent(&["repo", "check", "--repo", &url]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&old[0]), "{}", text(&out));

    // A version 4 object whose header says version 3 (its header CRC and the trailer's
    // stored CRC recomputed, so every CRC passes) is refused by its digest, read as
    // version 3 with BLAKE3: it binds XXH3-128 under another domain tag.
    std::fs::write(&path, &intact).unwrap();
    let out = run_agent(&["repo", "check", "--repo", &url]);
    assert!(out.status.success(), "{}", text(&out));
    let path = segment_file(&repo_dir, &new[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let (mut header, header_len) = storage::format::Header::parse("k", &bytes)
        .unwrap()
        .unwrap();
    header.version = 3;
    bytes.splice(..header_len, header.encode());
    let at = bytes.len() - 68;
    let mut t = storage::format::Trailer::parse("k", &bytes[at..], 0).unwrap();
    t.stored_crc = crc32c::crc32c(&bytes[..at]);
    bytes[at..].copy_from_slice(&t.encode());
    std::fs::write(&path, bytes).unwrap();
    let out = run_agent(&["repo", "check", "--repo", &url]);
    assert!(!out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(
        report
            .lines()
            .any(|l| l.contains(&new[0])
                && l.contains("sha256 of key, repository and content (BLAKE3)")),
        "{report}"
    );
    assert!(!text(&out).contains("stored crc32c"), "{}", text(&out));
}
