//! Is the source a Redis Cluster / Valkey Cluster node? Asked on every connection, before
//! `PSYNC`: a cluster node's replication stream carries only its own shard's slots, so
//! capturing it alone silently backs up part of the data (issue 15: the runbook copied
//! pod 0's `dump.rdb` of a three-master cluster, a third of the keys).
//!
//! `INFO cluster` says `cluster_enabled:1` (`genRedisInfoString` in Redis `src/server.c`);
//! `CLUSTER MYID` names the node and `CLUSTER SHARDS` (Redis 7.0+, Valkey) gives the topology,
//! read by [`wire::redis::cluster`]. `CLUSTER NODES` is the fallback when `SHARDS` is unknown
//! (Redis 6) or ambiguous (a Valkey shard right after a failover, see
//! `ClusterError::AmbiguousShard`).
//!
//! A refusal of these commands (an ACL without them) is fatal with the ACL to add: the agent
//! never assumes a single server it could not check. (`CLUSTER SHARDS` refused alone falls
//! back to `CLUSTER NODES`, so `+info +cluster|myid +cluster|nodes` is enough.) `redis stream`
//! captures a whole cluster ([`super::cluster_stream`]); elsewhere (`redis snapshot`, `run`)
//! a cluster node is refused unless the operator asks for this node's shard only
//! (`--cluster-shard-only`, one sidecar per shard).

use anyhow::anyhow;
use wire::redis::cluster::{ClusterTopology, SlotRanges, SLOT_COUNT};
use wire::redis::resp::Reply;

use super::link::MasterLink;
use crate::job::JobError;

/// The ACL, beyond the replication commands, that cluster detection needs.
pub const CLUSTER_ACL: &str = "+info +cluster|myid +cluster|shards +cluster|nodes";

/// Where the connected node stands in its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlace {
    /// `host:port` the agent connected to.
    pub endpoint: String,
    /// Its cluster node id.
    pub node_id: String,
    /// `None` when it is its shard's serving master; else that master (`ip:port`, or its
    /// id when it announces no address).
    pub master: Option<String>,
    /// The slots of its shard (the master's).
    pub slots: SlotRanges,
    /// Masters that own slots, in the whole cluster.
    pub masters: usize,
}

impl ClusterPlace {
    /// "127.0.0.1:7001 is one of 3 masters of a Redis/Valkey Cluster and owns 5461 of 16384
    /// slots (0-5460)", or for a replica "... is a replica of 127.0.0.1:7001, one of 3
    /// masters ..., which owns ...".
    pub fn describe(&self) -> String {
        let owns = if self.slots.is_empty() {
            "owns no slot".to_owned()
        } else {
            format!(
                "owns {} of {SLOT_COUNT} slots ({})",
                self.slots.slot_count(),
                show_slots(&self.slots)
            )
        };
        match &self.master {
            None => format!(
                "{} is one of {} masters of a Redis/Valkey Cluster and {owns}",
                self.endpoint, self.masters
            ),
            Some(m) => format!(
                "{} is a replica of {m}, one of {} masters of a Redis/Valkey Cluster, which {owns}",
                self.endpoint, self.masters
            ),
        }
    }

    /// The share of the cluster's slots this shard holds, e.g. "33% of the slots".
    fn share(&self) -> String {
        let pct = self.slots.slot_count() as f64 * 100.0 / f64::from(SLOT_COUNT);
        format!("{pct:.0}% of the cluster's slots")
    }
}

/// Slot ranges for a message: a fragmented map is cut after about 120 characters.
fn show_slots(slots: &SlotRanges) -> String {
    let text = slots.to_string();
    if text.len() <= 120 {
        return text;
    }
    let cut = text[..120].rfind(',').unwrap_or(120);
    format!("{},... in {} ranges", &text[..cut], slots.ranges().len())
}

