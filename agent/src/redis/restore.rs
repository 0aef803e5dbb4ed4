//! `redis restore`: rebuild a server's files for a moment in time.
//!
//! Picks the newest generation whose snapshot was taken at or before T, then replays its
//! chunks up to the last time-index point at or before T (never inside MULTI/EXEC). The
//! default output is a Redis 7 multi-part AOF directory (`appendonlydir/`, see the comment
//! at the top of Redis `src/aof.c`): the snapshot byte for byte as the base RDB, the
//! commands as the incremental AOF starting with the `SELECT` in force at its first chunk,
//! and the manifest. `redis-server --appendonly yes --dir DIR` loads it natively. `PING` and
//! `REPLCONF` from the stream are left out.
//!
//! Nothing is written before the generation's chunks are proven to chain exactly from the
//! snapshot's offset, with the checks `redis verify` makes ([`super::verify`]): a gap, an
//! overlap or a chunk object holding another chunk's offsets (two swapped) is refused,
//! naming the chunks. The target is locked (`flock` on the directory, see
//! [`crate::restore::lock`]) for the whole restore; the files are created 0600 and the
//! directories 0700.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use storage::{layout, Repository};
use tokio::io::AsyncWriteExt;
use wire::redis::command::CommandDecoder;
use wire::redis::rdb::{RdbReport, RdbValidator};
use wire::redis::resp::encode_command;

use super::chunk::{self, ChunkHeader};
use super::verify::{chunk_problems, orphan_problems};
use crate::catalog::redis::RedisCatalog;
use crate::restore::lock::{self, DirLock};
use crate::restore::place;

/// Output layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreFormat {
    /// `appendonlydir/` with base RDB, incremental AOF and manifest (Redis 7+, Valkey).
    Aof,
    /// `dump.rdb` only; T must fall at a snapshot (nothing to replay).
    Rdb,
    /// One `appendonly.aof` with an RDB preamble, for servers without multi-part AOF.
    AofSingle,
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The generation used.
    pub generation: String,
    /// Replication offset the data ends at.
    pub offset: u64,
    /// Arrival time (Unix ms) of the last replayed command, or the snapshot time.
    pub time_ms: i64,
    /// Commands written to the AOF (without PING/REPLCONF).
    pub commands: u64,
    /// The snapshot's validation report.
    pub snapshot: RdbReport,
    /// Files written, relative to the target.
    pub files: Vec<PathBuf>,
}

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// Parses `--to-time` into Unix milliseconds, in the one syntax of every `--to-time`
/// ([`crate::util::time`]: RFC 3339, `YYYY-MM-DD HH:MM:SS` in UTC, `@<unix ms>`).
pub fn parse_time(text: &str) -> Result<i64> {
    Ok(crate::util::time::parse_time(text)?.timestamp_millis())
}

/// Validated settings of a Redis restore (`redis restore` and the top-level `restore`).
#[derive(Debug, Clone)]
pub struct RedisRestoreOptions {
    /// Directory to write (created; must be empty if it exists).
    pub target: PathBuf,
    /// The moment to restore, in Unix milliseconds; the latest restorable time when `None`.
    pub to_time: Option<i64>,
    /// Output layout.
    pub format: RestoreFormat,
    /// Start this redis-server/valkey-server on the result.
    pub start: Option<PathBuf>,
}

impl RedisRestoreOptions {
    /// From the command line's values; `to_time` in the one syntax of every `--to-time`.
    pub fn new(
        target: PathBuf,
        to_time: Option<&str>,
        format: RestoreFormat,
        start: Option<PathBuf>,
    ) -> Result<RedisRestoreOptions> {
        let to_time = to_time
            .map(parse_time)
            .transpose()
            .context("reading --to-time")?;
        Ok(RedisRestoreOptions {
            target,
            to_time,
            format,
            start,
        })
    }
}

