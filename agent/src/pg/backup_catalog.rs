//! What the repository knows about PostgreSQL base backups and archived WAL: the agent's
//! backup manifest (`backup.json`, written last, so its presence means "complete"), and an
//! inventory of the WAL objects the stream wrote, with the continuity questions backup and
//! restore ask of it ("is WAL from the backup's start to its stop LSN archived?", "where is
//! the first gap?").
//!
//! The backup data itself is the server's tar stream with the tar headers lifted into the
//! manifest: each data object (`postgres/base/<id>/data/<seq>`) holds raw file bytes, and the
//! manifest says which bytes belong to which file at which offset. That lets restore write
//! every object independently (in parallel, large files split across objects) and check
//! each file against the server's `backup_manifest` (`src/backend/backup/backup_manifest.c`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use storage::layout::{self, BackupId, BaseBackupObject, WalObject};
use storage::{ContentKind, PutMode, Repository};
use wire::pg::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use super::partial::SegmentPartials;

/// Version of the `backup.json` layout this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// What an entry of the backup is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (tablespace links under `pg_tblspc`).
    Symlink,
}

/// One file, directory or link of the backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    /// Index into [`BackupManifest::tablespaces`]; 0 is the data directory.
    pub archive: u32,
    /// Path relative to the archive's root, as in the tar stream.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (Unix seconds).
    pub mtime: u64,
    /// Bytes (files only).
    #[serde(default)]
    pub size: u64,
    /// CRC32C of the file's bytes as received (files only).
    #[serde(default)]
    pub crc32c: u32,
    /// Link target (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// A run of bytes of one file inside a data object; pieces follow each other in the object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Index into [`BackupManifest::entries`].
    pub entry: u32,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// One data object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataChunk {
    /// Sequence number (its key is `layout::base_backup_chunk(id, seq)`).
    pub seq: u64,
    /// Original bytes in the object.
    pub bytes: u64,
    /// Bytes in the store (after compression).
    pub stored_bytes: u64,
    /// SHA-256 of the object's original bytes, hex.
    pub sha256: String,
    /// What the bytes are, in order.
    pub pieces: Vec<Piece>,
}

/// A tablespace archive of the backup (`base.tar` is always first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// Archive name the server gave (`base.tar`, `16385.tar`).
    pub archive: String,
    /// Tablespace OID; `None` for the data directory.
    pub oid: Option<u32>,
    /// Location on the source server; `None` for the data directory.
    pub location: Option<String>,
}

/// The agent's manifest of a base backup (`backup.json`): written after everything else,
/// so a backup without it is incomplete and never restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The backup id (also its key prefix).
    pub id: String,
    /// The label given to `BASE_BACKUP`.
    pub label: String,
    /// The cluster's system identifier.
    pub system_identifier: String,
    /// `server_version` as reported at connect.
    pub server_version: String,
    /// Major version (14, 15, …).
    pub server_major: u32,
    /// Timeline the backup started on.
    pub timeline: u32,
    /// Start LSN (`X/Y`): WAL replay begins at the checkpoint before it.
    pub start_lsn: String,
    /// Stop LSN: the backup is consistent once replay reaches it.
    pub stop_lsn: String,
    /// Timeline at the stop.
    pub stop_timeline: u32,
    /// When the backup started (agent clock, RFC 3339 UTC).
    pub start_time: String,
    /// When the server reported the stop position (agent clock, RFC 3339 UTC). Every commit
    /// before the stop LSN happened before this.
    pub stop_time: String,
    /// When WAL up to `stop_lsn` was seen in the repository.
    pub wal_archived_time: String,
    /// `wal_segment_size` in bytes.
    pub wal_segment_size: u64,
    /// Sum of the file sizes.
    pub total_bytes: u64,
    /// Sum of the data objects' stored sizes.
    pub stored_bytes: u64,
    /// Archives; index 0 is the data directory.
    pub tablespaces: Vec<Tablespace>,
    /// Every file, directory and link.
    pub entries: Vec<BackupEntry>,
    /// Data objects, in sequence order.
    pub chunks: Vec<DataChunk>,
    /// SHA-256 (hex) of the server's `backup_manifest` object.
    pub server_manifest_sha256: String,
}