/// The source is a cluster node and the agent was not told to capture its shard alone.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}; capturing it alone would back up only the keys of those slots ({}). \
     `syncbridge-agent redis stream` (and `run`, unless redis.cluster = false) captures the \
     whole cluster from any of its nodes; to capture only this node's shard (one sidecar \
     per shard), pass --cluster-shard-only (config redis.cluster_shard_only = true)",
    .0.describe(),
    .0.share()
)]
pub struct ClusterRefused(pub ClusterPlace);

/// The server refused a command detection needs (an ACL without it).
#[derive(Debug, thiserror::Error)]
#[error(
    "{endpoint} refused {command}: {reply}. Before capturing, the agent checks whether the \
     server is a Redis Cluster node (whose stream holds only its shard's keys); its user \
     needs {CLUSTER_ACL} besides +psync +replconf +sync +ping, e.g. \
     `ACL SETUSER <user> {CLUSTER_ACL}`"
)]
pub struct DetectionRefused {
    endpoint: String,
    command: String,
    reply: String,
}

/// `cluster_enabled:1` in an `INFO cluster` text.
pub fn cluster_enabled(info: &str) -> bool {
    info.lines().any(|l| l.trim() == "cluster_enabled:1")
}

/// The place of node `my_id` in `topology`.
pub fn locate(
    topology: &ClusterTopology,
    my_id: &str,
    endpoint: &str,
) -> Result<ClusterPlace, String> {
    let shard = topology
        .shard_of_node(my_id)
        .and_then(|i| topology.shards.get(i))
        .ok_or_else(|| {
            format!("{endpoint} (node {my_id}) is not in its own view of the cluster; is it still joining?")
        })?;
    let master = (shard.master.id != my_id).then(|| match shard.master.address() {
        Some((host, port)) => format!("{host}:{port}"),
        None => format!("node {}", shard.master.id),
    });
    Ok(ClusterPlace {
        endpoint: endpoint.to_owned(),
        node_id: my_id.to_owned(),
        master,
        slots: shard.slots.clone(),
        masters: topology.serving_shards().count(),
    })
}

/// Sends a command; a NOPERM refusal is fatal, naming the ACL; another error reply is
/// returned as `Err(text)` for the caller to judge.
async fn ask(link: &mut MasterLink, args: &[&[u8]]) -> Result<Result<Reply, String>, JobError> {
    match link.query(args).await? {
        Reply::Error(e) if e.starts_with("NOPERM") => Err(JobError::fatal(DetectionRefused {
            endpoint: link.endpoint().to_owned(),
            command: args
                .iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
                .join(" "),
            reply: e,
        })),
        Reply::Error(e) => Ok(Err(e)),
        other => Ok(Ok(other)),
    }
}

fn text(reply: Reply, what: &str, endpoint: &str) -> Result<String, JobError> {
    match reply {
        Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Reply::Simple(s) => Ok(s),
        other => Err(anyhow!("{endpoint} answered {what} with {other:?}").into()),
    }
}

/// The cluster as the connected node sees it: `CLUSTER SHARDS`, or `CLUSTER NODES` when
/// that is refused, unknown or ambiguous.
pub async fn read_topology(link: &mut MasterLink) -> Result<ClusterTopology, JobError> {
    let endpoint = link.endpoint().to_owned();
    // A refusal of CLUSTER SHARDS alone is not fatal: CLUSTER NODES says the same.
    // So is one unreadable or ambiguous (`ClusterError::AmbiguousShard`).
    let shards = match link.query(&[b"CLUSTER", b"SHARDS"]).await? {
        Reply::Error(e) => Err(e),
        reply => ClusterTopology::from_cluster_shards(&reply).map_err(|e| e.to_string()),
    };
    match shards {
        Ok(t) => Ok(t),
        Err(why) => {
            tracing::debug!(%endpoint, "CLUSTER SHARDS not usable ({why}): reading CLUSTER NODES");
            let nodes = match ask(link, &[b"CLUSTER", b"NODES"]).await? {
                Ok(r) => text(r, "CLUSTER NODES", &endpoint)?,
                Err(e) => return Err(anyhow!("{endpoint} refused CLUSTER NODES: {e}").into()),
            };
            ClusterTopology::from_cluster_nodes(&nodes).map_err(|e| {
                JobError::from(anyhow!(
                    "reading the cluster topology from {endpoint}: {e} (CLUSTER SHARDS: {why})"
                ))
            })
        }
    }
}

