//! `syncbridge-agent postgres …`: the PostgreSQL sub-commands and their arguments.

use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::conn::{ConnectMode, PgConnection};
use super::conninfo::{ConnInfo, TargetSessionAttrs};
use crate::util::duration::parse_duration;
use wire::pg::WalSegmentSize;

/// PostgreSQL: WAL streaming, `restore_command` support, connection checks.
#[derive(Debug, Args)]
pub struct PostgresArgs {
    #[command(subcommand)]
    command: PostgresCommand,
}

#[derive(Debug, Subcommand)]
enum PostgresCommand {
    /// Connect over the replication protocol and print what the agent would stream from:
    /// system identifier, timeline, WAL position, segment size, server version. With
    /// several hosts, first each server's role and cluster; fails if they are not one
    /// cluster.
    Check(CheckArgs),
    /// Stream WAL continuously into the repository over a physical replication slot, like
    /// pg_receivewal: every segment becomes one object named as in pg_wal; the segment in
    /// progress is stored as a chain of delta objects, each holding only the WAL that is new
    /// (at most two a --max-lag, one at a time), removed once the segment is whole; the flush position
    /// reported to the server (and so the slot, and synchronous commits) only advances over
    /// WAL that is in the repository. Safe to kill at any moment and restart.
    Stream(StreamArgs),
    /// Take a base backup through BASE_BACKUP on a replication connection, straight into
    /// the repository (files split into objects of --chunk-mib, checked against the server's
    /// backup_manifest). Complete once the WAL up to its stop LSN is in the repository
    /// (written by `postgres stream`, which must be running).
    Backup(super::backup::BackupArgs),
    /// restore_command helper: `restore_command = 'syncbridge-agent postgres wal-fetch
    /// --repo URL %f %p'`. Writes the WAL segment or history file atomically to %p. Exit 1
    /// only when it is not in the repository (recovery ends there); storage errors are
    /// retried, then, like a corrupt object, exit 200 (> 125) so PostgreSQL stops with FATAL
    /// instead of ending recovery early. So does WAL that is not what its name says: a
    /// segment of the wrong length or whose first page header belongs to another position,
    /// cluster, PostgreSQL version, segment size or a later timeline, or a history file of
    /// another timeline (the message names the segment and the field). The newest partial
    /// segment of a timeline (its chain of deltas, which must link without a gap or an
    /// overlap, or an older build's partial object) is served as its last segment, zero-padded. The next --prefetch segments are
    /// downloaded (and checked) in the background into .syncbridge-prefetch/ beside %p.
    WalFetch(WalFetchArgs),
    /// Background half of wal-fetch's prefetching (started by wal-fetch itself).
    #[command(hide = true)]
    WalPrefetch(WalPrefetchArgs),
}

#[derive(Debug, Args)]
struct WalFetchArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Segments to download ahead in the background (0 disables).
    #[arg(long, default_value_t = 8)]
    prefetch: usize,
    /// The cluster's wal_segment_size in bytes: a segment whose header says otherwise is
    /// refused (without it, the segment's own header gives the size). `restore` sets it.
    #[arg(long, value_name = "BYTES")]
    segment_size: Option<u64>,
    /// The cluster's PostgreSQL major version: WAL of another version is refused (without
    /// it, WAL of any supported version, 14 to 18, is accepted). `restore` sets it.
    #[arg(long, value_name = "MAJOR")]
    pg_version: Option<u32>,
    /// %f: the file PostgreSQL asks for.
    file_name: String,
    /// %p: where to write it.
    target: std::path::PathBuf,
}

#[derive(Debug, Args)]
struct WalPrefetchArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[arg(long)]
    spool: std::path::PathBuf,
    #[arg(long)]
    after: String,
    #[arg(long)]
    segment_size: u64,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    pg_version: Option<u32>,
}

pub use crate::cli::RepoArgs;

