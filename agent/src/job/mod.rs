//! One shape for long-running work. A job (the PostgreSQL stream, the Redis stream, and the
//! scheduled backup, expire and verify to come) is a function of validated options (never a
//! clap type), a [`CancellationToken`] and a [`JobStatus`] it publishes its state on. Each
//! attempt returns an [`Outcome`] or a [`JobError`] whose [`ErrorClass`] the job decided
//! where it understood the error; [`supervise`] restarts attempts with backoff, so the
//! sub-commands (`postgres stream`, `redis stream`) and a supervisor of several jobs behave
//! the same. Signals are not a job's business: [`cancel_on_signals`] turns SIGINT/SIGTERM
//! into a cancellation (a second signal exits at once).
//!
//! The model is the usual supervisor tree (Erlang/OTP, Neon's background tasks): a job
//! knows what its errors mean, the supervisor only knows how long to wait.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before its first connection.
    #[default]
    Starting,
    /// Doing its work (streaming).
    Running,
    /// Waiting for a usable server or for another writer to let go ([`JobState::waiting_for`]).
    Waiting,
    /// A scheduled job between two runs.
    Idle,
    /// Between attempts after a transient error.
    Retrying,
    /// Cancelled: storing what it has, then stopping.
    Stopping,
    /// Stopped cleanly.
    Stopped,
    /// Stopped by a fatal error ([`JobState::last_error`]).
    Failed,
}

/// A job's state as it publishes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobState {
    /// What it is doing.
    pub phase: Phase,
    /// Why it waits (phase [`Phase::Waiting`]).
    pub waiting_for: Option<String>,
    /// The last durable position in the job's terms (an LSN, a replication offset).
    pub durable_position: Option<String>,
    /// The same position as a number (LSN bytes, offset), for metrics.
    pub durable_bytes: Option<u64>,
    /// When that position became durable.
    pub durable_at: Option<DateTime<Utc>>,
    /// How far the durable position is behind what the server sent, in time.
    pub lag: Option<Duration>,
    /// The last error, if any (kept while retrying; cleared when running again).
    pub last_error: Option<String>,
    /// Attempts that ended in an error.
    pub retries: u64,
    /// Bytes of the source's stream made durable by this process (WAL, replication stream).
    pub durable_bytes_total: u64,
    /// A scheduled job: when its last run succeeded.
    pub last_success_at: Option<DateTime<Utc>>,
    /// A scheduled job: how long its last successful run took.
    pub last_run_duration: Option<Duration>,
    /// A scheduled job: runs that failed.
    pub failures: u64,
    /// The earliest moment the repository can restore to, as the job last saw it.
    pub first_recoverable_at: Option<DateTime<Utc>>,
    /// Writes to the repository that failed (after the store layer's own retries) and were
    /// retried by the job or ended an attempt.
    pub upload_errors: u64,
    /// How far the server's end is ahead of what is durable: the WAL a replication slot
    /// makes the server keep for this stream.
    pub source_behind_bytes: Option<u64>,
}

/// The sending side of a job's state.
#[derive(Debug, Clone)]
pub struct JobStatus(watch::Sender<JobState>);

impl JobStatus {
    /// A new status and a receiver for whoever watches it.
    pub fn new() -> (JobStatus, watch::Receiver<JobState>) {
        let (tx, rx) = watch::channel(JobState::default());
        (JobStatus(tx), rx)
    }

    /// Changes the state (watchers are told only when something changed).
    pub fn update(&self, f: impl FnOnce(&mut JobState)) {
        self.0.send_if_modified(|s| {
            let before = (s.phase, s.durable_bytes, s.retries, s.waiting_for.clone());
            f(s);
            before != (s.phase, s.durable_bytes, s.retries, s.waiting_for.clone())
        });
    }

    /// The job is doing its work: clears the waiting reason and the error.
    pub fn running(&self) {
        self.update(|s| {
            s.phase = Phase::Running;
            s.waiting_for = None;
            s.last_error = None;
        });
    }

    /// Records a durable position.
    pub fn durable(&self, position: impl ToString, bytes: u64, lag: Option<Duration>) {
        self.update(|s| {
            if let Some(prev) = s.durable_bytes {
                s.durable_bytes_total += bytes.saturating_sub(prev);
            }
            s.durable_position = Some(position.to_string());
            s.durable_bytes = Some(bytes);
            s.durable_at = Some(Utc::now());
            s.lag = lag;
        });
    }
}

/// What a job's code below its top level needs of the supervisor: when to stop, where to
/// publish state.
#[derive(Debug, Clone)]
pub struct Control {
    /// Cancelled when the job must store what it has and stop.
    pub token: CancellationToken,
    /// Where it publishes its state.
    pub status: JobStatus,
}