/// Whether the connected server (before `PSYNC`) is a cluster node, and where it stands.
pub async fn detect(link: &mut MasterLink) -> Result<Option<ClusterPlace>, JobError> {
    let endpoint = link.endpoint().to_owned();
    let info = match ask(link, &[b"INFO", b"cluster"]).await? {
        Ok(r) => text(r, "INFO cluster", &endpoint)?,
        Err(e) => return Err(anyhow!("{endpoint} refused INFO cluster: {e}").into()),
    };
    if !cluster_enabled(&info) {
        return Ok(None);
    }
    let my_id = match ask(link, &[b"CLUSTER", b"MYID"]).await? {
        Ok(r) => text(r, "CLUSTER MYID", &endpoint)?.trim().to_owned(),
        Err(e) => return Err(anyhow!("{endpoint} refused CLUSTER MYID: {e}").into()),
    };
    let topology = read_topology(link).await?;
    locate(&topology, &my_id, &endpoint)
        .map(Some)
        .map_err(|e| anyhow!(e).into())
}

/// [`detect`], then the policy: a cluster node is refused (fatal, [`ClusterRefused`])
/// unless `shard_only`, when its place is returned for the caller to log.
pub async fn check(
    link: &mut MasterLink,
    shard_only: bool,
) -> Result<Option<ClusterPlace>, JobError> {
    match detect(link).await? {
        None => Ok(None),
        Some(place) if shard_only => Ok(Some(place)),
        Some(place) => Err(JobError::fatal(ClusterRefused(place))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccc";
    const D: &str = "dddddddddddddddddddddddddddddddddddddddd";

    fn topology() -> ClusterTopology {
        let nodes = format!(
            "{A} 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460\n\
             {B} 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922\n\
             {C} 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383\n\
             {D} 127.0.0.1:7004@17004 slave {A} 0 0 1 connected\n"
        );
        ClusterTopology::from_cluster_nodes(&nodes).unwrap()
    }

    #[test]
    fn info_cluster_enabled() {
        assert!(cluster_enabled("# Cluster\r\ncluster_enabled:1\r\n"));
        assert!(!cluster_enabled("# Cluster\r\ncluster_enabled:0\r\n"));
        assert!(!cluster_enabled(""));
    }

    #[test]
    fn a_master_is_refused_naming_its_slots_and_the_option() {
        let place = locate(&topology(), A, "127.0.0.1:7001").unwrap();
        assert_eq!(place.master, None);
        let msg = ClusterRefused(place).to_string();
        assert!(
            msg.starts_with(
                "127.0.0.1:7001 is one of 3 masters of a Redis/Valkey Cluster and owns 5461 of \
                 16384 slots (0-5460); capturing it alone would back up only the keys of those \
                 slots (33% of the cluster's slots)"
            ),
            "{msg}"
        );
        assert!(msg.contains("--cluster-shard-only"), "{msg}");
        assert!(msg.contains("redis.cluster_shard_only = true"), "{msg}");
    }

    #[test]
    fn a_replica_names_its_masters_slots() {
        let place = locate(&topology(), D, "127.0.0.1:7004").unwrap();
        assert_eq!(place.master.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(place.slots.to_string(), "0-5460");
        assert!(place.describe().starts_with(
            "127.0.0.1:7004 is a replica of 127.0.0.1:7001, one of 3 masters of a \
             Redis/Valkey Cluster, which owns 5461 of 16384 slots (0-5460)"
        ));
        assert!(locate(&topology(), &"e".repeat(40), "x:1").is_err());
    }

    #[test]
    fn fragmented_slots_are_shortened() {
        let slots = SlotRanges::from_slots((0..2000).step_by(2));
        let shown = show_slots(&slots);
        assert!(shown.len() < 160, "{shown}");
        assert!(shown.ends_with(",... in 1000 ranges"), "{shown}");
    }
}
