//! Writer leases: one `postgres stream` per (repository, timeline) and one `redis stream`
//! per repository, so a second sidecar waits instead of forking the chain.
//!
//! # Objects
//!
//! A lease is a small JSON object at `layout::lease(scope, generation)`
//! (`leases/postgres-stream/<TLI>/<generation>`, `leases/redis-stream/<generation>`)
//! naming the holder (host, pid, start time, what it does), a random token, a renewal
//! counter and the lease duration. Like the repository marker it is never encrypted: a
//! waiting writer holds only recipients, yet must read who holds the lease; it carries no
//! backup data.
//!
//! # Rules
//!
//! * **The current lease is the highest generation.** Lower ones are stale and are
//!   deleted by the holder.
//! * **Taking a lease is a create-new write** (`PutMode::CreateNew`: `If-None-Match: *` on
//!   S3, a hard link on a local directory) of the next generation. Of several writers
//!   taking over at once exactly one create succeeds; the others see `AlreadyExists` and
//!   go back to waiting. Generations are never reused (a late creation of a deleted one is
//!   not held: below), so a holder that was taken over cannot mistake a later lease for its
//!   own.
//! * **Renewal** overwrites the holder's own generation with the counter incremented,
//!   every `renew_every`, after checking that no higher generation exists (if one does, the
//!   lease was taken over: the holder stops).
//! * **Expiry is judged by the waiter's own clock, never by timestamps**: a waiter that
//!   sees the same (generation, token, counter) unchanged for the holder's `duration`
//!   takes over. It notes when it first saw a record just *after* that read returned (so no
//!   earlier than the write it saw landed), and takes over only on a read that *started*
//!   `duration` after that (the instant is taken before the list): a task held up while a
//!   read is answered never acts on older evidence than it measured. Clock skew between
//!   hosts or the store does not matter.
//! * **A renewal counts only if it landed in time**: within `duration` (less 1% for clock
//!   rates) of the start of the previous *confirmed* write, the lease's creation or a renewal
//!   that counted. One that lands later counts for nothing (a waiter may have taken over
//!   meanwhile), and the next renewal re-takes the lease (below).
//! * **A holder stops writing before any waiter can take over**: it considers the lease
//!   valid only until `duration - renew_every` after the start of its last confirmed write.
//!   Why that never outlasts what a waiter may assume: say a waiter takes over after last
//!   seeing write W. It first saw W after W landed, so after W started, and its deciding read
//!   started `duration` later still. Had a renewal after W counted, it would have landed
//!   within `duration` of the start of W (or of an earlier confirmed write), so before that
//!   read started, and the read would have returned it instead of W. So none did, and the
//!   holder stopped writing by W's start + `duration - renew_every`: a `renew_every` before
//!   the take-over. Past that point the lease is *unconfirmed*: writers
//!   wait, and the holder's next successful renewal re-takes it with a create-new write of
//!   the next generation (racing a waiter fairly: one create wins). So a store outage stalls
//!   the stream but does not hand it over.
//! * **A create-new counts only if its generation is still the newest once written**: a
//!   writer held up between deciding and writing can create a generation that another writer
//!   took and already deleted (holding a higher one by then). So every creator lists again
//!   after creating; seeing a higher generation, it deletes its own and waits (a holder
//!   re-taking stops: lost). The highest generation is never deleted (a holder deletes only
//!   generations below the one it created), so a later creator of a higher one first sees
//!   this one and waits for it to expire.
//! * **A holder that certainly died is not waited for**: when the lease names a process of
//!   this kernel boot and PID namespace (`boot_id` and `/proc/self/ns/pid` match) and
//!   `/proc/<pid>` does not exist, the waiter takes over at once (a restart after a crash
//!   costs nothing). A zombie or a reused pid looks alive, and then the lease expires.
//! * **Release** (clean shutdown) overwrites the lease with `released: true`; a waiter
//!   then takes the next generation at once.
//!
//! `LeaseGuard::check` / `writable` is what writers call before each write;
//! `LeaseGuard::lost` resolves when the lease is gone for good, to interrupt a writer
//! blocked on its source.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
// tokio's `Instant` is `std`'s outside tests; tests pause and advance it (`tokio::time::pause`).
use tokio::time::Instant;

use crate::error::StorageError;
use crate::format::ContentKind;
use crate::layout::{self, LeaseScope, RepoKey};
use crate::repo::Repository;
use crate::PutMode;

/// Why a lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed.
    #[error("lease {key}: {source}")]
    Storage {
        /// The lease object.
        key: String,
        /// What went wrong.
        #[source]
        source: StorageError,
    },
    /// The lease is no longer ours: another writer took it (or it was given up). Stop
    /// writing for good.
    #[error("lost the {scope} lease ({key}): {reason}; stopped writing so the chain cannot fork")]
    Lost {
        /// What the lease guards, as text.
        scope: String,
        /// The lease object.
        key: String,
        /// Taken over by whom.
        reason: String,
    },
    /// The lease was not renewed in time (the store did not answer): a waiter may be about
    /// to take it over, so nothing may be written until a renewal re-takes it.
    #[error("the {scope} lease ({key}) has not been renewed for {secs:.1}s (the repository did not answer in time): not writing until it is renewed")]
    Unconfirmed {
        /// What the lease guards, as text.
        scope: String,
        /// The lease object.
        key: String,
        /// Time since the last successful renewal started.
        secs: f64,
    },
}

impl LeaseError {
    /// Whether the lease is gone for good (as opposed to a failed renewal, which may
    /// recover once the store answers again).
    pub fn is_lost(&self) -> bool {
        matches!(self, LeaseError::Lost { .. })
    }
}

/// Lease timing. `Default` is 30 s, renewed every 10 s; tests shorten it with
/// `SYNCBRIDGE_STREAM_LEASE_SECS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseOptions {
    /// How long a lease lives without renewal (what a waiter waits after the last change).
    pub duration: Duration,
    /// How often the holder renews; also the waiter's polling interval.
    pub renew_every: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions::with_duration(Duration::from_secs(30))
    }
}

