//! The WAL part of the PostgreSQL catalog: one listing of `postgres/wal/` read
//! into typed values (segments, segments in progress as delta chains or older partials,
//! history files per timeline) and the questions every command asks of it: how far WAL is
//! stored without a hole from a point, where the newest WAL ends, which segments are
//! missing. `postgres stream` (where to resume, what to continue), `restore` planning,
//! `backup` (is its WAL stored) and `list` all read WAL through this one inventory.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use storage::layout::{self, WalObject};
use storage::{RepoKey, Repository};
use wire::pg::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use crate::pg::partial::SegmentPartials;

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
        Ok(Self::load_with_times(repo, size).await?.0)
    }

    /// [`load`](Self::load), and when the newest WAL object was stored (the store's time).
    pub async fn load_with_times(
        repo: &Repository,
        size: WalSegmentSize,
    ) -> Result<(WalInventory, Option<chrono::DateTime<chrono::Utc>>)> {
        let objects = repo
            .list(&layout::wal_prefix())
            .await
            .context("listing archived WAL")?;
        let newest = objects.iter().map(|o| o.last_modified).max();
        Ok((
            Self::from_keys(objects.into_iter().map(|o| o.key), size),
            newest,
        ))
    }

    /// The inventory of a listing of `postgres/wal/` (keys that are not WAL are ignored):
    /// the one place WAL keys are read into segments, partials and history files.
    pub fn from_keys(
        keys: impl IntoIterator<Item = RepoKey>,
        size: WalSegmentSize,
    ) -> WalInventory {
        let mut inv = WalInventory::default();
        for key in keys {
            match layout::parse_wal_key(&key) {
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
                            .add(&object, key);
                    }
                }
                Some(WalObject::History(tli)) => {
                    inv.histories.insert(tli.get());
                }
                None => {}
            }
        }
        for t in inv.timelines.values_mut() {
            for p in t.partials.values_mut() {
                p.sort();
            }
            t.partials.retain(|_, p| !p.is_empty());
        }
        inv
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

    /// Complete segments missing between the oldest and the newest complete segment of `tli`.
    pub fn missing_segments(&self, tli: TimelineId) -> Vec<u64> {
        let Some(t) = self.timelines.get(&tli.get()) else {
            return Vec::new();
        };
        let nums: Vec<u64> = t.segments.iter().copied().collect();
        let mut missing = Vec::new();
        for w in nums.windows(2) {
            missing.extend(w[0] + 1..w[1]);
        }
        missing
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

/// What is stored of segment `seg` in progress (its deltas, older whole partials) when it
/// is the newest WAL of its timeline; `None` when later WAL exists there. `wal-fetch` asks
/// this at the end of recovery, when the segment is not stored complete.
pub async fn segment_in_progress(
    repo: &Repository,
    seg: &layout::WalSegmentName,
) -> Result<Option<SegmentPartials>> {
    let prefix = layout::wal_timeline_prefix(seg.timeline());
    let listed = repo
        .list(&prefix)
        .await
        .with_context(|| format!("listing {prefix} for the segment in progress"))?;
    let mut stored = SegmentPartials::default();
    for meta in listed {
        let Some(object) = layout::parse_wal_key(&meta.key) else {
            continue;
        };
        match object.segment() {
            Some(s) if s > seg => return Ok(None),
            Some(s) if s == seg => stored.add(&object, meta.key),
            _ => {}
        }
    }
    stored.sort();
    Ok(Some(stored))
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
