//! `redis stream` on a Redis Cluster / Valkey Cluster node: one process captures every
//! master's stream at once (issue 15, item 1), and records the slot map whenever it changes.
//!
//! Each shard is a *lineage* (`s01`, `s02`, ... in order of first sight, never reused;
//! `docs/design/redis-cluster.md`): node ids and replication ids change on failover, the
//! lineage does not. Its objects live in a scoped view of the repository
//! (`Repository::scoped` at `redis/cluster/shards/<L>`), so the single-server machinery runs
//! unchanged per shard: [`super::stream::run`] with its chunk and time-index rules, bounded
//! memory, spool, `PSYNC` resume from the stored chunks, and its own writer lease
//! (`leases/redis/cluster/shards/<L>/redis-stream/...`); `redis restore --shard` and
//! `redis verify --shard` read one shard the same way.
//!
//! The supervisor here polls the topology (`CLUSTER SHARDS`, else `CLUSTER NODES`, from any
//! seed or known master) every [`ClusterOptions::poll`]:
//!
//! - it matches each master that owns slots to a lineage ([`assign`]): by shard id (Valkey,
//!   Redis 7.2+), else by the node ids the lineage has seen (a promoted replica was one of
//!   them), else by the slots the last slot map gave the lineage; otherwise a new lineage;
//! - it writes `redis/cluster/shards/<L>/shard.json` ([`ShardRecord`]) when that evidence
//!   grows, and `redis/cluster/slotmap/<ms>` (a `SlotMapRecord` with lineages as owners)
//!   when slots change lineage;
//! - it starts one stream per lineage, pointed at its master; when a lineage's master
//!   changes (a failover), the old stream is stopped (it stores what it read) and a new one
//!   starts at the new master, which continues with `PSYNC <stored replid> <offset>`: a
//!   promoted replica keeps the old replication id as `replid2` (psync2,
//!   `shiftReplicationId` in Redis `src/replication.c`), so no full sync is needed while
//!   its backlog covers the gap; otherwise the stream takes a new generation of the shard.
//!
//! The supervisor holds a lease of its own (`leases/redis/cluster/redis-stream/...`), so two
//! agents never assign lineages or write slot maps side by side.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use storage::layout::{self, ShardKey};
use storage::{
    ContentKind, Lease, LeaseOptions, LeaseScope, PutMode, RepoKind, RepoMarker, Repository,
    StorageError,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wire::redis::cluster::{ClusterTopology, NodeHealth, Shard, SlotMap, SlotMapRecord};

use super::link::MasterLink;
use super::source::RedisSource;
use super::stream::StreamOptions;
use crate::job::{Control, ErrorClass, JobError};

/// Version of `shard.json`'s layout.
pub const SHARD_RECORD_FORMAT: u32 = 1;

/// Default memory budget of a whole-cluster capture (`redis stream --memory-budget-mib`):
/// received data of every shard together, see [`shard_stream_options`]. With 32 MiB one
/// process capturing three shards under load peaked at 71 MiB of RSS, with 48 at 87 and
/// with 64 at 124 (benches/README.md, `redis_cluster_capture`): the goal is under 100 MiB.
pub const DEFAULT_MEMORY_BUDGET_MIB: u64 = 32;

/// Least chunk size a shard's share is cut into.
const MIN_SHARD_CHUNK: usize = 1 << 20;

/// Stream options sized for one memory budget, `budget` bytes of received data for the
/// whole capture (what [`shard_stream_options`] then divides between the shards): the
/// chunk being filled plus the chunk uploads in flight, as `run`'s
/// `agent.memory_budget_mib` does for one stream (`crate::run::MemoryShares`).
pub fn budget_stream_options(mut opts: StreamOptions, budget: u64) -> StreamOptions {
    let share = usize::try_from(budget).unwrap_or(usize::MAX);
    opts.max_chunk_bytes = (share / 4).clamp(MIN_SHARD_CHUNK, 16 << 20);
    opts.uploads_in_flight = (share / opts.max_chunk_bytes).saturating_sub(1).clamp(1, 4);
    opts
}

/// The options of one shard's stream when `shards` shards are captured at once: `opts`
/// sizes the whole capture, and each shard gets an even share of it, so the process holds
/// about what one stream of `opts` would, whatever the number of shards.
///
/// - Received data: `opts` counts a chunk being filled plus `uploads_in_flight` chunks
///   being stored, `max_chunk_bytes × (uploads_in_flight + 1)` (as `run`'s budget does).
///   A shard's share `S` of that is counted honestly: a chunk being stored is held twice
///   (its bytes and its compressed frames), so `chunk × (1 + 2 × uploads) ≤ S`, with a
///   chunk of `S / 8` (at least 1 MiB, at most `max_chunk_bytes`) and 1 to
///   `uploads_in_flight` uploads. What does not fit waits in the master's output buffer
///   for the agent, or in the spool.
/// - Spool (disk): `spool_limit` is divided between the shards.
/// - Snapshots (a full sync, `--snapshot-every`) go through the repository's writer, whose
///   buffers are set once for the repository ([`cluster_repo`]).
///
/// A shard added later (the cluster grew) gets the share of the count at its start; the
/// others keep theirs until they restart.
pub fn shard_stream_options(opts: &StreamOptions, shards: usize) -> StreamOptions {
    let shards = shards.max(1);
    let whole = opts
        .max_chunk_bytes
        .saturating_mul(opts.uploads_in_flight.saturating_add(1));
    let share = whole / shards;
    let mut o = opts.clone();
    o.max_chunk_bytes =
        (share / 8).clamp(MIN_SHARD_CHUNK, opts.max_chunk_bytes.max(MIN_SHARD_CHUNK));
    o.uploads_in_flight = (share / o.max_chunk_bytes)
        .saturating_sub(1)
        .div_euclid(2)
        .clamp(1, opts.uploads_in_flight.max(1));
    o.spool_limit = opts.spool_limit / shards as u64;
    o
}

/// The repository as a capture of every shard at once writes it, where each shard stores
/// a snapshot at the same time (the full syncs, `--snapshot-every`): multipart parts of
/// 5 MiB (S3's least), one part upload in flight per object, and frames of 256 KiB. An
/// object being written holds its parts (`part_size × (upload_concurrency + 1)`) and a
/// queue of `4 × workers` frames with their compressed copies: about 14 MiB per shard
/// with 2 workers, where the defaults (8 MiB parts, 4 in flight, 1 MiB frames) hold about
/// 56 MiB. Throughput stays: the shards' uploads run side by side. Readers take any frame
/// size.
pub fn cluster_repo(repo: &Repository) -> Repository {
    repo.with_write_sizes(5 << 20, 1, 256 << 10)
}

/// Knobs of a whole-cluster stream.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes to ask for the topology, in order (any reachable one serves).
    pub seeds: Vec<RedisSource>,
    /// How often the topology is read (slot moves and failovers are seen this late).
    pub poll: Duration,
    /// The options of every shard's stream (`spool` gets a sub-directory per shard).
    pub stream: StreamOptions,
}

