//! Progress of long transfers (base backup, restore): a one-line bar with bytes, rate and
//! ETA when stderr is a terminal, otherwise a log line at intervals so a supervisor's log
//! shows the job is alive.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Reports the progress of one transfer.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    started: Instant,
    last: Instant,
    tty: bool,
    interval: Duration,
    drew: bool,
}

impl Progress {
    /// A reporter for `what` (e.g. "backup"), with the expected total if known.
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let now = Instant::now();
        Progress {
            what,
            total,
            started: now,
            last: now,
            tty,
            interval: if tty {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(10)
            },
            drew: false,
        }
    }

    /// Reports `done` bytes if it is time to.
    pub fn update(&mut self, done: u64) {
        if self.last.elapsed() < self.interval {
            return;
        }
        self.last = Instant::now();
        let line = self.line(done);
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.drew = true;
        } else {
            tracing::info!("{line}");
        }
    }

    /// Ends the bar (on a terminal) so following output starts on a fresh line.
    pub fn finish(&mut self, done: u64) {
        if self.tty && self.drew {
            let line = self.line(done);
            let _ = writeln!(std::io::stderr().lock(), "\r\x1b[2K{line}");
        }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        match self.total.filter(|t| *t > 0) {
            Some(total) => {
                let frac = (done as f64 / total as f64).min(1.0);
                let width = 30usize;
                let filled = (frac * width as f64) as usize;
                let eta = if rate > 0.0 && done < total {
                    format!("{:.0}s", (total - done) as f64 / rate)
                } else {
                    "-".into()
                };
                format!(
                    "{}: [{}{}] {:5.1}% {} / {} at {}/s, ETA {eta}",
                    self.what,
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    frac * 100.0,
                    human(done),
                    human(total),
                    human(rate as u64)
                )
            }
            None => format!("{}: {} at {}/s", self.what, human(done), human(rate as u64)),
        }
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
