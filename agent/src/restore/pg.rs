//! PostgreSQL point-in-time restore: choose the base backup, prove up front that the WAL
//! to the target is in the repository, lay the backup down in parallel, and configure
//! recovery (`recovery.signal` + `restore_command` calling `postgres wal-fetch`; PostgreSQL
//! docs, "Continuous Archiving and Point-in-Time Recovery", "Recovery Target").
//!
//! Recovery always gets an explicit target it must reach (for the latest point: the last
//! complete record of the archived WAL the plan was made with), so that WAL which stops
//! short makes PostgreSQL fail with "recovery ended before configured recovery target was
//! reached" instead of promoting early; `--start` then reads where recovery stopped and
//! fails if that is before the plan. WAL read while planning passes the same checks as
//! `postgres wal-fetch` ([`crate::pg::wal_fetch::check_segment`]).
//!
//! Nothing is written before every check has passed. While files are being written the
//! target holds `syncbridge-restore.in-progress` and no `global/pg_control`, so a
//! half-restored directory cannot be started; both are settled as the very last step.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use storage::layout::{self, BackupId};
use storage::{RepoMarker, Repository};
use wire::pg::page::Extent;
use wire::pg::xlog::{scan_segment, XactOutcome, XactRecord};
use wire::pg::{Lsn, SegmentName, TimelineHistory, TimelineId, WalSegmentSize};

use super::lock::{self, DirLock};
use super::place;
use super::target::Target;
use super::unpack::{self, PG_CONTROL_TEMP};
use crate::catalog::pg::{BackupCatalog, WalInventory, WalPath};
use crate::pg::backup::parse_server_manifest;
use crate::pg::backup_manifest::{format_time, BackupManifest};
use crate::pg::backup_progress::human;
use crate::pg::wal_fetch::{check_history_file, check_segment, WalExpect};

/// File present in the target while a restore is writing it.
pub const IN_PROGRESS: &str = "syncbridge-restore.in-progress";

/// Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// Segments read backwards from the end of the archived WAL to find the last commit time.
const MAX_SCAN_SEGMENTS: u64 = 64;

/// Segments read backwards for the last commit time when restoring the latest point (only
/// for the report; the target is the last record, found in the last segment or two).
const LATEST_SCAN_SEGMENTS: u64 = 4;

/// Most WAL held at once while looking for the last complete record (a record may span
/// segments; the search reads backwards until one starts).
const MAX_TAIL_BYTES: usize = 256 << 20;

/// Validated settings of a PostgreSQL restore (built from `restore`'s arguments by
/// `RestoreArgs::pg_options`).
#[derive(Debug, Clone)]
pub struct PgRestoreOptions {
    /// Where recovery stops.
    pub target: Target,
    /// `recovery_target_timeline`.
    pub timeline: TimelineTarget,
    /// The base backup to use (an id as `list` shows it); chosen for the target when `None`.
    pub backup: Option<String>,
    /// Directory to restore into, as given.
    pub target_dir: PathBuf,
    /// Empty a non-empty target first.
    pub force: bool,
    /// Objects downloaded, verified and written at once.
    pub jobs: usize,
    /// Tablespaces restored elsewhere: (recorded location, new location), both absolute.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Restore the unmapped tablespaces to their recorded locations.
    pub tablespaces_in_place: bool,
    /// Who gets the restored files (and runs the server of `start`).
    pub owner: Option<Owner>,
    /// Start the restored server and wait for recovery.
    pub start: Option<StartOptions>,
    /// The repository arguments `restore_command` passes to `postgres wal-fetch`.
    pub wal_fetch_repo_args: Vec<String>,
}

/// `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineTarget {
    /// The newest timeline in the archive.
    Latest,
    /// The backup's timeline.
    Current,
    /// This timeline.
    Id(TimelineId),
}

impl TimelineTarget {
    /// `latest`, `current` or a timeline number.
    pub fn parse(text: &str) -> Result<TimelineTarget> {
        Ok(match text {
            "latest" => TimelineTarget::Latest,
            "current" => TimelineTarget::Current,
            n => {
                let v: u32 = n.parse().with_context(|| {
                    format!("--timeline {n:?}: expected latest, current or a number")
                })?;
                TimelineTarget::Id(TimelineId::new(v)?)
            }
        })
    }

    /// The value of `recovery_target_timeline`.
    pub fn setting(&self) -> String {
        match self {
            TimelineTarget::Latest => "latest".into(),
            TimelineTarget::Current => "current".into(),
            TimelineTarget::Id(t) => t.get().to_string(),
        }
    }
}

