//! The repository's key layout: the only place that turns names into object keys and
//! back. Keys look like paths (`postgres/wal/00000001/000000010000000000000003`) so a
//! listing by prefix finds a timeline, a backup or a Redis generation.
//!
//! ```text
//! syncbridge-repo                                   repository marker (RepoMarker, JSON)
//! postgres/wal/<tli 8 hex>/<segment 24 hex>         a complete WAL segment, as named in pg_wal
//! postgres/wal/<tli>/<segment>.delta.<start 8 hex>-<end 8 hex>
//!                                                   bytes [start, end) of the segment in
//!                                                   progress (low RPO; a chain from 0)
//! postgres/wal/<tli>/<segment>.partial.<end 8 hex>  the segment's first <end> bytes (older
//!                                                   builds; still read)
//! postgres/wal/<tli>/<tli>.history                  timeline history file
//! postgres/conflicts/<file>.<unix ms>               a streamed segment or history file that
//!                                                   differed from the stored one (kept, never used)
//! postgres/base/<backup-id>/data/<seq 10 digits>    base backup data chunks, in stream order
//! postgres/base/<backup-id>/backup_manifest         the server's backup_manifest
//! postgres/base/<backup-id>/backup.json             agent's backup manifest, written LAST
//! postgres/base/<backup-id>/pinned                  present while the backup is pinned:
//!                                                   `expire` never removes it (JSON)
//! postgres/base/<backup-id>/expiring                written by `expire` before it deletes
//!                                                   backup.json, deleted last (JSON)
//! redis/gen/<generation-id>/snapshot.rdb            the RDB snapshot of a generation
//! redis/gen/<generation-id>/chunks/<start 20 digits>-<end 20 digits>
//!                                                   replication stream bytes [start, end)
//! redis/gen/<generation-id>/generation.json         generation manifest
//! redis/gen/<generation-id>/pinned                  present while the generation is pinned
//! redis/gen/<generation-id>/expiring                `expire` is removing it (as above)
//! redis/cluster/shards/<shard>/shard.json         a Redis Cluster shard: how the agent
//!                                                   recognises it (lineage evidence, JSON)
//! redis/cluster/shards/<shard>/redis/gen/...        the shard's generations, laid out as
//!                                                   redis/gen/ above (a scoped view,
//!                                                   `Repository::scoped`)
//! redis/cluster/slotmap/<unix ms 20 digits>        the cluster's slot map from that moment
//!                                                   (`SlotMapRecord` text, owners = shards)
//! leases/redis/cluster/shards/<shard>/redis-stream/<generation 16 hex>
//!                                                   writer lease of one shard's stream
//! leases/postgres-stream/<tli>/<generation 16 hex>  writer lease of `postgres stream` on a
//!                                                   timeline (JSON, never encrypted; lease.rs)
//! leases/redis-stream/<generation 16 hex>           writer lease of `redis stream`
//! ```
//!
//! WAL file naming follows PostgreSQL's `XLogFileName` (src/include/access/xlog_internal.h);
//! the segment/LSN arithmetic itself lives in `wire`, this module only validates shapes.
//! Zero-padded numbers make lexical order equal numeric order, so listings sort correctly.

use std::fmt;

use crate::error::{Result, StorageError};

/// A validated object key, relative to the repository root. Components are
/// `[A-Za-z0-9_][A-Za-z0-9._-]*`, joined by `/`; a leading dot is reserved for the
/// local store's temporary files. The empty key is the root and is only valid as a prefix.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoKey(String);

impl RepoKey {
    /// Checks a key given as text (e.g. on the `repo` command line).
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim_matches('/');
        if text.is_empty() {
            return Ok(Self::root());
        }
        if text.len() > 900 {
            return Err(invalid(text, "longer than 900 bytes"));
        }
        for comp in text.split('/') {
            check_component(text, comp)?;
        }
        Ok(RepoKey(text.to_owned()))
    }

    /// The repository root, for listing everything.
    pub fn root() -> Self {
        RepoKey(String::new())
    }

    /// True for the root prefix.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last component (the "file name").
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// Whether this key is `prefix` itself or lies under it.
    pub fn starts_with(&self, prefix: &RepoKey) -> bool {
        prefix.is_root()
            || self.0 == prefix.0
            || (self.0.starts_with(&prefix.0)
                && self.0.as_bytes().get(prefix.0.len()) == Some(&b'/'))
    }

    pub(crate) fn join(parts: &[&str]) -> Self {
        RepoKey(parts.join("/"))
    }
}

