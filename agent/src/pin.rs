//! `syncbridge-agent backup pin|unpin --repo URL ID`: keep one PostgreSQL base backup or one
//! Redis generation out of `expire`'s reach (a release, an audit, a backup to investigate).
//!
//! A pin is one small object beside the backup's manifest (`layout::base_backup_pin`,
//! `layout::redis_generation_pin`), written or deleted whole: a kill leaves the backup
//! pinned or not, never half. `list` shows it; the retention plan
//! ([`crate::catalog::retention`]) never expires a pinned backup, and `expire` reads the pin
//! again just before it makes a backup invisible, so a pin set while it runs still holds.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use storage::layout::{self, BackupId, GenerationId, RepoKey};
use storage::{ContentKind, PutMode, RepoKind, Repository};

use crate::cli::RepoArgs;

/// Arguments of `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Pin a base backup (PostgreSQL repository) or a generation (Redis repository): `expire`
    /// never removes it, whatever the policy. The id is the one `list` prints.
    Pin(PinArgs),
    /// Remove a pin: the next `expire` treats the backup like any other.
    Unpin(PinArgs),
}

#[derive(Debug, Args)]
struct PinArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The base backup or generation id.
    id: String,
}

/// What a pin object holds (informational: its presence is the pin).
#[derive(Debug, Serialize, Deserialize)]
struct PinRecord {
    /// When it was pinned (RFC 3339 UTC).
    pinned_at: String,
}

/// Runs `backup pin|unpin`.
pub fn run(args: BackupArgs) -> Result<ExitCode> {
    crate::cli::block_on(async move {
        match args.command {
            BackupCommand::Pin(a) => pin_cmd(a, true).await,
            BackupCommand::Unpin(a) => pin_cmd(a, false).await,
        }
    })
}

async fn pin_cmd(args: PinArgs, pin: bool) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let Some(marker) = repo.read_marker().await? else {
        bail!("{} is not a SyncBridge repository (no marker)", repo.url());
    };
    let (what, manifest, key) = match marker.kind {
        RepoKind::Postgres => {
            let id = BackupId::parse(&args.id)?;
            (
                "base backup",
                layout::base_backup_manifest(&id),
                layout::base_backup_pin(&id),
            )
        }
        RepoKind::Redis => {
            let id = GenerationId::parse(&args.id)?;
            (
                "generation",
                layout::redis_generation_manifest(&id),
                layout::redis_generation_pin(&id),
            )
        }
    };
    let exists = repo
        .exists(&manifest)
        .await
        .with_context(|| format!("reading {manifest}"))?;
    if pin {
        if !exists {
            bail!(
                "{} has no complete {what} {} (no {manifest}); `list` shows the ids",
                repo.url(),
                args.id
            );
        }
        write_pin(&repo, &key, marker.kind).await?;
        println!("pinned {what} {}: expire will keep it", args.id);
    } else {
        let was = repo
            .exists(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        if !was && !exists {
            bail!("{} has no {what} {}", repo.url(), args.id);
        }
        repo.delete(&key)
            .await
            .with_context(|| format!("deleting {key}"))?;
        if was {
            println!("unpinned {what} {}", args.id);
        } else {
            println!("{what} {} was not pinned", args.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the pin object `key` (replacing an older pin of the same backup).
pub async fn write_pin(repo: &Repository, key: &RepoKey, kind: RepoKind) -> Result<()> {
    let record = PinRecord {
        pinned_at: crate::pg::backup_manifest::format_time(chrono::Utc::now()),
    };
    let json = serde_json::to_vec(&record).context("encoding the pin")?;
    let content = match kind {
        RepoKind::Postgres => ContentKind::BaseBackupManifest,
        RepoKind::Redis => ContentKind::RedisManifest,
    };
    repo.put(key, content, Bytes::from(json), PutMode::Overwrite)
        .await
        .with_context(|| format!("writing {key}"))?;
    Ok(())
}
