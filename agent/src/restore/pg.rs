//! PostgreSQL point-in-time restore: choose the base backup, prove up front that the WAL
//! to the target is in the repository, lay the backup down in parallel, and configure
//! recovery (`recovery.signal` + `restore_command` calling `postgres wal-fetch`; PostgreSQL
//! docs, "Continuous Archiving and Point-in-Time Recovery", "Recovery Target").
//!
//! Nothing is written before every check has passed. While files are being written the
//! target holds `syncbridge-restore.in-progress` and no `global/pg_control`, so a
//! half-restored directory cannot be started; both are settled as the very last step.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use storage::layout::{self, BackupId};
use storage::{RepoMarker, Repository};
use wire::pg::xlog::{scan_segment, XactOutcome, XactRecord};
use wire::pg::{Lsn, SegmentName, TimelineHistory, TimelineId, WalSegmentSize};

use super::target::Target;
use super::unpack::{self, PG_CONTROL_TEMP};
use super::RestoreArgs;
use crate::pg::backup::parse_server_manifest;
use crate::pg::backup_catalog::{list_backups, BackupManifest, EntryKind, WalInventory, WalPath};
use crate::pg::backup_progress::human;

/// File present in the target while a restore is writing it.
pub const IN_PROGRESS: &str = "syncbridge-restore.in-progress";

/// Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// Segments read backwards from the end of the archived WAL to find the last commit time.
const MAX_SCAN_SEGMENTS: u64 = 64;

