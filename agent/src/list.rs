//! `syncbridge-agent list --repo URL [--output text|json]`: what a repository can restore.
//! For PostgreSQL each base backup with its WAL range and times, the archived WAL per
//! timeline with any holes, and the restorable range; for Redis each generation with its
//! snapshot, command stream and times, and for a Redis Cluster capture each shard with its
//! masters and generations and the slot-map history. Read through the catalog
//! ([`crate::catalog`]).
//!
//! The JSON (`--output json`) is a versioned schema for scripts and monitoring, documented
//! in `docs/list-json.md`; `schema` names its version and only grows compatibly within it.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use serde::Serialize;
use storage::{RepoKind, Repository};
use wire::pg::{Lsn, SegmentName, TimelineId};

use crate::catalog::pg::PgCatalog;
use crate::catalog::redis::RedisCatalog;
use crate::cli::RepoArgs;
use crate::pg::backup_manifest::format_time;
use crate::pg::backup_progress::human;
use crate::redis::cluster_stream::{shard_repo, ClusterCatalog};

/// The version of the JSON `list` prints.
pub const LIST_SCHEMA: &str = "syncbridge.list/1";

/// How `list` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts: one JSON document (schema in docs/list-json.md).
    Json,
}

/// Arguments of `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// text for people, json for scripts and monitoring (a versioned schema,
    /// docs/list-json.md).
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

/// Runs `list`.
pub fn run(args: ListArgs) -> Result<ExitCode> {
    crate::cli::block_on(list(args))
}

/// Everything `list` reports.
#[derive(Debug, Serialize)]
pub struct ListReport {
    /// [`LIST_SCHEMA`].
    pub schema: &'static str,
    /// The repository.
    pub repository: RepoFacts,
    /// The first and last moment a restore can reach (`null` when nothing is restorable).
    pub restorable: Option<Restorable>,
    /// PostgreSQL contents (`null` in a Redis repository).
    pub postgres: Option<PgReport>,
    /// Redis contents (`null` in a PostgreSQL repository).
    pub redis: Option<RedisReport>,
}

/// What the marker says.
#[derive(Debug, Serialize)]
pub struct RepoFacts {
    /// The URL (no credentials are ever part of it).
    pub url: String,
    /// `postgres` or `redis`.
    pub kind: &'static str,
    /// The marker's random id (absent in repositories made before it existed).
    pub repository_id: Option<String>,
    /// Whether objects are encrypted.
    pub encrypted: bool,
    /// PostgreSQL's `system_identifier`.
    pub system_identifier: Option<String>,
}

/// The restorable range.
#[derive(Debug, Serialize)]
pub struct Restorable {
    /// Earliest moment: the end of the oldest complete backup (PostgreSQL) or the oldest
    /// snapshot (Redis).
    pub first_time: DateTime<Utc>,
    /// Latest moment known without reading WAL or chunks: when the newest WAL or chunk
    /// object was stored.
    pub last_time: Option<DateTime<Utc>>,
    /// PostgreSQL: the first restorable LSN (end of the oldest backup).
    pub first_lsn: Option<String>,
    /// PostgreSQL: where the WAL stored without a hole after the newest backup ends.
    pub last_lsn: Option<String>,
    /// PostgreSQL: the timeline `last_lsn` is on.
    pub timeline: Option<u32>,
    /// PostgreSQL: the stretches restorable without a hole, by timeline and LSN (a hole
    /// in the WAL ends one; the next backup after it begins the next). `null` for Redis.
    pub spans: Option<Vec<Span>>,
}

/// A stretch a PostgreSQL restore reaches without a hole.
#[derive(Debug, Serialize)]
pub struct Span {
    /// The timeline of its backups.
    pub timeline: u32,
    /// The end of its oldest backup.
    pub from_lsn: String,
    /// When that backup ended: its earliest moment.
    pub from_time: DateTime<Utc>,
    /// The first LSN after it that is not restorable.
    pub to_lsn: String,
}