impl LeaseOptions {
    /// A lease of `duration`, renewed every third of it.
    pub fn with_duration(duration: Duration) -> Self {
        let duration = duration.max(Duration::from_millis(300));
        LeaseOptions {
            duration,
            renew_every: duration / 3,
        }
    }

    /// Defaults, or `SYNCBRIDGE_STREAM_LEASE_SECS` (seconds, fractions allowed) when set:
    /// a testing knob, not meant for production.
    pub fn from_env() -> Self {
        std::env::var("SYNCBRIDGE_STREAM_LEASE_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| LeaseOptions::with_duration(Duration::from_secs_f64(s)))
            .unwrap_or_default()
    }

    /// How long after the start of its last successful renewal the holder may still write.
    fn valid_for(&self) -> Duration {
        self.duration.saturating_sub(self.renew_every)
    }

    /// How soon after the start of the previous confirmed write (renewal or creation) a
    /// renewal must have landed to count: `duration`, less 1% for the holder's and a
    /// waiter's clocks running at different rates (NTP slews by at most 0.05%).
    fn confirm_within(&self) -> Duration {
        self.duration.saturating_sub(self.duration / 100)
    }
}

/// Who holds a lease: what the lease object says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the holder started (RFC 3339).
    pub started: String,
    /// What the holder does (e.g. "postgres stream, slot sb_a").
    pub purpose: String,
    /// Random, per acquisition: tells two holders on one host apart.
    pub token: String,
    /// Incremented by every renewal.
    pub renewal: u64,
    /// The holder's lease duration in milliseconds (a waiter waits at least this long).
    pub duration_ms: u64,
    /// Set by a clean shutdown: the lease may be taken at once.
    #[serde(default)]
    pub released: bool,
    /// The holder's kernel boot (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The holder's PID namespace (`/proc/self/ns/pid`), in which `pid` means something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.display().to_string())
}

/// Whether the holder certainly no longer runs (see the module doc).
fn holder_is_dead(rec: &LeaseRecord) -> bool {
    rec.boot_id.is_some()
        && rec.boot_id == boot_id()
        && rec.pid_ns.is_some()
        && rec.pid_ns == pid_namespace()
        && rec.pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{}", rec.pid)).exists()
}

impl std::fmt::Display for LeaseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (host {}, pid {}, started {})",
            self.purpose, self.host, self.pid, self.started
        )
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

struct State {
    /// The generation held (a renewal after an outage takes the next one).
    generation: u64,
    /// Start of the last confirmed write: the creation, or a renewal that counted (see the
    /// module doc).
    renewed_at: Instant,
    /// Set once the lease is gone for good.
    lost: Option<String>,
}

/// A held lease. Renewed by a background task until `release` or drop (a dropped lease is
/// not released: it expires, as after a crash; its guards fail from then on).
///
/// When renewals fail (or land late, see the module doc) for longer than
/// `duration - renew_every` the lease is *unconfirmed*: `check` fails with [`LeaseError::Unconfirmed`] and writers wait
/// ([`LeaseGuard::writable`]). The renewal task keeps trying; once the store answers it
/// re-takes the lease with a create-new write of the next generation (unless another
/// writer took it meanwhile: then the lease is lost).
pub struct Lease {
    guard: LeaseGuard,
    record: Arc<Mutex<LeaseRecord>>,
    store: Repository,
    task: tokio::task::JoinHandle<()>,
    /// Asks the renewal task to stop after its renewal in flight, if any (see `release`).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    lost_tx: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.guard.key())
    }
}

/// A cheap handle for writers running elsewhere (upload futures): `check` (or
/// `writable`) before writing.
#[derive(Clone)]
pub struct LeaseGuard {
    scope: LeaseScope,
    opts: LeaseOptions,
    state: Arc<Mutex<State>>,
    lost_rx: watch::Receiver<bool>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseGuard({})", self.key())
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl LeaseGuard {
    /// The lease object currently held.
    pub fn key(&self) -> RepoKey {
        layout::lease(self.scope, lock(&self.state).generation)
    }

    /// `Ok` while the lease is certainly ours; an error means: do not write now
    /// ([`LeaseError::is_lost`]: never again).
    pub fn check(&self) -> Result<(), LeaseError> {
        let s = lock(&self.state);
        let key = layout::lease(self.scope, s.generation).to_string();
        if let Some(reason) = &s.lost {
            return Err(LeaseError::Lost {
                scope: self.scope.to_string(),
                key,
                reason: reason.clone(),
            });
        }
        let age = s.renewed_at.elapsed();
        if age >= self.opts.valid_for() {
            return Err(LeaseError::Unconfirmed {
                scope: self.scope.to_string(),
                key,
                secs: age.as_secs_f64(),
            });
        }
        Ok(())
    }

    /// Whether the lease is gone for good.
    pub fn is_lost(&self) -> bool {
        lock(&self.state).lost.is_some()
    }

    /// Waits while the lease is unconfirmed (logging once); `Err` once it is lost.
    pub async fn writable(&self) -> Result<(), LeaseError> {
        let mut warned = false;
        loop {
            match self.check() {
                Ok(()) => return Ok(()),
                Err(e) if e.is_lost() => return Err(e),
                Err(e) => {
                    if !warned {
                        tracing::warn!("{e}");
                        warned = true;
                    }
                    let mut rx = self.lost_rx.clone();
                    tokio::select! {
                        () = tokio::time::sleep(self.opts.renew_every / 4) => {}
                        _ = rx.changed() => {}
                    }
                }
            }
        }
    }

    /// Resolves once the lease is lost for good (taken over or given up).
    pub async fn lost(&self) {
        let mut rx = self.lost_rx.clone();
        // A closed channel means the lease was dropped, which also marks it lost.
        let _ = rx.wait_for(|l| *l).await;
    }
}

/// The lease repository handle: plaintext, like the marker (see the module doc).
fn plain(repo: &Repository) -> Repository {
    repo.without_encryption()
}

fn storage_err(key: &RepoKey) -> impl FnOnce(StorageError) -> LeaseError + '_ {
    move |source| LeaseError::Storage {
        key: key.to_string(),
        source,
    }
}

