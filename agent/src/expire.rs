//! `syncbridge-agent expire --repo URL [--keep-full N] [--keep-within DUR] [--dry-run]`:
//! retention for PostgreSQL (base backups and the WAL before the oldest kept one) and Redis
//! (generations). The plan is [`crate::catalog::retention::plan`] over the catalog; this
//! module only carries it out, in an order a kill at any moment cannot turn into a lie.
//! For each expired backup (generation): an `expiring` tombstone
//! (`layout::base_backup_expiring`), then its `backup.json` (`generation.json`), so it is
//! never again listed as complete, then its data objects, the tombstone last; WAL after
//! every backup, oldest first.
//!
//! The next run finishes what a killed one left: a directory with a tombstone and no
//! manifest is removed whatever its age. A directory with neither (a failed backup or
//! snapshot) is removed only when it is older than every kept one and nothing was written
//! to it for a day, since a backup waiting for its WAL or overlapping another one looks the
//! same while it runs. Nothing newer than the newest backup is touched, so a running
//! stream's segment in progress, its deltas and the open Redis generation are never
//! candidates.
//!
//! A Redis Cluster capture keeps its shards' generations together, so a kept moment
//! restores on every shard (`expire_cluster`), and drops the slot maps replaced before the
//! oldest kept moment.
//!
//! Pinned backups and generations (`backup pin`) are kept whatever the policy; the pin is
//! read again just before a backup is made invisible, so a pin set during a run holds.
//!
//! Test hook: `SYNCBRIDGE_TEST_DELETE_DELAY_MS=N` makes every deletion of a backup's or a
//! generation's data objects wait N ms first, so the tests can kill -9 `expire` in the
//! middle of removing one (`tests/tests/expire_safety.rs`). Read only here; not for
//! production use.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use storage::layout::{self, BackupId, GenerationId, RepoKey};
use storage::{ContentKind, PutMode, RepoKind, Repository};

use crate::catalog::pg::{Backup, PgCatalog};
use crate::catalog::redis::RedisCatalog;
use crate::catalog::retention::{
    cluster_keep_from, cluster_oldest_kept, plan, wal_to_expire, Candidate, Plan, Policy,
};
use crate::cli::RepoArgs;
use crate::pg::backup_progress::human;
use crate::redis::cluster_stream::{shard_repo, ClusterCatalog};

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
    apply(&repo, &policy, args.dry_run).await?;
    Ok(ExitCode::SUCCESS)
}

/// Applies `policy` to `repo` now (what `expire` and `run`'s retention do): prints the plan,
/// then, unless `dry_run`, carries it out.
pub async fn apply(repo: &Repository, policy: &Policy, dry_run: bool) -> Result<()> {
    let Some(marker) = repo.read_marker().await? else {
        bail!("{} is not a SyncBridge repository (no marker)", repo.url());
    };
    let now = Utc::now();
    match marker.kind {
        RepoKind::Postgres => expire_pg(repo, policy, now, dry_run).await,
        RepoKind::Redis => expire_redis(repo, policy, now, dry_run).await,
    }
}