/// PostgreSQL contents.
#[derive(Debug, Serialize)]
pub struct PgReport {
    /// Complete base backups, oldest first.
    pub backups: Vec<PgBackup>,
    /// Backup ids with data but no `backup.json` (in progress, failed, or waiting for WAL).
    pub incomplete_backups: Vec<String>,
    /// Archived WAL per timeline.
    pub wal: Vec<PgTimeline>,
    /// Keys under `postgres/conflicts/`: WAL the stream received that differs from what
    /// was stored (kept for comparison, never restored from). Empty in a healthy repository.
    pub wal_conflicts: Vec<String>,
}

/// One complete base backup.
#[derive(Debug, Serialize)]
pub struct PgBackup {
    /// Its id.
    pub id: String,
    /// Start and stop (server time).
    pub start_time: DateTime<Utc>,
    /// When the backup ended: the earliest moment it restores to.
    pub stop_time: DateTime<Utc>,
    /// WAL range.
    pub start_lsn: String,
    /// End of the WAL the backup needs.
    pub stop_lsn: String,
    /// Timeline at start.
    pub timeline: u32,
    /// Bytes of the files.
    pub size_bytes: u64,
    /// Bytes stored (compressed).
    pub stored_bytes: u64,
    /// `server_version`.
    pub server_version: String,
    /// Tablespaces: oid and recorded location.
    pub tablespaces: Vec<PgTablespace>,
    /// Pinned (`backup pin`): `expire` never removes it.
    pub pinned: bool,
}

/// A tablespace of a backup.
#[derive(Debug, Serialize)]
pub struct PgTablespace {
    /// Its oid.
    pub oid: Option<u32>,
    /// Where it was on the source.
    pub location: Option<String>,
}

/// The archived WAL of one timeline.
#[derive(Debug, Serialize)]
pub struct PgTimeline {
    /// Timeline id.
    pub timeline: u32,
    /// First and last segment names.
    pub first_segment: String,
    /// Segment holding the newest WAL.
    pub last_segment: String,
    /// First stored LSN.
    pub start_lsn: String,
    /// End of the newest stored WAL.
    pub end_lsn: String,
    /// Complete segments.
    pub segments: usize,
    /// Whether a segment in progress (deltas) is stored.
    pub in_progress: bool,
    /// Missing stretches.
    pub holes: Vec<PgHole>,
}

/// A hole in the WAL.
#[derive(Debug, Serialize)]
pub struct PgHole {
    /// First missing byte.
    pub from_lsn: String,
    /// First byte present again.
    pub to_lsn: String,
    /// Missing segments.
    pub first_segment: String,
    /// Last missing segment.
    pub last_segment: String,
}

/// Redis contents.
#[derive(Debug, Serialize)]
pub struct RedisReport {
    /// Generations with a manifest, oldest first.
    pub generations: Vec<RedisGeneration>,
    /// Generation ids without a manifest (in progress, or failed).
    pub incomplete_generations: Vec<String>,
    /// A Redis Cluster capture (`null` for a single server).
    pub cluster: Option<RedisClusterReport>,
}

/// A Redis Cluster capture: every shard and the slot-map history.
#[derive(Debug, Serialize)]
pub struct RedisClusterReport {
    /// Every shard, by key (`s01`, ...).
    pub shards: Vec<RedisShard>,
    /// Every slot-map record, oldest first.
    pub slot_maps: Vec<RedisSlotMap>,
}

/// One shard (a lineage: it survives failovers) of a cluster capture.
#[derive(Debug, Serialize)]
pub struct RedisShard {
    /// Its key (`s01`): `redis restore --shard`, `redis verify --shard`.
    pub shard: String,
    /// Its slots in the newest slot map (`""` when it owns none now).
    pub slots: String,
    /// How many.
    pub slot_count: usize,
    /// Shard ids the cluster gave it (Valkey, Redis 7.2+).
    pub shard_ids: Vec<String>,
    /// The masters that served it, oldest first (a failover adds one).
    pub masters: Vec<RedisShardMaster>,
    /// Its generations, as for a single server.
    pub generations: Vec<RedisGeneration>,
    /// Its generation ids without a manifest.
    pub incomplete_generations: Vec<String>,
}

/// A master that served a shard.
#[derive(Debug, Serialize)]
pub struct RedisShardMaster {
    /// Cluster node id.
    pub node_id: String,
    /// `host:port`.
    pub address: String,
    /// When the agent first saw it serve the shard.
    pub since: DateTime<Utc>,
}

