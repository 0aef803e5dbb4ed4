//! `syncbridge-agent postgres backup`: a base backup through `BASE_BACKUP` on a physical
//! replication connection, straight into the repository.
//!
//! Protocol (PostgreSQL docs, "Streaming Replication Protocol", `BASE_BACKUP`;
//! `src/backend/backup/basebackup.c`, `basebackup_copy.c`):
//! 1. a result set with the start position, then one with the tablespaces (OID, location,
//!    estimated size when `PROGRESS` is on);
//! 2. PostgreSQL 15+: one CopyOut stream of typed messages — `n` (new archive), `d` (data),
//!    `p` (progress), `m` (the manifest follows); PostgreSQL 14: one plain CopyOut per
//!    tablespace in the order of the list, then one for the `backup_manifest`;
//! 3. a result set with the stop position.
//!
//! `WAIT false` / `NOWAIT`: the server does not wait for WAL archiving, because the WAL
//! comes from `postgres stream`; instead the agent waits (bounded) until the repository
//! holds the WAL from the start to the stop LSN, and only then writes `backup.json`, which
//! makes the backup complete.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use storage::layout::{self, BackupId};
use storage::{ContentKind, PutMode, RepoKind, RepoMarker, RepoOptions, Repository};
use wire::pg::basebackup::BackupCopyMessage;
use wire::pg::commands::{BackupPosition, TablespaceRow};
use wire::pg::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use super::backup_chunks::Chunker;
use super::backup_manifest::{
    format_time, BackupEntry, BackupManifest, EntryKind, Tablespace, MANIFEST_VERSION,
};
use super::backup_progress::{human, Progress};
use super::cli::{RepoArgs, SourceArgs};
use super::conn::{ConnectMode, CopyMessage, PgConnection, QueryResult};
use crate::catalog::pg::WalInventory;

/// Largest server `backup_manifest` we buffer (about 200 bytes per file).
const MAX_SERVER_MANIFEST: usize = 1 << 30;

/// Arguments of `postgres backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    repo: RepoArgs,
    /// Backup label shown in pg_stat_progress_basebackup and backup_label.
    #[arg(long)]
    label: Option<String>,
    /// Let the server spread the starting checkpoint over checkpoint_completion_target
    /// instead of checkpointing at once.
    #[arg(long)]
    spread_checkpoint: bool,
    /// Largest data object in MiB: files larger than this are split across objects, so a
    /// restore can write them in parallel.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    chunk_mib: u64,
    /// How long to wait, after the server finished, for the WAL up to the backup's stop
    /// LSN to reach the repository (written by `postgres stream`), counted from the last
    /// time the archived WAL advanced. Without it the backup is not restorable and is left
    /// incomplete.
    /// (`--wal-timeout-secs N` is the same in seconds.)
    #[arg(long, alias = "wal-timeout-secs", default_value = "5m", value_parser = crate::util::duration::parse_duration, value_name = "DURATION")]
    wal_timeout: Duration,
    /// zstd level for the data objects: 1 is fastest, 3 (the repository default) a little
    /// smaller, up to 19 for archives that are written once and kept long.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    compress_level: i32,
}