impl BackupManifest {
    /// The id, validated.
    pub fn backup_id(&self) -> Result<BackupId> {
        BackupId::parse(&self.id).with_context(|| format!("backup id {:?}", self.id))
    }

    /// Start LSN.
    pub fn start(&self) -> Result<Lsn> {
        Lsn::parse(&self.start_lsn).with_context(|| format!("backup {}: start_lsn", self.id))
    }

    /// Stop LSN.
    pub fn stop(&self) -> Result<Lsn> {
        Lsn::parse(&self.stop_lsn).with_context(|| format!("backup {}: stop_lsn", self.id))
    }

    /// The timeline.
    pub fn tli(&self) -> Result<TimelineId> {
        TimelineId::new(self.timeline).with_context(|| format!("backup {}: timeline", self.id))
    }

    /// The WAL segment size.
    pub fn segment_size(&self) -> Result<WalSegmentSize> {
        WalSegmentSize::new(self.wal_segment_size)
            .with_context(|| format!("backup {}: wal_segment_size", self.id))
    }

    /// Stop time.
    pub fn stop_at(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        parse_time(&self.stop_time).with_context(|| format!("backup {}: stop_time", self.id))
    }

    /// Writes the manifest (create-new: a backup is completed once).
    pub async fn store(&self, repo: &Repository) -> Result<()> {
        let key = layout::base_backup_manifest(&self.backup_id()?);
        let json = serde_json::to_vec(self).context("encoding backup.json")?;
        repo.put(
            &key,
            ContentKind::BaseBackupManifest,
            Bytes::from(json),
            PutMode::CreateNew,
        )
        .await
        .with_context(|| format!("writing {key}"))?;
        Ok(())
    }

    /// Reads and checks one backup's manifest.
    pub async fn load(repo: &Repository, id: &BackupId) -> Result<BackupManifest> {
        let key = layout::base_backup_manifest(id);
        let data = repo
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        let m: BackupManifest =
            serde_json::from_slice(&data).with_context(|| format!("decoding {key}"))?;
        if m.version > MANIFEST_VERSION {
            bail!(
                "{key} has version {} but this agent reads up to {MANIFEST_VERSION}: upgrade the agent",
                m.version
            );
        }
        if m.id != id.as_str() {
            bail!("{key} names backup {:?}, not {id}", m.id);
        }
        m.start()?;
        m.stop()?;
        m.tli()?;
        m.segment_size()?;
        m.stop_at()?;
        let n = m.entries.len();
        for c in &m.chunks {
            if let Some(p) = c.pieces.iter().find(|p| p.entry as usize >= n) {
                bail!("{key}: chunk {} names entry {} of {n}", c.seq, p.entry);
            }
        }
        if let Some(e) = m
            .entries
            .iter()
            .find(|e| e.archive as usize >= m.tablespaces.len())
        {
            bail!("{key}: entry {} names archive {}", e.path, e.archive);
        }
        Ok(m)
    }
}

/// Parses a time (the one syntax of [`crate::util::time`]) into UTC.
pub use crate::util::time::parse_time;

/// Formats a time the way manifests store it (microseconds, UTC).
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Backups found in the repository: complete ones (with a manifest) and ids that have data
/// but no manifest (in progress, failed, or waiting for WAL).
#[derive(Debug, Default)]
pub struct BackupList {
    /// Ids with a `backup.json`, in id (= start time) order.
    pub complete: Vec<BackupId>,
    /// Ids without one.
    pub incomplete: Vec<BackupId>,
}