/// A master as a lineage saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterSeen {
    /// Its node id.
    pub node_id: String,
    /// `host:port` the agent streams from.
    pub address: String,
    /// When the agent first saw it serve the shard, Unix ms.
    pub since_unix_ms: i64,
}

/// `redis/cluster/shards/<L>/shard.json`: how the agent recognises a shard later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// [`SHARD_RECORD_FORMAT`].
    pub format: u32,
    /// The lineage key (also in the object's key).
    pub shard: String,
    /// When the agent first saw the shard, Unix ms.
    pub first_seen_unix_ms: i64,
    /// Shard ids the cluster gave it (`CLUSTER SHARDS` `id`: Valkey, Redis 7.2+).
    #[serde(default)]
    pub shard_ids: BTreeSet<String>,
    /// Every node id seen in the shard, masters and replicas: after a failover the master
    /// is one of them.
    pub nodes: BTreeSet<String>,
    /// The masters that served it, in order.
    pub masters: Vec<MasterSeen>,
}

impl ShardRecord {
    /// The master it was last seen served by.
    pub fn current_master(&self) -> Option<&MasterSeen> {
        self.masters.last()
    }
}

/// What the repository says about a captured cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterCatalog {
    /// Every lineage, by key.
    pub shards: BTreeMap<ShardKey, ShardRecord>,
    /// Every slot-map record, oldest first.
    pub slot_maps: Vec<SlotMapRecord>,
}

impl ClusterCatalog {
    /// Reads the shard records and slot-map records (an empty catalog when the repository
    /// holds no cluster).
    pub async fn load(repo: &Repository) -> Result<ClusterCatalog> {
        let mut shards = BTreeMap::new();
        for dir in repo
            .list_dirs(&layout::redis_cluster_shards_prefix())
            .await
            .context("listing the cluster's shards")?
        {
            let Some(shard) = layout::parse_redis_cluster_shard(&dir) else {
                continue;
            };
            let view = repo.scoped(&dir)?;
            let key = layout::redis_shard_record();
            let data = match view.get(&key).await {
                Ok(d) => d,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {dir}/{key}")),
            };
            let record: ShardRecord = serde_json::from_slice(&data)
                .with_context(|| format!("{dir}/{key} is not a shard record"))?;
            shards.insert(shard, record);
        }
        let mut slot_maps = Vec::new();
        for meta in repo
            .list(&layout::redis_slot_maps_prefix())
            .await
            .context("listing the slot maps")?
        {
            let Some(key_ms) = layout::parse_redis_slot_map(&meta.key) else {
                continue;
            };
            let data = repo
                .get(&meta.key)
                .await
                .with_context(|| format!("reading {}", meta.key))?;
            let record = SlotMapRecord::decode(&data)
                .with_context(|| format!("{} is not a slot map", meta.key))?;
            if record.effective_unix_ms != key_ms {
                bail!(
                    "{} says it took effect at {} ms, not at the time its key names",
                    meta.key,
                    record.effective_unix_ms
                );
            }
            slot_maps.push(record);
        }
        Ok(ClusterCatalog { shards, slot_maps })
    }

