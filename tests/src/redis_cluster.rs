//! A throwaway Redis Cluster or Valkey Cluster on 127.0.0.1: N masters with R replicas each,
//! built the way `redis-cli --cluster create` builds one (`clusterManagerCommandCreate` in
//! Redis `src/redis-cli.c`): distinct config epochs, `CLUSTER MEET`, slots split evenly with
//! `CLUSTER ADDSLOTSRANGE`, `CLUSTER REPLICATE`, then wait until every node agrees.
//!
//! Every node is a [`RedisServer`] in cluster mode, so it inherits the harness rules: its own
//! temp dir (with its `nodes.conf`), killed with everything it forked on drop or panic, and a
//! watchdog for a test process that dies without unwinding.
//!
//! Helpers for what the cluster tests of issue 15 need: the node owning a key, cluster-aware
//! commands that follow `-MOVED`/`-ASK`, `kill -9` and restart of a node, `CLUSTER FAILOVER`
//! (also `FORCE` after a master died), slot migration under load (`SETSLOT IMPORTING` /
//! `MIGRATING`, `MIGRATE` of `GETKEYSINSLOT`, `SETSLOT NODE` on every master: the order of
//! `clusterManagerMoveSlot` in `redis-cli.c`), and the topology parsed by
//! [`wire::redis::cluster`] from `CLUSTER SHARDS` or `CLUSTER NODES`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wire::redis::cluster::{key_hash_slot, ClusterError, ClusterTopology, SlotMap, SlotRange};
use wire::redis::resp::Reply;

use crate::redis::{parse_info, RedisFlavor, RedisServer, RespConnection, RespValue};

/// How long a cluster may take to agree after a change (start, failover, migration).
const SETTLE: Duration = Duration::from_secs(90);

/// Options for a cluster before it starts.
#[derive(Debug, Clone)]
pub struct RedisClusterBuilder {
    flavor: RedisFlavor,
    masters: usize,
    replicas_per_master: usize,
    password: Option<String>,
    node_timeout_ms: u64,
    extra_args: Vec<String>,
}

impl RedisClusterBuilder {
    /// Every node requires this password (`requirepass` and `masterauth`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// `cluster-node-timeout` (default 15000 ms, the server's): how long a node may be
    /// unreachable before it is marked failed and its replica may take over on its own.
    /// 5000 caused spurious failovers with two clusters on a loaded 2-core machine; tests
    /// that kill a master use `CLUSTER FAILOVER FORCE` rather than wait for this.
    pub fn node_timeout_ms(mut self, ms: u64) -> Self {
        self.node_timeout_ms = ms;
        self
    }

    /// Extra server config for every node (after the harness defaults).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Starts the nodes, builds the cluster and waits until it is `cluster_state:ok` with
    /// every replica's link up.
    pub fn start(self) -> RedisCluster {
        RedisCluster::launch(self)
    }
}

/// A running cluster; every node is killed and removed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    flavor: RedisFlavor,
    nodes: Vec<RedisServer>,
    ids: Vec<String>,
    masters: usize,
}

impl RedisCluster {
    /// `masters` masters with `replicas_per_master` replicas each.
    pub fn start(flavor: RedisFlavor, masters: usize, replicas_per_master: usize) -> RedisCluster {
        RedisCluster::builder(flavor, masters, replicas_per_master).start()
    }

    /// A builder, for a password or other options.
    pub fn builder(
        flavor: RedisFlavor,
        masters: usize,
        replicas_per_master: usize,
    ) -> RedisClusterBuilder {
        RedisClusterBuilder {
            flavor,
            masters,
            replicas_per_master,
            password: None,
            node_timeout_ms: 15000,
            extra_args: Vec::new(),
        }
    }

