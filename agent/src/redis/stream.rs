//! `redis stream`: a snapshot generation, then the command stream as chunk objects, resumed
//! with `PSYNC` from the last stored chunk after any restart.
//!
//! The durable point is the end of the last chunk stored with every earlier chunk stored
//! too (uploads run concurrently but complete in order). On start the agent finds that
//! point in the repository itself (newest generation, longest gap-free run of chunks from its
//! snapshot offset; chunks past a gap are orphans of a crash and are deleted), so there is no
//! local state to lose. `+CONTINUE <new id>` is adopted for later chunks; `+FULLRESYNC`
//! starts a new generation.
//!
//! One writer per repository: the stream holds the `redis stream` lease
//! (`storage::lease`), so a second agent waits and takes over only once the first stopped
//! renewing it; every chunk upload checks the lease before writing and the repository
//! marker after, so a repository deleted under the stream stops it with an error.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use storage::{
    layout, ContentKind, Lease, LeaseGuard, LeaseOptions, LeaseScope, PutMode, Repository,
    StorageError,
};
use wire::redis::cluster::SlotRanges;
use wire::redis::command::{CommandDecoder, CommandKind};
use wire::redis::handshake::PsyncReply;
use wire::redis::ReplicationOffset;

use super::chunk::{self, ChunkHeader};
use super::cluster::ClusterPlace;
use super::exec_time::{CommandTimes, ExecBounds, OffsetProbe};
use super::link::{ConnectError, MasterLink};
use super::snapshot;
use super::source::RedisSource;
use crate::job::{self, Control, JobContext, JobError, JobStatus, Outcome, Phase};

/// After a stop request, the stream ends once the master has sent nothing for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// ... or after this long in any case (a master under constant load is never quiet).
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Knobs of `redis stream`.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// A chunk is stored at least this often while traffic flows.
    pub max_lag: Duration,
    /// A chunk is also cut at this size (at a command boundary outside MULTI/EXEC).
    pub max_chunk_bytes: usize,
    /// Chunk uploads in flight before reading waits for the oldest.
    pub uploads_in_flight: usize,
    /// Take a new snapshot generation this often (if the offset moved), so a restore
    /// never replays more than this much of the stream.
    pub snapshot_every: Option<Duration>,
    /// Local directory where cut chunks wait (fsynced) while the store is slower than the
    /// master, so the socket keeps being read at line rate.
    pub spool: Option<std::path::PathBuf>,
    /// Most bytes the spool may hold; when full, reading pauses (and the master may drop
    /// the connection, which is then resumed with PSYNC) rather than losing data.
    pub spool_limit: u64,
    /// What to do when the source is a replica.
    pub on_replica: ReplicaPolicy,
    /// Stream a Redis Cluster node's shard alone (else a cluster node is refused, see
    /// [`super::cluster`]).
    pub cluster_shard_only: bool,
}

/// What `redis stream` does when its source is a replica (`ROLE` says `slave`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaPolicy {
    /// Stream from the replica itself (chained replication; the replication id is the
    /// master's, so a failover continues with PSYNC). Needs no `+role`.
    #[default]
    Stream,
    /// Wait, not ready, until the server is promoted: one sidecar per pod, only the
    /// master's streams.
    Wait,
    /// Stream from the master the replica reports (same credentials and TLS settings).
    Follow,
}

/// The source is a replica and the policy is to wait for its promotion.
#[derive(Debug, thiserror::Error)]
#[error("{server} is a replica of {master}: waiting until it is promoted (on_replica = wait)")]
pub struct SourceIsReplica {
    server: String,
    master: String,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(1),
            max_chunk_bytes: 16 << 20,
            uploads_in_flight: 4,
            snapshot_every: Some(Duration::from_secs(15 * 60)),
            spool: None,
            spool_limit: 1 << 30,
            on_replica: ReplicaPolicy::Stream,
            cluster_shard_only: false,
        }
    }
}

/// The repository vanished under the stream: reconnecting cannot fix it.
#[derive(Debug, thiserror::Error)]
#[error("the repository {url} is gone ({why}): it was deleted, unmounted or replaced while the stream was running; stopping")]
pub struct RepositoryGone {
    url: String,
    why: String,
}

impl From<RepositoryGone> for JobError {
    fn from(e: RepositoryGone) -> JobError {
        JobError::fatal(e)
    }
}

