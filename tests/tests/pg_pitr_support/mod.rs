//! Shared setup for the base backup / restore / PITR tests: a cluster, a repository the
//! server user can read (restore_command runs as that user), `postgres stream` running,
//! and helpers to back up, restore and start the result.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use storage::layout::{self, WalObject};
use storage::{RepoOptions, Repository};
use syncbridge_tests::pg::{PgCluster, PgClusterBuilder, PgVersion};
use syncbridge_tests::process::{server_temp_dir, server_user};

use crate::pg_support::{agent, text, wait_until, AgentProcess};

/// A `file://` repository directory the server user can read, the documented way
/// (storage/src/backend/local.rs): owned by us, group the server's, mode 2750, so what
/// the agent writes is 0640/2750 and readable by `restore_command` (wal-fetch runs as the
/// server user), never by others. A repository the agent creates itself is 0600/0700.
pub fn share_repo_with_server_group(repo: &Path) {
    std::fs::create_dir(repo).unwrap();
    if let Some((_, gid)) = server_user() {
        std::os::unix::fs::chown(repo, None, Some(gid.as_raw())).unwrap();
    }
    std::fs::set_permissions(repo, std::fs::Permissions::from_mode(0o2750)).unwrap();
}

/// A source cluster with the stream running into a `file://` repository.
pub struct Env {
    pub pg: PgCluster,
    pub dir: syncbridge_tests::process::ServerTempDir,
    pub stream: Option<AgentProcess>,
}

impl Env {
    pub fn new(builder: PgClusterBuilder) -> Env {
        let pg = builder.start();
        let dir = server_temp_dir("sb-pitr-");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        share_repo_with_server_group(&dir.path().join("repo"));
        let mut env = Env {
            pg,
            dir,
            stream: None,
        };
        env.start_stream();
        env
    }

    pub fn simple(version: PgVersion) -> Env {
        Env::new(PgCluster::builder(version).wal_keep_size_mb(1024))
    }

    pub fn repo_url(&self) -> String {
        format!("file://{}", self.dir.path().join("repo").display())
    }

    pub fn repo_path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn start_stream(&mut self) {
        let url = self.pg.replication_url();
        let repo = self.repo_url();
        self.stream = Some(AgentProcess::spawn(
            &[
                "postgres",
                "stream",
                "--source",
                &url,
                "--repo",
                &repo,
                "--max-lag",
                "200ms",
            ],
            self.dir.path().join("stream.log"),
        ));
    }

    pub fn stream_log(&self) -> String {
        self.stream
            .as_ref()
            .map(|s| s.log_text())
            .unwrap_or_default()
    }

    /// Runs `postgres backup`; panics with its output on failure.
    pub fn backup(&self, extra: &[&str]) -> Output {
        let out = self.try_backup(extra);
        assert!(
            out.status.success(),
            "backup failed:\n{}\nstream log:\n{}",
            text(&out),
            self.stream_log()
        );
        out
    }

    pub fn try_backup(&self, extra: &[&str]) -> Output {
        let url = self.pg.replication_url();
        let repo = self.repo_url();
        let mut args = vec!["postgres", "backup", "--source", &url, "--repo", &repo];
        if !extra.contains(&"--wal-timeout-secs") {
            args.extend_from_slice(&["--wal-timeout-secs", "120"]);
        }
        args.extend_from_slice(extra);
        agent().args(&args).output().unwrap()
    }

    /// Runs `restore` into `target`.
    pub fn restore(&self, target: &Path, extra: &[&str]) -> Output {
        let repo = self.repo_url();
        let t = target.display().to_string();
        let mut args = vec!["restore", "--repo", &repo, "--target", &t, "--jobs", "3"];
        let owner = server_user().map(|(u, g)| format!("{}:{}", u.as_raw(), g.as_raw()));
        if let Some(o) = &owner {
            args.push("--owner");
            args.push(o);
        }
        args.extend_from_slice(extra);
        agent().args(&args).output().unwrap()
    }

    /// Waits until the repository holds WAL up to `lsn` without a gap from its first
    /// segment.
    pub fn wait_archived(&self, lsn: &str) {
        let want = parse_lsn(lsn);
        let url = self.repo_url();
        let ok = wait_until(Duration::from_secs(120), || archived_end(&url) >= want);
        assert!(
            ok,
            "WAL up to {lsn} never reached the repository (archived to {:X}):\n{}",
            archived_end(&url),
            self.stream_log()
        );
    }
}

pub fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// End of the contiguous WAL of timeline 1 (16 MiB segments), from the first segment.
pub fn archived_end(url: &str) -> u64 {
    const SEG: u64 = 16 << 20;
    let repo = Repository::open(url, RepoOptions::default()).unwrap();
    let metas = block_on(repo.list(&layout::wal_prefix())).unwrap_or_default();
    let mut segs = std::collections::BTreeSet::new();
    let mut parts = std::collections::BTreeMap::new();
    let num = |name: &str| {
        let log = u64::from_str_radix(&name[8..16], 16).unwrap();
        let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
        log * 256 + seg
    };
    for m in metas {
        match layout::parse_wal_key(&m.key) {
            Some(WalObject::Segment(s)) if s.timeline().get() == 1 => {
                segs.insert(num(s.as_str()));
            }
            Some(WalObject::Partial {
                segment,
                end_offset,
            }) if segment.timeline().get() == 1 => {
                let e = parts.entry(num(segment.as_str())).or_insert(0u32);
                *e = (*e).max(end_offset);
            }
            // The chain is checked when it is read; its newest end is what is stored.
            Some(WalObject::Delta { segment, end, .. }) if segment.timeline().get() == 1 => {
                let e = parts.entry(num(segment.as_str())).or_insert(0u32);
                *e = (*e).max(end);
            }
            _ => {}
        }
    }
    let Some(mut n) = segs
        .iter()
        .next()
        .copied()
        .or_else(|| parts.keys().next().copied())
    else {
        return 0;
    };
    while segs.contains(&n) {
        n += 1;
    }
    n * SEG + u64::from(parts.get(&n).copied().unwrap_or(0))
}

/// A place for a restored data directory (absent; its parent is reachable by the server
/// user) and one for a relocated tablespace.
pub struct RestoreDirs {
    pub parent: syncbridge_tests::process::ServerTempDir,
}

impl RestoreDirs {
    pub fn new() -> RestoreDirs {
        let parent = server_temp_dir("sb-restore-");
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        RestoreDirs { parent }
    }

    pub fn data(&self) -> PathBuf {
        self.parent.path().join("data")
    }

    pub fn tablespace(&self) -> PathBuf {
        self.parent.path().join("ts")
    }
}

/// Starts a restored directory and waits until recovery has ended (promoted).
pub fn start_restored(version: PgVersion, data: &Path) -> PgCluster {
    let pg = PgCluster::builder(version)
        .existing_data_dir(data)
        .start_timeout(Duration::from_secs(300))
        .start();
    let ok = wait_until(Duration::from_secs(300), || {
        pg.query_one_blocking("SELECT pg_is_in_recovery()") == "f"
    });
    assert!(
        ok,
        "the restored server never left recovery:\n{}",
        pg.log_tail()
    );
    pg
}
