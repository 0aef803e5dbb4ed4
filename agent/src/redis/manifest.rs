//! `generation.json`: what one snapshot generation holds, written only once its snapshot is
//! stored and validated, so a listed generation is always restorable from its snapshot.
//!
//! A generation is one `+FULLRESYNC`: a snapshot at replication offset `snapshot_offset`
//! of replication ID `replid`, followed by command-stream chunks keyed by offset range.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use storage::{layout, ContentKind, PutMode, Repository};

/// Version of this manifest's JSON layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// The snapshot part of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFacts {
    /// Repository key of the RDB object.
    pub key: String,
    /// RDB size in bytes (uncompressed).
    pub size: u64,
    /// SHA-256 of the RDB bytes, hex.
    pub sha256: String,
    /// Magic and version, e.g. `REDIS0010` or `VALKEY080`.
    pub rdb_format: String,
    /// Keys per database, from the validator.
    pub keys_per_db: BTreeMap<u64, u64>,
    /// Keys per type (`string`, `hash`, ...).
    pub keys_per_kind: BTreeMap<String, u64>,
    /// Server version from the RDB's AUX fields, when present.
    pub server_version: Option<String>,
    /// `$<len>` or diskless `$EOF:`.
    pub diskless: bool,
}

/// `generation.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The generation id (also in the key).
    pub generation: String,
    /// `host:port` of the master.
    pub source: String,
    /// Replication ID from `+FULLRESYNC`.
    pub replid: String,
    /// Replication offset of the snapshot; the command stream continues from here.
    pub snapshot_offset: u64,
    /// When `+FULLRESYNC` arrived (the master forks for the snapshot right then), Unix ms.
    pub snapshot_unix_ms: i64,
    /// When the snapshot was stored and validated, Unix ms.
    pub stored_unix_ms: i64,
    /// Database the replication stream had selected at the snapshot (`repl-stream-db`);
    /// the master re-sends `SELECT` after a full sync anyway.
    pub db_at_snapshot: u32,
    /// The snapshot.
    pub snapshot: SnapshotFacts,
}

impl GenerationManifest {
    /// Stores the manifest (never overwriting one).
    pub async fn store(&self, repo: &Repository) -> Result<()> {
        let id = layout::GenerationId::parse(&self.generation)?;
        let key = layout::redis_generation_manifest(&id);
        let json = serde_json::to_vec_pretty(self).context("encoding generation.json")?;
        repo.put(
            &key,
            ContentKind::RedisManifest,
            Bytes::from(json),
            PutMode::CreateNew,
        )
        .await
        .with_context(|| format!("storing {key}"))?;
        Ok(())
    }

    /// Reads a generation's manifest.
    pub async fn load(repo: &Repository, id: &layout::GenerationId) -> Result<GenerationManifest> {
        let key = layout::redis_generation_manifest(id);
        let data = repo
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        serde_json::from_slice(&data).with_context(|| format!("{key} is not a generation manifest"))
    }
}
