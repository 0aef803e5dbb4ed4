//! `syncbridge-agent restore`: open the repository, read its marker and restore what it
//! holds — a PostgreSQL base backup plus WAL replay to a point in time, or (once the Redis
//! restore lands) a Redis generation.

pub mod lock;
pub mod pg;
pub mod place;
pub mod target;
pub mod unpack;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use storage::{RepoKind, Repository};

use crate::cli::RepoArgs;

/// Arguments of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Directory to restore into; it must be empty or absent (see --force).
    #[arg(long)]
    pub target: PathBuf,
    /// Restore to this time: RFC 3339 (2026-11-27T16:07:00Z),
    /// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM]]` (UTC when no zone is given) or
    /// `@<unix ms>`; the same forms for PostgreSQL and Redis. Transactions committed at or
    /// before it are kept.
    #[arg(long, conflicts_with_all = ["to_lsn", "to_xid"])]
    pub to_time: Option<String>,
    /// Restore up to this WAL position (X/Y).
    #[arg(long, conflicts_with_all = ["to_time", "to_xid"])]
    pub to_lsn: Option<String>,
    /// Restore up to and including this transaction id. Where it commits is only known by
    /// replaying WAL, so it cannot be checked up front: PostgreSQL stops with a FATAL error
    /// if recovery reaches the end of the archived WAL without seeing it.
    #[arg(long, conflicts_with_all = ["to_time", "to_lsn"])]
    pub to_xid: Option<u64>,
    /// Use this base backup (id as shown by `syncbridge-agent list`) instead of choosing.
    #[arg(long)]
    pub backup: Option<String>,
    /// Empty a non-empty --target first (refused while a server runs in it, for `/`, and
    /// for a directory that contains the file:// repository or lies inside it).
    #[arg(long)]
    pub force: bool,
    /// Objects downloaded, verified and written at once (default: twice the cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Restore the tablespace recorded at OLD_LOCATION to NEW_LOCATION instead (both
    /// absolute; repeatable). A backup with tablespaces needs one for each, or
    /// --tablespaces-in-place.
    #[arg(long = "tablespace-map", value_name = "OLD=NEW")]
    pub tablespace_map: Vec<String>,
    /// Restore the tablespaces not given a --tablespace-map to the locations recorded in the
    /// backup (the source's paths, outside --target; they must be empty or absent). Without
    /// it a backup with tablespaces is refused, so that nothing is written outside --target
    /// unless asked for. The locations are shown by `list` and by the restore's plan.
    #[arg(long)]
    pub tablespaces_in_place: bool,
    /// recovery_target_timeline: `latest` (default), `current`, or a timeline number.
    #[arg(long, default_value = "latest")]
    pub timeline: String,
    /// Start the restored server with the PostgreSQL binaries in this directory, wait until
    /// recovery reaches the target and report where it stopped.
    #[arg(long, value_name = "BIN_DIR")]
    pub start: Option<PathBuf>,
    /// Give the restored files to this user (and run --start as it); needed when restoring
    /// as root, since PostgreSQL refuses to run as root.
    #[arg(long)]
    pub owner: Option<String>,
    /// Extra options for the server started by --start (passed to `pg_ctl -o`), e.g. `-p 5433`.
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    pub start_options: Option<String>,
    /// How long --start waits for recovery to finish.
    #[arg(long, default_value = "600s", value_parser = crate::util::duration::parse_duration, value_name = "DURATION")]
    pub start_timeout: std::time::Duration,
}

/// Runs `restore`.
pub fn run(args: RestoreArgs) -> Result<ExitCode> {
    crate::cli::block_on(async move {
        let repo = args.repo.open()?;
        let marker = repo
            .read_marker()
            .await
            .context("reading the repository marker")?;
        let Some(marker) = marker else {
            bail!(
                "{} is not a SyncBridge repository (no marker): check --repo",
                repo.url()
            );
        };
        match marker.kind {
            RepoKind::Postgres => pg::run(&repo, &marker, &args).await,
            RepoKind::Redis => redis(&repo, &args).await,
        }
    })
}

/// Redis: the newest generation before the target, replayed to it (`redis restore` does the
/// same with more options, e.g. `--format`).
async fn redis(repo: &Repository, args: &RestoreArgs) -> Result<ExitCode> {
    if args.to_lsn.is_some()
        || args.to_xid.is_some()
        || args.backup.is_some()
        || args.start.is_some()
    {
        bail!("the repository holds Redis backups: --to-lsn, --to-xid, --backup and --start are PostgreSQL options (see `syncbridge-agent redis restore --help`)");
    }
    crate::redis::cli::restore_and_report(
        repo,
        &args.target,
        args.to_time.as_deref(),
        crate::redis::restore::RestoreFormat::Aof,
        None,
    )
    .await
}
