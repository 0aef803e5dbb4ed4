//! `postgres wal-fetch %f %p`: the `restore_command` side of the repository.
//!
//! PostgreSQL reads the exit status (docs, "Recovering Using a Continuous Archive Backup"):
//! non-zero means "not archived", and recovery ends there — so exit 1 is only ever used when
//! the file truly does not exist. An exit status above 125 makes the startup process stop
//! with FATAL instead, which is what a storage outage or a corrupt object must do, or
//! recovery would end early at the wrong point. Files are written atomically (temp file,
//! fsync, rename) so a crash never leaves a half-written segment at `%p`.
//!
//! The newest partial of a timeline is served as its segment when no later WAL exists on
//! that timeline: assembled from its chain of deltas (refused, naming the delta, when the
//! chain has a gap or an overlap) or an older build's whole partial, and zero-padded to the
//! segment size like `pg_receivewal`'s `.partial`.
//! After serving a segment the next `--prefetch` segments are downloaded in the background
//! into a spool directory beside `%p` (0700, its files 0600), so replay is not bound by one
//! download at a time.
//!
//! Nothing reaches PostgreSQL unchecked ([`wire::pg::page`]): a segment must have exactly
//! the stored length (a complete one `wal_segment_size`; only a partial is padded) and a
//! first page header of this repository's cluster (`xlp_sysid` from the marker), of this
//! segment (`xlp_pageaddr`), segment size, PostgreSQL version and timeline; a history file
//! must parse and be the history of the timeline in its name. PostgreSQL itself would take
//! a wrong segment for the end of WAL and promote early, so a failed check is exit 200,
//! naming the segment and the field.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use storage::layout;
use storage::{RepoKey, RepoMarker, Repository, StorageError};

use super::partial::{assemble, PartialSource};
use wire::pg::page::{self, Extent, MagicRule, SegmentExpectation};
use wire::pg::{SegmentName, TimelineId, WalFileName, WalSegmentSize};

/// Exit status for "cannot tell / must not continue": above 125, so recovery stops FATAL.
pub const EXIT_FATAL: u8 = 200;
/// Exit status for "not in the repository".
pub const EXIT_NOT_FOUND: u8 = 1;

const SPOOL_DIR: &str = ".syncbridge-prefetch";

/// Outcome of a fetch that did not fail.
pub enum Fetched {
    /// Written to the target.
    Written {
        /// Size of a WAL segment, learnt from the object (for prefetching).
        segment_size: Option<WalSegmentSize>,
    },
    /// Truly absent.
    NotFound,
}

/// What the WAL of this repository must look like, beyond what each name says.
#[derive(Debug, Clone, Copy)]
pub struct WalExpect {
    /// The cluster's `system_identifier` (from the repository marker).
    pub system_identifier: Option<u64>,
    /// The cluster's `wal_segment_size`, when known (`--segment-size`, written into
    /// `restore_command` by `restore`); otherwise the segment's own header gives it, and the
    /// length and position checks hold it to that.
    pub segment_size: Option<WalSegmentSize>,
    /// Acceptable `xlp_magic` (`--pg-version`, written by `restore`; any supported version
    /// otherwise).
    pub magic: MagicRule,
}

impl WalExpect {
    /// From the marker and what the caller knows.
    pub fn new(
        marker: &RepoMarker,
        segment_size: Option<WalSegmentSize>,
        pg_major: Option<u32>,
    ) -> Result<WalExpect> {
        let system_identifier = marker
            .system_identifier
            .as_deref()
            .map(|s| {
                s.parse::<u64>().with_context(|| {
                    format!("the repository marker's system_identifier {s:?} is not a number")
                })
            })
            .transpose()?;
        Ok(WalExpect {
            system_identifier,
            segment_size,
            magic: pg_major.map_or(MagicRule::AnyKnown, MagicRule::Major),
        })
    }

    /// Reads the repository marker (a repository without one holds no WAL to trust).
    pub async fn load(
        repo: &Repository,
        segment_size: Option<WalSegmentSize>,
        pg_major: Option<u32>,
    ) -> Result<WalExpect> {
        let marker = repo
            .read_marker()
            .await
            .context("reading the repository marker")?
            .with_context(|| {
                format!("{} is not a SyncBridge repository (no marker)", repo.url())
            })?;
        WalExpect::new(&marker, segment_size, pg_major)
    }
}

