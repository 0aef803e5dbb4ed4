//! The base backups of a PostgreSQL repository: one listing of `postgres/base/` (the ids,
//! and per id its `backup.json`, `pinned` and `expiring` objects and last write), then each
//! `backup.json` (read in parallel), parsed once into typed fields. A backup whose
//! `backup.json` is absent is incomplete (in progress, failed, waiting for its WAL, or half
//! removed by an interrupted `expire`, which leaves its `expiring` tombstone) and never
//! restored.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use storage::layout::{self, BackupId, BaseBackupObject};
use storage::Repository;
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
    /// Pinned (`backup pin`): never expired.
    pub pinned: bool,
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
            pinned: false,
        })
    }
}

/// A listed `backup.json` that could not be read or does not check out.
#[derive(Debug)]
pub struct Unreadable {
    /// The backup it belongs to.
    pub id: BackupId,
    /// Why (a storage error names the key).
    pub error: anyhow::Error,
}

/// Every base backup of a repository.
#[derive(Debug, Clone, Default)]
pub struct BackupCatalog {
    /// Backups with a `backup.json`, oldest first.
    pub complete: Vec<Backup>,
    /// Ids with objects but no `backup.json`, oldest first.
    pub incomplete: Vec<BackupId>,
    /// Ids with an `expiring` tombstone: an `expire` began removing them.
    pub expiring: BTreeSet<BackupId>,
    /// When each id's newest object was written (the store's clock).
    pub last_write: BTreeMap<BackupId, DateTime<Utc>>,
}

impl BackupCatalog {
    /// Lists `postgres/base/`, then reads each `backup.json`; one that cannot be read or
    /// does not check out is an error.
    pub async fn load(repo: &Repository) -> Result<BackupCatalog> {
        let (cat, unreadable) = Self::load_checked(repo).await?;
        match unreadable.into_iter().next() {
            Some(u) => Err(u.error),
            None => Ok(cat),
        }
    }

    /// [`load`](Self::load), but each `backup.json` that cannot be read or does not check
    /// out is returned beside the catalog (`verify` names each and checks the rest) instead
    /// of stopping it. Such a backup is in neither `complete` nor `incomplete`.
    pub async fn load_checked(repo: &Repository) -> Result<(BackupCatalog, Vec<Unreadable>)> {
        let objects = repo
            .list(&layout::base_backups_prefix())
            .await
            .context("listing base backups")?;
        let mut out = BackupCatalog::default();
        let mut all = BTreeSet::new();
        let mut done = BTreeSet::new();
        let mut pinned = BTreeSet::new();
        for o in objects {
            let id = if let Some(id) = layout::parse_base_backup_pin(&o.key) {
                pinned.insert(id.clone());
                id
            } else if let Some(id) = layout::parse_base_backup_expiring(&o.key) {
                out.expiring.insert(id.clone());
                id
            } else {
                match layout::parse_base_backup_key(&o.key) {
                    Some(BaseBackupObject::Manifest(id)) => {
                        done.insert(id.clone());
                        id
                    }
                    Some(
                        BaseBackupObject::Chunk { id, .. } | BaseBackupObject::ServerManifest(id),
                    ) => id,
                    None => continue,
                }
            };
            let last = out.last_write.entry(id.clone()).or_insert(o.last_modified);
            *last = (*last).max(o.last_modified);
            all.insert(id);
        }
        out.incomplete = all.difference(&done).cloned().collect();
        let read: Vec<(BackupId, Result<Backup>)> = stream::iter(done)
            .map(|id| async move {
                let b = match BackupManifest::load(repo, &id).await {
                    Ok(m) if m.id != id.as_str() => Err(anyhow::anyhow!(
                        "{} names backup {:?}, not {id}",
                        layout::base_backup_manifest(&id),
                        m.id
                    )),
                    Ok(m) => Backup::from_manifest(m),
                    Err(e) => Err(e),
                };
                (id, b)
            })
            .buffered(PARALLEL_READS)
            .collect()
            .await;
        let mut unreadable = Vec::new();
        for (id, b) in read {
            match b {
                Ok(mut b) => {
                    b.pinned = pinned.contains(&b.id);
                    out.complete.push(b);
                }
                Err(error) => unreadable.push(Unreadable { id, error }),
            }
        }
        Ok((out, unreadable))
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

/// A complete backup for tests: `id` (whose time is the start and, plus 5 s, the stop).
#[cfg(test)]
pub(crate) fn test_backup(id: &str, tli: u32, start: Lsn, stop: Lsn) -> Backup {
    #[allow(clippy::unwrap_used)]
    let bid = BackupId::parse(id).unwrap();
    let at = chrono::NaiveDateTime::parse_from_str(id, "%Y%m%dT%H%M%SZ")
        .map(|t| t.and_utc())
        .unwrap_or_default();
    let mut m = tests::manifest(id);
    m.timeline = tli;
    m.stop_timeline = tli;
    m.start_lsn = start.to_string();
    m.stop_lsn = stop.to_string();
    Backup {
        id: bid,
        timeline: TimelineId::new(tli).unwrap_or(TimelineId::FIRST),
        start,
        stop,
        start_time: at,
        stop_time: at + chrono::TimeDelta::seconds(5),
        segment_size: WalSegmentSize::DEFAULT,
        manifest: m,
        pinned: false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use storage::{ContentKind, PutMode, RepoOptions};

    pub(crate) fn manifest(id: &str) -> BackupManifest {
        BackupManifest {
            version: 1,
            id: id.into(),
            label: String::new(),
            system_identifier: "1".into(),
            server_version: "150010".into(),
            server_major: 15,
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            stop_timeline: 1,
            start_time: "2026-12-01T00:00:00Z".into(),
            stop_time: "2026-12-01T00:00:05Z".into(),
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

    /// A `backup.json` that names another backup (a swapped or copied manifest) and one that
    /// is not JSON are returned beside the catalog by `load_checked` (which `verify` names)
    /// and stop `load`; the intact one is typed once.
    #[test]
    fn a_manifest_of_another_backup_or_not_json_is_unreadable() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
            let put = |id: &str, body: Vec<u8>| {
                let repo = repo.clone();
                let key = layout::base_backup_manifest(&BackupId::parse(id).unwrap());
                async move {
                    repo.put(
                        &key,
                        ContentKind::BaseBackupManifest,
                        Bytes::from(body),
                        PutMode::CreateNew,
                    )
                    .await
                    .unwrap();
                }
            };
            let good = "20261201T000000Z";
            let copied = "20261202T000000Z";
            let garbled = "20261203T000000Z";
            put(good, serde_json::to_vec(&manifest(good)).unwrap()).await;
            put(copied, serde_json::to_vec(&manifest(good)).unwrap()).await;
            put(garbled, b"{ not json".to_vec()).await;

            let (cat, unreadable) = BackupCatalog::load_checked(&repo).await.unwrap();
            assert_eq!(cat.complete.len(), 1);
            let b = &cat.complete[0];
            assert_eq!(b.id.as_str(), good);
            assert_eq!(b.start, Lsn(0x2000028));
            assert_eq!(b.timeline, TimelineId::new(1).unwrap());
            let bad: Vec<&str> = unreadable.iter().map(|u| u.id.as_str()).collect();
            assert_eq!(bad, [copied, garbled]);
            let text = format!("{:#}", unreadable[0].error);
            assert!(text.contains(&format!("names backup \"{good}\"")), "{text}");
            assert!(BackupCatalog::load(&repo).await.is_err());
        });
    }
}
