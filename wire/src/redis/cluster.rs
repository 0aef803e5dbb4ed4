//! Redis Cluster and Valkey Cluster topology, without I/O: key hash slots, the replies of
//! `CLUSTER SHARDS` and `CLUSTER NODES`, and the slot map (which master owns each of the 16384
//! slots) with its coverage check, a stable serialisation and a diff.
//!
//! Sources: `keyHashSlot` in Redis `src/cluster.c` (hash tags), `src/crc16.c` (CRC16-XMODEM),
//! `addShardReplyForClusterShards` / `addNodeDetailsToShardReply` (CLUSTER SHARDS) and
//! `clusterGenNodeDescription` (CLUSTER NODES) in `src/cluster_legacy.c` (Redis 7.2+, Valkey;
//! `src/cluster.c` in 7.0), and the cluster specification
//! <https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/>.
//!
//! What the servers on the test matrix send (checked against them):
//! - Redis 7.0 groups `CLUSTER SHARDS` by master and gives shards no `id`; Valkey 9 groups by
//!   shard id and adds the shard's `id` after `nodes`, so a failed master stays in its shard
//!   next to the replica promoted in its place (see [`Shard::other_masters`]).
//! - Slot bounds are integers; a master without slots is a shard with an empty `slots`.
//! - `CLUSTER NODES` lists `[slot->-id]` / `[slot-<-id]` while a slot migrates: these are not
//!   ownership (the slot still belongs to the listing master) and are skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crc::{Crc, CRC_16_XMODEM};

use super::resp::Reply;

/// Number of hash slots (`CLUSTER_SLOTS`).
pub const SLOT_COUNT: u16 = 16384;

/// The last slot.
pub const MAX_SLOT: u16 = SLOT_COUNT - 1;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// CRC16-XMODEM (poly 0x1021, init 0, no reflection), the checksum of Redis `src/crc16.c`.
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// The hash slot of `key`, exactly as `keyHashSlot` in Redis `src/cluster.c`: when the key
/// holds a `{` followed later by a `}` with at least one byte between them, only the bytes
/// between the first `{` and the first `}` after it are hashed (a hash tag); otherwise the
/// whole key.
pub fn key_hash_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => {
            let rest = &key[open + 1..];
            match rest.iter().position(|&b| b == b'}') {
                Some(len) if len > 0 => &rest[..len],
                _ => key,
            }
        }
        None => key,
    };
    crc16(hashed) & MAX_SLOT
}

/// Why cluster data could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A `CLUSTER SHARDS` reply that does not have the documented shape.
    #[error("CLUSTER SHARDS reply: {0}")]
    Shards(String),
    /// A `CLUSTER SHARDS` shard listing several masters none of which is marked failed:
    /// Valkey groups by shard id, so right after a failover (before the old master is
    /// flagged `fail`, up to `cluster-node-timeout` later) the dead master and the promoted
    /// replica are both `master`, and the reply does not say which one owns the slots.
    /// `CLUSTER NODES` does (slots are listed per node).
    #[error(
        "CLUSTER SHARDS lists {} masters not marked failed in one shard ({}), a failover not          settled yet: read CLUSTER NODES instead",
        masters.len(),
        masters.join(", ")
    )]
    AmbiguousShard {
        /// The node ids claiming to be the shard's master.
        masters: Vec<String>,
    },
    /// A `CLUSTER NODES` line that cannot be read.
    #[error("CLUSTER NODES line {line}: {reason}")]
    Nodes {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A slot or slot range outside 0-16383, or with its end before its start.
    #[error("slot range {start}-{end} is not within 0-{MAX_SLOT}")]
    InvalidSlotRange {
        /// The first slot given.
        start: i64,
        /// The last slot given.
        end: i64,
    },
    /// A slot token that is not `<n>` or `<n>-<m>` in decimal.
    #[error("slot {0} is not a slot number or range")]
    BadSlot(String),
    /// An owner label that cannot be stored in a slot map (empty, too long, whitespace or
    /// control characters).
    #[error("slot map owner {0} is not 1-{MAX_OWNER_LEN} printable ASCII characters")]
    InvalidOwner(String),
    /// A serialised slot map that is not in the canonical form written by
    /// [`SlotMapRecord::encode`].
    #[error("serialised slot map, line {line}: {reason}")]
    SlotMapFormat {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Slots without an owner or owned more than once.
    #[error(transparent)]
    Coverage(#[from] CoverageError),
}

/// At most this much of a peer's text is quoted in an error.
const QUOTE_LEN: usize = 80;

fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_LEN) {
        Some((i, _)) => format!("{:?}...", &s[..i]),
        None => format!("{s:?}"),
    }
}

/// An inclusive range of slots, `start <= end <= 16383`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotRange {
    start: u16,
    end: u16,
}

impl SlotRange {
    /// `start..=end`, refused outside 0-16383 or when `end < start`.
    pub fn new(start: i64, end: i64) -> Result<SlotRange, ClusterError> {
        let bad = || ClusterError::InvalidSlotRange { start, end };
        let s = u16::try_from(start).map_err(|_| bad())?;
        let e = u16::try_from(end).map_err(|_| bad())?;
        if s > e || e > MAX_SLOT {
            return Err(bad());
        }
        Ok(SlotRange { start: s, end: e })
    }