impl Control {
    /// For a job run alone by its sub-command: SIGINT/SIGTERM cancel it
    /// ([`cancel_on_signals`]), and nobody watches its state but its log lines.
    pub fn standalone() -> Control {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone());
        Control {
            token,
            status: JobStatus::new().0,
        }
    }
}

/// What an error means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying cannot help (wrong password, repository gone): the job stops.
    Fatal,
    /// A blip (connection lost, store unwell): retry with backoff.
    Transient,
    /// The server is not usable yet (a standby, starting up, its slot in use elsewhere):
    /// wait and try again, reporting not ready.
    WaitingForServer,
}

/// An attempt's error with its class.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct JobError {
    /// What it means.
    pub class: ErrorClass,
    /// The error.
    #[source]
    pub error: anyhow::Error,
}

impl JobError {
    /// A fatal error.
    pub fn fatal(error: anyhow::Error) -> JobError {
        JobError {
            class: ErrorClass::Fatal,
            error,
        }
    }

    /// A transient error.
    pub fn transient(error: anyhow::Error) -> JobError {
        JobError {
            class: ErrorClass::Transient,
            error,
        }
    }

    /// The server is not usable yet.
    pub fn waiting(error: anyhow::Error) -> JobError {
        JobError {
            class: ErrorClass::WaitingForServer,
            error,
        }
    }
}

/// How an attempt ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Cancelled, and everything received was stored.
    Stopped,
    /// Start the next attempt at once (a timeline switch, a lease taken back).
    Again,
}

/// Waits between failed attempts: doubling from `initial` to `max`, back to `initial` once
/// an attempt lasted `reset_after` (it was working, the next failure is a new incident).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
    /// An attempt this long resets the wait.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// While waiting for a usable server, how often the reason is logged (the state always
/// has it).
const WAITING_LOG_EVERY: Duration = Duration::from_secs(60);

/// Runs `attempt` until it stops, fails fatally, or `token` is cancelled between attempts.
/// An error returned after cancellation is returned as is: what was received could not be
/// stored, which the caller must report.
/// Every log line of the job carries its name (the `job` span: `job{job="postgres
/// stream"}:` in text, `"span":{"job":…}` in JSON).
pub async fn supervise(
    name: &str,
    token: &CancellationToken,
    status: &JobStatus,
    backoff: Backoff,
    attempt: impl AsyncFnMut(u64) -> Result<Outcome, JobError>,
) -> anyhow::Result<()> {
    use tracing::Instrument;
    let span = tracing::info_span!("job", job = name);
    supervise_in_span(token, status, backoff, attempt)
        .instrument(span)
        .await
}

async fn supervise_in_span(
    token: &CancellationToken,
    status: &JobStatus,
    backoff: Backoff,
    mut attempt: impl AsyncFnMut(u64) -> Result<Outcome, JobError>,
) -> anyhow::Result<()> {
    let mut delay = backoff.initial;
    let mut last_waiting_log: Option<Instant> = None;
    let mut n = 0u64;
    loop {
        n += 1;
        let began = Instant::now();
        let result = attempt(n).await;
        if began.elapsed() >= backoff.reset_after {
            delay = backoff.initial;
        }
        let err = match result {
            Ok(Outcome::Stopped) => {
                status.update(|s| s.phase = Phase::Stopped);
                return Ok(());
            }
            Ok(Outcome::Again) => continue,
            Err(e) => e,
        };
        let text = format!("{:#}", err.error);
        if token.is_cancelled() || err.class == ErrorClass::Fatal {
            status.update(|s| {
                s.phase = Phase::Failed;
                s.last_error = Some(text);
            });
            return Err(err.error);
        }
        let waiting = err.class == ErrorClass::WaitingForServer;
        status.update(|s| {
            s.phase = if waiting {
                Phase::Waiting
            } else {
                Phase::Retrying
            };
            s.waiting_for = waiting.then(|| text.clone());
            s.last_error = Some(text.clone());
            s.retries += 1;
        });
        if !waiting {
            tracing::warn!("{text}; retrying in {}s", delay.as_secs_f32());
        } else if last_waiting_log.is_none_or(|t| t.elapsed() >= WAITING_LOG_EVERY) {
            tracing::info!("waiting for a usable server: {text}");
            last_waiting_log = Some(Instant::now());
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = token.cancelled() => {
                status.update(|s| s.phase = Phase::Stopped);
                return Ok(());
            }
        }
        delay = (delay * 2).min(backoff.max);
    }
}

