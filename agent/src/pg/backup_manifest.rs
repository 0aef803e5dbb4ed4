//! The agent's manifest of a PostgreSQL base backup (`backup.json`, written last, so its
//! presence means "complete"). Which backups a repository holds is the catalog's question
//! ([`crate::catalog::pg::BackupCatalog`]); this module is the file format.
//!
//! The backup data itself is the server's tar stream with the tar headers lifted into the
//! manifest: each data object (`postgres/base/<id>/data/<seq>`) holds raw file bytes, and the
//! manifest says which bytes belong to which file at which offset. That lets restore write
//! every object independently (in parallel, large files split across objects) and check
//! each file against the server's `backup_manifest` (`src/backend/backup/backup_manifest.c`).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use storage::layout::{self, BackupId};
use storage::{ContentKind, PutMode, Repository};
use wire::pg::{Lsn, TimelineId, WalSegmentSize};

/// Version of the `backup.json` layout this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// What an entry of the backup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (tablespace links under `pg_tblspc`).
    Symlink,
}

/// One file, directory or link of the backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    /// Index into [`BackupManifest::tablespaces`]; 0 is the data directory.
    pub archive: u32,
    /// Path relative to the archive's root, as in the tar stream.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (Unix seconds).
    pub mtime: u64,
    /// Bytes (files only).
    #[serde(default)]
    pub size: u64,
    /// CRC32C of the file's bytes as received (files only).
    #[serde(default)]
    pub crc32c: u32,
    /// Link target (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// A run of bytes of one file inside a data object; pieces follow each other in the object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Index into [`BackupManifest::entries`].
    pub entry: u32,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// One data object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataChunk {
    /// Sequence number (its key is `layout::base_backup_chunk(id, seq)`).
    pub seq: u64,
    /// Original bytes in the object.
    pub bytes: u64,
    /// Bytes in the store (after compression).
    pub stored_bytes: u64,
    /// SHA-256 of the object's original bytes, hex.
    pub sha256: String,
    /// What the bytes are, in order.
    pub pieces: Vec<Piece>,
}

/// A tablespace archive of the backup (`base.tar` is always first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// Archive name the server gave (`base.tar`, `16385.tar`).
    pub archive: String,
    /// Tablespace OID; `None` for the data directory.
    pub oid: Option<u32>,
    /// Location on the source server; `None` for the data directory.
    pub location: Option<String>,
}

/// The agent's manifest of a base backup (`backup.json`): written after everything else,
/// so a backup without it is incomplete and never restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The backup id (also its key prefix).
    pub id: String,
    /// The label given to `BASE_BACKUP`.
    pub label: String,
    /// The cluster's system identifier.
    pub system_identifier: String,
    /// `server_version` as reported at connect.
    pub server_version: String,
    /// Major version (14, 15, …).
    pub server_major: u32,
    /// Timeline the backup started on.
    pub timeline: u32,
    /// Start LSN (`X/Y`): WAL replay begins at the checkpoint before it.
    pub start_lsn: String,
    /// Stop LSN: the backup is consistent once replay reaches it.
    pub stop_lsn: String,
    /// Timeline at the stop.
    pub stop_timeline: u32,
    /// When the backup started (agent clock, RFC 3339 UTC).
    pub start_time: String,
    /// When the server reported the stop position (agent clock, RFC 3339 UTC). Every commit
    /// before the stop LSN happened before this.
    pub stop_time: String,
    /// When WAL up to `stop_lsn` was seen in the repository.
    pub wal_archived_time: String,
    /// `wal_segment_size` in bytes.
    pub wal_segment_size: u64,
    /// Sum of the file sizes.
    pub total_bytes: u64,
    /// Sum of the data objects' stored sizes.
    pub stored_bytes: u64,
    /// Archives; index 0 is the data directory.
    pub tablespaces: Vec<Tablespace>,
    /// Every file, directory and link.
    pub entries: Vec<BackupEntry>,
    /// Data objects, in sequence order.
    pub chunks: Vec<DataChunk>,
    /// SHA-256 (hex) of the server's `backup_manifest` object.
    pub server_manifest_sha256: String,
}

impl BackupManifest {
    /// The id, validated.
    pub fn backup_id(&self) -> Result<BackupId> {
        BackupId::parse(&self.id).with_context(|| format!("backup id {:?}", self.id))
    }

    /// Start LSN.
    pub fn start(&self) -> Result<Lsn> {
        Lsn::parse(&self.start_lsn).with_context(|| format!("backup {}: start_lsn", self.id))
    }

    /// Stop LSN.
    pub fn stop(&self) -> Result<Lsn> {
        Lsn::parse(&self.stop_lsn).with_context(|| format!("backup {}: stop_lsn", self.id))
    }

    /// The timeline.
    pub fn tli(&self) -> Result<TimelineId> {
        TimelineId::new(self.timeline).with_context(|| format!("backup {}: timeline", self.id))
    }

    /// The WAL segment size.
    pub fn segment_size(&self) -> Result<WalSegmentSize> {
        WalSegmentSize::new(self.wal_segment_size)
            .with_context(|| format!("backup {}: wal_segment_size", self.id))
    }

    /// Stop time.
    pub fn stop_at(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        parse_time(&self.stop_time).with_context(|| format!("backup {}: stop_time", self.id))
    }

    /// Writes the manifest (create-new: a backup is completed once).
    pub async fn store(&self, repo: &Repository) -> Result<()> {
        let key = layout::base_backup_manifest(&self.backup_id()?);
        let json = serde_json::to_vec(self).context("encoding backup.json")?;
        repo.put(
            &key,
            ContentKind::BaseBackupManifest,
            Bytes::from(json),
            PutMode::CreateNew,
        )
        .await
        .with_context(|| format!("writing {key}"))?;
        Ok(())
    }

    /// Reads and checks one backup's manifest.
    pub async fn load(repo: &Repository, id: &BackupId) -> Result<BackupManifest> {
        let key = layout::base_backup_manifest(id);
        let data = repo
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        let m: BackupManifest =
            serde_json::from_slice(&data).with_context(|| format!("decoding {key}"))?;
        if m.version > MANIFEST_VERSION {
            bail!(
                "{key} has version {} but this agent reads up to {MANIFEST_VERSION}: upgrade the agent",
                m.version
            );
        }
        if m.id != id.as_str() {
            bail!("{key} names backup {:?}, not {id}", m.id);
        }
        m.start()?;
        m.stop()?;
        m.tli()?;
        m.segment_size()?;
        m.stop_at()?;
        let n = m.entries.len();
        for c in &m.chunks {
            if let Some(p) = c.pieces.iter().find(|p| p.entry as usize >= n) {
                bail!("{key}: chunk {} names entry {} of {n}", c.seq, p.entry);
            }
        }
        if let Some(e) = m
            .entries
            .iter()
            .find(|e| e.archive as usize >= m.tablespaces.len())
        {
            bail!("{key}: entry {} names archive {}", e.path, e.archive);
        }
        Ok(m)
    }
}

/// Parses a time (the one syntax of [`crate::util::time`]) into UTC.
pub use crate::util::time::parse_time;

/// Formats a time the way manifests store it (microseconds, UTC).
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