    /// One slot.
    pub fn single(slot: u16) -> Result<SlotRange, ClusterError> {
        SlotRange::new(i64::from(slot), i64::from(slot))
    }

    /// First slot.
    pub fn start(&self) -> u16 {
        self.start
    }

    /// Last slot (inclusive).
    pub fn end(&self) -> u16 {
        self.end
    }

    /// Number of slots, at least 1.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Never true: a range holds at least one slot (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `slot` is in the range.
    pub fn contains(&self, slot: u16) -> bool {
        (self.start..=self.end).contains(&slot)
    }

    /// Every slot of the range.
    pub fn slots(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

/// `5` or `0-5460`, the notation of `CLUSTER NODES` and `redis-cli`.
impl fmt::Display for SlotRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for SlotRange {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<SlotRange, ClusterError> {
        let bad = || ClusterError::BadSlot(quote(s));
        let num = |t: &str| -> Result<i64, ClusterError> {
            // Plain decimal digits only: no sign, no spaces (`i64::from_str` takes `+5`).
            if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        match s.split_once('-') {
            Some((a, b)) => SlotRange::new(num(a)?, num(b)?),
            None => {
                let n = num(s)?;
                SlotRange::new(n, n)
            }
        }
    }
}

/// A set of slots as sorted, disjoint, non-adjacent ranges (adjacent ranges are merged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SlotRanges(Vec<SlotRange>);

impl SlotRanges {
    /// The empty set.
    pub fn new() -> SlotRanges {
        SlotRanges(Vec::new())
    }

    /// Every slot, 0-16383.
    pub fn all() -> SlotRanges {
        SlotRanges(vec![SlotRange {
            start: 0,
            end: MAX_SLOT,
        }])
    }

    /// The union of `ranges`, in any order, overlapping or not.
    pub fn from_ranges(ranges: impl IntoIterator<Item = SlotRange>) -> SlotRanges {
        let mut v: Vec<SlotRange> = ranges.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<SlotRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                    last.end = last.end.max(r.end);
                }
                _ => out.push(r),
            }
        }
        SlotRanges(out)
    }

    /// The set of `slots`.
    pub fn from_slots(slots: impl IntoIterator<Item = u16>) -> SlotRanges {
        SlotRanges::from_ranges(
            slots
                .into_iter()
                .filter(|&s| s <= MAX_SLOT)
                .map(|s| SlotRange { start: s, end: s }),
        )
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[SlotRange] {
        &self.0
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.0.iter().map(SlotRange::len).sum()
    }

    /// No slot at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `slot` is in the set.
    pub fn contains(&self, slot: u16) -> bool {
        // Ranges are sorted and disjoint: binary search on the start.
        let i = self.0.partition_point(|r| r.start <= slot);
        i > 0 && self.0[i - 1].contains(slot)
    }

    /// Every slot in ascending order.
    pub fn slots(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(SlotRange::slots)
    }

    /// The lowest slot.
    pub fn first(&self) -> Option<u16> {
        self.0.first().map(|r| r.start)
    }
}

/// `0-5460,5461,5463-6000`; empty for no slot.
impl fmt::Display for SlotRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// A node's role in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    /// `master` (`CLUSTER SHARDS`) / flag `master` (`CLUSTER NODES`).
    Master,
    /// `replica` / flag `slave`.
    Replica,
}

/// A node's health as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeHealth {
    /// `online` (and every node `CLUSTER NODES` does not flag `fail`).
    Online,
    /// `fail` (flag `fail`: the cluster agreed the node is down; `fail?` alone is only a
    /// suspicion of the answering node and is not a failure).
    Failed,
    /// `loading`: a replica still taking its initial sync.
    Loading,
    /// Any other value, kept verbatim.
    Other(String),
}

impl NodeHealth {
    fn parse(s: &str) -> NodeHealth {
        match s {
            "online" => NodeHealth::Online,
            "fail" | "failed" => NodeHealth::Failed,
            "loading" => NodeHealth::Loading,
            other => NodeHealth::Other(other.to_owned()),
        }
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// The node id (40 hex characters); changes never, not even on failover.
    pub id: String,
    /// IP address the node announces (empty for a `noaddr` node).
    pub ip: String,
    /// The preferred endpoint (`cluster-preferred-endpoint-type`); `CLUSTER SHARDS` only.
    pub endpoint: Option<String>,
    /// The announced hostname, when one is set.
    pub hostname: Option<String>,
    /// The plain TCP client port (absent when the node only serves TLS).
    pub port: Option<u16>,
    /// The TLS client port.
    pub tls_port: Option<u16>,
    /// The cluster bus port; `CLUSTER NODES` only.
    pub bus_port: Option<u16>,
    /// Master or replica.
    pub role: NodeRole,
    /// The node's replication offset; `CLUSTER SHARDS` only.
    pub replication_offset: Option<u64>,
    /// Online, failed or loading.
    pub health: NodeHealth,
}

impl NodeInfo {
    /// The address a client connects to: `ip` (or the endpoint/hostname when the IP is
    /// empty) and the plain port, else the TLS port.
    pub fn address(&self) -> Option<(String, u16)> {
        let host = [
            Some(self.ip.as_str()),
            self.endpoint.as_deref(),
            self.hostname.as_deref(),
        ]
        .into_iter()
        .flatten()
        .find(|h| !h.is_empty() && *h != "?")?;
        let port = self.port.or(self.tls_port)?;
        Some((host.to_owned(), port))
    }
}

/// A master, its replicas and the slots the master owns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shard {
    /// The shard id (`CLUSTER MYSHARDID`, Redis 7.2+ and Valkey), kept across failovers;
    /// `None` from Redis 7.0 and from `CLUSTER NODES`.
    pub id: Option<String>,
    /// The master serving the shard: the master not marked failed, else the first master.
    pub master: NodeInfo,
    /// Replicas, sorted by id.
    pub replicas: Vec<NodeInfo>,
    /// Further nodes that say they are masters of this shard: Valkey keeps a failed master in
    /// its shard (by shard id) after its replica took over. Sorted by id.
    pub other_masters: Vec<NodeInfo>,
    /// The slots the master owns.
    pub slots: SlotRanges,
}