/// Runs `postgres backup`.
pub async fn run(args: BackupArgs) -> Result<ExitCode> {
    let info = args.source.conninfo()?;
    let opts = RepoOptions {
        compression_level: Some(args.compress_level),
        ..args.repo.options()?
    };
    let repo = args.repo.open_with(opts)?;
    let started = Instant::now();
    let start_time = chrono::Utc::now();

    let mut conn = PgConnection::connect(&info, ConnectMode::Physical, "syncbridge_backup").await?;
    let ident = conn.identify_system().await?;
    let seg_size = conn.wal_segment_size().await?;
    let major = conn.server_major()?;
    let server_version = conn.parameter("server_version").unwrap_or("?").to_string();
    check_marker(&repo, ident.system_id).await?;

    let id = new_backup_id(&repo, start_time).await?;
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("syncbridge {id}"));
    if label.len() > 1000 || label.contains(['\'', '\\', '\0']) {
        bail!("--label must be under 1000 characters without quotes, backslashes or NULs");
    }
    let command = base_backup_command(major, &label, args.spread_checkpoint);
    tracing::info!(backup = %id, server = %conn.endpoint(), "{command}");

    let (results, copying) = conn
        .start_copy_out(&command)
        .await
        .context("starting BASE_BACKUP")?;
    let start = results
        .iter()
        .find_map(|r| r.row(0).and_then(|row| BackupPosition::from_row(&row).ok()))
        .context("BASE_BACKUP sent no start position")?;
    let rows = results
        .iter()
        .find(|r| r.columns.len() == 3)
        .context("BASE_BACKUP sent no tablespace list")?;
    let mut tablespaces = Vec::new();
    let mut estimate = 0u64;
    for i in 0..rows.rows.len() {
        let row = TablespaceRow::from_row(&rows.row(i).context("tablespace row")?)?;
        estimate += row.size_kb.unwrap_or(0) * 1024;
        tablespaces.push(Tablespace {
            archive: match row.oid {
                Some(oid) => format!("{oid}.tar"),
                None => "base.tar".into(),
            },
            oid: row.oid,
            location: row.location,
        });
    }
    if !copying {
        bail!("BASE_BACKUP ended without sending data");
    }
    tracing::info!(
        backup = %id,
        "started at {} on timeline {}; about {} in {} archive(s)",
        start.lsn,
        start.timeline,
        human(estimate),
        tablespaces.len()
    );

    let mut chunker = Chunker::new(repo.clone(), id.clone(), args.chunk_mib << 20);
    let mut progress = Progress::new("backup", Some(estimate));
    let mut manifest = Vec::new();
    let end_results = if major >= 15 {
        receive_typed(
            &mut conn,
            &mut chunker,
            &mut tablespaces,
            &mut manifest,
            &mut progress,
        )
        .await?
    } else {
        receive_untyped(
            &mut conn,
            &mut chunker,
            &tablespaces,
            &mut manifest,
            &mut progress,
        )
        .await?
    };
    progress.finish(chunker.tar_bytes);
    let stop = end_results
        .iter()
        .find_map(|r| r.row(0).and_then(|row| BackupPosition::from_row(&row).ok()))
        .context("BASE_BACKUP sent no stop position")?;
    let stop_time = chrono::Utc::now();
    conn.close().await;
    let data_secs = started.elapsed().as_secs_f64();
    let tar_bytes = chunker.tar_bytes;
    let (entries, chunks) = chunker.finish().await?;
    if manifest.is_empty() {
        bail!("the server sent no backup_manifest");
    }
    check_against_server_manifest(&manifest, &entries, &tablespaces)?;
    let server_manifest = repo
        .put(
            &layout::base_backup_server_manifest(&id),
            ContentKind::BaseBackupManifest,
            Bytes::from(manifest),
            PutMode::CreateNew,
        )
        .await
        .context("storing the server's backup_manifest")?;
    let total_bytes: u64 = entries.iter().map(|e| e.size).sum();
    let stored_bytes: u64 = chunks.iter().map(|c| c.stored_bytes).sum();
    tracing::info!(
        backup = %id,
        "data stored: {} of files in {} object(s), {} stored, {:.1}s ({}/s); stop at {}",
        human(total_bytes),
        chunks.len(),
        human(stored_bytes),
        data_secs,
        human((tar_bytes as f64 / data_secs.max(1e-3)) as u64),
        stop.lsn
    );

    if stop.timeline != start.timeline {
        bail!(
            "the timeline changed during the backup ({} to {}): the backup {id} is left incomplete; take a new one",
            start.timeline,
            stop.timeline
        );
    }
    wait_for_wal(
        &repo,
        start.timeline,
        start.lsn,
        stop.lsn,
        seg_size,
        args.wal_timeout,
        &id,
    )
    .await?;
    let wal_archived_time = chrono::Utc::now();

    let m = BackupManifest {
        version: MANIFEST_VERSION,
        id: id.to_string(),
        label,
        system_identifier: ident.system_id.to_string(),
        server_version,
        server_major: major,
        timeline: start.timeline.get(),
        start_lsn: start.lsn.to_string(),
        stop_lsn: stop.lsn.to_string(),
        stop_timeline: stop.timeline.get(),
        start_time: format_time(start_time),
        stop_time: format_time(stop_time),
        wal_archived_time: format_time(wal_archived_time),
        wal_segment_size: seg_size.bytes(),
        total_bytes,
        stored_bytes,
        tablespaces,
        entries,
        chunks,
        server_manifest_sha256: server_manifest.sha256_hex(),
    };
    m.store(&repo).await?;
    let secs = started.elapsed().as_secs_f64();
    println!("backup:      {id} (complete)");
    println!(
        "server:      {} (system identifier {})",
        m.server_version, m.system_identifier
    );
    println!(
        "wal:         {} .. {} on timeline {} ({} .. {})",
        start.lsn,
        stop.lsn,
        start.timeline,
        SegmentName::from_lsn(start.timeline, start.lsn, seg_size),
        SegmentName::from_lsn(start.timeline, Lsn(stop.lsn.0.saturating_sub(1)), seg_size)
    );
    println!("time:        {} .. {}", m.start_time, m.stop_time);
    println!(
        "size:        {} in {} files, {} objects, {} stored",
        human(total_bytes),
        m.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .count(),
        m.chunks.len(),
        human(stored_bytes)
    );
    println!(
        "duration:    {secs:.1}s ({:.1}s data at {}/s)",
        data_secs,
        human((tar_bytes as f64 / data_secs.max(1e-3)) as u64)
    );
    Ok(ExitCode::SUCCESS)
}