/// Checks that the repository marker is still there after a chunk was stored.
async fn ensure_marker(repo: &Repository) -> Result<(), JobError> {
    let gone = |why: String| RepositoryGone {
        url: repo.url().to_owned(),
        why,
    };
    match repo.exists(&layout::marker()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(gone(format!("its marker {} is missing", layout::marker())).into()),
        Err(e @ StorageError::RepositoryMissing { .. }) => Err(gone(e.to_string()).into()),
        Err(e) => Err(JobError::from(e).context("checking the repository marker")),
    }
}

/// Runs the stream until a fatal error or `token` is cancelled (then what was read is
/// stored), reconnecting with backoff otherwise ([`job::supervise`]): every attempt
/// resumes from what the repository holds. Its state is published on `status`.
pub async fn run(
    repo: &Repository,
    source: &RedisSource,
    opts: &StreamOptions,
    ctl: Control,
) -> Result<()> {
    let mut lease: Option<Lease> = None;
    // The slots of the shard streamed (cluster_shard_only), to warn when they change.
    let mut shard: Option<SlotRanges> = None;
    let result = job::supervise(
        "redis stream",
        &ctl.token,
        &ctl.status,
        job::Backoff::default(),
        async |attempt| {
            let stop = ctl.token.clone().cancelled_owned();
            let first = attempt == 1;
            let leased = run_leased(
                repo,
                source,
                opts,
                &mut lease,
                &mut shard,
                stop,
                &ctl.status,
                first,
            );
            match leased.await {
                Ok(()) if ctl.token.is_cancelled() => Ok(Outcome::Stopped),
                Ok(()) => Err(JobError::transient(anyhow::anyhow!("the stream ended"))),
                Err(e) => {
                    if e.lets_go() {
                        // Not writing: the sidecar beside the master may take the lease.
                        if let Some(l) = lease.take() {
                            let _ = l.release().await;
                        }
                    }
                    Err(e)
                }
            }
        },
    )
    .await;
    if let Some(l) = lease.take() {
        if let Err(e) = l.release().await {
            tracing::warn!("could not release the lease (it expires by itself): {e}");
        }
    }
    result
}

/// Connects to `source`: a first attempt that times out is fatal (a wrong host or port,
/// not a blip); later, the master is unreachable for now (a restart, a failover).
async fn connect(source: &RedisSource, first_attempt: bool) -> Result<MasterLink, JobError> {
    MasterLink::connect(source).await.map_err(|e| match e {
        ConnectError::TimedOut(t) if first_attempt => JobError::fatal(t),
        e => e.into(),
    })
}

/// Logs the slots a shard-only stream covers: at start, and a warning when they changed
/// since the last connection (a failover, a resharding).
fn note_shard(place: &ClusterPlace, known: &mut Option<SlotRanges>) {
    match known {
        None => tracing::info!(
            slots = %place.slots,
            "{}: streaming this shard only (cluster_shard_only)",
            place.describe()
        ),
        Some(before) if *before != place.slots => tracing::warn!(
            before = %before,
            now = %place.slots,
            "the slots of the streamed shard changed: {}; the stream covers these slots only",
            place.describe()
        ),
        Some(_) => {}
    }
    *known = Some(place.slots.clone());
}

/// Connects, holds the repository's `redis stream` lease (kept in `lease` across retries;
/// waiting, and logging who holds it, while another writer has it), then streams until
/// `stop` resolves (then stores what was read) or an error occurs. A Redis Cluster node is
/// refused (fatal) unless `opts.cluster_shard_only`; `shard` keeps its slots across retries.
#[allow(clippy::too_many_arguments)]
async fn run_leased(
    repo: &Repository,
    source: &RedisSource,
    opts: &StreamOptions,
    lease: &mut Option<Lease>,
    shard: &mut Option<SlotRanges>,
    stop: impl std::future::Future<Output = ()>,
    status: &JobStatus,
    first_attempt: bool,
) -> Result<(), JobError> {
    tokio::pin!(stop);
    // Connect first: a wrong source fails before anything is written, even a lease.
    let mut link = connect(source, first_attempt).await?;
    // So does a cluster node captured alone without being asked to (one shard's data).
    if let Some(place) = super::cluster::check(&mut link, opts.cluster_shard_only).await? {
        note_shard(&place, shard);
    }
    let followed;
    let source = match opts.on_replica {
        ReplicaPolicy::Stream => source,
        policy => match link.master_of().await? {
            None => source,
            Some((host, port)) if policy == ReplicaPolicy::Wait => {
                return Err(JobError::waiting(SourceIsReplica {
                    server: source.endpoint(),
                    master: format!("{host}:{port}"),
                }));
            }
            Some((host, port)) => {
                let mut master = source.clone();
                master.host = host;
                master.port = port;
                tracing::info!(replica = %source.endpoint(), master = %master.endpoint(), "the source is a replica: streaming from its master (on_replica = follow)");
                link = connect(&master, first_attempt).await?;
                followed = master;
                &followed
            }
        },
    };
    if lease.as_ref().is_none_or(|l| l.is_lost()) {
        *lease = None;
        let purpose = format!("redis stream (source {})", source.endpoint());
        status.update(|s| {
            s.phase = Phase::Waiting;
            s.waiting_for = Some("the redis stream lease (another writer may hold it)".into());
        });
        tokio::select! {
            l = Lease::acquire(repo, LeaseScope::RedisStream, &purpose, LeaseOptions::from_env()) => {
                *lease = Some(l.job_context("taking the stream's lease in the repository")?);
            }
            () = &mut stop => return Ok(()),
        }
    }
    let guard = lease
        .as_ref()
        .map(Lease::guard)
        .context("the lease was just taken")?;
    stream_connected(repo, source, link, opts, &guard, stop, status).await
}