/// The owner of the restored files.
#[derive(Debug, Clone)]
pub struct Owner {
    /// As given: a user name or `UID:GID`.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
}

impl Owner {
    /// Looks `name` up in /etc/passwd (or takes a numeric `UID:GID`).
    pub fn lookup(name: &str) -> Result<Owner> {
        let (uid, gid, _) = lookup_user(name)?;
        Ok(Owner {
            name: name.to_owned(),
            uid,
            gid,
        })
    }
}

/// Starting the restored server.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The PostgreSQL binaries (`pg_ctl`).
    pub bin_dir: PathBuf,
    /// Extra server options (`pg_ctl -o`).
    pub server_options: Option<String>,
    /// How long to wait for recovery to finish.
    pub timeout: Duration,
}

/// Whether this process runs as root (PostgreSQL refuses to).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs a PostgreSQL restore.
pub async fn run(
    repo: &Repository,
    marker: &RepoMarker,
    opts: &PgRestoreOptions,
) -> Result<ExitCode> {
    let began = Instant::now();
    let target = opts.target;
    let timeline_setting = opts.timeline.setting();
    let owner = opts.owner.as_ref();
    let jobs = opts.jobs;
    let target_dir = place::resolve(&opts.target_dir)?;
    let repo_dir = repo.local_path();
    place::check_destination(&target_dir, repo_dir, "--target")?;
    // A restore already writing there fails this one at once (locking creates nothing).
    let mut locks: Vec<DirLock> = DirLock::acquire_if_exists(&target_dir)?
        .into_iter()
        .collect();

    // ---- Plan: read-only checks ----
    let backups = BackupCatalog::load(repo).await?;
    let chosen = choose_backup(repo, &backups, marker, target, opts.backup.as_deref())?;
    let id = chosen.backup_id()?;
    let size = chosen.segment_size()?;
    let inv = WalInventory::load(repo, size).await?;
    let path = wal_path(repo, &inv, &chosen, &timeline_setting).await?;
    let expect = WalExpect::new(marker, Some(size), Some(chosen.server_major))?;
    let recovery = plan_recovery(repo, &inv, &chosen, target, &path, &expect).await?;
    let mut placement = place::plan(
        &chosen,
        &target_dir,
        &opts.tablespace_map,
        opts.tablespaces_in_place,
    )?;
    place::resolve_tablespaces(&mut placement, &target_dir, repo_dir)?;
    let ts_roots: Vec<PathBuf> = placement
        .tablespaces
        .iter()
        .map(|t| t.dest.clone())
        .collect();
    check_empty(&target_dir, opts.force)?;
    check_tablespaces_empty(&ts_roots)?;
    let server_manifest = repo
        .get(&layout::base_backup_server_manifest(&id))
        .await
        .context("reading the server's backup_manifest")?;
    let server_files = parse_server_manifest(&server_manifest)?;
    println!(
        "restoring:   backup {id} ({} .. {}, {}, {} objects) to {}",
        chosen.start_lsn,
        chosen.stop_lsn,
        human(chosen.total_bytes),
        chosen.chunks.len(),
        target_dir.display()
    );
    for t in &placement.tablespaces {
        println!(
            "tablespace:  {} recorded at {} -> {}{}",
            t.oid,
            t.recorded,
            t.dest.display(),
            if t.mapped {
                " (--tablespace-map)"
            } else {
                " (--tablespaces-in-place)"
            }
        );
    }
    println!("target:      {}", recovery.describe);

    // ---- Write ----
    let modes = placement.modes;
    if locks.is_empty() {
        locks.push(lock::create_and_lock(&target_dir, modes.dir_cap())?);
    }
    for r in &ts_roots {
        locks.push(lock::create_and_lock(r, modes.dir_cap())?);
    }
    // Again under the locks: another restore may have finished in between.
    check_empty(&target_dir, opts.force)?;
    check_tablespaces_empty(&ts_roots)?;
    clear_dir(&target_dir, modes)?;
    unpack::write_private(
        &target_dir.join(IN_PROGRESS),
        format!(
            "syncbridge-agent (pid {}) is restoring backup {id} here (started {}); do not start PostgreSQL in this directory until this file is gone\n",
            std::process::id(),
            Utc::now().to_rfc3339()
        )
        .as_bytes(),
    )?;
    for r in &ts_roots {
        clear_dir(r, modes)?;
    }
    let m = Arc::new(chosen);
    let roots = Arc::new(placement.roots());
    unpack::prepare(&m, &roots)?;
    make_tablespace_links(&target_dir, &placement)?;
    let write_started = Instant::now();
    let stats = unpack::write_all(repo, &m, &roots, jobs, &server_files, modes).await?;
    let write_secs = write_started.elapsed().as_secs_f64();

    unpack::write_private(&target_dir.join("backup_manifest"), &server_manifest)?;
    for stale in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(target_dir.join(stale));
    }
    write_recovery_conf(
        &target_dir,
        &opts.wal_fetch_repo_args,
        &id,
        &recovery,
        &timeline_setting,
        &chosen_wal_hints(size, m.server_major),
    )?;
    unpack::write_private(&target_dir.join("recovery.signal"), b"")?;
    if let Some(o) = owner {
        for r in roots.iter() {
            chown_tree(r, o.uid, o.gid)?;
        }
    }
    // Last: pg_control under its real name, then the in-progress marker goes.
    std::fs::rename(
        target_dir.join(PG_CONTROL_TEMP),
        target_dir.join("global/pg_control"),
    )
    .context("putting global/pg_control in place")?;
    unpack::sync_dir(&target_dir.join("global"))?;
    std::fs::remove_file(target_dir.join(IN_PROGRESS))
        .context("removing the in-progress marker")?;
    unpack::sync_dir(&target_dir)?;
    let restore_secs = began.elapsed().as_secs_f64();
    println!(
        "restored:    {} in {} objects, {write_secs:.1}s writing ({}/s), {restore_secs:.1}s in all",
        human(stats.bytes),
        stats.objects,
        human((stats.bytes as f64 / write_secs.max(1e-3)) as u64)
    );

    match &opts.start {
        None => {
            let user = owner
                .map(|o| match o.name.split_once(':') {
                    Some((uid, _)) => format!("sudo -u '#{uid}' "),
                    None => format!("sudo -u {} ", o.name),
                })
                .unwrap_or_default();
            if owner.is_none() && is_root() {
                println!(
                    "note:        the files belong to root; give them to the server's user first (chown -R postgres: {}) or restore with --owner",
                    target_dir.display()
                );
            }
            println!(
                "next:        {user}pg_ctl -D {} -l {}/recovery.log start",
                target_dir.display(),
                target_dir.display()
            );
            println!("             PostgreSQL replays WAL through `postgres wal-fetch` and promotes at the target;");
            println!("             if the WAL it gets stops short of the target, it stops with FATAL instead of promoting.");
        }
        Some(start) => {
            start_and_wait(start, &target_dir, owner, restore_secs, &recovery)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What recovery will be told, and what the user is told.
#[derive(Debug, Clone)]
pub struct RecoveryPlan {
    /// `recovery_target_*` lines; never empty: recovery always has a target to reach.
    pub settings: Vec<String>,
    /// For the summary.
    pub describe: String,
    /// Recovery must have replayed the record at this LSN (latest point, `--to-lsn`);
    /// `--start` fails if the server reports stopping before it.
    pub must_reach: Option<Lsn>,
}

/// `--segment-size` and `--pg-version` for the `wal-fetch` in `restore_command`.
fn chosen_wal_hints(size: WalSegmentSize, major: u32) -> String {
    format!("--segment-size {} --pg-version {major}", size.bytes())
}

fn choose_backup(
    repo: &Repository,
    cat: &BackupCatalog,
    marker: &RepoMarker,
    target: Target,
    forced: Option<&str>,
) -> Result<BackupManifest> {
    for b in &cat.complete {
        check_system(marker, &b.manifest)?;
    }
    if let Some(f) = forced {
        let id = BackupId::parse(f).with_context(|| format!("--backup {f:?}"))?;
        let b = cat.get(&id, repo.url())?;
        match target {
            Target::Time(t) if b.stop_time > t => bail!(
                "backup {id} ended at {}, after the target {}: choose an older backup",
                format_time(b.stop_time),
                target.describe()
            ),
            Target::Lsn(l) if b.stop > l => bail!(
                "backup {id} ends at LSN {}, after the target {l}: choose an older backup",
                b.stop
            ),
            _ => {}
        }
        return Ok(b.manifest.clone());
    }
    let Some(oldest) = cat.complete.iter().min_by_key(|b| b.stop) else {
        let extra = if cat.incomplete.is_empty() {
            String::new()
        } else {
            format!(
                " ({} incomplete: {})",
                cat.incomplete.len(),
                cat.incomplete
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        bail!(
            "no complete base backup in {}{extra}: take one with `syncbridge-agent postgres backup`",
            repo.url()
        );
    };
    let best = cat
        .complete
        .iter()
        .filter(|b| match target {
            Target::Time(t) => b.stop_time <= t,
            Target::Lsn(l) => b.stop <= l,
            Target::Latest | Target::Xid(_) => true,
        })
        .max_by_key(|b| b.stop);
    match best {
        Some(b) => Ok(b.manifest.clone()),
        None => {
            // After `expire`, the oldest kept backup's end is the earliest restorable moment.
            let (what, when, ended) = match target {
                Target::Time(_) => ("time", format_time(oldest.stop_time), "ended at"),
                _ => ("LSN", oldest.stop.to_string(), "ends at LSN"),
            };
            bail!(
                "no complete base backup ends before the target {}: it is earlier than the oldest backup, {} (which {ended} {when}); the earliest restorable {what} is {when}",
                target.describe(),
                oldest.id
            )
        }
    }
}

fn check_system(marker: &RepoMarker, m: &BackupManifest) -> Result<()> {
    if let Some(sys) = &marker.system_identifier {
        if sys != &m.system_identifier {
            bail!(
                "backup {} is of system {}, but the repository belongs to {sys}",
                m.id,
                m.system_identifier
            );
        }
    }
    Ok(())
}

/// Checks the WAL the target needs and decides the recovery settings.
async fn plan_recovery(
    repo: &Repository,
    inv: &WalInventory,
    m: &BackupManifest,
    target: Target,
    path: &WalPath,
    expect: &WalExpect,
) -> Result<RecoveryPlan> {
    let size = m.segment_size()?;
    let start = m.start()?;
    let stop = m.stop()?;
    let cont_end = inv.contiguous_end(path, start, size);
    let newest = inv.newest_end(path, size).unwrap_or(cont_end);
    if cont_end < stop {
        let gap = inv
            .gap(path, start, stop, size)
            .map(|g| g.to_string())
            .unwrap_or_else(|| format!("WAL {cont_end}..{stop} is missing"));
        bail!(
            "backup {} cannot be made consistent: {gap} (the backup needs WAL {start}..{stop})",
            m.id
        );
    }
    let describe_gap = |to: Lsn| {
        inv.gap(path, start, to, size)
            .map(|g| g.to_string())
            .unwrap_or_else(|| format!("WAL after {cont_end} is missing"))
    };
    let tail = |xact_segments: u64| {
        let wal = TailWal {
            repo,
            inv,
            path,
            size,
            expect,
        };
        async move { wal.scan(start, cont_end, xact_segments).await }
    };
    match target {
        Target::Latest => {
            let t = tail(LATEST_SCAN_SEGMENTS).await?;
            let last = t.last_record.with_context(|| {
                format!("no complete WAL record found in the archived WAL {start}..{cont_end}")
            })?;
            if newest > cont_end {
                bail!(
                    "{}; restoring the latest point needs it. Restore up to the hole with --to-lsn {last} (the last complete record before it)",
                    describe_gap(newest)
                );
            }
            let commit = match t.last_xact {
                Some(x) => format!(
                    "last transaction {} {} at {}",
                    x.xid,
                    match x.outcome {
                        XactOutcome::Commit => "committed",
                        XactOutcome::Abort => "aborted",
                    },
                    pg_time(x.time).format("%Y-%m-%d %H:%M:%S%.6f UTC")
                ),
                None => format!(
                    "no transaction ends in the last {LATEST_SCAN_SEGMENTS} segments; backup ended at {}",
                    m.stop_time
                ),
            };
            // The backup's own end record may be the last: stop once consistent.
            if last < stop {
                return Ok(RecoveryPlan {
                    settings: vec!["recovery_target = 'immediate'".into()],
                    describe: format!(
                        "the end of the archived WAL, which is the end of backup {} ({stop} on timeline {}; {commit})",
                        m.id,
                        path.target()
                    ),
                    must_reach: None,
                });
            }
            Ok(RecoveryPlan {
                settings: Target::Lsn(last).settings(),
                describe: format!(
                    "the end of the archived WAL: the last complete record, at {last} on timeline {} (archived up to {cont_end}; {commit}), using backup {}",
                    path.target(),
                    m.id
                ),
                must_reach: Some(last),
            })
        }
        Target::Lsn(l) => {
            if l > cont_end && newest > cont_end {
                bail!(
                    "{}; the target {l} lies beyond it",
                    describe_gap(l.max(newest))
                );
            }
            // PostgreSQL stops after the first record starting at or after the target, so
            // one must start there within the archived WAL.
            let last = tail(0).await?.last_record;
            match last {
                Some(last) if l <= last => Ok(RecoveryPlan {
                    settings: target.settings(),
                    describe: format!("LSN {l}, using backup {}", m.id),
                    must_reach: Some(l),
                }),
                Some(last) => bail!(
                    "the target LSN {l} is beyond the last archived WAL: the latest restorable LSN is {last} (the start of the last complete record archived up to {cont_end})"
                ),
                None => bail!(
                    "the target LSN {l} is beyond the last archived WAL: no complete record in {start}..{cont_end}"
                ),
            }
        }
        Target::Xid(x) => {
            if newest > cont_end {
                tracing::warn!(
                    "{}; if transaction {x} committed after {cont_end}, PostgreSQL will stop with \"recovery ended before configured recovery target was reached\"",
                    describe_gap(newest)
                );
            }
            Ok(RecoveryPlan {
                settings: target.settings(),
                describe: format!("transaction {x}, using backup {}", m.id),
                must_reach: None,
            })
        }
        Target::Time(t) => {
            let last = tail(MAX_SCAN_SEGMENTS).await?.last_xact;
            let last_time = last.map(|x| pg_time(x.time));
            match (last, last_time) {
                (Some(_), Some(lt)) if t < lt => Ok(RecoveryPlan {
                    settings: target.settings(),
                    describe: format!("{}, using backup {}", target.describe(), m.id),
                    must_reach: None,
                }),
                (Some(x), Some(lt)) if t == lt && x.outcome == XactOutcome::Commit => {
                    // Nothing later is archived to stop at; stop after this very commit.
                    Ok(RecoveryPlan {
                        settings: Target::Xid(u64::from(x.xid)).settings(),
                        describe: format!(
                            "{} (the last archived commit, transaction {}), using backup {}",
                            target.describe(),
                            x.xid,
                            m.id
                        ),
                        must_reach: Some(x.lsn),
                    })
                }
                _ => {
                    let latest = match last_time {
                        Some(lt) => format!(
                            "{} (the last transaction in WAL archived up to {cont_end})",
                            lt.format("%Y-%m-%d %H:%M:%S%.6f UTC")
                        ),
                        None => format!(
                            "{} (the end of backup {}; no transaction is archived after it)",
                            m.stop_time, m.id
                        ),
                    };
                    if newest > cont_end {
                        bail!(
                            "{}, and the target {} lies after it: the latest restorable time is {latest}",
                            describe_gap(newest),
                            target.describe()
                        );
                    }
                    bail!(
                        "the target {} is beyond the last archived WAL: the latest restorable time is {latest}; restore without --to-time to replay everything archived",
                        target.describe()
                    )
                }
            }
        }
    }
}

/// The timelines recovery will read, for `recovery_target_timeline` = `setting`.
async fn wal_path(
    repo: &Repository,
    inv: &WalInventory,
    m: &BackupManifest,
    setting: &str,
) -> Result<WalPath> {
    let tli = m.tli()?;
    let start = m.start()?;
    let history = |n: u32| async move {
        let key = layout::timeline_history(layout::TimelineId::new(n)?);
        let data = repo
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        check_history_file(&data, TimelineId::new(n)?)
            .with_context(|| format!("checking {key}"))?;
        TimelineHistory::parse(&data).with_context(|| format!("parsing {key}"))
    };
    match setting {
        "current" => Ok(tli.into()),
        "latest" => {
            let mut candidates: Vec<u32> = inv
                .histories
                .iter()
                .copied()
                .filter(|n| *n > tli.get())
                .collect();
            candidates.sort_unstable();
            for n in candidates.into_iter().rev() {
                let h = history(n).await?;
                if let Ok(p) = WalPath::from_history(TimelineId::new(n)?, &h, tli, start) {
                    return Ok(p);
                }
            }
            Ok(tli.into())
        }
        n => {
            let n: u32 = n.parse().context("--timeline")?;
            if n == tli.get() {
                return Ok(tli.into());
            }
            if !inv.histories.contains(&n) {
                bail!("--timeline {n}: the repository has no history file for timeline {n}");
            }
            WalPath::from_history(TimelineId::new(n)?, &history(n).await?, tli, start)
        }
    }
}

fn pg_time(micros: i64) -> DateTime<Utc> {
    let secs = micros.div_euclid(1_000_000) + PG_EPOCH_OFFSET_SECS;
    let nanos = (micros.rem_euclid(1_000_000) * 1000) as u32;
    DateTime::from_timestamp(secs, nanos).unwrap_or_default()
}

/// What the end of the archived WAL holds.
#[derive(Debug, Default)]
struct Tail {
    /// Start of the last complete record before the end.
    last_record: Option<Lsn>,
    /// The last commit/abort record before the end, if found within the segments read.
    last_xact: Option<XactRecord>,
}

/// The archived WAL along a path, read through the same checks as `wal-fetch`.
struct TailWal<'a> {
    repo: &'a Repository,
    inv: &'a WalInventory,
    path: &'a WalPath,
    size: WalSegmentSize,
    expect: &'a WalExpect,
}

impl TailWal<'_> {
    /// Segment `segno` as recovery would get it (complete, or the newest partial), checked.
    async fn read(&self, segno: u64) -> Result<Option<(SegmentName, bytes::Bytes)>> {
        let tli = self.path.timeline_of(segno, self.size);
        let Some(t) = self.inv.timelines.get(&tli.get()) else {
            return Ok(None);
        };
        let seg = SegmentName::new(tli, segno, self.size)?;
        let name = layout::WalSegmentName::parse(&seg.to_string())?;
        let (key, extent, data) = if t.segments.contains(&segno) {
            let key = layout::wal_segment(&name);
            let data =
                self.repo.get(&key).await.with_context(|| {
                    format!("reading {key} to find the end of the archived WAL")
                })?;
            (key.to_string(), Extent::Complete, data)
        } else {
            let Some(source) = t
                .partials
                .get(&segno)
                .map(|p| p.newest(name.as_str()))
                .transpose()?
                .flatten()
            else {
                return Ok(None);
            };
            let data = crate::pg::partial::read_all(self.repo, &source)
                .await
                .with_context(|| {
                    format!(
                        "reading {} to find the end of the archived WAL",
                        source.describe()
                    )
                })?;
            (
                source.describe(),
                Extent::Partial(u64::from(source.end())),
                data,
            )
        };
        check_segment(
            &seg.to_string(),
            data.len() as u64,
            &data,
            extent,
            self.expect,
        )
        .with_context(|| format!("checking {key}"))?;
        Ok(Some((seg, data)))
    }

    /// Reads backwards from `end`: until the last complete record is found (a record may
    /// span segments, so segments are joined until one starts inside them), and for the last
    /// transaction through at most `xact_segments` segments.
    async fn scan(&self, start: Lsn, end: Lsn, xact_segments: u64) -> Result<Tail> {
        let mut tail = Tail::default();
        if end <= start {
            return Ok(tail);
        }
        let first = self.size.segment_of(start);
        let mut segno = self.size.segment_of(Lsn(end.0 - 1));
        // Segments from `segno` to the end, joined, while no record was found in them.
        let mut joined: Vec<u8> = Vec::new();
        let mut read = 0u64;
        loop {
            let Some((seg, data)) = self.read(segno).await? else {
                break;
            };
            read += 1;
            let scan = if tail.last_record.is_none() {
                let mut bytes = data.to_vec();
                bytes.extend_from_slice(&joined);
                joined = bytes;
                let scan = scan_segment(&joined, seg.start_lsn());
                if let Some(r) = scan.last_record.filter(|r| *r < end) {
                    tail.last_record = Some(r);
                    joined = Vec::new();
                } else if joined.len() > MAX_TAIL_BYTES {
                    bail!(
                        "no complete WAL record starts in the last {} MiB of the archived WAL (before {end})",
                        joined.len() >> 20
                    );
                }
                scan
            } else {
                scan_segment(&data, seg.start_lsn())
            };
            if tail.last_xact.is_none() {
                tail.last_xact = scan.xacts.iter().rev().find(|x| x.lsn < end).copied();
            }
            let xact_done = tail.last_xact.is_some() || read >= xact_segments;
            if (tail.last_record.is_some() && xact_done) || segno <= first {
                break;
            }
            segno -= 1;
        }
        Ok(tail)
    }
}

/// The links `pg_tblspc/<oid>` of the data directory, to where each tablespace goes (the
/// manifest's own links were checked by [`place::plan`] and are not used).
fn make_tablespace_links(base: &Path, placement: &place::Placement) -> Result<()> {
    if placement.tablespaces.is_empty() {
        return Ok(());
    }
    let dir = base.join("pg_tblspc");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .context("creating pg_tblspc")?;
    for t in &placement.tablespaces {
        let link = dir.join(t.oid.to_string());
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&t.dest, &link)
            .with_context(|| format!("linking {} to {}", link.display(), t.dest.display()))?;
    }
    Ok(())
}

/// --force only ever empties the target: a tablespace location outside it may belong to a
/// running cluster (the source, on the same host).
fn check_tablespaces_empty(roots: &[PathBuf]) -> Result<()> {
    for r in roots {
        check_empty(r, false).with_context(|| {
            format!(
                "tablespace location {}: restore it elsewhere with --tablespace-map OLD=NEW",
                r.display()
            )
        })?;
    }
    Ok(())
}

fn check_empty(dir: &Path, force: bool) -> Result<()> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    if entries.next().is_none() {
        return Ok(());
    }
    if !force {
        bail!(
            "{} is not empty: restore into an empty directory, or pass --force to replace what is there",
            dir.display()
        );
    }
    refuse_to_clear_foreign_trees(dir)?;
    let pid_file = dir.join("postmaster.pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        if let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        {
            if Path::new(&format!("/proc/{pid}")).exists() {
                bail!(
                    "PostgreSQL (pid {pid}) is running in {}: stop it before restoring over it",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Empties a locked directory (whose emptiness or `--force` was checked) and gives it the
/// restore's directory mode.
/// Walks what `--force` would delete (symlinks are removed, never followed) and refuses,
/// before anything is deleted, when it holds a SyncBridge repository (a `syncbridge-repo`
/// marker: a repository bind-mounted or copied into the target, which path comparison
/// cannot see) or another filesystem's mount point (whose contents would be deleted too).
fn refuse_to_clear_foreign_trees(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let marker = storage::layout::marker();
    let dev = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .dev();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e.with_context(|| format!("reading {}", d.display()))?;
            let path = e.path();
            if e.file_name() == std::ffi::OsStr::new(marker.as_str()) {
                bail!(
                    "--force would delete {}, which holds a SyncBridge repository (its marker {} is there): refusing; choose another target or move the repository out",
                    d.display(),
                    path.display()
                );
            }
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                if meta.dev() != dev {
                    bail!(
                        "--force would delete {}, a mount point of another filesystem inside the target: refusing; unmount it or choose another target",
                        path.display()
                    );
                }
                pending.push(path);
            }
        }
    }
    Ok(())
}

fn clear_dir(dir: &Path, modes: place::Modes) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("removing {}", p.display()))?;
    }
    std::fs::set_permissions(
        dir,
        std::os::unix::fs::PermissionsExt::from_mode(modes.dir_cap()),
    )
    .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(())
}