/// Runs a PostgreSQL restore.
pub async fn run(repo: &Repository, marker: &RepoMarker, args: &RestoreArgs) -> Result<ExitCode> {
    let began = Instant::now();
    let target = Target::from_args(args.to_time.as_deref(), args.to_lsn.as_deref(), args.to_xid)?;
    let timeline_setting = match args.timeline.as_str() {
        "latest" | "current" => args.timeline.clone(),
        n => {
            let v: u32 = n.parse().with_context(|| {
                format!("--timeline {n:?}: expected latest, current or a number")
            })?;
            TimelineId::new(v)?;
            v.to_string()
        }
    };
    let ts_map = parse_tablespace_map(&args.tablespace_map)?;
    let owner = match &args.owner {
        Some(name) => Some(lookup_user(name)?),
        None => None,
    };
    if args.start.is_some() && owner.is_none() && is_root() {
        bail!("--start as root needs --owner USER: PostgreSQL refuses to run as root");
    }
    // Downloads wait on the network while decompression is capped by the repository's
    // worker pool, so twice the cores keeps both busy.
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() * 2)
            .unwrap_or(4)
            .clamp(2, 32)
    });
    let target_dir = absolute(&args.target)?;

    // ---- Plan: read-only checks ----
    let chosen = choose_backup(repo, marker, target, args.backup.as_deref()).await?;
    let id = chosen.backup_id()?;
    let size = chosen.segment_size()?;
    let inv = WalInventory::load(repo, size).await?;
    let path = wal_path(repo, &inv, &chosen, &timeline_setting).await?;
    let recovery = plan_recovery(repo, &inv, &chosen, target, &path).await?;
    let roots = archive_roots(&chosen, &target_dir, &ts_map)?;
    check_empty(&target_dir, args.force)?;
    // --force only ever empties the target: a tablespace location outside it may belong to
    // a running cluster (the source, on the same host).
    for r in tablespace_roots(&chosen, &roots) {
        check_empty(r, false).with_context(|| {
            format!(
                "tablespace location {}: restore it elsewhere with --tablespace-map OLD=NEW",
                r.display()
            )
        })?;
    }
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
    println!("target:      {}", recovery.describe);

    // ---- Write ----
    clear_dir(&target_dir)?;
    std::fs::write(
        target_dir.join(IN_PROGRESS),
        format!(
            "syncbridge-agent is restoring backup {id} here (started {}); do not start PostgreSQL in this directory until this file is gone\n",
            Utc::now().to_rfc3339()
        ),
    )
    .with_context(|| format!("writing {}", target_dir.join(IN_PROGRESS).display()))?;
    for r in tablespace_roots(&chosen, &roots) {
        clear_dir(r)?;
    }
    let m = Arc::new(chosen);
    let roots = Arc::new(roots);
    unpack::prepare(&m, &roots)?;
    make_tablespace_links(&m, &roots)?;
    let write_started = Instant::now();
    let stats = unpack::write_all(repo, &m, &roots, jobs, &server_files).await?;
    let write_secs = write_started.elapsed().as_secs_f64();

    std::fs::write(target_dir.join("backup_manifest"), &server_manifest)
        .context("writing backup_manifest")?;
    for stale in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(target_dir.join(stale));
    }
    write_recovery_conf(&target_dir, repo, args, &id, &recovery, &timeline_setting)?;
    std::fs::write(target_dir.join("recovery.signal"), b"").context("writing recovery.signal")?;
    if let Some((uid, gid, _)) = &owner {
        for r in roots.iter() {
            chown_tree(r, *uid, *gid)?;
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

    match &args.start {
        None => {
            let user = args
                .owner
                .as_deref()
                .map(|u| match u.split_once(':') {
                    Some((uid, _)) => format!("sudo -u '#{uid}' "),
                    None => format!("sudo -u {u} "),
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
            println!("             PostgreSQL replays WAL through `postgres wal-fetch` and promotes at the target.");
        }
        Some(bin) => {
            start_and_wait(bin, &target_dir, args, owner.as_ref(), restore_secs)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What recovery will be told, and what the user is told.
#[derive(Debug, Clone)]
pub struct RecoveryPlan {
    /// `recovery_target_*` lines.
    pub settings: Vec<String>,
    /// For the summary.
    pub describe: String,
}

async fn choose_backup(
    repo: &Repository,
    marker: &RepoMarker,
    target: Target,
    forced: Option<&str>,
) -> Result<BackupManifest> {
    let list = list_backups(repo).await?;
    if let Some(f) = forced {
        let id = BackupId::parse(f).with_context(|| format!("--backup {f:?}"))?;
        if !list.complete.contains(&id) {
            if list.incomplete.contains(&id) {
                bail!("backup {id} is incomplete (no backup.json: it failed or its WAL never reached the repository)");
            }
            bail!("there is no backup {id} in {}", repo.url());
        }
        let m = BackupManifest::load(repo, &id).await?;
        check_system(marker, &m)?;
        match target {
            Target::Time(t) if m.stop_at()? > t => bail!(
                "backup {id} ended at {}, after the target {}: choose an older backup",
                m.stop_time,
                target.describe()
            ),
            Target::Lsn(l) if m.stop()? > l => bail!(
                "backup {id} ends at LSN {}, after the target {l}: choose an older backup",
                m.stop_lsn
            ),
            _ => {}
        }
        return Ok(m);
    }
    if list.complete.is_empty() {
        let extra = if list.incomplete.is_empty() {
            String::new()
        } else {
            format!(
                " ({} incomplete: {})",
                list.incomplete.len(),
                list.incomplete
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
    }
    let mut all = Vec::new();
    for id in &list.complete {
        let m = BackupManifest::load(repo, id).await?;
        check_system(marker, &m)?;
        all.push(m);
    }
    let mut best: Option<BackupManifest> = None;
    for m in all.iter() {
        let fits = match target {
            Target::Time(t) => m.stop_at()? <= t,
            Target::Lsn(l) => m.stop()? <= l,
            Target::Latest | Target::Xid(_) => true,
        };
        if fits
            && best.as_ref().map_or(Ok::<bool, anyhow::Error>(true), |b| {
                Ok(m.stop()? > b.stop()?)
            })?
        {
            best = Some(m.clone());
        }
    }
    match best {
        Some(b) => Ok(b),
        None => {
            let oldest = all
                .iter()
                .min_by_key(|m| m.stop().unwrap_or(Lsn(u64::MAX)))
                .context("no backups")?;
            let (what, when) = match target {
                Target::Time(_) => ("ended at", oldest.stop_time.clone()),
                _ => ("ends at LSN", oldest.stop_lsn.clone()),
            };
            bail!(
                "no complete base backup ends before the target {}: it is earlier than the oldest backup, {} (which {what} {when})",
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
    match target {
        Target::Latest => {
            if newest > cont_end {
                bail!(
                    "{}; restoring the latest point needs it. Restore up to the hole with --to-lsn {cont_end}",
                    describe_gap(newest)
                );
            }
            Ok(RecoveryPlan {
                settings: Vec::new(),
                describe: format!(
                    "the end of the archived WAL ({cont_end} on timeline {}), using backup {}",
                    path.target(),
                    m.id
                ),
            })
        }
        Target::Lsn(l) => {
            if l > cont_end {
                if newest > cont_end {
                    bail!(
                        "{}; the target {l} lies beyond it",
                        describe_gap(l.max(newest))
                    );
                }
                bail!(
                    "the target LSN {l} is beyond the last archived WAL: the latest restorable LSN is {cont_end}"
                );
            }
            Ok(RecoveryPlan {
                settings: target.settings(),
                describe: format!("LSN {l}, using backup {}", m.id),
            })
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
            })
        }
        Target::Time(t) => {
            let last = last_xact(repo, inv, path, size, start, cont_end).await?;
            let last_time = last.map(|x| pg_time(x.time));
            match (last, last_time) {
                (Some(_), Some(lt)) if t < lt => Ok(RecoveryPlan {
                    settings: target.settings(),
                    describe: format!("{}, using backup {}", target.describe(), m.id),
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

/// The last commit/abort record before `end`, reading segments backwards from there.
async fn last_xact(
    repo: &Repository,
    inv: &WalInventory,
    path: &WalPath,
    size: WalSegmentSize,
    start: Lsn,
    end: Lsn,
) -> Result<Option<XactRecord>> {
    if end <= start {
        return Ok(None);
    }
    let first = size.segment_of(start);
    let mut segno = size.segment_of(Lsn(end.0 - 1));
    for _ in 0..MAX_SCAN_SEGMENTS {
        let tli = path.timeline_of(segno, size);
        let Some(t) = inv.timelines.get(&tli.get()) else {
            break;
        };
        let seg = SegmentName::new(tli, segno, size)?;
        let name = layout::WalSegmentName::parse(&seg.to_string())?;
        let key = if t.segments.contains(&segno) {
            layout::wal_segment(&name)
        } else {
            match t.partials.get(&segno) {
                Some(off) => layout::wal_partial(&name, *off),
                None => break,
            }
        };
        let data = repo
            .get(&key)
            .await
            .with_context(|| format!("reading {key} to find the last archived commit"))?;
        let scan = scan_segment(&data, seg.start_lsn());
        if let Some(x) = scan.xacts.iter().rev().find(|x| x.lsn < end) {
            return Ok(Some(*x));
        }
        if segno <= first {
            break;
        }
        segno -= 1;
    }
    Ok(None)
}

fn parse_tablespace_map(items: &[String]) -> Result<Vec<(String, PathBuf)>> {
    items
        .iter()
        .map(|i| {
            let (old, new) = i
                .split_once('=')
                .with_context(|| format!("--tablespace-map {i:?}: expected OLD=NEW"))?;
            let new = PathBuf::from(new);
            if !new.is_absolute() {
                bail!("--tablespace-map {i:?}: the new location must be absolute");
            }
            Ok((old.trim_end_matches('/').to_string(), new))
        })
        .collect()
}

/// Where each archive goes: the target for the data directory, the (mapped) original
/// location for tablespaces.
fn archive_roots(
    m: &BackupManifest,
    target: &Path,
    map: &[(String, PathBuf)],
) -> Result<Vec<PathBuf>> {
    let mut roots = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for t in &m.tablespaces {
        match (&t.oid, &t.location) {
            (None, _) => roots.push(target.to_path_buf()),
            (Some(oid), Some(loc)) => {
                let key = loc.trim_end_matches('/');
                let dest = match map.iter().find(|(o, _)| o == key) {
                    Some((o, n)) => {
                        used.push(o.clone());
                        n.clone()
                    }
                    None => PathBuf::from(loc),
                };
                if dest.starts_with(target) {
                    bail!(
                        "tablespace {oid} would be restored to {} inside the target; map it elsewhere with --tablespace-map {loc}=NEW",
                        dest.display()
                    );
                }
                roots.push(dest);
            }
            (Some(oid), None) => bail!("tablespace {oid} has no location in the backup"),
        }
    }
    if m.tablespaces.iter().filter(|t| t.oid.is_none()).count() != 1 {
        bail!(
            "backup {} does not have exactly one data directory archive",
            m.id
        );
    }
    for (o, _) in map {
        if !used.contains(o) {
            let known: Vec<&str> = m
                .tablespaces
                .iter()
                .filter_map(|t| t.location.as_deref())
                .collect();
            bail!(
                "--tablespace-map {o}=…: the backup has no tablespace there (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    Ok(roots)
}

/// The destinations of the tablespace archives (not the data directory).
fn tablespace_roots<'a>(m: &BackupManifest, roots: &'a [PathBuf]) -> Vec<&'a PathBuf> {
    m.tablespaces
        .iter()
        .zip(roots)
        .filter(|(t, _)| t.oid.is_some())
        .map(|(_, r)| r)
        .collect()
}

fn make_tablespace_links(m: &BackupManifest, roots: &[PathBuf]) -> Result<()> {
    let Some(base) = m
        .tablespaces
        .iter()
        .position(|t| t.oid.is_none())
        .and_then(|i| roots.get(i))
    else {
        return Ok(());
    };
    for (i, t) in m.tablespaces.iter().enumerate() {
        let Some(oid) = t.oid else { continue };
        let link = base.join("pg_tblspc").join(oid.to_string());
        let _ = std::fs::remove_file(&link);
        std::fs::create_dir_all(base.join("pg_tblspc")).context("creating pg_tblspc")?;
        std::os::unix::fs::symlink(&roots[i], &link)
            .with_context(|| format!("linking {} to {}", link.display(), roots[i].display()))?;
    }
    // Symlinks recorded in the base archive are the tablespace links above.
    for e in &m.entries {
        if e.kind == EntryKind::Symlink && !e.path.starts_with("pg_tblspc/") {
            bail!("unexpected symlink {} in the backup", e.path);
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(p)
    };
    Ok(abs)
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

fn clear_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
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
    repo: &Repository,
    args: &RestoreArgs,
    id: &BackupId,
    plan: &RecoveryPlan,
    timeline: &str,
) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let _ = repo;
    let repo_args: Vec<String> = args
        .repo
        .reader_args()?
        .iter()
        .map(|a| shell_quote(a))
        .collect();
    let command = format!(
        "{} postgres wal-fetch {} %f %p",
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
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().ok();
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
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
/// it stopped (from the server log).
fn start_and_wait(
    bin: &Path,
    dir: &Path,
    args: &RestoreArgs,
    owner: Option<&(u32, u32, String)>,
    restore_secs: f64,
) -> Result<()> {
    let log = dir.join("syncbridge-recovery.log");
    std::fs::write(&log, b"").context("creating the recovery log")?;
    if let Some((uid, gid, _)) = owner {
        std::os::unix::fs::lchown(&log, Some(*uid), Some(*gid))?;
    }
    let mut cmd = std::process::Command::new(bin.join("pg_ctl"));
    cmd.arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"]);
    if let Some(o) = &args.start_options {
        cmd.arg("-o").arg(o);
    }
    if let Some((uid, gid, _)) = owner {
        cmd.uid(*uid).gid(*gid);
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
    let deadline = Instant::now() + args.start_timeout;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("database system is ready to accept connections") {
            let replay_secs = replay_started.elapsed().as_secs_f64();
            report_recovery(&text);
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
            bail!("recovery failed: {line}\n(full log: {})", log.display());
        }
        if Instant::now() > deadline {
            bail!(
                "recovery did not finish within {}s; the server is still running (log: {})",
                args.start_timeout.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
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
    fn pg_epoch() {
        assert_eq!(pg_time(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
        assert_eq!(pg_time(1_500_000).timestamp_subsec_micros(), 500_000);
    }
}