/// The `BASE_BACKUP` command for the server's major version.
pub fn base_backup_command(major: u32, label: &str, spread: bool) -> String {
    if major >= 15 {
        format!(
            "BASE_BACKUP (LABEL '{label}', PROGRESS true, CHECKPOINT '{}', WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')",
            if spread { "spread" } else { "fast" }
        )
    } else {
        format!(
            "BASE_BACKUP LABEL '{label}' PROGRESS {}NOWAIT MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'",
            if spread { "" } else { "FAST " }
        )
    }
}

/// Refuses a repository of another cluster; creates the marker for a new one.
async fn check_marker(repo: &Repository, system_id: u64) -> Result<()> {
    let mut marker = RepoMarker::new(RepoKind::Postgres);
    marker.system_identifier = Some(system_id.to_string());
    let existing = repo
        .init_marker(&marker)
        .await
        .context("reading the repository marker")?;
    let m = existing.marker();
    if m.kind != RepoKind::Postgres {
        bail!(
            "the repository {} holds {:?} backups, not PostgreSQL",
            repo.url(),
            m.kind
        );
    }
    if let Some(sys) = &m.system_identifier {
        if sys != &system_id.to_string() {
            bail!(
                "the repository {} belongs to the cluster with system identifier {sys}, but the source is {system_id}: use another repository",
                repo.url()
            );
        }
    }
    Ok(())
}

/// An id from the start time that sorts by time; a suffix keeps two backups in the same
/// second apart.
async fn new_backup_id(repo: &Repository, t: chrono::DateTime<chrono::Utc>) -> Result<BackupId> {
    let base = t.format("%Y%m%dT%H%M%SZ").to_string();
    for n in 0..100 {
        let text = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let id = BackupId::parse(&text)?;
        let used = !repo
            .list(&layout::base_backup_prefix(&id))
            .await
            .context("listing base backups")?
            .is_empty();
        if !used {
            return Ok(id);
        }
    }
    bail!("could not find a free backup id for {base}")
}

/// PostgreSQL 15+: one CopyOut with typed messages.
async fn receive_typed(
    conn: &mut PgConnection,
    chunker: &mut Chunker,
    tablespaces: &mut Vec<Tablespace>,
    manifest: &mut Vec<u8>,
    progress: &mut Progress,
) -> Result<Vec<QueryResult>> {
    let mut in_manifest = false;
    let mut in_archive = false;
    loop {
        match conn
            .recv_copy()
            .await
            .context("receiving the base backup")?
        {
            CopyMessage::Done => break,
            CopyMessage::Data(payload) => {
                match BackupCopyMessage::parse(payload)? {
                    BackupCopyMessage::NewArchive {
                        name,
                        tablespace_location,
                    } => {
                        if in_archive {
                            chunker.end_archive()?;
                        }
                        let idx = archive_index(tablespaces, &name, &tablespace_location);
                        chunker.begin_archive(idx)?;
                        in_archive = true;
                        tracing::debug!("archive {name} ({tablespace_location})");
                    }
                    BackupCopyMessage::Data(d) => {
                        if in_manifest {
                            if manifest.len() + d.len() > MAX_SERVER_MANIFEST {
                                bail!("the server's backup_manifest exceeds {MAX_SERVER_MANIFEST} bytes");
                            }
                            manifest.extend_from_slice(&d);
                        } else {
                            chunker.feed(&d).await?;
                            progress.update(chunker.tar_bytes);
                        }
                    }
                    BackupCopyMessage::Progress(_) => progress.update(chunker.tar_bytes),
                    BackupCopyMessage::ManifestStart => {
                        if in_archive {
                            chunker.end_archive()?;
                            in_archive = false;
                        }
                        in_manifest = true;
                    }
                }
            }
        }
    }
    if in_archive {
        chunker.end_archive()?;
    }
    let (results, more) = conn.results_until_copy_out().await?;
    if more {
        bail!("unexpected second CopyOut from a PostgreSQL 15+ BASE_BACKUP");
    }
    Ok(results)
}

