//! `syncbridge-agent redis …`: the Redis/Valkey sub-commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use storage::Repository;
use tokio::io::AsyncReadExt;
use wire::redis::handshake::PsyncReply;
use wire::redis::rdb::RdbValidator;

use super::link::MasterLink;
use super::restore::RedisRestoreOptions;
use super::snapshot;
use super::source::RedisSource;
use crate::util::duration::{parse_duration, parse_duration_or_off};

/// Redis/Valkey: snapshots and command streams captured as a replica.
#[derive(Debug, Args)]
pub struct RedisArgs {
    #[command(subcommand)]
    command: RedisCommand,
}

#[derive(Debug, Subcommand)]
enum RedisCommand {
    /// Take one snapshot now and exit: attach as a replica, receive the RDB (diskless when
    /// the master allows it, so nothing touches the master's disk), validate it while it
    /// uploads, record it as a new generation. The agent's Redis user needs the ACL
    /// `+psync +replconf +sync +ping +info +cluster|myid +cluster|shards +cluster|nodes`.
    /// On a Redis Cluster node: every shard (one generation each) and the slot map, unless
    /// --cluster-shard-only.
    Snapshot(SnapshotArgs),
    /// Attach as a replica and keep the repository current: a snapshot generation, then
    /// every write command in chunks stored at least every --max-lag. Restarted, it resumes
    /// with PSYNC from the last stored chunk (no new snapshot while the master's backlog
    /// covers the gap). Stops cleanly, storing what it read, on SIGINT/SIGTERM.
    Stream(StreamArgs),
    /// Rebuild a server's files for a moment: the newest generation whose snapshot is at
    /// or before --to-time, plus its commands up to that time (never splitting MULTI/EXEC).
    /// Writes a multi-part AOF directory that `redis-server --appendonly yes` loads, or
    /// dump.rdb (--format rdb, when the time falls at a snapshot), or one appendonly.aof
    /// with an RDB preamble (--format aof-single). Refuses a time before the first
    /// snapshot, past the latest restorable time, or across a gap in the chunks.
    Restore(RestoreArgs),
    /// Read back every generation in the repository and prove it restorable: each snapshot
    /// through the RDB validator, the command chunks as a gap-free chain of whole commands
    /// with sane time indexes. Exit status 1 if anything is wrong.
    Verify(VerifyArgs),
    /// Check an RDB file (`dump.rdb`, a `.base.rdb`): format, checksum, every value's
    /// encoding; prints keys per database and per type. Exit status 1 if it is damaged.
    VerifyRdb(VerifyRdbArgs),
}

/// Where to connect.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// The master: redis://[user@]host[:port], or rediss:// for TLS. The password comes
    /// from --password-file (best: `ps` shows no password), the URL, or
    /// SYNCBRIDGE_REDIS_PASSWORD / REDISCLI_AUTH.
    #[arg(
        long,
        env = "SYNCBRIDGE_REDIS_SOURCE",
        default_value = "",
        hide_env_values = true
    )]
    pub source: String,
    /// File holding the password (one line), for AUTH.
    #[arg(long, env = "SYNCBRIDGE_REDIS_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// rediss://: CA bundle (PEM) to check the server against (default: system store).
    #[arg(long, env = "SYNCBRIDGE_REDIS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// rediss://: client certificate (PEM), for servers with tls-auth-clients yes.
    #[arg(long, env = "SYNCBRIDGE_REDIS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// rediss://: client private key (PEM).
    #[arg(long, env = "SYNCBRIDGE_REDIS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl SourceArgs {
    /// The validated source.
    pub fn parse(&self) -> Result<RedisSource> {
        crate::util::redact::warn_password_on_command_line(
            &self.source,
            "SYNCBRIDGE_REDIS_SOURCE",
            "--password-file",
        );
        let password = self
            .password_file
            .as_deref()
            .map(|f| crate::util::secret_file::read_secret_file(f, "Redis password"))
            .transpose()?;
        let mut source =
            RedisSource::parse_with_password(&self.source, password).context("reading --source")?;
        let files = super::tls::TlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        if !source.tls && files != super::tls::TlsFiles::default() {
            bail!("--tls-ca/--tls-cert/--tls-key need a rediss:// source");
        }
        source.tls_files = files;
        Ok(source)
    }
}

