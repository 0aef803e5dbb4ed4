//! Retention: which backups (PostgreSQL base backups, Redis generations) a policy keeps,
//! as a pure function of what the catalog lists, the policy and "now", so it can be tested
//! without a repository. `expire` executes the plan.
//!
//! The promise (property-tested below): every moment that is restorable before expire and
//! lies within the policy stays restorable after it. A backup restores every moment from
//! its end on (with the WAL or command stream after it), so keeping a backup keeps the
//! moments from its end up to the next kept one; the policy's window therefore needs the
//! newest backup that ended *before* the window starts (pgBackRest's and WAL-G's
//! `retain`/`--retain-after` keep it too). The newest backup is always kept; pinned
//! backups are never expired.
//!
//! For PostgreSQL the WAL goes with the backups ([`wal_to_expire`], property-tested too):
//! everything before the oldest kept backup's start segment, on every timeline; from there
//! on, every segment, delta and history file stays, so each kept backup restores every
//! moment it did before.

use anyhow::Result;
use chrono::{DateTime, Utc};
use storage::layout::{self, RepoKey};
use wire::pg::{Lsn, SegmentName, TimelineId, WalSegmentSize};

use super::pg::WalInventory;

/// What to keep. At least one of the two must be set (`expire` refuses an empty policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the newest N backups.
    pub keep_full: Option<usize>,
    /// Keep every moment of this window before now restorable.
    pub keep_within: Option<std::time::Duration>,
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id (ids sort by start time).
    pub id: String,
    /// The earliest moment it restores to (a base backup's stop time, a snapshot's time).
    pub restorable_from: DateTime<Utc>,
    /// Pinned by an operator: never expired.
    pub pinned: bool,
}

/// The plan: indexes into the candidates, by id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Ids kept, oldest first.
    pub keep: Vec<String>,
    /// Ids expired, oldest first.
    pub expire: Vec<String>,
    /// Why each kept one is kept (same order as `keep`).
    pub reasons: Vec<&'static str>,
}

impl Policy {
    /// True when nothing would be kept by choice (only the newest): refused by `expire`.
    pub fn is_empty(&self) -> bool {
        self.keep_full.is_none() && self.keep_within.is_none()
    }
}

/// Decides what `policy` keeps of `candidates` at `now`.
pub fn plan(candidates: &[Candidate], policy: &Policy, now: DateTime<Utc>) -> Plan {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| (a.restorable_from, &a.id).cmp(&(b.restorable_from, &b.id)));
    let n = sorted.len();
    let mut reason: Vec<Option<&'static str>> = vec![None; n];
    let mark = |i: usize, why: &'static str, reason: &mut Vec<Option<&'static str>>| {
        if reason[i].is_none() {
            reason[i] = Some(why);
        }
    };
    if n > 0 {
        mark(n - 1, "newest", &mut reason);
    }
    for (i, c) in sorted.iter().enumerate() {
        if c.pinned {
            mark(i, "pinned", &mut reason);
        }
    }
    if let Some(k) = policy.keep_full {
        for i in n.saturating_sub(k)..n {
            mark(i, "--keep-full", &mut reason);
        }
    }
    if let Some(w) = policy.keep_within {
        let start = chrono::Duration::from_std(w)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut newest_before: Option<usize> = None;
        for (i, c) in sorted.iter().enumerate() {
            if c.restorable_from >= start {
                mark(i, "--keep-within", &mut reason);
            } else {
                newest_before = Some(i);
            }
        }
        if let Some(i) = newest_before {
            mark(i, "restores the start of --keep-within", &mut reason);
        }
    }
    let mut out = Plan {
        keep: Vec::new(),
        expire: Vec::new(),
        reasons: Vec::new(),
    };
    for (c, r) in sorted.iter().zip(reason) {
        match r {
            Some(why) => {
                out.keep.push(c.id.clone());
                out.reasons.push(why);
            }
            None => out.expire.push(c.id.clone()),
        }
    }
    out
}