/// The generations of `scope` present, ascending.
async fn generations(store: &Repository, scope: LeaseScope) -> Result<Vec<u64>, LeaseError> {
    let prefix = layout::lease_prefix(scope);
    let mut gens: Vec<u64> = match store.list(&prefix).await {
        Ok(list) => list
            .iter()
            .filter_map(|m| layout::parse_lease(scope, &m.key))
            .collect(),
        // A local repository directory that does not exist yet has no leases.
        Err(StorageError::RepositoryMissing { .. }) => Vec::new(),
        Err(e) => return Err(storage_err(&prefix)(e)),
    };
    gens.sort_unstable();
    Ok(gens)
}

/// Who holds a generation of `scope` higher than `generation`, if one exists: the holder
/// and the lease object, as text.
async fn newer_holder(
    store: &Repository,
    scope: LeaseScope,
    generation: u64,
) -> Result<Option<String>, LeaseError> {
    let gens = generations(store, scope).await?;
    Ok(newest_above(store, scope, &gens, generation).await)
}

/// The highest of `gens` when it is above `generation`, with its holder, as text.
async fn newest_above(
    store: &Repository,
    scope: LeaseScope,
    gens: &[u64],
    generation: u64,
) -> Option<String> {
    let newest = *gens.last().filter(|&&g| g > generation)?;
    let k = layout::lease(scope, newest);
    let by = read_record(store, &k)
        .await
        .ok()
        .flatten()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "another writer".into());
    Some(format!("{by} ({k})"))
}

