//! `syncbridge-agent verify --repo URL [--max-age DUR] [--output text|json] [--jobs N]`:
//! is this repository healthy and restorable right now? Modelled on pgBackRest's `verify`
//! (every file of the repository read back and checked against what its backup or archive
//! recorded, WAL continuity from each backup on), for both kinds of repository:
//!
//! * **Every object** is read to its end, `--jobs` at a time, through the storage reader,
//!   which checks each frame's CRC32C, the trailer's digest and (format versions 2 to 4) that
//!   the object is bound to its key and repository: a flipped byte, a truncated object or
//!   two objects swapped fail here, named by key. Memory is bounded by the readers' frame
//!   buffers (a Redis command chunk is read whole: chunks are small).
//! * **PostgreSQL base backups**: each data object listed in `backup.json` must exist, hold
//!   the original bytes `backup.json` records (length and digest) and split into exactly
//!   its pieces; each file's CRC32C combined from its pieces must match `backup.json` and
//!   the server's `backup_manifest` (the checks restore makes,
//!   [`crate::restore::unpack::file_problems`]). A missing data object is named with the
//!   files it holds.
//! * **PostgreSQL WAL**: every WAL object is also checked as WAL (`repo check`'s
//!   [`crate::repo_cmd::check_wal_object`]: page header, segment, system identifier), delta
//!   chains of segments in progress must link
//!   ([`crate::pg::partial::SegmentPartials::newest`], what
//!   `wal-fetch` serves), and WAL must be stored without a hole on every timeline from the
//!   oldest backup's start to the newest WAL, following each timeline's history file (the
//!   path recovery reads, [`WalPath`]); each missing segment is named. A timeline with WAL
//!   but no history file is damage too: recovery cannot follow it.
//! * **Redis**: each generation's snapshot through the RDB validator and its chunk chain
//!   gap-free from the snapshot's offset with whole commands (the checks of `redis verify`,
//!   [`crate::redis::verify::check_generation`]). A Redis Cluster capture: every shard so,
//!   on its view, and the shard records and slot-map history
//!   ([`crate::redis::cluster_verify`]); the report has a `cluster` part per shard.
//! * **Staleness** (`--max-age`): the newest WAL object (segment, partial or delta) or the
//!   newest object of the newest Redis generation, by the store's last-modified time, must
//!   be younger than the limit: a stream that stopped shows here before a restore needs it.
//!   (An idle PostgreSQL cluster writes no WAL, so its newest WAL ages with a healthy
//!   stream; a Redis master pings its replicas every 10 s, so chunks keep coming.)
//!
//! A repository in use stays verifiable: an object a running stream or `expire` removes
//! between the listing and its reading is not damage, and a hole in the WAL or a broken
//! chain of the newest Redis generation is looked at again after [`RECHECK_AFTER`] (a
//! stream's concurrent uploads may land out of order) before it is reported.
//!
//! Progress: every 5 s (every 0.5 s on a terminal) a line on stderr counts the objects and
//! stored bytes verified so far out of the listing's, and the reading speed. Test hook:
//! `SYNCBRIDGE_TEST_READ_DELAY_MS=N` makes each object a job reads wait N ms first, so a test
//! sees the progress of a long verification on a small repository
//! (`tests/tests/verify.rs`). Read only here; not for production use.
//!
//! Exit status: 0 healthy; 1 damaged (one line per problem naming the object's key); 2
//! stale but intact. Damage wins over staleness. An error that stops the verification
//! itself (the repository cannot be listed) also exits 1. `--output json` prints the
//! versioned document of `docs/verify-json.md` (`syncbridge.verify/1`).

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use storage::layout::{self, BackupId, WalObject};
use storage::{RepoKey, RepoKind, RepoMarker, Repository, StorageError};
use wire::pg::{Lsn, SegmentName, TimelineHistory, TimelineId, WalSegmentSize};

use crate::catalog::pg::wal::WalGap;
use crate::catalog::pg::{Backup, BackupCatalog, WalInventory, WalPath};
use crate::catalog::redis::RedisCatalog;
use crate::cli::RepoArgs;
use crate::list::Output;
use crate::pg::backup::{manifest_path, parse_server_manifest, ServerManifestFile};
use crate::pg::backup_manifest::{BackupManifest, DataChunk};
use crate::pg::backup_progress::human;
use crate::pg::wal_fetch::{check_history_file, WalExpect};
use crate::redis::verify::Tally;
use crate::restore::unpack::{file_problems, read_pieces, Written};
use crate::util::duration::parse_duration;

/// The version of the JSON `verify` prints.
pub const VERIFY_SCHEMA: &str = "syncbridge.verify/1";

/// Exit status of a stale but intact repository.
const EXIT_STALE: u8 = 2;

/// How long to wait before looking again at WAL or a chunk chain that looks broken (a
/// stream's concurrent uploads land out of order).
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// Missing segments of one hole named one by one; the rest are counted.
const MAX_NAMED_SEGMENTS: u64 = 16;

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Fail (exit 2 when otherwise intact) if the newest WAL or Redis chunk was stored
    /// longer ago than this (e.g. 5m, 1h): the stream has stopped.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_age: Option<Duration>,
    /// text for people, json for scripts and monitoring (a versioned schema,
    /// docs/verify-json.md).
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
    /// Objects read at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
}

/// Runs `verify`.
pub fn run(args: VerifyArgs) -> Result<ExitCode> {
    crate::cli::block_on(verify(args))
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Everything checked out (and, with `--max-age`, the newest WAL or chunk is recent).
    Healthy,
    /// At least one problem: exit 1.
    Damaged,
    /// Intact, but the newest WAL or chunk is older than `--max-age`: exit 2.
    Stale,
}

/// One thing wrong, on one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object's key (for a missing object, the key it should have).
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

