//! `postgres stream`: a physical replication client that writes WAL into the repository.
//!
//! Like `pg_receivewal`, but the "disk" is the repository and the flush position we report
//! is what the repository holds, so the slot (and, with `--synchronous`, every commit) only
//! moves past WAL that is safe. The shape follows Neon's safekeeper WAL backup: uploads run
//! concurrently but complete in order (`FuturesOrdered`), and the flush LSN advances only
//! past a contiguous prefix of finished uploads.
//!
//! Resuming needs no local state: the slot's `restart_lsn` is the last flush we reported,
//! and everything before it is in the repository, so a restart streams again from the start
//! of that segment; segments already stored are compared and skipped.
//!
//! One writer per (repository, timeline): the stream holds a lease (`storage::lease`)
//! before it writes anything, so a second agent (another sidecar, another slot) waits and
//! takes over only once the first has stopped renewing it. Every upload checks the lease
//! before writing and the repository marker after, before its WAL is confirmed to the
//! server: a repository deleted under the stream stops it with the slot where it was.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{Future, StreamExt};
use storage::{
    ContentKind, Lease, LeaseGuard, LeaseOptions, LeaseScope, RepoKey, RepoKind, RepoMarker,
    Repository,
};
use tokio::sync::oneshot;
use wire::pg::commands::{
    self, CreatedSlot, EndOfTimeline, ReplicationSlotPosition, SlotName, TimelineHistoryFile,
};
use wire::pg::{
    Lsn, PgTimestamp, PgWireError, ReplicationMessage, SegmentName, StandbyStatusUpdate,
    TimelineHistory, TimelineId, WalSegmentSize,
};

use super::archive::{
    delta_key, ensure_marker, history_key, put_delta, put_immutable, segment_key, Fatal, Reusable,
    WriteError,
};
use super::conn::{ConnectMode, CopyMessage, PgConnection, WalRecv};
use super::conninfo::ConnInfo;
use super::partial::Resume;
use crate::catalog::pg::WalInventory;
use crate::job::{
    self, Classify, Control, ErrorClass, JobContext, JobError, JobStatus, Outcome, Phase,
};

/// Validated settings of `postgres stream`.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Where to stream from.
    pub source: ConnInfo,
    /// Where to write.
    pub repo: Repository,
    /// Physical slot.
    pub slot: SlotName,
    /// Longest time new WAL may wait before it is in the repository (as a delta).
    pub max_lag: Duration,
    /// Longest time between status updates.
    pub status_interval: Duration,
    /// Ship WAL as soon as it arrives (grouped while an upload is in flight).
    pub synchronous: bool,
    /// `application_name` (what `synchronous_standby_names` lists).
    pub application_name: String,
    /// Uploads in flight before we stop reading from the server.
    pub max_inflight: usize,
    /// What to do when the source is a standby.
    pub on_standby: StandbyPolicy,
}

/// What `postgres stream` does when its source is a standby (in recovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StandbyPolicy {
    /// Wait (not ready, a log line a minute) until the server is promoted, then stream: the
    /// sidecar of every pod of a StatefulSet, where only the primary's writes.
    #[default]
    Wait,
    /// Stream from the standby (cascading replication), to spare the primary.
    Stream,
}

/// How `postgres stream` compresses WAL objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WalCompression {
    /// zstd at `--compression-level` (the smallest objects).
    #[default]
    Zstd,
    /// LZ4: about a quarter of zstd level 1's CPU, objects about twice as large (the CPU
    /// of `pg_receivewal --compress=lz4`; benches/README.md). Needs container format 3 or later.
    Lz4,
}

/// The source is a standby and the policy is to wait for its promotion.
#[derive(Debug, thiserror::Error)]
#[error("{server} is a standby (in recovery): waiting until it is promoted (on_standby = wait; --on-standby stream streams from a standby)")]
pub struct SourceIsStandby {
    server: String,
}

// Not `Send`: storage's write futures are not, and everything runs on the stream's task anyway.
type UploadFuture = Pin<Box<dyn Future<Output = Result<Uploaded, JobError>>>>;

struct Uploaded {
    end: Lsn,
    /// A delta (or durable bytes re-sent after a restart), not a complete segment.
    delta: bool,
    /// What the write shows of the store (none when nothing was written).
    write: Option<WriteStart>,
}

/// When an upload was queued, how many bytes it encoded, and since when the oldest of the
/// WAL it makes durable had waited.
#[derive(Debug, Clone, Copy)]
struct WriteStart {
    queued: Instant,
    /// Original bytes a delta encodes; 0 for a complete segment, whose frames are mostly
    /// the deltas' (so its write time says nothing of what a bigger delta would take).
    bytes: u64,
    oldest: Option<Instant>,
}

/// How much of `--max-lag` to keep for a delta's write. A delta goes out once its oldest
/// byte has waited `--max-lag` minus this.
///
/// Why: a delta to a fast store is durable in 7-33 ms, so the fixed half-way point used
/// before left most of `--max-lag` unused and wrote twice the deltas needed (each an object
/// created, made durable and later removed). The headroom is three times the slowest write
/// of the last minute (up to eight deltas and complete segments, queued to durable, so
/// waiting for a write ahead counts), at least a tenth of `--max-lag` or 100 ms, at most
/// half of it: 0.9 s of the default 1 s against a fast store. It is the half-way point
/// while the store has shown nothing recently, and while more bytes wait than twice the
/// largest recent delta (a burst after a quiet spell: the store has not shown how long
/// that much takes).
#[derive(Debug, Default)]
struct WriteHeadroom {
    /// The last writes, oldest first.
    recent: std::collections::VecDeque<WriteSample>,
}

#[derive(Debug, Clone, Copy)]
struct WriteSample {
    done: Instant,
    took: Duration,
    bytes: u64,
}

impl WriteHeadroom {
    const FLOOR: Duration = Duration::from_millis(100);
    const WINDOW: usize = 8;
    const MEMORY: Duration = Duration::from_secs(60);

    fn observe(&mut self, done: Instant, took: Duration, bytes: u64) {
        if self.recent.len() == Self::WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(WriteSample { done, took, bytes });
    }

    /// The headroom at `now` for a delta of `pending` bytes.
    fn of(&self, now: Instant, max_lag: Duration, pending: u64) -> Duration {
        let half = max_lag / 2;
        // One pass: this runs on every turn of the stream's loop.
        let Some((slowest, largest)) = self
            .recent
            .iter()
            .filter(|s| now.saturating_duration_since(s.done) <= Self::MEMORY)
            .fold(None, |acc: Option<(Duration, u64)>, s| {
                let (t, b) = acc.unwrap_or_default();
                Some((t.max(s.took), b.max(s.bytes)))
            })
        else {
            return half;
        };
        if pending > largest.saturating_mul(2) {
            return half;
        }
        let floor = Self::FLOOR.max(max_lag / 10).min(half);
        slowest.saturating_mul(3).clamp(floor, half)
    }
}

/// How long the repository has kept us waiting: counts only while an upload is
/// outstanding, from when the oldest one was queued or the last one completed. Idle time
/// (no WAL, nothing to upload) is not a stall.
#[derive(Debug, Default)]
struct StallClock {
    waiting_since: Option<Instant>,
}

