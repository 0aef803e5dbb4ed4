//! `syncbridge-agent list --repo URL`: what a PostgreSQL repository can restore — each
//! base backup with its WAL range and times, the archived WAL per timeline with any holes,
//! and the latest restorable point.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use storage::RepoKind;
use wire::pg::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use crate::catalog::pg::WalInventory;
use crate::cli::RepoArgs;
use crate::pg::backup_catalog::{list_backups, BackupManifest};
use crate::pg::backup_progress::human;

/// Arguments of `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
}

/// Runs `list`.
pub fn run(args: ListArgs) -> Result<ExitCode> {
    crate::cli::block_on(list(args))
}

async fn list(args: ListArgs) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let Some(marker) = repo.read_marker().await? else {
        bail!("{} is not a SyncBridge repository (no marker)", repo.url());
    };
    if marker.kind != RepoKind::Postgres {
        println!(
            "{} holds Redis backups: see `syncbridge-agent repo ls`",
            repo.url()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "repository:  {} (PostgreSQL, system identifier {})",
        repo.url(),
        marker.system_identifier.as_deref().unwrap_or("?")
    );
    let list = list_backups(&repo).await?;
    let mut manifests = Vec::new();
    for id in &list.complete {
        manifests.push(BackupManifest::load(&repo, id).await?);
    }
    let size = manifests
        .first()
        .and_then(|m| m.segment_size().ok())
        .unwrap_or(WalSegmentSize::DEFAULT);
    println!("base backups:");
    if manifests.is_empty() {
        println!("  (none complete)");
    }
    for m in &manifests {
        println!(
            "  {}  {} .. {}  LSN {} .. {}  timeline {}  {} ({} stored)  PostgreSQL {}",
            m.id,
            m.start_time,
            m.stop_time,
            m.start_lsn,
            m.stop_lsn,
            m.timeline,
            human(m.total_bytes),
            human(m.stored_bytes),
            m.server_version
        );
        for t in &m.tablespaces {
            if let (Some(oid), Some(loc)) = (t.oid, &t.location) {
                let note = if loc.starts_with('/') {
                    ""
                } else {
                    " (not absolute: restore refuses it)"
                };
                println!("    tablespace {oid} at {loc}{note}");
            }
        }
    }
    for id in &list.incomplete {
        println!(
            "  {id}  incomplete (no backup.json: in progress, failed, or its WAL never arrived)"
        );
    }
    let inv = WalInventory::load(&repo, size).await?;
    println!("WAL:");
    if inv.timelines.is_empty() {
        println!("  (none)");
    }
    for (tli, t) in &inv.timelines {
        let tli = TimelineId::new(*tli)?;
        let first = t
            .segments
            .first()
            .copied()
            .into_iter()
            .chain(t.partials.keys().next().copied())
            .min()
            .unwrap_or(0);
        let start = Lsn(first * size.bytes());
        let path = tli.into();
        let end = inv.newest_end(&path, size).unwrap_or(start);
        let mut from = start;
        let mut holes = Vec::new();
        while let Some(g) = inv.gap(&path, from, end, size) {
            holes.push(g.to_string());
            from = g.to;
            if g.to <= g.from {
                break;
            }
        }
        println!(
            "  timeline {tli}: {} .. {} ({} .. {}), {} segments{}",
            start,
            end,
            SegmentName::new(tli, first, size)?,
            SegmentName::from_lsn(tli, Lsn(end.0.saturating_sub(1)), size),
            t.segments.len(),
            if t.partials.is_empty() {
                String::new()
            } else {
                " + the segment in progress".into()
            }
        );
        for h in holes {
            println!("    HOLE: {h}");
        }
    }
    if let Some(newest) = manifests
        .iter()
        .max_by_key(|m| m.stop().unwrap_or_default())
    {
        let tli = newest.tli()?;
        let end = inv.contiguous_end(&tli.into(), newest.start()?, size);
        println!(
            "restorable:  from {} (end of backup {}) to LSN {end} on timeline {tli}",
            newest.stop_time, newest.id
        );
    }
    Ok(ExitCode::SUCCESS)
}
