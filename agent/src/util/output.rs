//! Where a command's report lines go: stdout for a command run by hand (`expire` prints its
//! plan, `postgres backup` its summary), log lines when the same code runs inside `run`,
//! whose stdout is a log stream a cluster parses (`--log-format json`). `run` switches the
//! whole process once, before its jobs start; nothing else does.

use std::sync::atomic::{AtomicBool, Ordering};

static AS_LOG_LINES: AtomicBool = AtomicBool::new(false);

/// From now on, report lines are log lines (`run`).
pub fn report_as_log_lines() {
    AS_LOG_LINES.store(true, Ordering::Relaxed);
}

/// Writes one report line.
pub fn say(line: impl AsRef<str>) {
    let line = line.as_ref();
    if AS_LOG_LINES.load(Ordering::Relaxed) {
        tracing::info!("{line}");
    } else {
        println!("{line}");
    }
}
