//! One shape for long-running work. A job (the PostgreSQL stream, the Redis stream, and the
//! scheduled backup, expire and verify to come) is a function of validated options (never a
//! clap type), a [`CancellationToken`] and a [`JobStatus`] it publishes its state on. Each
//! attempt returns an [`Outcome`] or a [`JobError`]; [`supervise`] restarts attempts with
//! backoff, so the sub-commands (`postgres stream`, `redis stream`) and a supervisor of
//! several jobs behave the same. Signals are not a job's business: [`cancel_on_signals`]
//! turns SIGINT/SIGTERM into a cancellation (a second signal exits at once).
//!
//! The model is the usual supervisor tree (Erlang/OTP, Neon's background tasks): a job
//! knows what its errors mean, the supervisor only knows how long to wait.
//!
//! # Error classes
//!
//! An error gets its [`ErrorClass`] where it arises, never by searching an error chain
//! afterwards: the code that meets it knows what it means.
//! - The connections classify their own failures ([`JobError`] is their error type):
//!   `pg::conn` by SQLSTATE ([`PgServerError::class`](crate::pg::conn::PgServerError::class):
//!   57P01..57P03 and 55006 wait, 28P01, 28000, 42501 and 55000 are fatal), no usable server
//!   of a multi-host source waits, and an I/O error of a kind that means "nobody answers"
//!   ([`io_class`]) is [`ErrorClass::Unreachable`]; `redis::link` the same for its socket,
//!   and a connection that did not finish within its timeout is unreachable.
//! - Typed errors convert with their class (`?`): a repository that is gone
//!   ([`StorageError::RepositoryMissing`], also under a [`LeaseError`]; the streams'
//!   `RepositoryGone`) is fatal, one the store calls retryable (it did not answer) is
//!   unreachable, any other repository error transient; `pg::archive::Fatal`
//!   (different content already stored, a foreign cluster, an invalidated slot) is fatal.
//!   A source that is a standby (`SourceIsStandby`) or a replica (`SourceIsReplica`) with
//!   the policy to wait is [`ErrorClass::WaitingForServer`], decided where it is found.
//! - Every other failure site says what it means ([`JobError::fatal`],
//!   [`JobError::waiting`], [`Classify`]); an error left unclassified (`?` on
//!   `anyhow::Error`) is [`ErrorClass::Transient`]. [`JobContext`] adds context without
//!   losing the class.
//!
//! What the jobs add on top:
//! - PostgreSQL stream: until replication has started once, an [`ErrorClass::Transient`]
//!   error is fatal (a wrong password, no slot privilege, a TLS problem: the operator's to
//!   fix); only [`ErrorClass::Unreachable`] and [`ErrorClass::WaitingForServer`] are waited
//!   out (the agent may start before PostgreSQL).
//! - Redis stream: a first connection that times out is fatal (a wrong host or port, not a
//!   blip); later ones are unreachable.
//! - Both: on an error that [lets go](JobError::lets_go) (unreachable, waiting) the stream
//!   releases its lease, so a sidecar beside a usable server can take over.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use storage::{LeaseError, StorageError};
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

/// The sending side of a job's state, and the states of its parts (a cluster stream's
/// shards), which the metrics label `shard`.
#[derive(Debug, Clone)]
pub struct JobStatus(watch::Sender<JobState>, PartStates);

/// The states of a job's parts by name (`s01`, ...): a whole-cluster Redis stream publishes
/// each shard's stream state there, so `/metrics` and `/readyz` see every shard. Parts are
/// added as they appear and kept (a shard restarted at a new master keeps its counters).
#[derive(Debug, Clone, Default)]
pub struct PartStates(Arc<Mutex<BTreeMap<String, JobStatus>>>);

impl PartStates {
    /// The status of part `name`, created on first use.
    pub fn status(&self, name: &str) -> JobStatus {
        let mut parts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        parts
            .entry(name.to_owned())
            .or_insert_with(|| JobStatus::new().0)
            .clone()
    }

    /// Every part's current state, by name.
    pub fn states(&self) -> Vec<(String, JobState)> {
        let parts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        parts
            .iter()
            .map(|(n, s)| (n.clone(), s.0.borrow().clone()))
            .collect()
    }
}

impl JobStatus {
    /// A new status and a receiver for whoever watches it.
    pub fn new() -> (JobStatus, watch::Receiver<JobState>) {
        let (tx, rx) = watch::channel(JobState::default());
        (JobStatus(tx, PartStates::default()), rx)
    }