/// A slot map and when it took effect.
#[derive(Debug, Serialize)]
pub struct RedisSlotMap {
    /// When the agent saw it take effect (at most one topology poll late).
    pub effective_time: DateTime<Utc>,
    /// Maximal runs of slots with their shard, ascending.
    pub ranges: Vec<RedisSlotRange>,
    /// Whether every one of the 16384 slots has a shard.
    pub complete: bool,
}

/// Slots owned by one shard.
#[derive(Debug, Serialize)]
pub struct RedisSlotRange {
    /// `start-end`.
    pub slots: String,
    /// The shard.
    pub shard: String,
}

/// One Redis generation.
#[derive(Debug, Serialize)]
pub struct RedisGeneration {
    /// Its id.
    pub id: String,
    /// The master (`host:port`).
    pub source: String,
    /// Replication id of the full sync.
    pub replication_id: String,
    /// Offset of the snapshot.
    pub snapshot_offset: u64,
    /// When the master took the snapshot.
    pub snapshot_time: DateTime<Utc>,
    /// Offset the stored command stream reaches.
    pub end_offset: u64,
    /// Chained command chunks.
    pub chunks: usize,
    /// Chunks off the chain (a gap or an overlap: `redis verify` names them).
    pub orphan_chunks: usize,
    /// RDB size.
    pub snapshot_bytes: u64,
    /// Bytes stored for the generation.
    pub stored_bytes: u64,
    /// Keys in the snapshot.
    pub keys: u64,
    /// When its newest object was stored.
    pub last_write: Option<DateTime<Utc>>,
    /// Pinned (`backup pin`): `expire` never removes it.
    pub pinned: bool,
}

async fn list(args: ListArgs) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let Some(marker) = repo.read_marker().await? else {
        bail!("{} is not a SyncBridge repository (no marker)", repo.url());
    };
    let facts = RepoFacts {
        url: repo.url().to_string(),
        kind: match marker.kind {
            RepoKind::Postgres => "postgres",
            RepoKind::Redis => "redis",
        },
        repository_id: marker.repository_id.clone(),
        encrypted: marker.encryption.is_some(),
        system_identifier: marker.system_identifier.clone(),
    };
    let report = match marker.kind {
        RepoKind::Postgres => pg_report(&repo, facts).await?,
        RepoKind::Redis => redis_report(&repo, facts).await?,
    };
    match args.output {
        Output::Json => {
            let text = serde_json::to_string_pretty(&report).context("encoding the list")?;
            println!("{text}");
        }
        Output::Text => print_text(&report),
    }
    Ok(ExitCode::SUCCESS)
}

async fn pg_report(repo: &Repository, facts: RepoFacts) -> Result<ListReport> {
    let cat = PgCatalog::load(repo).await?;
    let size = cat.segment_size;
    let backups = cat
        .backups
        .complete
        .iter()
        .map(|b| PgBackup {
            id: b.id.to_string(),
            start_time: b.start_time,
            stop_time: b.stop_time,
            start_lsn: b.start.to_string(),
            stop_lsn: b.stop.to_string(),
            timeline: b.timeline.get(),
            size_bytes: b.manifest.total_bytes,
            stored_bytes: b.manifest.stored_bytes,
            server_version: b.manifest.server_version.clone(),
            tablespaces: b
                .manifest
                .tablespaces
                .iter()
                .map(|t| PgTablespace {
                    oid: t.oid,
                    location: t.location.clone(),
                })
                .collect(),
            pinned: b.pinned,
        })
        .collect();
    let inv = &cat.wal;
    let mut wal = Vec::new();
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
            holes.push(PgHole {
                from_lsn: g.from.to_string(),
                to_lsn: g.to.to_string(),
                first_segment: g.first_segment.clone(),
                last_segment: g.last_segment.clone(),
            });
            if g.to <= g.from {
                break;
            }
            from = g.to;
        }
        wal.push(PgTimeline {
            timeline: tli.get(),
            first_segment: SegmentName::new(tli, first, size)?.to_string(),
            last_segment: SegmentName::from_lsn(tli, Lsn(end.0.saturating_sub(1)), size)
                .to_string(),
            start_lsn: start.to_string(),
            end_lsn: end.to_string(),
            segments: t.segments.len(),
            in_progress: !t.partials.is_empty(),
            holes,
        });
    }
    let spans: Vec<Span> = cat
        .restorable_spans()
        .into_iter()
        .map(|s| Span {
            timeline: s.timeline.get(),
            from_lsn: s.from_lsn.to_string(),
            from_time: s.from_time,
            to_lsn: s.to_lsn.to_string(),
        })
        .collect();
    let restorable = cat.restorable().map(|r| Restorable {
        first_time: r.first_time,
        last_time: r.last_time,
        first_lsn: Some(r.first_lsn.to_string()),
        last_lsn: Some(r.last_lsn.to_string()),
        timeline: Some(r.timeline.get()),
        spans: Some(spans),
    });
    Ok(ListReport {
        schema: LIST_SCHEMA,
        repository: facts,
        restorable,
        postgres: Some(PgReport {
            backups,
            incomplete_backups: cat
                .backups
                .incomplete
                .iter()
                .map(|i| i.as_str().to_string())
                .collect(),
            wal,
            wal_conflicts: cat.conflicts.iter().map(|k| k.to_string()).collect(),
        }),
        redis: None,
    })
}