/// Checks a segment object stored under `name`'s key before anyone replays it: its length
/// (`len`, `extent`) and the long page header in `head`. Returns the segment with the size
/// it was checked against. The error names the segment and the field.
pub fn check_segment(
    name: &str,
    len: u64,
    head: &[u8],
    extent: Extent,
    expect: &WalExpect,
) -> Result<SegmentName> {
    let fail = |e: page::WalCheckError| {
        anyhow::anyhow!(
            "segment {name} is not the WAL its name says: {e} (field {}); the object under its key holds other data, refusing to hand it to PostgreSQL",
            e.field().name()
        )
    };
    let size = match expect.segment_size {
        Some(s) => s,
        None => {
            let h = page::LongPageHeader::parse(head).map_err(fail)?;
            WalSegmentSize::new(u64::from(h.seg_size)).map_err(|_| {
                anyhow::anyhow!(
                    "segment {name} is not the WAL its name says: xlp_seg_size: {}, not a valid wal_segment_size (field xlp_seg_size); refusing to hand it to PostgreSQL",
                    h.seg_size
                )
            })?
        }
    };
    let seg = SegmentName::parse(name, size)
        .with_context(|| format!("{name:?} is not a segment name for {size} segments"))?;
    page::check_segment_header(
        head,
        &SegmentExpectation {
            segment: seg,
            system_identifier: expect.system_identifier,
            magic: expect.magic,
        },
    )
    .map_err(fail)?;
    page::check_segment_length(len, extent, size).map_err(fail)?;
    Ok(seg)
}

/// Checks a history file stored as `timeline`'s.
pub fn check_history_file(content: &[u8], timeline: TimelineId) -> Result<()> {
    page::check_history(content, timeline).map_err(|e| {
        anyhow::anyhow!(
            "history file {} is not the history of timeline {timeline}: {e} (field {})",
            timeline.history_file_name(),
            e.field().name()
        )
    })?;
    Ok(())
}

/// Parses `%f`: a segment or a history file (any valid segment size accepts the name; the
/// size only matters for what comes next).
fn parse_name(name: &str) -> Result<WalFileName> {
    // 1 MiB segments allow the widest "seg" part, so every real name parses.
    let lenient = WalSegmentSize::new(1024 * 1024)?;
    WalFileName::parse(name, lenient)
        .with_context(|| format!("{name:?} is not a WAL segment or history file name"))
}

fn storage_name(seg: SegmentName) -> Result<layout::WalSegmentName> {
    Ok(layout::WalSegmentName::parse(&seg.to_string())?)
}

/// What is stored of `seg` in progress (deltas, older whole partials), if `seg` is the last
/// WAL on its timeline; `None` if later WAL exists or nothing is stored.
async fn last_partial(
    repo: &Repository,
    seg: &layout::WalSegmentName,
) -> Result<Option<PartialSource>> {
    match crate::catalog::pg::segment_in_progress(repo, seg)
        .await
        .context("looking for a partial segment")?
    {
        Some(stored) => stored.newest(seg.as_str()),
        None => Ok(None),
    }
}

/// What a fetch served: one object, or a partial segment assembled from its deltas.
enum Served {
    Whole(RepoKey),
    Partial { end: u32, what: String },
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Served::Whole(k) => write!(f, "{k}"),
            Served::Partial { what, .. } => f.write_str(what),
        }
    }
}

/// Why a download did not complete: the repository (retry if retryable) or the local disk.
enum Failure {
    Storage(StorageError),
    Local(anyhow::Error),
}

/// The verified object, streamed into `tmp` frame by frame (never held whole in memory:
/// a short-lived process pays a page fault for every fresh page it touches).
struct Downloaded {
    len: u64,
    /// The first bytes, for the WAL page header.
    head: Vec<u8>,
}