fn archive_index(tablespaces: &mut Vec<Tablespace>, name: &str, location: &str) -> u32 {
    let pos = tablespaces.iter().position(|t| {
        t.archive == name
            || (location.is_empty() && t.oid.is_none())
            || t.location.as_deref() == Some(location)
    });
    let idx = pos.unwrap_or_else(|| {
        tablespaces.push(Tablespace {
            archive: name.to_string(),
            oid: name.strip_suffix(".tar").and_then(|o| o.parse().ok()),
            location: (!location.is_empty()).then(|| location.to_string()),
        });
        tablespaces.len() - 1
    });
    idx as u32
}

/// PostgreSQL 14: one CopyOut per tablespace (in the list's order), then the manifest.
async fn receive_untyped(
    conn: &mut PgConnection,
    chunker: &mut Chunker,
    tablespaces: &[Tablespace],
    manifest: &mut Vec<u8>,
    progress: &mut Progress,
) -> Result<Vec<QueryResult>> {
    let mut index = 0usize;
    loop {
        let is_archive = index < tablespaces.len();
        if is_archive {
            chunker.begin_archive(index as u32)?;
        } else if index > tablespaces.len() {
            bail!("more CopyOut streams than tablespaces plus the manifest");
        }
        loop {
            match conn
                .recv_copy()
                .await
                .context("receiving the base backup")?
            {
                CopyMessage::Done => break,
                CopyMessage::Data(d) => {
                    if is_archive {
                        chunker.feed(&d).await?;
                        progress.update(chunker.tar_bytes);
                    } else {
                        if manifest.len() + d.len() > MAX_SERVER_MANIFEST {
                            bail!(
                                "the server's backup_manifest exceeds {MAX_SERVER_MANIFEST} bytes"
                            );
                        }
                        manifest.extend_from_slice(&d);
                    }
                }
            }
        }
        if is_archive {
            chunker.end_archive()?;
        }
        index += 1;
        let (results, more) = conn.results_until_copy_out().await?;
        if !more {
            if index <= tablespaces.len() {
                bail!(
                    "BASE_BACKUP ended after {index} of {} archives and the manifest",
                    tablespaces.len()
                );
            }
            return Ok(results);
        }
    }
}

/// The path of an entry as the server's `backup_manifest` names it.
pub fn manifest_path(entry: &BackupEntry, tablespaces: &[Tablespace]) -> String {
    match tablespaces.get(entry.archive as usize).and_then(|t| t.oid) {
        Some(oid) => format!("pg_tblspc/{oid}/{}", entry.path),
        None => entry.path.clone(),
    }
}

/// A file of the server's `backup_manifest`.
#[derive(Debug, Clone)]
pub struct ServerManifestFile {
    /// Path relative to the data directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `Checksum-Algorithm`.
    pub algorithm: String,
    /// `Checksum` (hex).
    pub checksum: String,
}