fn redis_generations(cat: &RedisCatalog) -> Result<Vec<RedisGeneration>> {
    let mut generations = Vec::new();
    for g in &cat.generations {
        let m = &g.manifest;
        generations.push(RedisGeneration {
            id: g.id.as_str().to_string(),
            source: m.source.clone(),
            replication_id: m.replid.clone(),
            snapshot_offset: m.snapshot_offset,
            snapshot_time: DateTime::from_timestamp_millis(m.snapshot_unix_ms)
                .context("snapshot time out of range")?,
            end_offset: g.end_offset(),
            chunks: g.chain.len(),
            orphan_chunks: g.orphans.len(),
            snapshot_bytes: m.snapshot.size,
            stored_bytes: g.stored_bytes,
            keys: m.snapshot.keys_per_db.values().sum(),
            last_write: g.last_write,
            pinned: g.pinned,
        });
    }
    Ok(generations)
}

async fn redis_report(repo: &Repository, facts: RepoFacts) -> Result<ListReport> {
    let clustered = ClusterCatalog::load(repo).await?;
    if clustered.is_cluster() {
        return redis_cluster_report(repo, facts, clustered).await;
    }
    let cat = RedisCatalog::load(repo).await?;
    let generations = redis_generations(&cat)?;
    let restorable = cat.generations.first().and_then(|oldest| {
        Some(Restorable {
            first_time: DateTime::from_timestamp_millis(oldest.manifest.snapshot_unix_ms)?,
            last_time: cat.latest().and_then(|g| g.last_write),
            first_lsn: None,
            last_lsn: None,
            timeline: None,
            spans: None,
        })
    });
    Ok(ListReport {
        schema: LIST_SCHEMA,
        repository: facts,
        restorable,
        postgres: None,
        redis: Some(RedisReport {
            generations,
            incomplete_generations: cat
                .incomplete
                .iter()
                .map(|i| i.as_str().to_string())
                .collect(),
            cluster: None,
        }),
    })
}