/// The outer error is the repository's (already retried by the repository: storage's
/// `backend/retry.rs` says which layer retries what), the inner one the local disk's.
async fn download_once(
    repo: &Repository,
    key: &RepoKey,
    tmp: &Path,
) -> Result<Result<Downloaded>, StorageError> {
    let local = |e: std::io::Error, what: &str| {
        anyhow::Error::new(e).context(format!("{what} {}", tmp.display()))
    };
    let mut reader = repo.reader(key).await?;
    let mut f = match create_private(tmp) {
        Ok(f) => f,
        Err(e) => return Ok(Err(local(e, "creating"))),
    };
    let mut out = Downloaded {
        len: 0,
        head: Vec::new(),
    };
    while let Some(chunk) = reader.next_chunk().await? {
        if out.head.len() < 64 {
            let n = (64 - out.head.len()).min(chunk.len());
            out.head.extend_from_slice(&chunk[..n]);
        }
        if let Err(e) = f.write_all(&chunk) {
            return Ok(Err(local(e, "writing")));
        }
        out.len += chunk.len() as u64;
    }
    Ok(Ok(out))
}

/// `download_once`, its two kinds of failure told apart.
async fn download(repo: &Repository, key: &RepoKey, tmp: &Path) -> Result<Downloaded, Failure> {
    match download_once(repo, key, tmp).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(local)) => Err(Failure::Local(local)),
        Err(e) => Err(Failure::Storage(e)),
    }
}

/// Creates a file readable by its owner only, as PostgreSQL keeps `pg_wal` (a leftover of
/// an earlier attempt is replaced, so it cannot keep a wider mode).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates `dir` and its missing parents with mode 0700, and tightens `dir` itself to 0700
/// if it already existed (a spool made by an older version was 0755).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The temporary name `target` is written under before the rename.
fn temp_beside(target: &Path) -> Result<PathBuf> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .context("target path has no file name")?
        .to_string_lossy()
        .into_owned();
    Ok(dir.join(format!(".{file_name}.syncbridge-tmp")))
}