#[derive(Debug, Args)]
struct StreamArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    repo: RepoArgs,
    /// Physical replication slot; created (with RESERVE_WAL) if missing.
    #[arg(long, default_value = "syncbridge")]
    slot: String,
    /// Longest time received WAL may wait before it is in the repository (e.g. 1.5s,
    /// 500ms): the RPO. WAL goes out as a delta object when it has waited this less three
    /// times the store's recent write time (at least a tenth of it or 100 ms, at most
    /// half; half until the store has shown its speed). A longer one
    /// means fewer delta objects: at 12 MiB/s of WAL, `10s` stores whole segments only and
    /// needs about an eighth (zstd) to a sixth (LZ4) less CPU than `1s`. While the server
    /// sends small messages (one per commit), the agent reads them every hundredth of it
    /// (at most 10 ms) instead of waking for each (not with --synchronous).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    max_lag: Duration,
    /// Longest time between status updates to the server.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    status_interval: Duration,
    /// Store WAL as soon as it arrives and report it at once, so that with this agent in
    /// synchronous_standby_names every commit waits until its WAL is in the repository.
    /// Commits are grouped: WAL that arrives while a delta is being written goes out as the
    /// next single delta, so a commit waits for about one object write at any commit rate.
    #[arg(long)]
    synchronous: bool,
    /// application_name the server sees (what synchronous_standby_names lists).
    #[arg(long, default_value = "syncbridge")]
    application_name: String,
    /// Uploads in flight before the agent stops reading from the server (each holds up to
    /// one WAL segment in memory).
    #[arg(long, default_value_t = 3)]
    max_inflight: usize,
    /// zstd level for WAL objects: 1..=19, or -1..=-10 for zstd's fast mode (less CPU,
    /// larger objects). 1 is the default: on pgbench WAL, -1 saves about 15% of the
    /// compression CPU for objects 15% larger (benches/README.md has the table).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = parse_wal_level, value_name = "LEVEL")]
    compression_level: i32,
    /// `zstd` (at `--compression-level`) or `lz4` (about a quarter of the CPU of zstd level
    /// 1, objects about twice as large).
    #[arg(long, value_enum, default_value = "zstd")]
    compression: super::stream::WalCompression,
    /// When the source is a standby: `wait` until it is promoted (the sidecar beside every
    /// pod; only the primary's streams), or `stream` from it (cascading replication).
    #[arg(long, value_enum, default_value = "wait")]
    on_standby: super::stream::StandbyPolicy,
}

/// Where to connect.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// libpq connection URL or keyword string (sslmode, sslrootcert, sslcert, sslkey,
    /// channel_binding, passfile, connect_timeout, target_session_attrs as in libpq);
    /// PGHOST, PGPORT, PGUSER, PGPASSWORD, PGPASSFILE, PGSSLMODE, PGCHANNELBINDING,
    /// PGAPPNAME… fill what it leaves out. Every host is tried for at most connect_timeout
    /// (10 s when unset or 0, unlike libpq's "forever"); several hosts (`host=db1,db2` or
    /// `postgres://db1,db2/postgres`) are tried in order, and with
    /// `target_session_attrs=read-write` the stream follows a failover.
    #[arg(
        long,
        env = "SYNCBRIDGE_PG_SOURCE",
        default_value = "",
        hide_env_values = true
    )]
    pub source: String,
}

impl SourceArgs {
    /// The parsed source; warns when its password is on the command line.
    pub fn conninfo(&self) -> Result<ConnInfo> {
        crate::util::redact::warn_password_on_command_line(
            &self.source,
            "SYNCBRIDGE_PG_SOURCE",
            "a password file (PGPASSFILE or passfile=)",
        );
        ConnInfo::parse(&self.source).context("reading --source")
    }
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    source: SourceArgs,
}

/// Prints every server of a multi-host source: its role and cluster, or why it cannot be
/// reached. False when the reachable ones belong to different clusters (a failover to
/// any of them would then be refused by the repository).
/// `--compression-level` of `postgres stream`: 1..=19, or a negative level (zstd's fast
/// mode) down to `storage::MIN_COMPRESSION_LEVEL`.
fn parse_wal_level(text: &str) -> Result<i32, String> {
    let level: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    let min = storage::MIN_COMPRESSION_LEVEL;
    if (1..=19).contains(&level) || (min..=-1).contains(&level) {
        Ok(level)
    } else {
        Err(format!("{level} is not in 1..=19 nor {min}..=-1"))
    }
}

async fn check_each_server(info: &ConnInfo) -> bool {
    println!(
        "servers (target_session_attrs={}):",
        info.target_session_attrs.as_str()
    );
    let mut clusters = std::collections::BTreeSet::new();
    for mut server in info.servers() {
        server.target_session_attrs = TargetSessionAttrs::Any;
        let described = server.describe();
        let conn = PgConnection::connect(&server, ConnectMode::Physical, "syncbridge").await;
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                println!("  {described}: not reachable: {e:#}");
                continue;
            }
        };
        let role = match conn.parameter("in_hot_standby") {
            Some("on") => "standby",
            Some(_) => "primary",
            None => "unknown role",
        };
        let ident = conn.identify_system().await.ok();
        match ident {
            Some(id) => {
                println!(
                    "  {described}: {role}, system_identifier {}, timeline {}",
                    id.system_id, id.timeline
                );
                clusters.insert(id.system_id);
            }
            None => println!("  {described}: {role}, IDENTIFY_SYSTEM failed"),
        }
        conn.close().await;
    }
    if clusters.len() > 1 {
        println!(
            "error: the servers belong to {} different clusters; list only the nodes of one cluster (a primary and its standbys)",
            clusters.len()
        );
        return false;
    }
    true
}