impl fmt::Display for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("/")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoKey({:?})", self.0)
    }
}

fn invalid(text: &str, reason: impl Into<String>) -> StorageError {
    StorageError::InvalidKey {
        key: text.to_owned(),
        reason: reason.into(),
    }
}

fn check_component(text: &str, comp: &str) -> Result<()> {
    let bytes = comp.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(invalid(text, "empty path component"));
    };
    if !(first.is_ascii_alphanumeric() || *first == b'_') {
        return Err(invalid(
            text,
            format!("component {comp:?} must start with a letter, digit or '_'"),
        ));
    }
    if let Some(bad) = bytes
        .iter()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return Err(invalid(
            text,
            format!("component {comp:?} contains {:?}", char::from(*bad)),
        ));
    }
    Ok(())
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// The repository marker's key.
pub fn marker() -> RepoKey {
    RepoKey::join(&["syncbridge-repo"])
}

// ---------------------------------------------------------------------------------------
// Writer leases
// ---------------------------------------------------------------------------------------

/// Which single writer a lease guards (see `crate::lease`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseScope {
    /// `postgres stream` on one timeline.
    PostgresStream(TimelineId),
    /// `redis stream` (one per repository prefix).
    RedisStream,
}

impl fmt::Display for LeaseScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseScope::PostgresStream(tli) => write!(f, "postgres stream on timeline {tli}"),
            LeaseScope::RedisStream => f.write_str("redis stream"),
        }
    }
}

/// Every lease generation of `scope`.
pub fn lease_prefix(scope: LeaseScope) -> RepoKey {
    match scope {
        LeaseScope::PostgresStream(tli) => RepoKey(format!("leases/postgres-stream/{tli}")),
        LeaseScope::RedisStream => RepoKey::join(&["leases", "redis-stream"]),
    }
}

/// Generation `generation` of `scope`'s lease (16 hex digits, so names sort by generation).
pub fn lease(scope: LeaseScope, generation: u64) -> RepoKey {
    RepoKey(format!("{}/{generation:016X}", lease_prefix(scope)))
}

/// Whether `key` is a writer lease of any scope (plaintext by design, never restored).
pub fn is_lease_key(key: &RepoKey) -> bool {
    key.as_str().starts_with("leases/")
}

/// The generation of a lease key of `scope`, if `key` is one.
pub fn parse_lease(scope: LeaseScope, key: &RepoKey) -> Option<u64> {
    let rest = key
        .as_str()
        .strip_prefix(lease_prefix(scope).as_str())?
        .strip_prefix('/')?;
    (rest.len() == 16 && is_upper_hex(rest))
        .then(|| u64::from_str_radix(rest, 16).ok())
        .flatten()
}

// ---------------------------------------------------------------------------------------
// PostgreSQL WAL
// ---------------------------------------------------------------------------------------

/// A PostgreSQL timeline id (`TimeLineID`, never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(u32);

impl TimelineId {
    /// Rejects 0, which PostgreSQL never uses.
    pub fn new(id: u32) -> Result<Self> {
        if id == 0 {
            return Err(invalid("0", "timeline 0 does not exist"));
        }
        Ok(TimelineId(id))
    }

