//! Shared helpers for the PostgreSQL integration tests: running the agent binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use syncbridge_tests::pg::{PgCluster, PgVersion};

/// The `syncbridge-agent` binary built by `cargo test --workspace` / `cargo nextest run
/// --workspace` (or `cargo build -p syncbridge-agent`), next to the test executable's
/// `deps/` directory.
pub fn agent_bin() -> PathBuf {
    syncbridge_tests::agent::binary()
}

/// A command for the agent with a clean PostgreSQL environment (no PG* leaking in).
pub fn agent() -> Command {
    syncbridge_tests::agent::command(&["PG", "SYNCBRIDGE_"])
}

/// Runs the agent, returning its output.
pub fn run_agent(args: &[&str]) -> Output {
    agent().args(args).output().unwrap()
}

/// stdout + stderr as text, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether sorted segment names of one timeline (16 MiB segments) have no gap: uploads run
/// concurrently, so a later segment may be listed before an earlier one.
pub fn contiguous(names: &[String]) -> bool {
    let seq = |n: &str| {
        u64::from_str_radix(&n[8..16], 16).unwrap() * 256
            + u64::from_str_radix(&n[16..24], 16).unwrap()
    };
    names.windows(2).all(|w| seq(&w[1]) == seq(&w[0]) + 1)
}

/// A running agent process, SIGKILLed on drop.
pub struct AgentProcess {
    child: std::process::Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent with `args`, logging to `log`.
    pub fn spawn(args: &[&str], log: PathBuf) -> AgentProcess {
        AgentProcess::spawn_env(args, log, &[])
    }

    /// [`AgentProcess::spawn`] with extra environment (e.g. the AWS variables of an S3 server).
    pub fn spawn_env(args: &[&str], log: PathBuf, env: &[(String, String)]) -> AgentProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = agent()
            .args(args)
            .env("SYNCBRIDGE_LOG", "info,syncbridge_agent=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        AgentProcess { child, log }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (a clean stop).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not stop on SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Whether it has exited (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `cond` every 200 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    cond()
}

/// WAL objects in a repository, read back through the storage crate (verified).
pub mod repo {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use storage::layout::{self, WalObject};
    use storage::{RepoOptions, Repository};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Complete segment names, partial (segment, end offset) pairs (a whole partial's end,
    /// or each delta's end) and history timelines.
    pub fn listing(url: &str) -> (Vec<String>, Vec<(String, u32)>, Vec<u32>) {
        let repo = Repository::open(url, RepoOptions::default()).unwrap();
        let metas = block_on(repo.list(&layout::wal_prefix())).unwrap();
        let (mut segs, mut parts, mut hist) = (Vec::new(), Vec::new(), Vec::new());
        for m in metas {
            match layout::parse_wal_key(&m.key) {
                Some(WalObject::Segment(s)) => segs.push(s.to_string()),
                Some(WalObject::Partial {
                    segment,
                    end_offset,
                }) => parts.push((segment.to_string(), end_offset)),
                // A delta holds the segment up to its end (with the deltas before it).
                Some(WalObject::Delta { segment, end, .. }) => {
                    parts.push((segment.to_string(), end))
                }
                Some(WalObject::History(t)) => hist.push(t.get()),
                None => {}
            }
        }
        segs.sort();
        (segs, parts, hist)
    }

    /// The first `end` bytes of a segment in progress, as stored: an older build's whole
    /// partial, or the delta chain from 0 assembled up to `end` (each delta read and
    /// checked, and the chain checked to link exactly).
    pub fn partial_content(url: &str, seg: &str, end: u32) -> Bytes {
        let repo = Repository::open(url, RepoOptions::default()).unwrap();
        let name = layout::WalSegmentName::parse(seg).unwrap();
        let whole = layout::wal_partial(&name, end);
        if block_on(repo.exists(&whole)).unwrap() {
            return block_on(repo.get(&whole)).unwrap();
        }
        let metas = block_on(repo.list(&layout::wal_timeline_prefix(name.timeline()))).unwrap();
        let mut deltas: Vec<(u32, u32, storage::RepoKey)> = metas
            .into_iter()
            .filter_map(|m| match layout::parse_wal_key(&m.key) {
                Some(WalObject::Delta {
                    segment,
                    start,
                    end,
                }) if segment == name => Some((start, end, m.key)),
                _ => None,
            })
            .collect();
        deltas.sort();
        let mut out = Vec::new();
        for (start, stop, key) in deltas.into_iter().filter(|d| d.1 <= end) {
            assert_eq!(
                start as usize,
                out.len(),
                "delta chain of {seg} does not link at {key}"
            );
            let data = block_on(repo.get(&key)).unwrap();
            assert_eq!(data.len() as u32, stop - start, "{key}");
            out.extend_from_slice(&data);
        }
        assert_eq!(out.len() as u32, end, "no chain of {seg} ends at {end:#X}");
        out.into()
    }

    /// A history file's content.
    pub fn history(url: &str, tli: u32) -> Bytes {
        let repo = Repository::open(url, RepoOptions::default()).unwrap();
        let key = layout::timeline_history(layout::TimelineId::new(tli).unwrap());
        block_on(repo.get(&key)).unwrap()
    }

    /// Every complete segment's content.
    pub fn segments(url: &str) -> BTreeMap<String, Bytes> {
        let repo = Repository::open(url, RepoOptions::default()).unwrap();
        let (segs, _, _) = listing(url);
        segs.into_iter()
            .map(|s| {
                let key = layout::wal_segment(&layout::WalSegmentName::parse(&s).unwrap());
                let data = block_on(repo.get(&key)).unwrap();
                (s, data)
            })
            .collect()
    }
}

/// `postgres stream` arguments from `src` into `url`, with a short `--max-lag` so tests
/// see partials quickly.
pub fn stream_args<'a>(src: &'a str, url: &'a str) -> Vec<&'a str> {
    vec![
        "postgres",
        "stream",
        "--source",
        src,
        "--repo",
        url,
        "--max-lag",
        "200ms",
    ]
}

/// A standby of `primary` made with pg_basebackup, streaming from it.
pub fn standby_of(primary: &PgCluster, version: PgVersion) -> PgCluster {
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
    PgCluster::builder(version)
        .wal_keep_size_mb(1024)
        .existing_data_dir(&standby_dir)
        .start()
}