    /// The status of the job's part `name` (a cluster stream's shard).
    pub fn part(&self, name: &str) -> JobStatus {
        self.1.status(name)
    }

    /// The job's parts, for whoever watches them.
    pub fn parts(&self) -> PartStates {
        self.1.clone()
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
    /// The server (or the repository's store) did not answer (connection refused, reset,
    /// timed out): retry with backoff, like [`ErrorClass::Transient`], but the job is not
    /// writing and lets go of its lease (a failover may be under way), and it is retried
    /// even before the job first started (the agent may start before its server).
    Unreachable,
    /// The server is not usable yet (a standby, starting up, its slot in use elsewhere):
    /// wait and try again, reporting not ready.
    WaitingForServer,
}

/// An error with its class, decided where it arose (see the module doc). The connections
/// (`pg::conn`, `redis::link`) return it, so their callers keep the class with `?`.
///
/// It displays like the `anyhow::Error` it holds (`{:#}` the whole chain) and its
/// `source` is that error's source, so wrapping it in `anyhow` changes no message.
#[derive(Debug)]
pub struct JobError {
    /// What it means.
    pub class: ErrorClass,
    /// The error.
    pub error: anyhow::Error,
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if f.alternate() {
            write!(f, "{:#}", self.error)
        } else {
            write!(f, "{}", self.error)
        }
    }
}

impl std::error::Error for JobError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl JobError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, error: impl Into<anyhow::Error>) -> JobError {
        JobError {
            class,
            error: error.into(),
        }
    }

    /// A fatal error.
    pub fn fatal(error: impl Into<anyhow::Error>) -> JobError {
        JobError::new(ErrorClass::Fatal, error)
    }

    /// A transient error.
    pub fn transient(error: impl Into<anyhow::Error>) -> JobError {
        JobError::new(ErrorClass::Transient, error)
    }

    /// An I/O error on a connection, with what was being done: "nobody answers" kinds are
    /// unreachable ([`io_class`]), the rest transient.
    pub fn io(e: std::io::Error, what: String) -> JobError {
        JobError::new(io_class(&e), anyhow::Error::new(e).context(what))
    }

    /// The server did not answer.
    pub fn unreachable(error: impl Into<anyhow::Error>) -> JobError {
        JobError::new(ErrorClass::Unreachable, error)
    }

    /// The server is not usable yet.
    pub fn waiting(error: impl Into<anyhow::Error>) -> JobError {
        JobError::new(ErrorClass::WaitingForServer, error)
    }

    /// Adds context to the message, keeping the class.
    pub fn context(self, context: impl std::fmt::Display + Send + Sync + 'static) -> JobError {
        JobError {
            class: self.class,
            error: self.error.context(context),
        }
    }

    /// The same error with another class.
    pub fn reclassify(self, class: ErrorClass) -> JobError {
        JobError { class, ..self }
    }

    /// The job is not writing, and maybe not for long (its server is unreachable or not
    /// usable yet): it lets go of what it holds (its lease), so a job beside a usable
    /// server can take over.
    pub fn lets_go(&self) -> bool {
        matches!(
            self.class,
            ErrorClass::Unreachable | ErrorClass::WaitingForServer
        )
    }
}

/// An error nobody classified: a blip, retried.
impl From<anyhow::Error> for JobError {
    fn from(error: anyhow::Error) -> JobError {
        JobError::transient(error)
    }
}

/// A repository that is gone (deleted, unmounted) is fatal: reconnecting cannot bring it
/// back. A store that did not answer (the store says retryable: an object store down or
/// restarting) is unreachable, so a job waits for it even before its first start; any
/// other repository error is transient.
impl From<StorageError> for JobError {
    fn from(e: StorageError) -> JobError {
        match e {
            StorageError::RepositoryMissing { .. } => JobError::fatal(e),
            e if e.is_retryable() => JobError::unreachable(e),
            e => JobError::transient(e),
        }
    }
}

/// As [`StorageError`] for a lease whose store failed; a lost lease is transient (the job
/// waits for it again).
impl From<LeaseError> for JobError {
    fn from(e: LeaseError) -> JobError {
        match e {
            LeaseError::Storage {
                source: StorageError::RepositoryMissing { .. },
                ..
            } => JobError::fatal(e),
            LeaseError::Storage { ref source, .. } if source.is_retryable() => {
                JobError::unreachable(e)
            }
            e => JobError::transient(e),
        }
    }
}