/// The whole cluster as one node sees it: every shard, in a canonical order (by lowest slot,
/// shards without slots last by master id) so that two views of one cluster compare equal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterTopology {
    /// Every shard, slot-less masters included.
    pub shards: Vec<Shard>,
}

impl ClusterTopology {
    /// Reads a RESP2 `CLUSTER SHARDS` reply: an array of shards, each a flat array of
    /// key/value pairs (`slots`: start/end integers, `nodes`: arrays of key/value pairs,
    /// `id` on Valkey and Redis 7.2+). Unknown keys are skipped.
    pub fn from_cluster_shards(reply: &Reply) -> Result<ClusterTopology, ClusterError> {
        let err = |m: String| ClusterError::Shards(m);
        let Reply::Array(items) = reply else {
            return Err(err(format!(
                "expected an array of shards, got {}",
                kind(reply)
            )));
        };
        let mut shards = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            shards.push(parse_shard(item).map_err(|e| match e {
                ShardError::Shape(m) => err(format!("shard {i}: {m}")),
                ShardError::Ambiguous(masters) => ClusterError::AmbiguousShard { masters },
            })?);
        }
        Ok(ClusterTopology::canonical(shards))
    }

    /// Reads `CLUSTER NODES` text (the fallback when `CLUSTER SHARDS` is missing or refused):
    /// one node a line, `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong>
    /// <epoch> <link> <slot>...`. Nodes still in `handshake` are skipped; replicas join their
    /// master's shard.
    pub fn from_cluster_nodes(text: &str) -> Result<ClusterTopology, ClusterError> {
        let mut masters: Vec<(NodeInfo, SlotRanges, Option<String>)> = Vec::new();
        let mut replicas: Vec<(usize, NodeInfo, String)> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: String| ClusterError::Nodes {
                line: line_no,
                reason,
            };
            let Some(parsed) = parse_node_line(line).map_err(bad)? else {
                continue;
            };
            if !seen.insert(parsed.node.id.clone()) {
                return Err(bad(format!("node {} is listed twice", parsed.node.id)));
            }
            match parsed.node.role {
                NodeRole::Master => masters.push((parsed.node, parsed.slots, parsed.shard_id)),
                NodeRole::Replica => {
                    let master = parsed.master.ok_or_else(|| {
                        bad(format!("replica {} names no master", parsed.node.id))
                    })?;
                    replicas.push((line_no, parsed.node, master));
                }
            }
        }
        let mut shards: Vec<Shard> = masters
            .into_iter()
            .map(|(master, slots, id)| Shard {
                id,
                master,
                replicas: Vec::new(),
                other_masters: Vec::new(),
                slots,
            })
            .collect();
        let by_id: BTreeMap<String, usize> = shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.master.id.clone(), i))
            .collect();
        for (line, node, master) in replicas {
            let Some(&i) = by_id.get(&master) else {
                return Err(ClusterError::Nodes {
                    line,
                    reason: format!(
                        "replica {} follows {}, which is not a master in the list",
                        node.id,
                        quote(&master)
                    ),
                });
            };
            shards[i].replicas.push(node);
        }
        Ok(ClusterTopology::canonical(shards))
    }

    fn canonical(mut shards: Vec<Shard>) -> ClusterTopology {
        for s in &mut shards {
            s.replicas.sort_by(|a, b| a.id.cmp(&b.id));
            s.other_masters.sort_by(|a, b| a.id.cmp(&b.id));
        }
        shards.sort_by(|a, b| {
            let ka = (a.slots.first().map_or(u32::MAX, u32::from), &a.master.id);
            let kb = (b.slots.first().map_or(u32::MAX, u32::from), &b.master.id);
            ka.cmp(&kb)
        });
        ClusterTopology { shards }
    }

    /// The shards that own at least one slot.
    pub fn serving_shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().filter(|s| !s.slots.is_empty())
    }

    /// The index of the shard whose master is `node_id`.
    pub fn shard_of_master(&self, node_id: &str) -> Option<usize> {
        self.shards.iter().position(|s| s.master.id == node_id)
    }

    /// The index of the shard `node_id` belongs to, as master, replica or other master.
    pub fn shard_of_node(&self, node_id: &str) -> Option<usize> {
        self.shards.iter().position(|s| {
            s.master.id == node_id
                || s.replicas.iter().any(|n| n.id == node_id)
                || s.other_masters.iter().any(|n| n.id == node_id)
        })
    }

    /// The index of the shard owning `slot`.
    pub fn shard_of_slot(&self, slot: u16) -> Option<usize> {
        self.shards.iter().position(|s| s.slots.contains(slot))
    }

    /// The slot map: each slot to its shard's master id. Refused when shards overlap; gaps
    /// are allowed here (a cluster mid-setup), see [`SlotMap::check_complete`].
    pub fn slot_map(&self) -> Result<SlotMap, CoverageError> {
        SlotMap::from_ranges(self.shards.iter().flat_map(|s| {
            s.slots
                .ranges()
                .iter()
                .map(move |r| (*r, s.master.id.as_str()))
        }))
        .map_err(|e| match e {
            ClusterError::Coverage(c) => c,
            // Master ids were checked when parsed; a label error cannot happen, but keep it
            // visible rather than lose it.
            other => CoverageError {
                gaps: SlotRanges::new(),
                overlaps: Vec::new(),
                other: Some(other.to_string()),
            },
        })
    }

    /// Every slot owned by exactly one shard; otherwise the gaps and overlaps by name.
    pub fn check_coverage(&self) -> Result<(), CoverageError> {
        self.slot_map()?.check_complete()
    }
}