/// Retention of a Redis Cluster capture: the oldest moment (Unix ms) `policy` keeps
/// restorable on every shard, from each shard's generations' snapshot times (ascending).
/// `keep_full = N`: the moment from which every shard restores with its newest N
/// generations (the latest of their N-th newest snapshots); `keep_within`: the window's
/// start; both: the older. Each shard then keeps its newest generation at or before that
/// moment and every one after ([`cluster_keep_from`]), so the shards' generations stay
/// together: a shard whose snapshots came a little earlier than the others' keeps one
/// more. `None` when no shard has a generation.
pub fn cluster_oldest_kept(
    shards: &[Vec<i64>],
    policy: &Policy,
    now: DateTime<Utc>,
) -> Option<i64> {
    let with: Vec<&Vec<i64>> = shards.iter().filter(|s| !s.is_empty()).collect();
    if with.is_empty() {
        return None;
    }
    let full = policy.keep_full.map(|n| {
        with.iter()
            .map(|s| s[s.len().saturating_sub(n.max(1))])
            .max()
            .unwrap_or(i64::MIN)
    });
    let within = policy.keep_within.map(|w| {
        chrono::Duration::from_std(w)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .map_or(i64::MIN, |t| t.timestamp_millis())
    });
    match (full, within) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (Some(a), None) | (None, Some(a)) => Some(a),
        // No policy: only the newest moment (every shard's newest generation).
        (None, None) => with.iter().filter_map(|s| s.last().copied()).max(),
    }
}

/// The index of the oldest generation a shard keeps when the cluster keeps every moment
/// from `oldest_kept` on: its newest snapshot at or before that moment (it restores the
/// moment), else its first.
pub fn cluster_keep_from(snapshots: &[i64], oldest_kept: i64) -> usize {
    snapshots
        .iter()
        .rposition(|&t| t <= oldest_kept)
        .unwrap_or(0)
}