/// Lists base backups by their keys.
pub async fn list_backups(repo: &Repository) -> Result<BackupList> {
    let objects = repo
        .list(&layout::base_backups_prefix())
        .await
        .context("listing base backups")?;
    let mut all = BTreeSet::new();
    let mut done = BTreeSet::new();
    for o in objects {
        match layout::parse_base_backup_key(&o.key) {
            Some(BaseBackupObject::Manifest(id)) => {
                done.insert(id.clone());
                all.insert(id);
            }
            Some(BaseBackupObject::Chunk { id, .. } | BaseBackupObject::ServerManifest(id)) => {
                all.insert(id);
            }
            None => {}
        }
    }
    Ok(BackupList {
        incomplete: all.difference(&done).cloned().collect(),
        complete: done.into_iter().collect(),
    })
}

/// What the repository holds of one timeline's WAL.
#[derive(Debug, Default, Clone)]
pub struct TimelineWal {
    /// Complete segments by segment number.
    pub segments: BTreeSet<u64>,
    /// Deltas and older whole partials of segments not complete, by segment number.
    pub partials: BTreeMap<u64, SegmentPartials>,
}

/// Every WAL object of the repository, by timeline.
#[derive(Debug, Default, Clone)]
pub struct WalInventory {
    /// Segments and partials per timeline id.
    pub timelines: BTreeMap<u32, TimelineWal>,
    /// Timelines with a history file.
    pub histories: BTreeSet<u32>,
}

/// A missing stretch of WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalGap {
    /// First missing byte.
    pub from: Lsn,
    /// First byte present again (or the end of what was asked for).
    pub to: Lsn,
    /// First missing segment name.
    pub first_segment: String,
    /// Last missing segment name.
    pub last_segment: String,
}

impl std::fmt::Display for WalGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first_segment == self.last_segment {
            write!(
                f,
                "WAL {}..{} (segment {}) is missing from the repository",
                self.from, self.to, self.first_segment
            )
        } else {
            write!(
                f,
                "WAL {}..{} (segments {} to {}) is missing from the repository",
                self.from, self.to, self.first_segment, self.last_segment
            )
        }
    }
}

impl WalInventory {
    /// Lists `postgres/wal/`; segment numbers are computed with the cluster's segment size.
    pub async fn load(repo: &Repository, size: WalSegmentSize) -> Result<WalInventory> {
        let objects = repo
            .list(&layout::wal_prefix())
            .await
            .context("listing archived WAL")?;
        let mut inv = WalInventory::default();
        for o in objects {
            match layout::parse_wal_key(&o.key) {
                Some(WalObject::Segment(s)) => {
                    if let Some(segno) = segno_of(s.as_str(), size) {
                        inv.timelines
                            .entry(s.timeline().get())
                            .or_default()
                            .segments
                            .insert(segno);
                    }
                }
                Some(object @ (WalObject::Partial { .. } | WalObject::Delta { .. })) => {
                    let Some(segment) = object.segment() else {
                        continue;
                    };
                    if let Some(segno) = segno_of(segment.as_str(), size) {
                        inv.timelines
                            .entry(segment.timeline().get())
                            .or_default()
                            .partials
                            .entry(segno)
                            .or_default()
                            .add(&object, o.key);
                    }
                }
                Some(WalObject::History(tli)) => {
                    inv.histories.insert(tli.get());
                }
                None => {}
            }
        }
        Ok(inv)
    }

    fn has(&self, tli: TimelineId, segno: u64) -> bool {
        self.timelines
            .get(&tli.get())
            .is_some_and(|t| t.segments.contains(&segno) || t.partials.contains_key(&segno))
    }

