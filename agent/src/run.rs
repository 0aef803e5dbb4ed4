//! `syncbridge-agent run --config FILE`: the sidecar. One process runs every job the file
//! describes ([`crate::config`]), each under [`crate::job::supervise`] exactly as its own
//! sub-command runs it (`postgres stream`, `redis stream`: a single server, one shard, or a
//! whole Redis Cluster, [`crate::redis::cluster_job`]), plus `/healthz`, `/readyz` and
//! `/metrics` ([`crate::http`]). Scheduled jobs run beside them: base backups
//! (`postgres.backup_every`, then `expire` with `postgres.retention`), Redis retention (as
//! often as snapshot generations are made), and `verify` of each repository (`[verify]`).
//!
//! Stopping: the first SIGTERM or SIGINT cancels every job; each stores what it holds
//! (the WAL delta, the Redis chunk), reports its final position and releases its lease.
//! `agent.stop_timeout` bounds that; a second signal exits at once. A job that fails
//! fatally (a wrong password, a repository that vanished) stays failed, logged, not ready
//! and `syncbridge_job_up 0`, while the others go on; `run` exits 1 when every job has
//! ended and one of them failed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::future::LocalBoxFuture;

use crate::catalog::retention::Policy;
use crate::config::{Config, RetentionConfig};
use crate::http::{JobKind, Watched};
use crate::job::{Control, JobStatus};

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (TOML; packaging/agent.toml is the commented example).
    #[arg(long, env = "SYNCBRIDGE_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// Override one key (`--set postgres.max_lag=2s`); wins over the file and the
    /// SYNCBRIDGE_<SECTION>_<KEY> environment. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Check the configuration (keys, values, secret files, repository options) and exit.
    #[arg(long)]
    pub check: bool,
}

/// Loads the configuration (before logging is set up: its `agent.log_format` chooses it).
pub fn load(args: &RunArgs) -> Result<Config> {
    crate::config::load(&args.config, std::env::vars(), &args.sets)
}