    fn launch(opts: RedisClusterBuilder) -> RedisCluster {
        assert!(
            opts.masters >= 1,
            "a cluster needs at least one master to own the slots"
        );
        let count = opts.masters * (1 + opts.replicas_per_master);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let mut b = RedisServer::builder(opts.flavor)
                .cluster()
                .args(["--cluster-node-timeout", &opts.node_timeout_ms.to_string()])
                .args(opts.extra_args.iter().cloned());
            if let Some(pw) = &opts.password {
                b = b.password(pw.clone());
            }
            nodes.push(b.start());
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| {
                n.cmd(&["CLUSTER", "MYID"])
                    .as_str()
                    .unwrap_or_else(|| panic!("CLUSTER MYID of port {} is not a string", n.port()))
                    .to_owned()
            })
            .collect();
        let mut cluster = RedisCluster {
            flavor: opts.flavor,
            nodes,
            ids,
            masters: opts.masters,
        };
        cluster.build(opts.replicas_per_master);
        cluster
    }

    fn build(&mut self, replicas_per_master: usize) {
        // Distinct epochs, as redis-cli does, so no epoch collision has to be resolved.
        for (i, n) in self.nodes.iter().enumerate() {
            expect_ok(
                n.cmd(&["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()]),
                "CLUSTER SET-CONFIG-EPOCH",
            );
        }
        let first = &self.nodes[0];
        for n in &self.nodes[1..] {
            let bus = n.cluster_port().unwrap_or(0).to_string();
            expect_ok(
                first.cmd(&["CLUSTER", "MEET", "127.0.0.1", &n.port().to_string(), &bus]),
                "CLUSTER MEET",
            );
        }
        self.wait_until("every node knows every other node", SETTLE, |c| {
            c.nodes.iter().all(|n| {
                n.try_cmd(&["CLUSTER", "NODES"])
                    .ok()
                    .and_then(|r| r.as_str().map(str::to_owned))
                    .is_some_and(|text| {
                        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
                        lines.len() == c.nodes.len()
                            && lines.iter().all(|l| !l.contains("handshake"))
                    })
            })
        });
        for (m, range) in even_ranges(self.masters).into_iter().enumerate() {
            expect_ok(
                self.nodes[m].cmd(&[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &range.start().to_string(),
                    &range.end().to_string(),
                ]),
                "CLUSTER ADDSLOTSRANGE",
            );
        }
        for r in 0..self.masters * replicas_per_master {
            let replica = self.masters + r;
            let master = r % self.masters;
            let id = self.ids[master].clone();
            // The replica must have heard that `master` owns slots; retry until it has.
            let deadline = Instant::now() + SETTLE;
            loop {
                let reply = self.nodes[replica].cmd(&["CLUSTER", "REPLICATE", &id]);
                if reply.is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "CLUSTER REPLICATE {id} on node {replica}: {reply}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.wait_stable();
    }

    /// Starts one more node, joins it to the cluster as a master owning no slot (what
    /// `redis-cli --cluster add-node` does before a `reshard` gives it slots) and returns its
    /// index. Clusters with a password are not supported here.
    pub fn add_master(&mut self) -> usize {
        assert!(
            self.nodes[0].password().is_none(),
            "add_master: clusters with a password are not supported"
        );
        let node = RedisServer::builder(self.flavor)
            .cluster()
            .args(["--cluster-node-timeout", "15000"])
            .start();
        let id = node
            .cmd(&["CLUSTER", "MYID"])
            .as_str()
            .unwrap_or_else(|| panic!("CLUSTER MYID of port {} is not a string", node.port()))
            .to_owned();
        let bus = node.cluster_port().unwrap_or(0).to_string();
        expect_ok(
            self.nodes[0].cmd(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &node.port().to_string(),
                &bus,
            ]),
            "CLUSTER MEET",
        );
        self.nodes.push(node);
        self.ids.push(id.clone());
        self.wait_until("every node knows the new master", SETTLE, |c| {
            c.running().all(|n| {
                n.try_cmd(&["CLUSTER", "NODES"])
                    .ok()
                    .and_then(|r| r.as_str().map(str::to_owned))
                    .is_some_and(|text| {
                        text.lines()
                            .any(|l| l.starts_with(id.as_str()) && !l.contains("handshake"))
                            && !text.contains("handshake")
                    })
            })
        });
        self.wait_stable();
        self.nodes.len() - 1
    }

    /// Server implementation.
    pub fn flavor(&self) -> RedisFlavor {
        self.flavor
    }

    /// Every node, masters of the initial layout first (node `i < masters` was master `i`,
    /// node `masters + r` was a replica of master `r % masters`). Roles change on failover:
    /// ask [`topology`](Self::topology) for the current ones.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Node `i`'s cluster node id (never changes).
    pub fn node_id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    /// Every node id, by node index.
    pub fn node_ids(&self) -> &[String] {
        &self.ids
    }

    /// The node with this id.
    pub fn index_of_id(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|x| x == id)
    }

    /// The node listening on this client port.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Number of masters the cluster was built with.
    pub fn master_count(&self) -> usize {
        self.masters
    }

    /// The slot ranges the harness assigned at start: master `i` got `initial_slots()[i]`.
    pub fn initial_slots(&self) -> Vec<SlotRange> {
        even_ranges(self.masters)
    }

    /// `redis://127.0.0.1:PORT` of every node: seeds for the agent.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The first node that answers (skips killed ones).
    fn any_running(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.try_cmd(&["PING"]).is_ok())
            .unwrap_or_else(|| panic!("no node of the {} cluster answers", self.flavor))
    }

    /// `INFO cluster` of node `i`.
    pub fn cluster_info(&self, i: usize) -> BTreeMap<String, String> {
        let reply = self.nodes[i].cmd(&["CLUSTER", "INFO"]);
        parse_info(
            reply
                .as_str()
                .unwrap_or_else(|| panic!("CLUSTER INFO of node {i}: {reply}")),
        )
    }

    /// The topology node `i` reports in `CLUSTER SHARDS`, parsed by `wire`.
    pub fn try_topology_of(&self, i: usize) -> Result<ClusterTopology, ClusterError> {
        let reply = self.nodes[i].cmd(&["CLUSTER", "SHARDS"]);
        ClusterTopology::from_cluster_shards(&to_wire(&reply))
    }

    /// [`try_topology_of`](Self::try_topology_of), panicking on an error.
    pub fn topology_of(&self, i: usize) -> ClusterTopology {
        self.try_topology_of(i)
            .unwrap_or_else(|e| panic!("CLUSTER SHARDS of node {i}: {e}"))
    }

    /// The topology node `i` reports in `CLUSTER NODES`, parsed by `wire`.
    pub fn topology_from_nodes_of(&self, i: usize) -> ClusterTopology {
        let reply = self.nodes[i].cmd(&["CLUSTER", "NODES"]);
        let text = reply
            .as_str()
            .unwrap_or_else(|| panic!("CLUSTER NODES of node {i}: {reply}"));
        ClusterTopology::from_cluster_nodes(text)
            .unwrap_or_else(|e| panic!("CLUSTER NODES of node {i}: {e}\n{text}"))
    }

    /// The topology as the first answering node sees it: `CLUSTER SHARDS`, or `CLUSTER
    /// NODES` while a Valkey shard lists two live masters (the agent's fallback too).
    pub fn topology(&self) -> ClusterTopology {
        let i = self.index_of_port(self.any_running().port()).unwrap_or(0);
        match self.try_topology_of(i) {
            Ok(t) => t,
            Err(ClusterError::AmbiguousShard { .. }) => self.topology_from_nodes_of(i),
            Err(e) => panic!("CLUSTER SHARDS of node {i}: {e}"),
        }
    }

    /// The current slot map (owners are master node ids).
    pub fn slot_map(&self) -> SlotMap {
        self.topology()
            .slot_map()
            .unwrap_or_else(|e| panic!("slot map of the {} cluster: {e}", self.flavor))
    }

    /// Indexes of the nodes that currently serve slots as masters, by lowest slot.
    pub fn current_masters(&self) -> Vec<usize> {
        self.topology()
            .serving_shards()
            .map(|s| {
                self.index_of_id(&s.master.id)
                    .unwrap_or_else(|| panic!("unknown master {}", s.master.id))
            })
            .collect()
    }

    /// The node currently owning `key`'s slot.
    pub fn node_for_key(&self, key: &[u8]) -> usize {
        let map = self.slot_map();
        let owner = map
            .owner_of_key(key)
            .unwrap_or_else(|| panic!("slot {} has no owner", key_hash_slot(key)));
        self.index_of_id(owner)
            .unwrap_or_else(|| panic!("unknown owner {owner}"))
    }

    /// A cluster-aware client (slot map cached, one connection per node, follows
    /// redirects); use one per thread for many commands.
    pub fn client(&self) -> ClusterClient {
        let map = self.slot_map();
        let mut owner_port = vec![0u16; usize::from(wire::redis::cluster::SLOT_COUNT)];
        for (range, id) in map.ranges() {
            let port = self
                .index_of_id(id)
                .map(|i| self.nodes[i].port())
                .unwrap_or_else(|| panic!("unknown owner {id}"));
            for s in range.slots() {
                owner_port[usize::from(s)] = port;
            }
        }
        ClusterClient {
            ports: self.nodes.iter().map(RedisServer::port).collect(),
            password: self.nodes[0].password().map(str::to_owned),
            owner_port,
            conns: BTreeMap::new(),
            redirects: 0,
        }
    }

    /// Runs one command about `key` through a fresh [`client`](Self::client).
    pub fn cmd_for_key<A: AsRef<[u8]>>(&self, key: &[u8], args: &[A]) -> RespValue {
        self.client().cmd(key, args)
    }

    /// `SET key value` on the owning node; panics unless `+OK`.
    pub fn set(&self, key: &[u8], value: &[u8]) {
        self.client().set(key, value);
    }

    /// `GET key` on the owning node; `None` for a missing key.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.client().get(key)
    }

    /// SIGKILLs node `i` (a crash; `nodes.conf` stays, so [`restart_node`](Self::restart_node)
    /// brings it back into the cluster).
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }

    /// Starts a killed node again (same port, bus port and directory); it rejoins from its
    /// `nodes.conf`, as a replica when its slots moved meanwhile.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].start_again();
    }

    /// `CLUSTER FAILOVER` on replica `replica` (a coordinated switch: the master stops
    /// writes until the replica caught up), then waits until it serves its master's slots
    /// and the cluster is stable. `force` sends `CLUSTER FAILOVER FORCE`, for when the
    /// master is dead.
    pub fn failover(&self, replica: usize, force: bool) {
        let mut args = vec!["CLUSTER", "FAILOVER"];
        if force {
            args.push("FORCE");
        }
        let reply = self.nodes[replica].cmd(&args);
        if !reply.is_ok() {
            let role = self.nodes[replica].cmd(&["ROLE"]);
            panic!(
                "{}: {} on node {replica}: {reply}; ROLE: {role}; CLUSTER NODES:\n{}",
                self.flavor,
                args.join(" "),
                self.nodes[replica]
                    .cmd(&["CLUSTER", "NODES"])
                    .as_str()
                    .unwrap_or("?")
            );
        }
        self.wait_promoted(replica);
    }

    /// Waits until node `i` is a master owning slots in the view of every running node and
    /// the cluster is stable (the cluster's own failover after a master died, or a manual
    /// one).
    pub fn wait_promoted(&self, i: usize) {
        let id = self.ids[i].clone();
        self.wait_until(&format!("node {i} serving as a master"), SETTLE, |c| {
            c.running().all(|n| {
                c.view_of(n)
                    .is_some_and(|t| t.serving_shards().any(|s| s.master.id == id))
            })
        });
        self.wait_stable();
    }

    /// Moves `slots` from master node `from` to master node `to` while clients may keep
    /// writing: `SETSLOT IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE` of
    /// the keys in batches until the slot is empty, then `SETSLOT NODE` on the target, the
    /// source and every other master. Waits until every node agrees.
    pub fn migrate_slots(&self, from: usize, to: usize, slots: impl IntoIterator<Item = u16>) {
        self.migrate_slots_observed(from, to, slots, |_| {});
    }

    /// [`migrate_slots`](Self::migrate_slots), calling `after_slot(slot)` once each slot has
    /// moved (and before the next starts): a test can note a moment in the middle of a move.
    pub fn migrate_slots_observed(
        &self,
        from: usize,
        to: usize,
        slots: impl IntoIterator<Item = u16>,
        mut after_slot: impl FnMut(u16),
    ) {
        let (src_id, dst_id) = (self.ids[from].clone(), self.ids[to].clone());
        let others: Vec<usize> = self
            .current_masters()
            .into_iter()
            .filter(|&m| m != from && m != to)
            .collect();
        // One connection per node for the whole move (a thousand slots take ~10k commands).
        let mut src = self.nodes[from].connect();
        let mut dst = self.nodes[to].connect();
        let mut rest: Vec<RespConnection> =
            others.iter().map(|&m| self.nodes[m].connect()).collect();
        let run = |c: &mut RespConnection, args: &[&[u8]]| -> RespValue {
            c.cmd(args).unwrap_or_else(|e| {
                panic!(
                    "migration command {:?}: {e}",
                    String::from_utf8_lossy(args[0])
                )
            })
        };
        let mut migrate_head: Vec<Vec<u8>> = [
            "MIGRATE",
            "127.0.0.1",
            &self.nodes[to].port().to_string(),
            "",
            "0",
            "10000",
        ]
        .iter()
        .map(|a| a.as_bytes().to_vec())
        .collect();
        if let Some(pw) = self.nodes[from].password() {
            migrate_head.push(b"AUTH".to_vec());
            migrate_head.push(pw.as_bytes().to_vec());
        }
        migrate_head.push(b"REPLACE".to_vec());
        migrate_head.push(b"KEYS".to_vec());
        // Valkey 8+ replicates SETSLOT and waits for every replica announcing a version above
        // 7.2 (the agent included) for 2 s by default; on this loaded 2-core machine an
        // fsync can take longer, so give it the time a slow store would need.
        let wait: &[&[u8]] = if self.flavor == RedisFlavor::Valkey9 {
            &[b"TIMEOUT", b"15000"]
        } else {
            &[]
        };
        for slot in slots {
            let s = slot.to_string();
            let s = s.as_bytes();
            let importing = [
                &[
                    &b"CLUSTER"[..],
                    b"SETSLOT",
                    s,
                    b"IMPORTING",
                    src_id.as_bytes(),
                ][..],
                wait,
            ]
            .concat();
            expect_ok(run(&mut dst, &importing), "SETSLOT IMPORTING");
            let migrating = [
                &[
                    &b"CLUSTER"[..],
                    b"SETSLOT",
                    s,
                    b"MIGRATING",
                    dst_id.as_bytes(),
                ][..],
                wait,
            ]
            .concat();
            expect_ok(run(&mut src, &migrating), "SETSLOT MIGRATING");
            loop {
                let keys = match run(&mut src, &[b"CLUSTER", b"GETKEYSINSLOT", s, b"100"]) {
                    RespValue::Array(keys) => keys,
                    other => panic!("GETKEYSINSLOT {slot}: {other}"),
                };
                if keys.is_empty() {
                    break;
                }
                let mut args = migrate_head.clone();
                for k in keys {
                    args.push(
                        k.as_bytes()
                            .unwrap_or_else(|| panic!("GETKEYSINSLOT returned {k}"))
                            .to_vec(),
                    );
                }
                match src
                    .cmd(&args)
                    .unwrap_or_else(|e| panic!("MIGRATE of slot {slot}: {e}"))
                {
                    RespValue::Simple(ok) if ok == "OK" || ok == "NOKEY" => {}
                    other => panic!("MIGRATE of slot {slot}: {other}"),
                }
            }
            // The order of redis-cli's clusterManagerMoveSlot: target, source, then the rest.
            let node = [
                &[&b"CLUSTER"[..], b"SETSLOT", s, b"NODE", dst_id.as_bytes()][..],
                wait,
            ]
            .concat();
            expect_ok(run(&mut dst, &node), "SETSLOT NODE (target)");
            expect_ok(run(&mut src, &node), "SETSLOT NODE (source)");
            for c in &mut rest {
                expect_ok(run(c, &node), "SETSLOT NODE (other master)");
            }
            after_slot(slot);
        }
        self.wait_stable();
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.try_cmd(&["PING"]).is_ok())
    }

    fn view_of(&self, n: &RedisServer) -> Option<ClusterTopology> {
        let reply = n.try_cmd(&["CLUSTER", "NODES"]).ok()?;
        ClusterTopology::from_cluster_nodes(reply.as_str()?).ok()
    }

    /// Waits until every running node reports `cluster_state:ok`, all of them see the same
    /// slot map and the same masters with the same replicas (failed nodes aside), and every
    /// replica's link to its master is up.
    pub fn wait_stable(&self) {
        self.wait_until("the cluster to be stable", SETTLE, |c| c.is_stable());
    }

    /// One check of [`wait_stable`](Self::wait_stable)'s condition.
    pub fn is_stable(&self) -> bool {
        let running: Vec<&RedisServer> = self.running().collect();
        let mut views = Vec::new();
        for n in &running {
            let Ok(info) = n.try_cmd(&["CLUSTER", "INFO"]) else {
                return false;
            };
            if info.as_str().is_none_or(|t| {
                parse_info(t).get("cluster_state").map(String::as_str) != Some("ok")
            }) {
                return false;
            }
            let Ok(repl) = n.try_cmd(&["INFO", "replication"]) else {
                return false;
            };
            let repl = parse_info(repl.as_str().unwrap_or_default());
            if repl.get("role").map(String::as_str) == Some("slave")
                && repl.get("master_link_status").map(String::as_str) != Some("up")
            {
                return false;
            }
            let Some(view) = self.view_of(n) else {
                return false;
            };
            if view.check_coverage().is_err() {
                return false;
            }
            views.push(summary(&view));
        }
        views.windows(2).all(|w| w[0] == w[1])
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok(self) {
            if Instant::now() >= deadline {
                let views: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| match n.try_cmd(&["CLUSTER", "NODES"]) {
                        Ok(r) => format!("port {}:\n{}", n.port(), r.as_str().unwrap_or("?")),
                        Err(e) => format!("port {}: {e}", n.port()),
                    })
                    .collect();
                panic!(
                    "{} cluster: timed out after {timeout:?} waiting for {what}\n{}",
                    self.flavor,
                    views.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What nodes must agree on: the slot map and each serving master's healthy replicas.
fn summary(t: &ClusterTopology) -> Vec<(String, String, Vec<String>)> {
    use wire::redis::cluster::NodeHealth;
    t.serving_shards()
        .map(|s| {
            (
                s.master.id.clone(),
                s.slots.to_string(),
                s.replicas
                    .iter()
                    .filter(|r| r.health != NodeHealth::Failed)
                    .map(|r| r.id.clone())
                    .collect(),
            )
        })
        .collect()
}

/// 16384 slots split into `n` contiguous ranges exactly as `redis-cli --cluster create`
/// (`clusterManagerCommandCreate`: a float cursor, `lround`, the last master takes the rest):
/// 3 masters get 0-5460, 5461-10922, 10923-16383.
pub fn even_ranges(n: usize) -> Vec<SlotRange> {
    let total = f64::from(wire::redis::cluster::SLOT_COUNT);
    let n = n.max(1);
    let per_node = total / n as f64;
    let mut out = Vec::with_capacity(n);
    let mut first: i64 = 0;
    let mut cursor = 0.0f64;
    for i in 0..n {
        // `lround`: halves away from zero, as f64::round.
        let mut last = (cursor + per_node - 1.0).round() as i64;
        if last > total as i64 - 1 || i == n - 1 {
            last = total as i64 - 1;
        }
        last = last.max(first);
        out.push(SlotRange::new(first, last).unwrap_or_else(|e| panic!("even range {i}/{n}: {e}")));
        first = last + 1;
        cursor += per_node;
    }
    out
}

/// The harness client's reply as `wire`'s, to feed `wire`'s parsers.
pub fn to_wire(v: &RespValue) -> Reply {
    match v {
        RespValue::Simple(s) => Reply::Simple(s.clone()),
        RespValue::Error(e) => Reply::Error(e.clone()),
        RespValue::Integer(i) => Reply::Integer(*i),
        RespValue::Bulk(b) => Reply::Bulk(Some(bytes::Bytes::copy_from_slice(b))),
        RespValue::Nil => Reply::Bulk(None),
        RespValue::Array(items) => Reply::Array(items.iter().map(to_wire).collect()),
    }
}

fn expect_ok(reply: RespValue, what: &str) {
    assert!(reply.is_ok(), "{what}: {reply}");
}

/// A minimal cluster client for tests: routes by the key's slot, follows `-MOVED` (and
/// remembers the new owner) and `-ASK` (one `ASKING`), retries `-TRYAGAIN` (a multi-key
/// command on a slot half migrated) and `-CLUSTERDOWN` (a failover in progress) for up to
/// 30 s. Other errors come back as [`RespValue::Error`].
#[derive(Debug)]
pub struct ClusterClient {
    ports: Vec<u16>,
    password: Option<String>,
    owner_port: Vec<u16>,
    conns: BTreeMap<u16, RespConnection>,
    redirects: u64,
}

impl ClusterClient {
    fn conn(&mut self, port: u16) -> std::io::Result<&mut RespConnection> {
        if !self.conns.contains_key(&port) {
            assert!(
                self.ports.contains(&port),
                "redirect to port {port}, not a node of this cluster"
            );
            let mut c = RespConnection::connect(port)?;
            if let Some(pw) = &self.password {
                let r = c.cmd(&["AUTH", pw])?;
                if !r.is_ok() {
                    return Err(std::io::Error::other(format!("AUTH failed: {r}")));
                }
            }
            self.conns.insert(port, c);
        }
        self.conns
            .get_mut(&port)
            .ok_or_else(|| std::io::Error::other("connection vanished"))
    }

    /// `-MOVED`/`-ASK` redirects followed so far (a migration test checks its load saw
    /// some).
    pub fn redirects(&self) -> u64 {
        self.redirects
    }

    /// Runs `args` on the node owning `key`'s slot.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, key: &[u8], args: &[A]) -> RespValue {
        let slot = usize::from(key_hash_slot(key));
        let mut port = self.owner_port[slot];
        let mut asking = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = match self.conn(port).and_then(|c| {
                if asking {
                    let r = c.cmd(&["ASKING"])?;
                    if !r.is_ok() {
                        return Err(std::io::Error::other(format!("ASKING: {r}")));
                    }
                }
                c.cmd(args)
            }) {
                Ok(r) => r,
                Err(e) => {
                    // A killed node: drop the connection; the caller decides what a failed
                    // command means (the test of a crash expects some).
                    self.conns.remove(&port);
                    assert!(
                        Instant::now() < deadline,
                        "command on key {:?} failed for 30 s: {e}",
                        String::from_utf8_lossy(key)
                    );
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            asking = false;
            let RespValue::Error(e) = &reply else {
                return reply;
            };
            let words: Vec<&str> = e.split(' ').collect();
            match words.as_slice() {
                [kind @ ("MOVED" | "ASK"), _, addr] => {
                    self.redirects += 1;
                    port = addr
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .unwrap_or_else(|| panic!("bad redirect {e}"));
                    if *kind == "MOVED" {
                        self.owner_port[slot] = port;
                    } else {
                        asking = true;
                    }
                }
                ["TRYAGAIN", ..] | ["CLUSTERDOWN", ..] => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return reply,
            }
            assert!(
                Instant::now() < deadline,
                "command on key {:?} still redirected after 30 s: {reply}",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// `SET key value`; panics unless `+OK`.
    pub fn set(&mut self, key: &[u8], value: &[u8]) {
        let reply = self.cmd(key, &[&b"SET"[..], key, value]);
        expect_ok(reply, "SET");
    }

    /// `GET key`; `None` for a missing key.
    pub fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        match self.cmd(key, &[&b"GET"[..], key]) {
            RespValue::Bulk(b) => Some(b),
            RespValue::Nil => None,
            other => panic!("GET {:?}: {other}", String::from_utf8_lossy(key)),
        }
    }
}

impl RedisCluster {
    /// [`dump_cluster`] of this cluster's running nodes.
    pub fn dump(&self) -> BTreeMap<String, String> {
        let ports: Vec<u16> = self.running().map(RedisServer::port).collect();
        dump_cluster(&ports, self.nodes[0].password())
    }
}

/// A canonical dump of a cluster's data (a harness cluster or one a restore started): key →
/// `type[ ttl] value`, over every master among `ports` (replicas are skipped), database 0
/// (the only one in cluster mode). Panics when a key is held by two masters or by a master
/// that does not own its slot: a restored cluster must hold every key exactly once, where
/// clients will look for it. Keys are shown lossily as UTF-8.
pub fn dump_cluster(ports: &[u16], password: Option<&str>) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut holder: BTreeMap<String, u16> = BTreeMap::new();
    for &port in ports {
        let mut conn = RespConnection::connect(port)
            .unwrap_or_else(|e| panic!("dump: cannot connect to port {port}: {e}"));
        let mut cmd = |args: &[&[u8]]| -> RespValue {
            conn.cmd(args)
                .unwrap_or_else(|e| panic!("dump: port {port}: {e}"))
        };
        if let Some(pw) = password {
            expect_ok(cmd(&[b"AUTH", pw.as_bytes()]), "AUTH");
        }
        let role = cmd(&[b"ROLE"]);
        if let RespValue::Array(r) = &role {
            if r.first().and_then(RespValue::as_str) == Some("slave") {
                continue;
            }
        }
        let nodes = cmd(&[b"CLUSTER", b"NODES"]);
        let text = nodes
            .as_str()
            .unwrap_or_else(|| panic!("dump: CLUSTER NODES of port {port}: {nodes}"));
        let my_id = text
            .lines()
            .find(|l| {
                l.split(' ')
                    .nth(2)
                    .is_some_and(|f| f.split(',').any(|x| x == "myself"))
            })
            .and_then(|l| l.split(' ').next())
            .unwrap_or_else(|| panic!("dump: port {port} has no `myself` line"))
            .to_owned();
        let map = ClusterTopology::from_cluster_nodes(text)
            .and_then(|t| t.slot_map().map_err(ClusterError::from))
            .unwrap_or_else(|e| panic!("dump: topology of port {port}: {e}"));
        let mut cursor = b"0".to_vec();
        loop {
            let reply = cmd(&[b"SCAN", &cursor, b"COUNT", b"1000"]);
            let RespValue::Array(parts) = reply else {
                panic!("dump: SCAN on port {port}: {reply}");
            };
            let (Some(next), Some(RespValue::Array(keys))) = (parts.first(), parts.get(1)) else {
                panic!("dump: SCAN on port {port}: {parts:?}");
            };
            cursor = next.as_bytes().unwrap_or(b"0").to_vec();
            for k in keys {
                let key = k.as_bytes().unwrap_or_else(|| panic!("dump: key {k}"));
                let shown = String::from_utf8_lossy(key).into_owned();
                let owner = map.owner_of_key(key);
                assert_eq!(
                    owner,
                    Some(my_id.as_str()),
                    "dump: key {shown:?} (slot {}) is on port {port}, not on its slot's owner",
                    key_hash_slot(key)
                );
                if let Some(other) = holder.insert(shown.clone(), port) {
                    panic!("dump: key {shown:?} is on ports {other} and {port}");
                }
                let ty = cmd(&[b"TYPE", key]).as_str().unwrap_or("?").to_owned();
                let value = match ty.as_str() {
                    "string" => cmd(&[b"GET", key]),
                    "list" => cmd(&[b"LRANGE", key, b"0", b"-1"]),
                    "hash" => sorted_groups(cmd(&[b"HGETALL", key]), 2),
                    "set" => sorted_groups(cmd(&[b"SMEMBERS", key]), 1),
                    "zset" => cmd(&[b"ZRANGE", key, b"0", b"-1", b"WITHSCORES"]),
                    "stream" => cmd(&[b"XRANGE", key, b"-", b"+"]),
                    other => panic!("dump: unexpected type {other} of {shown:?}"),
                };
                let ttl = cmd(&[b"PTTL", key]).as_int().unwrap_or(-1);
                let has_ttl = if ttl >= 0 { " ttl" } else { "" };
                out.insert(shown, format!("{ty}{has_ttl} {value}"));
            }
            if cursor == b"0" {
                break;
            }
        }
    }
    out
}

/// Sorts an array reply in groups of `group` items (hash fields, set members).
fn sorted_groups(v: RespValue, group: usize) -> RespValue {
    let RespValue::Array(items) = v else { return v };
    let mut groups: Vec<Vec<RespValue>> = items.chunks(group).map(<[RespValue]>::to_vec).collect();
    groups.sort_by_key(|g| g.iter().map(ToString::to_string).collect::<Vec<_>>());
    RespValue::Array(groups.into_iter().flatten().collect())
}
