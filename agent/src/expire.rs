//! `syncbridge-agent expire --repo URL [--keep-full N] [--keep-within DUR] [--dry-run]`:
//! retention for PostgreSQL (base backups and the WAL before the oldest kept one) and Redis
//! (generations). The plan is [`crate::catalog::retention::plan`] over the catalog; this
//! module only carries it out, in an order a kill at any moment cannot turn into a lie:
//! a backup's `backup.json` (a generation's `generation.json`) goes first, so a half-deleted
//! backup is never listed as complete; its data objects follow; WAL last, oldest first.
//! Leftovers of an interrupted run (backup or generation directories without a manifest,
//! older than the oldest kept one) are removed by the next run. Nothing newer than the
//! newest backup is touched, so a running stream's segment in progress, its deltas and the
//! open Redis generation are never candidates.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use storage::layout::{self, BackupId, GenerationId, RepoKey};
use storage::{RepoKind, Repository};
use wire::pg::{SegmentName, TimelineId};

use crate::catalog::pg::{Backup, PgCatalog};
use crate::catalog::redis::RedisCatalog;
use crate::catalog::retention::{plan, Candidate, Plan, Policy};
use crate::cli::RepoArgs;
use crate::pg::backup_progress::human;

/// Arguments of `expire`.
#[derive(Debug, Args)]
pub struct ExpireArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Keep the newest N base backups (Redis: generations).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_full: Option<u64>,
    /// Keep every moment of this window restorable (e.g. 30d, 14d, 12h); the newest backup
    /// that ended before the window is kept too, since it restores the window's start.
    #[arg(long, value_name = "DURATION", value_parser = crate::util::duration::parse_duration)]
    keep_within: Option<std::time::Duration>,
    /// Print the plan (what goes, what stays, bytes freed) and delete nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Runs `expire`.
pub fn run(args: ExpireArgs) -> Result<ExitCode> {
    crate::cli::block_on(expire(args))
}

