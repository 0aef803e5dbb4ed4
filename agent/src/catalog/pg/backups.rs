//! The base backups of a PostgreSQL repository: one delimiter listing of `postgres/base/`
//! for the ids, then each `backup.json` (read in parallel), parsed once into typed fields.
//! A backup whose `backup.json` is absent is incomplete (in progress, failed, waiting for
//! its WAL, or half removed by an interrupted `expire`) and never restored.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use storage::layout::{self, BackupId};
use storage::{Repository, StorageError};
use wire::pg::{Lsn, TimelineId, WalSegmentSize};

use crate::pg::backup_manifest::BackupManifest;

/// Manifests read at once: enough to hide a store's latency, few enough to stay polite.
const PARALLEL_READS: usize = 16;

/// A complete base backup.
#[derive(Debug, Clone)]
pub struct Backup {
    /// Its id (sorts by start time).
    pub id: BackupId,
    /// Timeline it started on.
    pub timeline: TimelineId,
    /// Start LSN: replay begins at the checkpoint before it.
    pub start: Lsn,
    /// Stop LSN: the backup is consistent once replay reaches it.
    pub stop: Lsn,
    /// When it started (agent clock).
    pub start_time: DateTime<Utc>,
    /// When the server reported its stop (agent clock): the earliest moment it restores.
    pub stop_time: DateTime<Utc>,
    /// The cluster's WAL segment size.
    pub segment_size: WalSegmentSize,
    /// The whole manifest (files, data objects, tablespaces) for restore and verify.
    pub manifest: BackupManifest,
}

impl Backup {
    /// Checks and types a manifest read from `backup.json`.
    pub fn from_manifest(manifest: BackupManifest) -> Result<Backup> {
        Ok(Backup {
            id: manifest.backup_id()?,
            timeline: manifest.tli()?,
            start: manifest.start()?,
            stop: manifest.stop()?,
            start_time: crate::util::time::parse_time(&manifest.start_time)
                .with_context(|| format!("backup {}: start_time", manifest.id))?,
            stop_time: manifest.stop_at()?,
            segment_size: manifest.segment_size()?,
            manifest,
        })
    }
}

/// Every base backup of a repository.
#[derive(Debug, Clone, Default)]
pub struct BackupCatalog {
    /// Backups with a `backup.json`, oldest first.
    pub complete: Vec<Backup>,
    /// Ids with objects but no `backup.json`, oldest first.
    pub incomplete: Vec<BackupId>,
}

impl BackupCatalog {
    /// Lists the backup ids (a delimiter listing), then reads each `backup.json`.
    pub async fn load(repo: &Repository) -> Result<BackupCatalog> {
        let dirs = repo
            .list_dirs(&layout::base_backups_prefix())
            .await
            .context("listing base backups")?;
        let ids: Vec<BackupId> = dirs
            .iter()
            .filter_map(|d| {
                let name = d.as_str().trim_end_matches('/').rsplit('/').next()?;
                BackupId::parse(name).ok()
            })
            .collect();
        let loaded: Vec<(BackupId, Option<BackupManifest>)> = stream::iter(ids)
            .map(|id| async move {
                let m = match BackupManifest::load(repo, &id).await {
                    Ok(m) => Some(m),
                    Err(e) if is_not_found(&e) => None,
                    Err(e) => return Err(e),
                };
                Ok::<_, anyhow::Error>((id, m))
            })
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        let mut out = BackupCatalog::default();
        for (id, m) in loaded {
            match m {
                Some(m) => out.complete.push(Backup::from_manifest(m)?),
                // A directory left empty (a local store keeps directories) is no backup.
                None => {
                    let objects = repo
                        .list(&layout::base_backup_prefix(&id))
                        .await
                        .with_context(|| format!("listing backup {id}"))?;
                    if !objects.is_empty() {
                        out.incomplete.push(id);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The segment size of the repository's WAL: the newest backup's, else 16 MiB.
    pub fn segment_size(&self) -> WalSegmentSize {
        self.complete
            .last()
            .map_or(WalSegmentSize::DEFAULT, |b| b.segment_size)
    }

    /// A backup by id: complete, or an error saying why it cannot be used.
    pub fn get(&self, id: &BackupId, repo_url: &str) -> Result<&Backup> {
        if let Some(b) = self.complete.iter().find(|b| &b.id == id) {
            return Ok(b);
        }
        if self.incomplete.contains(id) {
            bail!("backup {id} is incomplete (no backup.json: it failed, its WAL never reached the repository, or an expire removed it)");
        }
        bail!("there is no backup {id} in {repo_url}");
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StorageError>(),
            Some(StorageError::NotFound { .. })
        )
    })
}