pub use crate::cli::RepoArgs;

#[derive(Debug, Args)]
struct SnapshotArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    repo: RepoArgs,
    /// When the source is a Redis/Valkey Cluster node: capture this node's shard only
    /// (its master's slots; one agent per shard). Without it a cluster node's whole cluster
    /// is captured: one generation per shard, from every master at once, and the slot map.
    #[arg(long)]
    cluster_shard_only: bool,
}

/// `redis snapshot` of a whole cluster: one generation per shard.
async fn snapshot_cluster(repo: &Repository, seed: &RedisSource) -> Result<ExitCode> {
    let taken = super::cluster_stream::snapshot(repo, std::slice::from_ref(seed)).await?;
    println!("cluster:      {} shards", taken.len());
    for t in &taken {
        let m = &t.captured.manifest;
        println!(
            "shard {}:    slots {} ({} of 16384) from {}: generation {} ({}, {} bytes, {} keys)",
            t.shard,
            t.slots,
            t.slots.slot_count(),
            t.master,
            m.generation,
            m.snapshot.rdb_format,
            m.snapshot.size,
            t.captured.report.total_keys()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
struct StreamArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    repo: RepoArgs,
    /// Longest time read commands wait before they are stored (e.g. 1.5s, 500ms, 2m).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    max_lag: Duration,
    /// Take a new snapshot generation this often (only if writes happened), on a second
    /// connection while streaming continues, so a restore replays at most this much.
    /// `off` keeps one generation.
    #[arg(long, default_value = "15m", value_parser = parse_duration_or_off, value_name = "DURATION|off")]
    snapshot_every: Duration,
    /// Local directory where cut chunks wait (fsynced) while the store is slower than the
    /// master, so the agent keeps reading at line rate and the master never drops it for an
    /// output-buffer overrun. Chunks left there by a crash are stored on the next start.
    #[arg(long, env = "SYNCBRIDGE_REDIS_SPOOL")]
    spool: Option<PathBuf>,
    /// Most the spool may hold (MiB). When full, the agent says so and pauses reading.
    #[arg(long, default_value_t = 1024)]
    spool_limit_mib: u64,
    /// When the source is a replica: `stream` from it (chained replication), `wait` until it
    /// is promoted (one sidecar per pod, only the master's streams), or `follow` to the
    /// master it reports. `wait` and `follow` ask `ROLE` (ACL +role).
    #[arg(long, value_enum, default_value = "stream")]
    on_replica: super::stream::ReplicaPolicy,
    /// When the source is a Redis/Valkey Cluster node: capture this node's shard only
    /// (its master's slots; one sidecar per shard). The slots covered are logged at start,
    /// and a warning whenever they change. Without it, a cluster node's whole cluster is
    /// captured: every master's stream at once, each shard under
    /// redis/cluster/shards/<shard>/, and the slot map whenever it changes.
    #[arg(long)]
    cluster_shard_only: bool,
    /// Further nodes of the cluster to read the topology from, when --source does not
    /// answer (host:port; same credentials and TLS settings). Repeatable.
    #[arg(long, value_name = "HOST:PORT")]
    cluster_seed: Vec<String>,
    /// Whole-cluster capture: MiB of received data every shard's stream may hold in memory
    /// together (split evenly between the shards: each a chunk being filled and uploads in
    /// flight); what does not fit waits in the master's output buffer or the spool.
    /// Snapshots are stored with 5 MiB parts, one in flight per shard. A single server
    /// keeps the stream's defaults (16 MiB chunks, 4 uploads in flight).
    #[arg(long, default_value_t = super::cluster_stream::DEFAULT_MEMORY_BUDGET_MIB, value_name = "MIB")]
    memory_budget_mib: u64,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Directory to write (created; must be empty).
    #[arg(long)]
    target: PathBuf,
    /// The moment to restore: RFC 3339 (2026-11-27T16:20:00.250Z),
    /// `YYYY-MM-DD HH:MM:SS[.fff][±HH[:MM]]` (UTC when no zone is given) or @<unix ms>, as
    /// for PostgreSQL. Default: the latest restorable time.
    #[arg(long)]
    to_time: Option<String>,
    /// Output layout.
    #[arg(long, value_enum, default_value = "aof")]
    format: super::restore::RestoreFormat,
    /// Start this redis-server/valkey-server on the result (free port, 127.0.0.1), wait for
    /// it to load and print keys per database. It keeps running; stop it with SHUTDOWN.
    #[arg(long)]
    start: Option<PathBuf>,
    /// In a Redis Cluster repository: restore this one shard (`s01`, as `list` shows) as a
    /// single server. The keys are those of the slots the shard owned.
    #[arg(long, value_name = "SHARD")]
    shard: Option<String>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// In a Redis Cluster repository: verify this one shard (`s01`, as `list` shows).
    #[arg(long, value_name = "SHARD")]
    shard: Option<String>,
}

/// The repository, or with `--shard` the scoped view of that shard of a cluster capture.
fn shard_view(repo: Repository, shard: Option<&str>) -> Result<Repository> {
    let Some(shard) = shard else {
        return Ok(repo);
    };
    let key = storage::layout::ShardKey::parse(shard)
        .with_context(|| format!("--shard {shard:?}: shards are named s01, s02, ..."))?;
    super::cluster_stream::shard_repo(&repo, &key)
}

#[derive(Debug, Args)]
struct VerifyRdbArgs {
    /// The RDB file.
    file: PathBuf,
}

/// Runs a `redis` sub-command.
pub fn run(args: RedisArgs) -> Result<ExitCode> {
    crate::cli::block_on(async move {
        match args.command {
            // On a worker thread of its own: socket readiness then wakes the task where
            // the runtime polled it, not the thread blocked in `block_on` (two thread
            // switches per read, about 100 per MiB of snapshot).
            RedisCommand::Snapshot(a) => tokio::spawn(snapshot_now(a))
                .await
                .context("the snapshot task failed")?,
            RedisCommand::Stream(a) => stream(a).await,
            RedisCommand::Restore(a) => restore(a).await,
            RedisCommand::Verify(a) => verify(a).await,
            RedisCommand::VerifyRdb(a) => verify_rdb(a).await,
        }
    })
}

async fn snapshot_now(args: SnapshotArgs) -> Result<ExitCode> {
    let source = args.source.parse()?;
    let repo = args.repo.open()?;
    let mut link = MasterLink::connect(&source).await?;
    // Before PSYNC: a cluster node captures the whole cluster, unless asked for its shard.
    let place = super::cluster::detect(&mut link).await?;
    if place.is_some() && !args.cluster_shard_only {
        drop(link);
        // Every master's snapshot at once: small part buffers per shard.
        let repo = super::cluster_stream::cluster_repo(&repo);
        return snapshot_cluster(&repo, &source).await;
    }
    if let Some(p) = &place {
        tracing::info!(slots = %p.slots, "{}: capturing this shard only (--cluster-shard-only)", p.describe());
    }
    let (replid, offset) = match link.psync(None).await? {
        PsyncReply::FullResync { replid, offset } => (replid, offset),
        PsyncReply::Continue { .. } => bail!(
            "the master at {} answered PSYNC ? -1 with +CONTINUE",
            source.endpoint()
        ),
    };
    let replied_at = chrono::Utc::now();
    snapshot::ensure_redis_repo(&repo, &replid).await?;
    let captured = snapshot::capture(&repo, &mut link, &replid, offset, replied_at).await?;
    let m = &captured.manifest;
    let secs = captured.elapsed.as_secs_f64();
    println!("generation:   {}", m.generation);
    println!(
        "source:       {} ({})",
        m.source,
        m.snapshot
            .server_version
            .as_deref()
            .unwrap_or("unknown version")
    );
    if let Some(p) = &place {
        println!(
            "cluster:      this shard only: slots {} ({} of 16384, one of {} masters)",
            p.slots,
            p.slots.slot_count(),
            p.masters
        );
    }
    println!("replication:  {} offset {}", m.replid, m.snapshot_offset);
    println!(
        "snapshot:     {} ({}, {} bytes, {} stored, sha256 {})",
        m.snapshot.key,
        m.snapshot.rdb_format,
        m.snapshot.size,
        captured.object.stored_len,
        m.snapshot.sha256
    );
    println!(
        "transfer:     {} in {:.2}s ({:.1} MiB/s)",
        if m.snapshot.diskless {
            "diskless"
        } else {
            "disk-based"
        },
        secs,
        m.snapshot.size as f64 / 1048576.0 / secs.max(1e-9)
    );
    print_keys(&captured.report);
    Ok(ExitCode::SUCCESS)
}

async fn stream(args: StreamArgs) -> Result<ExitCode> {
    let source = args.source.parse()?;
    let repo = args.repo.open()?;
    let opts = super::stream::StreamOptions {
        max_lag: args.max_lag,
        snapshot_every: (!args.snapshot_every.is_zero()).then_some(args.snapshot_every),
        spool: args.spool.clone(),
        spool_limit: args.spool_limit_mib << 20,
        on_replica: args.on_replica,
        cluster_shard_only: args.cluster_shard_only,
        ..Default::default()
    };
    let mut seeds = Vec::new();
    for s in &args.cluster_seed {
        seeds.push(seed_source(&source, s, "--cluster-seed")?);
    }
    let job = super::cluster_job::RedisStreamJob {
        source,
        seeds,
        cluster: None,
        poll: Duration::from_secs(1),
        stream: opts,
        memory_share: Some(args.memory_budget_mib << 20),
    };
    super::cluster_job::run(&repo, &job, crate::job::Control::standalone()).await?;
    Ok(ExitCode::SUCCESS)
}

/// A cluster seed (`--cluster-seed`, `redis.cluster_seeds`: `what`) as a source:
/// `host:port` with the source's credentials and TLS settings.
pub(crate) fn seed_source(source: &RedisSource, text: &str, what: &str) -> Result<RedisSource> {
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("{what} {text:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{what} {text:?}: bad port"))?;
    if host.is_empty() {
        bail!("{what} {text:?} has no host");
    }
    let mut s = source.clone();
    s.host = host.trim_matches(['[', ']']).to_owned();
    s.port = port;
    Ok(s)
}

async fn restore(args: RestoreArgs) -> Result<ExitCode> {
    let repo = shard_view(args.repo.open()?, args.shard.as_deref())?;
    let opts = RedisRestoreOptions::new(
        args.target,
        args.to_time.as_deref(),
        args.format,
        args.start,
    )?;
    restore_and_report(&repo, &opts).await
}

/// Restores a Redis repository as `opts` say, prints what was restored and either how to
/// start a server or, with `opts.start`, starts one. Shared by `redis restore` and the
/// top-level `restore`.
pub async fn restore_and_report(repo: &Repository, opts: &RedisRestoreOptions) -> Result<ExitCode> {
    use super::restore::{describe_time, start_hint};
    let (target, format) = (opts.target.as_path(), opts.format);
    if super::cluster_restore::is_cluster(repo).await? {
        if format != super::restore::RestoreFormat::Aof {
            bail!("a Redis Cluster is restored as one multi-part AOF directory per shard: --format {format:?} is for a single server (or restore one shard with --shard)");
        }
        let done = super::cluster_restore::restore(repo, target, opts.to_time).await?;
        let started = match &opts.start {
            Some(server) => Some(super::cluster_restore::start(server, target, &done).await?),
            None => None,
        };
        super::cluster_restore::report(target, &done, started.as_deref());
        return Ok(ExitCode::SUCCESS);
    }
    let done = super::restore::restore(repo, target, opts.to_time, format).await?;
    println!("generation:   {}", done.generation);
    println!(
        "restored to:  {} (replication offset {})",
        describe_time(done.time_ms),
        done.offset
    );
    println!(
        "snapshot:     {} with {} keys; {} commands replayed after it",
        done.snapshot.format,
        done.snapshot.total_keys(),
        done.commands
    );
    for f in &done.files {
        println!("wrote:        {}", target.join(f).display());
    }
    match &opts.start {
        None => println!(
            "start it with: {}",
            start_hint("redis-server", target, format)
        ),
        Some(server) => start_server(server, target, format).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn start_server(
    server: &std::path::Path,
    target: &std::path::Path,
    format: super::restore::RestoreFormat,
) -> Result<()> {
    let dir =
        std::fs::canonicalize(target).with_context(|| format!("resolving {}", target.display()))?;
    // Another process may take the free port between our probe and the server's bind:
    // then the server exits and we try another port.
    let mut last_error = None;
    for _ in 0..5 {
        match start_once(server, &dir, format).await {
            Ok(port) => return report_started(server, &dir, port).await,
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the server did not start")))
}

/// Starts the server in the background (its own process group, so it outlives the agent)
/// and waits until *this* process (by pid) has loaded the data. Returns its port.
async fn start_once(
    server: &std::path::Path,
    dir: &std::path::Path,
    format: super::restore::RestoreFormat,
) -> Result<u16> {
    use super::restore::RestoreFormat;
    let port = super::server_proc::free_port(false)?;
    let args: &[&str] = match format {
        RestoreFormat::Aof | RestoreFormat::AofSingle => &["--appendonly", "yes"],
        RestoreFormat::Rdb => &["--appendonly", "no", "--dbfilename", "dump.rdb"],
    };
    super::server_proc::spawn_loaded(server, dir, port, args).await?;
    Ok(port)
}

async fn report_started(server: &std::path::Path, dir: &std::path::Path, port: u16) -> Result<()> {
    let keyspace = super::admin::command(port, &[b"INFO", b"keyspace"]).await?;
    println!(
        "server:       {} running on 127.0.0.1:{port} (pid file {})",
        server.display(),
        dir.join("server.pid").display()
    );
    for line in keyspace.lines().filter(|l| l.starts_with("db")) {
        println!("{line}");
    }
    println!("stop it with: redis-cli -p {port} shutdown nosave");
    Ok(())
}

fn print_keys(report: &wire::redis::rdb::RdbReport) {
    for (db, n) in &report.keys_per_db {
        let expires = report.expires_per_db.get(db).copied().unwrap_or(0);
        println!("db{db}:          keys={n} expires={expires}");
    }
    let kinds: Vec<String> = report
        .keys_per_kind
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    println!("types:        {}", kinds.join(" "));
}

async fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let root = args.repo.open()?;
    if args.shard.is_none() && super::cluster_verify::holds_cluster(&root).await? {
        return verify_cluster(&root).await;
    }
    let repo = shard_view(root, args.shard.as_deref())?;
    let checks = super::verify::check_all(&repo, 4).await?;
    if checks.is_empty() {
        bail!("the repository {} holds no Redis generation", repo.url());
    }
    let bad = print_checks(&checks, "");
    if bad > 0 {
        eprintln!("{bad} of {} generations are damaged", checks.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `redis verify` of a whole cluster capture: every shard's generations (as `--shard`
/// checks one), then the shard records and the slot-map history.
async fn verify_cluster(repo: &Repository) -> Result<ExitCode> {
    let catalog_dirs = repo
        .list_dirs(&storage::layout::redis_cluster_shards_prefix())
        .await
        .context("listing the cluster's shards")?;
    let mut generations = std::collections::BTreeMap::new();
    let mut damaged = Vec::new();
    for dir in catalog_dirs {
        let Some(shard) = storage::layout::parse_redis_cluster_shard(&dir) else {
            continue;
        };
        let view = super::cluster_stream::shard_repo(repo, &shard)?;
        let checks = super::verify::check_all(&view, 4)
            .await
            .with_context(|| format!("shard {shard}"))?;
        let bad = checks.iter().filter(|c| !c.is_ok()).count();
        println!(
            "shard {shard}: {} generations{}",
            checks.len(),
            match (checks.len(), bad) {
                (0, _) => " (none complete: its slots cannot be restored)".to_owned(),
                (_, 0) => ", OK".to_owned(),
                (_, n) => format!(", {n} DAMAGED"),
            }
        );
        print_checks(&checks, "  ");
        if checks.is_empty() || bad > 0 {
            damaged.push(shard.to_string());
        }
        generations.insert(shard, checks.len());
    }
    let records = super::cluster_verify::check_records(repo, &generations).await?;
    println!(
        "slot maps: {} records{}",
        records.slot_maps,
        if records.problems.is_empty() {
            ", OK".to_owned()
        } else {
            format!(", {} problems", records.problems.len())
        }
    );
    for (key, p) in &records.problems {
        println!("  problem:    {key}: {p}");
    }
    if generations.is_empty() {
        eprintln!("the repository {} holds no shard", repo.url());
        return Ok(ExitCode::FAILURE);
    }
    if !damaged.is_empty() || !records.problems.is_empty() {
        eprintln!(
            "damaged: {}{}",
            if damaged.is_empty() {
                "no shard".to_owned()
            } else {
                format!("shards {}", damaged.join(", "))
            },
            if records.problems.is_empty() {
                ""
            } else {
                "; the slot-map history"
            }
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one line per generation (and its snapshot and problems), each line after
/// `indent`; returns how many are damaged.
fn print_checks(checks: &[super::verify::GenerationCheck], indent: &str) -> usize {
    use super::restore::describe_time;
    let mut bad = 0;
    for c in checks {
        let m = &c.manifest;
        let state = if c.is_ok() { "OK" } else { "DAMAGED" };
        println!(
            "{indent}{} {state}: snapshot {} at {} (offset {}), {} chunks, {} commands, up to offset {}",
            m.generation,
            m.snapshot.rdb_format,
            describe_time(m.snapshot_unix_ms),
            m.snapshot_offset,
            c.chunks,
            c.commands,
            c.end_offset
        );
        match &c.snapshot {
            Ok(r) => println!(
                "{indent}  snapshot:   {} keys, checksum {}",
                r.total_keys(),
                if r.checksum.is_some() {
                    "ok"
                } else {
                    "not written"
                }
            ),
            Err(e) => println!("{indent}  snapshot:   {e}"),
        }
        for p in &c.problems {
            println!("{indent}  problem:    {p}");
        }
        if !c.is_ok() {
            bad += 1;
        }
    }
    bad
}

async fn verify_rdb(args: VerifyRdbArgs) -> Result<ExitCode> {
    let mut file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("opening {}", args.file.display()))?;
    let mut validator = RdbValidator::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .with_context(|| format!("reading {}", args.file.display()))?;
        if n == 0 {
            break;
        }
        if let Err(e) = validator.feed(&buf[..n]) {
            eprintln!("{}: {e}", args.file.display());
            return Ok(ExitCode::FAILURE);
        }
    }
    match validator.finish() {
        Ok(report) => {
            println!(
                "{}: OK, {} ({} bytes)",
                args.file.display(),
                report.format,
                report.size
            );
            match report.checksum {
                Some(c) => println!("checksum:     {c:#018x} (matches)"),
                None => println!("checksum:     none (written with rdbchecksum no)"),
            }
            print_keys(&report);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::{CommandFactory, Parser};

    use crate::cli::Cli;

    #[test]
    fn redis_sub_commands_parse() {
        Cli::command().debug_assert();
        for args in [
            &[
                "x",
                "redis",
                "stream",
                "--source",
                "redis://h",
                "--repo",
                "file:///r",
            ][..],
            &[
                "x",
                "redis",
                "stream",
                "--repo",
                "file:///r",
                "--snapshot-every",
                "off",
                "--max-lag",
                "250ms",
            ],
            &[
                "x",
                "redis",
                "snapshot",
                "--source",
                "redis://h",
                "--repo",
                "file:///r",
            ],
            &[
                "x",
                "redis",
                "restore",
                "--repo",
                "file:///r",
                "--target",
                "/t",
                "--to-time",
                "@5",
                "--format",
                "aof-single",
            ],
            &["x", "redis", "verify-rdb", "dump.rdb"],
        ] {
            Cli::try_parse_from(args).unwrap();
        }
        assert!(
            Cli::try_parse_from(["x", "redis", "stream", "--repo", "r", "--max-lag", "0s"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["x", "redis", "stream", "--repo", "r", "--max-lag", "5q"])
                .is_err()
        );
    }
}