/// Runs a `postgres` sub-command.
pub fn run(args: PostgresArgs) -> Result<ExitCode> {
    if let PostgresCommand::WalFetch(a) = &args.command {
        if let Err(e) = a.repo.validate() {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(super::wal_fetch::EXIT_FATAL));
        }
        // The prefetcher it starts reads the keys from the environment.
        a.repo.export_to_env();
        if super::wal_fetch::serve_from_spool(
            &a.repo.repo,
            &a.file_name,
            &a.target,
            a.prefetch,
            a.pg_version,
        ) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    if let PostgresCommand::Stream(a) = args.command {
        return crate::cli::block_on_current_thread(stream(a));
    }
    crate::cli::block_on(async move {
        match args.command {
            PostgresCommand::Check(a) => check(a).await,
            PostgresCommand::Stream(a) => stream(a).await,
            PostgresCommand::Backup(a) => super::backup::run(a).await,
            PostgresCommand::WalFetch(a) => wal_fetch(a).await,
            PostgresCommand::WalPrefetch(a) => wal_prefetch(a).await,
        }
    })
}

async fn check(args: CheckArgs) -> Result<ExitCode> {
    let info = args.source.conninfo()?;
    if !info.other_servers.is_empty() && !check_each_server(&info).await {
        return Ok(ExitCode::FAILURE);
    }
    let mut conn = PgConnection::connect(&info, ConnectMode::Physical, "syncbridge").await?;
    let id = conn.identify_system().await?;
    let seg_size = conn.wal_segment_size().await?;
    println!("server:            {}", conn.endpoint());
    println!("security:          {}", conn.security());
    println!(
        "server_version:    {}",
        conn.parameter("server_version").unwrap_or("?")
    );
    println!("system_identifier: {}", id.system_id);
    println!("timeline:          {}", id.timeline);
    println!("xlogpos:           {}", id.xlogpos);
    println!("wal_segment_size:  {seg_size}");
    conn.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn stream(args: StreamArgs) -> Result<ExitCode> {
    let source = args.source.conninfo()?;
    let repo_opts = storage::RepoOptions {
        compression_level: Some(args.compression_level),
        lz4: args.compression == super::stream::WalCompression::Lz4,
        ..args.repo.options()?
    };
    let repo = args.repo.open_with(repo_opts)?;
    let slot = wire::pg::commands::SlotName::new(&args.slot)?;
    let opts = super::stream::StreamOptions {
        source,
        repo,
        slot,
        max_lag: args.max_lag,
        status_interval: args.status_interval,
        synchronous: args.synchronous,
        application_name: args.application_name,
        max_inflight: args.max_inflight.max(1),
        on_standby: args.on_standby,
    };
    super::stream::run(opts, crate::job::Control::standalone()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn wal_fetch(args: WalFetchArgs) -> Result<ExitCode> {
    let repo = match args.repo.open() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(super::wal_fetch::EXIT_FATAL));
        }
    };
    let segment_size = match args.segment_size.map(WalSegmentSize::new).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: wal-fetch --segment-size: {e}");
            return Ok(ExitCode::from(super::wal_fetch::EXIT_FATAL));
        }
    };
    Ok(super::wal_fetch::run(
        &repo,
        &args.repo.repo,
        &args.file_name,
        &args.target,
        args.prefetch,
        super::wal_fetch::Hints {
            segment_size,
            pg_major: args.pg_version,
        },
    )
    .await)
}

async fn wal_prefetch(args: WalPrefetchArgs) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let size = WalSegmentSize::new(args.segment_size)?;
    let after = wire::pg::SegmentName::parse(&args.after, size)?;
    super::wal_fetch::prefetch(&repo, &args.spool, after, args.count, args.pg_version).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod level_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wal_compression_levels() {
        assert_eq!(parse_wal_level("1"), Ok(1));
        assert_eq!(parse_wal_level("19"), Ok(19));
        assert_eq!(parse_wal_level("-1"), Ok(-1));
        assert_eq!(parse_wal_level("-10"), Ok(-10));
        for bad in ["0", "20", "-11", "fast", ""] {
            assert!(parse_wal_level(bad).is_err(), "{bad}");
        }
        use clap::Parser;
        let stream = |level: &str| {
            crate::cli::Cli::try_parse_from([
                "x",
                "postgres",
                "stream",
                "--repo",
                "r",
                "--compression-level",
                level,
            ])
        };
        assert!(
            stream("-3").is_ok(),
            "a negative level is a value, not a flag"
        );
        assert!(stream("0").is_err());
    }
}