/// A cluster capture. A moment is restorable once every shard of the first slot map has a
/// snapshot, and as long as every shard's stream reaches it: the restorable range is the
/// latest of the shards' first snapshots to the earliest of their newest chunks.
async fn redis_cluster_report(
    repo: &Repository,
    facts: RepoFacts,
    clustered: ClusterCatalog,
) -> Result<ListReport> {
    let newest = clustered.slot_maps.last().map(|r| &r.map);
    let mut shards = Vec::new();
    let mut first: Option<i64> = None;
    let mut last: Option<Option<DateTime<Utc>>> = None;
    let mut all_have_generations = true;
    for (key, record) in &clustered.shards {
        let cat = RedisCatalog::load(&shard_repo(repo, key)?).await?;
        let slots = newest.map(|m| m.slots_of(key.as_str())).unwrap_or_default();
        match cat.generations.first() {
            Some(oldest) if !slots.is_empty() => {
                let t = oldest.manifest.snapshot_unix_ms;
                first = Some(first.map_or(t, |f| f.max(t)));
                let newest_write = cat.latest().and_then(|g| g.last_write);
                last = Some(match last {
                    None => newest_write,
                    Some(prev) => prev.zip(newest_write).map(|(a, b)| a.min(b)),
                });
            }
            Some(_) => {}
            None if !slots.is_empty() => all_have_generations = false,
            None => {}
        }
        shards.push(RedisShard {
            shard: key.to_string(),
            slot_count: slots.slot_count(),
            slots: slots.to_string(),
            shard_ids: record.shard_ids.iter().cloned().collect(),
            masters: record
                .masters
                .iter()
                .map(|m| RedisShardMaster {
                    node_id: m.node_id.clone(),
                    address: m.address.clone(),
                    since: DateTime::from_timestamp_millis(m.since_unix_ms).unwrap_or_default(),
                })
                .collect(),
            generations: redis_generations(&cat)?,
            incomplete_generations: cat
                .incomplete
                .iter()
                .map(|i| i.as_str().to_string())
                .collect(),
        });
    }
    let first_map = clustered
        .slot_maps
        .first()
        .map(|r| r.effective_unix_ms as i64);
    let restorable = match (first, first_map) {
        (Some(f), Some(m)) if all_have_generations => Some(Restorable {
            first_time: DateTime::from_timestamp_millis(f.max(m)).unwrap_or_default(),
            last_time: last.flatten(),
            first_lsn: None,
            last_lsn: None,
            timeline: None,
            spans: None,
        }),
        _ => None,
    };
    let slot_maps = clustered
        .slot_maps
        .iter()
        .map(|r| RedisSlotMap {
            effective_time: DateTime::from_timestamp_millis(r.effective_unix_ms as i64)
                .unwrap_or_default(),
            ranges: r
                .map
                .ranges()
                .into_iter()
                .map(|(range, owner)| RedisSlotRange {
                    slots: range.to_string(),
                    shard: owner.to_owned(),
                })
                .collect(),
            complete: r.map.check_complete().is_ok(),
        })
        .collect();
    Ok(ListReport {
        schema: LIST_SCHEMA,
        repository: facts,
        restorable,
        postgres: None,
        redis: Some(RedisReport {
            generations: Vec::new(),
            incomplete_generations: Vec::new(),
            cluster: Some(RedisClusterReport { shards, slot_maps }),
        }),
    })
}

fn print_generation(indent: &str, g: &RedisGeneration) {
    println!(
        "{indent}{}  snapshot {} at offset {} ({} keys, {})  stream to offset {} in {} chunks{}{}",
        g.id,
        format_time(g.snapshot_time),
        g.snapshot_offset,
        g.keys,
        human(g.snapshot_bytes),
        g.end_offset,
        g.chunks,
        if g.orphan_chunks > 0 {
            format!(
                "  ({} chunks off the chain: run `redis verify`)",
                g.orphan_chunks
            )
        } else {
            String::new()
        },
        if g.pinned { "  PINNED" } else { "" }
    );
}

fn print_cluster(url: &str, c: &RedisClusterReport, restorable: Option<&Restorable>) {
    println!(
        "repository:  {url} (Redis Cluster, {} shards)",
        c.shards.len()
    );
    println!("shards:");
    for s in &c.shards {
        let slots = if s.slots.is_empty() {
            "no slots now".to_owned()
        } else {
            format!("slots {} ({})", s.slots, s.slot_count)
        };
        println!("  {}  {slots}", s.shard);
        for m in &s.masters {
            println!(
                "    master {} (node {}) since {}",
                m.address,
                m.node_id,
                format_time(m.since)
            );
        }
        if s.generations.is_empty() {
            println!("    (no generation yet)");
        }
        for g in &s.generations {
            print_generation("    ", g);
        }
        for id in &s.incomplete_generations {
            println!("    {id}  incomplete (no generation.json: in progress, or failed)");
        }
    }
    println!("slot maps:");
    for m in &c.slot_maps {
        let ranges: Vec<String> = m
            .ranges
            .iter()
            .map(|r| format!("{} {}", r.shard, r.slots))
            .collect();
        println!(
            "  from {}: {}{}",
            format_time(m.effective_time),
            ranges.join(", "),
            if m.complete {
                ""
            } else {
                "  (INCOMPLETE: slots without a shard)"
            }
        );
    }
    if let Some(rest) = restorable {
        println!(
            "restorable:  from {} to {} (every shard)",
            format_time(rest.first_time),
            rest.last_time.map_or_else(|| "?".to_string(), format_time)
        );
    }
}