/// Runs `run` with a loaded configuration.
pub fn run(args: RunArgs, config: Config) -> Result<ExitCode> {
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        for (name, present) in [
            ("postgres stream", config.postgres.is_some()),
            ("redis stream", config.redis.is_some()),
            ("http", config.http.is_some()),
        ] {
            if present {
                println!("  {name}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    crate::cli::block_on(run_jobs(config))
}

async fn run_jobs(config: Config) -> Result<ExitCode> {
    crate::util::output::report_as_log_lines();
    let root = tokio_util::sync::CancellationToken::new();
    crate::job::cancel_on_signals(root.clone());
    let mut watched = Vec::new();
    let mut jobs: Vec<(&'static str, LocalBoxFuture<'_, Result<()>>)> = Vec::new();
    let shares = MemoryShares::split(
        config.agent.memory_budget_mib << 20,
        config.postgres.is_some(),
        config.redis.is_some(),
    );
    tracing::debug!(?shares, "memory budget");

    if let Some(pg) = &config.postgres {
        let repo_args = config.repo_args(pg.repository.as_deref())?;
        let source = pg_source(pg)?;
        let repo = repo_args.open_with(storage::RepoOptions {
            compression_level: Some(pg.compression_level),
            lz4: pg.compression == crate::pg::stream::WalCompression::Lz4,
            ..repo_args.options()?
        })?;
        let opts = crate::pg::stream::StreamOptions {
            source,
            repo,
            slot: wire::pg::commands::SlotName::new(&pg.slot).context("postgres.slot")?,
            max_lag: pg.max_lag,
            status_interval: pg.status_interval,
            synchronous: pg.synchronous,
            application_name: pg.application_name.clone(),
            max_inflight: pg.max_inflight.min(shares.pg_max_inflight()),
            on_standby: pg.on_standby,
        };
        let ctl = watch(
            &mut watched,
            &root,
            JobKind::PostgresStream,
            repo_args.display_url(),
        );
        jobs.push((
            "postgres stream",
            Box::pin(crate::pg::stream::run(opts, ctl)),
        ));
    }

    if let Some((pg, schedule)) = config
        .postgres
        .as_ref()
        .and_then(|pg| Some((pg, pg.backup_every.clone()?)))
    {
        let repo_args = config.repo_args(pg.repository.as_deref())?;
        let source = pg_source(pg)?;
        // Opened for each run: a repository opened before its marker existed would keep
        // an empty binding and refuse every object as foreign.
        let open = move || {
            repo_args.open_with(storage::RepoOptions {
                compression_level: Some(3),
                ..repo_args.options()?
            })
        };
        let display = config.repo_args(pg.repository.as_deref())?.display_url();
        let mut opts = crate::pg::backup::BackupOptions {
            source,
            repo: open()?,
            label: None,
            spread_checkpoint: false,
            chunk_bytes: 32 << 20,
            wal_timeout: std::time::Duration::from_secs(300),
            pin: false,
        };
        let policy = pg.retention.map(policy_of);
        let ctl = watch(&mut watched, &root, JobKind::PostgresBackup, display);
        jobs.push((
            "postgres backup",
            Box::pin(async move {
                crate::job::scheduled("postgres backup", &schedule, &ctl, async || {
                    opts.repo = open()?;
                    let repo = &opts.repo;
                    let done = crate::pg::backup::take(&opts).await?;
                    tracing::info!(backup = %done.id, seconds = done.duration.as_secs_f64(), "base backup complete");
                    if let Some(policy) = &policy {
                        crate::expire::apply(repo, policy, false).await?;
                    }
                    let first = crate::catalog::pg::PgCatalog::load(repo)
                        .await?
                        .restorable()
                        .map(|r| r.first_time);
                    ctl.status.update(|s| s.first_recoverable_at = first);
                    Ok(())
                })
                .await
            }),
        ));
    }

    if let Some(r) = &config.redis {
        let repo_args = config.repo_args(r.repository.as_deref())?;
        let source = crate::redis::cli::SourceArgs {
            source: r.source.clone(),
            password_file: r.password_file.clone(),
            tls_ca: r.tls_ca.clone(),
            tls_cert: r.tls_cert.clone(),
            tls_key: r.tls_key.clone(),
        }
        .parse()?;
        let mut seeds = Vec::new();
        for s in &r.cluster_seeds {
            seeds.push(crate::redis::cli::seed_source(
                &source,
                s,
                "redis.cluster_seeds",
            )?);
        }
        let repo = repo_args.open()?;
        let opts = crate::redis::stream::StreamOptions {
            max_lag: r.max_lag,
            snapshot_every: (!r.snapshot_every.is_zero()).then_some(r.snapshot_every),
            spool: r.spool.clone(),
            spool_limit: r.spool_limit_mib << 20,
            on_replica: r.on_replica,
            cluster_shard_only: r.cluster_shard_only,
            max_chunk_bytes: shares.redis_chunk_bytes(),
            uploads_in_flight: shares.redis_uploads_in_flight(),
        };
        let ctl = watch(
            &mut watched,
            &root,
            JobKind::RedisStream,
            repo_args.display_url(),
        );
        // A single server, one shard, or (set or detected) every shard of a cluster.
        let job = crate::redis::cluster_job::RedisStreamJob {
            source,
            seeds,
            cluster: r.cluster,
            poll: std::time::Duration::from_secs(1),
            stream: opts,
            memory_share: Some(shares.redis_share()),
        };
        jobs.push((
            "redis stream",
            Box::pin(async move { crate::redis::cluster_job::run(&repo, &job, ctl).await }),
        ));
    }

    if let Some((r, retention)) = config.redis.as_ref().and_then(|r| Some((r, r.retention?))) {
        let repo_args = config.repo_args(r.repository.as_deref())?;
        repo_args.options()?;
        let policy = policy_of(retention);
        // After each new generation, roughly: as often as generations are made.
        let every = if r.snapshot_every.is_zero() {
            std::time::Duration::from_secs(15 * 60)
        } else {
            r.snapshot_every
        };
        let schedule = crate::config::Schedule::Every(every);
        let ctl = watch(
            &mut watched,
            &root,
            JobKind::RedisExpire,
            repo_args.display_url(),
        );
        jobs.push((
            "redis expire",
            Box::pin(async move {
                crate::job::scheduled("redis expire", &schedule, &ctl, async || {
                    let repo = repo_args.open()?;
                    // Nothing to expire before the stream stored its first generation.
                    if repo.read_marker().await?.is_none() {
                        return Ok(());
                    }
                    crate::expire::apply(&repo, &policy, false).await?;
                    let first = crate::expire::redis_first_recoverable(&repo).await?;
                    ctl.status.update(|s| s.first_recoverable_at = first);
                    Ok(())
                })
                .await
            }),
        ));
    }

    if let Some(v) = &config.verify {
        // Each repository a job writes, once.
        let mut urls: Vec<Option<&str>> = Vec::new();
        if let Some(pg) = &config.postgres {
            urls.push(pg.repository.as_deref());
        }
        if let Some(r) = &config.redis {
            urls.push(r.repository.as_deref());
        }
        let mut seen = std::collections::BTreeSet::new();
        for own in urls {
            let repo_args = config.repo_args(own)?;
            if !seen.insert(repo_args.repo.clone()) {
                continue;
            }
            repo_args.options()?;
            let schedule = v.every.clone();
            let max_age = v.max_age;
            let ctl = watch(
                &mut watched,
                &root,
                JobKind::Verify,
                repo_args.display_url(),
            );
            jobs.push((
                "verify",
                Box::pin(async move {
                    crate::job::scheduled("verify", &schedule, &ctl, async || {
                        let repo = repo_args.open()?;
                        let report = crate::verify::check(&repo, max_age, 4, false).await?;
                        match report.status {
                            crate::verify::Status::Healthy => {
                                tracing::info!(
                                    objects = report.objects,
                                    seconds = report.elapsed_seconds,
                                    "repository verified: healthy"
                                );
                                Ok(())
                            }
                            other => {
                                for p in report.problems.iter().take(20) {
                                    tracing::error!("{}: {}", p.key, p.problem);
                                }
                                bail!(
                                    "verify of {}: {other:?} ({} problems)",
                                    repo.url(),
                                    report.problems.len()
                                )
                            }
                        }
                    })
                    .await
                }),
            ));
        }
    }

    let http_token = tokio_util::sync::CancellationToken::new();
    if let Some(h) = &config.http {
        let listener = crate::http::bind(h.listen).await?;
        tracing::info!(listen = %h.listen, "serving /healthz, /readyz and /metrics");
        tokio::spawn(crate::http::serve(
            listener,
            watched,
            h.ready_max_lag,
            http_token.clone(),
        ));
    }

    let names: Vec<&'static str> = jobs.iter().map(|(n, _)| *n).collect();
    let all = futures::future::join_all(jobs.into_iter().map(|(name, job)| async move {
        let r = job.await;
        match &r {
            Ok(()) => tracing::info!(job = name, "stopped"),
            Err(e) => tracing::error!(job = name, "failed: {e:#}"),
        }
        r
    }));
    let stop_timeout = config.agent.stop_timeout;
    let deadline = async {
        root.cancelled().await;
        tokio::time::sleep(stop_timeout).await;
    };
    let results = tokio::select! {
        r = all => r,
        () = deadline => {
            http_token.cancel();
            bail!(
                "the jobs ({}) did not stop within agent.stop_timeout ({}s) after the signal; what they held may not be stored",
                names.join(", "),
                stop_timeout.as_secs_f64()
            );
        }
    };
    http_token.cancel();
    if results.iter().any(Result::is_err) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_of(r: RetentionConfig) -> Policy {
    Policy {
        keep_full: r.keep_full.map(|n| n as usize),
        keep_within: r.keep_within,
    }
}

/// The PostgreSQL source of `[postgres]`, with the password from `password_file`.
fn pg_source(pg: &crate::config::PostgresConfig) -> Result<crate::pg::conninfo::ConnInfo> {
    let mut source = crate::pg::cli::SourceArgs {
        source: pg.source.clone(),
    }
    .conninfo()?;
    if let Some(f) = &pg.password_file {
        source.password = Some(crate::util::secret_file::read_secret_file(
            f,
            "PostgreSQL password",
        )?);
    }
    Ok(source)
}

/// A new job's control, its state watched by the HTTP endpoint under `kind` and
/// `repository`; cancelled with `root`.
fn watch(
    watched: &mut Vec<Watched>,
    root: &tokio_util::sync::CancellationToken,
    kind: JobKind,
    repository: String,
) -> Control {
    let (status, state) = JobStatus::new();
    watched.push(Watched {
        kind,
        repository,
        state,
        parts: status.parts(),
    });
    Control {
        token: root.child_token(),
        status,
    }
}

/// One memory budget for the streams of a `run` (`agent.memory_budget_mib`), split evenly
/// between the streams configured. The sub-commands keep their defaults, sized for one
/// stream per process and for throughput; a sidecar shares its pod's memory limit.
///
/// What a stream holds is what it received and has not stored: the PostgreSQL stream, the
/// segment being received plus one per upload in flight (segments are 16 MiB); the Redis
/// stream, the chunk being filled plus one per upload in flight. What does not fit waits
/// on the server's side (WAL in `pg_wal` under the slot, commands in the master's output
/// buffer for its replica, or in the Redis spool when one is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryShares {
    pg: Option<u64>,
    redis: Option<u64>,
}

const SEGMENT_BYTES: u64 = 16 << 20;

impl MemoryShares {
    /// Splits `budget` bytes between the streams that run.
    pub fn split(budget: u64, pg: bool, redis: bool) -> MemoryShares {
        let streams = u64::from(pg) + u64::from(redis);
        let share = budget / streams.max(1);
        MemoryShares {
            pg: pg.then_some(share),
            redis: redis.then_some(share),
        }
    }

    /// The Redis stream's share in bytes (a whole-cluster stream splits it between its
    /// shards, [`crate::redis::cluster_job`]).
    pub fn redis_share(&self) -> u64 {
        self.redis.unwrap_or(0)
    }

    /// Segment uploads in flight: what the share holds beside the segment being received
    /// (at least one, or nothing would ever be stored).
    pub fn pg_max_inflight(&self) -> usize {
        let share = self.pg.unwrap_or(0);
        usize::try_from((share / SEGMENT_BYTES).saturating_sub(1))
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// Chunk size: a quarter of the share, between 1 and 16 MiB (the stream's default).
    pub fn redis_chunk_bytes(&self) -> usize {
        let share = self.redis.unwrap_or(0);
        usize::try_from((share / 4).clamp(1 << 20, 16 << 20)).unwrap_or(16 << 20)
    }

    /// Chunk uploads in flight: what the share holds beside the chunk being filled, at
    /// most 4 (the stream's default).
    pub fn redis_uploads_in_flight(&self) -> usize {
        let share = self.redis.unwrap_or(0) as usize;
        (share / self.redis_chunk_bytes())
            .saturating_sub(1)
            .clamp(1, 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_default_budget_splits_between_both_streams() {
        let s = MemoryShares::split(64 * MIB, true, true);
        // 32 MiB each: the segment received and one upload; a 8 MiB chunk and 3 uploads.
        assert_eq!(s.pg_max_inflight(), 1);
        assert_eq!(s.redis_chunk_bytes(), 8 << 20);
        assert_eq!(s.redis_uploads_in_flight(), 3);
    }

    #[test]
    fn one_stream_takes_the_whole_budget() {
        let s = MemoryShares::split(64 * MIB, true, false);
        assert_eq!(s.pg_max_inflight(), 3);
        let s = MemoryShares::split(64 * MIB, false, true);
        assert_eq!(s.redis_chunk_bytes(), 16 << 20);
        assert_eq!(s.redis_uploads_in_flight(), 3);
    }

    #[test]
    fn a_small_budget_still_stores() {
        let s = MemoryShares::split(16 * MIB, true, true);
        assert_eq!(s.pg_max_inflight(), 1);
        assert_eq!(s.redis_chunk_bytes(), 2 << 20);
        assert_eq!(s.redis_uploads_in_flight(), 3);
        let s = MemoryShares::split(1024 * MIB, true, true);
        assert_eq!(s.redis_uploads_in_flight(), 4);
        assert_eq!(s.redis_chunk_bytes(), 16 << 20);
    }
}