/// When a scheduled job retries a failed run: a minute, doubling, at most an hour (and never
/// later than its next scheduled run).
const SCHEDULED_RETRY: Backoff = Backoff {
    initial: Duration::from_secs(60),
    max: Duration::from_secs(3600),
    reset_after: Duration::ZERO,
};

/// Runs `work` at the times of `schedule` until `ctl.token` is cancelled (a run in progress
/// is abandoned: what it wrote stays incomplete, and is never taken for complete). Each
/// run's outcome is published; a failed run is retried with backoff, but not later than the
/// next scheduled run.
pub async fn scheduled(
    name: &str,
    schedule: &crate::config::Schedule,
    ctl: &Control,
    mut work: impl AsyncFnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use tracing::Instrument;
    let span = tracing::info_span!("job", job = name);
    async {
        let mut previous: Option<DateTime<Utc>> = None;
        let mut retry: Option<Duration> = None;
        loop {
            let scheduled = schedule.next_delay(Utc::now(), previous);
            let delay = retry.map_or(scheduled, |r| r.min(scheduled));
            ctl.status.update(|s| s.phase = Phase::Idle);
            if !delay.is_zero() {
                tracing::debug!("next run in {}s", delay.as_secs());
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = ctl.token.cancelled() => break,
            }
            let began_at = Utc::now();
            let began = Instant::now();
            ctl.status.update(|s| s.phase = Phase::Running);
            let outcome = tokio::select! {
                r = work() => r,
                () = ctl.token.cancelled() => {
                    tracing::info!("stopping: the run in progress is abandoned");
                    break;
                }
            };
            match outcome {
                Ok(()) => {
                    previous = Some(began_at);
                    retry = None;
                    ctl.status.update(|s| {
                        s.last_success_at = Some(Utc::now());
                        s.last_run_duration = Some(began.elapsed());
                        s.last_error = None;
                    });
                }
                Err(e) => {
                    let next = retry.map_or(SCHEDULED_RETRY.initial, |r| {
                        (r * 2).min(SCHEDULED_RETRY.max)
                    });
                    tracing::error!(
                        "run failed: {e:#}; trying again in {}s at the latest",
                        next.as_secs()
                    );
                    // The schedule counts from this attempt; a retry may come sooner.
                    previous = Some(began_at);
                    retry = Some(next);
                    ctl.status.update(|s| {
                        s.failures += 1;
                        s.last_error = Some(format!("{e:#}"));
                    });
                }
            }
        }
        ctl.status.update(|s| s.phase = Phase::Stopped);
        Ok(())
    }
    .instrument(span)
    .await
}

/// Cancels `token` on the first SIGINT or SIGTERM; a second one exits the process at once
/// (status 130), for an operator who does not want to wait for the flush.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: storing what was received (a second signal stops at once)");
        token.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("second signal: exiting without storing what is in flight");
        std::process::exit(130);
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fast() -> Backoff {
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
            reset_after: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_fatal_ones_stop() {
        let token = CancellationToken::new();
        let (status, rx) = JobStatus::new();
        let r = supervise("t", &token, &status, fast(), async |n| match n {
            1 => Err(JobError::transient(anyhow::anyhow!("blip"))),
            2 => Err(JobError::waiting(anyhow::anyhow!("standby"))),
            3 => Ok(Outcome::Again),
            _ => Err(JobError::fatal(anyhow::anyhow!("wrong password"))),
        })
        .await;
        assert_eq!(r.unwrap_err().to_string(), "wrong password");
        let s = rx.borrow().clone();
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.retries, 2);
        assert_eq!(s.last_error.as_deref(), Some("wrong password"));
    }

    #[tokio::test]
    async fn cancellation_between_attempts_stops_cleanly() {
        let token = CancellationToken::new();
        let (status, rx) = JobStatus::new();
        let t = token.clone();
        let slow = Backoff {
            initial: Duration::from_secs(3600),
            ..fast()
        };
        let r = supervise("t", &token, &status, slow, async |_| {
            t.cancel();
            Err(JobError::waiting(anyhow::anyhow!("slot in use")))
        })
        .await;
        // Cancelled by the attempt itself: its error is the caller's to report.
        assert!(r.is_err());
        assert_eq!(rx.borrow().phase, Phase::Failed);

        let token = CancellationToken::new();
        let (status, rx) = JobStatus::new();
        let t = token.clone();
        let r = supervise("t", &token, &status, slow, async |_| {
            let t = t.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                t.cancel();
            });
            Err(JobError::waiting(anyhow::anyhow!("slot in use")))
        })
        .await;
        assert!(r.is_ok());
        let s = rx.borrow().clone();
        assert_eq!(s.phase, Phase::Stopped);
        assert_eq!(s.waiting_for.as_deref(), Some("slot in use"));
    }
}