impl StallClock {
    /// An upload was queued; `idle` when none was outstanding before.
    fn queued(&mut self, idle: bool, now: Instant) {
        if idle || self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// An upload completed; `remaining` are still outstanding.
    fn completed(&mut self, remaining: usize, now: Instant) {
        self.waiting_since = (remaining > 0).then_some(now);
    }

    /// How long the oldest outstanding upload has gone without any completion.
    fn stalled_for(&self, now: Instant) -> Option<Duration> {
        self.waiting_since.map(|t| now.saturating_duration_since(t))
    }
}

/// Bytes of a segment buffer: a whole 16 MiB segment in one (larger segments take several).
const SEGMENT_BUFFER: usize = 16 << 20;

/// Smallest delta frame the complete segment reuses (original bytes). The bytes of smaller
/// frames (tiny deltas: one per commit in synchronous mode, a few KiB per 0.5-0.9 s on a
/// quiet database) are encoded again into ordinary frames: a segment made of many small
/// frames compresses worse (deltas of 20 KB reused: 4-18% more stored; storage example
/// `delta_reuse`, figures in benches/README.md "WAL encoded once"). From 256 KiB on, a
/// segment stored from its deltas' frames is within 0.7% of one written from scratch
/// (64 KiB allowed +2.3% at 100 KB deltas); below it, WAL arrives at under 285-512 KiB/s
/// (a delta per 0.9 s against a fast store, per 0.5 s against a slow one), where encoding
/// it twice costs next to nothing.
const MIN_REUSED_FRAME: u64 = 256 << 10;

/// Most stored bytes of delta records one segment keeps for reuse until it completes.
/// Records hold their compressed (or, for incompressible WAL, raw) bytes beyond the
/// segment's own buffer, so this bounds the extra memory per open segment whatever the
/// segment size: 16 MiB of WAL compresses to 0.6-6 MiB (benches/README.md); past the
/// budget the rest of the segment is encoded again, as before reuse.
const MAX_KEPT_RECORDS: u64 = 8 << 20;

/// Segment buffers kept for reuse: the open segment, `--max-inflight` uploads and one
/// being let go of. A reused buffer's pages are already mapped; a fresh one costs a page
/// fault and the kernel zeroing each page before the WAL is copied in.
const SPARE_SEGMENT_BUFFERS: usize = 5;

/// WAL is copied out of the receive buffer into contiguous segment buffers as it arrives,
/// so the storage pipeline gets each frame as one slice: the frame workers neither join
/// pieces (a copy of every byte, out of receive blocks long gone cold) nor keep receive
/// blocks alive, and the receive buffer stays small and warm in the cache.
#[derive(Default)]
struct SegmentBuffers {
    spare: Vec<BytesMut>,
}

impl SegmentBuffers {
    /// An empty buffer for `cap` bytes: a spare one nothing refers to any more, or a new one.
    fn take(&mut self, cap: usize) -> BytesMut {
        let free = self.spare.iter_mut().position(|b| b.try_reclaim(cap));
        match free {
            Some(i) => self.spare.swap_remove(i),
            None => BytesMut::with_capacity(cap),
        }
    }