/// Reads the `Files` of a server `backup_manifest` (JSON,
/// `src/backend/backup/backup_manifest.c`).
pub fn parse_server_manifest(data: &[u8]) -> Result<Vec<ServerManifestFile>> {
    let v: serde_json::Value =
        serde_json::from_slice(data).context("the server's backup_manifest is not JSON")?;
    let files = v
        .get("Files")
        .and_then(|f| f.as_array())
        .context("backup_manifest has no Files array")?;
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let path = match (f.get("Path"), f.get("Encoded-Path")) {
            (Some(p), _) => p.as_str().context("Path is not text")?.to_string(),
            (None, Some(e)) => {
                let raw = hex::decode(e.as_str().context("Encoded-Path is not text")?)
                    .context("Encoded-Path is not hex")?;
                String::from_utf8_lossy(&raw).into_owned()
            }
            _ => bail!("backup_manifest has a file without Path"),
        };
        out.push(ServerManifestFile {
            size: f
                .get("Size")
                .and_then(|s| s.as_u64())
                .with_context(|| format!("backup_manifest: {path} has no Size"))?,
            algorithm: f
                .get("Checksum-Algorithm")
                .and_then(|s| s.as_str())
                .unwrap_or("NONE")
                .to_string(),
            checksum: f
                .get("Checksum")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_ascii_lowercase(),
            path,
        });
    }
    Ok(out)
}

/// Whether a CRC32C matches a manifest checksum (PostgreSQL prints the CRC's bytes in the
/// server's memory order: little-endian on the usual machines).
pub fn crc_matches(crc: u32, hex_text: &str) -> bool {
    hex::encode(crc.to_le_bytes()) == hex_text || hex::encode(crc.to_be_bytes()) == hex_text
}

/// Checks that every file the server listed arrived with its size and checksum.
fn check_against_server_manifest(
    data: &[u8],
    entries: &[BackupEntry],
    tablespaces: &[Tablespace],
) -> Result<()> {
    let files = parse_server_manifest(data)?;
    let ours: std::collections::HashMap<String, &BackupEntry> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| (manifest_path(e, tablespaces), e))
        .collect();
    for f in &files {
        let e = ours.get(&f.path).ok_or_else(|| {
            anyhow!(
                "the server's backup_manifest lists {} but the tar stream did not contain it",
                f.path
            )
        })?;
        if e.size != f.size {
            bail!(
                "{}: received {} bytes, the server's manifest says {}",
                f.path,
                e.size,
                f.size
            );
        }
        if f.algorithm == "CRC32C" && !crc_matches(e.crc32c, &f.checksum) {
            bail!(
                "{}: received CRC32C {:08x}, the server's manifest says {}",
                f.path,
                e.crc32c,
                f.checksum
            );
        }
    }
    Ok(())
}

/// Waits until WAL `[start, stop)` of `tli` is in the repository.
async fn wait_for_wal(
    repo: &Repository,
    tli: TimelineId,
    start: Lsn,
    stop: Lsn,
    size: WalSegmentSize,
    timeout: Duration,
    id: &BackupId,
) -> Result<()> {
    // The clock restarts whenever the archive advances: a stream catching up on a backlog is
    // waited for; one that makes no progress for `timeout` is not.
    let mut began = Instant::now();
    let mut last_end = Lsn::INVALID;
    let mut last_log = Instant::now();
    loop {
        let inv = WalInventory::load(repo, size).await?;
        let path = tli.into();
        let end = inv.contiguous_end(&path, start, size);
        if end >= stop {
            tracing::info!(backup = %id, "WAL {start}..{stop} is in the repository");
            return Ok(());
        }
        if end > last_end {
            last_end = end;
            began = Instant::now();
        }
        if began.elapsed() >= timeout {
            let gap = inv.gap(&path, start, stop, size);
            let what = match gap {
                Some(g) => g.to_string(),
                None => format!("WAL {end}..{stop}"),
            };
            bail!(
                "{what}; the repository's WAL did not advance for {}s. Is `syncbridge-agent postgres stream` running for this cluster and repository? \
                 The data of backup {id} is stored but without its WAL it cannot be restored, so it is left incomplete (no backup.json) and restore will never use it",
                timeout.as_secs()
            );
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            tracing::info!(backup = %id, "waiting for WAL up to {stop} in the repository (archived up to {end})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn commands_per_version() {
        assert_eq!(
            base_backup_command(14, "x", false),
            "BASE_BACKUP LABEL 'x' PROGRESS FAST NOWAIT MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
        assert!(base_backup_command(17, "x", true).contains("CHECKPOINT 'spread', WAIT false"));
    }

    #[test]
    fn crc_hex_orders() {
        let crc = crc32c::crc32c(b"hello");
        assert!(crc_matches(crc, &hex::encode(crc.to_le_bytes())));
        assert!(!crc_matches(crc ^ 1, &hex::encode(crc.to_le_bytes())));
    }
}
