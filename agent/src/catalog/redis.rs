//! The Redis part of the repository catalog: one listing of `redis/gen/` read into
//! generations (a snapshot at a replication offset, then command chunks keyed by offset
//! range) with their chunk chains. A generation is listed once its `generation.json` exists
//! (written after its snapshot is stored and validated); directories without one are in
//! progress or failed.
//!
//! The chain rule is shared by every reader (`redis stream` resume, `redis verify`, `redis
//! restore`, `list`): from the snapshot's offset, each chunk starts where the previous one
//! ended; chunks that do not fit (past a gap, overlapping) are orphans.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use storage::layout::{self, GenerationId, RedisObject, RepoKey};
use storage::Repository;

use crate::redis::manifest::GenerationManifest;

/// Manifests read at once: enough to hide a store's latency, few enough to stay polite.
const PARALLEL_READS: usize = 16;

/// One generation with a manifest.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Its id (sorts by start time).
    pub id: GenerationId,
    /// Its `generation.json`.
    pub manifest: GenerationManifest,
    /// Chunks chained from the snapshot's offset: (start, end), in order.
    pub chain: Vec<(u64, u64)>,
    /// Chunks not on the chain (left behind a gap, or overlapping).
    pub orphans: Vec<RepoKey>,
    /// Stored bytes of the generation's objects (container overhead included).
    pub stored_bytes: u64,
    /// When its newest object was written (the store's time).
    pub last_write: Option<DateTime<Utc>>,
    /// Pinned (`backup pin`): never expired.
    pub pinned: bool,
}

impl Generation {
    /// The replication offset the generation's stored stream reaches.
    pub fn end_offset(&self) -> u64 {
        self.chain
            .last()
            .map_or(self.manifest.snapshot_offset, |c| c.1)
    }
}

/// Every generation of a Redis repository.
#[derive(Debug, Clone, Default)]
pub struct RedisCatalog {
    /// Generations with a manifest, oldest first.
    pub generations: Vec<Generation>,
    /// Generation directories without a manifest (in progress, or failed).
    pub incomplete: Vec<GenerationId>,
    /// Generations with an `expiring` tombstone: an `expire` began removing them.
    pub expiring: std::collections::BTreeSet<GenerationId>,
    /// When each generation directory's newest object was written (the store's clock),
    /// complete or not.
    pub last_write: BTreeMap<GenerationId, DateTime<Utc>>,
}

impl RedisCatalog {
    /// One listing of `redis/gen/`, then each manifest.
    pub async fn load(repo: &Repository) -> Result<RedisCatalog> {
        let listed = repo
            .list(&layout::redis_generations_prefix())
            .await
            .context("listing Redis generations")?;
        struct Seen {
            manifest: bool,
            chunks: Vec<(u64, u64, RepoKey)>,
            bytes: u64,
            last: Option<DateTime<Utc>>,
            pinned: bool,
        }
        let mut by_id: BTreeMap<GenerationId, Seen> = BTreeMap::new();
        let mut pinned = std::collections::BTreeSet::new();
        let mut expiring = std::collections::BTreeSet::new();
        for meta in listed {
            if let Some(id) = layout::parse_redis_generation_pin(&meta.key) {
                pinned.insert(id);
                continue;
            }
            if let Some(id) = layout::parse_redis_generation_expiring(&meta.key) {
                expiring.insert(id);
                continue;
            }
            let Some(object) = layout::parse_redis_key(&meta.key) else {
                continue;
            };
            let id = match &object {
                RedisObject::Snapshot(id) | RedisObject::Manifest(id) => id.clone(),
                RedisObject::Chunk { id, .. } => id.clone(),
            };
            let seen = by_id.entry(id).or_insert(Seen {
                manifest: false,
                chunks: Vec::new(),
                bytes: 0,
                last: None,
                pinned: false,
            });
            seen.bytes += meta.size;
            seen.last = seen.last.max(Some(meta.last_modified));
            match object {
                RedisObject::Manifest(_) => seen.manifest = true,
                RedisObject::Chunk { start, end, .. } => seen.chunks.push((start, end, meta.key)),
                RedisObject::Snapshot(_) => {}
            }
        }
        for id in pinned {
            if let Some(seen) = by_id.get_mut(&id) {
                seen.pinned = true;
            }
        }
        let mut out = RedisCatalog {
            expiring,
            ..RedisCatalog::default()
        };
        let mut complete = Vec::new();
        for (id, seen) in by_id {
            if let Some(t) = seen.last {
                out.last_write.insert(id.clone(), t);
            }
            if seen.manifest {
                complete.push((id, seen));
            } else {
                out.incomplete.push(id);
            }
        }
        out.generations = stream::iter(complete)
            .map(|(id, seen)| async move {
                let manifest = GenerationManifest::load(repo, &id).await?;
                if manifest.generation != id.as_str() {
                    bail!(
                        "{} names generation {:?}, not {id}",
                        layout::redis_generation_manifest(&id),
                        manifest.generation
                    );
                }
                let (chain, orphans) = chain_from(manifest.snapshot_offset, seen.chunks);
                Ok(Generation {
                    id,
                    manifest,
                    chain,
                    orphans,
                    stored_bytes: seen.bytes,
                    last_write: seen.last,
                    pinned: seen.pinned,
                })
            })
            .buffered(PARALLEL_READS)
            .try_collect()
            .await?;
        Ok(out)
    }

    /// The newest generation.
    pub fn latest(&self) -> Option<&Generation> {
        self.generations.last()
    }

    /// The generation a restore to `to_ms` (Unix milliseconds) starts from: the newest whose
    /// snapshot is not after it; the newest of all without a time.
    pub fn for_time(&self, to_ms: Option<i64>) -> Option<&Generation> {
        match to_ms {
            Some(t) => self
                .generations
                .iter()
                .rev()
                .find(|g| g.manifest.snapshot_unix_ms <= t),
            None => self.latest(),
        }
    }
}

/// Chunks chained from `start`: each begins where the previous ended; the rest are orphans.
pub fn chain_from(
    start: u64,
    mut chunks: Vec<(u64, u64, RepoKey)>,
) -> (Vec<(u64, u64)>, Vec<RepoKey>) {
    chunks.sort_by_key(|(s, e, _)| (*s, *e));
    let mut chain = Vec::new();
    let mut orphans = Vec::new();
    let mut at = start;
    for (s, e, key) in chunks {
        if s == at && e > s {
            chain.push((s, e));
            at = e;
        } else {
            orphans.push(key);
        }
    }
    (chain, orphans)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chunks_chain_from_the_snapshot_and_the_rest_are_orphans() {
        let id = GenerationId::parse("20261201T000000Z-0001").unwrap();
        let c = |s, e| (s, e, layout::redis_chunk(&id, s, e));
        let (chain, orphans) = chain_from(
            100,
            vec![
                c(300, 400),
                c(100, 200),
                c(200, 300),
                c(500, 600),
                c(150, 250),
            ],
        );
        assert_eq!(chain, vec![(100, 200), (200, 300), (300, 400)]);
        assert_eq!(
            orphans,
            vec![
                layout::redis_chunk(&id, 150, 250),
                layout::redis_chunk(&id, 500, 600)
            ]
        );
    }
}