fn kind(r: &Reply) -> &'static str {
    match r {
        Reply::Simple(_) => "a simple string",
        Reply::Error(_) => "an error",
        Reply::Integer(_) => "an integer",
        Reply::Bulk(None) => "a null",
        Reply::Bulk(Some(_)) => "a bulk string",
        Reply::Array(_) => "an array",
    }
}

/// A flat RESP2 map: `[k1, v1, k2, v2, ...]` with string keys.
fn pairs(r: &Reply) -> Result<Vec<(String, &Reply)>, String> {
    let Reply::Array(items) = r else {
        return Err(format!("expected key/value pairs, got {}", kind(r)));
    };
    if items.len() % 2 != 0 {
        return Err(format!("odd number ({}) of key/value items", items.len()));
    }
    items
        .chunks_exact(2)
        .map(|kv| {
            let key = text(&kv[0]).ok_or_else(|| format!("a key is {}", kind(&kv[0])))?;
            Ok((key.to_owned(), &kv[1]))
        })
        .collect()
}

fn text(r: &Reply) -> Option<&str> {
    match r {
        Reply::Simple(s) => Some(s),
        Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn integer(r: &Reply) -> Option<i64> {
    match r {
        Reply::Integer(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn field_text(key: &str, v: &Reply) -> Result<String, String> {
    text(v)
        .map(str::to_owned)
        .ok_or_else(|| format!("{key} is {}, not a string", kind(v)))
}

fn field_port(key: &str, v: &Reply) -> Result<Option<u16>, String> {
    let n = integer(v).ok_or_else(|| format!("{key} is {}, not an integer", kind(v)))?;
    let port = u16::try_from(n).map_err(|_| format!("{key} {n} is not a port"))?;
    Ok((port != 0).then_some(port))
}

/// Node ids and shard ids: 40 hex characters (`CLUSTER_NAMELEN`).
pub fn is_node_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

enum ShardError {
    Shape(String),
    Ambiguous(Vec<String>),
}

impl From<String> for ShardError {
    fn from(m: String) -> ShardError {
        ShardError::Shape(m)
    }
}

fn parse_shard(r: &Reply) -> Result<Shard, ShardError> {
    let (id, slots, nodes) = shard_fields(r)?;
    let (masters, replicas): (Vec<NodeInfo>, Vec<NodeInfo>) =
        nodes.into_iter().partition(|n| n.role == NodeRole::Master);
    let alive: Vec<usize> = (0..masters.len())
        .filter(|&i| masters[i].health != NodeHealth::Failed)
        .collect();
    if alive.len() > 1 {
        let mut ids: Vec<String> = alive.iter().map(|&i| masters[i].id.clone()).collect();
        ids.sort();
        return Err(ShardError::Ambiguous(ids));
    }
    let serving = match (alive.first(), masters.is_empty()) {
        (Some(&i), _) => i,
        (None, false) => 0,
        (None, true) => {
            return Err(format!("no master among the nodes of slots {}", slots).into());
        }
    };
    let mut masters = masters;
    let master = masters.remove(serving);
    Ok(Shard {
        id,
        master,
        replicas,
        other_masters: masters,
        slots,
    })
}

type ShardFields = (Option<String>, SlotRanges, Vec<NodeInfo>);

fn shard_fields(r: &Reply) -> Result<ShardFields, String> {
    let mut slots = None;
    let mut nodes = None;
    let mut id = None;
    for (key, v) in pairs(r)? {
        match key.as_str() {
            "slots" => {
                let Reply::Array(bounds) = v else {
                    return Err(format!("slots is {}, not an array", kind(v)));
                };
                if bounds.len() % 2 != 0 {
                    return Err(format!("odd number ({}) of slot bounds", bounds.len()));
                }
                let mut ranges = Vec::with_capacity(bounds.len() / 2);
                for b in bounds.chunks_exact(2) {
                    let start = integer(&b[0]).ok_or("a slot bound is not an integer")?;
                    let end = integer(&b[1]).ok_or("a slot bound is not an integer")?;
                    ranges.push(SlotRange::new(start, end).map_err(|e| e.to_string())?);
                }
                slots = Some(SlotRanges::from_ranges(ranges));
            }
            "nodes" => {
                let Reply::Array(list) = v else {
                    return Err(format!("nodes is {}, not an array", kind(v)));
                };
                let mut parsed = Vec::with_capacity(list.len());
                for (i, n) in list.iter().enumerate() {
                    parsed.push(parse_shard_node(n).map_err(|m| format!("node {i}: {m}"))?);
                }
                nodes = Some(parsed);
            }
            "id" => {
                let s = field_text("id", v)?;
                if !is_node_id(&s) {
                    return Err(format!("shard id {} is not 40 hex characters", quote(&s)));
                }
                id = Some(s);
            }
            _ => {}
        }
    }
    let slots = slots.ok_or("no slots")?;
    let nodes = nodes.ok_or("no nodes")?;
    Ok((id, slots, nodes))
}

fn parse_shard_node(r: &Reply) -> Result<NodeInfo, String> {
    let mut id = None;
    let mut ip = None;
    let mut endpoint = None;
    let mut hostname = None;
    let mut port = None;
    let mut tls_port = None;
    let mut role = None;
    let mut replication_offset = None;
    let mut health = NodeHealth::Online;
    for (key, v) in pairs(r)? {
        match key.as_str() {
            "id" => id = Some(field_text("id", v)?),
            "ip" => ip = Some(field_text("ip", v)?),
            "endpoint" => endpoint = Some(field_text("endpoint", v)?),
            "hostname" => hostname = Some(field_text("hostname", v)?),
            "port" => port = field_port("port", v)?,
            "tls-port" => tls_port = field_port("tls-port", v)?,
            "role" => {
                role = Some(match field_text("role", v)?.as_str() {
                    "master" | "primary" => NodeRole::Master,
                    "replica" | "slave" => NodeRole::Replica,
                    other => return Err(format!("unknown role {}", quote(other))),
                })
            }
            "replication-offset" => {
                let n = integer(v).ok_or("replication-offset is not an integer")?;
                replication_offset =
                    Some(u64::try_from(n).map_err(|_| format!("replication-offset {n} < 0"))?);
            }
            "health" => health = NodeHealth::parse(&field_text("health", v)?),
            _ => {}
        }
    }
    let id = id.ok_or("no id")?;
    if !is_node_id(&id) {
        return Err(format!("node id {} is not 40 hex characters", quote(&id)));
    }
    if port.is_none() && tls_port.is_none() {
        return Err(format!("node {id} has neither port nor tls-port"));
    }
    Ok(NodeInfo {
        role: role.ok_or_else(|| format!("node {id} has no role"))?,
        id,
        ip: ip.unwrap_or_default(),
        endpoint,
        hostname: hostname.filter(|h| !h.is_empty()),
        port,
        tls_port,
        bus_port: None,
        replication_offset,
        health,
    })
}

struct NodeLine {
    node: NodeInfo,
    master: Option<String>,
    slots: SlotRanges,
    shard_id: Option<String>,
}

/// One `CLUSTER NODES` line; `Ok(None)` for a node still in handshake.
fn parse_node_line(line: &str) -> Result<Option<NodeLine>, String> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    if fields.len() < 8 {
        return Err(format!(
            "{} fields, expected at least 8: {}",
            fields.len(),
            quote(line)
        ));
    }
    let id = fields[0];
    if !is_node_id(id) {
        return Err(format!("node id {} is not 40 hex characters", quote(id)));
    }
    let flags: Vec<&str> = fields[2].split(',').collect();
    if flags.contains(&"handshake") {
        return Ok(None);
    }
    let role = if flags.contains(&"master") {
        NodeRole::Master
    } else if flags.contains(&"slave") {
        NodeRole::Replica
    } else {
        return Err(format!(
            "node {id} is neither master nor slave (flags {})",
            quote(fields[2])
        ));
    };
    let health = if flags.contains(&"fail") {
        NodeHealth::Failed
    } else {
        NodeHealth::Online
    };
    let master = match fields[3] {
        "-" => None,
        m if is_node_id(m) => Some(m.to_owned()),
        m => return Err(format!("master id {} is not 40 hex characters", quote(m))),
    };
    // ip:port@cport[,hostname][,key=value...] (aux fields as in nodes.conf, Redis 7.2+).
    let mut parts = fields[1].split(',');
    let addr = parts.next().unwrap_or_default();
    let mut hostname = None;
    let mut shard_id = None;
    let mut tls_port = None;
    for (i, part) in parts.enumerate() {
        match part.split_once('=') {
            Some(("shard-id", v)) if is_node_id(v) => shard_id = Some(v.to_owned()),
            Some(("tls-port", v)) => tls_port = v.parse::<u16>().ok().filter(|&p| p != 0),
            Some(("hostname", v)) if !v.is_empty() => hostname = Some(v.to_owned()),
            Some(_) => {}
            None if i == 0 && !part.is_empty() => hostname = Some(part.to_owned()),
            None => {}
        }
    }
    let (hostport, bus) = match addr.split_once('@') {
        Some((hp, bus)) => (hp, Some(bus)),
        None => (addr, None),
    };
    let (ip, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("address {} has no port", quote(addr)))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address {} has a bad port", quote(addr)))?;
    let bus_port = match bus {
        Some(b) => Some(
            b.parse::<u16>()
                .map_err(|_| format!("address {} has a bad bus port", quote(addr)))?,
        ),
        None => None,
    };
    let mut ranges = Vec::new();
    for token in &fields[8..] {
        if token.starts_with('[') {
            // [slot->-id] migrating / [slot-<-id] importing: not ownership.
            continue;
        }
        ranges.push(
            token
                .parse::<SlotRange>()
                .map_err(|_| format!("slot {} is not a slot or range", quote(token)))?,
        );
    }
    Ok(Some(NodeLine {
        node: NodeInfo {
            id: id.to_owned(),
            ip: ip.to_owned(),
            endpoint: None,
            hostname,
            port: (port != 0).then_some(port),
            tls_port,
            bus_port: bus_port.filter(|&p| p != 0),
            role,
            replication_offset: None,
            health,
        },
        master,
        slots: SlotRanges::from_ranges(ranges),
        shard_id,
    }))
}

/// Slots without an owner, slots owned twice, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct CoverageError {
    /// Slots no shard owns.
    pub gaps: SlotRanges,
    /// Slots several shards claim, with the claimants.
    pub overlaps: Vec<Overlap>,
    /// Anything else that kept the map from being built.
    pub other: Option<String>,
}

impl CoverageError {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.gaps.is_empty() {
            parts.push(format!(
                "{} slots have no owner: {}",
                self.gaps.slot_count(),
                self.gaps
            ));
        }
        if !self.overlaps.is_empty() {
            let list: Vec<String> = self
                .overlaps
                .iter()
                .map(|o| format!("{} by {}", o.slots, o.owners.join(" and ")))
                .collect();
            parts.push(format!("slots owned more than once: {}", list.join("; ")));
        }
        if let Some(o) = &self.other {
            parts.push(o.clone());
        }
        if parts.is_empty() {
            "slot coverage error".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

/// A run of slots claimed by several owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    /// The slots.
    pub slots: SlotRange,
    /// Who claims them, sorted.
    pub owners: Vec<String>,
}

/// Longest owner label a slot map stores.
pub const MAX_OWNER_LEN: usize = 128;

fn check_owner(owner: &str) -> Result<(), ClusterError> {
    if owner.is_empty()
        || owner.len() > MAX_OWNER_LEN
        || !owner.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ClusterError::InvalidOwner(quote(owner)));
    }
    Ok(())
}

/// Which owner (a master's node id, or whatever label the caller maps it to, see
/// [`map_owners`](Self::map_owners)) holds each of the 16384 slots; a slot may have none.
///
/// Always canonical: owners are numbered by their lowest slot, so two maps assigning the
/// same slots to the same labels compare equal and serialise to the same bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SlotMap {
    owners: Vec<String>,
    /// `SLOT_COUNT` entries: index into `owners`.
    slots: Vec<Option<u16>>,
}

impl fmt::Debug for SlotMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.ranges().iter().map(|(r, o)| (r.to_string(), *o)))
            .finish()
    }
}