async fn read_record(store: &Repository, key: &RepoKey) -> Result<Option<LeaseRecord>, LeaseError> {
    match store.get(key).await {
        Ok(data) => Ok(Some(serde_json::from_slice(&data).map_err(|e| {
            LeaseError::Storage {
                key: key.to_string(),
                source: StorageError::corrupt(key, "lease JSON", "a lease record", e, 0),
            }
        })?)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(storage_err(key)(e)),
    }
}

async fn write_record(
    store: &Repository,
    key: &RepoKey,
    record: &LeaseRecord,
    mode: PutMode,
) -> Result<(), StorageError> {
    let json = serde_json::to_vec_pretty(record).map_err(|e| StorageError::Encode {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    store
        .put(key, ContentKind::Other, Bytes::from(json), mode)
        .await
        .map(|_| ())
}

impl Lease {
    /// Takes the lease of `scope`, waiting (and logging who holds it) while another writer
    /// holds a live one. Returns only once the lease is ours; cancel by dropping the future.
    pub async fn acquire(
        repo: &Repository,
        scope: LeaseScope,
        purpose: &str,
        opts: LeaseOptions,
    ) -> Result<Lease, LeaseError> {
        let store = plain(repo);
        let me = LeaseRecord {
            host: host_name(),
            pid: std::process::id(),
            started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            purpose: purpose.to_owned(),
            token: hex::encode(rand::random::<[u8; 8]>()),
            renewal: 0,
            duration_ms: u64::try_from(opts.duration.as_millis()).unwrap_or(u64::MAX),
            released: false,
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
        };
        // What we saw of the current holder: (generation, token, renewal) and since when.
        let mut watching: Option<((u64, String, u64), Instant)> = None;
        loop {
            // Taken before the list: the read below starts after this instant, so what it
            // returns is at least this recent however long the task waits for its answer.
            let probe = Instant::now();
            let gens = generations(&store, scope).await?;
            let next = match gens.last() {
                None => Some(1),
                Some(&g) => {
                    let key = layout::lease(scope, g);
                    match read_record(&store, &key).await? {
                        // Deleted between listing and reading: look again.
                        None => None,
                        Some(rec) if rec.released => Some(g + 1),
                        Some(rec) if holder_is_dead(&rec) => {
                            tracing::warn!(lease = %key, holder = %rec, "the holder of the {scope} lease is no longer running: taking over");
                            Some(g + 1)
                        }
                        Some(rec) => {
                            let seen = (g, rec.token.clone(), rec.renewal);
                            let wait = Duration::from_millis(rec.duration_ms).max(opts.duration);
                            match &watching {
                                Some((s, since)) if *s == seen => {
                                    let unchanged = probe.saturating_duration_since(*since);
                                    if unchanged >= wait {
                                        tracing::warn!(lease = %key, holder = %rec, "the {scope} lease was not renewed for {:.1}s: taking over", unchanged.as_secs_f64());
                                        Some(g + 1)
                                    } else {
                                        None
                                    }
                                }
                                _ => {
                                    if watching.as_ref().is_none_or(|(s, _)| s.1 != seen.1) {
                                        tracing::warn!(lease = %key, holder = %rec, "another writer holds the {scope} lease: waiting until it stops (taken over once it is not renewed for {:.0}s)", wait.as_secs_f64());
                                    }
                                    // After the read returned, so no earlier than the
                                    // write it saw landed.
                                    watching = Some((seen, Instant::now()));
                                    None
                                }
                            }
                        }
                    }
                }
            };
            if let Some(generation) = next {
                let key = layout::lease(scope, generation);
                let attempt = Instant::now();
                match write_record(&store, &key, &me, PutMode::CreateNew).await {
                    Ok(()) => {
                        // A writer held up between deciding and writing can create a
                        // generation that was taken and already deleted meanwhile (by the
                        // holder of a higher one): then it holds nothing.
                        match newer_holder(&store, scope, generation).await {
                            Ok(None) => {}
                            Ok(Some(by)) => {
                                tracing::warn!(lease = %key, "created the {scope} lease too late: {by} holds a newer one; waiting");
                                let _ = store.delete(&key).await;
                                continue;
                            }
                            Err(e) => {
                                let _ = store.delete(&key).await;
                                return Err(e);
                            }
                        }
                        tracing::info!(lease = %key, "holding the {scope} lease");
                        for old in gens.iter().filter(|&&g| g < generation) {
                            let _ = store.delete(&layout::lease(scope, *old)).await;
                        }
                        return Ok(Lease::start(store, scope, generation, me, opts, attempt));
                    }
                    // Another writer took this generation first: watch it.
                    Err(StorageError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(storage_err(&key)(e)),
                }
            }
            tokio::time::sleep(opts.renew_every).await;
        }
    }

    fn start(
        store: Repository,
        scope: LeaseScope,
        generation: u64,
        record: LeaseRecord,
        opts: LeaseOptions,
        renewed_at: Instant,
    ) -> Lease {
        let state = Arc::new(Mutex::new(State {
            generation,
            renewed_at,
            lost: None,
        }));
        let (lost_tx, lost_rx) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        let record = Arc::new(Mutex::new(record));
        let guard = LeaseGuard {
            scope,
            opts,
            state,
            lost_rx,
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(renew_loop(
            store.clone(),
            guard.clone(),
            record.clone(),
            lost_tx.clone(),
            stop_rx,
        ));
        Lease {
            guard,
            record,
            store,
            task,
            stop: Some(stop),
            lost_tx,
        }
    }

    /// The lease object currently held.
    pub fn key(&self) -> RepoKey {
        self.guard.key()
    }

    /// What the lease guards.
    pub fn scope(&self) -> LeaseScope {
        self.guard.scope
    }

    /// A handle for upload tasks.
    pub fn guard(&self) -> LeaseGuard {
        self.guard.clone()
    }

    /// `Ok` while the lease is certainly ours (see [`LeaseGuard::check`]).
    pub fn check(&self) -> Result<(), LeaseError> {
        self.guard.check()
    }

    /// Whether the lease is gone for good (then take a new one with `acquire`).
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Gives the lease up (clean shutdown): a waiting writer takes over at once.
    ///
    /// The renewal task is stopped first and waited for: a renewal still in flight would
    /// otherwise land after the released record and hide it, and the waiter would wait a
    /// whole lease. A renewal that does not finish within a lease is abandoned.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(self.guard.opts.duration, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        if self.check().is_err() {
            return Ok(());
        }
        let key = self.key();
        let mut record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        record.released = true;
        record.renewal += 1;
        write_record(&self.store, &key, &record, PutMode::Overwrite)
            .await
            .map_err(storage_err(&key))?;
        tracing::info!(lease = %key, "released the {} lease", self.guard.scope);
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
        let mut s = lock(&self.guard.state);
        if s.lost.is_none() {
            s.lost = Some("the lease was given up by this process".into());
        }
        drop(s);
        let _ = self.lost_tx.send(true);
    }
}

/// What one renewal found.
enum Renewal {
    /// Our generation, renewed in place.
    Renewed,
    /// After renewals had failed for too long: the next generation, created anew.
    Retaken(u64),
    /// Someone else holds a newer generation.
    TakenOver(String),
}

async fn renew_loop(
    store: Repository,
    guard: LeaseGuard,
    record: Arc<Mutex<LeaseRecord>>,
    lost_tx: Arc<watch::Sender<bool>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let (scope, opts) = (guard.scope, guard.opts);
    let mut delay = opts.renew_every;
    // Set when a renewal landed too late to count: the next one re-takes the lease.
    let mut retake = false;
    loop {
        // Stop is only heard between renewals, so `release` never races one in flight.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stop => return,
        }
        let started = Instant::now();
        let generation = lock(&guard.state).generation;
        let unconfirmed = retake || guard.check().is_err();
        // Storage writes are not `Send`: each renewal runs on a blocking thread that
        // drives it on this runtime, so this task (and the lease) can live anywhere.
        //
        // `alive` is dropped with this task when the runtime shuts down (tasks are dropped
        // before the blocking pool is waited for), which ends a renewal in flight instead of
        // leaving its thread blocked on drivers that no longer run: the runtime, and so the
        // process, would otherwise never finish shutting down.
        let (alive, shutdown) = tokio::sync::oneshot::channel::<()>();
        let renewed = {
            let (store, record) = (store.clone(), record.clone());
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                handle.block_on(async move {
                    tokio::select! {
                        r = renew_once(&store, scope, generation, &record, unconfirmed) => r,
                        _ = shutdown => Err(LeaseError::Lost {
                            scope: scope.to_string(),
                            key: layout::lease(scope, generation).to_string(),
                            reason: "the agent is shutting down".into(),
                        }),
                    }
                })
            })
            .await
            .unwrap_or_else(|e| {
                Err(LeaseError::Lost {
                    scope: scope.to_string(),
                    key: layout::lease(scope, generation).to_string(),
                    reason: format!("the renewal task failed: {e}"),
                })
            })
        };
        drop(alive);
        match renewed {
            Ok(Renewal::Renewed) => {
                // Counts only if it landed within `confirm_within` of the start of the
                // previous confirmed write (see the module doc's rules): a waiter that last
                // saw that write may take over from then on.
                let mut s = lock(&guard.state);
                let since_confirmed = s.renewed_at.elapsed();
                if since_confirmed < opts.confirm_within() {
                    s.renewed_at = started;
                    delay = opts.renew_every;
                } else {
                    drop(s);
                    tracing::warn!(lease = %layout::lease(scope, generation), "renewing the {scope} lease took until {:.1}s after the last confirmed write of it started: another writer may have taken it over meanwhile; re-taking it", since_confirmed.as_secs_f64());
                    retake = true;
                    delay = opts.renew_every / 4;
                }
            }
            Ok(Renewal::Retaken(g)) => {
                retake = false;
                {
                    let mut s = lock(&guard.state);
                    s.generation = g;
                    s.renewed_at = started;
                }
                let _ = store.delete(&layout::lease(scope, generation)).await;
                tracing::info!(lease = %layout::lease(scope, g), "the repository answers again: holding the {scope} lease again");
                delay = opts.renew_every;
            }
            Ok(Renewal::TakenOver(reason)) => {
                tracing::error!(lease = %layout::lease(scope, generation), "lost the {scope} lease: {reason}");
                lock(&guard.state).lost = Some(reason);
                let _ = lost_tx.send(true);
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %layout::lease(scope, generation), "renewing the {scope} lease failed, retrying: {e}");
                delay = opts.renew_every / 4;
            }
        }
    }
}