/// Fetches `name` into `target` atomically, once it passed the checks.
pub async fn fetch(
    repo: &Repository,
    name: &str,
    target: &Path,
    expect: &WalExpect,
) -> Result<Fetched> {
    let tmp = temp_beside(target)?;
    let result = fetch_into(repo, name, &tmp, target, expect).await;
    if !matches!(result, Ok(Fetched::Written { .. })) {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn fetch_into(
    repo: &Repository,
    name: &str,
    tmp: &Path,
    target: &Path,
    expect: &WalExpect,
) -> Result<Fetched> {
    let parsed = parse_name(name)?;
    let key = match parsed {
        WalFileName::History(t) => layout::timeline_history(layout::TimelineId::new(t.get())?),
        WalFileName::Segment(s) => layout::wal_segment(&storage_name(s)?),
    };
    let (got, served) = match download(repo, &key, tmp).await {
        Ok(d) => (d, Served::Whole(key)),
        Err(Failure::Storage(e)) if e.is_not_found() => {
            let WalFileName::Segment(s) = parsed else {
                return Ok(Fetched::NotFound);
            };
            let Some(partial) = last_partial(repo, &storage_name(s)?).await? else {
                return Ok(Fetched::NotFound);
            };
            let what = partial.describe();
            tracing::info!(partial = %what, "serving the newest partial as {name}: it is the last WAL of its timeline");
            let mut f =
                create_private(tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let (len, head) = assemble(repo, &partial, &mut f, 64).await?;
            let served = Served::Partial {
                end: partial.end(),
                what,
            };
            (Downloaded { len, head }, served)
        }
        Err(Failure::Storage(e)) => {
            return Err(anyhow::Error::new(e).context(format!("fetching {key}")))
        }
        Err(Failure::Local(e)) => return Err(e),
    };
    let segment_size = match parsed {
        WalFileName::Segment(_) => {
            let extent = match &served {
                Served::Partial { end, .. } => Extent::Partial(u64::from(*end)),
                Served::Whole(_) => Extent::Complete,
            };
            let seg = check_segment(name, got.len, &got.head, extent, expect)
                .with_context(|| format!("checking {served}"))?;
            pad_file(tmp, got.len, seg.size())?;
            Some(seg.size())
        }
        WalFileName::History(t) => {
            let content =
                std::fs::read(tmp).with_context(|| format!("reading back {}", tmp.display()))?;
            check_history_file(&content, t).with_context(|| format!("checking {served}"))?;
            None
        }
    };
    publish(tmp, target, true)?;
    Ok(Fetched::Written { segment_size })
}

/// Zero-pads a partial segment's file to the full segment size, as `pg_receivewal` pads
/// its `.partial` files (a complete one is left as is).
fn pad_file(path: &Path, len: u64, size: WalSegmentSize) -> Result<()> {
    if len >= size.bytes() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = size.bytes() - len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])
            .with_context(|| format!("padding {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// Makes `tmp` durable (when asked) and renames it to `target`.
fn publish(tmp: &Path, target: &Path, durable: bool) -> Result<()> {
    if durable {
        std::fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(tmp, target)
        .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
}

/// The prefetch spool beside `%p`, one directory per boot of the machine.
///
/// Why per boot: spooled segments are written without fsync (a 16 MiB fsync per segment
/// competed with replay for the disk and doubled replay time). A process killed at any
/// moment loses nothing the kernel already has, so within one boot a renamed spool file
/// is whole; after an OS crash it might not be, and a torn segment served to PostgreSQL
/// could end recovery early. An OS crash means a new boot id, so those files are never
/// served and the prefetcher removes them.
fn spool_dir(target: &Path) -> PathBuf {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(SPOOL_DIR)
        .join(boot_id().unwrap_or_else(|| "durable".to_string()))
}

/// The kernel's id of this boot (Linux), if it can be read.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then(|| id.to_string())
}

/// Whether files in `spool` may skip fsync: only in a spool tied to the current boot.
fn spool_is_per_boot(spool: &Path) -> bool {
    spool
        .file_name()
        .is_some_and(|n| boot_id().is_some_and(|b| n.to_string_lossy() == b))
}

/// Removes spools of earlier boots (their files may be torn).
fn remove_other_boot_spools(spool: &Path) {
    let Some(parent) = spool.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        if e.path() != spool && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Serves `name` from the prefetch spool if a background fetch already has it: a rename,
/// no runtime, no repository client. PostgreSQL waits for every `restore_command`, so
/// this path is kept to the bare process start.
pub fn serve_from_spool(
    repo_url: &str,
    name: &str,
    target: &Path,
    prefetch: usize,
    pg_major: Option<u32>,
) -> bool {
    let started = std::time::Instant::now();
    let spool = spool_dir(target);
    let spooled = spool.join(name);
    let Some(seg) = std::fs::metadata(&spooled)
        .ok()
        .filter(|m| m.is_file())
        .and_then(|m| WalSegmentSize::new(m.len()).ok())
        .and_then(|size| match WalFileName::parse(name, size) {
            Ok(WalFileName::Segment(s)) => Some(s),
            _ => None,
        })
    else {
        return false;
    };
    // The position first: the prefetcher then neither fetches this segment again nor
    // removes it (it only removes segments before the position).
    record_position(seg, prefetch, &spool);
    if std::fs::rename(&spooled, target).is_err() {
        return false;
    }
    tracing::debug!(
        name,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "served from the prefetch spool"
    );
    start_prefetch(repo_url, seg, prefetch, &spool, pg_major);
    true
}

/// What `wal-fetch` was told about the cluster (both optional; `restore` passes both).
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints {
    /// `--segment-size`.
    pub segment_size: Option<WalSegmentSize>,
    /// `--pg-version`.
    pub pg_major: Option<u32>,
}

/// Runs `wal-fetch` and maps the outcome to PostgreSQL's exit-status contract.
pub async fn run(
    repo: &Repository,
    repo_url: &str,
    name: &str,
    target: &Path,
    prefetch: usize,
    hints: Hints,
) -> ExitCode {
    // The spool was already tried (`serve_from_spool`) before the runtime was built.
    let started = std::time::Instant::now();
    let spool = spool_dir(target);
    let fatal = |e: anyhow::Error| {
        eprintln!("error: wal-fetch {name}: {e:#}");
        eprintln!("(exiting with {EXIT_FATAL} so that PostgreSQL stops instead of ending recovery at the wrong point)");
        ExitCode::from(EXIT_FATAL)
    };
    let expect = match WalExpect::load(repo, hints.segment_size, hints.pg_major).await {
        Ok(e) => e,
        Err(e) => return fatal(e),
    };
    match fetch(repo, name, target, &expect).await {
        Ok(Fetched::Written { segment_size }) => {
            tracing::debug!(
                name,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "fetched from the repository"
            );
            // Only segments have a size; history files start no prefetch.
            if let Some(Ok(WalFileName::Segment(s))) =
                segment_size.map(|size| WalFileName::parse(name, size))
            {
                record_position(s, prefetch, &spool);
                start_prefetch(repo_url, s, prefetch, &spool, hints.pg_major);
            }
            ExitCode::SUCCESS
        }
        Ok(Fetched::NotFound) => {
            tracing::info!(name, "not in the repository");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(e) => fatal(e),
    }
}

/// Where wal-fetch tells the prefetcher which segment PostgreSQL asked for last.
const POSITION_FILE: &str = "position";
/// Held (flock) by the running prefetcher, so there is at most one per spool.
const LOCK_FILE: &str = "prefetcher.lock";
/// A prefetcher with no new request for this long exits (recovery ended or stalled; the
/// next request starts a new one).
const PREFETCH_IDLE_EXIT: Duration = Duration::from_secs(10);

/// Tells the prefetcher that PostgreSQL asked for `seg` (written atomically).
fn record_position(seg: SegmentName, count: usize, spool: &Path) {
    if count == 0 || create_spool(spool).is_err() {
        return;
    }
    let tmp = spool.join(format!("{POSITION_FILE}.tmp"));
    let written = create_private(&tmp).and_then(|mut f| f.write_all(seg.to_string().as_bytes()));
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, spool.join(POSITION_FILE));
    }
}

/// The prefetcher's lock file (created if missing), to flock.
fn open_lock(spool: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(spool.join(LOCK_FILE))
}

/// Creates the spool (0700, and its `.syncbridge-prefetch` parent too: spooled WAL holds
/// the cluster's data, readable by the server's user only, like `pg_wal`).
fn create_spool(spool: &Path) -> std::io::Result<()> {
    create_private_dir(spool)?;
    if let Some(parent) = spool
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == SPOOL_DIR))
    {
        create_private_dir(parent)?;
    }
    Ok(())
}

/// Makes sure a prefetcher is running for the spool. One long-lived prefetcher per spool
/// keeps `count` segments ahead over one connection pool, instead of a process (start-up,
/// TLS handshake) per segment competing with replay for the CPU.
fn start_prefetch(
    repo_url: &str,
    seg: SegmentName,
    count: usize,
    spool: &Path,
    pg_major: Option<u32>,
) {
    if count == 0 {
        return;
    }
    let Ok(file) = open_lock(spool) else {
        return;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        // Free: nobody is prefetching. Release it for the prefetcher about to start.
        Ok(lock) => release(lock),
        // Held: a prefetcher is running and will see the new position.
        Err(_) => return,
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["postgres", "wal-prefetch", "--repo", repo_url, "--spool"])
        .arg(spool)
        .args([
            "--after",
            &seg.to_string(),
            "--segment-size",
            &seg.size().bytes().to_string(),
            "--count",
            &count.to_string(),
        ]);
    if let Some(m) = pg_major {
        cmd.args(["--pg-version", &m.to_string()]);
    }
    let spawned = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        tracing::warn!("could not start WAL prefetch: {e}");
    }
}

/// The newest segment wal-fetch was asked for, from the position file.
fn read_position(spool: &Path, size: WalSegmentSize) -> Option<SegmentName> {
    let text = std::fs::read_to_string(spool.join(POSITION_FILE)).ok()?;
    SegmentName::parse(text.trim(), size).ok()
}

/// The background half, one per spool (it holds the lock file): keeps the `count`
/// segments after the newest request downloaded into `spool`, several at a time, removes
/// spooled segments PostgreSQL has moved past, and exits when requests stop coming, the
/// spool disappears, or another prefetcher holds the lock.
pub async fn prefetch(
    repo: &Repository,
    spool: &Path,
    after: SegmentName,
    count: usize,
    pg_major: Option<u32>,
) -> Result<()> {
    create_spool(spool).with_context(|| format!("creating {}", spool.display()))?;
    let expect = WalExpect::load(repo, Some(after.size()), pg_major).await?;
    let file = open_lock(spool)
        .with_context(|| format!("opening the prefetch lock in {}", spool.display()))?;
    let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
        // Another prefetcher serves this spool.
        return Ok(());
    };
    remove_other_boot_spools(spool);
    let durable = !spool_is_per_boot(spool);
    let size = after.size();
    let mut position = after;
    let mut stale = true;
    let mut last_change = std::time::Instant::now();
    let mut missing: std::collections::HashMap<String, std::time::Instant> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut in_flight: std::collections::HashSet<String> = Default::default();
    loop {
        if !spool.is_dir() {
            break;
        }
        if let Some(p) = read_position(spool, size) {
            if p != position {
                position = p;
                last_change = std::time::Instant::now();
                stale = true;
            }
        }
        if last_change.elapsed() > PREFETCH_IDLE_EXIT && tasks.is_empty() {
            break;
        }
        // Segments before the newest request will not be asked for again (the newest one
        // itself is being moved out by wal-fetch). Looked for only when the position moved
        // or a download landed, not on every tick.
        if std::mem::take(&mut stale) {
            remove_passed(spool, position);
        }
        let mut cur = position;

        for _ in 0..count {
            let Some(next) = cur.next() else { break };
            cur = next;
            let name = next.to_string();
            let dest = spool.join(&name);
            let recently_missing = missing
                .get(&name)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
            if dest.exists() || in_flight.contains(&name) || recently_missing {
                continue;
            }
            let Ok(key) = storage_name(next).map(|s| layout::wal_segment(&s)) else {
                continue;
            };
            in_flight.insert(name.clone());
            let repo = repo.clone();
            tasks.spawn(async move {
                let Ok(tmp) = temp_beside(&dest) else {
                    return (name, false);
                };
                // Only checked WAL enters the spool (it is served from there unread); a
                // segment that fails is left for wal-fetch, which fails loudly on it.
                let stored = match download(&repo, &key, &tmp).await {
                    Ok(d) => {
                        match check_segment(&name, d.len, &d.head, Extent::Complete, &expect) {
                            Ok(_) => publish(&tmp, &dest, durable).is_ok(),
                            Err(e) => {
                                tracing::warn!("not prefetching {name}: {e:#}");
                                false
                            }
                        }
                    }
                    Err(_) => false,
                };
                if !stored {
                    let _ = std::fs::remove_file(&tmp);
                }
                (name, stored)
            });
        }
        // Wait for a download to finish or for the next look at the position file.
        let tick = tokio::time::sleep(Duration::from_millis(20));
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                stale = true;
                if let Ok((name, stored)) = done {
                    in_flight.remove(&name);
                    if !stored {
                        missing.insert(name, std::time::Instant::now());
                    }
                }
            }
            _ = tick => {}
        }
    }
    tasks.abort_all();
    release(lock);
    Ok(())
}

