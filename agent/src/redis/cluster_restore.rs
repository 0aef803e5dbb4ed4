//! Restoring a Redis Cluster capture to one moment T (issue 15, item 4;
//! `docs/design/redis-cluster.md`, "Restore to T").
//!
//! 1. The slot map of T is the newest `redis/cluster/slotmap/<ms>` record at or before T;
//!    none means T is before the cluster was captured (or before what `expire` kept).
//! 2. Every shard (lineage) that owns slots in that map is restored to T by the
//!    single-server restore on its scoped view ([`super::restore::restore`]): the newest
//!    generation whose snapshot is at or before T, its chunks replayed up to T. One agent
//!    process stamped every shard's time index with one clock, so T is one moment across
//!    the cluster. Without `--to-time`, T is the earliest of the shards' newest stored
//!    moments, so every shard is restored to the same moment. A shard owning no slot at T
//!    whose stream covers T (a new master whose first slot is still moving to it) is
//!    restored too: it holds keys already migrated to it. Every shard the map names must be
//!    one the repository holds, checked before anything is written; if a shard fails, the
//!    shards already written are removed.
//! 3. Keys moving at T whose source's `DEL` is at or before T and whose target's `RESTORE`
//!    is after the target's cut are put back on their owner ([`cluster_moves`]).
//! 4. The output is `DIR/<shard>/` per shard (the multi-part AOF layout of a single-server
//!    restore) and `DIR/slotmap`, the record of T with the shard names as owners.
//! 5. With `--start`, a server is started on each directory, first alone: a key held by a
//!    shard that does not own its slot at T (a slot moving at T: `MIGRATE` copies the key to
//!    the target before the source deletes it, and the slot map is polled) is moved to the
//!    owner when the owner lacks it, and deleted otherwise (`MIGRATE` blocks both servers,
//!    so two copies are equal). Then each is restarted in cluster mode, given distinct config
//!    epochs, joined with `CLUSTER MEET`, given its slots of T with `CLUSTER ADDSLOTSRANGE`,
//!    and the restore waits for `cluster_state:ok` on every node.
//!
//! A restore rebuilds exactly the shards of T: a cluster of another shape is made from it
//! afterwards with `redis-cli --cluster add-node` / `reshard`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use storage::layout::{self, ShardKey};
use storage::Repository;
use wire::redis::cluster::{key_hash_slot, ClusterTopology, SlotMapRecord, SlotRange, SlotRanges};
use wire::redis::resp::Reply;

use super::admin::AdminConn;
use super::cluster_moves;
use super::cluster_stream::{shard_repo, ClusterCatalog};
use super::restore::{check_target_empty, describe_time, RestoreFormat, Restored};
use crate::catalog::redis::RedisCatalog;
use crate::restore::lock;
use crate::restore::place;

/// What a cluster restore wrote.
#[derive(Debug)]
pub struct ClusterRestored {
    /// The moment restored, Unix ms.
    pub to_ms: i64,
    /// The slot map of that moment (owners are shard keys).
    pub slot_map: SlotMapRecord,
    /// Each shard's restore, by shard key.
    pub shards: BTreeMap<ShardKey, Restored>,
    /// Keys that were moving between shards at the moment, put back on their owner (see
    /// [`cluster_moves`]), by owner.
    pub moving: BTreeMap<ShardKey, usize>,
}

/// Whether `repo` holds a Redis Cluster capture.
pub async fn is_cluster(repo: &Repository) -> Result<bool> {
    Ok(ClusterCatalog::load(repo).await?.is_cluster())
}

/// Whether a shard's stream covers `to_ms`: a generation taken at or before it, and
/// commands (or a snapshot) at or after it.
async fn holds_moment(view: &Repository, shard: &ShardKey, to_ms: i64) -> Result<bool> {
    let catalog = RedisCatalog::load(view).await?;
    if catalog.for_time(Some(to_ms)).is_none() {
        return Ok(false);
    }
    Ok(newest_moment(view, shard).await? >= to_ms)
}