    /// The numeric id.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Parses the 8-hex-digit form used in file names.
    pub fn from_hex(text: &str) -> Result<Self> {
        if text.len() != 8 || !is_upper_hex(text) {
            return Err(invalid(text, "timeline must be 8 upper-case hex digits"));
        }
        let id = u32::from_str_radix(text, 16).map_err(|e| invalid(text, e.to_string()))?;
        Self::new(id)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

/// A WAL segment file name as in `pg_wal`: 24 upper-case hex digits (timeline, log, seg).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegmentName(String);

impl WalSegmentName {
    /// Validates the shape (the arithmetic is `wire`'s business).
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() != 24 || !is_upper_hex(text) {
            return Err(invalid(
                text,
                "WAL segment name must be 24 upper-case hex digits",
            ));
        }
        TimelineId::from_hex(&text[..8])?;
        Ok(WalSegmentName(text.to_owned()))
    }

    /// The timeline encoded in the first 8 digits.
    pub fn timeline(&self) -> TimelineId {
        // Validated in `parse`.
        TimelineId(u32::from_str_radix(&self.0[..8], 16).unwrap_or(1))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WalSegmentName({})", self.0)
    }
}

/// All WAL of all timelines.
pub fn wal_prefix() -> RepoKey {
    RepoKey::join(&["postgres", "wal"])
}

/// All WAL objects of one timeline (segments, partials, its history file).
pub fn wal_timeline_prefix(tli: TimelineId) -> RepoKey {
    RepoKey(format!("postgres/wal/{tli}"))
}

/// A complete segment. It is stored under the timeline in its own name.
pub fn wal_segment(segment: &WalSegmentName) -> RepoKey {
    RepoKey(format!("postgres/wal/{}/{}", segment.timeline(), segment))
}

/// The first `end_offset` bytes of a segment still being written. Several partials of one
/// segment may exist briefly; the one with the largest end offset is the newest.
pub fn wal_partial(segment: &WalSegmentName, end_offset: u32) -> RepoKey {
    RepoKey(format!(
        "postgres/wal/{}/{}.partial.{:08X}",
        segment.timeline(),
        segment,
        end_offset
    ))
}

/// Bytes `[start, end)` of a segment still being written: one link of the segment's delta
/// chain. The chain starts at 0 and each delta starts where the previous one ended, so the
/// segment's first `end` bytes cost one write of what is new, not of the whole prefix.
/// Fixed-width hex keeps a listing in chain order (by start, then end).
pub fn wal_delta(segment: &WalSegmentName, start: u32, end: u32) -> RepoKey {
    RepoKey(format!(
        "postgres/wal/{}/{}.delta.{:08X}-{:08X}",
        segment.timeline(),
        segment,
        start,
        end
    ))
}

/// A timeline history file `0000000N.history` (PostgreSQL's `TLHistoryFileName`).
pub fn timeline_history(tli: TimelineId) -> RepoKey {
    RepoKey(format!("postgres/wal/{tli}/{tli}.history"))
}

/// Everything [`wal_conflict`] wrote.
pub fn wal_conflicts_prefix() -> RepoKey {
    RepoKey::join(&["postgres", "conflicts"])
}

/// Where the agent keeps its own version of a WAL segment or history file that differs
/// from the one already stored: outside `postgres/wal/` so nothing ever restores from it,
/// inside the repository so it outlives the agent's container and can be compared.
/// `unix_ms` keeps repeated conflicts of one file apart.
pub fn wal_conflict(original: &WalObject, unix_ms: u64) -> RepoKey {
    let name = match original {
        WalObject::Segment(s) => s.to_string(),
        WalObject::Partial {
            segment,
            end_offset,
        } => format!("{segment}.partial.{end_offset:08X}"),
        WalObject::Delta {
            segment,
            start,
            end,
        } => format!("{segment}.delta.{start:08X}-{end:08X}"),
        WalObject::History(t) => format!("{t}.history"),
    };
    RepoKey(format!("postgres/conflicts/{name}.{unix_ms}"))
}

/// What a key under `postgres/wal/` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalObject {
    /// A complete segment.
    Segment(WalSegmentName),
    /// A partial segment holding bytes `[0, end_offset)`.
    Partial {
        /// The segment.
        segment: WalSegmentName,
        /// Bytes of the segment the object holds.
        end_offset: u32,
    },
    /// Bytes `[start, end)` of a segment in progress (`start < end`).
    Delta {
        /// The segment.
        segment: WalSegmentName,
        /// First byte of the segment the object holds.
        start: u32,
        /// Byte after the last one it holds.
        end: u32,
    },
    /// A timeline history file.
    History(TimelineId),
}

impl WalObject {
    /// The segment a segment, partial or delta belongs to (`None` for a history file).
    pub fn segment(&self) -> Option<&WalSegmentName> {
        match self {
            WalObject::Segment(s)
            | WalObject::Partial { segment: s, .. }
            | WalObject::Delta { segment: s, .. } => Some(s),
            WalObject::History(_) => None,
        }
    }
}