fn print_plan(p: &Plan, what: &str, stored: impl Fn(&str) -> u64) {
    for (id, why) in p.keep.iter().zip(&p.reasons) {
        crate::util::output::say(format!("keep    {what} {id} ({why})"));
    }
    for id in &p.expire {
        crate::util::output::say(format!(
            "expire  {what} {id} ({} stored)",
            human(stored(id))
        ));
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
        crate::util::output::say(format!(
            "no complete base backup in {}: nothing to expire",
            repo.url()
        ));
        return Ok(());
    }
    let candidates: Vec<Candidate> = backups
        .iter()
        .map(|b| Candidate {
            id: b.id.to_string(),
            restorable_from: b.stop_time,
            pinned: b.pinned,
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
    let size = cat.segment_size;
    // WAL before the oldest remaining backup's start restores nothing that is kept.
    let wal_for = |expired: &[String]| {
        let remaining: Vec<&Backup> = backups
            .iter()
            .filter(|b| !expired.iter().any(|e| e == b.id.as_str()))
            .collect();
        let oldest = remaining
            .iter()
            .min_by_key(|b| b.start)
            .map(|b| b.id.clone());
        wal_to_expire(&cat.wal, remaining.iter().map(|b| b.start), size)
            .map(|(cut, keys)| (cut.zip(oldest), keys))
    };
    let (cutoff, mut wal) = wal_for(&p.expire)?;
    let oldest_kept_id = p.keep.iter().min().cloned();
    let complete: BTreeSet<String> = backups.iter().map(|b| b.id.to_string()).collect();
    let found = Found {
        complete: &complete,
        incomplete: cat
            .backups
            .incomplete
            .iter()
            .map(|i| (i.to_string(), cat.backups.last_write.get(i).copied()))
            .collect(),
        expiring: cat.backups.expiring.iter().map(|i| i.to_string()).collect(),
    };
    let orphans = leftovers(Engine::Postgres, &found, &p, oldest_kept_id.as_deref(), now)?;
    if let Some((cut, id)) = &cutoff {
        crate::util::output::say(format!(
            "expire  {} WAL objects before segment number {cut:X} (the start of backup {id}); history files are kept",
            wal.len()
        ));
    }
    let freed: u64 = p.expire.iter().map(|id| stored(id)).sum();
    crate::util::output::say(format!(
        "{}: {} backups kept, {} expired ({} of backups), {} WAL objects",
        if dry { "dry run" } else { "plan" },
        p.keep.len(),
        p.expire.len(),
        human(freed),
        wal.len()
    ));
    if dry {
        return Ok(());
    }
    let expired = remove_expired(repo, Engine::Postgres, &p).await?;
    finish_leftovers(repo, Engine::Postgres, &orphans).await?;
    if expired.len() < p.expire.len() {
        // A backup pinned while expire ran stays, and so does the WAL it restores with.
        let (_, keys) = wal_for(&expired)?;
        crate::util::output::say(format!(
            "keep    {} more WAL objects for the backups pinned while expire ran",
            wal.len().saturating_sub(keys.len())
        ));
        wal = keys;
    }
    for k in &wal {
        repo.delete(k)
            .await
            .with_context(|| format!("deleting {k}"))?;
    }
    crate::util::output::say(format!(
        "expired {} backups and {} WAL objects",
        expired.len(),
        wal.len()
    ));
    Ok(())
}

/// Whether `pin` exists now (a pin set after the plan was made still keeps the backup).
async fn pinned_now(repo: &Repository, pin: &RepoKey) -> Result<bool> {
    repo.exists(pin)
        .await
        .with_context(|| format!("reading {pin}"))
}

/// The test hook's delay before each data deletion (see the module docs).
fn test_delete_delay() -> Option<std::time::Duration> {
    std::env::var("SYNCBRIDGE_TEST_DELETE_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// Deletes every object under `prefix`, `last` (the tombstone) after all the others.
async fn remove_prefix(repo: &Repository, prefix: &RepoKey, last: &RepoKey) -> Result<()> {
    let objects = repo
        .list(prefix)
        .await
        .with_context(|| format!("listing {prefix}"))?;
    let delay = test_delete_delay();
    for o in objects.iter().filter(|o| &o.key != last) {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        repo.delete(&o.key)
            .await
            .with_context(|| format!("deleting {}", o.key))?;
    }
    repo.delete(last)
        .await
        .with_context(|| format!("deleting {last}"))
}

async fn expire_redis(
    repo: &Repository,
    policy: &Policy,
    now: DateTime<Utc>,
    dry: bool,
) -> Result<()> {
    let clustered = ClusterCatalog::load(repo).await?;
    if clustered.is_cluster() {
        return expire_cluster(repo, &clustered, policy, now, dry).await;
    }
    let cat = RedisCatalog::load(repo).await?;
    if cat.generations.is_empty() {
        crate::util::output::say(format!(
            "no generation in {}: nothing to expire",
            repo.url()
        ));
        return Ok(());
    }
    let mut candidates = Vec::new();
    for g in &cat.generations {
        candidates.push(Candidate {
            id: g.id.as_str().to_string(),
            restorable_from: DateTime::from_timestamp_millis(g.manifest.snapshot_unix_ms)
                .context("snapshot time out of range")?,
            pinned: g.pinned,
        });
    }
    let p = plan(&candidates, policy, now);
    carry_out_redis(repo, &cat, p, now, dry, "generation").await?;
    Ok(())
}

/// The earliest moment a Redis repository restores to: its oldest snapshot; for a cluster
/// capture the latest of the shards' oldest snapshots (every shard restores from there on),
/// `None` while a shard has none.
pub async fn redis_first_recoverable(repo: &Repository) -> Result<Option<DateTime<Utc>>> {
    let clustered = ClusterCatalog::load(repo).await?;
    let ms = if clustered.is_cluster() {
        let mut latest: Option<i64> = None;
        for key in clustered.shards.keys() {
            let cat = RedisCatalog::load(&shard_repo(repo, key)?).await?;
            let Some(g) = cat.generations.first() else {
                return Ok(None);
            };
            latest = Some(latest.map_or(g.manifest.snapshot_unix_ms, |l| {
                l.max(g.manifest.snapshot_unix_ms)
            }));
        }
        latest
    } else {
        RedisCatalog::load(repo)
            .await?
            .generations
            .first()
            .map(|g| g.manifest.snapshot_unix_ms)
    };
    Ok(ms.and_then(DateTime::from_timestamp_millis))
}

/// Retention of a Redis Cluster capture (`docs/design/redis-cluster.md`, "Retention and
/// verify"): the policy gives the oldest moment to keep restorable on every shard
/// ([`cluster_oldest_kept`]); each shard keeps its generation that restores that moment and
/// every newer one ([`cluster_keep_from`]), plus its pinned ones; then slot-map records
/// older than that moment go, except the one in effect at it.
async fn expire_cluster(
    repo: &Repository,
    clustered: &ClusterCatalog,
    policy: &Policy,
    now: DateTime<Utc>,
    dry: bool,
) -> Result<()> {
    let mut shards = Vec::new();
    for key in clustered.shards.keys() {
        let view = shard_repo(repo, key)?;
        let cat = RedisCatalog::load(&view)
            .await
            .with_context(|| format!("reading shard {key}"))?;
        shards.push((key.clone(), view, cat));
    }
    let times: Vec<Vec<i64>> = shards
        .iter()
        .map(|(_, _, c)| {
            c.generations
                .iter()
                .map(|g| g.manifest.snapshot_unix_ms)
                .collect()
        })
        .collect();
    let Some(oldest) = cluster_oldest_kept(&times, policy, now) else {
        crate::util::output::say(format!(
            "no generation in the cluster capture {}: nothing to expire",
            repo.url()
        ));
        return Ok(());
    };
    let oldest_text = crate::redis::restore::describe_time(oldest);
    crate::util::output::say(format!(
        "cluster: every shard keeps what restores {oldest_text} and later"
    ));
    let (mut kept, mut expired) = (0, 0);
    // Slot maps stay from the oldest moment a kept generation restores: a pinned one older
    // than `oldest` keeps the map of its time.
    let mut maps_from = oldest;
    for ((key, view, cat), snaps) in shards.iter().zip(&times) {
        let from = cluster_keep_from(snaps, oldest);
        let mut p = Plan {
            keep: Vec::new(),
            expire: Vec::new(),
            reasons: Vec::new(),
        };
        for (i, g) in cat.generations.iter().enumerate() {
            let id = g.id.to_string();
            if i == from {
                p.keep.push(id);
                p.reasons
                    .push("restores the oldest kept moment on this shard");
            } else if i > from {
                p.keep.push(id);
                p.reasons.push("newer than the oldest kept moment");
            } else if g.pinned {
                p.keep.push(id);
                p.reasons.push("pinned");
                maps_from = maps_from.min(g.manifest.snapshot_unix_ms);
            } else {
                p.expire.push(id);
            }
        }
        let (k, e) = carry_out_redis(view, cat, p, now, dry, &format!("shard {key} generation"))
            .await
            .with_context(|| format!("expiring shard {key}"))?;
        kept += k;
        expired += e;
    }
    // Slot maps: those before the oldest kept moment, except the one in effect at it.
    let in_effect = clustered
        .slot_maps
        .iter()
        .rposition(|r| i64::try_from(r.effective_unix_ms).unwrap_or(i64::MAX) <= maps_from);
    let old_maps: Vec<RepoKey> = match in_effect {
        Some(i) => clustered.slot_maps[..i]
            .iter()
            .map(|r| layout::redis_slot_map(r.effective_unix_ms))
            .collect(),
        None => Vec::new(),
    };
    for key in &old_maps {
        crate::util::output::say(format!(
            "expire  slot map {key} (replaced before {})",
            crate::redis::restore::describe_time(maps_from)
        ));
    }
    crate::util::output::say(format!(
        "{}: {} shards, {kept} generations kept, {expired} expired, {} slot maps expired",
        if dry { "dry run" } else { "done" },
        shards.len(),
        old_maps.len()
    ));
    if dry {
        return Ok(());
    }
    for key in &old_maps {
        repo.delete(key)
            .await
            .with_context(|| format!("deleting {key}"))?;
    }
    Ok(())
}

/// Carries out plan `p` for the generations of `cat` in `repo` (the repository, or one
/// shard's view): generations the stream is still writing are kept whatever the plan,
/// leftovers of interrupted runs are finished. `what` names a generation in the output.
/// Returns (kept, expired).
async fn carry_out_redis(
    repo: &Repository,
    cat: &RedisCatalog,
    mut p: Plan,
    now: DateTime<Utc>,
    dry: bool,
    what: &str,
) -> Result<(usize, usize)> {
    let facts: Vec<GenFacts> = cat
        .generations
        .iter()
        .map(|g| GenFacts {
            end_offset: g.end_offset(),
            snapshot_offset: g.manifest.snapshot_offset,
            snapshot_ms: g.manifest.snapshot_unix_ms,
            last_write_ms: g.last_write.map(|t| t.timestamp_millis()),
        })
        .collect();
    for i in still_written(&facts, now.timestamp_millis()) {
        let id = cat.generations[i].id.as_str();
        if let Some(at) = p.expire.iter().position(|x| x == id) {
            p.expire.remove(at);
            let at = p
                .keep
                .iter()
                .position(|k| k.as_str() > id)
                .unwrap_or(p.keep.len());
            p.keep.insert(at, id.to_string());
            p.reasons.insert(
                at,
                "still being written: the stream has not reached the next snapshot's offset",
            );
        }
    }
    let stored = |id: &str| {
        cat.generations
            .iter()
            .find(|g| g.id.as_str() == id)
            .map_or(0, |g| g.stored_bytes)
    };
    print_plan(&p, what, stored);
    let oldest_kept = p.keep.iter().min().cloned();
    let complete: BTreeSet<String> = cat.generations.iter().map(|g| g.id.to_string()).collect();
    let found = Found {
        complete: &complete,
        incomplete: cat
            .incomplete
            .iter()
            .map(|i| (i.to_string(), cat.last_write.get(i).copied()))
            .collect(),
        expiring: cat.expiring.iter().map(|i| i.to_string()).collect(),
    };
    let orphans = leftovers(Engine::Redis, &found, &p, oldest_kept.as_deref(), now)?;
    let freed: u64 = p.expire.iter().map(|id| stored(id)).sum();
    crate::util::output::say(format!(
        "{}: {} generations kept, {} expired ({})",
        if dry { "dry run" } else { "plan" },
        p.keep.len(),
        p.expire.len(),
        human(freed)
    ));
    if dry {
        return Ok((p.keep.len(), p.expire.len()));
    }
    let expired = remove_expired(repo, Engine::Redis, &p).await?;
    finish_leftovers(repo, Engine::Redis, &orphans).await?;
    crate::util::output::say(format!("expired {} generations", expired.len()));
    Ok((p.keep.len(), expired.len()))
}

/// How long an incomplete backup or generation directory without a tombstone must have been
/// left unwritten before `expire` calls it failed and removes it: a backup waiting for its
/// WAL (`--wal-timeout`) or one overlapping another is still being written.
const STALE_INCOMPLETE: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// What [`still_written`] needs of one generation.
#[derive(Debug, Clone, Copy)]
struct GenFacts {
    /// Where its stored stream ends.
    end_offset: u64,
    /// Its snapshot's offset.
    snapshot_offset: u64,
    /// When its snapshot was taken (Unix ms).
    snapshot_ms: i64,
    /// When its newest object was stored (Unix ms).
    last_write_ms: Option<i64>,
}

/// Generations (indexes, oldest first) that `redis stream` may still be writing although a
/// newer one exists: after it stores the next snapshot the stream goes on appending to the
/// old generation until that one's stream reaches the new snapshot's offset
/// (`redis/stream.rs`, "switched to the new generation"). Such a generation's chain ends
/// before the next snapshot's offset and it was written after that snapshot began; a
/// one-shot `redis snapshot` generation never is (nothing writes it after its manifest),
/// and one left like that by a killed stream stops counting once unwritten for
/// [`STALE_INCOMPLETE`].
fn still_written(gens: &[GenFacts], now_ms: i64) -> Vec<usize> {
    let stale = STALE_INCOMPLETE.num_milliseconds();
    gens.windows(2)
        .enumerate()
        .filter(|(_, w)| {
            let (g, next) = (w[0], w[1]);
            g.end_offset < next.snapshot_offset
                && g.last_write_ms
                    .is_some_and(|t| t >= next.snapshot_ms && now_ms - t < stale)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Which kind of repository: the keys of one backup (PostgreSQL) or generation (Redis).
#[derive(Clone, Copy)]
enum Engine {
    Postgres,
    Redis,
}

impl Engine {
    fn what(self) -> &'static str {
        match self {
            Engine::Postgres => "backup",
            Engine::Redis => "generation",
        }
    }

    /// (prefix, manifest, tombstone, pin) of `id`.
    fn keys(self, id: &str) -> Result<(RepoKey, RepoKey, RepoKey, RepoKey)> {
        Ok(match self {
            Engine::Postgres => {
                let id = BackupId::parse(id)?;
                (
                    layout::base_backup_prefix(&id),
                    layout::base_backup_manifest(&id),
                    layout::base_backup_expiring(&id),
                    layout::base_backup_pin(&id),
                )
            }
            Engine::Redis => {
                let id = GenerationId::parse(id)?;
                (
                    layout::redis_generation_prefix(&id),
                    layout::redis_generation_manifest(&id),
                    layout::redis_generation_expiring(&id),
                    layout::redis_generation_pin(&id),
                )
            }
        })
    }

    fn content(self) -> ContentKind {
        match self {
            Engine::Postgres => ContentKind::BaseBackupManifest,
            Engine::Redis => ContentKind::RedisManifest,
        }
    }
}

/// What the catalog listed, by id.
struct Found<'a> {
    complete: &'a BTreeSet<String>,
    /// Incomplete ids with the store time of their newest object.
    incomplete: BTreeMap<String, Option<DateTime<Utc>>>,
    expiring: BTreeSet<String>,
}

/// A directory to finish removing.
struct Leftover {
    id: String,
    /// Its tombstone to delete last, or a stale tombstone beside a kept manifest.
    only_tombstone: bool,
}

/// What the next steps remove besides the plan: directories an interrupted expire left
/// (a tombstone, no manifest: whatever the age), failed backups or snapshots (no manifest,
/// no tombstone, older than every kept one and unwritten for [`STALE_INCOMPLETE`]), and
/// stale tombstones beside a manifest the plan keeps (the run that wrote them was killed
/// before it removed anything).
fn leftovers(
    engine: Engine,
    found: &Found<'_>,
    p: &Plan,
    oldest_kept: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Leftover>> {
    let what = engine.what();
    let mut out = Vec::new();
    for id in &found.expiring {
        if !found.complete.contains(id) {
            crate::util::output::say(format!(
                "remove  {id} (left by an interrupted expire: no manifest, a tombstone)"
            ));
            out.push(Leftover {
                id: id.clone(),
                only_tombstone: false,
            });
        } else if p.keep.contains(id) {
            crate::util::output::say(format!(
                "keep    {what} {id} (an interrupted expire had only marked it; unmarking)"
            ));
            out.push(Leftover {
                id: id.clone(),
                only_tombstone: true,
            });
        }
    }
    for (id, newest) in &found.incomplete {
        if found.expiring.contains(id) || oldest_kept.is_none_or(|k| id.as_str() >= k) {
            continue;
        }
        match newest {
            Some(t) if now - *t >= STALE_INCOMPLETE => {
                crate::util::output::say(format!(
                    "remove  {id} (incomplete and unwritten since {}: a failed {what})",
                    crate::pg::backup_manifest::format_time(*t)
                ));
                out.push(Leftover {
                    id: id.clone(),
                    only_tombstone: false,
                });
            }
            _ => crate::util::output::say(format!(
                "leave   {id} (incomplete, written to within {}h: may still be in progress)",
                STALE_INCOMPLETE.num_hours()
            )),
        }
    }
    Ok(out)
}

/// Removes the plan's expired backups or generations, each in the order a kill cannot
/// turn into a lie: the tombstone, the manifest (invisible from here on), the data, the
/// tombstone last. A pin set since the plan was made keeps one. Returns the ids removed.
async fn remove_expired(repo: &Repository, engine: Engine, p: &Plan) -> Result<Vec<String>> {
    let what = engine.what();
    let mut expired = Vec::new();
    for id in &p.expire {
        let (prefix, manifest, tombstone, pin) = engine.keys(id)?;
        if pinned_now(repo, &pin).await? {
            crate::util::output::say(format!("keep    {what} {id} (pinned while expire ran)"));
            continue;
        }
        let record = serde_json::json!({
            "expiring_since": crate::pg::backup_manifest::format_time(Utc::now()),
        });
        repo.put(
            &tombstone,
            engine.content(),
            bytes::Bytes::from(record.to_string()),
            PutMode::Overwrite,
        )
        .await
        .with_context(|| format!("writing {tombstone}"))?;
        repo.delete(&manifest)
            .await
            .with_context(|| format!("deleting {manifest}"))?;
        remove_prefix(repo, &prefix, &tombstone).await?;
        expired.push(id.clone());
    }
    Ok(expired)
}

/// Finishes what [`leftovers`] found.
async fn finish_leftovers(repo: &Repository, engine: Engine, left: &[Leftover]) -> Result<()> {
    for l in left {
        let (prefix, _, tombstone, _) = engine.keys(&l.id)?;
        if l.only_tombstone {
            repo.delete(&tombstone)
                .await
                .with_context(|| format!("deleting {tombstone}"))?;
        } else {
            remove_prefix(repo, &prefix, &tombstone).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(end: u64, snap: u64, snap_ms: i64, last: i64) -> GenFacts {
        GenFacts {
            end_offset: end,
            snapshot_offset: snap,
            snapshot_ms: snap_ms,
            last_write_ms: Some(last),
        }
    }

    #[test]
    fn a_generation_is_open_until_its_stream_reaches_the_next_snapshot() {
        let now = 10_000_000;
        // One-shot snapshots: no chunks, nothing written after the next one began.
        let shots = [g(100, 100, 1_000, 1_050), g(300, 300, 2_000, 2_050)];
        assert!(still_written(&shots, now).is_empty());
        // A stream that switched: the old chain reaches the new snapshot's offset.
        let switched = [g(500, 100, 1_000, 9_000), g(500, 500, 8_000, 9_500)];
        assert!(still_written(&switched, now).is_empty());
        // Switching: the old chain is short of it and was written after it began.
        let switching = [g(450, 100, 1_000, 9_000), g(500, 500, 8_000, 9_500)];
        assert_eq!(still_written(&switching, now), [0]);
        // Left like that by a killed stream a day ago: no longer open.
        let day = STALE_INCOMPLETE.num_milliseconds();
        assert!(still_written(&switching, 9_000 + day).is_empty());
        // The newest is never in the list (the plan always keeps it).
        assert!(still_written(&switching[1..], now).is_empty());
    }
}