impl Default for SlotMap {
    fn default() -> SlotMap {
        SlotMap::empty()
    }
}

impl SlotMap {
    /// No slot owned.
    pub fn empty() -> SlotMap {
        SlotMap {
            owners: Vec::new(),
            slots: vec![None; usize::from(SLOT_COUNT)],
        }
    }

    /// Builds a map from `(range, owner)` claims; claims of one slot by two different owners
    /// are refused with every overlap named.
    pub fn from_ranges<'a>(
        claims: impl IntoIterator<Item = (SlotRange, &'a str)>,
    ) -> Result<SlotMap, ClusterError> {
        let mut owners: Vec<String> = Vec::new();
        let mut index: BTreeMap<String, u16> = BTreeMap::new();
        let mut slots: Vec<Option<u16>> = vec![None; usize::from(SLOT_COUNT)];
        // Slot -> extra owners (only filled on conflict, so normally empty).
        let mut extra: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        for (range, owner) in claims {
            let o = match index.get(owner) {
                Some(&o) => o,
                None => {
                    check_owner(owner)?;
                    // At most one owner per slot survives, but conflicting claims can name more.
                    let o = u16::try_from(owners.len()).map_err(|_| {
                        ClusterError::InvalidOwner(format!("more than {} owners", u16::MAX))
                    })?;
                    owners.push(owner.to_owned());
                    index.insert(owner.to_owned(), o);
                    o
                }
            };
            for s in range.slots() {
                let cell = &mut slots[usize::from(s)];
                match *cell {
                    None => *cell = Some(o),
                    Some(prev) if prev == o => {}
                    Some(_) => {
                        let e = extra.entry(s).or_default();
                        if !e.contains(&o) {
                            e.push(o);
                        }
                    }
                }
            }
        }
        if !extra.is_empty() {
            let mut runs: Vec<Overlap> = Vec::new();
            for (s, more) in extra {
                let mut names: Vec<String> = more
                    .iter()
                    .chain(slots[usize::from(s)].iter())
                    .map(|&o| owners[usize::from(o)].clone())
                    .collect();
                names.sort();
                names.dedup();
                match runs.last_mut() {
                    Some(last)
                        if last.owners == names
                            && u32::from(last.slots.end) + 1 == u32::from(s) =>
                    {
                        last.slots.end = s;
                    }
                    _ => runs.push(Overlap {
                        slots: SlotRange { start: s, end: s },
                        owners: names,
                    }),
                }
            }
            let map = SlotMap { owners, slots }.canonical();
            return Err(CoverageError {
                gaps: map.gaps(),
                overlaps: runs,
                other: None,
            }
            .into());
        }
        Ok(SlotMap { owners, slots }.canonical())
    }

