//! `syncbridge-agent restore`: open the repository, read its marker and restore what it
//! holds — a PostgreSQL base backup plus WAL replay to a point in time, or a Redis
//! generation replayed to a time.
//!
//! The command line ([`RestoreArgs`]) stays here: it becomes validated options
//! ([`pg::PgRestoreOptions`], [`RedisRestoreOptions`]) once the repository says which
//! kind it holds, and the restores take only those.

pub mod lock;
pub mod pg;
pub mod place;
pub mod target;
pub mod unpack;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use storage::RepoKind;

use crate::cli::RepoArgs;
use crate::redis::restore::{RedisRestoreOptions, RestoreFormat};
use pg::{Owner, PgRestoreOptions, StartOptions, TimelineTarget};
use target::Target;

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

impl RestoreArgs {
    /// The PostgreSQL restore these arguments ask for: targets parsed, the owner looked up,
    /// `--start` as root without `--owner` refused.
    pub fn pg_options(&self) -> Result<PgRestoreOptions> {
        let target =
            Target::from_args(self.to_time.as_deref(), self.to_lsn.as_deref(), self.to_xid)?;
        let timeline = TimelineTarget::parse(&self.timeline)?;
        let tablespace_map = place::parse_tablespace_map(&self.tablespace_map)?;
        let owner = self.owner.as_deref().map(Owner::lookup).transpose()?;
        if self.start.is_some() && owner.is_none() && pg::is_root() {
            bail!("--start as root needs --owner USER: PostgreSQL refuses to run as root");
        }
        // Downloads wait on the network while decompression is capped by the repository's
        // worker pool, so twice the cores keeps both busy.
        let jobs = self.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
                .clamp(2, 32)
        });
        Ok(PgRestoreOptions {
            target,
            timeline,
            backup: self.backup.clone(),
            target_dir: self.target.clone(),
            force: self.force,
            jobs,
            tablespace_map,
            tablespaces_in_place: self.tablespaces_in_place,
            owner,
            start: self.start.as_ref().map(|bin| StartOptions {
                bin_dir: bin.clone(),
                server_options: self.start_options.clone(),
                timeout: self.start_timeout,
            }),
            wal_fetch_repo_args: self.repo.reader_args()?,
        })
    }

    /// The Redis restore these arguments ask for (the newest generation before the target,
    /// replayed to it, as AOF); PostgreSQL's options are refused (`redis restore` does the
    /// same with more options, e.g. `--format`).
    pub fn redis_options(&self) -> Result<RedisRestoreOptions> {
        if self.to_lsn.is_some()
            || self.to_xid.is_some()
            || self.backup.is_some()
            || self.start.is_some()
        {
            bail!("the repository holds Redis backups: --to-lsn, --to-xid, --backup and --start are PostgreSQL options (see `syncbridge-agent redis restore --help`)");
        }
        RedisRestoreOptions::new(
            self.target.clone(),
            self.to_time.as_deref(),
            RestoreFormat::Aof,
            None,
        )
    }
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
            RepoKind::Postgres => pg::run(&repo, &marker, &args.pg_options()?).await,
            RepoKind::Redis => {
                crate::redis::cli::restore_and_report(&repo, &args.redis_options()?).await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: RestoreArgs,
    }

    fn args(extra: &[&str]) -> RestoreArgs {
        let base = [
            "restore",
            "--repo",
            "file:///tmp/repo",
            "--target",
            "/tmp/t",
        ];
        Cmd::try_parse_from(base.iter().chain(extra)).unwrap().args
    }

    #[test]
    fn postgres_options_are_validated_once() {
        let o = args(&[
            "--to-lsn",
            "0/3000000",
            "--timeline",
            "3",
            "--jobs",
            "5",
            "--owner",
            "70:70",
            "--start",
            "/usr/lib/postgresql/15/bin",
            "--start-options",
            "-p 5433",
            "--tablespace-map",
            "/old=/new",
        ])
        .pg_options()
        .unwrap();
        assert_eq!(
            o.target,
            Target::Lsn(wire::pg::Lsn::parse("0/3000000").unwrap())
        );
        assert_eq!(o.timeline.setting(), "3");
        assert_eq!(o.jobs, 5);
        assert_eq!(o.target_dir, PathBuf::from("/tmp/t"));
        let owner = o.owner.unwrap();
        assert_eq!(
            (owner.uid, owner.gid, owner.name.as_str()),
            (70, 70, "70:70")
        );
        let start = o.start.unwrap();
        assert_eq!(start.server_options.as_deref(), Some("-p 5433"));
        assert_eq!(start.timeout, std::time::Duration::from_secs(600));
        assert_eq!(
            o.tablespace_map,
            vec![("/old".to_owned(), PathBuf::from("/new"))]
        );
        assert_eq!(o.wal_fetch_repo_args[..2], ["--repo", "file:///tmp/repo"]);

        let latest = args(&[]).pg_options().unwrap();
        assert_eq!(latest.target, Target::Latest);
        assert_eq!(latest.timeline, TimelineTarget::Latest);
        assert!(latest.start.is_none() && latest.owner.is_none());

        let err = |extra: &[&str]| format!("{:#}", args(extra).pg_options().unwrap_err());
        assert!(err(&["--timeline", "x"]).contains("expected latest, current or a number"));
        assert!(err(&["--timeline", "0"]).contains("timeline"));
        assert!(err(&["--to-lsn", "zz"]).contains("expected X/Y"));
        assert!(err(&["--to-time", "yesterday"]).contains("yesterday"));
    }

    #[test]
    fn redis_options_refuse_postgres_flags() {
        let o = args(&["--to-time", "@1700000000123"])
            .redis_options()
            .unwrap();
        assert_eq!(o.to_time, Some(1_700_000_000_123));
        assert_eq!(o.format, RestoreFormat::Aof);
        assert!(o.start.is_none());
        let e = args(&["--to-lsn", "0/1"]).redis_options().unwrap_err();
        assert!(e.to_string().contains("PostgreSQL options"), "{e}");
        let e = args(&["--to-time", "soon"]).redis_options().unwrap_err();
        assert!(format!("{e:#}").contains("reading --to-time"), "{e:#}");
    }
}