/// Restores into `target` (created; must be empty if it exists).
pub async fn restore(
    repo: &Repository,
    target: &Path,
    to_time: Option<i64>,
    format: RestoreFormat,
) -> Result<Restored> {
    let target = &place::resolve(target)?;
    place::check_destination(target, repo.local_path(), "the target")?;
    // A restore already writing there fails this one at once (locking creates nothing).
    let early_lock = DirLock::acquire_if_exists(target)?;
    check_target_empty(target).await?;
    let catalog = RedisCatalog::load(repo).await?;
    let Some(oldest) = catalog.generations.first() else {
        bail!("the repository {} holds no Redis generation", repo.url());
    };
    let generation = catalog.for_time(to_time).with_context(|| {
        format!(
            "no generation starts at or before {}: the earliest restorable time is {}, when the oldest stored snapshot was taken (older generations were expired or never taken)",
            fmt_ms(to_time.unwrap_or_default()),
            fmt_ms(oldest.manifest.snapshot_unix_ms)
        )
    })?;
    let manifest = &generation.manifest;
    let id = &generation.id;
    let (chain, orphans) = (&generation.chain, &generation.orphans);
    let mut problems = orphan_problems(manifest, chain, orphans);
    let mut chunks: Vec<(ChunkHeader, Bytes)> = Vec::with_capacity(chain.len());
    let mut last_ms = i64::MIN;
    for (start, end) in chain {
        let key = layout::redis_chunk(id, *start, *end);
        let data = repo
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        let (header, body) = chunk::decode(key.as_str(), data)?;
        problems.extend(chunk_problems(&key, (*start, *end), &header, &body, &mut last_ms).0);
        chunks.push((header, body));
    }
    if !problems.is_empty() {
        bail!(
            "generation {id}: the chunks do not chain exactly from the snapshot's offset {} (`redis verify` reports the same); nothing was written:\n  {}",
            manifest.snapshot_offset,
            problems.join("\n  ")
        );
    }
    let latest_ms = chunks
        .iter()
        .flat_map(|(h, _)| h.time_index.last())
        .map(|(_, ms)| *ms)
        .next_back()
        .unwrap_or(manifest.snapshot_unix_ms);
    let end_offset = chain.last().map_or(manifest.snapshot_offset, |(_, e)| *e);
    // When the next generation's snapshot offset is inside this generation's stream, this
    // stream provably ran until that snapshot was taken: nothing else happened up to then.
    let end_replid = chunks
        .last()
        .map_or(manifest.replid.as_str(), |(h, _)| h.replid.as_str());
    let covered_ms = catalog
        .generations
        .iter()
        .map(|g| &g.manifest)
        .find(|m| m.generation > manifest.generation)
        .filter(|next| next.replid == end_replid && next.snapshot_offset <= end_offset)
        .map_or(latest_ms, |next| latest_ms.max(next.snapshot_unix_ms));
    let (cut, cut_ms) = match to_time {
        None => (end_offset, latest_ms),
        Some(t) if t > covered_ms => {
            // A later generation starts after T: the stream has a gap there (its master
            // could not continue it: a failover to a replica that lacked part of what the
            // agent had read, a restart without persistence). Writes of the old generation
            // after its end may have been lost by the server, so it is not extended.
            if let Some(next) = catalog
                .generations
                .iter()
                .map(|g| &g.manifest)
                .find(|m| m.generation > manifest.generation)
            {
                bail!(
                    "{} falls in a gap of the backup: generation {id} ends at {} and the next, {}, begins at {} (its master could not continue the stream, e.g. after a failover to a replica that lacked part of it); restore to a moment at or before the first or at or after the second",
                    fmt_ms(t),
                    fmt_ms(latest_ms),
                    next.generation,
                    fmt_ms(next.snapshot_unix_ms)
                );
            }
            bail!(
                "{} is past the end of the backup: the latest restorable time is {}",
                fmt_ms(t),
                fmt_ms(latest_ms)
            );
        }
        Some(t) => chunks
            .iter()
            .flat_map(|(h, _)| h.time_index.iter())
            .take_while(|(_, ms)| *ms <= t)
            .last()
            .map_or(
                (manifest.snapshot_offset, manifest.snapshot_unix_ms),
                |(off, ms)| (*off, *ms),
            ),
    };

    // Commands to replay, without the replication-only ones.
    let mut aof = BytesMut::new();
    let mut commands = 0u64;
    if let Some((first, _)) = chunks.first() {
        encode_command(
            &mut aof,
            &[b"SELECT", first.db_at_start.to_string().as_bytes()],
        );
    }
    'chunks: for (header, body) in &chunks {
        let mut offset = header.start;
        let mut buf = BytesMut::from(&body[..]);
        let mut dec = CommandDecoder::new();
        while offset < cut {
            let Some(cmd) = dec
                .decode(&mut buf)
                .with_context(|| format!("chunk {}-{} of {id}", header.start, header.end))?
            else {
                continue 'chunks;
            };
            offset += cmd.wire_len();
            if offset > cut {
                break 'chunks;
            }
            if !cmd.is_replication_only() {
                aof.extend_from_slice(&cmd.raw);
                commands += 1;
            }
        }
        if offset >= cut {
            break;
        }
    }

    if format == RestoreFormat::Rdb && commands > 0 {
        bail!(
            "--format rdb needs a time at a snapshot, but {commands} commands follow generation {id}'s snapshot ({}) up to the chosen time; use --format aof",
            fmt_ms(manifest.snapshot_unix_ms)
        );
    }

    let _lock = match early_lock {
        Some(l) => l,
        None => lock::create_and_lock(target, 0o700)?,
    };
    // Again under the lock: another restore may have finished in between.
    check_target_empty(target).await?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", target.display()))?;
    let snapshot_key = layout::redis_snapshot(id);
    let (rdb_path, incr_path): (PathBuf, Option<PathBuf>) = match format {
        RestoreFormat::Aof => (
            PathBuf::from("appendonlydir/appendonly.aof.1.base.rdb"),
            Some(PathBuf::from("appendonlydir/appendonly.aof.1.incr.aof")),
        ),
        RestoreFormat::Rdb => (PathBuf::from("dump.rdb"), None),
        RestoreFormat::AofSingle => (
            PathBuf::from("appendonly.aof"),
            Some(PathBuf::from("appendonly.aof")),
        ),
    };
    if format == RestoreFormat::Aof {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(target.join("appendonlydir"))
            .context("creating appendonlydir")?;
    }
    let mut file = create_private(&target.join(&rdb_path))
        .await
        .with_context(|| format!("creating {}", target.join(&rdb_path).display()))?;
    let mut reader = repo
        .reader(&snapshot_key)
        .await
        .with_context(|| format!("reading {snapshot_key}"))?;
    let mut validator = RdbValidator::new();
    while let Some(piece) = reader
        .next_chunk()
        .await
        .with_context(|| format!("reading {snapshot_key}"))?
    {
        validator
            .feed(&piece)
            .with_context(|| format!("{snapshot_key} is not a valid RDB"))?;
        file.write_all(&piece)
            .await
            .context("writing the snapshot")?;
    }
    let snapshot = validator
        .finish()
        .with_context(|| format!("{snapshot_key} is not a valid RDB"))?;
    if format == RestoreFormat::AofSingle {
        file.write_all(&aof)
            .await
            .context("writing appendonly.aof")?;
    }
    file.sync_all().await.context("syncing the snapshot file")?;
    drop(file);
    let mut files = vec![rdb_path];
    if format == RestoreFormat::Aof {
        let incr = incr_path.context("incr path")?;
        write_file(&target.join(&incr), &aof).await?;
        let manifest_text =
            "file appendonly.aof.1.base.rdb seq 1 type b\nfile appendonly.aof.1.incr.aof seq 1 type i\n";
        let m = PathBuf::from("appendonlydir/appendonly.aof.manifest");
        write_file(&target.join(&m), manifest_text.as_bytes()).await?;
        files.push(incr);
        files.push(m);
    }
    Ok(Restored {
        generation: manifest.generation.clone(),
        offset: cut,
        time_ms: cut_ms,
        commands,
        snapshot,
        files,
    })
}

/// Creates (or truncates) a file readable by its owner only.
async fn create_private(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await
}

async fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = create_private(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .await
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .await
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Refuses a target that exists and is not empty (an absent one is fine).
/// Refuses a target that holds anything (a restore never mixes with what is there).
pub(super) async fn check_target_empty(target: &Path) -> Result<()> {
    match tokio::fs::read_dir(target).await {
        Ok(mut entries) => {
            if entries.next_entry().await?.is_some() {
                bail!(
                    "the target {} is not empty; restore into a new or empty directory",
                    target.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", target.display())),
    }
}

/// The command that starts a server on the restored files.
pub fn start_hint(server: &str, target: &Path, format: RestoreFormat) -> String {
    match format {
        RestoreFormat::Aof | RestoreFormat::AofSingle => {
            format!("{server} --dir {} --appendonly yes", target.display())
        }
        RestoreFormat::Rdb => format!(
            "{server} --dir {} --dbfilename dump.rdb --appendonly no",
            target.display()
        ),
    }
}

/// For messages.
pub fn describe_time(ms: i64) -> String {
    fmt_ms(ms)
}