    /// Renumbers owners by first appearance and drops unused ones.
    fn canonical(self) -> SlotMap {
        let mut renumber: Vec<Option<u16>> = vec![None; self.owners.len()];
        let mut owners = Vec::new();
        let mut slots = Vec::with_capacity(self.slots.len());
        for cell in &self.slots {
            slots.push(match *cell {
                None => None,
                Some(o) => {
                    let new = *renumber[usize::from(o)].get_or_insert_with(|| {
                        owners.push(self.owners[usize::from(o)].clone());
                        // owners.len() <= the old count, which fit in u16.
                        u16::try_from(owners.len() - 1).unwrap_or(u16::MAX)
                    });
                    Some(new)
                }
            });
        }
        SlotMap { owners, slots }
    }

    /// Who owns `slot` (`None` for an unowned or out-of-range slot).
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let o = (*self.slots.get(usize::from(slot))?)?;
        self.owners.get(usize::from(o)).map(String::as_str)
    }

    /// Who owns `key`'s slot.
    pub fn owner_of_key(&self, key: &[u8]) -> Option<&str> {
        self.owner(key_hash_slot(key))
    }

    /// The distinct owners, by lowest slot.
    pub fn owners(&self) -> &[String] {
        &self.owners
    }

    /// The slots of `owner`.
    pub fn slots_of(&self, owner: &str) -> SlotRanges {
        SlotRanges::from_ranges(
            self.ranges()
                .into_iter()
                .filter(|(_, o)| *o == owner)
                .map(|(r, _)| r),
        )
    }

    /// Maximal runs of consecutive slots with one owner, ascending; unowned slots are left
    /// out.
    pub fn ranges(&self) -> Vec<(SlotRange, &str)> {
        let mut out: Vec<(SlotRange, &str)> = Vec::new();
        let mut run: Option<(u16, u16, u16)> = None; // start, end, owner
        for (s, cell) in (0..SLOT_COUNT).zip(self.slots.iter()) {
            run = match (run, *cell) {
                (Some((a, _, o)), Some(c)) if o == c => Some((a, s, o)),
                (prev, cell) => {
                    if let Some((a, b, o)) = prev {
                        out.push((SlotRange { start: a, end: b }, &self.owners[usize::from(o)]));
                    }
                    cell.map(|c| (s, s, c))
                }
            };
        }
        if let Some((a, b, o)) = run {
            out.push((SlotRange { start: a, end: b }, &self.owners[usize::from(o)]));
        }
        out
    }

    /// Slots without an owner.
    pub fn gaps(&self) -> SlotRanges {
        SlotRanges::from_slots(
            (0..SLOT_COUNT)
                .zip(self.slots.iter())
                .filter(|(_, c)| c.is_none())
                .map(|(s, _)| s),
        )
    }

    /// Every slot has an owner (overlaps cannot exist in a built map).
    pub fn check_complete(&self) -> Result<(), CoverageError> {
        let gaps = self.gaps();
        if gaps.is_empty() {
            Ok(())
        } else {
            Err(CoverageError {
                gaps,
                overlaps: Vec::new(),
                other: None,
            })
        }
    }

    /// The same assignment under other labels, e.g. master node ids mapped to the
    /// repository's shard keys. Owners mapped to one label merge.
    pub fn map_owners(&self, mut f: impl FnMut(&str) -> String) -> Result<SlotMap, ClusterError> {
        let labels: BTreeMap<&str, String> =
            self.owners.iter().map(|o| (o.as_str(), f(o))).collect();
        SlotMap::from_ranges(
            self.ranges()
                .into_iter()
                .map(|(r, o)| (r, labels.get(o).map_or(o, String::as_str))),
        )
    }

    /// What changed from `self` to `newer`: maximal runs of consecutive slots that moved
    /// from one owner (or none) to another (or none), ascending.
    pub fn diff(&self, newer: &SlotMap) -> Vec<SlotMove> {
        let mut out: Vec<SlotMove> = Vec::new();
        for s in 0..SLOT_COUNT {
            let from = self.owner(s);
            let to = newer.owner(s);
            if from == to {
                continue;
            }
            match out.last_mut() {
                Some(m)
                    if u32::from(m.slots.end) + 1 == u32::from(s)
                        && m.from.as_deref() == from
                        && m.to.as_deref() == to =>
                {
                    m.slots.end = s;
                }
                _ => out.push(SlotMove {
                    slots: SlotRange { start: s, end: s },
                    from: from.map(str::to_owned),
                    to: to.map(str::to_owned),
                }),
            }
        }
        out
    }
}