    /// Keeps `buf` (emptied; the slices split off it keep their bytes) for reuse once
    /// they are gone.
    fn give_back(&mut self, mut buf: BytesMut) {
        buf.clear();
        if self.spare.len() >= SPARE_SEGMENT_BUFFERS {
            self.spare.remove(0);
        }
        self.spare.push(buf);
    }
}

/// The segment being received.
struct OpenSegment {
    name: SegmentName,
    /// The segment's bytes so far that were handed out (deltas) or filled a buffer, in order.
    frozen: Vec<Bytes>,
    /// The bytes received after `frozen`, in a contiguous buffer with room for more.
    tail: BytesMut,
    /// Total length of `frozen` and `tail`.
    len: usize,
    /// Where the next delta starts: the end of the stored chain plus the deltas queued.
    next_start: usize,
    /// Bytes stored or queued (at least `next_start`; more after a restart when an older
    /// build's whole partial holds more than the chain).
    covered: usize,
    /// Bytes whose durability was reported (or queued to be).
    acked: usize,
    /// The chain's deltas, in order, stored before this connection or queued by it.
    chain: Vec<RepoKey>,
    /// Objects to delete once the stored chain reaches their end: (end, key).
    stale: Vec<(u32, RepoKey)>,
    /// When the oldest byte not yet in a queued delta arrived.
    pending_since: Option<Instant>,
    /// The frame records each delta queued by this connection will hand over once stored,
    /// for the complete segment to reuse.
    reusable: Vec<oneshot::Receiver<Reusable>>,
    /// Stored bytes of the records handed over so far (see [`MAX_KEPT_RECORDS`]).
    kept_bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl OpenSegment {
    fn new(name: SegmentName, resume: Resume, tail: BytesMut) -> OpenSegment {
        OpenSegment {
            name,
            frozen: Vec::new(),
            tail,
            len: 0,
            next_start: resume.chain_end as usize,
            covered: resume.durable as usize,
            acked: 0,
            chain: resume.chain,
            stale: resume.stale,
            pending_since: None,
            reusable: Vec::new(),
            kept_bytes: Default::default(),
        }
    }

    /// How many more bytes can go into `tail` now: its spare capacity, up to the end of
    /// the segment.
    fn room(&self, size: WalSegmentSize) -> usize {
        let to_end = usize::try_from(size.bytes()).unwrap_or(usize::MAX) - self.len;
        (self.tail.capacity() - self.tail.len()).min(to_end)
    }

    /// When `tail` is full, freezes it and continues in another buffer from `bufs`
    /// (segments larger than one buffer).
    fn make_room(&mut self, bufs: &mut SegmentBuffers, buf_size: usize) {
        if self.tail.capacity() == self.tail.len() {
            self.freeze_tail();
            let full = std::mem::replace(&mut self.tail, bufs.take(buf_size));
            bufs.give_back(full);
        }
    }

    /// Moves the bytes in `tail` to `frozen` (the buffer keeps its remaining room).
    fn freeze_tail(&mut self) {
        if !self.tail.is_empty() {
            self.frozen.push(self.tail.split().freeze());
        }
    }

    /// The received bytes from `from` on, as slices of the segment buffers (no copy).
    fn bytes_from(&mut self, from: usize) -> Vec<Bytes> {
        self.freeze_tail();
        let mut out = Vec::new();
        let mut at = 0usize;
        for c in &self.frozen {
            let end = at + c.len();
            if end > from {
                out.push(c.slice(from.saturating_sub(at)..));
            }
            at = end;
        }
        out
    }

    /// Every byte received, and the buffer for reuse.
    fn into_parts(mut self) -> (Vec<Bytes>, BytesMut) {
        self.freeze_tail();
        (self.frozen, self.tail)
    }
}

/// How one connection's stream ended.
enum Ended {
    /// The server's timeline ended; continue on the next.
    TimelineSwitch(EndOfTimeline),
    /// SIGINT/SIGTERM: everything received is stored.
    Shutdown,
    /// The lease was taken after the slot moved: start again from its position.
    Restart,
}

/// Runs the stream until a fatal error or `token` is cancelled (then everything received
/// is stored), reconnecting with backoff otherwise ([`job::supervise`]); its state is
/// published on `status`.
pub async fn run(opts: StreamOptions, ctl: Control) -> Result<()> {
    // Until replication has started once, errors are the operator's to fix (wrong
    // password, no slot privilege, …): report them instead of retrying forever. Only a
    // server that does not answer or is not usable yet is waited out (the agent may start
    // before PostgreSQL).
    let mut started = false;
    let mut lease: Option<Lease> = None;
    let result = job::supervise(
        "postgres stream",
        &ctl.token,
        &ctl.status,
        job::Backoff::default(),
        async |_| match stream_once(&opts, &ctl, &mut started, &mut lease).await {
            Ok(Ended::Shutdown) => Ok(Outcome::Stopped),
            Ok(Ended::Restart) => Ok(Outcome::Again),
            Ok(Ended::TimelineSwitch(e)) => {
                tracing::info!(next_timeline = %e.next_tli, start = %e.next_tli_startpos, "timeline ended; continuing on the next");
                Ok(Outcome::Again)
            }
            Err(e) => {
                if e.lets_go() {
                    // Not writing, and maybe not for long: let a stream that can write
                    // (beside the new primary after a failover) take the lease.
                    if let Some(l) = lease.take() {
                        let _ = l.release().await;
                    }
                }
                if !started && e.class == ErrorClass::Transient {
                    Err(e.reclassify(ErrorClass::Fatal))
                } else {
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

async fn query_row(conn: &mut PgConnection, sql: &str) -> Result<Vec<Option<Bytes>>, JobError> {
    let results = conn
        .simple_query(sql)
        .await
        .with_job_context(|| format!("running {sql}"))?;
    Ok(results
        .into_iter()
        .find(|r| !r.columns.is_empty())
        .and_then(|r| r.rows.into_iter().next())
        .with_context(|| format!("{sql} returned no row"))?)
}

fn refs(row: &[Option<Bytes>]) -> Vec<Option<&[u8]>> {
    row.iter().map(|v| v.as_deref()).collect()
}

/// What `pg_replication_slots` says of our slot.
#[derive(Debug, Default)]
struct SlotState {
    restart_lsn: Option<Lsn>,
    wal_status: Option<String>,
    /// The walsender using the slot, if any.
    active_pid: Option<String>,
}

/// The slot's position: READ_REPLICATION_SLOT on 15+, `pg_replication_slots` before.
async fn read_slot(
    conn: &mut PgConnection,
    opts: &StreamOptions,
    major: u32,
) -> Result<Option<SlotState>, JobError> {
    if major >= 15 {
        let row = query_row(conn, &format!("READ_REPLICATION_SLOT {}", opts.slot)).await?;
        let pos = ReplicationSlotPosition::from_row(&refs(&row)).transient()?;
        if let Some(p) = &pos {
            if p.slot_type != "physical" {
                return Err(Fatal(format!(
                    "slot {} is a {} slot; a physical slot is needed",
                    opts.slot, p.slot_type
                ))
                .into());
            }
        }
        // wal_status is only in the view; ask for it separately so a lost slot is reported.
        let view = slot_status_sql(conn.server(), opts).await.ok().flatten();
        return Ok(pos.map(|p| SlotState {
            restart_lsn: p.restart_lsn,
            wal_status: view.as_ref().and_then(|v| v.wal_status.clone()),
            active_pid: view.and_then(|v| v.active_pid),
        }));
    }
    slot_status_sql(conn.server(), opts).await
}

/// Asks `server` (the one the replication connection reached) over a plain SQL connection.
async fn slot_status_sql(
    server: &ConnInfo,
    opts: &StreamOptions,
) -> Result<Option<SlotState>, JobError> {
    let mut sql = PgConnection::connect(server, ConnectMode::Sql, &opts.application_name).await?;
    let q = format!("SELECT slot_type, restart_lsn::text, wal_status, active_pid::text FROM pg_replication_slots WHERE slot_name = '{}'", opts.slot);
    let results = sql.simple_query(&q).await?;
    sql.close().await;
    let Some(row) = results
        .into_iter()
        .find(|r| !r.columns.is_empty())
        .and_then(|r| r.rows.into_iter().next())
    else {
        return Ok(None);
    };
    let text = |i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    if text(0).as_deref() != Some("physical") {
        return Err(Fatal(format!("slot {} is not a physical slot", opts.slot)).into());
    }
    let lsn = text(1).map(|t| Lsn::parse(&t)).transpose().transient()?;
    Ok(Some(SlotState {
        restart_lsn: lsn,
        wal_status: text(2),
        active_pid: text(3),
    }))
}

/// What [`hold_lease`] came back with.
enum Held {
    /// The lease is ours; the slot is where it was read.
    Yes(LeaseGuard),
    /// The lease is ours, but the slot was advanced while waiting: read it again.
    SlotMoved,
    /// A signal arrived while waiting.
    Shutdown,
}

/// Moves our (inactive) slot up to what the repository holds without a gap from its
/// position, so a waiting agent does not make the server keep WAL the active one has
/// already stored. Returns the new position when it moved.
async fn advance_slot_to_repository(
    opts: &StreamOptions,
    server: &ConnInfo,
    size: WalSegmentSize,
    tli: TimelineId,
    restart: Lsn,
) -> Result<Option<Lsn>> {
    let wal = WalInventory::load(&opts.repo, size).await?;
    let end = wal.contiguous_end(&tli.into(), restart, size);
    if end <= restart {
        return Ok(None);
    }
    let mut sql = PgConnection::connect(server, ConnectMode::Sql, &opts.application_name).await?;
    let q = format!(
        "SELECT pg_replication_slot_advance(slot_name, '{end}') FROM pg_replication_slots WHERE slot_name = '{}' AND NOT active AND restart_lsn < '{end}'",
        opts.slot
    );
    let res = sql.simple_query(&q).await;
    sql.close().await;
    res.with_context(|| format!("advancing slot {} to {end}", opts.slot))?;
    Ok(Some(end))
}

/// Holds the lease of `tli` (keeping one already held), waiting while another writer has
/// it; meanwhile the slot follows what the repository holds (see
/// [`advance_slot_to_repository`]).
async fn hold_lease(
    opts: &StreamOptions,
    ctl: &Control,
    lease: &mut Option<Lease>,
    tli: TimelineId,
    server: &ConnInfo,
    size: WalSegmentSize,
    restart: Lsn,
) -> Result<Held, JobError> {
    let scope =
        LeaseScope::PostgresStream(storage::layout::TimelineId::new(tli.get()).transient()?);
    if let Some(l) = lease.as_ref() {
        if l.scope() == scope && !l.is_lost() {
            return Ok(Held::Yes(l.guard()));
        }
    }
    if let Some(old) = lease.take() {
        // The stream moved to another timeline: the old one is free for others.
        if old.check().is_ok() {
            let _ = old.release().await;
        }
    }
    let purpose = format!(
        "postgres stream (slot {}, application_name {})",
        opts.slot, opts.application_name
    );
    let lease_opts = LeaseOptions::from_env();
    ctl.status.update(|s| {
        s.phase = Phase::Waiting;
        s.waiting_for = Some(format!(
            "the lease of timeline {tli} (another writer may hold it)"
        ));
    });
    let moved = std::cell::Cell::new(false);
    let follow = async {
        let mut at = restart;
        loop {
            tokio::time::sleep(lease_opts.duration).await;
            match advance_slot_to_repository(opts, server, size, tli, at).await {
                Ok(Some(end)) => {
                    tracing::info!(slot = %opts.slot, to = %end, "waiting for the lease: advanced the slot over WAL the repository already holds");
                    at = end;
                    moved.set(true);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("could not advance the waiting slot: {e:#}"),
            }
        }
    };
    tokio::select! {
        l = Lease::acquire(&opts.repo, scope, &purpose, lease_opts) => {
            let l = l.job_context("taking the stream's lease in the repository")?;
            let guard = l.guard();
            *lease = Some(l);
            Ok(if moved.get() { Held::SlotMoved } else { Held::Yes(guard) })
        }
        () = follow => unreachable!("follows until the lease is taken"),
        () = ctl.token.cancelled() => Ok(Held::Shutdown),
    }
}

/// How long small XLogData messages may gather in the socket before the stream wakes
/// for them ([`PgConnection::coalesce_reads`]): a hundredth of `--max-lag`, at most 10 ms,
/// so with the default `--max-lag` a server flushing per commit wakes the stream at most
/// about 100 times a second, plus once per 64 KiB gathered sooner, instead of once per
/// flush. None in synchronous mode, where each commit
/// waits for the flush, nor below a millisecond (`--max-lag` under 100 ms), which batches
/// nothing the timer could keep. [`Streamer::on_wal`] counts the WAL's wait from
/// [`NAP_SLACK`] more than this before it was read, so `--max-lag` holds.
fn read_coalescing(max_lag: Duration, synchronous: bool) -> Duration {
    let nap = (max_lag / 100).min(Duration::from_millis(10));
    if synchronous || nap < Duration::from_millis(1) {
        Duration::ZERO
    } else {
        nap
    }
}

/// A nap ends up to the timer's resolution (1 ms) late.
const NAP_SLACK: Duration = Duration::from_millis(1);

async fn stream_once(
    opts: &StreamOptions,
    ctl: &Control,
    started: &mut bool,
    lease: &mut Option<Lease>,
) -> Result<Ended, JobError> {
    let mut conn =
        PgConnection::connect(&opts.source, ConnectMode::Physical, &opts.application_name).await?;
    if opts.on_standby == StandbyPolicy::Wait && conn.parameter("in_hot_standby") == Some("on") {
        let server = conn.endpoint().to_string();
        conn.close().await;
        return Err(JobError::waiting(SourceIsStandby { server }));
    }
    let major = conn.server_major()?;
    let ident = conn.identify_system().await?;

    let mut marker = RepoMarker::new(RepoKind::Postgres);
    marker.system_identifier = Some(ident.system_id.to_string());
    let existing = opts
        .repo
        .init_marker(&marker)
        .await
        .job_context("reading the repository marker")?;
    let m = existing.marker();
    if m.kind != RepoKind::Postgres {
        return Err(Fatal(format!(
            "repository {} holds a {:?} backup, not PostgreSQL",
            opts.repo.url(),
            m.kind
        ))
        .into());
    }
    if let Some(sys) = &m.system_identifier {
        if *sys != ident.system_id.to_string() {
            return Err(Fatal(format!(
                "repository {} belongs to PostgreSQL system {sys}, but {} is system {}: refusing to mix clusters (use another repository)",
                opts.repo.url(),
                conn.endpoint(),
                ident.system_id
            ))
            .into());
        }
    }

    let size = conn.wal_segment_size().await?;

    // Timeline history: every history file the server has (archived once the lease is
    // ours), and our lineage.
    let mut history = TimelineHistory::default();
    let mut history_files = Vec::new();
    for t in 2..=ident.timeline.get() {
        let tli = TimelineId::new(t).transient()?;
        match query_row(&mut conn, &format!("TIMELINE_HISTORY {t}")).await {
            Ok(row) => {
                let file = TimelineHistoryFile::from_row(&refs(&row), tli).transient()?;
                if tli == ident.timeline {
                    history = TimelineHistory::parse(&file.content).transient()?;
                }
                history_files.push((tli, file.content));
            }
            Err(e) if t < ident.timeline.get() => {
                tracing::debug!("history of timeline {t} not on the server: {e:#}")
            }
            Err(e) => return Err(e),
        }
    }

    // The slot: create it if missing, then read where it stands.
    let mut slot = read_slot(&mut conn, opts, major).await?;
    if slot.is_none() {
        let row = query_row(&mut conn, &commands::create_physical_slot(&opts.slot)).await?;
        let created = CreatedSlot::from_row(&refs(&row)).transient()?;
        tracing::info!(slot = %created.slot_name, at = ?created.consistent_point.map(|l| l.to_string()), "created physical replication slot");
        slot = read_slot(&mut conn, opts, major).await?;
    }
    let SlotState {
        restart_lsn,
        wal_status,
        active_pid,
    } = slot.with_context(|| format!("slot {} vanished right after creation", opts.slot))?;
    if let Some(pid) = active_pid {
        // Before the first start an operator's mistake (fatal), later a standby or agent
        // that has not let go yet (retried).
        return Err(JobError::transient(anyhow!(
            "the replication slot {} is in use by another connection (walsender PID {pid}): is another agent or standby streaming from it? Stop it or use --slot with another name",
            opts.slot
        )));
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(Fatal(format!(
            "replication slot {} was invalidated (wal_status = lost, max_slot_wal_keep_size exceeded): the server removed WAL the repository does not have. \
             Drop the slot, let the agent recreate it, and take a new base backup",
            opts.slot
        ))
        .into());
    }
    let restart_lsn = restart_lsn.unwrap_or(ident.xlogpos);
    let start = size.segment_start(restart_lsn);
    // The timeline is that of the slot's position itself: at or past a switch point the new
    // timeline's segment (which starts with the old one's WAL) is streamed from its start.
    let tli = history.timeline_at(restart_lsn, ident.timeline);

    // One writer per (repository, timeline): nothing is written before the lease is ours.
    let server = conn.server().clone();
    let guard = match hold_lease(opts, ctl, lease, tli, &server, size, restart_lsn).await? {
        Held::Yes(guard) => guard,
        Held::SlotMoved => return Ok(Ended::Restart),
        Held::Shutdown => return Ok(Ended::Shutdown),
    };
    for (t, content) in &history_files {
        guard.writable().await?;
        put_immutable(
            &opts.repo,
            &history_key(*t)?,
            ContentKind::TimelineHistory,
            std::slice::from_ref(content),
            &[],
        )
        .await
        .map_err(|e| e.explain(&opts.repo))?;
    }

    // What the repository has, and whether anything is missing before where we start.
    let repo_wal = WalInventory::load(&opts.repo, size).await?;
    if let Some(end) = repo_wal.newest_end(&tli.into(), size) {
        if end < start {
            tracing::error!(
                "WAL from {end} to {start} is missing from the repository and no longer reserved by slot {}: \
                 point-in-time recovery across that range is impossible; take a new base backup",
                opts.slot
            );
        }
    }
    let gaps = repo_wal.missing_segments(tli);
    if !gaps.is_empty() {
        let first = SegmentName::new(tli, gaps[0], size).transient()?;
        let last = SegmentName::new(tli, gaps[gaps.len() - 1], size).transient()?;
        tracing::warn!(
            missing = gaps.len(),
            "repository has gaps on timeline {tli}: {first} .. {last}"
        );
    }

    tracing::info!(server = %conn.endpoint(), system = ident.system_id, timeline = %tli, %start, segment_size = %size, slot = %opts.slot, "starting replication");
    conn.start_copy_both(&commands::start_replication(Some(&opts.slot), start, tli))
        .await?;
    *started = true;
    ctl.status.running();

    // Chains of segments from the start on are continued (or retired) as the segments are
    // received again.
    let mut stored: BTreeMap<u64, Resume> = BTreeMap::new();
    let mut leftovers: Vec<RepoKey> = Vec::new();
    let ours = repo_wal.timelines.get(&tli.get());
    for (n, v) in ours.iter().flat_map(|t| t.partials.iter()) {
        if *n >= size.segment_of(start) {
            stored.insert(*n, v.resume());
        } else if ours.is_some_and(|t| t.segments.contains(n)) {
            // A cleanup cut short by a kill: the complete segment is stored, its deltas
            // (last to first) and older partials are garbage.
            leftovers.extend(v.deltas.iter().rev().map(|d| d.key.clone()));
            leftovers.extend(v.whole.iter().map(|(_, k)| k.clone()));
        }
    }
    if !leftovers.is_empty() {
        tracing::info!(
            objects = leftovers.len(),
            "removing deltas of segments already stored whole"
        );
        remove_superseded(&opts.repo, leftovers).await;
    }
    conn.coalesce_reads(read_coalescing(opts.max_lag, opts.synchronous));
    let mut s = Streamer::new(opts, ctl, size, tli, start, stored, guard);
    let ended = s.run(&mut conn).await?;
    if let Ended::TimelineSwitch(_) = ended {
        conn.close().await;
    }
    Ok(ended)
}

struct Streamer<'a> {
    opts: &'a StreamOptions,
    ctl: &'a Control,
    size: WalSegmentSize,
    tli: TimelineId,
    /// The buffer `recv_wal` gets while no segment is open (it then reads only headers).
    no_segment: BytesMut,
    open: Option<OpenSegment>,
    /// Reusable buffers the open segment's WAL is copied into.
    bufs: SegmentBuffers,
    /// Size of each segment buffer: the segment size, at most [`SEGMENT_BUFFER`].
    buf_size: usize,
    /// What the repository held of segments in progress when the stream started.
    stored: BTreeMap<u64, Resume>,
    uploads: FuturesOrdered<UploadFuture>,
    /// Deltas queued and not completed: at most one, so WAL arriving meanwhile goes out
    /// as the next single delta (group commit in synchronous mode).
    deltas_in_flight: usize,
    headroom: WriteHeadroom,
    /// Completion of the most recently queued upload: the next one waits for it before
    /// deleting anything, so a delete never races a put of the same key.
    last_done: Option<oneshot::Receiver<()>>,
    received: Lsn,
    flushed: Lsn,
    reported_flush: Lsn,
    server_end: Lsn,
    last_status: Instant,
    stall: StallClock,
    last_stall_warning: Instant,
    last_report: Instant,
    segments_stored: u64,
    lease: LeaseGuard,
}

impl<'a> Streamer<'a> {
    fn new(
        opts: &'a StreamOptions,
        ctl: &'a Control,
        size: WalSegmentSize,
        tli: TimelineId,
        start: Lsn,
        stored: BTreeMap<u64, Resume>,
        lease: LeaseGuard,
    ) -> Streamer<'a> {
        let now = Instant::now();
        Streamer {
            opts,
            ctl,
            size,
            tli,
            no_segment: BytesMut::new(),
            open: None,
            bufs: SegmentBuffers::default(),
            buf_size: usize::try_from(size.bytes())
                .unwrap_or(SEGMENT_BUFFER)
                .min(SEGMENT_BUFFER),
            stored,
            uploads: FuturesOrdered::new(),
            deltas_in_flight: 0,
            headroom: WriteHeadroom::default(),
            last_done: None,
            received: start,
            flushed: start,
            reported_flush: Lsn::INVALID,
            server_end: start,
            last_status: now,
            stall: StallClock::default(),
            last_stall_warning: now,
            last_report: now,
            segments_stored: 0,
            lease,
        }
    }

    async fn run(&mut self, conn: &mut PgConnection) -> Result<Ended, JobError> {
        // A delta goes out once its oldest byte has waited --max-lag less the headroom its
        // write needs (WriteHeadroom: so WAL waits at most --max-lag while each write takes
        // no longer than that headroom; never more than two deltas per --max-lag), or at
        // once in synchronous mode.
        let ship_timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(ship_timer);
        let mut armed: Option<Instant> = None;
        let mut status_tick =
            tokio::time::interval(Duration::from_millis(500).min(self.opts.status_interval));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.ctl.token.clone().cancelled_owned();
        tokio::pin!(shutdown);
        let guard = self.lease.clone();
        let lost = guard.lost();
        tokio::pin!(lost);
        loop {
            let due = self.ship_deadline();
            if due != armed {
                if let Some(at) = due {
                    ship_timer.as_mut().reset(at.into());
                }
                armed = due;
            }
            let can_read = self.uploads.len() < self.opts.max_inflight;
            // WAL is read straight into the open segment's buffer.
            let (dest, room) = match self.open.as_mut() {
                Some(o) => {
                    let room = o.room(self.size);
                    (&mut o.tail, room)
                }
                None => (&mut self.no_segment, 0),
            };
            tokio::select! {
                ev = conn.recv_wal(dest, room), if can_read => {
                    match ev? {
                        WalRecv::Header { start, server_end, len } => {
                            self.on_header(start, server_end, len)?
                        }
                        WalRecv::Data(n) => self.on_wal(n, conn.wal_pending())?,
                        WalRecv::Other(CopyMessage::Data(payload)) => {
                            self.on_message(conn, payload).await?
                        }
                        WalRecv::Other(CopyMessage::Done) => {
                            return self.end_of_timeline(conn).await
                        }
                    }
                }
                Some(done) = self.uploads.next(), if !self.uploads.is_empty() => {
                    self.uploaded(done?);
                    // Report durable progress at once: the slot may advance and synchronous
                    // commits waiting for this WAL are released.
                    self.send_status(conn, false).await?;
                    if self.opts.synchronous {
                        self.ship_delta()?;
                    }
                }
                () = &mut ship_timer, if armed.is_some() => {
                    armed = None;
                    self.ship_delta()?;
                }
                _ = status_tick.tick() => {
                    if self.last_status.elapsed() >= self.opts.status_interval {
                        self.send_status(conn, false).await?;
                    }
                    self.warn_if_stalled();
                    self.report_progress();
                }
                () = &mut lost => {
                    // Another writer is storing this timeline now: stop writing at once
                    // (uploads in flight refuse to write too) and wait for the lease again.
                    self.lease.check()?;
                    return Err(anyhow!("lost the lease of timeline {}", self.tli).into());
                }
                () = &mut shutdown => {
                    self.ctl.status.update(|s| s.phase = Phase::Stopping);
                    tracing::info!("stopping: storing what was received");
                    self.drain(conn).await?;
                    let _ = conn.send_copy_done().await;
                    return Ok(Ended::Shutdown);
                }
            }
        }
    }

    /// How long the oldest received byte not yet durable has waited (zero when everything
    /// received is stored).
    fn lag(&self) -> Duration {
        match &self.open {
            Some(o) if self.flushed < self.received => {
                o.pending_since.map_or(Duration::ZERO, |t| t.elapsed())
            }
            _ => Duration::ZERO,
        }
    }

    /// One line a minute so an operator can see the stream is alive and how far behind.
    fn report_progress(&mut self) {
        let lag = self.lag();
        let behind = self.server_end.bytes_since(self.flushed).unwrap_or(0);
        self.ctl.status.update(|s| {
            s.lag = Some(lag);
            s.source_behind_bytes = Some(behind);
        });
        if self.last_report.elapsed() >= Duration::from_secs(60) {
            self.last_report = Instant::now();
            tracing::info!(
                durable = %self.flushed,
                received = %self.received,
                server_end = %self.server_end,
                behind_bytes = self.server_end.bytes_since(self.flushed).unwrap_or(0),
                segments_stored = self.segments_stored,
                timeline = %self.tli,
                "streaming"
            );
        }
    }

    fn warn_if_stalled(&mut self) {
        let Some(stalled) = self.stall.stalled_for(Instant::now()) else {
            return;
        };
        if stalled >= Duration::from_secs(30)
            && self.last_stall_warning.elapsed() >= Duration::from_secs(30)
        {
            self.last_stall_warning = Instant::now();
            let retained = self.server_end.bytes_since(self.flushed).unwrap_or(0);
            tracing::warn!(
                durable = %self.flushed,
                server_end = %self.server_end,
                retained_bytes = retained,
                uploads = self.uploads.len(),
                "the repository has not confirmed an upload for {}s; the stream is stalled and the slot retains {retained} bytes of WAL on the server",
                stalled.as_secs()
            );
        }
    }

    /// Queues an upload (in order after the others).
    fn push_upload(&mut self, upload: UploadFuture) {
        self.stall.queued(self.uploads.is_empty(), Instant::now());
        self.uploads.push_back(upload);
    }

    /// A keepalive, or an XLogData message that came through the ordinary path (its WAL is
    /// copied in as `recv_wal` would have read it).
    async fn on_message(
        &mut self,
        conn: &mut PgConnection,
        payload: Bytes,
    ) -> Result<(), JobError> {
        match ReplicationMessage::parse(payload).transient()? {
            ReplicationMessage::XLogData(x) => {
                self.on_header(x.start, x.server_end, x.data.len())?;
                let mut data = &x.data[..];
                while !data.is_empty() {
                    let open = self.open.as_mut().context("internal: no segment open")?;
                    let room = open.room(self.size);
                    let (now, rest) = data.split_at(room.min(data.len()));
                    open.tail.extend_from_slice(now);
                    data = rest;
                    self.on_wal(now.len(), data.len())?;
                }
            }
            ReplicationMessage::PrimaryKeepalive(k) => {
                self.server_end = self.server_end.max(k.server_end);
                if k.reply_requested {
                    self.send_status(conn, false).await?;
                }
            }
        }
        Ok(())
    }

    /// An XLogData message of `len` bytes of WAL from `start` begins: it must continue
    /// exactly where the last one ended; its segment is opened, with room for its bytes.
    fn on_header(&mut self, start: Lsn, server_end: Lsn, len: usize) -> Result<(), JobError> {
        self.server_end = self.server_end.max(server_end);
        if start != self.received {
            return Err(PgWireError::Discontinuity {
                expected: self.received.to_string(),
                got: start.to_string(),
            })
            .transient();
        }
        if len > 0 {
            self.open_at(start)?;
        }
        Ok(())
    }

    /// `n` bytes of WAL were appended to the open segment's buffer; `pending` more of the
    /// current message are still to come.
    fn on_wal(&mut self, n: usize, pending: usize) -> Result<(), JobError> {
        let seg_bytes = self.size.bytes();
        let open = self
            .open
            .as_mut()
            .context("internal: WAL without an open segment")?;
        open.len += n;
        if open.pending_since.is_none() {
            // It may have waited in the socket while reads were coalesced.
            let now = Instant::now();
            let nap = read_coalescing(self.opts.max_lag, self.opts.synchronous);
            let waited = if nap.is_zero() { nap } else { nap + NAP_SLACK };
            open.pending_since = Some(now.checked_sub(waited).unwrap_or(now));
        }
        self.received = Lsn(self.received.0 + n as u64);
        if open.len as u64 == seg_bytes {
            if let Some(o) = self.open.take() {
                self.queue_segment(o)?;
            }
            if pending > 0 {
                self.open_at(self.received)?;
            }
        } else {
            open.make_room(&mut self.bufs, self.buf_size);
        }
        if pending == 0 && self.opts.synchronous {
            self.ship_delta()?;
        }
        Ok(())
    }

    /// Makes the segment holding `at` the open one (`at` must be where its bytes so far
    /// end), with room in its buffer.
    fn open_at(&mut self, at: Lsn) -> Result<()> {
        let (segno, offset) = (self.size.segment_of(at), self.size.offset_in_segment(at));
        let open = match &mut self.open {
            Some(o) if o.name.segno() == segno => o,
            _ => {
                if offset != 0 {
                    bail!(
                        "WAL for segment {segno:X} starts at offset {offset}, not at its beginning"
                    );
                }
                let name = SegmentName::new(self.tli, segno, self.size)?;
                let resume = self.stored.remove(&segno).unwrap_or_default();
                let tail = self.bufs.take(self.buf_size);
                self.open = Some(OpenSegment::new(name, resume, tail));
                self.open.as_mut().context("segment just opened")?
            }
        };
        if open.len as u64 != offset {
            bail!(
                "internal: segment {} has {} bytes, data arrived for offset {offset}",
                open.name,
                open.len
            );
        }
        open.make_room(&mut self.bufs, self.buf_size);
        Ok(())
    }

    fn chain(&mut self) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        (self.last_done.replace(rx), tx)
    }

    fn queue_segment(&mut self, mut seg: OpenSegment) -> Result<()> {
        let key = segment_key(seg.name)?;
        let end = seg.name.end_lsn();
        let repo = self.opts.repo.clone();
        // The complete segment supersedes its deltas (removed last to first, so a cleanup
        // cut short leaves a chain that still starts at 0) and every stale object.
        let mut cleanup: Vec<RepoKey> = std::mem::take(&mut seg.chain).into_iter().rev().collect();
        cleanup.extend(std::mem::take(&mut seg.stale).into_iter().map(|(_, k)| k));
        let reusable = std::mem::take(&mut seg.reusable);
        let write = Some(WriteStart {
            queued: Instant::now(),
            bytes: 0,
            oldest: seg.pending_since,
        });
        let (chunks, buf) = seg.into_parts();
        self.bufs.give_back(buf);
        let (prev, done) = self.chain();
        let lease = self.lease.clone();
        let status = self.ctl.status.clone();
        self.push_upload(Box::pin(async move {
            // The deltas' frames are reused, so their bytes are compressed only once: wait
            // for deltas still being stored (a delta that failed hands over nothing, and
            // its bytes are encoded here).
            let mut reuse: Reusable = Vec::new();
            for r in reusable {
                if let Ok(records) = r.await {
                    reuse.extend(records);
                }
            }
            retrying(&key, &status, || async {
                lease.writable().await?;
                put_immutable(&repo, &key, ContentKind::WalSegment, &chunks, &reuse).await
            })
            .await
            .map_err(|e| e.explain(&repo))?;
            if let Some(p) = prev {
                let _ = p.await;
            }
            // A store that stops answering here stalls the stream (retried, warned), like a
            // failed put; only a marker that is really gone stops it.
            retrying(&storage::layout::marker(), &status, || ensure_marker(&repo))
                .await
                .map_err(|e| e.explain(&repo))?;
            remove_superseded(&repo, cleanup).await;
            let _ = done.send(());
            tracing::debug!(%key, "segment stored");
            Ok(Uploaded {
                end,
                delta: false,
                write,
            })
        }));
        Ok(())
    }

    /// When the open segment's pending bytes must go out as a delta (none while a delta is
    /// in flight: its completion brings the next one).
    fn ship_deadline(&self) -> Option<Instant> {
        if self.deltas_in_flight > 0 {
            return None;
        }
        let open = self.open.as_ref()?;
        let since = open.pending_since?;
        let pending = open.len.saturating_sub(open.next_start) as u64;
        let headroom = self.headroom.of(Instant::now(), self.opts.max_lag, pending);
        Some(since + self.opts.max_lag.saturating_sub(headroom))
    }

    fn uploaded(&mut self, done: Uploaded) {
        if let Some(w) = done.write {
            let now = Instant::now();
            let took = now.saturating_duration_since(w.queued);
            self.headroom.observe(now, took, w.bytes);
            // What --max-lag promises, for an operator (or a bench) to check.
            tracing::debug!(
                delta = done.delta,
                bytes = w.bytes,
                took_ms = took.as_millis() as u64,
                oldest_waited_ms = w
                    .oldest
                    .map_or(0, |t| now.saturating_duration_since(t).as_millis() as u64),
                headroom_ms = self.headroom.of(now, self.opts.max_lag, 0).as_millis() as u64,
                "WAL durable"
            );
        }
        if done.delta {
            self.deltas_in_flight -= 1;
        } else {
            self.segments_stored += 1;
        }
        self.stall.completed(self.uploads.len(), Instant::now());
        if done.end > self.flushed {
            self.flushed = done.end;
            self.ctl
                .status
                .durable(self.flushed, self.flushed.0, Some(self.lag()));
        }
    }

    /// Stores the open segment's bytes since the end of its chain as the chain's next
    /// delta, unless a delta is already in flight (then these bytes wait and go out as the
    /// next single delta). Bytes a restart re-sent that are already stored are reported
    /// durable without a write.
    fn ship_delta(&mut self) -> Result<()> {
        if self.deltas_in_flight > 0 {
            return Ok(());
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let oldest = open.pending_since.take();
        let seg_start = open.name.start_lsn().0;
        if open.len <= open.covered {
            if open.len > open.acked {
                open.acked = open.len;
                let end = Lsn(seg_start + open.len as u64);
                self.deltas_in_flight += 1;
                self.push_upload(Box::pin(async move {
                    Ok(Uploaded {
                        end,
                        delta: true,
                        write: None,
                    })
                }));
            }
            return Ok(());
        }
        let offset = |n: usize| u32::try_from(n).context("segment offset beyond 4 GiB");
        let (start, stop) = (open.next_start, open.len);
        let key = delta_key(open.name, offset(start)?, offset(stop)?)?;
        let chunks = open.bytes_from(start);
        open.next_start = stop;
        open.covered = stop;
        open.acked = stop;
        open.chain.push(key.clone());
        // Stale objects this delta covers become garbage once it is stored.
        let stop32 = offset(stop)?;
        let (cleanup, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut open.stale)
            .into_iter()
            .partition(|(e, k)| *e <= stop32 && *k != key);
        open.stale = keep;
        let cleanup: Vec<RepoKey> = cleanup.into_iter().map(|(_, k)| k).collect();
        let (hand_over, reusable) = oneshot::channel();
        open.reusable.push(reusable);
        let kept_bytes = open.kept_bytes.clone();
        let end = Lsn(seg_start + stop as u64);
        let repo = self.opts.repo.clone();
        let (prev, done) = self.chain();
        self.deltas_in_flight += 1;
        let lease = self.lease.clone();
        let status = self.ctl.status.clone();
        let write = Some(WriteStart {
            queued: Instant::now(),
            bytes: (stop - start) as u64,
            oldest,
        });
        self.push_upload(Box::pin(async move {
            let records = std::cell::RefCell::new(Vec::new());
            retrying(&key, &status, || async {
                lease.writable().await?;
                *records.borrow_mut() = put_delta(&repo, &key, &chunks).await?;
                Ok(())
            })
            .await
            .map_err(|e| e.explain(&repo))?;
            let reuse = worth_reusing(start as u64, records.into_inner(), &kept_bytes);
            let _ = hand_over.send(reuse);
            if let Some(p) = prev {
                let _ = p.await;
            }
            // A store that stops answering here stalls the stream (retried, warned), like a
            // failed put; only a marker that is really gone stops it.
            retrying(&storage::layout::marker(), &status, || ensure_marker(&repo))
                .await
                .map_err(|e| e.explain(&repo))?;
            remove_superseded(&repo, cleanup).await;
            let _ = done.send(());
            Ok(Uploaded {
                end,
                delta: true,
                write,
            })
        }));
        Ok(())
    }

    async fn send_status(&mut self, conn: &mut PgConnection, reply: bool) -> Result<(), JobError> {
        let update = StandbyStatusUpdate {
            write: self.received,
            flush: self.flushed,
            apply: Lsn::INVALID,
            client_time: PgTimestamp::now(),
            reply_requested: reply,
        };
        let mut buf = BytesMut::with_capacity(StandbyStatusUpdate::LEN);
        update.encode(&mut buf);
        conn.send_copy_data(&buf).await?;
        self.last_status = Instant::now();
        if self.flushed != self.reported_flush {
            tracing::debug!(write = %self.received, flush = %self.flushed, "status update");
            self.reported_flush = self.flushed;
        }
        Ok(())
    }

    /// Stores everything received (a delta in flight is followed by one more for the bytes
    /// that waited for it) and waits for every upload, then reports the durable position.
    async fn drain(&mut self, conn: &mut PgConnection) -> Result<(), JobError> {
        loop {
            self.ship_delta()?;
            let Some(done) = self.uploads.next().await else {
                break;
            };
            self.uploaded(done?);
        }
        self.send_status(conn, false).await
    }

    async fn end_of_timeline(&mut self, conn: &mut PgConnection) -> Result<Ended, JobError> {
        self.drain(conn).await?;
        conn.send_copy_done().await?;
        let results = conn.collect_results().await?;
        let row = results
            .iter()
            .find(|r| r.columns.len() == 2)
            .and_then(|r| r.row(0))
            .context("the server ended streaming without saying where the next timeline starts")?;
        let end = EndOfTimeline::from_row(&row).transient()?;
        tracing::info!(old = %self.tli, new = %end.next_tli, at = %end.next_tli_startpos, "end of timeline");
        Ok(Ended::TimelineSwitch(end))
    }
}

/// The records of a delta starting at `start` worth reusing in the complete segment, at
/// their offsets in it: those of at least [`MIN_REUSED_FRAME`] original bytes, while the
/// segment's kept records (`kept_bytes`, stored bytes) stay within [`MAX_KEPT_RECORDS`].
fn worth_reusing(
    start: u64,
    records: Vec<storage::EncodedRecord>,
    kept_bytes: &std::cell::Cell<u64>,
) -> Reusable {
    let mut at = start;
    records
        .into_iter()
        .filter_map(|r| {
            let offset = at;
            at += r.original_len();
            let kept = kept_bytes.get() + r.stored_len();
            let keep = r.original_len() >= MIN_REUSED_FRAME && kept <= MAX_KEPT_RECORDS;
            keep.then(|| {
                kept_bytes.set(kept);
                (offset, r)
            })
        })
        .collect()
}

/// Deletes objects a stored segment or delta superseded, in the order given. A failure only
/// leaves garbage (readers prefer the complete segment and refuse nothing it supersedes).
async fn remove_superseded(repo: &Repository, keys: Vec<RepoKey>) {
    for k in keys {
        if let Err(e) = repo.delete(&k).await {
            tracing::warn!(key = %k, "could not remove a superseded WAL object: {e}");
        }
    }
}

/// Retries an upload on retryable storage errors forever (the stream stalls meanwhile and
/// the caller warns); other errors end the stream.
async fn retrying<F, Fut>(key: &RepoKey, status: &JobStatus, mut f: F) -> Result<(), WriteError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), WriteError>>,
{
    let mut delay = Duration::from_millis(500);
    let mut last_warn: Option<Instant> = None;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => {
                status.update(|s| s.upload_errors += 1);
                if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    let e = anyhow::Error::new(e);
                    tracing::warn!(%key, "repository write failed, retrying: {e:#}");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_are_coalesced_a_hundredth_of_max_lag_up_to_10ms_never_when_synchronous() {
        let ms = Duration::from_millis;
        assert_eq!(read_coalescing(ms(1000), false), ms(10));
        assert_eq!(read_coalescing(Duration::from_secs(60), false), ms(10));
        assert_eq!(read_coalescing(ms(500), false), ms(5));
        assert_eq!(read_coalescing(ms(100), false), ms(1));
        assert_eq!(read_coalescing(ms(99), false), Duration::ZERO);
        assert_eq!(
            read_coalescing(Duration::from_nanos(1), false),
            Duration::ZERO
        );
        assert_eq!(read_coalescing(ms(1000), true), Duration::ZERO);
    }

    #[test]
    fn write_headroom_starts_at_half_and_follows_the_store() {
        let ms = Duration::from_millis;
        let max_lag = Duration::from_secs(1);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mib = 1u64 << 20;
        let mut h = WriteHeadroom::default();
        // Until a write was seen: the half-way point.
        assert_eq!(h.of(t0, max_lag, mib), ms(500));
        // A fast store: three times its slowest recent write, never below the floor.
        h.observe(at(1), ms(5), 10 * mib);
        assert_eq!(h.of(at(1), max_lag, 10 * mib), ms(100));
        h.observe(at(2), ms(40), 0);
        assert_eq!(h.of(at(2), max_lag, 10 * mib), ms(120));
        // More bytes waiting than twice the largest recent delta: the half-way point.
        assert_eq!(h.of(at(2), max_lag, 20 * mib), ms(120));
        assert_eq!(h.of(at(2), max_lag, 20 * mib + 1), ms(500));
        // A slow write counts at once, capped at half of --max-lag...
        h.observe(at(3), ms(900), 10 * mib);
        assert_eq!(h.of(at(3), max_lag, 0), ms(500));
        // ...until eight faster ones have followed it...
        for i in 0..7 {
            h.observe(at(4 + i), ms(5), 10 * mib);
        }
        assert_eq!(h.of(at(10), max_lag, 0), ms(500));
        h.observe(at(11), ms(5), 10 * mib);
        assert_eq!(h.of(at(11), max_lag, 0), ms(100));
        // ...and what the store showed more than a minute ago no longer counts.
        assert_eq!(h.of(at(71), max_lag, 0), ms(100));
        assert_eq!(h.of(at(72), max_lag, 0), ms(500));
        // The floor is a tenth of a longer --max-lag; a short one keeps its half-way point.
        h.observe(at(80), ms(5), 10 * mib);
        assert_eq!(h.of(at(80), Duration::from_secs(10), 0), ms(1000));
        assert_eq!(h.of(at(80), ms(120), 0), ms(60));
        assert_eq!(h.of(at(80), Duration::from_nanos(1), 0), Duration::ZERO);
    }

    #[test]
    fn segment_buffers_hand_out_contiguous_slices_and_are_reused() {
        let size = WalSegmentSize::new(16 << 20).unwrap();
        let name = SegmentName::new(TimelineId::new(1).unwrap(), 1, size).unwrap();
        let mut bufs = SegmentBuffers::default();
        let mut seg = OpenSegment::new(name, Resume::default(), bufs.take(SEGMENT_BUFFER));
        let first_buf = seg.tail.as_ptr();
        let wal: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // WAL lands in the tail as `recv_wal` puts it there, in uneven pieces.
        let put = |seg: &mut OpenSegment, range: std::ops::Range<usize>| {
            assert!(seg.room(size) >= range.len());
            seg.tail.extend_from_slice(&wal[range.clone()]);
            seg.len += range.len();
        };
        put(&mut seg, 0..1_000_000);
        put(&mut seg, 1_000_000..1_300_000);
        // A delta: one slice from where the chain ends.
        let delta = seg.bytes_from(0);
        assert_eq!(delta.len(), 1);
        assert_eq!(&delta[0][..], &wal[..1_300_000]);
        put(&mut seg, 1_300_000..3_000_000);
        let delta2 = seg.bytes_from(1_300_000);
        assert_eq!(delta2.len(), 1, "the next delta is one slice too");
        assert_eq!(&delta2[0][..], &wal[1_300_000..]);
        assert_eq!(seg.room(size), (16 << 20) - 3_000_000);
        let (parts, buf) = seg.into_parts();
        assert_eq!(parts.concat(), wal, "the segment is every byte in order");
        bufs.give_back(buf);
        // Still referenced by uploads: a new buffer; once they are gone, the old one.
        let other = bufs.take(SEGMENT_BUFFER);
        assert_ne!(other.as_ptr(), first_buf);
        bufs.give_back(other);
        drop((parts, delta, delta2));
        let again = bufs.take(SEGMENT_BUFFER);
        assert_eq!(again.as_ptr(), first_buf, "the first buffer is reused");
        assert!(again.is_empty() && again.capacity() >= SEGMENT_BUFFER);
    }

    /// Records of a delta of `len` bytes written with 1 MiB frames (incompressible when
    /// `raw`, so each record stores about its own length).
    async fn delta_records(
        repo: &Repository,
        len: usize,
        raw: bool,
    ) -> Vec<storage::EncodedRecord> {
        let mut x = 7u64;
        let data: Vec<u8> = (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if raw {
                    x as u8
                } else {
                    (i % 7) as u8
                }
            })
            .collect();
        let key = RepoKey::parse("postgres/wal/00000001/d").unwrap();
        let mut w = repo
            .writer(&key, ContentKind::WalDelta, storage::PutMode::Overwrite)
            .await
            .unwrap();
        w.keep_records().unwrap();
        w.write(Bytes::from(data)).await.unwrap();
        w.finish_with_records().await.unwrap().1
    }

    #[tokio::test]
    async fn only_large_records_within_the_budget_are_kept_for_reuse() {
        let repo = Repository::open("memory:///", storage::RepoOptions::default()).unwrap();
        // 2.5 MiB from offset 100: two whole frames kept at their offsets, the short last
        // one (512 KiB) too; a 100 KB delta's single record is not.
        let kept = std::cell::Cell::new(0);
        let r = worth_reusing(100, delta_records(&repo, 5 << 19, false).await, &kept);
        let offsets: Vec<u64> = r.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, [100, 100 + (1 << 20), 100 + (2 << 20)]);
        let small = worth_reusing(0, delta_records(&repo, 100_000, false).await, &kept);
        assert!(small.is_empty());
        assert_eq!(
            kept.get(),
            r.iter().map(|(_, r)| r.stored_len()).sum::<u64>()
        );
        // Incompressible WAL: records are as large as the WAL, so the budget stops them.
        let kept = std::cell::Cell::new(0);
        let r = worth_reusing(0, delta_records(&repo, 12 << 20, true).await, &kept);
        assert!(r.len() < 8 && !r.is_empty(), "{} records kept", r.len());
        assert!(kept.get() <= MAX_KEPT_RECORDS);
    }

    #[test]
    fn idle_time_is_not_a_stall() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = StallClock::default();
        assert_eq!(c.stalled_for(at(0)), None);
        // One upload, confirmed quickly; then 400 s without WAL.
        c.queued(true, at(0));
        c.completed(0, at(1));
        assert_eq!(c.stalled_for(at(401)), None, "idle is not stalled");
        // WAL arrives after the idle period: the clock starts now, not at the last write.
        c.queued(true, at(401));
        assert_eq!(c.stalled_for(at(402)), Some(Duration::from_secs(1)));
        // A second upload queued behind it does not reset the clock.
        c.queued(false, at(420));
        assert_eq!(c.stalled_for(at(440)), Some(Duration::from_secs(39)));
        // A completion with one still outstanding restarts it.
        c.completed(1, at(441));
        assert_eq!(c.stalled_for(at(445)), Some(Duration::from_secs(4)));
        c.completed(0, at(446));
        assert_eq!(c.stalled_for(at(900)), None);
    }
}
