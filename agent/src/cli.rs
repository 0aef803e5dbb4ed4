//! The command line. Sub-commands are added as capabilities land; each validates its
//! arguments into a config before anything touches a server or a repository.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Where the repository is: one definition for every command that opens one.
#[derive(Debug, Args, Clone)]
pub struct RepoArgs {
    /// Repository URL: file:///dir, s3://bucket/prefix (AWS_* environment), gs://, az://.
    /// Encryption comes from SYNCBRIDGE_RECIPIENTS[_FILE] (to write) and
    /// SYNCBRIDGE_IDENTITY (to read).
    #[arg(long, env = "SYNCBRIDGE_REPO")]
    pub repo: String,
}

/// Streaming backup agent for PostgreSQL and Redis/Valkey.
#[derive(Debug, Parser)]
#[command(name = "syncbridge-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version and build facts.
    Version,
    /// PostgreSQL: stream WAL into a repository, fetch WAL for restore_command, check a source.
    Postgres(crate::pg::cli::PostgresArgs),
    /// Redis/Valkey: snapshots as a replica, RDB checks.
    Redis(crate::redis::cli::RedisArgs),
    /// Repository: init, list, cat (decrypt + decompress to stdout), check objects.
    Repo(crate::repo_cmd::RepoCmdArgs),
    /// Restore a backup from a repository: PostgreSQL to a point in time (--to-time,
    /// --to-lsn, --to-xid, or the latest archived point).
    Restore(crate::restore::RestoreArgs),
    /// List what a PostgreSQL repository can restore: base backups (LSN and time ranges,
    /// sizes), archived WAL per timeline with any holes.
    List(crate::list::ListArgs),
}

/// Runs one command's future on a fresh multi-threaded runtime: every sub-command that
/// talks to a server or a repository starts here.
pub fn block_on<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(future)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Version => {
            println!("syncbridge-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Postgres(args) => crate::pg::cli::run(args),
        Command::Redis(args) => crate::redis::cli::run(args),
        Command::Repo(args) => crate::repo_cmd::run(args),
        Command::Restore(args) => crate::restore::run(args),
        Command::List(args) => crate::list::run(args),
    }
}
