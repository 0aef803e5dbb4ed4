//! `syncbridge-agent postgres …`: the PostgreSQL sub-commands and their arguments.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::conn::{ConnectMode, PgConnection};
use super::conninfo::ConnInfo;
use wire::pg::commands::IdentifySystem;
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
    /// system identifier, timeline, WAL position, segment size, server version.
    Check(CheckArgs),
}

/// Where to connect.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// libpq connection URL or keyword string; PGHOST, PGPORT, PGUSER, PGPASSWORD,
    /// PGPASSFILE, PGSSLMODE, PGAPPNAME… fill what it leaves out.
    #[arg(long, env = "SYNCBRIDGE_PG_SOURCE", default_value = "")]
    pub source: String,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    source: SourceArgs,
}

/// Runs a `postgres` sub-command.
pub fn run(args: PostgresArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match args.command {
            PostgresCommand::Check(a) => check(a).await,
        }
    })
}

async fn check(args: CheckArgs) -> Result<ExitCode> {
    let info = ConnInfo::parse(&args.source.source).context("reading --source")?;
    let mut conn = PgConnection::connect(&info, ConnectMode::Physical, "syncbridge").await?;
    let ident = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let row = ident
        .first()
        .and_then(|r| r.row(0))
        .context("IDENTIFY_SYSTEM returned no row")?;
    let id = IdentifySystem::from_row(&row)?;
    let seg = conn.simple_query("SHOW wal_segment_size").await?;
    let seg_text = seg
        .first()
        .context("SHOW wal_segment_size returned nothing")?
        .single_text()?;
    let seg_size = WalSegmentSize::from_setting(&seg_text)?;
    println!("server:            {}", conn.endpoint());
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