    /// How far WAL along `path` is archived without a hole, starting at `from`: the first
    /// LSN not in the repository. Equal to `from` if even its segment is missing.
    pub fn contiguous_end(&self, path: &WalPath, from: Lsn, size: WalSegmentSize) -> Lsn {
        let mut segno = size.segment_of(from);
        loop {
            let tli = path.timeline_of(segno, size);
            let Some(t) = self.timelines.get(&tli.get()) else {
                return from.max(Lsn(segno * size.bytes()));
            };
            if t.segments.contains(&segno) {
                segno += 1;
                continue;
            }
            let start = segno * size.bytes();
            let end = match t.partials.get(&segno) {
                Some(p) => Lsn(start + u64::from(p.durable_end())),
                None => Lsn(start),
            };
            return end.max(from);
        }
    }

    /// The end of the newest WAL of the path's last timeline in the repository (which may
    /// lie past a gap); of an earlier one if the last has none yet.
    pub fn newest_end(&self, path: &WalPath, size: WalSegmentSize) -> Option<Lsn> {
        path.timelines().rev().find_map(|tli| {
            let t = self.timelines.get(&tli.get())?;
            let full = t.segments.last().map(|s| (s + 1) * size.bytes());
            let part = t
                .partials
                .iter()
                .next_back()
                .map(|(s, p)| s * size.bytes() + u64::from(p.durable_end()));
            full.max(part).map(Lsn)
        })
    }

    /// The first hole in the WAL along `path` between `from` and `to` (exclusive), if any.
    pub fn gap(&self, path: &WalPath, from: Lsn, to: Lsn, size: WalSegmentSize) -> Option<WalGap> {
        let end = self.contiguous_end(path, from, size);
        if end >= to {
            return None;
        }
        let missing_first = size.segment_of(end);
        let last_needed = size.segment_of(Lsn(to.0 - 1));
        // The hole ends where WAL is present again (or at `to`).
        let hole_end_seg = (missing_first + 1..=last_needed)
            .find(|&s| self.has(path.timeline_of(s, size), s))
            .unwrap_or(last_needed + 1);
        let hole_to = Lsn((hole_end_seg * size.bytes()).min(to.0).max(end.0));
        let name = |segno: u64| {
            SegmentName::new(path.timeline_of(segno, size), segno, size)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| format!("segment {segno:X}"))
        };
        Some(WalGap {
            from: end,
            to: hole_to,
            first_segment: name(missing_first),
            last_segment: name(hole_end_seg.saturating_sub(1).max(missing_first)),
        })
    }
}

/// The timelines recovery reads, in order: the backup's timeline, then each descendant from
/// its switch point on, as the target timeline's history file says (PostgreSQL reads a
/// segment from the newest timeline that had begun by that segment; `XLogFileReadAnyTLI`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPath {
    /// (timeline, LSN it begins at), oldest first.
    steps: Vec<(TimelineId, Lsn)>,
}

impl From<TimelineId> for WalPath {
    fn from(tli: TimelineId) -> WalPath {
        WalPath {
            steps: vec![(tli, Lsn(0))],
        }
    }
}

impl WalPath {
    /// The path from `start_tli` (where a backup started, at `start`) to `target`, whose
    /// history file is `history`.
    pub fn from_history(
        target: TimelineId,
        history: &wire::pg::TimelineHistory,
        start_tli: TimelineId,
        start: Lsn,
    ) -> Result<WalPath> {
        if target == start_tli {
            return Ok(start_tli.into());
        }
        let mut steps = Vec::new();
        let mut begin = Lsn(0);
        for e in &history.entries {
            if e.timeline == start_tli && e.switch_lsn < start {
                bail!(
                    "timeline {target} branched off timeline {start_tli} at {}, before the backup started ({start})",
                    e.switch_lsn
                );
            }
            if e.timeline >= start_tli {
                steps.push((e.timeline, begin));
            }
            begin = e.switch_lsn;
        }
        if steps.first().map(|s| s.0) != Some(start_tli) {
            bail!("timeline {target} does not descend from timeline {start_tli} of the backup");
        }
        steps.push((target, begin));
        Ok(WalPath { steps })
    }