    /// Whether the repository holds a cluster capture.
    pub fn is_cluster(&self) -> bool {
        !self.shards.is_empty() || !self.slot_maps.is_empty()
    }
}

/// The scoped view of one shard's objects.
pub fn shard_repo(repo: &Repository, shard: &ShardKey) -> Result<Repository> {
    Ok(repo.scoped(&layout::redis_cluster_shard(shard))?)
}

/// Matches every master that owns slots (or is new and owns none yet) to a lineage of `known`, creating lineages for new
/// shards and adding what was seen to the records. Returns the lineage of each serving
/// shard (by index in `topology.shards`) and the lineages whose record changed.
pub fn assign(
    topology: &ClusterTopology,
    known: &mut BTreeMap<ShardKey, ShardRecord>,
    last_map: Option<&SlotMap>,
    now_ms: i64,
) -> (BTreeMap<usize, ShardKey>, BTreeSet<ShardKey>) {
    let mut taken: BTreeMap<usize, ShardKey> = BTreeMap::new();
    let mut changed = BTreeSet::new();
    // Masters owning slots, and masters owning none that are up and belong to no lineage
    // whose nodes include a master owning slots now (that is a demoted master after a
    // failover, not a new shard): a new master, before its first slot has finished moving
    // to it, holds the keys already migrated to it, which no other stream has any more.
    let owning: BTreeSet<&str> = topology
        .shards
        .iter()
        .filter(|s| !s.slots.is_empty())
        .map(|s| s.master.id.as_str())
        .collect();
    let serving: Vec<usize> = (0..topology.shards.len())
        .filter(|&i| {
            let s = &topology.shards[i];
            !s.slots.is_empty()
                || (s.master.health == NodeHealth::Online
                    && !known.values().any(|r| {
                        r.nodes.contains(&s.master.id)
                            && r.nodes.iter().any(|n| owning.contains(n.as_str()))
                    }))
        })
        .collect();
    // Strongest evidence first: a shard id, then the master's id, then other nodes.
    let score = |shard: &Shard, rec: &ShardRecord| -> u64 {
        let mut s = 0;
        if shard
            .id
            .as_ref()
            .is_some_and(|id| rec.shard_ids.contains(id))
        {
            s += 1 << 20;
        }
        if rec.nodes.contains(&shard.master.id) {
            s += 1 << 10;
        }
        s + shard
            .replicas
            .iter()
            .chain(&shard.other_masters)
            .filter(|n| rec.nodes.contains(&n.id))
            .count() as u64
    };
    let mut candidates: Vec<(u64, usize, ShardKey)> = Vec::new();
    for &i in &serving {
        for (key, rec) in known.iter() {
            let s = score(&topology.shards[i], rec);
            if s > 0 {
                candidates.push((s, i, key.clone()));
            }
        }
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for (_, i, key) in candidates {
        if !taken.contains_key(&i) && !taken.values().any(|k| *k == key) {
            taken.insert(i, key);
        }
    }
    // No identity matched (history lost): the lineage that owned most of these slots.
    if let Some(map) = last_map {
        for &i in &serving {
            if taken.contains_key(&i) {
                continue;
            }
            let mut owned: BTreeMap<&str, usize> = BTreeMap::new();
            for slot in topology.shards[i].slots.slots() {
                if let Some(o) = map.owner(slot) {
                    *owned.entry(o).or_default() += 1;
                }
            }
            let best = owned
                .into_iter()
                .filter_map(|(o, n)| Some((ShardKey::parse(o).ok()?, n)))
                .filter(|(k, _)| known.contains_key(k) && !taken.values().any(|t| t == k))
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
            if let Some((k, _)) = best {
                taken.insert(i, k);
            }
        }
    }
    for &i in &serving {
        let shard = &topology.shards[i];
        let key = match taken.get(&i) {
            Some(k) => k.clone(),
            None => {
                let next = known.keys().map(ShardKey::number).max().unwrap_or(0) + 1;
                let k = ShardKey::nth(next);
                known.insert(
                    k.clone(),
                    ShardRecord {
                        format: SHARD_RECORD_FORMAT,
                        shard: k.to_string(),
                        first_seen_unix_ms: now_ms,
                        shard_ids: BTreeSet::new(),
                        nodes: BTreeSet::new(),
                        masters: Vec::new(),
                    },
                );
                taken.insert(i, k.clone());
                k
            }
        };
        let Some(rec) = known.get_mut(&key) else {
            continue;
        };
        let before = rec.clone();
        if let Some(id) = &shard.id {
            rec.shard_ids.insert(id.clone());
        }
        rec.nodes.insert(shard.master.id.clone());
        for n in shard.replicas.iter().chain(&shard.other_masters) {
            rec.nodes.insert(n.id.clone());
        }
        let address = shard
            .master
            .address()
            .map(|(h, p)| format!("{h}:{p}"))
            .unwrap_or_default();
        if rec
            .current_master()
            .is_none_or(|m| m.node_id != shard.master.id || m.address != address)
        {
            rec.masters.push(MasterSeen {
                node_id: shard.master.id.clone(),
                address,
                since_unix_ms: now_ms,
            });
        }
        if *rec != before {
            changed.insert(key);
        }
    }
    (taken, changed)
}

/// The slot map of `topology` with lineages as owners.
pub fn lineage_map(
    topology: &ClusterTopology,
    lineages: &BTreeMap<usize, ShardKey>,
) -> Result<SlotMap> {
    let by_master: BTreeMap<&str, &ShardKey> = lineages
        .iter()
        .map(|(&i, k)| (topology.shards[i].master.id.as_str(), k))
        .collect();
    let map = topology
        .slot_map()
        .map_err(|e| anyhow!("the cluster's slot map is inconsistent: {e}"))?;
    Ok(map.map_owners(|master| {
        by_master
            .get(master)
            .map_or_else(|| master.to_owned(), |k| k.to_string())
    })?)
}

/// Whether the node at `source` is a cluster node (a quick look before choosing how to
/// stream). `None` when it cannot be asked now.
pub async fn probe(source: &RedisSource) -> Result<Option<bool>, JobError> {
    let mut link = match MasterLink::connect(source).await {
        Ok(l) => l,
        // No answer at all: the caller says so at once (a second connect would wait again).
        Err(super::link::ConnectError::TimedOut(t)) => return Err(JobError::fatal(t)),
        Err(e) => {
            tracing::debug!(
                "could not ask {} whether it is a cluster node: {e}",
                source.endpoint()
            );
            return Ok(None);
        }
    };
    Ok(Some(super::cluster::detect(&mut link).await?.is_some()))
}

/// The source for a master: the seed's credentials and TLS settings, the node's address.
fn source_for(seed: &RedisSource, shard: &Shard) -> Option<RedisSource> {
    let m = &shard.master;
    let (host, _) = m.address()?;
    let port = if seed.tls {
        m.tls_port.or(m.port)?
    } else {
        m.port.or(m.tls_port)?
    };
    let mut s = seed.clone();
    s.host = host;
    s.port = port;
    Some(s)
}

/// Reads the topology on `link` when it still answers, else from the first node of
/// `candidates` that does (then `link` is that connection, kept for the next poll).
async fn read_topology(
    link: &mut Option<MasterLink>,
    candidates: &[RedisSource],
) -> Result<ClusterTopology, JobError> {
    if let Some(l) = link.as_mut() {
        match tokio::time::timeout(Duration::from_secs(10), super::cluster::read_topology(l)).await
        {
            Ok(Ok(t)) => return Ok(t),
            Ok(Err(e)) if e.class == ErrorClass::Fatal => return Err(e),
            Ok(Err(e)) => tracing::debug!("reading the topology from {}: {e:#}", l.endpoint()),
            Err(_) => tracing::debug!("{} did not answer in 10 s", l.endpoint()),
        }
        *link = None;
    }
    let mut errors = Vec::new();
    for c in candidates {
        let attempt = async {
            let mut l = MasterLink::connect(c).await?;
            let t = super::cluster::read_topology(&mut l).await?;
            Ok::<_, JobError>((l, t))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok((l, t))) => {
                *link = Some(l);
                return Ok(t);
            }
            Ok(Err(e)) if e.class == ErrorClass::Fatal => return Err(e),
            Ok(Err(e)) => errors.push(format!("{}: {e:#}", c.endpoint())),
            Err(_) => errors.push(format!("{}: no answer in 10 s", c.endpoint())),
        }
    }
    Err(JobError::unreachable(anyhow!(
        "no node of the cluster answered: {}",
        errors.join("; ")
    )))
}