/// The newest moment stored for a shard: its newest chunk's last time-index entry, or its
/// newest snapshot's time.
async fn newest_moment(view: &Repository, shard: &ShardKey) -> Result<i64> {
    let catalog = RedisCatalog::load(view).await?;
    let Some(generation) = catalog.latest() else {
        bail!("shard {shard} holds no generation");
    };
    let Some((start, end)) = generation.chain.last() else {
        return Ok(generation.manifest.snapshot_unix_ms);
    };
    let key = layout::redis_chunk(&generation.id, *start, *end);
    let data = view
        .get(&key)
        .await
        .with_context(|| format!("shard {shard}: reading {key}"))?;
    let (header, _) = super::chunk::decode(key.as_str(), data)?;
    Ok(header
        .time_index
        .last()
        .map_or(generation.manifest.snapshot_unix_ms, |(_, ms)| *ms))
}

/// Restores every shard of the cluster captured in `repo` to `to_time` (or the newest
/// moment every shard holds) under `target`.
pub async fn restore(
    repo: &Repository,
    target: &Path,
    to_time: Option<i64>,
) -> Result<ClusterRestored> {
    let catalog = ClusterCatalog::load(repo).await?;
    if catalog.slot_maps.is_empty() {
        bail!(
            "the repository {} holds no slot map of a Redis Cluster",
            repo.url()
        );
    }
    let to_ms = match to_time {
        Some(t) => t,
        None => {
            // The latest map's shards, each to its newest moment: the earliest of those is
            // the newest moment the whole cluster can be restored to.
            let last = catalog.slot_maps.last().context("a slot map")?;
            let mut newest = i64::MAX;
            for shard in held_owners(&catalog, last)? {
                newest = newest.min(newest_moment(&shard_repo(repo, &shard)?, &shard).await?);
            }
            newest
        }
    };
    let Some(record) = catalog
        .slot_maps
        .iter()
        .rev()
        .find(|m| i64::try_from(m.effective_unix_ms).is_ok_and(|e| e <= to_ms))
    else {
        let first = catalog.slot_maps.first().map_or(0, |m| m.effective_unix_ms);
        bail!(
            "{} is before the cluster was captured (or before what `expire` kept): its first slot map is from {}",
            describe_time(to_ms),
            describe_time(i64::try_from(first).unwrap_or(i64::MAX))
        );
    };
    let mut shards = held_owners(&catalog, record)?;
    // A shard owning no slot at T (a new master whose first slot is still moving to it)
    // holds the keys already migrated to it: restored too, and placed on their owners.
    for key in catalog.shards.keys() {
        if !shards.contains(key) && holds_moment(&shard_repo(repo, key)?, key, to_ms).await? {
            shards.push(key.clone());
        }
    }
    if shards.is_empty() {
        bail!(
            "the slot map of {} gives no slot to any shard",
            describe_time(to_ms)
        );
    }

    let target = &place::resolve(target)?;
    place::check_destination(target, repo.local_path(), "the target")?;
    let _lock = lock::create_and_lock(target, 0o700)?;
    check_target_empty(target).await?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", target.display()))?;
    let mut restored = BTreeMap::new();
    for shard in shards {
        let view = shard_repo(repo, &shard)?;
        let slots = record.map.slots_of(shard.as_str());
        let dir = target.join(shard.as_str());
        let done = super::restore::restore(&view, &dir, Some(to_ms), RestoreFormat::Aof).await;
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // A cluster is restored whole or not at all: the shards already written
                // would pass for a restore. The target was empty and is ours (locked).
                let kept = remove_restored(target, restored.keys().chain([&shard]));
                return Err(e.context(format!(
                    "shard {shard} (slots {}) at {}; {kept}",
                    describe_ranges(slots.ranges()),
                    describe_time(to_ms)
                )));
            }
        };
        restored.insert(shard, done);
    }
    let moving = match replay_moving_keys(repo, &catalog, record, target, to_ms).await {
        Ok(m) => m,
        Err(e) => {
            let kept = remove_restored(target, restored.keys());
            return Err(e.context(format!("keys moving at {}; {kept}", describe_time(to_ms))));
        }
    };
    let text = record.encode();
    let path = target.join("slotmap");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(ClusterRestored {
        to_ms,
        slot_map: record.clone(),
        shards: restored,
        moving,
    })
}