/// Quotes for `/bin/sh` when needed.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=+,@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn write_recovery_conf(
    dir: &Path,
    repo_args: &[String],
    id: &BackupId,
    plan: &RecoveryPlan,
    timeline: &str,
    wal_hints: &str,
) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let repo_args: Vec<String> = repo_args.iter().map(|a| shell_quote(a)).collect();
    let command = format!(
        "{} postgres wal-fetch {} {wal_hints} %f %p",
        shell_quote(&exe.display().to_string()),
        repo_args.join(" ")
    );
    let mut text = format!(
        "\n# Added by syncbridge-agent restore of backup {id} at {}.\n",
        Utc::now().to_rfc3339()
    );
    text.push_str(&format!(
        "restore_command = '{}'\n",
        command.replace('\'', "''")
    ));
    for s in &plan.settings {
        text.push_str(s);
        text.push('\n');
    }
    text.push_str("recovery_target_action = 'promote'\n");
    text.push_str(&format!("recovery_target_timeline = '{timeline}'\n"));
    let path = dir.join("postgresql.auto.conf");
    // Created 0600 when the backup had none, like every file restore writes.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().ok();
    Ok(())
}

/// (uid, gid, home) of a user from /etc/passwd (or a numeric uid[:gid]).
fn lookup_user(name: &str) -> Result<(u32, u32, String)> {
    if let Some((u, g)) = name.split_once(':') {
        if let (Ok(u), Ok(g)) = (u.parse(), g.parse()) {
            return Ok((u, g, String::new()));
        }
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && f[0] == name {
            let uid = f[2].parse().with_context(|| format!("uid of {name}"))?;
            let gid = f[3].parse().with_context(|| format!("gid of {name}"))?;
            return Ok((uid, gid, f[5].to_string()));
        }
    }
    bail!("--owner {name:?}: no such user (give a name from /etc/passwd or UID:GID)")
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Starts the restored cluster with `pg_ctl`, waits for recovery to end and reports where
/// it stopped (from the server log); fails if that is before the plan.
fn start_and_wait(
    start: &StartOptions,
    dir: &Path,
    owner: Option<&Owner>,
    restore_secs: f64,
    plan: &RecoveryPlan,
) -> Result<()> {
    let bin = &start.bin_dir;
    let log = dir.join("syncbridge-recovery.log");
    unpack::write_private(&log, b"").context("creating the recovery log")?;
    if let Some(o) = owner {
        std::os::unix::fs::lchown(&log, Some(o.uid), Some(o.gid))?;
    }
    let mut cmd = std::process::Command::new(bin.join("pg_ctl"));
    cmd.arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"]);
    if let Some(o) = &start.server_options {
        cmd.arg("-o").arg(o);
    }
    if let Some(o) = owner {
        cmd.uid(o.uid).gid(o.gid);
    }
    cmd.current_dir(dir);
    let replay_started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.join("pg_ctl").display()))?;
    if !out.status.success() {
        bail!(
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let deadline = Instant::now() + start.timeout;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("database system is ready to accept connections") {
            let replay_secs = replay_started.elapsed().as_secs_f64();
            report_recovery(&text);
            if let Err(e) = check_reached(&text, plan) {
                let mut stop = std::process::Command::new(bin.join("pg_ctl"));
                stop.arg("-D").arg(dir).args(["-m", "fast", "stop"]);
                if let Some(o) = owner {
                    stop.uid(o.uid).gid(o.gid);
                }
                let stopped = stop.output().map(|o| o.status.success()).unwrap_or(false);
                bail!(
                    "{e:#}\nThe restored cluster does not hold everything planned; {} (log: {})",
                    if stopped {
                        "the server was stopped"
                    } else {
                        "the server could not be stopped: stop it before using it"
                    },
                    log.display()
                );
            }
            println!("durations:   restore {restore_secs:.1}s, replay {replay_secs:.1}s");
            println!(
                "server:      running from {} (log {})",
                dir.display(),
                log.display()
            );
            return Ok(());
        }
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        {
            // wal-fetch's own reason (its stderr goes to the server log) says more than
            // PostgreSQL's "child process exited with exit code 200".
            let why: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("error: wal-fetch"))
                .collect();
            bail!(
                "recovery failed: {line}{}{}\n(full log: {})",
                if why.is_empty() { "" } else { "\n" },
                why.join("\n"),
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "recovery did not finish within {}s; the server is still running (log: {})",
                start.timeout.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Where recovery stopped, from the server log: `redo done at X` (X is the start of the
/// last record replayed, `xlogrecovery.c`), and whether a `recovery stopping` line says
/// the target was reached.
fn check_reached(log: &str, plan: &RecoveryPlan) -> Result<()> {
    let redo_done = log.lines().rev().find_map(|l| {
        let rest = &l[l.find("redo done at ")? + "redo done at ".len()..];
        Lsn::parse(rest.split_whitespace().next()?).ok()
    });
    let stopping = log.lines().any(|l| l.contains("recovery stopping"));
    if let Some(want) = plan.must_reach {
        match redo_done {
            Some(at) if at >= want => {
                println!("reached:     WAL position {at} (planned: {want})");
            }
            Some(at) => bail!(
                "recovery stopped at {at}, before the planned {want}: WAL is missing or damaged"
            ),
            None => bail!(
                "the server log does not say where recovery stopped (no \"redo done at\"); the plan was to reach {want}"
            ),
        }
    }
    if !stopping {
        bail!(
            "the server log has no \"recovery stopping\" line: recovery did not reach its target ({})",
            plan.describe
        );
    }
    Ok(())
}

fn report_recovery(log: &str) {
    for l in log.lines() {
        for key in [
            "recovery stopping",
            "redo done at",
            "last completed transaction was at log time",
            "selected new timeline ID",
            "consistent recovery state reached",
        ] {
            if let Some(pos) = l.find(key) {
                println!("recovery:    {}", &l[pos..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(
            shell_quote("s3://b/p?endpoint=http://h:1&allow_http=true"),
            "'s3://b/p?endpoint=http://h:1&allow_http=true'"
        );
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn where_recovery_stopped() {
        let plan = RecoveryPlan {
            settings: Target::Lsn(Lsn(0x500_0060)).settings(),
            describe: "x".into(),
            must_reach: Some(Lsn(0x500_0060)),
        };
        let good = "LOG:  recovery stopping after WAL location (LSN) \"0/5000060\"\nLOG:  redo done at 0/5000060 system usage: CPU: user: 0.00 s\n";
        check_reached(good, &plan).unwrap();
        let early = "LOG:  redo done at 0/50000D0 system usage: x\n";
        let e = check_reached(
            early,
            &RecoveryPlan {
                must_reach: Some(Lsn(0x700_0000)),
                ..plan.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("before the planned 0/7000000"), "{e}");
        let e = check_reached("LOG:  redo done at 0/5000060 x\n", &plan)
            .unwrap_err()
            .to_string();
        assert!(e.contains("recovery stopping"), "{e}");
        let time_plan = RecoveryPlan {
            must_reach: None,
            ..plan
        };
        check_reached(
            "LOG:  recovery stopping before commit of transaction 750, time 2026-01-01\n",
            &time_plan,
        )
        .unwrap();
    }

    #[test]
    fn pg_epoch() {
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
        assert_eq!(pg_time(1_500_000).timestamp_subsec_micros(), 500_000);
    }
}