/// Makes `repo` a Redis repository (before anything is bound to it) and takes the lease of
/// the cluster's records (shard records, slot maps), waiting while another agent holds it.
async fn take_cluster_lease(repo: &Repository, purpose: &str) -> Result<Lease> {
    let init = repo
        .init_marker(&RepoMarker::new(RepoKind::Redis))
        .await
        .with_context(|| format!("initialising the repository {}", repo.url()))?;
    if init.marker().kind != RepoKind::Redis {
        anyhow::bail!(
            "the repository {} backs up {:?}, not Redis/Valkey; use another --repo",
            repo.url(),
            init.marker().kind
        );
    }
    let cluster_view = repo.scoped(&layout::redis_cluster_prefix())?;
    Lease::acquire(
        &cluster_view,
        LeaseScope::RedisStream,
        purpose,
        LeaseOptions::from_env(),
    )
    .await
    .context("taking the cluster's lease in the repository")
}

/// One shard's snapshot taken by [`snapshot`].
#[derive(Debug)]
pub struct ShardSnapshot {
    /// The shard.
    pub shard: ShardKey,
    /// Its master.
    pub master: String,
    /// Its slots.
    pub slots: wire::redis::cluster::SlotRanges,
    /// The generation stored.
    pub captured: super::snapshot::CapturedSnapshot,
}