/// Applies "a `DEL` during a move means moved" ([`cluster_moves`]): every shard with a
/// generation at T is read around T, and each key that was moving at T is put back on the
/// shard owning its slot at T by replaying the target's `RESTORE`. Returns the count per
/// owner.
async fn replay_moving_keys(
    repo: &Repository,
    catalog: &ClusterCatalog,
    record: &SlotMapRecord,
    target: &Path,
    to_ms: i64,
) -> Result<BTreeMap<ShardKey, usize>> {
    let mut windows = BTreeMap::new();
    for shard in catalog.shards.keys() {
        let view = shard_repo(repo, shard)?;
        let w = cluster_moves::window(&view, to_ms)
            .await
            .with_context(|| format!("shard {shard}: reading its commands around the moment"))?;
        windows.insert(shard.clone(), w);
    }
    let mut by_owner: BTreeMap<ShardKey, Vec<u8>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for m in cluster_moves::moved_keys(&windows) {
        let owner = match record.map.owner_of_key(&m.key) {
            Some(o) => ShardKey::parse(o)?,
            None => continue,
        };
        tracing::info!(
            key = %String::from_utf8_lossy(&m.key),
            from = %m.source,
            to = %m.target,
            "a key moving at the moment: restored on {owner} from {}'s RESTORE",
            m.target
        );
        let aof = by_owner.entry(owner.clone()).or_default();
        if aof.is_empty() {
            // Cluster nodes have database 0 only.
            aof.extend_from_slice(b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n");
        }
        aof.extend_from_slice(&m.restore);
        *counts.entry(owner).or_insert(0) += 1;
    }
    for (owner, aof) in by_owner {
        let path = target
            .join(owner.as_str())
            .join("appendonlydir/appendonly.aof.1.incr.aof");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| {
                format!(
                    "opening {} to add the keys moving at the moment",
                    path.display()
                )
            })?;
        std::io::Write::write_all(&mut f, &aof)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(counts)
}

/// The shards `record` gives slots to, each one the repository holds: checked before
/// anything is written, since a record naming another shard is damage or tampering.
fn held_owners(catalog: &ClusterCatalog, record: &SlotMapRecord) -> Result<Vec<ShardKey>> {
    let key = layout::redis_slot_map(record.effective_unix_ms);
    let mut shards = Vec::new();
    for owner in record.map.owners() {
        let shard = ShardKey::parse(owner)
            .with_context(|| format!("{key} names the shard {owner:?}; nothing was written"))?;
        if !catalog.shards.contains_key(&shard) {
            bail!(
                "{key} gives slots to shard {shard}, which this repository does not hold ({} has no shard record); nothing was written",
                layout::redis_cluster_shard(&shard)
            );
        }
        shards.push(shard);
    }
    Ok(shards)
}

/// Removes the shard directories this restore wrote into `target`, saying what is left.
fn remove_restored<'a>(target: &Path, written: impl Iterator<Item = &'a ShardKey>) -> String {
    let mut left = Vec::new();
    for shard in written {
        let dir = target.join(shard.as_str());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => left.push(format!("{}: {e}", dir.display())),
        }
    }
    if left.is_empty() {
        format!("nothing was kept in {}", target.display())
    } else {
        format!("could not remove what was written: {}", left.join(", "))
    }
}

