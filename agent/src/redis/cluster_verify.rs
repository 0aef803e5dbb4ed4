//! The records of a Redis Cluster capture, checked by `verify` and `redis verify`
//! (`docs/design/redis-cluster.md`, "Retention and verify"): every shard directory is a
//! lineage key with a readable `shard.json` naming itself; every slot-map record decodes
//! (`SlotMapRecord::decode` accepts only the canonical form), sits under the key of its
//! effective time (so times strictly increase in key order), covers all 16384 slots, and
//! names only shards the repository holds, each with a complete generation. The shards'
//! generations are checked by the single-server checks on each shard's view.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use storage::layout::{self, RepoKey, ShardKey};
use storage::Repository;
use wire::redis::cluster::SlotMapRecord;

use super::cluster_stream::ShardRecord;

/// What [`check_records`] found.
#[derive(Debug, Default)]
pub struct RecordsCheck {
    /// Every shard directory that is a lineage key, in order.
    pub shards: Vec<ShardKey>,
    /// Slot-map records listed.
    pub slot_maps: usize,
    /// Problems: (the object's full key, what is wrong).
    pub problems: Vec<(RepoKey, String)>,
}

/// Whether `repo` holds a cluster capture (a shard or a slot map), by listing.
pub async fn holds_cluster(repo: &Repository) -> Result<bool> {
    Ok(!repo
        .list_dirs(&layout::redis_cluster_shards_prefix())
        .await
        .context("listing the cluster's shards")?
        .is_empty()
        || !repo
            .list(&layout::redis_slot_maps_prefix())
            .await
            .context("listing the slot maps")?
            .is_empty())
}

/// Checks the shard records and the slot-map history. `generations` gives each shard's
/// complete generations (a shard missing from it has none).
pub async fn check_records(
    repo: &Repository,
    generations: &BTreeMap<ShardKey, usize>,
) -> Result<RecordsCheck> {
    let mut out = RecordsCheck::default();
    for dir in repo
        .list_dirs(&layout::redis_cluster_shards_prefix())
        .await
        .context("listing the cluster's shards")?
    {
        let Some(shard) = layout::parse_redis_cluster_shard(&dir) else {
            out.problems.push((
                dir.clone(),
                "not a shard of the capture: shard directories are named s01, s02, ...".into(),
            ));
            continue;
        };
        let view = repo.scoped(&dir)?;
        let key = view.full_key(&layout::redis_shard_record());
        match view.get(&layout::redis_shard_record()).await {
            Ok(data) => match serde_json::from_slice::<ShardRecord>(&data) {
                Ok(r) if r.shard == shard.as_str() => {}
                Ok(r) => out.problems.push((
                    key,
                    format!("names shard {:?}, not {shard}", r.shard),
                )),
                Err(e) => out
                    .problems
                    .push((key, format!("is not a shard record: {e}"))),
            },
            Err(e) if e.is_not_found() => out.problems.push((
                key,
                format!("missing: shard {shard} has no record (the agent writes it before the shard's first snapshot)"),
            )),
            // Unreadable objects are reported by the object pass, by key.
            Err(_) => {}
        }
        out.shards.push(shard);
    }
    let mut previous: Option<u64> = None;
    for meta in repo
        .list(&layout::redis_slot_maps_prefix())
        .await
        .context("listing the slot maps")?
    {
        out.slot_maps += 1;
        let key = meta.key;
        let Some(ms) = layout::parse_redis_slot_map(&key) else {
            out.problems.push((
                key,
                "not a slot-map key (redis/cluster/slotmap/<20-digit Unix ms>)".into(),
            ));
            continue;
        };
        if previous.is_some_and(|p| ms <= p) {
            out.problems.push((
                key.clone(),
                "its time does not follow the previous record's".into(),
            ));
        }
        previous = Some(ms);
        let data = match repo.get(&key).await {
            Ok(d) => d,
            // Reported by the object pass (damaged), or gone since the listing (expire).
            Err(_) => continue,
        };
        let record = match SlotMapRecord::decode(&data) {
            Ok(r) => r,
            Err(e) => {
                out.problems
                    .push((key, format!("is not a canonical slot-map record: {e}")));
                continue;
            }
        };
        if record.effective_unix_ms != ms {
            out.problems.push((
                key.clone(),
                format!(
                    "says it took effect at {} ms, not at the time of its key",
                    record.effective_unix_ms
                ),
            ));
        }
        if let Err(e) = record.map.check_complete() {
            out.problems
                .push((key.clone(), format!("does not cover every slot: {e}")));
        }
        for owner in record.map.owners() {
            let known = ShardKey::parse(owner)
                .ok()
                .filter(|k| out.shards.contains(k));
            match known {
                None => out.problems.push((
                    key.clone(),
                    format!("gives slots to shard {owner:?}, which the repository does not hold"),
                )),
                Some(k) if generations.get(&k).copied().unwrap_or(0) == 0 => out.problems.push((
                    key.clone(),
                    format!("gives slots to shard {k}, which holds no complete generation: its slots cannot be restored"),
                )),
                Some(_) => {}
            }
        }
    }
    Ok(out)
}