/// Parses a key produced by the WAL functions above; `None` for anything else.
pub fn parse_wal_key(key: &RepoKey) -> Option<WalObject> {
    let rest = key.as_str().strip_prefix("postgres/wal/")?;
    let (tli_text, name) = rest.split_once('/')?;
    let tli = TimelineId::from_hex(tli_text).ok()?;
    if let Some(h) = name.strip_suffix(".history") {
        let htli = TimelineId::from_hex(h).ok()?;
        return (htli == tli).then_some(WalObject::History(tli));
    }
    if let Some((seg, end)) = name.split_once(".partial.") {
        let segment = WalSegmentName::parse(seg).ok()?;
        if end.len() != 8 || !is_upper_hex(end) || segment.timeline() != tli {
            return None;
        }
        let end_offset = u32::from_str_radix(end, 16).ok()?;
        return Some(WalObject::Partial {
            segment,
            end_offset,
        });
    }
    if let Some((seg, range)) = name.split_once(".delta.") {
        let segment = WalSegmentName::parse(seg).ok()?;
        let (a, b) = range.split_once('-')?;
        if a.len() != 8 || b.len() != 8 || !is_upper_hex(a) || !is_upper_hex(b) {
            return None;
        }
        let start = u32::from_str_radix(a, 16).ok()?;
        let end = u32::from_str_radix(b, 16).ok()?;
        return (segment.timeline() == tli && start < end).then_some(WalObject::Delta {
            segment,
            start,
            end,
        });
    }
    let segment = WalSegmentName::parse(name).ok()?;
    (segment.timeline() == tli).then_some(WalObject::Segment(segment))
}

// ---------------------------------------------------------------------------------------
// Base backups
// ---------------------------------------------------------------------------------------

/// A base backup's id: 1..=64 characters of `[A-Za-z0-9_-]`, e.g. `20261127T160700Z`.
/// Choose ids that sort by start time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupId(String);