/// `redis snapshot` of a cluster: the topology from the first seed that answers, the
/// shard records and slot map brought up to date, then one new generation per shard, taken
/// from every master at once. Refused (after a minute) while a cluster stream holds the
/// cluster's lease: its shards get generations of their own (`--snapshot-every`).
pub async fn snapshot(repo: &Repository, seeds: &[RedisSource]) -> Result<Vec<ShardSnapshot>> {
    let seed = seeds
        .first()
        .context("a cluster snapshot needs a seed node")?;
    let purpose = format!("redis snapshot of the cluster (seed {})", seed.endpoint());
    let lease = tokio::time::timeout(Duration::from_secs(60), take_cluster_lease(repo, &purpose))
        .await
        .map_err(|_| {
            anyhow!(
                "another agent holds the cluster's lease in {} (a running `redis stream` of \
                 this cluster?); its shards get new generations with --snapshot-every",
                repo.url()
            )
        })??;
    let result = async {
        let topology = read_topology(&mut None, seeds).await?;
        let catalog = ClusterCatalog::load(repo).await?;
        let mut known = catalog.shards;
        let last_map = catalog.slot_maps.last().map(|r| r.map.clone());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (lineages, changed) = assign(&topology, &mut known, last_map.as_ref(), now_ms);
        store_records(repo, &known, &changed).await?;
        let map = lineage_map(&topology, &lineages)?;
        if last_map.as_ref() != Some(&map) {
            store_slot_map(repo, &map, now_ms, last_map.as_ref()).await?;
        }
        let takes = lineages.iter().map(|(&i, key)| {
            let shard = &topology.shards[i];
            async move {
                let source = source_for(seed, shard).with_context(|| {
                    format!(
                        "the master {} of shard {key} announces no address",
                        shard.master.id
                    )
                })?;
                let view = shard_repo(repo, key)?;
                let mut link = MasterLink::connect(&source).await?;
                let (replid, offset) = match link.psync(None).await? {
                    wire::redis::handshake::PsyncReply::FullResync { replid, offset } => {
                        (replid, offset)
                    }
                    wire::redis::handshake::PsyncReply::Continue { .. } => anyhow::bail!(
                        "the master at {} answered PSYNC ? -1 with +CONTINUE",
                        source.endpoint()
                    ),
                };
                let replied_at = chrono::Utc::now();
                super::snapshot::ensure_redis_repo(&view, &replid).await?;
                let captured =
                    super::snapshot::capture(&view, &mut link, &replid, offset, replied_at)
                        .await
                        .with_context(|| format!("the snapshot of shard {key}"))?;
                Ok(ShardSnapshot {
                    shard: key.clone(),
                    master: source.endpoint(),
                    slots: shard.slots.clone(),
                    captured,
                })
            }
        });
        futures::future::join_all(takes)
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()
    }
    .await;
    if let Err(e) = lease.release().await {
        tracing::warn!("could not release the cluster lease (it expires by itself): {e}");
    }
    result
}

/// A shard stream that is running.
struct Running {
    master: String,
    endpoint: String,
    token: CancellationToken,
    stopping: bool,
}

type ShardRuns<'a> = FuturesUnordered<LocalBoxFuture<'a, (ShardKey, Result<()>)>>;