async fn expire(args: ExpireArgs) -> Result<ExitCode> {
    let policy = Policy {
        keep_full: args.keep_full.map(|n| n as usize),
        keep_within: args.keep_within,
    };
    if policy.is_empty() {
        bail!("expire needs a policy: --keep-full N and/or --keep-within DURATION");
    }
    let repo = args.repo.open()?;
    let Some(marker) = repo.read_marker().await? else {
        bail!("{} is not a SyncBridge repository (no marker)", repo.url());
    };
    let now = Utc::now();
    match marker.kind {
        RepoKind::Postgres => expire_pg(&repo, &policy, now, args.dry_run).await?,
        RepoKind::Redis => expire_redis(&repo, &policy, now, args.dry_run).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(p: &Plan, what: &str, stored: impl Fn(&str) -> u64) {
    for (id, why) in p.keep.iter().zip(&p.reasons) {
        println!("keep    {what} {id} ({why})");
    }
    for id in &p.expire {
        println!("expire  {what} {id} ({} stored)", human(stored(id)));
    }
}

async fn expire_pg(
    repo: &Repository,
    policy: &Policy,
    now: DateTime<Utc>,
    dry: bool,
) -> Result<()> {
    let cat = PgCatalog::load(repo).await?;
    let backups = &cat.backups.complete;
    if backups.is_empty() {
        println!(
            "no complete base backup in {}: nothing to expire",
            repo.url()
        );
        return Ok(());
    }
    let candidates: Vec<Candidate> = backups
        .iter()
        .map(|b| Candidate {
            id: b.id.to_string(),
            restorable_from: b.stop_time,
            pinned: false,
        })
        .collect();
    let p = plan(&candidates, policy, now);
    let stored = |id: &str| {
        backups
            .iter()
            .find(|b| b.id.as_str() == id)
            .map_or(0, |b| b.manifest.stored_bytes)
    };
    print_plan(&p, "backup", stored);
    let kept: Vec<&Backup> = backups
        .iter()
        .filter(|b| p.keep.iter().any(|k| k == b.id.as_str()))
        .collect();
    let size = cat.segment_size;
    // WAL before the oldest kept backup's start restores nothing that is kept.
    let cutoff: Option<(u64, &BackupId)> =
        kept.iter().map(|b| (size.segment_of(b.start), &b.id)).min();
    let oldest_kept_id = kept.iter().map(|b| b.id.as_str()).min();
    // Leftovers of an interrupted expire: directories without backup.json, older than
    // every kept backup (a backup in progress is newer than the newest complete one).
    let orphans: Vec<&BackupId> = cat
        .backups
        .incomplete
        .iter()
        .filter(|id| oldest_kept_id.is_some_and(|k| id.as_str() < k))
        .collect();
    for id in &orphans {
        println!("remove  {id} (left by an interrupted expire: no backup.json)");
    }
    let inv = &cat.wal;
    let mut wal: Vec<RepoKey> = Vec::new();
    if let Some((cut, _)) = &cutoff {
        for (tli, t) in &inv.timelines {
            let tli = TimelineId::new(*tli)?;
            for segno in t.segments.range(..*cut) {
                let name = SegmentName::new(tli, *segno, size)?;
                wal.push(layout::wal_segment(&layout::WalSegmentName::parse(
                    &name.to_string(),
                )?));
            }
            for (_, parts) in t.partials.range(..*cut) {
                wal.extend(parts.deltas.iter().rev().map(|d| d.key.clone()));
                wal.extend(parts.whole.iter().map(|(_, k)| k.clone()));
            }
        }
    }
    wal.sort();
    if let Some((cut, id)) = &cutoff {
        println!(
            "expire  {} WAL objects before segment number {cut:X} (the start of backup {id}); history files are kept",
            wal.len()
        );
    }
    let freed: u64 = p.expire.iter().map(|id| stored(id)).sum();
    println!(
        "{}: {} backups kept, {} expired ({} of backups), {} WAL objects",
        if dry { "dry run" } else { "plan" },
        p.keep.len(),
        p.expire.len(),
        human(freed),
        wal.len()
    );
    if dry {
        return Ok(());
    }
    for id in &p.expire {
        let id = BackupId::parse(id)?;
        remove_backup(repo, &id).await?;
    }
    for id in orphans {
        remove_prefix(repo, &layout::base_backup_prefix(id)).await?;
    }
    for k in &wal {
        repo.delete(k)
            .await
            .with_context(|| format!("deleting {k}"))?;
    }
    println!(
        "expired {} backups and {} WAL objects",
        p.expire.len(),
        wal.len()
    );
    Ok(())
}

/// Makes the backup invisible (its backup.json first), then deletes its data.
async fn remove_backup(repo: &Repository, id: &BackupId) -> Result<()> {
    let manifest = layout::base_backup_manifest(id);
    repo.delete(&manifest)
        .await
        .with_context(|| format!("deleting {manifest}"))?;
    remove_prefix(repo, &layout::base_backup_prefix(id)).await
}

async fn remove_prefix(repo: &Repository, prefix: &RepoKey) -> Result<()> {
    let objects = repo
        .list(prefix)
        .await
        .with_context(|| format!("listing {prefix}"))?;
    for o in objects {
        repo.delete(&o.key)
            .await
            .with_context(|| format!("deleting {}", o.key))?;
    }
    Ok(())
}

async fn expire_redis(
    repo: &Repository,
    policy: &Policy,
    now: DateTime<Utc>,
    dry: bool,
) -> Result<()> {
    let cat = RedisCatalog::load(repo).await?;
    if cat.generations.is_empty() {
        println!("no generation in {}: nothing to expire", repo.url());
        return Ok(());
    }
    let mut candidates = Vec::new();
    for g in &cat.generations {
        candidates.push(Candidate {
            id: g.id.as_str().to_string(),
            restorable_from: DateTime::from_timestamp_millis(g.manifest.snapshot_unix_ms)
                .context("snapshot time out of range")?,
            pinned: false,
        });
    }
    let p = plan(&candidates, policy, now);
    let stored = |id: &str| {
        cat.generations
            .iter()
            .find(|g| g.id.as_str() == id)
            .map_or(0, |g| g.stored_bytes)
    };
    print_plan(&p, "generation", stored);
    let oldest_kept = p.keep.iter().min().cloned();
    let orphans: Vec<&GenerationId> = cat
        .incomplete
        .iter()
        .filter(|id| oldest_kept.as_deref().is_some_and(|k| id.as_str() < k))
        .collect();
    for id in &orphans {
        println!("remove  {id} (no generation.json, older than every kept generation)");
    }
    let freed: u64 = p.expire.iter().map(|id| stored(id)).sum();
    println!(
        "{}: {} generations kept, {} expired ({})",
        if dry { "dry run" } else { "plan" },
        p.keep.len(),
        p.expire.len(),
        human(freed)
    );
    if dry {
        return Ok(());
    }
    for id in &p.expire {
        let id = GenerationId::parse(id)?;
        let manifest = layout::redis_generation_manifest(&id);
        repo.delete(&manifest)
            .await
            .with_context(|| format!("deleting {manifest}"))?;
        remove_prefix(repo, &layout::redis_generation_prefix(&id)).await?;
    }
    for id in orphans {
        remove_prefix(repo, &layout::redis_generation_prefix(id)).await?;
    }
    println!("expired {} generations", p.expire.len());
    Ok(())
}