/// The class of an I/O error on a connection to a server: the kinds that mean "nobody
/// answers, or the connection dropped" are [`ErrorClass::Unreachable`], the rest
/// [`ErrorClass::Transient`].
pub fn io_class(e: &std::io::Error) -> ErrorClass {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut
        | AddrNotAvailable | UnexpectedEof => ErrorClass::Unreachable,
        _ => ErrorClass::Transient,
    }
}

/// Classifies a failure where it happens: `TimelineId::new(t).transient()?`.
pub trait Classify<T> {
    /// With `class`.
    fn class(self, class: ErrorClass) -> Result<T, JobError>;

    /// A blip.
    fn transient(self) -> Result<T, JobError>
    where
        Self: Sized,
    {
        self.class(ErrorClass::Transient)
    }
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn class(self, class: ErrorClass) -> Result<T, JobError> {
        self.map_err(|e| JobError::new(class, e))
    }
}

/// Adds context to a classified error, keeping its class (`anyhow::Context` would turn
/// it into an unclassified `anyhow::Error`).
pub trait JobContext<T> {
    /// Adds `context`.
    fn job_context<C: std::fmt::Display + Send + Sync + 'static>(
        self,
        context: C,
    ) -> Result<T, JobError>;

    /// Adds the context `f` makes, only on error.
    fn with_job_context<C: std::fmt::Display + Send + Sync + 'static>(
        self,
        f: impl FnOnce() -> C,
    ) -> Result<T, JobError>;
}

impl<T, E: Into<JobError>> JobContext<T> for Result<T, E> {
    fn job_context<C: std::fmt::Display + Send + Sync + 'static>(
        self,
        context: C,
    ) -> Result<T, JobError> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_job_context<C: std::fmt::Display + Send + Sync + 'static>(
        self,
        f: impl FnOnce() -> C,
    ) -> Result<T, JobError> {
        self.map_err(|e| e.into().context(f()))
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
            3 => Err(JobError::unreachable(anyhow::anyhow!("connection refused"))),
            4 => Ok(Outcome::Again),
            _ => Err(JobError::fatal(anyhow::anyhow!("wrong password"))),
        })
        .await;
        assert_eq!(r.unwrap_err().to_string(), "wrong password");
        let s = rx.borrow().clone();
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.retries, 3);
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

    #[test]
    fn a_classified_error_reads_like_the_error_it_holds() {
        let inner = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            .context("connecting to db:5432");
        let plain = format!("{inner:#}");
        let e = JobError::unreachable(inner);
        assert_eq!(format!("{e:#}"), plain);
        assert_eq!(e.to_string(), "connecting to db:5432");
        // Wrapped in anyhow (a caller's `?`) and given more context: the same chain.
        let wrapped = anyhow::Error::new(e).context("postgres check");
        assert_eq!(format!("{wrapped:#}"), format!("postgres check: {plain}"));
        assert_eq!(wrapped.chain().count(), 3);
        // Context added to a classified error keeps its class.
        let e = Err::<(), _>(JobError::waiting(anyhow::anyhow!("standby")))
            .job_context("starting")
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::WaitingForServer);
        assert!(e.lets_go());
        assert_eq!(format!("{e:#}"), "starting: standby");
    }

    #[test]
    fn repository_errors_are_classified_by_their_type() {
        let missing = || StorageError::RepositoryMissing {
            key: "k".into(),
            location: "/gone".into(),
        };
        assert_eq!(JobError::from(missing()).class, ErrorClass::Fatal);
        let lease = LeaseError::Storage {
            key: "lease".into(),
            source: missing(),
        };
        assert_eq!(JobError::from(lease).class, ErrorClass::Fatal);
        let lost = LeaseError::Lost {
            scope: "redis stream".into(),
            key: "lease".into(),
            reason: "taken".into(),
        };
        assert_eq!(JobError::from(lost).class, ErrorClass::Transient);
        let absent = StorageError::NotFound { key: "k".into() };
        assert_eq!(JobError::from(absent).class, ErrorClass::Transient);
        let down = StorageError::Backend {
            key: "k".into(),
            op: "put",
            retryable: true,
            attempts: 3,
            source: "connection refused".into(),
        };
        assert_eq!(JobError::from(down).class, ErrorClass::Unreachable);
        assert_eq!(
            JobError::from(anyhow::anyhow!("anything")).class,
            ErrorClass::Transient
        );
        let io = |k| std::io::Error::from(k);
        assert_eq!(
            io_class(&io(std::io::ErrorKind::ConnectionReset)),
            ErrorClass::Unreachable
        );
        assert_eq!(
            io_class(&io(std::io::ErrorKind::InvalidData)),
            ErrorClass::Transient
        );
    }
}