/// Everything `verify` reports (`docs/verify-json.md`).
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// [`VERIFY_SCHEMA`].
    pub schema: &'static str,
    /// The repository's URL.
    pub url: String,
    /// `postgres` or `redis`.
    pub kind: &'static str,
    /// The outcome.
    pub status: Status,
    /// When the verification started.
    pub started: DateTime<Utc>,
    /// Seconds it took.
    pub elapsed_seconds: f64,
    /// Objects listed in the repository.
    pub objects: u64,
    /// Objects read to the end and checked.
    pub objects_verified: u64,
    /// Distinct keys with a problem.
    pub objects_damaged: u64,
    /// Stored bytes read.
    pub bytes_verified: u64,
    /// PostgreSQL: complete base backups checked.
    pub backups: u64,
    /// PostgreSQL: timelines whose WAL continuity was checked.
    pub timelines: u64,
    /// Redis: generations checked.
    pub generations: u64,
    /// Every problem, one per object and fault.
    pub problems: Vec<Problem>,
    /// When the newest WAL object or Redis chunk was stored (the store's time); `null`
    /// when there is none.
    pub newest_time: Option<DateTime<Utc>>,
    /// `wal` or `chunk`: what `newest_time` is of.
    pub newest_kind: &'static str,
    /// Seconds between `newest_time` and `started`.
    pub age_seconds: Option<f64>,
    /// `--max-age` in seconds, `null` without it.
    pub max_age_seconds: Option<f64>,
    /// Whether the newest WAL or chunk is older than `--max-age` (or there is none).
    pub stale: bool,
    /// A Redis Cluster capture: each shard and the slot-map history (`null` otherwise).
    pub cluster: Option<ClusterVerify>,
}

/// What `verify` checked of a Redis Cluster capture.
#[derive(Debug, Serialize)]
pub struct ClusterVerify {
    /// Every shard, in order.
    pub shards: Vec<ShardVerify>,
    /// Slot-map records checked.
    pub slot_maps: u64,
}

/// One shard of a cluster capture as `verify` found it.
#[derive(Debug, Serialize)]
pub struct ShardVerify {
    /// Its key (`s01`).
    pub shard: String,
    /// Complete generations checked.
    pub generations: u64,
    /// When its newest generation's newest object was stored.
    pub newest_time: Option<DateTime<Utc>>,
    /// Problems under the shard's prefix.
    pub problems: u64,
}

/// What there is to read, and how it is checked.
enum Job {
    /// Read to the end (`Repository::verify`).
    Plain(RepoKey),
    /// Read and checked as WAL.
    Wal(RepoKey, WalObject),
    /// Data object `chunk` of backup `backup` (indexes into the catalog's backups).
    BackupChunk { backup: usize, chunk: usize },
    /// The server's `backup_manifest` of backup `backup`.
    ServerManifest { backup: usize },
}

/// What one job found.
#[derive(Default)]
struct Outcome {
    problems: Vec<Problem>,
    /// The pieces of a backup data object read whole: (backup, pieces).
    pieces: Option<(usize, Written)>,
    /// A backup's server manifest read whole: (backup, files).
    server_files: Option<(usize, Vec<ServerManifestFile>)>,
    /// Listed but gone when read (a stream or expire removed it meanwhile).
    vanished: bool,
}

fn problem(key: impl ToString, text: impl Into<String>) -> Problem {
    Problem {
        key: key.to_string(),
        problem: text.into(),
    }
}

/// A problem from an error: the key the error names (storage errors always name one),
/// else `key`; the text without a repeated "object KEY".
fn error_problem(key: &RepoKey, err: &anyhow::Error) -> Problem {
    let named = err
        .chain()
        .find_map(|e| e.downcast_ref::<StorageError>())
        .and_then(|e| e.key().map(str::to_owned))
        .unwrap_or_else(|| key.to_string());
    let text = format!("{err:#}");
    let text = text
        .strip_prefix(&format!("object {named} "))
        .map(str::to_owned)
        .unwrap_or(text);
    Problem {
        key: named,
        problem: text,
    }
}

/// Whether the error is "this object does not exist".
fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain()
        .find_map(|e| e.downcast_ref::<StorageError>())
        .is_some_and(StorageError::is_not_found)
}

/// Shared state of the jobs.
struct Ctx {
    repo: Repository,
    /// The complete backups, typed by the catalog.
    backups: Vec<Backup>,
    wal_expect: Option<WalExpect>,
}

async fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let report = check(&repo, args.max_age, usize::from(args.jobs), true).await?;
    match args.output {
        Output::Json => {
            let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
            println!("{text}");
        }
        Output::Text => print_text(&report, args.max_age),
    }
    Ok(match report.status {
        Status::Healthy => ExitCode::SUCCESS,
        Status::Damaged => ExitCode::FAILURE,
        Status::Stale => ExitCode::from(EXIT_STALE),
    })
}

/// Verifies `repo` (see the module docs), reading `jobs` objects at once; with `progress`,
/// reports progress on stderr every few seconds. The report's `status` is the outcome;
/// an error means the verification itself could not run (no marker, the store cannot be
/// listed, an encrypted repository without its identity).
pub async fn check(
    repo: &Repository,
    max_age: Option<Duration>,
    jobs: usize,
    progress: bool,
) -> Result<VerifyReport> {
    let started = Utc::now();
    let clock = Instant::now();
    let Some(marker) = repo.read_marker().await? else {
        bail!("{} is not a SyncBridge repository (no marker)", repo.url());
    };
    if marker.encryption.is_some() && !repo.can_decrypt() {
        bail!(
            "{} is encrypted: pass --identity FILE (or SYNCBRIDGE_IDENTITY) to verify its contents",
            repo.url()
        );
    }
    let listed = repo
        .list(&RepoKey::root())
        .await
        .with_context(|| format!("listing {}", repo.url()))?;
    // Leases are plaintext records of who writes, not data: neither listed nor read.
    let listed: Vec<storage::ObjectMeta> = listed
        .into_iter()
        .filter(|m| !layout::is_lease_key(&m.key))
        .collect();
    let total_objects = listed.len() as u64;
    let total_bytes: u64 = listed.iter().map(|m| m.size).sum();
    let ticker = Ticker::start(total_objects, total_bytes, progress);
    // The marker was read and checked by `read_marker`.
    for m in listed.iter().filter(|m| m.key == layout::marker()) {
        ticker.tally.add(m.size);
    }
    let jobs = jobs.max(1);
    let mut report = VerifyReport {
        schema: VERIFY_SCHEMA,
        url: repo.url().to_string(),
        kind: match marker.kind {
            RepoKind::Postgres => "postgres",
            RepoKind::Redis => "redis",
        },
        status: Status::Healthy,
        started,
        elapsed_seconds: 0.0,
        objects: total_objects,
        objects_verified: 0,
        objects_damaged: 0,
        bytes_verified: 0,
        backups: 0,
        timelines: 0,
        generations: 0,
        problems: Vec::new(),
        newest_time: None,
        newest_kind: "wal",
        age_seconds: None,
        max_age_seconds: max_age.map(|d| d.as_secs_f64()),
        stale: false,
        cluster: None,
    };
    let tally = match marker.kind {
        RepoKind::Postgres => {
            verify_postgres(repo, &marker, listed, jobs, &ticker.tally, &mut report).await?
        }
        RepoKind::Redis => {
            report.newest_kind = "chunk";
            verify_redis(repo, listed, jobs, &ticker.tally, &mut report).await?
        }
    };
    ticker.stop(progress);
    report.objects_verified = tally.0;
    report.bytes_verified = tally.1;
    // By key, so a missing chunk comes before the chunks after it; stable, so one
    // object's problems keep the order they were found in.
    report.problems.sort_by(|a, b| a.key.cmp(&b.key));
    report.problems.dedup();
    report.objects_damaged = report
        .problems
        .iter()
        .map(|p| p.key.as_str())
        .collect::<HashSet<_>>()
        .len() as u64;
    report.age_seconds = report
        .newest_time
        .map(|t| (started - t).num_milliseconds().max(0) as f64 / 1000.0);
    report.stale = match (max_age, report.age_seconds) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(max), Some(age)) => age > max.as_secs_f64(),
    };
    report.status = if !report.problems.is_empty() {
        Status::Damaged
    } else if report.stale {
        Status::Stale
    } else {
        Status::Healthy
    };
    report.elapsed_seconds = clock.elapsed().as_secs_f64();
    Ok(report)
}