/// Where the repository says streaming continues.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    /// The generation being extended.
    pub generation: layout::GenerationId,
    /// Replication ID for `PSYNC`.
    pub replid: String,
    /// Durable offset.
    pub offset: ReplicationOffset,
    /// Database selected at that offset.
    pub db: u32,
}

/// Finds where to resume in the newest generation of the catalog. Chunks left off its chain
/// (past a gap a killed run left behind) are deleted first: the stream is about to write
/// the chain's continuation over that range, and two chunks for one range would fork it.
pub async fn resume_point(repo: &Repository) -> Result<Option<ResumePoint>> {
    let catalog = crate::catalog::redis::RedisCatalog::load(repo).await?;
    let Some(g) = catalog.latest() else {
        return Ok(None);
    };
    for key in &g.orphans {
        tracing::warn!(%key, "deleting a chunk left behind a gap by an interrupted run");
        repo.delete(key)
            .await
            .with_context(|| format!("deleting orphan chunk {key}"))?;
    }
    let Some(&(start, end)) = g.chain.last() else {
        return Ok(Some(ResumePoint {
            generation: g.id.clone(),
            replid: g.manifest.replid.clone(),
            offset: ReplicationOffset(g.manifest.snapshot_offset),
            db: g.manifest.db_at_snapshot,
        }));
    };
    let key = layout::redis_chunk(&g.id, start, end);
    let data = repo
        .get(&key)
        .await
        .with_context(|| format!("reading {key}"))?;
    let (header, _) = chunk::decode(key.as_str(), data)?;
    if let Some(&(_, ms)) = header.time_index.last() {
        raise_index_clock(ms);
    }
    Ok(Some(ResumePoint {
        generation: g.id.clone(),
        replid: header.replid,
        offset: ReplicationOffset(end),
        db: header.db_at_end,
    }))
}

struct ChunkBuilder {
    start: u64,
    db_at_start: u32,
    body: chunk::ChunkBody,
    commands: u64,
    index: Vec<(u64, i64)>,
    opened: Instant,
    /// Arrival of the first command, for the lag logged when the chunk is stored.
    first_ms: Option<i64>,
}

/// The wall clock in Unix milliseconds for the time index, never going back within this
/// process: a wall clock stepped back (an NTP correction) would otherwise give a later
/// command an earlier time, and `redis verify` / `redis restore` refuse an index whose times
/// go back. Commands that arrive while the clock catches up share the last time.
fn index_now_ms() -> i64 {
    let now = chrono::Utc::now().timestamp_millis();
    let prev = INDEX_CLOCK.fetch_max(now, Ordering::Relaxed);
    prev.max(now)
}

/// The newest time the index has used; raised at resume from the last stored chunk, so a
/// clock stepped back across an agent restart does not go back either.
static INDEX_CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);

fn raise_index_clock(ms: i64) {
    INDEX_CLOCK.fetch_max(ms, Ordering::Relaxed);
}

impl ChunkBuilder {
    /// Records that nothing else had been executed by `now_ms`
    /// ([`CommandTimes::sealed`]): a restore to a time between the last command and the
    /// cut needs no later chunk.
    fn seal(&mut self, end: u64, now_ms: i64) {
        match self.index.last_mut() {
            Some(last) if last.1 >= now_ms => last.0 = end,
            _ => self.index.push((end, now_ms)),
        }
    }