/// Removes spooled segments before `position` on its timeline.
fn remove_passed(spool: &Path, position: SegmentName) {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Ok(s) = SegmentName::parse(&n, position.size()) {
            if s.timeline() == position.timeline() && s.segno() < position.segno() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Unlocks; should that ever fail, the lock goes with the process instead (never a
/// panic from the lock guard's drop).
fn release(lock: Flock<std::fs::File>) {
    if let Err((lock, _)) = lock.unlock() {
        std::mem::forget(lock);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn long_header(seg_size: u32) -> Vec<u8> {
        let mut v = vec![0u8; 40];
        v[0..2].copy_from_slice(&0xD116u16.to_le_bytes()); // xlp_magic (PG 17)
        v[2..4].copy_from_slice(&0x0002u16.to_le_bytes()); // XLP_LONG_HEADER
        v[32..36].copy_from_slice(&seg_size.to_le_bytes());
        v[36..40].copy_from_slice(&8192u32.to_le_bytes());
        v
    }

    fn expect(sysid: Option<u64>, size: Option<u64>) -> WalExpect {
        WalExpect {
            system_identifier: sysid,
            segment_size: size.map(|s| WalSegmentSize::new(s).unwrap()),
            magic: MagicRule::AnyKnown,
        }
    }

    #[test]
    fn segments_are_checked_against_name_and_repository() {
        let name = "000000010000000000000006";
        let seg = 16u64 << 20;
        let mut h = long_header(16 << 20);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&(6 * seg).to_le_bytes());
        h[24..32].copy_from_slice(&77u64.to_le_bytes());
        let ok = check_segment(name, seg, &h, Extent::Complete, &expect(Some(77), None)).unwrap();
        assert_eq!(ok.size().bytes(), seg);
        check_segment(
            name,
            100,
            &h,
            Extent::Partial(100),
            &expect(Some(77), Some(seg)),
        )
        .unwrap();
        let err = |len, extent, e: WalExpect| {
            format!(
                "{:#}",
                check_segment(name, len, &h, extent, &e).unwrap_err()
            )
        };
        let m = err(8192, Extent::Complete, expect(Some(77), None));
        assert!(m.contains(name) && m.contains("field length"), "{m}");
        let m = err(seg, Extent::Complete, expect(Some(78), None));
        assert!(m.contains(name) && m.contains("field xlp_sysid"), "{m}");
        let m = err(seg, Extent::Complete, expect(Some(77), Some(1 << 20)));
        assert!(m.contains("field xlp_seg_size"), "{m}");
        let m = format!(
            "{:#}",
            check_segment(
                "000000010000000000000007",
                seg,
                &h,
                Extent::Complete,
                &expect(None, None)
            )
            .unwrap_err()
        );
        assert!(
            m.contains("000000010000000000000007") && m.contains("field xlp_pageaddr"),
            "{m}"
        );
        let mut bad = h.clone();
        bad[32..36].copy_from_slice(&(3u32 << 20).to_le_bytes());
        let m = format!(
            "{:#}",
            check_segment(name, seg, &bad, Extent::Complete, &expect(None, None)).unwrap_err()
        );
        assert!(m.contains("xlp_seg_size"), "{m}");
    }

    #[test]
    fn spool_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join(SPOOL_DIR).join("boot");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::set_permissions(
            dir.path().join(SPOOL_DIR),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let size = WalSegmentSize::DEFAULT;
        let seg = SegmentName::parse("000000010000000000000006", size).unwrap();
        record_position(seg, 4, &spool);
        drop(open_lock(&spool).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&spool), 0o700);
        assert_eq!(mode(&dir.path().join(SPOOL_DIR)), 0o700);
        assert_eq!(mode(&spool.join(POSITION_FILE)), 0o600);
        assert_eq!(mode(&spool.join(LOCK_FILE)), 0o600);
        let f = dir.path().join("f");
        create_private(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(read_position(&spool, size), Some(seg));
    }

    #[test]
    fn partials_are_zero_padded() {
        let size = WalSegmentSize::new(1 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("partial");
        std::fs::write(&partial, b"abc").unwrap();
        pad_file(&partial, 3, size).unwrap();
        let padded = std::fs::read(&partial).unwrap();
        assert_eq!(padded.len(), 1 << 20);
        assert_eq!(&padded[..3], b"abc");
        assert!(padded[3..].iter().all(|&b| b == 0));
        let full = dir.path().join("full");
        std::fs::write(&full, vec![1u8; 1 << 20]).unwrap();
        pad_file(&full, 1 << 20, size).unwrap();
        assert_eq!(std::fs::read(&full).unwrap(), vec![1u8; 1 << 20]);
    }

    #[test]
    fn names_restore_command_asks_for() {
        assert!(matches!(
            parse_name("00000002.history").unwrap(),
            WalFileName::History(_)
        ));
        assert!(matches!(
            parse_name("000000010000000100000FFF").unwrap(),
            WalFileName::Segment(_)
        ));
        assert!(parse_name("RECOVERYXLOG").is_err());
        assert!(parse_name("../../etc/passwd").is_err());
    }
}
