//! The PostgreSQL part of the repository catalog: the base backups ([`backups`]) and the WAL
//! per timeline ([`wal`]), each read with one listing and parsed once into typed values
//! (`BackupId`, `Lsn`, `TimelineId`, `DateTime<Utc>`). `list`, `restore`, `expire`,
//! `verify`, `postgres backup`, `postgres stream` and `postgres wal-fetch` read the
//! repository through these types.

pub mod backups;
pub mod wal;

pub use backups::{Backup, BackupCatalog};

pub use wal::{segment_in_progress, WalInventory, WalPath};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use storage::{layout, RepoKey, Repository};
use wire::pg::{Lsn, TimelineId, WalSegmentSize};

/// Everything a PostgreSQL repository holds: its backups and its WAL.
#[derive(Debug, Clone)]
pub struct PgCatalog {
    /// Complete and incomplete base backups.
    pub backups: BackupCatalog,
    /// WAL per timeline.
    pub wal: WalInventory,
    /// The segment size WAL was counted with (the backups' own, or the default 16 MiB
    /// when there is no backup yet).
    pub segment_size: WalSegmentSize,
    /// When the newest WAL object was stored (the store's clock).
    pub newest_wal_write: Option<DateTime<Utc>>,
    /// Versions of WAL files the stream received that differ from the stored ones, kept
    /// under `postgres/conflicts/` for an operator to compare (never restored from).
    pub conflicts: Vec<RepoKey>,
}

/// The span of time and WAL a repository can restore to on one timeline: from the end of
/// its oldest backup to the end of WAL stored without a hole after the newest one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorableRange {
    /// The oldest backup's stop time: no earlier moment is restorable.
    pub first_time: DateTime<Utc>,
    /// The oldest backup's stop LSN.
    pub first_lsn: Lsn,
    /// Where stored WAL ends, without a hole, after the newest backup's start.
    pub last_lsn: Lsn,
    /// When that WAL was stored (the newest WAL object's store time); `None` with no WAL.
    pub last_time: Option<DateTime<Utc>>,
    /// The newest backup's timeline.
    pub timeline: TimelineId,
}

/// A stretch a restore reaches without a hole, on one timeline: from the end of a backup
/// (when it is consistent) to where the WAL stored without a hole after its start stops.
/// The stretches of backups that overlap are one; a hole in the WAL ends one, and the next
/// backup that ends after the hole begins the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorableSpan {
    /// The backups' timeline (WAL of later timelines, reached through history files, is
    /// not followed here: `restore --timeline` plans that).
    pub timeline: TimelineId,
    /// The end of the span's oldest backup.
    pub from_lsn: Lsn,
    /// When that backup ended: the span's earliest moment.
    pub from_time: DateTime<Utc>,
    /// The first LSN not restorable after it.
    pub to_lsn: Lsn,
}

/// The spans `backups` restore along their own timelines with `wal` (see
/// [`RestorableSpan`]), by timeline and LSN; a backup whose own WAL is incomplete adds none.
pub fn restorable_spans(
    backups: &[Backup],
    wal: &WalInventory,
    size: WalSegmentSize,
) -> Vec<RestorableSpan> {
    let mut sorted: Vec<&Backup> = backups.iter().collect();
    sorted.sort_by_key(|b| (b.timeline, b.stop));
    let mut spans: Vec<RestorableSpan> = Vec::new();
    for b in sorted {
        let end = wal.contiguous_end(&b.timeline.into(), b.start, size);
        if end < b.stop {
            continue;
        }
        match spans.last_mut() {
            Some(last) if last.timeline == b.timeline && b.stop <= last.to_lsn => {
                last.to_lsn = last.to_lsn.max(end);
            }
            _ => spans.push(RestorableSpan {
                timeline: b.timeline,
                from_lsn: b.stop,
                from_time: b.stop_time,
                to_lsn: end,
            }),
        }
    }
    spans
}

impl PgCatalog {
    /// What the repository restores without a hole ([`restorable_spans`]).
    pub fn restorable_spans(&self) -> Vec<RestorableSpan> {
        restorable_spans(&self.backups.complete, &self.wal, self.segment_size)
    }

    /// Lists the backups, reads their manifests, then lists the WAL.
    pub async fn load(repo: &Repository) -> Result<PgCatalog> {
        let backups = BackupCatalog::load(repo).await?;
        let segment_size = backups.segment_size();
        let (wal, newest_wal_write) = WalInventory::load_with_times(repo, segment_size).await?;
        let conflicts = repo
            .list(&layout::wal_conflicts_prefix())
            .await
            .context("listing WAL conflicts")?
            .into_iter()
            .map(|o| o.key)
            .collect();
        Ok(PgCatalog {
            backups,
            wal,
            segment_size,
            newest_wal_write,
            conflicts,
        })
    }

    /// What the repository can restore to, if it holds a complete backup.
    pub fn restorable(&self) -> Option<RestorableRange> {
        let oldest = self.backups.complete.iter().min_by_key(|b| b.stop)?;
        let newest = self.backups.complete.iter().max_by_key(|b| b.stop)?;
        let end = self
            .wal
            .contiguous_end(&newest.timeline.into(), newest.start, self.segment_size);
        Some(RestorableRange {
            first_time: oldest.stop_time,
            first_lsn: oldest.stop,
            last_lsn: end,
            last_time: self.newest_wal_write,
            timeline: newest.timeline,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use storage::layout::WalSegmentName;

    #[test]
    fn a_hole_in_the_wal_splits_the_restorable_spans() {
        let size = WalSegmentSize::DEFAULT;
        let seg = size.bytes();
        let one = TimelineId::new(1).unwrap();
        // Backups starting in segments 2, 3 and 7; WAL 2..=5 and 7..=8 stored (6 missing).
        let backups = vec![
            backups::test_backup(
                "20261201T000000Z",
                1,
                Lsn(2 * seg + 0x28),
                Lsn(2 * seg + 0x100),
            ),
            backups::test_backup(
                "20261201T010000Z",
                1,
                Lsn(3 * seg + 0x28),
                Lsn(3 * seg + 0x100),
            ),
            backups::test_backup(
                "20261201T020000Z",
                1,
                Lsn(7 * seg + 0x28),
                Lsn(7 * seg + 0x100),
            ),
            // Its own WAL is not stored: no span.
            backups::test_backup(
                "20261201T030000Z",
                1,
                Lsn(10 * seg + 0x28),
                Lsn(10 * seg + 0x100),
            ),
        ];
        let keys = [2u64, 3, 4, 5, 7, 8].map(|n| {
            let name = wire::pg::SegmentName::new(one, n, size)
                .unwrap()
                .to_string();
            layout::wal_segment(&WalSegmentName::parse(&name).unwrap())
        });
        let wal = WalInventory::from_keys(keys, size);
        let spans = restorable_spans(&backups, &wal, size);
        assert_eq!(
            spans,
            [
                RestorableSpan {
                    timeline: one,
                    from_lsn: Lsn(2 * seg + 0x100),
                    from_time: backups[0].stop_time,
                    to_lsn: Lsn(6 * seg),
                },
                RestorableSpan {
                    timeline: one,
                    from_lsn: Lsn(7 * seg + 0x100),
                    from_time: backups[2].stop_time,
                    to_lsn: Lsn(9 * seg),
                },
            ]
        );
    }
}