fn print_text(r: &ListReport) {
    let f = &r.repository;
    match (&r.postgres, &r.redis) {
        (Some(pg), _) => {
            println!(
                "repository:  {} (PostgreSQL, system identifier {})",
                f.url,
                f.system_identifier.as_deref().unwrap_or("?")
            );
            println!("base backups:");
            if pg.backups.is_empty() {
                println!("  (none complete)");
            }
            for b in &pg.backups {
                println!(
                    "  {}  {} .. {}  LSN {} .. {}  timeline {}  {} ({} stored)  PostgreSQL {}{}",
                    b.id,
                    format_time(b.start_time),
                    format_time(b.stop_time),
                    b.start_lsn,
                    b.stop_lsn,
                    b.timeline,
                    human(b.size_bytes),
                    human(b.stored_bytes),
                    b.server_version,
                    if b.pinned { "  PINNED" } else { "" }
                );
                for t in &b.tablespaces {
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
            for id in &pg.incomplete_backups {
                println!(
                    "  {id}  incomplete (no backup.json: in progress, failed, or its WAL never arrived)"
                );
            }
            println!("WAL:");
            if pg.wal.is_empty() {
                println!("  (none)");
            }
            for t in &pg.wal {
                println!(
                    "  timeline {}: {} .. {} ({} .. {}), {} segments{}",
                    t.timeline,
                    t.start_lsn,
                    t.end_lsn,
                    t.first_segment,
                    t.last_segment,
                    t.segments,
                    if t.in_progress {
                        " + the segment in progress"
                    } else {
                        ""
                    }
                );
                for h in &t.holes {
                    println!(
                        "    HOLE: WAL {}..{} (segments {} to {}) is missing from the repository",
                        h.from_lsn, h.to_lsn, h.first_segment, h.last_segment
                    );
                }
            }
            for k in &pg.wal_conflicts {
                println!("  CONFLICT: {k} (WAL the stream received that differs from the stored file; compare them)");
            }
            if let (Some(rest), Some(oldest)) = (&r.restorable, pg.backups.first()) {
                println!(
                    "restorable:  from {} (end of backup {}) to LSN {} on timeline {}",
                    format_time(rest.first_time),
                    oldest.id,
                    rest.last_lsn.as_deref().unwrap_or("?"),
                    rest.timeline.unwrap_or(1)
                );
                // Holes split it: say which stretches restore.
                let spans = rest.spans.as_deref().unwrap_or_default();
                if spans.len() > 1 {
                    for s in spans {
                        println!(
                            "  span:      from {} (LSN {}) to LSN {} on timeline {}",
                            format_time(s.from_time),
                            s.from_lsn,
                            s.to_lsn,
                            s.timeline
                        );
                    }
                }
            }
        }
        (None, Some(redis)) => {
            if let Some(c) = &redis.cluster {
                print_cluster(&f.url, c, r.restorable.as_ref());
                return;
            }
            println!("repository:  {} (Redis)", f.url);
            println!("generations:");
            if redis.generations.is_empty() {
                println!("  (none)");
            }
            for g in &redis.generations {
                print_generation("  ", g);
            }
            for id in &redis.incomplete_generations {
                println!("  {id}  incomplete (no generation.json: in progress, or failed)");
            }
            if let Some(rest) = &r.restorable {
                println!(
                    "restorable:  from {} to the newest chunk (stored {})",
                    format_time(rest.first_time),
                    rest.last_time.map_or_else(|| "?".to_string(), format_time)
                );
            }
        }
        (None, None) => println!("repository:  {} (empty)", f.url),
    }
}