    fn new(start: u64, db: u32) -> Self {
        Self {
            start,
            db_at_start: db,
            body: chunk::ChunkBody::default(),
            commands: 0,
            index: Vec::new(),
            opened: Instant::now(),
            first_ms: None,
        }
    }
}

/// A new generation taken on a second connection while the first keeps streaming.
struct NextGeneration {
    link: MasterLink,
    generation: layout::GenerationId,
    replid: String,
    offset: ReplicationOffset,
    db: u32,
    /// The snapshot's time (when `+FULLRESYNC` arrived), in Unix milliseconds.
    snapshot_ms: i64,
}

/// Opens a second replica connection, takes a full sync and stores it as a generation.
async fn take_generation(
    repo: &Repository,
    source: &RedisSource,
    lease: &LeaseGuard,
) -> Result<NextGeneration, JobError> {
    let mut link = MasterLink::connect(source).await?;
    let PsyncReply::FullResync { replid, offset } = link.psync(None).await? else {
        return Err(anyhow::anyhow!("the master answered PSYNC ? -1 with +CONTINUE").into());
    };
    let replied_at = chrono::Utc::now();
    full_sync(repo, link, replid, offset, replied_at, lease).await
}

async fn full_sync(
    repo: &Repository,
    mut link: MasterLink,
    replid: String,
    offset: ReplicationOffset,
    replied_at: chrono::DateTime<chrono::Utc>,
    lease: &LeaseGuard,
) -> Result<NextGeneration, JobError> {
    lease.writable().await?;
    snapshot::ensure_redis_repo(repo, &replid).await?;
    let captured = snapshot::capture(repo, &mut link, &replid, offset, replied_at).await?;
    let generation = layout::GenerationId::parse(&captured.manifest.generation)?;
    tracing::info!(generation = %generation, bytes = captured.object.original_len, "snapshot stored");
    if captured.manifest.snapshot.diskless {
        // After a diskless payload the master waits for an ACK before streaming.
        link.ack_sender().ack(offset).await?;
    }
    Ok(NextGeneration {
        link,
        generation,
        replid,
        offset,
        db: captured.manifest.db_at_snapshot,
        snapshot_ms: captured.manifest.snapshot_unix_ms,
    })
}

/// Sends `REPLCONF ACK <received offset>` every second until dropped.
struct Acker(tokio::task::JoinHandle<()>);

