//! The `syncbridge-agent` binary under test: one place that finds it, so every test, bench
//! and the demo run the same build.

use std::path::PathBuf;
use std::process::Command;

/// The binary: `SYNCBRIDGE_AGENT` if set, else `target/<profile>/syncbridge-agent` next to
/// the running executable (tests live in `target/<profile>/deps/`, the demo in
/// `target/<profile>/`). Panics with the build command when it is missing.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SYNCBRIDGE_AGENT") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the running executable has a path");
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("syncbridge-agent");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p syncbridge-agent` (`make test` does)",
        bin.display()
    );
    bin
}

/// A command for the agent with no variable whose name starts with one of `prefixes`
/// leaking in from the test's environment, logging at `info`.
pub fn command(scrub_prefixes: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    for (k, _) in std::env::vars() {
        if scrub_prefixes.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(k);
        }
    }
    cmd.env("SYNCBRIDGE_LOG", "info");
    cmd
}