fn describe_ranges(ranges: &[SlotRange]) -> String {
    if ranges.is_empty() {
        return "none".to_owned();
    }
    ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A started node of the restored cluster.
#[derive(Debug)]
pub struct StartedNode {
    pub shard: ShardKey,
    pub port: u16,
    pub pid: u32,
    pub dir: PathBuf,
}

/// Starts `server` on every shard directory of `done` under `target`, moves keys to the
/// shard owning their slot at T, and assembles the servers into a cluster with the slot
/// map of T, waiting for `cluster_state:ok`.
pub async fn start(
    server: &Path,
    target: &Path,
    done: &ClusterRestored,
) -> Result<Vec<StartedNode>> {
    let target =
        std::fs::canonicalize(target).with_context(|| format!("resolving {}", target.display()))?;
    // 1. Alone: every key to the shard that owns its slot at T.
    let mut alone = Vec::new();
    for shard in done.shards.keys() {
        let dir = target.join(shard.as_str());
        let port = super::server_proc::free_port(false)?;
        let pid = super::server_proc::spawn_loaded(server, &dir, port, &["--appendonly", "yes"])
            .await
            .with_context(|| format!("starting shard {shard} alone"))?;
        alone.push((shard.clone(), port, pid));
    }
    let placed = place_keys_by_owner(&alone, &done.slot_map).await;
    for (shard, port, _) in &alone {
        // SHUTDOWN writes the AOF out (no RDB: the server runs with --save "").
        if let Ok(mut c) = AdminConn::connect(*port).await {
            // The server closes the connection instead of answering.
            let _ = c.cmd(&[b"SHUTDOWN"]).await;
        }
        wait_gone(*port)
            .await
            .with_context(|| format!("stopping shard {shard} after placing its keys"))?;
    }
    let moved = placed?;
    if moved.moved + moved.dropped > 0 {
        tracing::info!(
            moved = moved.moved,
            dropped = moved.dropped,
            "keys held by a shard that did not own their slot at the restored moment were placed on the owner"
        );
    }

    // 2. As a cluster.
    let mut nodes = Vec::new();
    for shard in done.shards.keys() {
        let dir = target.join(shard.as_str());
        let mut last = None;
        for _ in 0..5 {
            let port = super::server_proc::free_port(true)?;
            match super::server_proc::spawn_loaded(
                server,
                &dir,
                port,
                &[
                    "--appendonly",
                    "yes",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
            .await
            {
                Ok(pid) => {
                    last = None;
                    nodes.push(StartedNode {
                        shard: shard.clone(),
                        port,
                        pid,
                        dir: dir.clone(),
                    });
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e.context(format!("starting shard {shard} in cluster mode")));
        }
    }
    assemble(&nodes, &done.slot_map).await?;
    Ok(nodes)
}

#[derive(Debug, Default)]
struct Placed {
    moved: u64,
    dropped: u64,
}

async fn place_keys_by_owner(
    alone: &[(ShardKey, u16, u32)],
    map: &SlotMapRecord,
) -> Result<Placed> {
    let port_of: BTreeMap<&str, u16> = alone.iter().map(|(s, p, _)| (s.as_str(), *p)).collect();
    let mut placed = Placed::default();
    for (shard, port, _) in alone {
        let mut conn = AdminConn::connect(*port).await?;
        let mut cursor = b"0".to_vec();
        let mut misplaced: Vec<(Vec<u8>, u16)> = Vec::new();
        loop {
            let reply = conn
                .ok(&[b"SCAN", &cursor, b"COUNT", b"1000"])
                .await
                .with_context(|| format!("shard {shard}: SCAN"))?;
            let Reply::Array(parts) = reply else {
                bail!("shard {shard}: SCAN answered {reply:?}");
            };
            let (Some(Reply::Bulk(Some(next))), Some(Reply::Array(keys))) =
                (parts.first(), parts.get(1))
            else {
                bail!("shard {shard}: SCAN answered {parts:?}");
            };
            for k in keys {
                let Reply::Bulk(Some(key)) = k else { continue };
                let owner = map.map.owner(key_hash_slot(key));
                if owner != Some(shard.as_str()) {
                    let Some(owner_port) = owner.and_then(|o| port_of.get(o)) else {
                        bail!(
                            "shard {shard} holds key {:?} of slot {}, which no restored shard owns at the restored moment",
                            String::from_utf8_lossy(key),
                            key_hash_slot(key)
                        );
                    };
                    misplaced.push((key.to_vec(), *owner_port));
                }
            }
            if next.as_ref() == b"0" {
                break;
            }
            cursor = next.to_vec();
        }
        for (key, owner_port) in misplaced {
            let mut owner = AdminConn::connect(owner_port).await?;
            let exists = matches!(owner.ok(&[b"EXISTS", &key]).await?, Reply::Integer(1));
            if exists {
                conn.ok(&[b"DEL", &key]).await?;
                placed.dropped += 1;
            } else {
                let port = owner_port.to_string();
                conn.ok(&[
                    b"MIGRATE",
                    b"127.0.0.1",
                    port.as_bytes(),
                    &key,
                    b"0",
                    b"10000",
                ])
                .await
                .with_context(|| {
                    format!(
                        "moving key {:?} from shard {shard} to its owner",
                        String::from_utf8_lossy(&key)
                    )
                })?;
                placed.moved += 1;
            }
        }
    }
    Ok(placed)
}

async fn wait_gone(port: u16) -> Result<()> {
    for _ in 0..300 {
        if AdminConn::connect(port).await.is_err() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the server on port {port} did not stop")
}

async fn assemble(nodes: &[StartedNode], map: &SlotMapRecord) -> Result<()> {
    let mut conns = Vec::new();
    for n in nodes {
        conns.push(AdminConn::connect(n.port).await?);
    }
    // Distinct epochs, as redis-cli does; a node that already has one keeps it (the
    // cluster resolves a collision by itself).
    for (i, c) in conns.iter_mut().enumerate() {
        let epoch = (i + 1).to_string();
        let _ = c
            .cmd(&[b"CLUSTER", b"SET-CONFIG-EPOCH", epoch.as_bytes()])
            .await?;
    }
    if let Some((first, rest)) = conns.split_first_mut() {
        for n in &nodes[1..] {
            let port = n.port.to_string();
            let bus = (n.port + 10_000).to_string();
            first
                .ok(&[
                    b"CLUSTER",
                    b"MEET",
                    b"127.0.0.1",
                    port.as_bytes(),
                    bus.as_bytes(),
                ])
                .await?;
        }
        let _ = rest;
    }
    // A node claims, when it loads, the slots it holds keys of: add only the rest.
    for (n, c) in nodes.iter().zip(conns.iter_mut()) {
        let mine = map.map.slots_of(n.shard.as_str());
        let claimed = claimed_slots(c, n.port).await?;
        let missing = SlotRanges::from_slots(mine.slots().filter(|s| !claimed.contains(*s)));
        for run in missing.ranges() {
            let (a, b) = (run.start().to_string(), run.end().to_string());
            c.ok(&[b"CLUSTER", b"ADDSLOTSRANGE", a.as_bytes(), b.as_bytes()])
                .await
                .with_context(|| format!("giving shard {} its slots {a}-{b}", n.shard))?;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut ok = true;
        for c in conns.iter_mut() {
            let info = c.text(&[b"CLUSTER", b"INFO"]).await?;
            ok &= info.lines().any(|l| l.trim() == "cluster_state:ok");
        }
        if ok {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the restored cluster did not reach cluster_state:ok in 2 minutes; see the server.log of each shard");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The slots a started node already claims (those it held keys of when it loaded).
async fn claimed_slots(c: &mut AdminConn, port: u16) -> Result<SlotRanges> {
    let id = c.text(&[b"CLUSTER", b"MYID"]).await?;
    let nodes = c.text(&[b"CLUSTER", b"NODES"]).await?;
    let topology = ClusterTopology::from_cluster_nodes(&nodes)
        .with_context(|| format!("reading CLUSTER NODES of 127.0.0.1:{port}"))?;
    Ok(topology
        .shard_of_master(id.trim())
        .map(|i| topology.shards[i].slots.clone())
        .unwrap_or_default())
}

/// Prints what a cluster restore did and, without `--start`, how to bring the shards up.
pub fn report(target: &Path, done: &ClusterRestored, started: Option<&[StartedNode]>) {
    println!("restored to:  {} (every shard)", describe_time(done.to_ms));
    for (shard, r) in &done.shards {
        let slots = done.slot_map.map.slots_of(shard.as_str());
        println!(
            "shard {shard}:    slots {} ({} slots); generation {}, offset {}, {} keys in the snapshot, {} commands replayed",
            describe_ranges(slots.ranges()),
            slots.slot_count(),
            r.generation,
            r.offset,
            r.snapshot.total_keys(),
            r.commands
        );
        if let Some(n) = done.moving.get(shard) {
            println!("              {n} keys moving between shards at that moment restored here from their target's RESTORE");
        }
    }
    println!("wrote:        {}", target.join("slotmap").display());
    match started {
        Some(nodes) => {
            for n in nodes {
                println!(
                    "server:       shard {} on 127.0.0.1:{} (pid {}, pid file {})",
                    n.shard,
                    n.port,
                    n.pid,
                    n.dir.join("server.pid").display()
                );
            }
            println!(
                "cluster:      cluster_state:ok, {} slots assigned",
                done.slot_map.map.ranges().iter().map(|(r, _)| r.len()).sum::<usize>()
            );
        }
        None => println!(
            "start it:     run again with --start redis-server to assemble a cluster with this slot map; or by hand: redis-server --dir DIR/<shard> --appendonly yes --cluster-enabled yes on each directory, CLUSTER MEET, and CLUSTER ADDSLOTSRANGE per DIR/slotmap (README, \"Restoring a cluster\")"
        ),
    }
}
