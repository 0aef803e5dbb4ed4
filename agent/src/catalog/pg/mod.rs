//! The PostgreSQL part of the repository catalog: the base backups ([`backups`]) and the WAL
//! per timeline ([`wal`]), each read with one listing and parsed once into typed values
//! (`BackupId`, `Lsn`, `TimelineId`, `DateTime<Utc>`). `list`, `restore`, `expire`,
//! `verify`, `postgres backup`, `postgres stream` and `postgres wal-fetch` read the
//! repository through these types.

pub mod backups;
pub mod wal;

pub use backups::{Backup, BackupCatalog};

pub use wal::{segment_in_progress, WalInventory, WalPath};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use storage::{layout, RepoKey, Repository};
use wire::pg::{Lsn, TimelineId, WalSegmentSize};

/// Everything a PostgreSQL repository holds: its backups and its WAL.
#[derive(Debug, Clone)]
pub struct PgCatalog {
    /// Complete and incomplete base backups.
    pub backups: BackupCatalog,
    /// WAL per timeline.
    pub wal: WalInventory,
    /// The segment size WAL was counted with (the backups' own, or the default 16 MiB
    /// when there is no backup yet).
    pub segment_size: WalSegmentSize,
    /// When the newest WAL object was stored (the store's clock).
    pub newest_wal_write: Option<DateTime<Utc>>,
    /// Versions of WAL files the stream received that differ from the stored ones, kept
    /// under `postgres/conflicts/` for an operator to compare (never restored from).
    pub conflicts: Vec<RepoKey>,
}

/// The span of time and WAL a repository can restore to on one timeline: from the end of
/// its oldest backup to the end of WAL stored without a hole after the newest one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorableRange {
    /// The oldest backup's stop time: no earlier moment is restorable.
    pub first_time: DateTime<Utc>,
    /// The oldest backup's stop LSN.
    pub first_lsn: Lsn,
    /// Where stored WAL ends, without a hole, after the newest backup's start.
    pub last_lsn: Lsn,
    /// When that WAL was stored (the newest WAL object's store time); `None` with no WAL.
    pub last_time: Option<DateTime<Utc>>,
    /// The newest backup's timeline.
    pub timeline: TimelineId,
}

impl PgCatalog {
    /// Lists the backups, reads their manifests, then lists the WAL.
    pub async fn load(repo: &Repository) -> Result<PgCatalog> {
        let backups = BackupCatalog::load(repo).await?;
        let segment_size = backups.segment_size();
        let (wal, newest_wal_write) = WalInventory::load_with_times(repo, segment_size).await?;
        let conflicts = repo
            .list(&layout::wal_conflicts_prefix())
            .await
            .context("listing WAL conflicts")?
            .into_iter()
            .map(|o| o.key)
            .collect();
        Ok(PgCatalog {
            backups,
            wal,
            segment_size,
            newest_wal_write,
            conflicts,
        })
    }

    /// What the repository can restore to, if it holds a complete backup.
    pub fn restorable(&self) -> Option<RestorableRange> {
        let oldest = self.backups.complete.iter().min_by_key(|b| b.stop)?;
        let newest = self.backups.complete.iter().max_by_key(|b| b.stop)?;
        let end = self
            .wal
            .contiguous_end(&newest.timeline.into(), newest.start, self.segment_size);
        Some(RestorableRange {
            first_time: oldest.stop_time,
            first_lsn: oldest.stop,
            last_lsn: end,
            last_time: self.newest_wal_write,
            timeline: newest.timeline,
        })
    }
}
