//! Capturing one snapshot generation: read the RDB payload after `+FULLRESYNC`, validate it
//! while it streams into the repository, and publish `generation.json` only when both the
//! upload and the validation succeeded. A bad snapshot leaves nothing behind.

use std::time::Instant;

use anyhow::{anyhow, Result};
use storage::{layout, ContentKind, ObjectInfo, PutMode, RepoKind, RepoMarker, Repository};
use wire::redis::rdb::{RdbReport, RdbValidator};
use wire::redis::transfer::{Framing, RdbTransferDecoder, TransferEvent};
use wire::redis::ReplicationOffset;

use super::link::MasterLink;
use super::manifest::{GenerationManifest, SnapshotFacts, MANIFEST_FORMAT};
use crate::job::{JobContext, JobError};

/// What a captured generation holds.
#[derive(Debug)]
pub struct CapturedSnapshot {
    /// The stored manifest.
    pub manifest: GenerationManifest,
    /// The validator's findings.
    pub report: RdbReport,
    /// The stored object.
    pub object: ObjectInfo,
    /// Wall time of the transfer.
    pub elapsed: std::time::Duration,
}

/// Makes sure the repository is (or becomes) a Redis repository.
/// A repository that is gone is fatal for a stream ([`JobError`]).
pub async fn ensure_redis_repo(repo: &Repository, replid: &str) -> Result<(), JobError> {
    let mut marker = RepoMarker::new(RepoKind::Redis);
    marker.replication_id = Some(replid.to_owned());
    let init = repo
        .init_marker(&marker)
        .await
        .with_job_context(|| format!("initialising the repository {}", repo.url()))?;
    if init.marker().kind != RepoKind::Redis {
        return Err(anyhow!(
            "the repository {} backs up {:?}, not Redis/Valkey; use another --repo",
            repo.url(),
            init.marker().kind
        )
        .into());
    }
    Ok(())
}

/// A generation id that sorts by time: `20261127T161800123Z-<replid prefix>-<offset>`.
pub fn generation_id(
    now: chrono::DateTime<chrono::Utc>,
    replid: &str,
    offset: ReplicationOffset,
) -> Result<layout::GenerationId> {
    let text = format!(
        "{}-{}-{}",
        now.format("%Y%m%dT%H%M%S%3fZ"),
        &replid[..replid.len().min(12)],
        offset
    );
    Ok(layout::GenerationId::parse(&text)?)
}

/// Reads the snapshot that follows `+FULLRESYNC <replid> <offset>` into the repository.
/// Failures keep the class the link or the store gave them ([`JobError`]).
///
/// `replied_at` is when `+FULLRESYNC` arrived, taken before anything else (a lease wait, a
/// marker check): the master forks at `offset` just before it replies, and a restore to a
/// time before the snapshot's time uses the previous generation, whose stream ends at
/// `offset`. A time taken later would leave writes made after the fork, but before that
/// time, in neither generation (a restore to such a moment missed them).
pub async fn capture(
    repo: &Repository,
    link: &mut MasterLink,
    replid: &str,
    offset: ReplicationOffset,
    replied_at: chrono::DateTime<chrono::Utc>,
) -> Result<CapturedSnapshot, JobError> {
    let started = Instant::now();
    let snapshot_time = replied_at;
    let id = generation_id(snapshot_time, replid, offset)?;
    let key = layout::redis_snapshot(&id);
    let mut decoder = RdbTransferDecoder::new();
    let mut validator = RdbValidator::new();
    let mut writer = repo
        .writer(&key, ContentKind::RedisSnapshot, PutMode::CreateNew)
        .await
        .with_job_context(|| format!("starting {key}"))?;
    let mut framing = None;
    let mut next_progress = 256u64 << 20;
    let result: Result<(), JobError> = async {
        loop {
            match link.next_transfer_event(&mut decoder).await? {
                TransferEvent::Started(f) => {
                    tracing::info!(generation = %id, framing = ?f, "snapshot transfer started");
                    framing = Some(f);
                }
                TransferEvent::Payload(bytes) => {
                    validator.feed(&bytes).map_err(|e| {
                        anyhow!(
                            "the snapshot from {} is not a valid RDB: {e}",
                            link.endpoint()
                        )
                    })?;
                    writer
                        .write(bytes)
                        .await
                        .with_job_context(|| format!("writing {key}"))?;
                    if validator.bytes_seen() >= next_progress {
                        tracing::info!(
                            bytes = validator.bytes_seen(),
                            mib_per_s = validator.bytes_seen() as f64
                                / 1048576.0
                                / started.elapsed().as_secs_f64(),
                            "snapshot transfer progress"
                        );
                        next_progress += 256 << 20;
                    }
                }
                TransferEvent::Finished => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = writer.abort().await;
        return Err(e.context(format!("capturing generation {id}; nothing was kept")));
    }
    let report = match validator.finish() {
        Ok(r) => r,
        Err(e) => {
            let _ = writer.abort().await;
            return Err(anyhow!(
                "the snapshot from {} is not a valid RDB: {e}; generation {id} was not kept",
                link.endpoint()
            )
            .into());
        }
    };
    let object = writer
        .finish()
        .await
        .with_job_context(|| format!("finishing {key}"))?;
    let server_version = report
        .aux
        .get("valkey-ver")
        .or_else(|| report.aux.get("redis-ver"))
        .cloned();
    let manifest = GenerationManifest {
        format: MANIFEST_FORMAT,
        generation: id.to_string(),
        source: link.endpoint().to_owned(),
        replid: replid.to_owned(),
        snapshot_offset: offset.get(),
        snapshot_unix_ms: snapshot_time.timestamp_millis(),
        stored_unix_ms: chrono::Utc::now().timestamp_millis(),
        db_at_snapshot: report
            .aux
            .get("repl-stream-db")
            .and_then(|d| d.parse().ok())
            .unwrap_or(0),
        snapshot: SnapshotFacts {
            key: key.to_string(),
            size: object.original_len,
            sha256: object.sha256_hex(),
            rdb_format: report.format.to_string(),
            keys_per_db: report.keys_per_db.clone(),
            keys_per_kind: report
                .keys_per_kind
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            server_version,
            diskless: framing == Some(Framing::Diskless),
        },
    };
    manifest.store(repo).await?;
    Ok(CapturedSnapshot {
        manifest,
        report,
        object,
        elapsed: started.elapsed(),
    })
}
