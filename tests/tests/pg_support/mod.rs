//! Shared helpers for the PostgreSQL integration tests: running the agent binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `syncbridge-agent` binary built by `cargo test --workspace` / `cargo nextest run
/// --workspace` (or `cargo build -p syncbridge-agent`), next to the test executable's
/// `deps/` directory.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let bin = dir.join("syncbridge-agent");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p syncbridge-agent` (the workspace test run does)",
        bin.display()
    );
    bin
}

/// A command for the agent with a clean PostgreSQL environment (no PG* leaking in).
pub fn agent() -> Command {
    let mut cmd = Command::new(agent_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") || k.starts_with("SYNCBRIDGE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SYNCBRIDGE_LOG", "info");
    cmd
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