/// Keys verified elsewhere than by reading them: the marker (read by `read_marker`, which
/// checks it) and writer leases (plaintext records, not containers).
fn skipped(key: &RepoKey) -> bool {
    *key == layout::marker() || layout::is_lease_key(key)
}

async fn verify_postgres(
    repo: &Repository,
    marker: &RepoMarker,
    listed: Vec<storage::ObjectMeta>,
    jobs: usize,
    tally: &Arc<Tally>,
    report: &mut VerifyReport,
) -> Result<(u64, u64)> {
    let present: HashSet<RepoKey> = listed.iter().map(|m| m.key.clone()).collect();
    // A `backup.json` that cannot be read or does not check out is named; the rest are
    // verified.
    let (catalog, unreadable) = BackupCatalog::load_checked(repo).await?;
    for u in unreadable {
        // Gone since the listing: an expire removed it (its data goes next).
        if !is_not_found(&u.error) {
            report.problems.push(error_problem(
                &layout::base_backup_manifest(&u.id),
                &u.error,
            ));
        }
    }
    let mut backups = catalog.complete;
    backups.sort_by_key(|b| b.start);
    report.backups = backups.len() as u64;
    if backups.is_empty() && report.problems.is_empty() {
        report.problems.push(problem(
            layout::base_backups_prefix(),
            "no complete base backup: nothing in the repository can be restored",
        ));
    }
    // The backups say the segment size; without one, each segment's header says it.
    let known_size = backups.first().map(|b| b.segment_size);
    let size = known_size.unwrap_or(WalSegmentSize::DEFAULT);
    let wal_expect = WalExpect::new(marker, known_size, None)?;

    // What to read: the data objects and server manifests the backups list (those missing
    // are problems now), every other object as WAL or as a plain object.
    let mut work = Vec::new();
    let mut claimed: HashSet<RepoKey> = HashSet::new();
    for (
        b,
        Backup {
            id, manifest: m, ..
        },
    ) in backups.iter().enumerate()
    {
        for (c, chunk) in m.chunks.iter().enumerate() {
            let key = layout::base_backup_chunk(id, chunk.seq);
            // A backup that completed after the listing has objects the listing missed.
            if present.contains(&key) || repo.exists(&key).await? {
                work.push(Job::BackupChunk {
                    backup: b,
                    chunk: c,
                });
            } else {
                report.problems.push(problem(
                    &key,
                    format!(
                        "missing: data object {} of backup {id} ({})",
                        chunk.seq,
                        describe_files(m, chunk)
                    ),
                ));
            }
            claimed.insert(key);
        }
        let key = layout::base_backup_server_manifest(id);
        if present.contains(&key) || repo.exists(&key).await? {
            work.push(Job::ServerManifest { backup: b });
        } else {
            report.problems.push(problem(
                &key,
                format!("missing: the server's backup_manifest of backup {id}"),
            ));
        }
        claimed.insert(key);
    }
    for meta in &listed {
        if claimed.contains(&meta.key) || skipped(&meta.key) {
            continue;
        }
        match layout::parse_wal_key(&meta.key) {
            Some(w) => work.push(Job::Wal(meta.key.clone(), w)),
            None => work.push(Job::Plain(meta.key.clone())),
        }
    }

    let ctx = Arc::new(Ctx {
        repo: repo.clone(),
        backups,
        wal_expect: Some(wal_expect),
    });
    let outcomes = run_jobs(&ctx, work, jobs, tally).await?;
    let mut pieces: BTreeMap<usize, Written> = BTreeMap::new();
    let mut server: BTreeMap<usize, Vec<ServerManifestFile>> = BTreeMap::new();
    let mut broken_backups: HashSet<usize> = HashSet::new();
    let backup_of = |key: &str| {
        ctx.backups
            .iter()
            .position(|b| key.starts_with(&format!("{}/", layout::base_backup_prefix(&b.id))))
    };
    for o in outcomes {
        for p in &o.problems {
            if let Some(b) = backup_of(&p.key) {
                broken_backups.insert(b);
            }
        }
        report.problems.extend(o.problems);
        if let Some((b, p)) = o.pieces {
            pieces.entry(b).or_default().extend(p);
        }
        if let Some((b, f)) = o.server_files {
            server.insert(b, f);
        }
    }
    for p in &report.problems {
        if let Some(b) = backup_of(&p.key) {
            broken_backups.insert(b);
        }
    }
    // Each intact backup's files against its records (a damaged object was named already;
    // its files would only repeat it).
    for (
        b,
        Backup {
            id, manifest: m, ..
        },
    ) in ctx.backups.iter().enumerate()
    {
        if broken_backups.contains(&b) || !still_listed(repo, id).await {
            continue;
        }
        let files = server.remove(&b).unwrap_or_default();
        for p in file_problems(m, pieces.remove(&b).unwrap_or_default(), &files) {
            report
                .problems
                .push(problem(layout::base_backup_manifest(id), p));
        }
    }

    let (inv, newest) = WalInventory::load_with_times(repo, size).await?;
    let (mut found, mut timelines) = wal_problems(repo, &inv, &ctx.backups, size).await?;
    report.newest_time = newest;
    if !found.is_empty() {
        // A running stream stores several objects at once, so a listing may show a later
        // segment or delta before an earlier one: look again before calling a hole damage.
        tokio::time::sleep(RECHECK_AFTER).await;
        let (inv, newest) = WalInventory::load_with_times(repo, size).await?;
        (found, timelines) = wal_problems(repo, &inv, &ctx.backups, size).await?;
        report.newest_time = newest;
    }
    report.problems.extend(found);
    report.timelines = timelines;
    Ok(tally_totals(tally))
}

