//! The `redis stream` job, as `redis stream` and `run` (`[redis]`) both run it: a single
//! server ([`super::stream::run`]), one shard of a cluster (`cluster_shard_only`), or a whole
//! Redis Cluster / Valkey Cluster ([`super::cluster_stream::run`], every shard in this
//! process), chosen from the options or from the source itself (`INFO cluster`,
//! `cluster_enabled:1`; Redis `src/cluster.c` `genClusterInfoString`).
//!
//! One job shape for all three: options, a [`Control`] (cancellation and the published
//! state) and [`crate::job::supervise`] restarting failed attempts. A whole-cluster stream
//! publishes each shard's stream state as a part of its status (`/metrics` label `shard`,
//! one `/readyz` line per shard).

use std::time::Duration;

use anyhow::Result;
use storage::Repository;

use super::cluster::ClusterRefused;
use super::cluster_stream::ClusterOptions;
use super::source::RedisSource;
use super::stream::StreamOptions;
use crate::job::{self, Control, Outcome};

/// Everything the `redis stream` job needs.
#[derive(Debug, Clone)]
pub struct RedisStreamJob {
    /// The node to stream from (any node of a cluster).
    pub source: RedisSource,
    /// Further cluster nodes to read the topology from (same credentials and TLS).
    pub seeds: Vec<RedisSource>,
    /// `Some(true)`: a whole cluster; `Some(false)`: a single server (a cluster node is then
    /// refused unless `stream.cluster_shard_only`); `None`: as the source says.
    pub cluster: Option<bool>,
    /// How often a whole-cluster stream reads the topology.
    pub poll: Duration,
    /// The stream's knobs (every shard's, for a cluster).
    pub stream: StreamOptions,
    /// `run`'s memory share for the Redis stream (bytes, `agent.memory_budget_mib`): a
    /// whole-cluster stream splits it between its shards. `None` (the sub-command): each
    /// shard keeps `stream`'s sizes.
    pub memory_share: Option<u64>,
}

/// Runs the job until `ctl.token` is cancelled or it fails for good.
pub async fn run(repo: &Repository, job: &RedisStreamJob, ctl: Control) -> Result<()> {
    if job.stream.cluster_shard_only {
        return super::stream::run(repo, &job.source, &job.stream, ctl).await;
    }
    let cluster = match job.cluster {
        Some(true) => {
            // Told so: a source that answers it is not one is a configuration mistake.
            if let Ok(Some(false)) = super::cluster_stream::probe(&job.source).await {
                anyhow::bail!(
                    "redis.cluster = true, but {} is not a Redis Cluster node (INFO cluster says cluster_enabled:0); remove the key to stream it as a single server",
                    job.source.endpoint()
                );
            }
            true
        }
        Some(false) => false,
        None => detect(job).await?,
    };
    if !cluster {
        match super::stream::run(repo, &job.source, &job.stream, ctl.clone()).await {
            // The source could not be asked before, and turned out to be a cluster node
            // (refused before anything was written): capture the whole cluster.
            Err(e) if job.cluster.is_none() && is_cluster_refused(&e) => {
                tracing::info!(
                    "{} is a cluster node: streaming the whole cluster",
                    job.source.endpoint()
                );
            }
            other => return other,
        }
    }
    run_cluster(repo, job, ctl).await
}

/// Whether `e` is the single-server stream refusing a cluster node.
fn is_cluster_refused(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<ClusterRefused>().is_some())
}

/// Whether the job streams a whole cluster: yes when seeds are named (only cluster nodes
/// have seeds), else as the source answers (`INFO cluster`). When it cannot be asked now,
/// the single-server stream connects (and retries) as usual, and a cluster node it then
/// meets is streamed as a cluster ([`run`]). A source that never answers fails at once.
async fn detect(job: &RedisStreamJob) -> Result<bool> {
    if !job.seeds.is_empty() {
        return Ok(true);
    }
    Ok(super::cluster_stream::probe(&job.source)
        .await?
        .unwrap_or(false))
}

/// The whole-cluster stream, its attempts supervised: a lost cluster lease or a failed
/// first topology read is retried; a shard that failed for good ends the job.
async fn run_cluster(repo: &Repository, job: &RedisStreamJob, ctl: Control) -> Result<()> {
    let mut seeds = vec![job.source.clone()];
    seeds.extend(job.seeds.iter().cloned());
    // The stream options size the whole capture; `cluster_stream::run` gives each shard
    // an even share of them.
    let stream = match job.memory_share {
        Some(share) => super::cluster_stream::budget_stream_options(job.stream.clone(), share),
        None => job.stream.clone(),
    };
    let repo = &super::cluster_stream::cluster_repo(repo);
    let opts = ClusterOptions {
        seeds,
        poll: job.poll,
        stream,
    };
    job::supervise(
        "redis stream",
        &ctl.token,
        &ctl.status,
        job::Backoff::default(),
        async |_| {
            super::cluster_stream::run(repo, &opts, ctl.clone()).await?;
            Ok(Outcome::Stopped)
        },
    )
    .await
}