impl BackupId {
    /// Validates an id.
    pub fn parse(text: &str) -> Result<Self> {
        check_id(text, "backup id")?;
        Ok(BackupId(text.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_id(text: &str, what: &str) -> Result<()> {
    if text.is_empty() || text.len() > 64 {
        return Err(invalid(text, format!("{what} must be 1 to 64 characters")));
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            text,
            format!("{what} may only contain A-Z a-z 0-9 _ -"),
        ));
    }
    Ok(())
}

/// All base backups.
pub fn base_backups_prefix() -> RepoKey {
    RepoKey::join(&["postgres", "base"])
}

/// Everything of one base backup.
pub fn base_backup_prefix(id: &BackupId) -> RepoKey {
    RepoKey(format!("postgres/base/{id}"))
}

/// Data chunk `seq` of a base backup (stream order, so restore can parallelise by chunk).
pub fn base_backup_chunk(id: &BackupId, seq: u64) -> RepoKey {
    RepoKey(format!("postgres/base/{id}/data/{seq:010}"))
}

/// The server's `backup_manifest` file.
pub fn base_backup_server_manifest(id: &BackupId) -> RepoKey {
    RepoKey(format!("postgres/base/{id}/backup_manifest"))
}

/// The agent's manifest of the backup, written last: a backup without it is incomplete.
pub fn base_backup_manifest(id: &BackupId) -> RepoKey {
    RepoKey(format!("postgres/base/{id}/backup.json"))
}

/// The pin of a base backup: while this object exists `expire` keeps the backup. One small
/// object written or deleted whole, so a kill leaves the backup either pinned or not.
pub fn base_backup_pin(id: &BackupId) -> RepoKey {
    RepoKey(format!("postgres/base/{id}/pinned"))
}

/// The backup a [`base_backup_pin`] key pins; `None` for any other key.
pub fn parse_base_backup_pin(key: &RepoKey) -> Option<BackupId> {
    let rest = key.as_str().strip_prefix("postgres/base/")?;
    let id = rest.strip_suffix("/pinned")?;
    BackupId::parse(id).ok()
}

/// The tombstone `expire` writes before it removes a backup's `backup.json` and deletes
/// last: a directory with it is the leftover of an interrupted expire (safe to finish),
/// one without it and without `backup.json` may be a backup still being written.
pub fn base_backup_expiring(id: &BackupId) -> RepoKey {
    RepoKey(format!("postgres/base/{id}/expiring"))
}

/// The backup a [`base_backup_expiring`] key belongs to; `None` for any other key.
pub fn parse_base_backup_expiring(key: &RepoKey) -> Option<BackupId> {
    let rest = key.as_str().strip_prefix("postgres/base/")?;
    let id = rest.strip_suffix("/expiring")?;
    BackupId::parse(id).ok()
}

/// What a key under `postgres/base/` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseBackupObject {
    /// Data chunk number `seq`.
    Chunk {
        /// The backup.
        id: BackupId,
        /// Chunk sequence number.
        seq: u64,
    },
    /// The server's backup_manifest.
    ServerManifest(BackupId),
    /// The agent's manifest (completion marker).
    Manifest(BackupId),
}

/// Parses a key produced by the base backup functions; `None` for anything else.
pub fn parse_base_backup_key(key: &RepoKey) -> Option<BaseBackupObject> {
    let rest = key.as_str().strip_prefix("postgres/base/")?;
    let (id, name) = rest.split_once('/')?;
    let id = BackupId::parse(id).ok()?;
    match name {
        "backup_manifest" => Some(BaseBackupObject::ServerManifest(id)),
        "backup.json" => Some(BaseBackupObject::Manifest(id)),
        _ => {
            let seq = name.strip_prefix("data/")?;
            if seq.len() != 10 || !seq.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(BaseBackupObject::Chunk {
                id,
                seq: seq.parse().ok()?,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------

/// A Redis Cluster shard's key in the repository (`s01`, `s02`, ...: `s` and 2 to 8
/// digits), given in order of first sight and never reused; it outlives failovers, which
/// change the master's node id and replication id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey(String);

impl ShardKey {
    /// The `n`th shard (1-based): `s01`, ..., `s99`, `s100`.
    pub fn nth(n: u32) -> Self {
        ShardKey(format!("s{n:02}"))
    }

    /// Validates a shard key.
    pub fn parse(text: &str) -> Result<Self> {
        let digits = text.strip_prefix('s').unwrap_or("");
        if !(2..=8).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid(text, "a shard key is `s` and 2 to 8 digits (s01)"));
        }
        Ok(ShardKey(text.to_owned()))
    }

    /// Its number (`s07` → 7).
    pub fn number(&self) -> u32 {
        self.0[1..].parse().unwrap_or(0)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything of a Redis Cluster capture.
pub fn redis_cluster_prefix() -> RepoKey {
    RepoKey::join(&["redis", "cluster"])
}

/// Every shard of the cluster.
pub fn redis_cluster_shards_prefix() -> RepoKey {
    RepoKey::join(&["redis", "cluster", "shards"])
}

/// One shard: the prefix of its scoped view (`Repository::scoped`), which holds its
/// generations as `redis/gen/...` and its `shard.json`.
pub fn redis_cluster_shard(shard: &ShardKey) -> RepoKey {
    RepoKey(format!("redis/cluster/shards/{shard}"))
}

/// The shard key of a [`redis_cluster_shard`] prefix.
pub fn parse_redis_cluster_shard(key: &RepoKey) -> Option<ShardKey> {
    let rest = key.as_str().strip_prefix("redis/cluster/shards/")?;
    ShardKey::parse(rest).ok()
}

/// The shard's record (what identifies it), relative to the shard's scoped view.
pub fn redis_shard_record() -> RepoKey {
    RepoKey::join(&["shard.json"])
}

/// Every slot-map record.
pub fn redis_slot_maps_prefix() -> RepoKey {
    RepoKey::join(&["redis", "cluster", "slotmap"])
}

/// The slot map that took effect at `unix_ms`.
pub fn redis_slot_map(unix_ms: u64) -> RepoKey {
    RepoKey(format!("redis/cluster/slotmap/{unix_ms:020}"))
}

/// The effective time of a [`redis_slot_map`] key.
pub fn parse_redis_slot_map(key: &RepoKey) -> Option<u64> {
    let rest = key.as_str().strip_prefix("redis/cluster/slotmap/")?;
    (rest.len() == 20 && rest.bytes().all(|b| b.is_ascii_digit()))
        .then(|| rest.parse().ok())
        .flatten()
}

// ---------------------------------------------------------------------------------------
// Redis generations
// ---------------------------------------------------------------------------------------

/// A Redis snapshot generation's id: 1..=64 characters of `[A-Za-z0-9_-]`; choose ids
/// that sort by start time (e.g. `20261127T160700Z-<replid prefix>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationId(String);

impl GenerationId {
    /// Validates an id.
    pub fn parse(text: &str) -> Result<Self> {
        check_id(text, "generation id")?;
        Ok(GenerationId(text.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// All Redis generations.
pub fn redis_generations_prefix() -> RepoKey {
    RepoKey::join(&["redis", "gen"])
}

/// Everything of one generation.
pub fn redis_generation_prefix(id: &GenerationId) -> RepoKey {
    RepoKey(format!("redis/gen/{id}"))
}

/// The generation's RDB snapshot.
pub fn redis_snapshot(id: &GenerationId) -> RepoKey {
    RepoKey(format!("redis/gen/{id}/snapshot.rdb"))
}

/// All command-stream chunks of a generation.
pub fn redis_chunks_prefix(id: &GenerationId) -> RepoKey {
    RepoKey(format!("redis/gen/{id}/chunks"))
}

/// The command-stream chunk holding replication offsets `[start, end)`.
pub fn redis_chunk(id: &GenerationId, start: u64, end: u64) -> RepoKey {
    RepoKey(format!("redis/gen/{id}/chunks/{start:020}-{end:020}"))
}

/// The generation manifest.
pub fn redis_generation_manifest(id: &GenerationId) -> RepoKey {
    RepoKey(format!("redis/gen/{id}/generation.json"))
}

/// The pin of a Redis generation (see [`base_backup_pin`]).
pub fn redis_generation_pin(id: &GenerationId) -> RepoKey {
    RepoKey(format!("redis/gen/{id}/pinned"))
}

/// The generation a [`redis_generation_pin`] key pins; `None` for any other key.
pub fn parse_redis_generation_pin(key: &RepoKey) -> Option<GenerationId> {
    let rest = key.as_str().strip_prefix("redis/gen/")?;
    let id = rest.strip_suffix("/pinned")?;
    GenerationId::parse(id).ok()
}

/// The tombstone of a generation being expired (see [`base_backup_expiring`]).
pub fn redis_generation_expiring(id: &GenerationId) -> RepoKey {
    RepoKey(format!("redis/gen/{id}/expiring"))
}

/// The generation a [`redis_generation_expiring`] key belongs to; `None` for any other key.
pub fn parse_redis_generation_expiring(key: &RepoKey) -> Option<GenerationId> {
    let rest = key.as_str().strip_prefix("redis/gen/")?;
    let id = rest.strip_suffix("/expiring")?;
    GenerationId::parse(id).ok()
}

/// What a key under `redis/gen/` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisObject {
    /// The snapshot.
    Snapshot(GenerationId),
    /// A chunk of the replication stream.
    Chunk {
        /// The generation.
        id: GenerationId,
        /// First replication offset in the chunk.
        start: u64,
        /// Offset just past the chunk.
        end: u64,
    },
    /// The generation manifest.
    Manifest(GenerationId),
}

/// Parses a key produced by the Redis functions; `None` for anything else.
pub fn parse_redis_key(key: &RepoKey) -> Option<RedisObject> {
    let rest = key.as_str().strip_prefix("redis/gen/")?;
    let (id, name) = rest.split_once('/')?;
    let id = GenerationId::parse(id).ok()?;
    match name {
        "snapshot.rdb" => Some(RedisObject::Snapshot(id)),
        "generation.json" => Some(RedisObject::Manifest(id)),
        _ => {
            let range = name.strip_prefix("chunks/")?;
            let (s, e) = range.split_once('-')?;
            let digits = |t: &str| t.len() == 20 && t.bytes().all(|b| b.is_ascii_digit());
            if !digits(s) || !digits(e) {
                return None;
            }
            let (start, end) = (s.parse().ok()?, e.parse().ok()?);
            (start <= end).then_some(RedisObject::Chunk { id, start, end })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn key_validation() {
        assert!(RepoKey::parse("postgres/wal/x").is_ok());
        assert!(RepoKey::parse("/postgres/wal/").is_ok());
        assert!(RepoKey::parse("").unwrap().is_root());
        for bad in ["a//b", "a/../b", "a/.hidden", "a b", "a/b\\c", "é"] {
            assert!(RepoKey::parse(bad).is_err(), "{bad}");
        }
        let k = RepoKey::parse("postgres/wal/00000001/x").unwrap();
        assert!(k.starts_with(&wal_prefix()));
        assert!(!RepoKey::parse("postgres/walx")
            .unwrap()
            .starts_with(&wal_prefix()));
        assert_eq!(k.file_name(), "x");
    }

    #[test]
    fn wal_keys_round_trip() {
        let seg = WalSegmentName::parse("000000020000000A000000FF").unwrap();
        assert_eq!(seg.timeline().get(), 2);
        let k = wal_segment(&seg);
        assert_eq!(k.as_str(), "postgres/wal/00000002/000000020000000A000000FF");
        assert_eq!(parse_wal_key(&k), Some(WalObject::Segment(seg.clone())));
        let p = wal_partial(&seg, 0x1234);
        assert_eq!(
            p.as_str(),
            "postgres/wal/00000002/000000020000000A000000FF.partial.00001234"
        );
        assert_eq!(
            parse_wal_key(&p),
            Some(WalObject::Partial {
                segment: seg.clone(),
                end_offset: 0x1234
            })
        );
        let d = wal_delta(&seg, 0x2000, 0x2A10);
        assert_eq!(
            d.as_str(),
            "postgres/wal/00000002/000000020000000A000000FF.delta.00002000-00002A10"
        );
        assert_eq!(
            parse_wal_key(&d),
            Some(WalObject::Delta {
                segment: seg.clone(),
                start: 0x2000,
                end: 0x2A10
            })
        );
        // Deltas list in chain order, after their segment and before the next one.
        let next = WalSegmentName::parse("000000020000000B00000000").unwrap();
        let mut keys = [
            wal_segment(&next),
            wal_delta(&seg, 0x10000, 0x20000),
            wal_delta(&seg, 0, 0x10000),
            wal_segment(&seg),
        ];
        keys.sort();
        assert_eq!(keys[0], wal_segment(&seg));
        assert_eq!(keys[1], wal_delta(&seg, 0, 0x10000));
        assert_eq!(keys[3], wal_segment(&next));
        let c = wal_conflict(&parse_wal_key(&d).unwrap(), 7);
        assert_eq!(
            c.as_str(),
            "postgres/conflicts/000000020000000A000000FF.delta.00002000-00002A10.7"
        );
        for bad in [
            "000000020000000A000000FF.delta.00002000-00002000",
            "000000020000000A000000FF.delta.00003000-00002000",
            "000000020000000A000000FF.delta.2000-00003000",
            "000000020000000A000000FF.delta.00002000-0000300a",
            "000000030000000A000000FF.delta.00002000-00003000",
        ] {
            let k = RepoKey::parse(&format!("postgres/wal/00000002/{bad}")).unwrap();
            assert!(parse_wal_key(&k).is_none(), "{bad}");
        }
        let tli = TimelineId::new(3).unwrap();
        let h = timeline_history(tli);
        assert_eq!(h.as_str(), "postgres/wal/00000003/00000003.history");
        assert_eq!(parse_wal_key(&h), Some(WalObject::History(tli)));
        let c = wal_conflict(&WalObject::History(tli), 1_795_000_000_123);
        assert_eq!(
            c.as_str(),
            "postgres/conflicts/00000003.history.1795000000123"
        );
        assert!(parse_wal_key(&c).is_none() && !c.starts_with(&wal_prefix()));
        assert!(RepoKey::parse(c.as_str()).is_ok());
        assert!(WalSegmentName::parse("000000010000000000000003x").is_err());
        assert!(WalSegmentName::parse("00000001000000000000000a").is_err());
        assert!(WalSegmentName::parse("000000000000000000000003").is_err());
        assert!(parse_wal_key(
            &RepoKey::parse("postgres/wal/00000001/000000020000000000000003").unwrap()
        )
        .is_none());
    }

    #[test]
    fn redis_cluster_keys_round_trip() {
        let s = ShardKey::nth(3);
        assert_eq!(s.as_str(), "s03");
        assert_eq!(ShardKey::nth(123).as_str(), "s123");
        assert_eq!(ShardKey::parse("s03").unwrap(), s);
        assert_eq!(s.number(), 3);
        for bad in ["s1", "03", "s0a", "s", "s123456789", "x03"] {
            assert!(ShardKey::parse(bad).is_err(), "{bad}");
        }
        let p = redis_cluster_shard(&s);
        assert_eq!(p.as_str(), "redis/cluster/shards/s03");
        assert_eq!(parse_redis_cluster_shard(&p), Some(s));
        let m = redis_slot_map(1_764_000_000_123);
        assert_eq!(m.as_str(), "redis/cluster/slotmap/00000001764000000123");
        assert_eq!(parse_redis_slot_map(&m), Some(1_764_000_000_123));
        assert_eq!(parse_redis_slot_map(&redis_slot_maps_prefix()), None);
    }

    #[test]
    fn backup_and_redis_keys_round_trip() {
        let id = BackupId::parse("20261127T160700Z").unwrap();
        let c = base_backup_chunk(&id, 42);
        assert_eq!(c.as_str(), "postgres/base/20261127T160700Z/data/0000000042");
        assert_eq!(
            parse_base_backup_key(&c),
            Some(BaseBackupObject::Chunk {
                id: id.clone(),
                seq: 42
            })
        );
        assert_eq!(
            parse_base_backup_key(&base_backup_manifest(&id)),
            Some(BaseBackupObject::Manifest(id.clone()))
        );
        assert!(BackupId::parse("a/b").is_err());
        let g = GenerationId::parse("g1").unwrap();
        let ch = redis_chunk(&g, 5, 1_000);
        assert_eq!(
            ch.as_str(),
            "redis/gen/g1/chunks/00000000000000000005-00000000000000001000"
        );
        assert_eq!(
            parse_redis_key(&ch),
            Some(RedisObject::Chunk {
                id: g.clone(),
                start: 5,
                end: 1000
            })
        );
        assert_eq!(
            parse_redis_key(&redis_snapshot(&g)),
            Some(RedisObject::Snapshot(g.clone()))
        );
        assert_eq!(
            parse_redis_key(&redis_generation_manifest(&g)),
            Some(RedisObject::Manifest(g))
        );
    }

    #[test]
    fn lease_keys_round_trip() {
        let pg = LeaseScope::PostgresStream(TimelineId::new(3).unwrap());
        let k = lease(pg, 0x2a);
        assert_eq!(
            k.as_str(),
            "leases/postgres-stream/00000003/000000000000002A"
        );
        assert_eq!(parse_lease(pg, &k), Some(0x2a));
        let other_tli = LeaseScope::PostgresStream(TimelineId::new(4).unwrap());
        assert_eq!(parse_lease(other_tli, &k), None);
        assert_eq!(parse_lease(LeaseScope::RedisStream, &k), None);
        let r = lease(LeaseScope::RedisStream, 1);
        assert_eq!(r.as_str(), "leases/redis-stream/0000000000000001");
        assert_eq!(parse_lease(LeaseScope::RedisStream, &r), Some(1));
        let bad = RepoKey::parse("leases/redis-stream/1").unwrap();
        assert_eq!(parse_lease(LeaseScope::RedisStream, &bad), None);
    }

    #[test]
    fn pin_keys_round_trip_and_are_nothing_else() {
        let b = BackupId::parse("20261201T100000Z").unwrap();
        let k = base_backup_pin(&b);
        assert_eq!(k.as_str(), "postgres/base/20261201T100000Z/pinned");
        assert_eq!(parse_base_backup_pin(&k), Some(b.clone()));
        assert_eq!(parse_base_backup_key(&k), None);
        assert_eq!(parse_base_backup_pin(&base_backup_manifest(&b)), None);
        let g = GenerationId::parse("20261201T100000Z-abc").unwrap();
        let k = redis_generation_pin(&g);
        assert_eq!(k.as_str(), "redis/gen/20261201T100000Z-abc/pinned");
        assert_eq!(parse_redis_generation_pin(&k), Some(g.clone()));
        assert_eq!(parse_redis_key(&k), None);
        assert_eq!(parse_redis_generation_pin(&redis_snapshot(&g)), None);
        let nested = RepoKey::parse("postgres/base/a/data/pinned").unwrap();
        assert_eq!(parse_base_backup_pin(&nested), None);
        let t = base_backup_expiring(&b);
        assert_eq!(parse_base_backup_expiring(&t), Some(b.clone()));
        assert_eq!(parse_base_backup_pin(&t), None);
        assert_eq!(parse_base_backup_key(&t), None);
        let t = redis_generation_expiring(&g);
        assert_eq!(parse_redis_generation_expiring(&t), Some(g.clone()));
        assert_eq!(parse_redis_key(&t), None);
    }
}