fn tally_totals(t: &Tally) -> (u64, u64) {
    (
        t.objects.load(Ordering::Relaxed),
        t.bytes.load(Ordering::Relaxed),
    )
}

/// The files a data object holds, for messages.
fn describe_files(m: &BackupManifest, c: &DataChunk) -> String {
    let mut names: Vec<String> = c
        .pieces
        .iter()
        .take(3)
        .filter_map(|p| m.entries.get(p.entry as usize))
        .map(|e| manifest_path(e, &m.tablespaces))
        .collect();
    if c.pieces.len() > 3 {
        names.push(format!("and {} more", c.pieces.len() - 3));
    }
    format!("files {}", names.join(", "))
}

/// The test hook's delay before each object a job reads (see the module docs).
fn test_read_delay() -> Option<Duration> {
    std::env::var("SYNCBRIDGE_TEST_READ_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Runs the jobs, `jobs` at a time, each on a task of its own (so checksums are computed
/// on every core), counting each object read in `tally`.
async fn run_jobs(
    ctx: &Arc<Ctx>,
    work: Vec<Job>,
    jobs: usize,
    tally: &Arc<Tally>,
) -> Result<Vec<Outcome>> {
    let delay = test_read_delay();
    let results: Vec<_> = stream::iter(work)
        .map(|job| {
            let (ctx, tally) = (ctx.clone(), tally.clone());
            tokio::spawn(async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                let (o, stored) = run_job(&ctx, &job, &tally).await;
                // A vanished object was not read; everything else was (a damaged one up
                // to its damage).
                if !o.vanished {
                    tally.add(stored);
                }
                o
            })
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    results
        .into_iter()
        .map(|r| r.context("a verify task failed"))
        .collect()
}

/// One job: its outcome and the stored bytes read.
async fn run_job(ctx: &Ctx, job: &Job, tally: &Tally) -> (Outcome, u64) {
    let repo = &ctx.repo;
    let mut out = Outcome::default();
    match job {
        Job::Plain(key) => match read_to_end(repo, key, tally).await {
            Ok(info) => return (out, info.stored_len),
            Err(e) if e.is_not_found() => out.vanished = true,
            Err(e) => out.problems.push(error_problem(key, &e.into())),
        },
        Job::Wal(key, w) => {
            let result = match &ctx.wal_expect {
                Some(expect) => crate::repo_cmd::check_wal_object(repo, key, w, expect)
                    .await
                    .map(|v| v.info),
                None => read_to_end(repo, key, tally)
                    .await
                    .map_err(anyhow::Error::from),
            };
            match result {
                Ok(info) => {
                    if ctx.wal_expect.is_some() {
                        tally.read(info.original_len as usize);
                    }
                    return (out, info.stored_len);
                }
                Err(e) if is_not_found(&e) => out.vanished = true,
                Err(e) => out.problems.push(error_problem(key, &e)),
            }
        }
        Job::BackupChunk { backup, chunk } => {
            let Backup {
                id, manifest: m, ..
            } = &ctx.backups[*backup];
            let c = &m.chunks[*chunk];
            let key = layout::base_backup_chunk(id, c.seq);
            let counted = |_: &_, _, part: &[u8]| {
                tally.read(part.len());
                Ok(())
            };
            match read_pieces(repo, &key, c, counted).await {
                Ok((pieces, info)) => {
                    // `backup.json` records the digest the object's trailer holds (bound to
                    // its key in format versions 2 to 4) and its original length.
                    if info.sha256_hex() != c.sha256 || info.original_len != c.bytes {
                        out.problems.push(problem(
                            &key,
                            format!(
                                "is not the object backup {id} recorded: {} bytes with digest {}, backup.json has {} bytes with {}",
                                info.original_len,
                                info.sha256_hex(),
                                c.bytes,
                                c.sha256
                            ),
                        ));
                    } else {
                        out.pieces = Some((*backup, pieces));
                    }
                    return (out, info.stored_len);
                }
                // An expire running meanwhile removes `backup.json` first, then the data.
                Err(e) if is_not_found(&e) && !still_listed(repo, id).await => {
                    out.vanished = true;
                }
                Err(e) if is_not_found(&e) => out.problems.push(problem(
                    &key,
                    format!(
                        "missing: data object {} of backup {id} ({})",
                        c.seq,
                        describe_files(m, c)
                    ),
                )),
                Err(e) => {
                    let mut p = error_problem(&key, &e);
                    p.problem = format!("{} (backup {id}, {})", p.problem, describe_files(m, c));
                    out.problems.push(p);
                }
            }
        }
        Job::ServerManifest { backup } => {
            let Backup {
                id, manifest: m, ..
            } = &ctx.backups[*backup];
            let key = layout::base_backup_server_manifest(id);
            let read = async {
                let mut reader = repo.reader(&key).await?;
                let mut data = Vec::new();
                while let Some(piece) = reader.next_chunk().await? {
                    tally.read(piece.len());
                    data.extend_from_slice(&piece);
                }
                let info = reader
                    .info()
                    .with_context(|| format!("{key}: the reader ended without its trailer"))?;
                anyhow::Ok((data, info))
            };
            match read.await {
                Err(e) if is_not_found(&e) && !still_listed(repo, id).await => {
                    out.vanished = true;
                }
                Ok((data, info)) => {
                    if !m.server_manifest_sha256.is_empty()
                        && info.sha256_hex() != m.server_manifest_sha256
                    {
                        out.problems.push(problem(
                            &key,
                            format!(
                                "is not the backup_manifest backup {id} recorded (SHA-256 {})",
                                m.server_manifest_sha256
                            ),
                        ));
                    } else {
                        match parse_server_manifest(&data) {
                            Ok(f) => out.server_files = Some((*backup, f)),
                            Err(e) => out.problems.push(problem(&key, format!("{e:#}"))),
                        }
                    }
                    return (out, info.stored_len);
                }
                Err(e) => out.problems.push(error_problem(&key, &e)),
            }
        }
    }
    (out, 0)
}

/// Reads an object to its end (every check of the storage reader), counting the bytes.
async fn read_to_end(
    repo: &Repository,
    key: &RepoKey,
    tally: &Tally,
) -> storage::Result<storage::ObjectInfo> {
    let mut reader = repo.reader(key).await?;
    while let Some(piece) = reader.next_chunk().await? {
        tally.read(piece.len());
    }
    reader.info().ok_or_else(|| StorageError::WriterClosed {
        key: key.to_string(),
        reason: "the reader ended without verifying the trailer".into(),
    })
}

/// Whether backup `id` is still complete (an expire removes its `backup.json` first); a
/// store error counts as yes, so the missing object is reported.
async fn still_listed(repo: &Repository, id: &BackupId) -> bool {
    repo.exists(&layout::base_backup_manifest(id))
        .await
        .unwrap_or(true)
}

/// WAL continuity: each delta chain of a segment in progress links; from the oldest backup
/// that leads to each timeline, WAL is stored without a hole to the newest WAL on the path
/// recovery reads; each backup's own WAL (start to stop) is there.
async fn wal_problems(
    repo: &Repository,
    inv: &WalInventory,
    backups: &[Backup],
    size: WalSegmentSize,
) -> Result<(Vec<Problem>, u64)> {
    let mut problems = Vec::new();
    let mut timelines = 0u64;
    for (tli, t) in &inv.timelines {
        let tli = TimelineId::new(*tli)?;
        for (segno, partials) in &t.partials {
            if t.segments.contains(segno) {
                continue;
            }
            let name = SegmentName::new(tli, *segno, size)?.to_string();
            if let Err(e) = partials.newest(&name) {
                problems.push(problem(segment_key(&name)?, format!("{e:#}")));
            }
        }
    }
    let mut named: HashSet<String> = HashSet::new();
    let targets: std::collections::BTreeSet<u32> = inv
        .timelines
        .keys()
        .chain(inv.histories.iter())
        .copied()
        .collect();
    let backups: Vec<(&BackupId, TimelineId, Lsn, Lsn)> = backups
        .iter()
        .map(|b| (&b.id, b.timeline, b.start, b.stop))
        .collect();
    for target in targets {
        let tid = TimelineId::new(target)?;
        // Only a timeline after a backup's is reached through its history file, and only
        // WAL from that backup's start on needs it (older WAL, e.g. left by an interrupted
        // expire, is no restore's business).
        let first_needed = backups
            .iter()
            .filter(|b| b.1.get() < target)
            .map(|b| size.segment_of(b.2))
            .min();
        let history = match first_needed {
            Some(first) => {
                let needed = inv.timelines.get(&target).is_some_and(|t| {
                    t.segments
                        .last()
                        .into_iter()
                        .chain(t.partials.keys().next_back())
                        .any(|s| *s >= first)
                });
                load_history(repo, inv, tid, needed, &mut problems).await
            }
            None => None,
        };
        // The oldest backup recovery can go from to this timeline.
        let start = backups.iter().find_map(|(id, btli, start, _)| {
            if *btli == tid {
                return Some((*id, WalPath::from(tid), *start));
            }
            let h = history.as_ref()?;
            WalPath::from_history(tid, h, *btli, *start)
                .ok()
                .map(|p| (*id, p, *start))
        });
        let Some((id, path, from)) = start else {
            continue;
        };
        timelines += 1;
        let Some(end) = inv.newest_end(&path, size) else {
            continue;
        };
        holes(
            inv,
            &path,
            from,
            end,
            size,
            &mut named,
            &mut problems,
            |g| {
                format!(
                "missing: WAL {}..{} on timeline {target} is not in the repository (a restore from backup {id} cannot replay past {})",
                g.from, g.to, g.from
            )
            },
        )?;
    }
    for (id, tli, start, stop) in &backups {
        let path = WalPath::from(*tli);
        holes(
            inv,
            &path,
            *start,
            *stop,
            size,
            &mut named,
            &mut problems,
            |g| {
                format!(
                "missing: WAL {}..{} that backup {id} needs to be consistent (it ends at {stop})",
                g.from, g.to
            )
            },
        )?;
    }
    Ok((problems, timelines))
}

/// A timeline's history file, read and checked; `None` if missing or bad (a problem when
/// the timeline holds WAL a restore `needed`s, or the file is damaged).
async fn load_history(
    repo: &Repository,
    inv: &WalInventory,
    tli: TimelineId,
    needed: bool,
    problems: &mut Vec<Problem>,
) -> Option<TimelineHistory> {
    let lt = layout::TimelineId::new(tli.get()).ok()?;
    let key = layout::timeline_history(lt);
    if !inv.histories.contains(&tli.get()) {
        if !needed {
            return None;
        }
        problems.push(problem(
            &key,
            format!(
                "missing: timeline {tli} has WAL but no history file, so recovery cannot follow it"
            ),
        ));
        return None;
    }
    let data = match repo.get(&key).await {
        Ok(d) => d,
        // Read (and any damage named) with every other object.
        Err(_) => return None,
    };
    match check_history_file(&data, tli)
        .and_then(|()| TimelineHistory::parse(&data).with_context(|| format!("parsing {key}")))
    {
        Ok(h) => Some(h),
        Err(e) => {
            problems.push(problem(&key, format!("{e:#}")));
            None
        }
    }
}

fn segment_key(name: &str) -> Result<RepoKey> {
    Ok(layout::wal_segment(&layout::WalSegmentName::parse(name)?))
}

/// Reports every hole of `path` between `from` and `to`, one problem per missing segment
/// (up to [`MAX_NAMED_SEGMENTS`] a hole), each segment once per verification.
#[allow(clippy::too_many_arguments)]
fn holes(
    inv: &WalInventory,
    path: &WalPath,
    mut from: Lsn,
    to: Lsn,
    size: WalSegmentSize,
    named: &mut HashSet<String>,
    problems: &mut Vec<Problem>,
    text: impl Fn(&WalGap) -> String,
) -> Result<()> {
    while let Some(g) = inv.gap(path, from, to, size) {
        let first = size.segment_of(g.from);
        let last = size.segment_of(Lsn(g.to.0.max(g.from.0 + 1) - 1));
        for segno in first..=last.min(first + MAX_NAMED_SEGMENTS - 1) {
            let name = SegmentName::new(path.timeline_of(segno, size), segno, size)?.to_string();
            if named.insert(name.clone()) {
                problems.push(problem(segment_key(&name)?, text(&g)));
            }
        }
        if last >= first + MAX_NAMED_SEGMENTS {
            let name = format!("{}..{}", g.first_segment, g.last_segment);
            if named.insert(name.clone()) {
                problems.push(problem(
                    segment_key(&g.last_segment)?,
                    format!(
                        "{} more segments up to this one are missing too ({})",
                        last + 1 - first - MAX_NAMED_SEGMENTS,
                        text(&g)
                    ),
                ));
            }
        }
        if g.to <= g.from {
            break;
        }
        from = g.to;
    }
    Ok(())
}

async fn verify_redis(
    repo: &Repository,
    listed: Vec<storage::ObjectMeta>,
    jobs: usize,
    tally: &Arc<Tally>,
    report: &mut VerifyReport,
) -> Result<(u64, u64)> {
    if crate::redis::cluster_verify::holds_cluster(repo).await? {
        return verify_redis_cluster(repo, listed, jobs, tally, report).await;
    }
    let cat = RedisCatalog::load(repo).await?;
    report.generations = cat.generations.len() as u64;
    report.newest_time = cat.latest().and_then(|g| g.last_write);
    if cat.generations.is_empty() {
        report.problems.push(problem(
            layout::redis_generations_prefix(),
            "no complete generation: nothing in the repository can be restored",
        ));
    }
    // The snapshot and chained chunks of each generation are read by its check; the rest
    // (manifests, chunks off the chain, generations in progress) are read as objects.
    let mut claimed: HashSet<RepoKey> = HashSet::new();
    for g in &cat.generations {
        claimed.insert(layout::redis_snapshot(&g.id));
        for (s, e) in &g.chain {
            claimed.insert(layout::redis_chunk(&g.id, *s, *e));
        }
    }
    let work: Vec<Job> = listed
        .into_iter()
        .filter(|m| !claimed.contains(&m.key) && !skipped(&m.key))
        .map(|m| Job::Plain(m.key))
        .collect();
    let ctx = Arc::new(Ctx {
        repo: repo.clone(),
        backups: Vec::new(),
        wal_expect: None,
    });
    for o in run_jobs(&ctx, work, jobs, tally).await? {
        report.problems.extend(o.problems);
    }
    for (n, g) in cat.generations.iter().enumerate() {
        let mut check =
            crate::redis::verify::check_generation(repo, g.clone(), jobs, tally).await?;
        if n + 1 == cat.generations.len() && !check.is_ok() {
            // The newest generation may be being written: a stream stores chunks
            // concurrently, so one may be listed before the one it follows. Look again.
            tokio::time::sleep(RECHECK_AFTER).await;
            let again = RedisCatalog::load(repo)
                .await?
                .generations
                .into_iter()
                .find(|x| x.id == g.id);
            if let Some(again) = again {
                check =
                    crate::redis::verify::check_generation(repo, again, jobs, &Tally::default())
                        .await?;
            }
        }
        let snapshot_key = layout::redis_snapshot(&g.id);
        if let Err(e) = &check.snapshot {
            report.problems.push(redis_problem(&snapshot_key, e));
        }
        for p in &check.problems {
            report
                .problems
                .push(redis_problem(&layout::redis_generation_prefix(&g.id), p));
        }
        // A chunk missing from the middle: name the key it should have.
        let end = check.end_offset;
        let next = check
            .orphans
            .iter()
            .filter_map(|k| match layout::parse_redis_key(k) {
                Some(storage::layout::RedisObject::Chunk { start, .. }) if start > end => {
                    Some((start, k))
                }
                _ => None,
            })
            .min();
        if let Some((start, next_key)) = next {
            report.problems.push(problem(
                layout::redis_chunk(&g.id, end, start),
                format!(
                    "missing: the chunk chain of generation {} breaks at offset {end}; the next stored chunk is {next_key} (restores past offset {end} are impossible)",
                    g.id
                ),
            ));
        }
    }
    Ok(tally_totals(tally))
}

/// A Redis Cluster capture: every object read; each shard's generations checked on its view
/// (as `redis verify --shard`), problems named by their full keys; the shard records and
/// the slot-map history ([`crate::redis::cluster_verify::check_records`]). The newest time
/// is the oldest of the shards' newest: one shard whose stream stopped makes it stale.
async fn verify_redis_cluster(
    repo: &Repository,
    listed: Vec<storage::ObjectMeta>,
    jobs: usize,
    tally: &Arc<Tally>,
    report: &mut VerifyReport,
) -> Result<(u64, u64)> {
    let mut shards = Vec::new();
    let mut claimed: HashSet<RepoKey> = HashSet::new();
    for dir in repo
        .list_dirs(&layout::redis_cluster_shards_prefix())
        .await
        .context("listing the cluster's shards")?
    {
        let Some(shard) = layout::parse_redis_cluster_shard(&dir) else {
            continue;
        };
        let view = repo.scoped(&dir)?;
        let cat = RedisCatalog::load(&view)
            .await
            .with_context(|| format!("reading shard {shard}"))?;
        for g in &cat.generations {
            claimed.insert(view.full_key(&layout::redis_snapshot(&g.id)));
            for (s, e) in &g.chain {
                claimed.insert(view.full_key(&layout::redis_chunk(&g.id, *s, *e)));
            }
        }
        shards.push((shard, view, cat));
    }
    let work: Vec<Job> = listed
        .into_iter()
        .filter(|m| !claimed.contains(&m.key) && !skipped(&m.key))
        .map(|m| Job::Plain(m.key))
        .collect();
    let ctx = Arc::new(Ctx {
        repo: repo.clone(),
        backups: Vec::new(),
        wal_expect: None,
    });
    for o in run_jobs(&ctx, work, jobs, tally).await? {
        report.problems.extend(o.problems);
    }
    let mut summaries = Vec::new();
    let mut generations = BTreeMap::new();
    let mut newest: Option<Option<DateTime<Utc>>> = None;
    for (shard, view, cat) in &shards {
        generations.insert(shard.clone(), cat.generations.len());
        let full = |k: &RepoKey| view.full_key(k);
        if cat.generations.is_empty() {
            report.problems.push(problem(
                full(&layout::redis_generations_prefix()),
                format!("no complete generation: shard {shard} cannot be restored"),
            ));
        }
        for (n, g) in cat.generations.iter().enumerate() {
            let mut check =
                crate::redis::verify::check_generation(view, g.clone(), jobs, tally).await?;
            if n + 1 == cat.generations.len() && !check.is_ok() {
                // The newest generation may be being written: look again.
                tokio::time::sleep(RECHECK_AFTER).await;
                let again = RedisCatalog::load(view)
                    .await?
                    .generations
                    .into_iter()
                    .find(|x| x.id == g.id);
                if let Some(again) = again {
                    check = crate::redis::verify::check_generation(
                        view,
                        again,
                        jobs,
                        &Tally::default(),
                    )
                    .await?;
                }
            }
            let in_view = |p: Problem| match RepoKey::parse(&p.key) {
                Ok(k) if !p.key.starts_with("redis/cluster/") => Problem {
                    key: full(&k).to_string(),
                    problem: p.problem,
                },
                _ => p,
            };
            if let Err(e) = &check.snapshot {
                let p = redis_problem(&layout::redis_snapshot(&g.id), e);
                report.problems.push(in_view(p));
            }
            for p in &check.problems {
                let p = redis_problem(&layout::redis_generation_prefix(&g.id), p);
                report.problems.push(in_view(p));
            }
            let end = check.end_offset;
            let next = check
                .orphans
                .iter()
                .filter_map(|k| match layout::parse_redis_key(k) {
                    Some(storage::layout::RedisObject::Chunk { start, .. }) if start > end => {
                        Some((start, k))
                    }
                    _ => None,
                })
                .min();
            if let Some((start, next_key)) = next {
                report.problems.push(problem(
                    full(&layout::redis_chunk(&g.id, end, start)),
                    format!(
                        "missing: the chunk chain of shard {shard}'s generation {} breaks at offset {end}; the next stored chunk is {} (restores past offset {end} are impossible)",
                        g.id,
                        full(next_key)
                    ),
                ));
            }
        }
        let shard_newest = cat.latest().and_then(|g| g.last_write);
        newest = Some(match newest {
            None => shard_newest,
            Some(prev) => match (prev, shard_newest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            },
        });
        summaries.push(ShardVerify {
            shard: shard.to_string(),
            generations: cat.generations.len() as u64,
            newest_time: shard_newest,
            problems: 0,
        });
    }
    let records = crate::redis::cluster_verify::check_records(repo, &generations).await?;
    for (key, text) in records.problems {
        report.problems.push(problem(key, text));
    }
    if shards.is_empty() {
        report.problems.push(problem(
            layout::redis_cluster_shards_prefix(),
            "no shard: nothing of the cluster can be restored",
        ));
    }
    report.generations = shards
        .iter()
        .map(|(_, _, c)| c.generations.len() as u64)
        .sum();
    report.newest_time = newest.flatten();
    // Each shard's problems: those under its directory.
    for s in &mut summaries {
        let prefix = format!("redis/cluster/shards/{}/", s.shard);
        s.problems = report
            .problems
            .iter()
            .filter(|p| p.key.starts_with(&prefix))
            .count() as u64;
    }
    report.cluster = Some(ClusterVerify {
        shards: summaries,
        slot_maps: records.slot_maps as u64,
    });
    Ok(tally_totals(tally))
}

/// A problem text of `redis verify` (which starts with the key it concerns) as a problem.
fn redis_problem(fallback: &RepoKey, text: &str) -> Problem {
    let text = text.strip_prefix("object ").unwrap_or(text);
    let end = text.find([':', ' ']).unwrap_or(text.len());
    let (first, rest) = text.split_at(end);
    if first.starts_with("redis/") {
        let rest = rest.trim_start_matches(':').trim_start();
        return problem(first, rest);
    }
    problem(fallback, text)
}

/// Reports progress every few seconds on stderr (a line redrawn on a terminal).
struct Ticker {
    tally: Arc<Tally>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    fn start(total_objects: u64, total_bytes: u64, report: bool) -> Ticker {
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        let tty = std::io::stderr().is_terminal();
        let every = if tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        let task = tokio::spawn(async move {
            if !report {
                return;
            }
            let began = Instant::now();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let (n, b) = tally_totals(&t);
                let read = t.read.load(Ordering::Relaxed);
                let rate = read as f64 / began.elapsed().as_secs_f64().max(1e-3);
                let line = format!(
                    "verify: {n}/{total_objects} objects ({} of {} stored) verified, reading {}/s",
                    human(b),
                    human(total_bytes),
                    human(rate as u64)
                );
                if tty {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[2K{line}");
                    let _ = err.flush();
                } else {
                    eprintln!("{line}");
                }
            }
        });
        Ticker { tally, task }
    }

    fn stop(&self, report: bool) {
        self.task.abort();
        if report && std::io::stderr().is_terminal() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }
}

fn print_text(r: &VerifyReport, max_age: Option<Duration>) {
    println!(
        "repository:  {} ({})",
        r.url,
        match (r.kind, r.cluster.is_some()) {
            ("postgres", _) => "PostgreSQL",
            (_, true) => "Redis Cluster",
            _ => "Redis",
        }
    );
    for p in &r.problems {
        println!("DAMAGED  {}: {}", p.key, p.problem);
    }
    let what = if r.kind == "postgres" {
        format!(
            "{} base backups, WAL of {} timelines",
            r.backups, r.timelines
        )
    } else {
        format!("{} generations", r.generations)
    };
    println!(
        "checked:     {} of {} objects ({}) in {:.1}s; {what}",
        r.objects_verified,
        r.objects,
        human(r.bytes_verified),
        r.elapsed_seconds
    );
    let newest = match (r.newest_time, r.age_seconds) {
        (Some(t), Some(age)) => format!(
            "stored {} ({} ago)",
            crate::pg::backup_manifest::format_time(t),
            humantime::format_duration(Duration::from_secs(age as u64))
        ),
        _ => "none".into(),
    };
    let limit = match max_age {
        Some(m) if r.stale => format!(
            ", older than --max-age {}: STALE",
            humantime::format_duration(m)
        ),
        Some(m) => format!(", within --max-age {}", humantime::format_duration(m)),
        None => String::new(),
    };
    println!(
        "newest {}:  {newest}{limit}",
        if r.kind == "postgres" { "WAL" } else { "chunk" }
    );
    if let Some(c) = &r.cluster {
        println!(
            "cluster:     {} shards, {} slot maps",
            c.shards.len(),
            c.slot_maps
        );
        for sh in &c.shards {
            println!(
                "  {}  {} generations, newest chunk {}: {}",
                sh.shard,
                sh.generations,
                sh.newest_time
                    .map_or_else(|| "none".into(), crate::pg::backup_manifest::format_time),
                if sh.problems == 0 {
                    "ok".to_owned()
                } else {
                    format!("DAMAGED ({} problems)", sh.problems)
                }
            );
        }
    }
    match r.status {
        Status::Healthy => println!("status:      healthy"),
        Status::Stale => println!("status:      stale (intact, but the stream has stopped)"),
        Status::Damaged => println!(
            "status:      damaged ({} problems in {} objects)",
            r.problems.len(),
            r.objects_damaged
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use storage::{ContentKind, PutMode, RepoOptions};

    fn manifest(id: &str, tli: u32, start: &str, stop: &str) -> BackupManifest {
        BackupManifest {
            version: 1,
            id: id.into(),
            label: String::new(),
            system_identifier: "1".into(),
            server_version: "15".into(),
            server_major: 15,
            timeline: tli,
            start_lsn: start.into(),
            stop_lsn: stop.into(),
            stop_timeline: tli,
            start_time: String::new(),
            stop_time: String::new(),
            wal_archived_time: String::new(),
            wal_segment_size: 16 << 20,
            total_bytes: 0,
            stored_bytes: 0,
            tablespaces: Vec::new(),
            entries: Vec::new(),
            chunks: Vec::new(),
            server_manifest_sha256: String::new(),
        }
    }

    /// The continuity check follows the history file from the backup's timeline to the
    /// next, names a segment missing on the newer timeline (not the older one's copy that
    /// recovery does not read), and names the history file a timeline with WAL lacks.
    #[test]
    fn wal_continuity_follows_the_history_chain_and_names_what_is_missing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
            let two = layout::TimelineId::new(2).unwrap();
            repo.put(
                &layout::timeline_history(two),
                ContentKind::TimelineHistory,
                Bytes::from_static(b"1\t0/5000100\tno recovery target specified\n"),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
            let mut inv = WalInventory::default();
            inv.timelines
                .entry(1)
                .or_default()
                .segments
                .extend([2u64, 3, 4, 5]);
            // Segment 7 of timeline 2 is missing; timeline 1 never had it either.
            inv.timelines
                .entry(2)
                .or_default()
                .segments
                .extend([5u64, 6, 8]);
            inv.histories.insert(2);
            // Timeline 3 has WAL but no history file.
            inv.timelines.entry(3).or_default().segments.insert(9);
            // Timeline 4's WAL ends before the backup starts: no restore needs its history.
            inv.timelines.entry(4).or_default().segments.insert(1);
            let m = manifest("20261201T000000Z", 1, "0/2000028", "0/2000100");
            let manifests = vec![Backup {
                id: BackupId::parse("20261201T000000Z").unwrap(),
                timeline: TimelineId::new(1).unwrap(),
                start: m.start().unwrap(),
                stop: m.stop().unwrap(),
                start_time: Utc::now(),
                stop_time: Utc::now(),
                segment_size: WalSegmentSize::DEFAULT,
                manifest: m,
                pinned: false,
            }];
            let (problems, timelines) =
                wal_problems(&repo, &inv, &manifests, WalSegmentSize::DEFAULT)
                    .await
                    .unwrap();
            let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "postgres/wal/00000002/000000020000000000000007",
                    "postgres/wal/00000003/00000003.history"
                ],
                "{problems:#?}"
            );
            assert!(problems[0].problem.contains("timeline 2"));
            assert_eq!(timelines, 2);

            // The backup's own WAL (start to stop) missing is named once.
            let mut inv = WalInventory::default();
            inv.timelines.entry(1).or_default().segments.extend([3u64]);
            let (problems, _) = wal_problems(&repo, &inv, &manifests, WalSegmentSize::DEFAULT)
                .await
                .unwrap();
            let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["postgres/wal/00000001/000000010000000000000002"]);
        });
    }

    #[test]
    fn redis_problems_are_keyed_by_the_object_they_name() {
        let fallback = RepoKey::parse("redis/gen/g").unwrap();
        let p = redis_problem(
            &fallback,
            "redis/gen/g/chunks/1-2: at offset 5: bad command",
        );
        assert_eq!(p.key, "redis/gen/g/chunks/1-2");
        assert_eq!(p.problem, "at offset 5: bad command");
        let p = redis_problem(&fallback, "object redis/gen/g/snapshot.rdb is corrupt: x");
        assert_eq!(p.key, "redis/gen/g/snapshot.rdb");
        assert_eq!(p.problem, "is corrupt: x");
        let p = redis_problem(&fallback, "something without a key");
        assert_eq!(p.key, "redis/gen/g");
    }
}