impl Acker {
    fn start(link: &MasterLink, received: Arc<AtomicU64>) -> Acker {
        let ack = link.ack_sender();
        Acker(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = ack
                    .ack(ReplicationOffset(received.load(Ordering::Relaxed)))
                    .await
                {
                    tracing::debug!("REPLCONF ACK failed: {e:#}");
                    return;
                }
            }
        }))
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Streams from `link` (connected, before `PSYNC`) until `stop` resolves (then stores what
/// was read) or an error occurs, writing only while `lease` holds.
async fn stream_connected(
    repo: &Repository,
    source: &RedisSource,
    mut link: MasterLink,
    opts: &StreamOptions,
    lease: &LeaseGuard,
    stop: impl std::future::Future<Output = ()>,
    status: &JobStatus,
) -> Result<(), JobError> {
    if let Some(dir) = &opts.spool {
        lease.writable().await?;
        recover_spool(repo, dir).await?;
    }
    let resume = resume_point(repo).await?;
    let reply = link
        .psync(
            resume
                .as_ref()
                .map(|r| (r.replid.as_str(), r.offset.psync_start())),
        )
        .await?;
    let replied_at = chrono::Utc::now();
    let (mut generation, mut replid, mut offset, mut db, snapshot_floor_ms) = match (reply, resume)
    {
        (PsyncReply::Continue { replid: new_id }, Some(r)) => {
            let replid = new_id.unwrap_or(r.replid);
            tracing::info!(generation = %r.generation, offset = %r.offset, %replid, "resumed with PSYNC, no new snapshot");
            (r.generation, replid, r.offset, r.db, i64::MIN)
        }
        (PsyncReply::Continue { .. }, None) => {
            return Err(anyhow::anyhow!("the master answered PSYNC ? -1 with +CONTINUE").into())
        }
        (PsyncReply::FullResync { replid, offset }, resume) => {
            if let Some(r) = resume {
                tracing::info!(previous = %r.generation, "the master cannot continue from offset {}: new generation", r.offset);
            }
            let next = full_sync(repo, link, replid, offset, replied_at, lease).await?;
            link = next.link;
            (
                next.generation,
                next.replid,
                next.offset,
                next.db,
                next.snapshot_ms,
            )
        }
    };

    status.running();
    status.durable(offset, offset.get(), None);
    // The master is told the durable offset: WAIT then means "stored in the repository".
    let received = Arc::new(AtomicU64::new(offset.get()));
    let mut acker = Acker::start(&link, received.clone());
    let mut decoder = CommandDecoder::new();
    let mut chunk = ChunkBuilder::new(offset.get(), db);
    let mut in_multi = false;
    let mut uploads = ChunkQueue::new(repo, opts, lease.clone(), status.clone())?;
    let mut durable = offset;
    let mut generation_started = Instant::now();
    let mut generation_offset = offset;
    let mut next_gen: Option<LocalBoxFuture<'_, Result<NextGeneration, JobError>>> = None;
    let mut switch_to: Option<NextGeneration> = None;
    // Recorded while a new generation is taken; borrowed by it after the switch.
    let mut arrivals: Option<ExecBounds> = None;
    let probe = OffsetProbe::start(source.clone(), index_now_ms);
    let mut times = CommandTimes::new(index_now_ms, Some(probe), snapshot_floor_ms);
    tokio::pin!(stop);
    let lost = lease.lost();
    tokio::pin!(lost);
    // Set once stop is asked: reading goes on until the master has been quiet for
    // DRAIN_QUIET (or DRAIN_LIMIT passed), so writes it already acknowledged to its
    // clients, and sent or was sending to us, are stored rather than left in the socket.
    let mut draining: Option<Instant> = None;
    // The end of the last `REPLCONF GETACK` not yet acknowledged as stored: the master waits
    // for it (`WAIT`, and Valkey 8+'s `CLUSTER SETSLOT`, which waits for every replica that
    // announced a version above 7.2, the agent included, for 2 s by default). Its chunk is
    // cut at once and acknowledged as soon as it is stored, not at the next second's ACK.
    let mut ack_due: Option<u64> = None;
    let outcome: Result<(), JobError> = loop {
        // Uploads complete in order; the durable offset follows them.
        while uploads.is_full() {
            match uploads.next_done().await {
                Some(Ok(end)) => {
                    durable = ReplicationOffset(end);
                    status.durable(durable, end, Some(uploads.last_lag()));
                    received.fetch_max(end, Ordering::Relaxed);
                    if ack_due.is_some_and(|want| end >= want) {
                        ack_due = None;
                        if let Err(e) = link.ack_sender().ack(durable).await {
                            return Err(e);
                        }
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        if let Some(every) = opts.snapshot_every {
            if draining.is_none()
                && next_gen.is_none()
                && switch_to.is_none()
                && generation_started.elapsed() >= every
            {
                if offset > generation_offset {
                    tracing::info!(previous = %generation, "taking a new snapshot generation (--snapshot-every)");
                    next_gen = Some(Box::pin(take_generation(repo, source, lease)));
                    arrivals = Some(ExecBounds::default());
                } else {
                    generation_started = Instant::now();
                }
            }
        }
        // Cut early enough that the oldest command is durable within --max-lag, given how
        // long recent uploads took.
        let budget = opts
            .max_lag
            .saturating_sub(uploads.upload_estimate())
            .max(opts.max_lag / 4);
        let wait = match draining {
            Some(_) => DRAIN_QUIET,
            // Nothing to cut into until an upload completes, which wakes this loop.
            None if !uploads.has_room() => budget,
            None => budget
                .saturating_sub(chunk.opened.elapsed())
                .max(Duration::from_millis(1)),
        };
        let next = tokio::select! {
            biased;
            () = &mut stop, if draining.is_none() => {
                tracing::info!("stopping: storing what the master has already sent");
                status.update(|s| s.phase = Phase::Stopping);
                draining = Some(Instant::now());
                continue;
            }
            // Another writer may own the chain now: stop writing (uploads refuse too).
            () = &mut lost => break Err(match lease.check() {
                Err(e) => e.into(),
                Ok(()) => anyhow::anyhow!("lost the redis stream lease").into(),
            }),
            Some(done) = uploads.next_done(), if uploads.is_busy() => {
                match done {
                    Ok(end) => {
                        durable = ReplicationOffset(end);
                        status.durable(durable, end, Some(uploads.last_lag()));
                        received.fetch_max(end, Ordering::Relaxed);
                        if ack_due.is_some_and(|want| end >= want) {
                            ack_due = None;
                            if let Err(e) = link.ack_sender().ack(durable).await {
                                break Err(e);
                            }
                        }
                    }
                    Err(e) => break Err(e),
                }
                continue;
            }
            taken = async { next_gen.as_mut().expect("guarded").await }, if next_gen.is_some() => {
                next_gen = None;
                match taken {
                    Ok(next) => switch_to = Some(next),
                    Err(e) => {
                        tracing::warn!("taking a new generation failed, keeping the current one: {e:#}");
                        generation_started = Instant::now();
                        arrivals = None;
                    }
                }
                continue;
            }
            next = link.next_command_within(&mut decoder, wait) => next,
        };
        let cmd = match next {
            Ok(c) => c,
            Err(e) => break Err(e),
        };
        let quiet = cmd.is_none();
        if let Some(cmd) = cmd {
            offset = offset.advance(cmd.wire_len());
            let now_ms = times.command(&replid, offset.get());
            if let Some(times) = arrivals.as_mut() {
                times.record(offset.get(), now_ms);
            }
            match cmd.kind() {
                CommandKind::Multi => in_multi = true,
                CommandKind::Exec => in_multi = false,
                CommandKind::Select(n) => db = n,
                CommandKind::ReplconfGetAck => {
                    let acked = ReplicationOffset(received.load(Ordering::Relaxed));
                    if let Err(e) = link.ack_sender().ack(acked).await {
                        break Err(e);
                    }
                    if acked < offset {
                        ack_due = Some(offset.get());
                    }
                }
                CommandKind::Ping
                | CommandKind::Replconf
                | CommandKind::Cluster
                | CommandKind::Other => {}
            }
            // Room for a full chunk at once, plus a command that crosses the size.
            chunk
                .body
                .extend(&cmd.raw, opts.max_chunk_bytes + (1 << 20));
            chunk.commands += 1;
            chunk.first_ms.get_or_insert(now_ms);
            if !in_multi {
                match chunk.index.last_mut() {
                    Some(last) if last.1 >= now_ms => last.0 = offset.get(),
                    _ => chunk.index.push((offset.get(), now_ms)),
                }
            }
        }
        // The old generation must cover everything up to the new snapshot's offset; then
        // the new connection takes over (a different history switches at once).
        let switch_now = switch_to
            .as_ref()
            .is_some_and(|n| !in_multi && (n.replid != replid || offset >= n.offset));
        // Without a spool, a chunk cut while every upload slot is taken would stop reading
        // until one frees: the chunk grows instead (up to its size), so the socket is read
        // on time and, after a slow upload, the next one carries everything since.
        let due = ((chunk.opened.elapsed() >= budget || ack_due.is_some()) && uploads.has_room())
            || chunk.body.len() >= opts.max_chunk_bytes;
        if !chunk.body.is_empty() && !in_multi && (due || switch_now) {
            let mut full = std::mem::replace(&mut chunk, ChunkBuilder::new(offset.get(), db));
            full.seal(offset.get(), times.sealed(&replid, offset.get()));
            if let Err(e) = uploads.push(&generation, &replid, full, offset.get(), db) {
                break Err(e.into());
            }
        } else if chunk.body.is_empty() && due {
            chunk.opened = Instant::now();
        }
        if switch_now {
            if let Some(next) = switch_to.take() {
                tracing::info!(from = %generation, to = %next.generation, "switched to the new generation");
                // The same offsets, already read here, are read again on the new link.
                times.switched(
                    arrivals
                        .take()
                        .filter(|_| next.replid == replid)
                        .and_then(|a| a.after(next.offset.get())),
                    next.snapshot_ms,
                );
                link = next.link;
                generation = next.generation;
                replid = next.replid;
                offset = next.offset;
                db = next.db;
                decoder = CommandDecoder::new();
                chunk = ChunkBuilder::new(offset.get(), db);
                received.fetch_max(offset.get(), Ordering::Relaxed);
                acker = Acker::start(&link, received.clone());
                ack_due = None;
                generation_started = Instant::now();
                generation_offset = offset;
            }
        }
        if let Some(since) = draining {
            // A transaction is stored whole: keep reading to its EXEC (within the limit).
            if (quiet && !in_multi) || since.elapsed() >= DRAIN_LIMIT {
                break Ok(());
            }
        }
    };
    // Store what was read, then wait for every upload, so a clean stop loses nothing.
    if outcome.is_ok() {
        status.update(|s| s.phase = Phase::Stopping);
    }
    let mut finished = Ok(());
    if !chunk.body.is_empty() {
        if !in_multi {
            chunk.seal(offset.get(), times.sealed(&replid, offset.get()));
        }
        if let Err(e) = uploads.push(&generation, &replid, chunk, offset.get(), db) {
            finished = Err(e.into());
        }
    }
    while let Some(done) = uploads.next_done().await {
        match done {
            Ok(end) => {
                durable = ReplicationOffset(end);
                status.durable(durable, end, Some(uploads.last_lag()));
            }
            Err(e) => {
                finished = Err(e);
                break;
            }
        }
    }
    drop(acker);
    tracing::info!(generation = %generation, durable = %durable, "stream stopped");
    outcome.and(finished)
}

type Uploads<'a> = FuturesOrdered<LocalBoxFuture<'a, Result<u64, JobError>>>;

/// Where a cut chunk waits for its upload.
enum Waiting {
    Memory(Bytes),
    Spooled(PathBuf, u64),
}

struct Pending {
    key: layout::RepoKey,
    end: u64,
    first_ms: Option<i64>,
    cut: Instant,
    data: Waiting,
}

/// Cut chunks on their way to the repository, in offset order: a few uploads in flight,
/// the rest waiting in the spool directory (or, without one, reading waits).
struct ChunkQueue<'a> {
    repo: &'a Repository,
    lease: LeaseGuard,
    uploads: Uploads<'a>,
    waiting: VecDeque<Pending>,
    in_flight: usize,
    spool: Option<PathBuf>,
    spool_limit: u64,
    spooled: u64,
    full_reported: bool,
    /// Smoothed time from cut to stored, updated by each finished upload.
    estimate: std::rc::Rc<std::cell::Cell<Duration>>,
    /// How long the oldest command of the last stored chunk waited to become durable.
    last_lag: std::rc::Rc<std::cell::Cell<Duration>>,
    /// Where failed writes are counted.
    status: JobStatus,
}

impl<'a> ChunkQueue<'a> {
    fn new(
        repo: &'a Repository,
        opts: &StreamOptions,
        lease: LeaseGuard,
        status: JobStatus,
    ) -> Result<Self> {
        if let Some(dir) = &opts.spool {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the spool {}", dir.display()))?;
        }
        Ok(Self {
            repo,
            lease,
            uploads: FuturesOrdered::new(),
            waiting: VecDeque::new(),
            in_flight: opts.uploads_in_flight.max(1),
            spool: opts.spool.clone(),
            spool_limit: opts.spool_limit,
            spooled: 0,
            full_reported: false,
            estimate: Default::default(),
            last_lag: Default::default(),
            status,
        })
    }

    /// How long a chunk currently takes from cut to stored.
    fn last_lag(&self) -> Duration {
        self.last_lag.get()
    }

    fn upload_estimate(&self) -> Duration {
        self.estimate.get()
    }

    /// Uploads running or chunks waiting.
    fn is_busy(&self) -> bool {
        !self.uploads.is_empty() || !self.waiting.is_empty()
    }

    /// Whether a chunk cut now would start uploading (or wait in the spool) rather than
    /// make reading wait.
    fn has_room(&self) -> bool {
        self.spool.is_some() || (self.uploads.len() < self.in_flight && self.waiting.is_empty())
    }

    /// Whether reading must pause until an upload completes.
    fn is_full(&mut self) -> bool {
        let full = match &self.spool {
            Some(dir) => {
                let full = self.spooled >= self.spool_limit;
                if full && !self.full_reported {
                    tracing::error!(
                        spool = %dir.display(),
                        bytes = self.spooled,
                        "the spool is full: not reading from the master until the store catches up; \
                         if the master drops the connection the agent resumes with PSYNC from what is stored"
                    );
                }
                full
            }
            None => !self.waiting.is_empty(),
        };
        self.full_reported = full;
        full
    }

    fn push(
        &mut self,
        generation: &layout::GenerationId,
        replid: &str,
        chunk: ChunkBuilder,
        end: u64,
        db_at_end: u32,
    ) -> Result<()> {
        let header = ChunkHeader {
            replid: replid.to_owned(),
            start: chunk.start,
            end,
            db_at_start: chunk.db_at_start,
            db_at_end,
            commands: chunk.commands,
            time_index: chunk.index,
        };
        let data = chunk.body.into_object(&header)?;
        let key = layout::redis_chunk(generation, header.start, end);
        let data = match &self.spool {
            Some(dir) if self.uploads.len() >= self.in_flight || !self.waiting.is_empty() => {
                let path = dir.join(format!(
                    "{generation}__{:020}-{end:020}.chunk",
                    header.start
                ));
                write_synced(&path, &data)?;
                self.spooled += data.len() as u64;
                Waiting::Spooled(path, data.len() as u64)
            }
            _ => Waiting::Memory(data),
        };
        self.waiting.push_back(Pending {
            key,
            end,
            first_ms: chunk.first_ms,
            cut: Instant::now(),
            data,
        });
        self.refill()
    }

    fn refill(&mut self) -> Result<()> {
        while self.uploads.len() < self.in_flight {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            let (data, spooled) = match p.data {
                Waiting::Memory(b) => (b, None),
                Waiting::Spooled(path, len) => {
                    let b = std::fs::read(&path)
                        .with_context(|| format!("reading spooled {}", path.display()))?;
                    self.spooled -= len;
                    (Bytes::from(b), Some(path))
                }
            };
            let repo = self.repo;
            let (key, end, first_ms, cut) = (p.key, p.end, p.first_ms, p.cut);
            let estimate = self.estimate.clone();
            let last_lag = self.last_lag.clone();
            let lease = self.lease.clone();
            let status = self.status.clone();
            self.uploads.push_back(Box::pin(async move {
                lease.writable().await?;
                let put = repo
                    .put(&key, ContentKind::RedisCommands, data, PutMode::CreateNew)
                    .await;
                if put.is_err() {
                    status.update(|s| s.upload_errors += 1);
                }
                match put {
                    Ok(_) => {}
                    // The local store never recreates a vanished repository directory.
                    Err(e @ StorageError::RepositoryMissing { .. }) => {
                        return Err(RepositoryGone {
                            url: repo.url().to_owned(),
                            why: e.to_string(),
                        }
                        .into())
                    }
                    Err(e) => return Err(JobError::from(e).context(format!("storing {key}"))),
                }
                ensure_marker(repo).await?;
                if let Some(path) = spooled {
                    let _ = std::fs::remove_file(path);
                }
                let took = cut.elapsed();
                estimate.set((estimate.get() * 3 + took) / 4);
                if let Some(first) = first_ms {
                    // The oldest command in the chunk waited this long to become durable.
                    let lag_ms = chrono::Utc::now().timestamp_millis() - first;
                    last_lag.set(Duration::from_millis(lag_ms.max(0) as u64));
                    tracing::debug!(%key, end, lag_ms, "chunk stored");
                }
                Ok(end)
            }));
        }
        Ok(())
    }

    /// The next completed upload (in offset order), refilling from the waiting chunks.
    async fn next_done(&mut self) -> Option<Result<u64, JobError>> {
        if self.uploads.is_empty() {
            if let Err(e) = self.refill() {
                return Some(Err(e.into()));
            }
        }
        let done = self.uploads.next().await?;
        if let Err(e) = self.refill() {
            return Some(Err(e.into()));
        }
        Some(done)
    }
}

fn write_synced(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Uploads chunks a previous run left in the spool (they were cut and fsynced, maybe never
/// stored), oldest first, so the repository's resume point includes them.
pub async fn recover_spool(repo: &Repository, dir: &std::path::Path) -> Result<usize, JobError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut files: Vec<(String, u64, u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".chunk")?;
            let (generation, range) = stem.split_once("__")?;
            let (s, t) = range.split_once('-')?;
            Some((
                generation.to_owned(),
                s.parse().ok()?,
                t.parse().ok()?,
                e.path(),
            ))
        })
        .collect();
    files.sort();
    let count = files.len();
    for (generation, start, end, path) in files {
        let id = layout::GenerationId::parse(&generation)?;
        let key = layout::redis_chunk(&id, start, end);
        let data =
            std::fs::read(&path).with_context(|| format!("reading spooled {}", path.display()))?;
        chunk::decode(key.as_str(), Bytes::from(data.clone()))?;
        match repo
            .put(
                &key,
                ContentKind::RedisCommands,
                Bytes::from(data),
                PutMode::CreateNew,
            )
            .await
        {
            Ok(_) => {}
            Err(storage::StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(JobError::from(e).context(format!("storing spooled {key}"))),
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        tracing::info!(%key, "stored a chunk left in the spool by the previous run");
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_time_never_goes_back() {
        // A resumed chain whose last time is ahead of the wall clock (stepped back).
        let ahead = chrono::Utc::now().timestamp_millis() + 60_000;
        raise_index_clock(ahead);
        assert!(index_now_ms() >= ahead);
        let mut prev = index_now_ms();
        for _ in 0..1000 {
            let now = index_now_ms();
            assert!(now >= prev);
            prev = now;
        }
    }
}