/// One renewal of `generation`; `unconfirmed` (renewals failed for too long, so a waiter
/// may be taking over right now) re-takes the lease with a create-new write instead.
async fn renew_once(
    store: &Repository,
    scope: LeaseScope,
    generation: u64,
    record: &Mutex<LeaseRecord>,
    unconfirmed: bool,
) -> Result<Renewal, LeaseError> {
    let gens = generations(store, scope).await?;
    if let Some(by) = newest_above(store, scope, &gens, generation).await {
        return Ok(Renewal::TakenOver(format!("taken over by {by}")));
    }
    let mut rec = record.lock().unwrap_or_else(|p| p.into_inner()).clone();
    rec.renewal += 1;
    let outcome = if unconfirmed {
        let next = generation + 1;
        let key = layout::lease(scope, next);
        match write_record(store, &key, &rec, PutMode::CreateNew).await {
            // As in `acquire`: created, but perhaps after that generation was taken and
            // deleted by the holder of a higher one.
            Ok(()) => match newer_holder(store, scope, next).await? {
                None => Renewal::Retaken(next),
                Some(by) => {
                    let _ = store.delete(&key).await;
                    return Ok(Renewal::TakenOver(format!("taken over by {by}")));
                }
            },
            Err(StorageError::AlreadyExists { .. }) => {
                return Ok(Renewal::TakenOver(format!(
                    "taken over by another writer ({key})"
                )))
            }
            Err(e) => return Err(storage_err(&key)(e)),
        }
    } else {
        let key = layout::lease(scope, generation);
        write_record(store, &key, &rec, PutMode::Overwrite)
            .await
            .map_err(storage_err(&key))?;
        Renewal::Renewed
    };
    *record.lock().unwrap_or_else(|p| p.into_inner()) = rec;
    for old in gens.iter().filter(|&&g| g < generation) {
        let _ = store.delete(&layout::lease(scope, *old)).await;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::RepoOptions;

    fn fast() -> LeaseOptions {
        LeaseOptions::with_duration(Duration::from_millis(900))
    }

    fn scope() -> LeaseScope {
        LeaseScope::RedisStream
    }

    /// The lease a waiter would judge: (generation, token, renewal) of the highest
    /// generation, read as `acquire` reads it.
    async fn current(repo: &Repository) -> Option<(u64, String, u64)> {
        let store = plain(repo);
        let g = *generations(&store, scope()).await.unwrap().last()?;
        let rec = read_record(&store, &layout::lease(scope(), g))
            .await
            .unwrap()?;
        Some((g, rec.token, rec.renewal))
    }

    /// A second writer waits while the holder renews, takes over once renewals stop (not
    /// before the last renewal has gone unchanged for the lease's duration), and a released
    /// lease is taken at once.
    ///
    /// Under load the product may rightly hand the lease over during the waiting phase: a
    /// machine that starves the holder's renewals for a whole lease makes it expire, and the
    /// holder then stops writing (at its next renewal at the latest). Such a run proves
    /// nothing about waiting, so once that is checked the scenario starts over (three
    /// tries). Every time bound
    /// asserted holds whatever the load: the lower one is measured from an instant the test
    /// observed itself, the upper ones are generous.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_writer_waits_and_takes_over_after_expiry() {
        for attempt in 1..=3 {
            if takeover_scenario().await {
                return;
            }
            eprintln!("attempt {attempt}: the holder's renewals were starved for a whole lease and the lease was rightly handed over; starting again");
        }
        panic!("three runs in a row starved the holder's renewals for a whole lease");
    }

    /// One run of the scenario above; `false` when the load made the lease expire under a
    /// live holder (checked to stop writing).
    async fn takeover_scenario() -> bool {
        const HELD: Duration = Duration::from_secs(3);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("repo").display());
        let repo = Repository::open(&url, RepoOptions::default()).unwrap();
        let held = || LeaseOptions::with_duration(HELD);
        let first = Lease::acquire(&repo, scope(), "first", held())
            .await
            .unwrap();
        assert_eq!(first.key(), layout::lease(scope(), 1));

        // Held and renewed: a second writer keeps waiting well past the lease's duration.
        let waiting = Lease::acquire(&repo, scope(), "second", held());
        tokio::pin!(waiting);
        if let Ok(taken) = tokio::time::timeout(2 * HELD, &mut waiting).await {
            // The holder learns it at its next renewal at the latest, and stops writing.
            let taken = taken.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while first.check().is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "{} was taken and its holder still writes",
                    taken.key()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return false;
        }
        // Still the holder (after a renewal the load delayed, it re-takes the lease as the
        // next generation: `writable` waits for that). Lost only if the waiter's take-over
        // was already under way when the test stopped polling it: the case above.
        match tokio::time::timeout(Duration::from_secs(60), first.guard().writable())
            .await
            .unwrap()
        {
            Ok(()) => {}
            Err(e) => {
                assert!(e.is_lost(), "{e}");
                tokio::time::timeout(Duration::from_secs(60), &mut waiting)
                    .await
                    .unwrap()
                    .unwrap();
                return false;
            }
        }

        // The holder dies without releasing, just after a renewal landed: renewal stops.
        // The waiter cannot have seen that renewal before it landed, which was after
        // `before_landing` (the last instant the test still read the previous one), so it
        // may take over no earlier than a lease's duration after that.
        let seen = current(&repo).await;
        let mut before_landing = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = Instant::now();
            if current(&repo).await != seen {
                break;
            }
            before_landing = now;
            assert!(Instant::now() < deadline, "the holder never renewed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last_held = generation_of(&first);
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(60), &mut waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(
            before_landing.elapsed() >= HELD,
            "taken over {:?} after the last renewal could have landed",
            before_landing.elapsed()
        );
        assert!(generation_of(&second) > last_held);
        // The stale generation goes (a renewal still in flight when the holder died may
        // write it again; the new holder's renewals delete it then).
        let deadline = Instant::now() + Duration::from_secs(30);
        while repo
            .exists(&layout::lease(scope(), last_held))
            .await
            .unwrap()
        {
            assert!(Instant::now() < deadline, "generation {last_held} stayed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Released: the next writer does not wait, where waiting for an expiry would take at
        // least its own lease's duration (a minute here).
        tokio::time::timeout(Duration::from_secs(60), second.guard().writable())
            .await
            .unwrap()
            .unwrap();
        let released = generation_of(&second);
        second.release().await.unwrap();
        let record = read_record(&plain(&repo), &layout::lease(scope(), released))
            .await
            .unwrap()
            .unwrap();
        if !record.released {
            // `release` found the lease unconfirmed (renewals starved again) and rightly
            // wrote nothing: a waiter must then wait for the expiry.
            return false;
        }
        let patient = LeaseOptions::with_duration(Duration::from_secs(60));
        let third = tokio::time::timeout(
            Duration::from_secs(30),
            Lease::acquire(&repo, scope(), "third", patient),
        )
        .await
        .expect("waited for the expiry of a released lease")
        .unwrap();
        assert_eq!(third.key(), layout::lease(scope(), released + 1));
        true
    }

    /// Each scoped view (one Redis Cluster shard) has its own lease: holding one does not
    /// hold up the other, and a second writer of one view still waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scoped_views_hold_leases_of_their_own() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let a = repo.scoped(&RepoKey::parse("shards/a").unwrap()).unwrap();
        let b = repo.scoped(&RepoKey::parse("shards/b").unwrap()).unwrap();
        let la = Lease::acquire(&a, scope(), "a", fast()).await.unwrap();
        let lb = tokio::time::timeout(
            Duration::from_secs(2),
            Lease::acquire(&b, scope(), "b", fast()),
        )
        .await
        .expect("another view's lease does not wait")
        .unwrap();
        let stored: Vec<String> = repo
            .list(&RepoKey::parse("leases").unwrap())
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key.to_string())
            .collect();
        assert_eq!(
            stored,
            [
                "leases/shards/a/redis-stream/0000000000000001",
                "leases/shards/b/redis-stream/0000000000000001"
            ]
        );
        assert_eq!(la.key().as_str(), "leases/redis-stream/0000000000000001");
        assert!(tokio::time::timeout(
            Duration::from_millis(300),
            Lease::acquire(&a, scope(), "a2", fast())
        )
        .await
        .is_err());
        la.release().await.unwrap();
        lb.release().await.unwrap();
    }

    fn generation_of(lease: &Lease) -> u64 {
        lock(&lease.guard.state).generation
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_taken_over_notices_and_stops() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let first = Lease::acquire(&repo, scope(), "first", fast())
            .await
            .unwrap();
        let guard = first.guard();
        // Someone took generation 2 (as a waiter does after expiry).
        let store = plain(&repo);
        let mut rec: LeaseRecord = read_record(&store, &first.key()).await.unwrap().unwrap();
        rec.token = "other".into();
        rec.purpose = "intruder".into();
        write_record(&store, &layout::lease(scope(), 2), &rec, PutMode::CreateNew)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(3), guard.lost())
            .await
            .unwrap();
        let err = guard.check().unwrap_err().to_string();
        assert!(err.contains("taken over by intruder"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_one_of_many_racing_writers_wins() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let tries = (0..6).map(|i| {
            let repo = repo.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_millis(300),
                    Lease::acquire(&repo, scope(), &format!("w{i}"), fast()),
                )
                .await
            }
        });
        let mut winners = Vec::new();
        for l in futures::future::join_all(tries).await.into_iter().flatten() {
            winners.push(l.unwrap());
        }
        assert_eq!(winners.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_holder_on_this_machine_is_not_waited_for() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let store = plain(&repo);
        // A child that has exited (and been reaped): its pid no longer exists.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let rec = LeaseRecord {
            host: host_name(),
            pid: dead,
            started: "then".into(),
            purpose: "crashed".into(),
            token: "t".into(),
            renewal: 0,
            duration_ms: 3_600_000,
            released: false,
            boot_id: boot_id(),
            pid_ns: pid_namespace(),
        };
        assert!(holder_is_dead(&rec));
        write_record(&store, &layout::lease(scope(), 1), &rec, PutMode::CreateNew)
            .await
            .unwrap();
        let l = tokio::time::timeout(
            Duration::from_secs(2),
            Lease::acquire(&repo, scope(), "next", fast()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(l.key(), layout::lease(scope(), 2));
        // Another PID namespace, or a live pid: waited for.
        let elsewhere = LeaseRecord {
            pid_ns: Some("pid:[1]".into()),
            ..rec.clone()
        };
        assert!(!holder_is_dead(&elsewhere));
        let alive = LeaseRecord {
            pid: std::process::id(),
            ..rec
        };
        assert!(!holder_is_dead(&alive));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unrenewed_holder_stops_before_a_waiter_may_take_over() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let lease = Lease::acquire(&repo, scope(), "first", fast())
            .await
            .unwrap();
        let guard = lease.guard();
        lease.task.abort(); // renewal stalls, as with a hung store
        let t = Instant::now();
        while guard.check().is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Unconfirmed (not lost) well before a waiter could take over.
        assert!(t.elapsed() < fast().duration, "{:?}", t.elapsed());
        let err = guard.check().unwrap_err();
        assert!(!err.is_lost(), "{err}");
        assert!(
            tokio::time::timeout(Duration::from_millis(200), guard.writable())
                .await
                .is_err(),
            "writable while unconfirmed"
        );
        drop(lease);
        assert!(guard.check().unwrap_err().is_lost());
        guard.lost().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unconfirmed_holder_retakes_the_next_generation() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let lease = Lease::acquire(&repo, scope(), "first", fast())
            .await
            .unwrap();
        let guard = lease.guard();
        // As if the store had not answered for a while.
        lock(&guard.state).renewed_at = Instant::now() - fast().duration;
        assert!(guard.check().is_err());
        tokio::time::timeout(Duration::from_secs(3), guard.writable())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.key(), layout::lease(scope(), 2));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!repo.exists(&layout::lease(scope(), 1)).await.unwrap());
    }

    /// A memory store whose lease PUTs and GETs a test can fail or hold (see `Held`), to
    /// replay the races of the module doc's rules in paused time, deterministically.
    mod gate {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};

        use async_trait::async_trait;
        use futures::stream::BoxStream;
        use object_store::memory::InMemory;
        use object_store::path::Path;
        use object_store::{
            GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
            PutMultipartOptions, PutOptions, PutPayload, PutResult,
        };
        use tokio::sync::oneshot;

        use crate::{RepoOptions, Repository, RetryPolicy};

        type Slot = Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>;

        #[derive(Default)]
        pub struct Gate {
            inner: InMemory,
            fail_puts: AtomicUsize,
            hold_put: Slot,
            hold_get: Slot,
        }

        impl std::fmt::Debug for Gate {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "Gate")
            }
        }

        impl std::fmt::Display for Gate {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "Gate")
            }
        }

        /// An armed hold: `arrived` resolves when the operation reaches the store; it goes
        /// on when `release` is called.
        pub struct Held {
            arrived: oneshot::Receiver<()>,
            release: oneshot::Sender<()>,
        }

        impl Held {
            pub async fn arrived(&mut self) {
                (&mut self.arrived).await.unwrap();
            }

            pub fn release(self) {
                self.release.send(()).unwrap();
            }
        }

        fn arm(slot: &Slot) -> Held {
            let (arrived_tx, arrived) = oneshot::channel();
            let (release, release_rx) = oneshot::channel();
            *slot.lock().unwrap() = Some((arrived_tx, release_rx));
            Held { arrived, release }
        }

        async fn pass(slot: &Slot) {
            let held = slot.lock().unwrap().take();
            if let Some((arrived, release)) = held {
                arrived.send(()).unwrap();
                release.await.unwrap();
            }
        }

        impl Gate {
            /// The next `n` lease PUTs fail.
            pub fn fail_puts(&self, n: usize) {
                self.fail_puts.store(n, Ordering::SeqCst);
            }

            /// The next lease PUT (after any failing ones) waits before it reaches the
            /// store: a write slow to land.
            pub fn hold_put(&self) -> Held {
                arm(&self.hold_put)
            }

            /// The next lease GET reads the store, then waits before answering: a read
            /// answered late, or a reader starved after its read.
            pub fn hold_get(&self) -> Held {
                arm(&self.hold_get)
            }
        }

        fn is_lease(location: &Path) -> bool {
            location.as_ref().starts_with("leases/")
        }

        #[async_trait]
        impl ObjectStore for Gate {
            async fn put_opts(
                &self,
                location: &Path,
                payload: PutPayload,
                opts: PutOptions,
            ) -> object_store::Result<PutResult> {
                if is_lease(location) {
                    let failing = self
                        .fail_puts
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        return Err(object_store::Error::Generic {
                            store: "Gate",
                            source: "the store failed this write".into(),
                        });
                    }
                    pass(&self.hold_put).await;
                }
                self.inner.put_opts(location, payload, opts).await
            }

            async fn put_multipart_opts(
                &self,
                location: &Path,
                opts: PutMultipartOptions,
            ) -> object_store::Result<Box<dyn MultipartUpload>> {
                self.inner.put_multipart_opts(location, opts).await
            }

            async fn get_opts(
                &self,
                location: &Path,
                options: GetOptions,
            ) -> object_store::Result<GetResult> {
                // The memory store's answer holds the bytes read now.
                let answer = self.inner.get_opts(location, options).await;
                if is_lease(location) {
                    pass(&self.hold_get).await;
                }
                answer
            }

            async fn delete(&self, location: &Path) -> object_store::Result<()> {
                self.inner.delete(location).await
            }

            fn list(
                &self,
                prefix: Option<&Path>,
            ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
                self.inner.list(prefix)
            }

            async fn list_with_delimiter(
                &self,
                prefix: Option<&Path>,
            ) -> object_store::Result<ListResult> {
                self.inner.list_with_delimiter(prefix).await
            }

            async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
                self.inner.copy(from, to).await
            }

            async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
                self.inner.copy_if_not_exists(from, to).await
            }
        }

        /// A repository on a fresh gate; no retries (a retry's backoff would wait for the
        /// paused clock).
        pub fn repo() -> (Arc<Gate>, Repository) {
            let gate = Arc::new(Gate::default());
            let opts = RepoOptions {
                retry: RetryPolicy {
                    max_attempts: 1,
                    ..RetryPolicy::default()
                },
                ..RepoOptions::default()
            };
            let repo = Repository::from_store(gate.clone(), "", "gate://", opts).unwrap();
            (gate, repo)
        }
    }

    /// A lease of 3 s renewed every second (as `with_duration` makes it).
    fn three_seconds() -> LeaseOptions {
        LeaseOptions::with_duration(Duration::from_secs(3))
    }

    /// A record of `purpose` holding the lease for an hour, as another process would write.
    fn other_writer(purpose: &str) -> LeaseRecord {
        LeaseRecord {
            host: "elsewhere".into(),
            pid: 1,
            started: "then".into(),
            purpose: purpose.into(),
            token: purpose.into(),
            renewal: 0,
            duration_ms: 3_600_000,
            released: false,
            boot_id: None,
            pid_ns: None,
        }
    }

    /// Race 1 of the audit: a renewal slow to land. The holder's first renewal fails and
    /// its retry (started 1.25 s after the creation) takes until after a waiter, which last
    /// saw the creation, took over 3 s after it. Counted from its start, that renewal would
    /// let the holder write until 3.25 s, beside the new holder; it landed later than a lease
    /// after the creation started, so it counts for nothing: the holder stays unconfirmed
    /// and then finds the lease lost.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_landing_after_a_take_over_does_not_count() {
        let (gate, repo) = gate::repo();
        let t0 = Instant::now();
        let holder = Lease::acquire(&repo, scope(), "holder", three_seconds())
            .await
            .unwrap();
        let guard = holder.guard();
        let waiter = tokio::spawn({
            let repo = repo.clone();
            async move { Lease::acquire(&repo, scope(), "waiter", three_seconds()).await }
        });
        gate.fail_puts(1);
        let mut slow = gate.hold_put();
        slow.arrived().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(1250));
        assert_eq!(
            current(&repo).await.unwrap().2,
            0,
            "the first renewal failed"
        );

        // The renewal in flight holds the paused clock; move it by hand. The waiter, which
        // first saw the creation at t0, still reads it: it takes generation 2.
        tokio::time::advance(Duration::from_millis(1800)).await;
        let taker = waiter.await.unwrap().unwrap();
        assert_eq!(taker.key(), layout::lease(scope(), 2));
        assert!(guard.check().is_err(), "unconfirmed since 2 s after t0");

        // The renewal lands (3.05 s after t0) and must not make the holder writable again.
        slow.release();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !guard.is_lost() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                guard.check().is_err(),
                "the old holder may write {:?} after t0, while {} is held",
                Instant::now() - t0,
                taker.key()
            );
            assert!(Instant::now() < deadline, "the old holder never noticed");
        }
        assert_eq!(current(&repo).await.unwrap().0, 2);
        assert!(taker.check().is_ok());
    }

    /// Race 2 of the audit: a waiter whose read is answered late (or whose task is starved
    /// right after it) must not take over on that read's old contents. The waiter (polling
    /// every 250 ms) first saw renewal 1 at 1.1 s; its read at 1.35 s returns renewal 1
    /// only at 4.5 s, after renewals 2, 3 and 4 landed on time. Measured from when the read
    /// returned, renewal 1 looks 3.4 s old; the read started 0.25 s after it was first seen.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_does_not_take_over_on_a_read_answered_late() {
        let (gate, repo) = gate::repo();
        let t0 = Instant::now();
        let holder = Lease::acquire(&repo, scope(), "holder", three_seconds())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let polling = LeaseOptions {
            duration: Duration::from_secs(3),
            renew_every: Duration::from_millis(250),
        };
        let mut waiter = tokio::spawn({
            let repo = repo.clone();
            async move { Lease::acquire(&repo, scope(), "waiter", polling).await }
        });
        tokio::time::sleep_until(t0 + Duration::from_millis(1200)).await;
        assert_eq!(current(&repo).await.unwrap().2, 1, "renewed at 1 s");
        let mut late = gate.hold_get();
        late.arrived().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(1350));
        tokio::time::sleep_until(t0 + Duration::from_millis(4500)).await;
        assert_eq!(
            current(&repo).await.unwrap().2,
            4,
            "renewed at 2, 3 and 4 s"
        );
        late.release();

        // The holder keeps renewing on time: the waiter keeps waiting.
        let outcome = tokio::time::timeout(Duration::from_secs(5), &mut waiter).await;
        if let Ok(taken) = outcome {
            panic!(
                "took over at {:?} on a read that started 0.25 s after it saw that renewal: {:?}",
                Instant::now() - t0,
                taken.unwrap().map(|l| l.key())
            );
        }
        assert!(holder.check().is_ok());
        assert_eq!(current(&repo).await.unwrap().0, 1);
        waiter.abort();
    }

    /// A waiter held up between deciding to take generation 2 and writing it, while
    /// generation 2 was taken by another writer that, re-taking, now holds 3 and deleted 2:
    /// its create-new of 2 succeeds, yet it must not hold the lease.
    #[tokio::test(start_paused = true)]
    async fn a_late_creation_of_a_superseded_generation_is_not_held() {
        let (gate, repo) = gate::repo();
        let store = plain(&repo);
        let released = LeaseRecord {
            released: true,
            ..other_writer("gone")
        };
        write_record(
            &store,
            &layout::lease(scope(), 1),
            &released,
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        let mut late = gate.hold_put();
        let mut waiter = tokio::spawn({
            let repo = repo.clone();
            async move { Lease::acquire(&repo, scope(), "late", three_seconds()).await }
        });
        late.arrived().await;
        write_record(
            &store,
            &layout::lease(scope(), 3),
            &other_writer("newer"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        assert!(!repo.exists(&layout::lease(scope(), 2)).await.unwrap());
        late.release();
        let outcome = tokio::time::timeout(Duration::from_secs(10), &mut waiter).await;
        if let Ok(taken) = outcome {
            panic!(
                "holds {:?} while generation 3 is the lease",
                taken.unwrap().map(|l| l.key())
            );
        }
        assert!(!repo.exists(&layout::lease(scope(), 2)).await.unwrap());
        assert_eq!(current(&repo).await.unwrap().0, 3);
        waiter.abort();
    }

    /// The same for a holder re-taking its lease after an outage: its create-new of the
    /// next generation lands after another writer took that one, re-took the one after and
    /// deleted it. The lease is lost, not re-taken.
    #[tokio::test(start_paused = true)]
    async fn a_late_re_take_of_a_superseded_generation_is_lost() {
        let (gate, repo) = gate::repo();
        let holder = Lease::acquire(&repo, scope(), "holder", three_seconds())
            .await
            .unwrap();
        let guard = holder.guard();
        // As if the store had not answered for a while: the next renewal re-takes.
        lock(&guard.state).renewed_at = Instant::now() - three_seconds().duration;
        let mut late = gate.hold_put();
        late.arrived().await;
        write_record(
            &plain(&repo),
            &layout::lease(scope(), 3),
            &other_writer("newer"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        late.release();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            guard.check().is_err(),
            "writable as {} while generation 3 is the lease",
            guard.key()
        );
        tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .unwrap();
        let err = guard.check().unwrap_err().to_string();
        assert!(err.contains("taken over by newer"), "{err}");
        assert_eq!(current(&repo).await.unwrap().0, 3);
        assert!(!repo.exists(&layout::lease(scope(), 2)).await.unwrap());
    }
}
