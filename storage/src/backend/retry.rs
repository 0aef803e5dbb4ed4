//! Retries of transient store failures, and which layer owns which.
//!
//! Retries used to stack (object_store's own retries inside [`RetryPolicy`] inside
//! wal-fetch's loop inside the stream's loop), multiplying the attempts and the time a
//! dead store takes to surface. Each layer now has one job, and no other layer retries it:
//!
//! 1. **One HTTP request**: `object_store`'s `RetryConfig` (built from the policy by
//!    `store_retry` in `repo.rs`: 3 retries, within half of `max_elapsed`). It is the
//!    only layer that can resend a multipart *part* or the *completion* of an upload
//!    (the writer does not keep a part's bytes once they are handed over), and it only
//!    retries what is safe to resend: a request that was never sent, a 5xx, 408 or 429
//!    answer, a timeout of an idempotent request. It never sees the local directory.
//! 2. **One repository operation**: [`RetryPolicy::run`] around every `Backend` call of
//!    the repository (head, ranged get, open and resume of a read at the offset reached,
//!    with `If-Match` on the version first read, list, delete, a whole small PUT, the
//!    start of an upload), for errors [`super::classify`] marks transient. Bounded in
//!    attempts (5) and time (`max_elapsed`, 120 s); jittered exponential backoff. A read
//!    cut mid-body resumes at its offset here (`reader.rs`), it is not restarted.
//! 3. **Callers do not retry storage errors.** A `StorageError` that comes out of the
//!    repository has had its retries (its `attempts` says how many); a caller that loops
//!    on `is_retryable()` again multiplies layer 2 (`postgres wal-fetch` had such a loop,
//!    4 attempts around whole downloads: removed).
//! 4. **The stream's loop** (`postgres stream`, `redis stream`) is not a storage retry:
//!    it reconnects to the *server* and re-sends what was not confirmed stored, after
//!    layers 1 and 2 gave up on an upload, so nothing acknowledged is ever lost.
//!
//! Worst case for one read operation: 5 operations × 4 requests, all within `max_elapsed`.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::error::{Result, StorageError};

/// How persistently transient failures are retried. Bounded both in attempts and in
/// time, so a dead store surfaces as an error instead of a hang.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts of one operation, including the first.
    pub max_attempts: u32,
    /// First backoff; later ones double up to `max_backoff`, with full jitter.
    pub initial_backoff: Duration,
    /// Cap of one backoff.
    pub max_backoff: Duration,
    /// No new attempt starts after this much time since the first.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        let floor = self.initial_backoff / 2;
        let span = exp.saturating_sub(floor);
        floor + span.mul_f64(rand::thread_rng().gen::<f64>())
    }

    /// Runs `op` until it succeeds, fails permanently, or the policy is exhausted.
    pub(crate) async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let delay = self.backoff(attempt - 1);
                    if !e.is_retryable()
                        || attempt >= self.max_attempts
                        || start.elapsed() + delay > self.max_elapsed
                    {
                        return Err(with_attempts(e, attempt));
                    }
                    tracing::warn!(error = %e, attempt, ?delay, "transient storage error, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn with_attempts(e: StorageError, n: u32) -> StorageError {
    match e {
        StorageError::Backend {
            key,
            op,
            retryable,
            source,
            ..
        } => StorageError::Backend {
            key,
            op,
            retryable,
            attempts: n,
            source,
        },
        other => other,
    }
}