    /// The timeline the recovery reads segment `segno` from.
    pub fn timeline_of(&self, segno: u64, size: WalSegmentSize) -> TimelineId {
        self.steps
            .iter()
            .rev()
            .find(|(_, begin)| size.segment_of(*begin) <= segno)
            .or(self.steps.first())
            .map(|(t, _)| *t)
            .unwrap_or(TimelineId::FIRST)
    }

    /// The timelines, oldest first.
    pub fn timelines(&self) -> impl DoubleEndedIterator<Item = TimelineId> + '_ {
        self.steps.iter().map(|(t, _)| *t)
    }

    /// The last timeline.
    pub fn target(&self) -> TimelineId {
        self.steps
            .last()
            .map(|(t, _)| *t)
            .unwrap_or(TimelineId::FIRST)
    }
}

fn segno_of(name: &str, size: WalSegmentSize) -> Option<u64> {
    SegmentName::parse(name, size).ok().map(SegmentName::segno)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn gap_names_the_missing_range() {
        let size = WalSegmentSize::DEFAULT;
        let tli = TimelineId::new(1).unwrap();
        let mut inv = WalInventory::default();
        let t = inv.timelines.entry(1).or_default();
        for s in [1u64, 2, 3, 6, 7] {
            t.segments.insert(s);
        }
        let seg8 = layout::WalSegmentName::parse("000000010000000000000008").unwrap();
        let delta = layout::wal_delta(&seg8, 0, 0x1000);
        t.partials
            .entry(8)
            .or_default()
            .add(&layout::parse_wal_key(&delta).unwrap(), delta);
        let seg = size.bytes();
        let tli = WalPath::from(tli);
        assert_eq!(inv.contiguous_end(&tli, Lsn(seg + 40), size), Lsn(4 * seg));
        let g = inv.gap(&tli, Lsn(seg + 40), Lsn(8 * seg), size).unwrap();
        assert_eq!(g.from, Lsn(4 * seg));
        assert_eq!(g.to, Lsn(6 * seg));
        assert_eq!(g.first_segment, "000000010000000000000004");
        assert_eq!(g.last_segment, "000000010000000000000005");
        assert!(inv
            .gap(&tli, Lsn(6 * seg), Lsn(8 * seg + 0x1000), size)
            .is_none());
        assert_eq!(inv.newest_end(&tli, size), Some(Lsn(8 * seg + 0x1000)));
        assert!(inv
            .gap(&tli, Lsn(6 * seg), Lsn(8 * seg + 0x1001), size)
            .is_some());
    }

    #[test]
    fn path_follows_the_history() {
        let size = WalSegmentSize::DEFAULT;
        let seg = size.bytes();
        let one = TimelineId::new(1).unwrap();
        let two = TimelineId::new(2).unwrap();
        let hist =
            wire::pg::TimelineHistory::parse(b"1\t0/5000100\tno recovery target specified\n")
                .unwrap();
        let path = WalPath::from_history(two, &hist, one, Lsn(2 * seg)).unwrap();
        assert_eq!(path.timeline_of(4, size), one);
        assert_eq!(path.timeline_of(5, size), two);
        let mut inv = WalInventory::default();
        inv.timelines
            .entry(1)
            .or_default()
            .segments
            .extend([2u64, 3, 4, 5]);
        inv.timelines
            .entry(2)
            .or_default()
            .segments
            .extend([5u64, 7]);
        assert_eq!(inv.contiguous_end(&path, Lsn(2 * seg), size), Lsn(6 * seg));
        let g = inv.gap(&path, Lsn(2 * seg), Lsn(8 * seg), size).unwrap();
        assert_eq!(g.first_segment, "000000020000000000000006");
        assert_eq!(inv.newest_end(&path, size), Some(Lsn(8 * seg)));
        assert!(WalPath::from_history(two, &hist, one, Lsn(6 * seg)).is_err());
    }
}