/// Slots that changed owner between two maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMove {
    /// The slots.
    pub slots: SlotRange,
    /// The owner before (`None`: unowned).
    pub from: Option<String>,
    /// The owner after (`None`: unowned).
    pub to: Option<String>,
}

/// A slot map and the moment it took effect, as stored in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMapRecord {
    /// When the map took effect, milliseconds since the Unix epoch.
    pub effective_unix_ms: u64,
    /// The map.
    pub map: SlotMap,
}

/// First line of a serialised slot map.
pub const SLOT_MAP_HEADER: &str = "syncbridge-slot-map 1";

impl SlotMapRecord {
    /// The canonical text form: the header, `effective-unix-ms <n>`, then one
    /// `<start>-<end> <owner>` line per maximal run, ascending, every line ending in `\n`.
    /// Unowned slots are not listed. At most 16384 + 2 lines (a few hundred KiB in the
    /// worst case, ~150 bytes for a 3-shard cluster).
    pub fn encode(&self) -> String {
        let mut out = format!(
            "{SLOT_MAP_HEADER}\neffective-unix-ms {}\n",
            self.effective_unix_ms
        );
        for (r, owner) in self.map.ranges() {
            out.push_str(&format!("{}-{} {owner}\n", r.start, r.end));
        }
        out
    }