/// The WAL `expire` removes when the backups that remain start at `kept_starts`: the
/// segment number everything before is removed (the oldest kept backup's start segment),
/// and the keys of every complete segment, delta and older partial of a segment before it,
/// on every timeline, in the order to delete them. History files always stay (a later timeline's recovery
/// reads the whole chain, and they are tiny). Without a kept backup nothing goes.
pub fn wal_to_expire(
    wal: &WalInventory,
    kept_starts: impl IntoIterator<Item = Lsn>,
    size: WalSegmentSize,
) -> Result<(Option<u64>, Vec<RepoKey>)> {
    let Some(cut) = kept_starts.into_iter().map(|l| size.segment_of(l)).min() else {
        return Ok((None, Vec::new()));
    };
    let mut keys = Vec::new();
    for (tli, t) in &wal.timelines {
        let tli = TimelineId::new(*tli)?;
        let segnos: std::collections::BTreeSet<u64> = t
            .segments
            .range(..cut)
            .chain(t.partials.range(..cut).map(|(s, _)| s))
            .copied()
            .collect();
        // Oldest first, so a kill midway leaves WAL without a hole after what is gone.
        for segno in segnos {
            if t.segments.contains(&segno) {
                let name = SegmentName::new(tli, segno, size)?;
                keys.push(layout::wal_segment(&layout::WalSegmentName::parse(
                    &name.to_string(),
                )?));
            }
            if let Some(parts) = t.partials.get(&segno) {
                // Newest delta first: a kill midway leaves a chain that still links from 0.
                keys.extend(parts.deltas.iter().rev().map(|d| d.key.clone()));
                keys.extend(parts.whole.iter().map(|(_, k)| k.clone()));
            }
        }
    }
    Ok((Some(cut), keys))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::catalog::pg::WalPath;
    use proptest::prelude::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn c(id: &str, s: i64) -> Candidate {
        Candidate {
            id: id.into(),
            restorable_from: at(s),
            pinned: false,
        }
    }

    #[test]
    fn a_cluster_keeps_its_shards_generations_together() {
        let now = at(10_000);
        let ms = |s: i64| at(s).timestamp_millis();
        // Three shards snapshotting every 1000 s, a little apart.
        let shards = vec![
            vec![ms(1000), ms(2000), ms(3000)],
            vec![ms(1001), ms(2001), ms(3001)],
            vec![ms(1002), ms(2002), ms(3002)],
        ];
        let full = |n| Policy {
            keep_full: Some(n),
            keep_within: None,
        };
        // The newest one each: every shard restores from 3002 on.
        let t = cluster_oldest_kept(&shards, &full(1), now).unwrap();
        assert_eq!(t, ms(3002));
        let from: Vec<usize> = shards.iter().map(|s| cluster_keep_from(s, t)).collect();
        assert_eq!(from, [2, 2, 2]);
        let t = cluster_oldest_kept(&shards, &full(2), now).unwrap();
        assert_eq!(t, ms(2002));
        // A shard that snapshotted later than the others keeps one more.
        let skewed = vec![vec![ms(1000), ms(2000)], vec![ms(1500), ms(2500)]];
        let t = cluster_oldest_kept(&skewed, &full(1), now).unwrap();
        assert_eq!(t, ms(2500));
        assert_eq!(cluster_keep_from(&skewed[0], t), 1);
        assert_eq!(cluster_keep_from(&skewed[1], t), 1);
        let within = Policy {
            keep_full: None,
            keep_within: Some(std::time::Duration::from_secs(10_000 - 2200)),
        };
        let t = cluster_oldest_kept(&skewed, &within, now).unwrap();
        assert_eq!(t, ms(2200));
        assert_eq!(cluster_keep_from(&skewed[0], t), 1);
        assert_eq!(cluster_keep_from(&skewed[1], t), 0);
        // Both: the older moment wins.
        let both = Policy {
            keep_full: Some(1),
            keep_within: within.keep_within,
        };
        assert_eq!(cluster_oldest_kept(&skewed, &both, now), Some(ms(2200)));
        assert_eq!(cluster_oldest_kept(&[vec![]], &both, now), None);
    }

    #[test]
    fn keep_full_keeps_the_newest_n_and_pins() {
        let mut cs = vec![c("a", 0), c("b", 10), c("c", 20), c("d", 30)];
        cs[0].pinned = true;
        let p = plan(
            &cs,
            &Policy {
                keep_full: Some(2),
                keep_within: None,
            },
            at(100),
        );
        assert_eq!(p.keep, ["a", "c", "d"]);
        assert_eq!(p.expire, ["b"]);
        assert_eq!(p.reasons[0], "pinned");
    }

    #[test]
    fn keep_within_keeps_the_backup_that_restores_the_window_start() {
        let cs = vec![c("a", 0), c("b", 10), c("c", 20), c("d", 30)];
        let p = plan(
            &cs,
            &Policy {
                keep_full: None,
                keep_within: Some(std::time::Duration::from_secs(15)),
            },
            at(40),
        );
        // The window starts at 25: "c" (ended at 20) restores 25; "d" is inside.
        assert_eq!(p.keep, ["c", "d"]);
        assert_eq!(p.expire, ["a", "b"]);
        // With nothing at all, nothing happens.
        assert!(plan(&[], &Policy::default(), at(0)).keep.is_empty());
    }

    proptest! {
        /// Every moment the repository could restore before, inside the policy's window or
        /// from the newest `keep_full` backups on, is still covered by a kept backup: the
        /// newest kept backup that ended at or before that moment is the same one that
        /// covered it before, or a newer one.
        #[test]
        fn every_moment_within_the_policy_stays_restorable(
            times in proptest::collection::vec(0i64..1000, 0..12),
            pins in proptest::collection::vec(any::<bool>(), 12),
            keep_full in proptest::option::of(1usize..5),
            window in proptest::option::of(0u64..1000),
            now in 0i64..1200,
            probe in 0i64..1200,
        ) {
            let cs: Vec<Candidate> = times
                .iter()
                .enumerate()
                .map(|(i, t)| Candidate { id: format!("b{i:02}"), restorable_from: at(*t), pinned: pins[i] })
                .collect();
            let policy = Policy { keep_full, keep_within: window.map(std::time::Duration::from_secs) };
            let p = plan(&cs, &policy, at(now));
            // Partition.
            prop_assert_eq!(p.keep.len() + p.expire.len(), cs.len());
            // The newest and every pinned one stay.
            if let Some(newest) = cs.iter().max_by(|a, b| (a.restorable_from, &a.id).cmp(&(b.restorable_from, &b.id))) {
                prop_assert!(p.keep.contains(&newest.id));
            }
            for x in cs.iter().filter(|x| x.pinned) {
                prop_assert!(p.keep.contains(&x.id));
            }
            // A moment `probe` restorable before (some backup ended at or before it) and
            // within the policy stays restorable.
            let restorable = |ids: &[&Candidate]| ids.iter().any(|x| x.restorable_from <= at(probe));
            let all: Vec<&Candidate> = cs.iter().collect();
            let kept: Vec<&Candidate> = cs.iter().filter(|x| p.keep.contains(&x.id)).collect();
            let in_window = window.is_some_and(|w| at(probe) >= at(now) - chrono::Duration::seconds(w as i64));
            let mut sorted: Vec<&Candidate> = all.clone();
            sorted.sort_by(|a, b| (a.restorable_from, &a.id).cmp(&(b.restorable_from, &b.id)));
            let in_keep_full = keep_full.is_some_and(|k| {
                sorted.len() >= k && !sorted.is_empty() && at(probe) >= sorted[sorted.len().saturating_sub(k)].restorable_from
            });
            if restorable(&all) && (in_window || in_keep_full) && probe <= now {
                prop_assert!(restorable(&kept), "{probe} lost: {:?}", p);
            }
        }
    }

    fn wal_key(tli: u32, segno: u64) -> layout::WalSegmentName {
        let name = SegmentName::new(
            TimelineId::new(tli).unwrap(),
            segno,
            WalSegmentSize::DEFAULT,
        )
        .unwrap();
        layout::WalSegmentName::parse(&name.to_string()).unwrap()
    }

    fn segno_of_key(k: &RepoKey) -> Option<u64> {
        let object = layout::parse_wal_key(k)?;
        let seg = object.segment()?;
        Some(
            SegmentName::parse(seg.as_str(), WalSegmentSize::DEFAULT)
                .unwrap()
                .segno(),
        )
    }

    #[test]
    fn wal_before_the_oldest_kept_start_goes_oldest_first_and_histories_stay() {
        let size = WalSegmentSize::DEFAULT;
        let seg = size.bytes();
        let mut keys = vec![
            layout::wal_segment(&wal_key(1, 1)),
            layout::wal_segment(&wal_key(1, 2)),
            layout::wal_segment(&wal_key(1, 3)),
            layout::wal_delta(&wal_key(1, 4), 0, 0x1000),
            layout::wal_delta(&wal_key(1, 4), 0x1000, 0x2000),
            layout::timeline_history(layout::TimelineId::new(2).unwrap()),
            layout::wal_segment(&wal_key(2, 4)),
        ];
        keys.sort();
        let inv = WalInventory::from_keys(keys, size);
        let (cut, gone) = wal_to_expire(&inv, [Lsn(4 * seg + 0x28), Lsn(9 * seg)], size).unwrap();
        assert_eq!(cut, Some(4));
        assert_eq!(
            gone,
            [
                layout::wal_segment(&wal_key(1, 1)),
                layout::wal_segment(&wal_key(1, 2)),
                layout::wal_segment(&wal_key(1, 3)),
            ]
        );
        let (_, gone) = wal_to_expire(&inv, [Lsn(5 * seg)], size).unwrap();
        assert_eq!(gone[3], layout::wal_delta(&wal_key(1, 4), 0x1000, 0x2000));
        assert_eq!(gone[4], layout::wal_delta(&wal_key(1, 4), 0, 0x1000));
        assert_eq!(gone[5], layout::wal_segment(&wal_key(2, 4)));
        assert_eq!(gone.len(), 6);
        assert!(wal_to_expire(&inv, [], size).unwrap().1.is_empty());
    }

    proptest! {
        /// Whatever the repository's WAL, after removing what [`wal_to_expire`] names every
        /// kept backup reaches exactly as far as before, on its own timeline and along a
        /// history to the next; nothing from the oldest kept start's segment on is touched,
        /// everything before it (but history files) is gone.
        #[test]
        fn expired_wal_keeps_every_kept_backup_restoring_as_far_as_before(
            objects in proptest::collection::vec((1u32..=3, 0u64..40, 0u8..4), 0..120),
            histories in proptest::collection::vec(2u32..=3, 0..3),
            starts in proptest::collection::vec((1u32..=3, 0u64..40, 0u64..(16 << 20)), 0..4),
            switch in 0u64..48,
        ) {
            let size = WalSegmentSize::DEFAULT;
            let mut keys = std::collections::BTreeSet::new();
            for (tli, segno, kind) in &objects {
                let name = wal_key(*tli, *segno);
                if *kind < 3 {
                    keys.insert(layout::wal_segment(&name));
                } else {
                    keys.insert(layout::wal_delta(&name, 0, 0x1000));
                    keys.insert(layout::wal_delta(&name, 0x1000, 0x2000));
                }
            }
            for tli in &histories {
                keys.insert(layout::timeline_history(layout::TimelineId::new(*tli).unwrap()));
            }
            let kept: Vec<(TimelineId, Lsn)> = starts
                .iter()
                .map(|(t, s, off)| (TimelineId::new(*t).unwrap(), Lsn(s * size.bytes() + off)))
                .collect();
            let before = WalInventory::from_keys(keys.iter().cloned(), size);
            let (cut, gone) = wal_to_expire(&before, kept.iter().map(|k| k.1), size).unwrap();
            let gone_set: std::collections::BTreeSet<RepoKey> = gone.iter().cloned().collect();
            prop_assert_eq!(gone_set.len(), gone.len(), "a key named twice");
            let rest: Vec<RepoKey> = keys.iter().filter(|k| !gone_set.contains(*k)).cloned().collect();
            let after = WalInventory::from_keys(rest, size);
            prop_assert_eq!(&after.histories, &before.histories);
            match cut {
                None => prop_assert!(gone.is_empty() && kept.is_empty()),
                Some(cut) => {
                    for k in &keys {
                        match segno_of_key(k) {
                            Some(n) => prop_assert_eq!(gone_set.contains(k), n < cut, "{}", k),
                            None => prop_assert!(!gone_set.contains(k), "{}", k),
                        }
                    }
                }
            }
            for (tli, start) in &kept {
                let own = WalPath::from(*tli);
                prop_assert_eq!(
                    after.contiguous_end(&own, *start, size),
                    before.contiguous_end(&own, *start, size)
                );
                // Along a history to the next timeline, switching at `switch`.
                let next = TimelineId::new(tli.get() + 1).unwrap();
                let at = Lsn(switch * size.bytes() + 0x100);
                let text = format!("{}\t{:X}/{:X}\tpromoted\n", tli.get(), at.0 >> 32, at.0 & 0xffff_ffff);
                let mut entries = String::new();
                for t in 1..tli.get() {
                    entries.push_str(&format!("{t}\t0/100\tolder\n"));
                }
                entries.push_str(&text);
                let history = wire::pg::TimelineHistory::parse(entries.as_bytes()).unwrap();
                if let Ok(path) = WalPath::from_history(next, &history, *tli, *start) {
                    prop_assert_eq!(
                        after.contiguous_end(&path, *start, size),
                        before.contiguous_end(&path, *start, size)
                    );
                }
            }
        }
    }
}
