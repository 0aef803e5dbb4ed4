//! Issue 11, case 10: a `file://` repository holds copies of a data directory that
//! PostgreSQL keeps at 0700 (`global/1260` is `pg_authid`, with the SCRAM verifiers). A
//! new repository made by `postgres stream` and `postgres backup` as root with umask 022
//! has no file or directory the group or the world can read.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::stat::{umask, Mode};
use pg_support::{agent, text, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

/// `(path, is_dir, mode)` of everything under `root`, `root` included.
fn tree(root: &Path) -> Vec<(String, bool, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push((
            p.display().to_string(),
            m.is_dir(),
            m.permissions().mode() & 0o7777,
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

#[test]
fn case10_new_file_repository_under_umask_022_has_no_group_or_world_readable_file() {
    // The umask of a root shell on most systems; the agent inherits it.
    umask(Mode::from_bits_truncate(0o022));
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(256)
        .start();
    let dir = tempfile::tempdir().unwrap();
    // Two levels the agent creates: the repository and its parent.
    let root = dir.path().join("backups/repo");
    let repo = format!("file://{}", root.display());
    let src = pg.replication_url();
    let mut stream = AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &src,
            "--repo",
            &repo,
            "--max-lag",
            "200ms",
        ],
        dir.path().join("stream.log"),
    );
    let out = agent()
        .args([
            "postgres",
            "backup",
            "--source",
            &src,
            "--repo",
            &repo,
            "--wal-timeout-secs",
            "120",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "backup failed:\n{}\nstream log:\n{}",
        text(&out),
        stream.log_text()
    );
    stream.kill9();

    let all = tree(&dir.path().join("backups"));
    let files: Vec<_> = all.iter().filter(|(_, d, _)| !d).collect();
    // The marker, WAL and a base backup holding pg_authid's relation file.
    assert!(
        files.iter().any(|(p, _, _)| p.contains("/postgres/wal/")),
        "{all:?}"
    );
    assert!(
        files.iter().any(|(p, _, _)| p.contains("/postgres/base/")),
        "{all:?}"
    );
    let open: Vec<_> = all.iter().filter(|(_, _, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "group- or world-accessible: {open:?}");
    for (path, dir, mode) in &all {
        let want = if *dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{path}");
    }
    // And the agent can still read what it wrote.
    let out = agent()
        .args(["repo", "check", "--repo", &repo])
        .output()
        .unwrap();
    assert!(out.status.success(), "repo check:\n{}", text(&out));
}