    /// Reads what [`encode`](Self::encode) wrote, and only that: anything not in canonical
    /// form (unsorted, overlapping or unmerged ranges, `5` for `5-5`, extra spaces, CRLF) is
    /// refused, so `encode(decode(b)) == b` for every accepted `b`.
    pub fn decode(bytes: &[u8]) -> Result<SlotMapRecord, ClusterError> {
        let bad = |line: usize, reason: String| ClusterError::SlotMapFormat { line, reason };
        let text = std::str::from_utf8(bytes).map_err(|e| bad(0, format!("not UTF-8: {e}")))?;
        let Some(body) = text.strip_suffix('\n') else {
            return Err(bad(0, "does not end with a newline".into()));
        };
        let mut lines = body.split('\n').enumerate().map(|(i, l)| (i + 1, l));
        match lines.next() {
            Some((_, SLOT_MAP_HEADER)) => {}
            Some((n, l)) => {
                return Err(bad(
                    n,
                    format!("expected {SLOT_MAP_HEADER:?}, got {}", quote(l)),
                ))
            }
            None => return Err(bad(1, "empty".into())),
        }
        let effective_unix_ms = match lines.next() {
            Some((n, l)) => {
                let v = l.strip_prefix("effective-unix-ms ").ok_or_else(|| {
                    bad(n, format!("expected effective-unix-ms, got {}", quote(l)))
                })?;
                canonical_u64(v).ok_or_else(|| bad(n, format!("bad time {}", quote(v))))?
            }
            None => return Err(bad(2, "no effective-unix-ms line".into())),
        };
        let mut claims: Vec<(SlotRange, &str)> = Vec::new();
        for (n, l) in lines {
            let (range, owner) = l.split_once(' ').ok_or_else(|| {
                bad(
                    n,
                    format!("expected `<start>-<end> <owner>`, got {}", quote(l)),
                )
            })?;
            let (a, b) = range
                .split_once('-')
                .ok_or_else(|| bad(n, format!("range {} is not <start>-<end>", quote(range))))?;
            let parse_slot = |t: &str| {
                canonical_u64(t)
                    .and_then(|v| i64::try_from(v).ok())
                    .ok_or_else(|| bad(n, format!("slot {} is not a number", quote(t))))
            };
            let r = SlotRange::new(parse_slot(a)?, parse_slot(b)?)
                .map_err(|e| bad(n, e.to_string()))?;
            check_owner(owner).map_err(|e| bad(n, e.to_string()))?;
            if let Some((prev, prev_owner)) = claims.last() {
                if r.start <= prev.end {
                    return Err(bad(n, format!("range {r} does not come after {prev}")));
                }
                if u32::from(prev.end) + 1 == u32::from(r.start) && *prev_owner == owner {
                    return Err(bad(
                        n,
                        format!("range {r} continues {prev} of the same owner: not merged"),
                    ));
                }
            }
            claims.push((r, owner));
        }
        let map = SlotMap::from_ranges(claims).map_err(|e| bad(0, e.to_string()))?;
        Ok(SlotMapRecord {
            effective_unix_ms,
            map,
        })
    }
}

/// A decimal `u64` without sign or leading zeros (`0` itself allowed).
fn canonical_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests;