/// Streams every shard of the cluster `opts.seeds` belong to until `ctl.token` is cancelled
/// (every shard then stores what it read) or a shard fails for good (fatal: its stream
/// retried what it could) or the cluster's lease is lost (transient). Each shard's stream
/// publishes its state as the part `<L>` of `ctl.status` (`/metrics` label `shard`);
/// `crate::redis::cluster_job` supervises attempts.
pub async fn run(repo: &Repository, opts: &ClusterOptions, ctl: Control) -> Result<(), JobError> {
    let seed = opts
        .seeds
        .first()
        .context("a cluster stream needs at least one seed node")
        .map_err(JobError::fatal)?
        .clone();
    let purpose = format!("redis stream of the cluster (seed {})", seed.endpoint());
    ctl.status.update(|s| {
        s.phase = crate::job::Phase::Waiting;
        s.waiting_for = Some("the cluster's lease (another writer may hold it)".into());
    });
    let lease = tokio::select! {
        l = take_cluster_lease(repo, &purpose) => l.map_err(JobError::transient)?,
        () = ctl.token.cancelled() => return Ok(()),
    };
    let guard = lease.guard();
    let catalog = ClusterCatalog::load(repo).await?;
    let mut known = catalog.shards;
    let mut last_map = catalog.slot_maps.last().map(|r| r.map.clone());
    let mut running: BTreeMap<ShardKey, Running> = BTreeMap::new();
    let mut runs: ShardRuns<'_> = FuturesUnordered::new();
    let mut tick = tokio::time::interval(opts.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreachable_since: Option<std::time::Instant> = None;
    let mut poll_link: Option<MasterLink> = None;
    let lost = guard.lost();
    tokio::pin!(lost);
    let outcome: Result<(), JobError> = loop {
        tokio::select! {
            () = ctl.token.cancelled() => break Ok(()),
            () = &mut lost => break Err(JobError::transient(anyhow!("lost the cluster stream's lease: {}", match guard.check() { Err(e) => e.to_string(), Ok(()) => "taken over".into() }))),
            Some((key, done)) = runs.next(), if !runs.is_empty() => {
                let was = running.remove(&key);
                match done {
                    Ok(()) if was.as_ref().is_some_and(|r| r.stopping) => {
                        tracing::info!(shard = %key, "the shard's stream stopped; it restarts at the shard's new master");
                        tick.reset_immediately();
                    }
                    Ok(()) => {}
                    // Stopped to move: an error of its last attempt (the old master is
                    // gone) ends nothing but that attempt.
                    Err(e) if was.as_ref().is_some_and(|r| r.stopping) => {
                        tracing::info!(shard = %key, "the shard's stream stopped ({e:#}); it restarts at the shard's new master");
                        tick.reset_immediately();
                    }
                    // Its stream retried what it could: what ends it is for good.
                    Err(e) => break Err(JobError::fatal(e.context(format!("streaming shard {key}")))),
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        // Ask the seeds, then the masters known.
        let mut candidates = opts.seeds.clone();
        for r in running.values() {
            if let Some((h, p)) = r.endpoint.rsplit_once(':') {
                if let Ok(port) = p.parse() {
                    let mut s = seed.clone();
                    s.host = h.to_owned();
                    s.port = port;
                    candidates.push(s);
                }
            }
        }
        let topology = match read_topology(&mut poll_link, &candidates).await {
            Ok(t) => {
                unreachable_since = None;
                t
            }
            Err(e) if e.class == ErrorClass::Fatal => break Err(e),
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= Duration::from_secs(10) || running.is_empty() {
                    tracing::warn!("reading the cluster topology: {e:#}");
                }
                continue;
            }
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (lineages, changed) = assign(&topology, &mut known, last_map.as_ref(), now_ms);
        if let Err(e) = guard.check() {
            break Err(JobError::transient(anyhow!(
                "the cluster stream's lease: {e}"
            )));
        }
        if let Err(e) = store_records(repo, &known, &changed).await {
            tracing::warn!("{e:#}");
        }
        match lineage_map(&topology, &lineages) {
            Ok(map) if last_map.as_ref() != Some(&map) => {
                match store_slot_map(repo, &map, now_ms, last_map.as_ref()).await {
                    Ok(()) => last_map = Some(map),
                    Err(e) => tracing::warn!("{e:#}"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{e:#}"),
        }
        for (&i, key) in &lineages {
            let shard = &topology.shards[i];
            let Some(source) = source_for(&seed, shard) else {
                tracing::warn!(shard = %key, "the master {} of shard {key} announces no address", shard.master.id);
                continue;
            };
            if let Some(r) = running.get_mut(key) {
                if !r.stopping && (r.master != shard.master.id || r.endpoint != source.endpoint()) {
                    tracing::info!(shard = %key, from = %r.endpoint, to = %source.endpoint(), "the shard's master changed (a failover): moving its stream to the new master");
                    r.stopping = true;
                    r.token.cancel();
                }
                continue;
            }
            let token = ctl.token.child_token();
            let view = match shard_repo(repo, key) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(shard = %key, "{e:#}");
                    continue;
                }
            };
            let mut stream_opts = shard_stream_options(&opts.stream, lineages.len());
            stream_opts.cluster_shard_only = true;
            if let Some(dir) = &mut stream_opts.spool {
                dir.push(key.as_str());
            }
            tracing::info!(
                shard = %key,
                master = %source.endpoint(),
                slots = %shard.slots,
                chunk_bytes = stream_opts.max_chunk_bytes,
                uploads_in_flight = stream_opts.uploads_in_flight,
                "streaming shard {key} from its master (its share of the memory budget split between {} shards)",
                lineages.len()
            );
            running.insert(
                key.clone(),
                Running {
                    master: shard.master.id.clone(),
                    endpoint: source.endpoint(),
                    token: token.clone(),
                    stopping: false,
                },
            );
            let key2 = key.clone();
            let status = ctl.status.part(key.as_str());
            let span = tracing::info_span!("shard", shard = %key);
            runs.push(Box::pin(
                async move {
                    let ctl = Control { token, status };
                    let result = super::stream::run(&view, &source, &stream_opts, ctl).await;
                    (key2, result)
                }
                .instrument(span),
            ));
        }
        // After the shards' states exist: `/readyz` then waits for every shard.
        ctl.status.running();
    };
    // Every shard stores what it read before the process ends.
    for r in running.values() {
        r.token.cancel();
    }
    while let Some((key, done)) = runs.next().await {
        if let Err(e) = done {
            tracing::error!(shard = %key, "{e:#}");
        }
    }
    if let Err(e) = lease.release().await {
        tracing::warn!("could not release the cluster lease (it expires by itself): {e}");
    }
    outcome
}

/// Writes the shard records in `changed`.
async fn store_records(
    repo: &Repository,
    known: &BTreeMap<ShardKey, ShardRecord>,
    changed: &BTreeSet<ShardKey>,
) -> Result<()> {
    for key in changed {
        let Some(rec) = known.get(key) else { continue };
        let view = shard_repo(repo, key)?;
        let json = serde_json::to_vec_pretty(rec).context("encoding shard.json")?;
        view.put(
            &layout::redis_shard_record(),
            ContentKind::RedisManifest,
            Bytes::from(json),
            PutMode::Overwrite,
        )
        .await
        .with_context(|| format!("storing the record of shard {key}"))?;
    }
    Ok(())
}

/// Writes a slot-map record that took effect at `now_ms`, logging what moved.
async fn store_slot_map(
    repo: &Repository,
    map: &SlotMap,
    now_ms: i64,
    before: Option<&SlotMap>,
) -> Result<()> {
    let ms = u64::try_from(now_ms).unwrap_or(0);
    let record = SlotMapRecord {
        effective_unix_ms: ms,
        map: map.clone(),
    };
    let key = layout::redis_slot_map(ms);
    match repo
        .put(
            &key,
            ContentKind::RedisManifest,
            Bytes::from(record.encode()),
            PutMode::CreateNew,
        )
        .await
    {
        Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e).with_context(|| format!("storing the slot map {key}")),
    }
    match before {
        None => tracing::info!(%key, owners = map.owners().len(), "slot map recorded"),
        Some(b) => {
            let moves: Vec<String> = b
                .diff(map)
                .iter()
                .map(|m| {
                    format!(
                        "{} {}->{}",
                        m.slots,
                        m.from.as_deref().unwrap_or("none"),
                        m.to.as_deref().unwrap_or("none")
                    )
                })
                .collect();
            tracing::info!(%key, moves = %moves.join(", "), "slot map changed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccc";
    const D: &str = "dddddddddddddddddddddddddddddddddddddddd";
    const E: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

    fn nodes(text: &str) -> ClusterTopology {
        ClusterTopology::from_cluster_nodes(text).unwrap()
    }

    fn three() -> ClusterTopology {
        nodes(&format!(
            "{A} 127.0.0.1:7001@17001 master - 0 0 1 connected 0-5460\n\
             {B} 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922\n\
             {C} 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n\
             {D} 127.0.0.1:7004@17004 slave {A} 0 0 1 connected\n"
        ))
    }

    fn owners(t: &ClusterTopology, l: &BTreeMap<usize, ShardKey>) -> Vec<(String, String)> {
        l.iter()
            .map(|(&i, k)| (t.shards[i].master.id.clone(), k.to_string()))
            .collect()
    }

    #[test]
    fn a_new_master_without_slots_gets_a_lineage_and_a_demoted_one_does_not() {
        let mut known = BTreeMap::new();
        let (l, _) = assign(&three(), &mut known, None, 1);
        assert_eq!(l.len(), 3);
        // A fourth master joins with no slot yet: its own lineage, so its keys are captured.
        let joined = nodes(&format!(
            "{A} 127.0.0.1:7001@17001 master - 0 0 1 connected 0-5460\n\
             {B} 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922\n\
             {C} 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n\
             {E} 127.0.0.1:7005@17005 master - 0 0 4 connected\n\
             {D} 127.0.0.1:7004@17004 slave {A} 0 0 1 connected\n"
        ));
        let (l, _) = assign(&joined, &mut known, None, 2);
        let got = owners(&joined, &l);
        assert!(got.contains(&(E.to_owned(), "s04".to_owned())), "{got:?}");
        // Still without slots on the next poll: the same lineage.
        let (l, _) = assign(&joined, &mut known, None, 3);
        assert!(owners(&joined, &l).contains(&(E.to_owned(), "s04".to_owned())));
        // A failover: D took A's slots, A is back as a master without slots before it
        // learns it was demoted: A is s01's former master, not a new shard.
        let failed_over = nodes(&format!(
            "{D} 127.0.0.1:7004@17004 master - 0 0 5 connected 0-5460\n\
             {B} 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922\n\
             {C} 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n\
             {E} 127.0.0.1:7005@17005 master - 0 0 4 connected\n\
             {A} 127.0.0.1:7001@17001 master - 0 0 1 connected\n"
        ));
        let (l, _) = assign(&failed_over, &mut known, None, 4);
        let got = owners(&failed_over, &l);
        assert!(got.contains(&(D.to_owned(), "s01".to_owned())), "{got:?}");
        assert!(!got.iter().any(|(m, _)| m == A), "{got:?}");
        assert_eq!(known.len(), 4);
    }

    #[test]
    fn the_budget_is_shared_between_the_shards() {
        const MIB: usize = 1 << 20;
        let whole = budget_stream_options(StreamOptions::default(), 64 << 20);
        assert_eq!(
            (whole.max_chunk_bytes, whole.uploads_in_flight),
            (16 * MIB, 3)
        );
        let held = |o: &StreamOptions| o.max_chunk_bytes * (o.uploads_in_flight + 1);
        for shards in 1..=8 {
            let o = shard_stream_options(&whole, shards);
            assert!(held(&o) * shards <= 64 * MIB, "{shards}: {o:?}");
            let honest = o.max_chunk_bytes * (1 + 2 * o.uploads_in_flight);
            assert!(shards > 6 || honest * shards <= 64 * MIB, "{shards}: {o:?}");
            assert!(o.uploads_in_flight >= 1 && o.max_chunk_bytes >= MIB);
        }
        let three = shard_stream_options(&whole, 3);
        assert_eq!(three.uploads_in_flight, 3);
        assert_eq!(three.max_chunk_bytes, 64 * MIB / 3 / 8);
        // Counting a stored chunk twice (bytes and compressed frames), still in the share.
        assert!(three.max_chunk_bytes * 7 <= 64 * MIB / 3);
        assert_eq!(three.spool_limit, whole.spool_limit / 3);
        // A tiny budget still stores: 1 MiB chunks, one upload in flight.
        let tiny =
            shard_stream_options(&budget_stream_options(StreamOptions::default(), 4 << 20), 3);
        assert_eq!((tiny.max_chunk_bytes, tiny.uploads_in_flight), (MIB, 1));
    }

    #[test]
    fn masters_get_lineages_in_slot_order_and_keep_them() {
        let mut known = BTreeMap::new();
        let t = three();
        let (l, changed) = assign(&t, &mut known, None, 1);
        assert_eq!(
            owners(&t, &l),
            [
                (A.to_owned(), "s01".to_owned()),
                (B.to_owned(), "s02".to_owned()),
                (C.to_owned(), "s03".to_owned())
            ]
        );
        assert_eq!(changed.len(), 3);
        assert!(known[&ShardKey::nth(1)].nodes.contains(D));
        let map = lineage_map(&t, &l).unwrap();
        map.check_complete().unwrap();
        assert_eq!(map.slots_of("s02").to_string(), "5461-10922");
        // The same view again changes nothing.
        let (l2, changed) = assign(&t, &mut known, Some(&map), 2);
        assert_eq!(l2, l);
        assert!(changed.is_empty());
    }

    #[test]
    fn a_promoted_replica_continues_its_masters_lineage() {
        let mut known = BTreeMap::new();
        let (l, _) = assign(&three(), &mut known, None, 1);
        let map = lineage_map(&three(), &l).unwrap();
        // D took over A's slots; A is gone.
        let after = nodes(&format!(
            "{D} 127.0.0.1:7004@17004 master - 0 0 4 connected 0-5460\n\
             {B} 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922\n\
             {C} 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n\
             {A} 127.0.0.1:7001@17001 master,fail - 0 0 1 disconnected\n"
        ));
        let (l, changed) = assign(&after, &mut known, Some(&map), 5);
        assert_eq!(owners(&after, &l)[0], (D.to_owned(), "s01".to_owned()));
        assert_eq!(changed.into_iter().collect::<Vec<_>>(), [ShardKey::nth(1)]);
        let masters = &known[&ShardKey::nth(1)].masters;
        assert_eq!(masters.len(), 2);
        assert_eq!(masters[1].node_id, D);
        assert_eq!(masters[1].address, "127.0.0.1:7004");
        assert_eq!(lineage_map(&after, &l).unwrap(), map);
    }

    #[test]
    fn history_lost_falls_back_to_slots_and_a_new_shard_gets_a_new_lineage() {
        let mut known = BTreeMap::new();
        let (l, _) = assign(&three(), &mut known, None, 1);
        let map = lineage_map(&three(), &l).unwrap();
        // E (never seen) serves most of s02's slots; B keeps a few; a new shard appears.
        let after = nodes(&format!(
            "{A} 127.0.0.1:7001@17001 master - 0 0 1 connected 0-5460\n\
             {E} 127.0.0.1:7005@17005 master - 0 0 5 connected 5461-10000\n\
             {C} 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n\
             {B} 127.0.0.1:7002@17002 master - 0 0 2 connected 10001-10922\n"
        ));
        let (l, _) = assign(&after, &mut known, Some(&map), 5);
        let got: BTreeMap<String, String> = owners(&after, &l).into_iter().collect();
        assert_eq!(got[B], "s02");
        assert_eq!(got[E], "s04");
        assert_eq!(got[A], "s01");
        let (mut fresh, _) = (BTreeMap::new(), ());
        // Without node ids known, the slots decide.
        for (k, mut r) in known.clone() {
            r.nodes.clear();
            fresh.insert(k, r);
        }
        let (l, _) = assign(&three(), &mut fresh, Some(&map), 6);
        assert_eq!(
            owners(&three(), &l)
                .into_iter()
                .map(|(_, k)| k)
                .collect::<Vec<_>>(),
            ["s01", "s02", "s03"]
        );
    }
}
