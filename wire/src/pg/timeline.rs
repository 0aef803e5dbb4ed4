//! Timelines and their history files.
//!
//! Each promotion starts a new timeline and writes `0000000N.history`
//! (`src/backend/access/transam/timeline.c`, `writeTimeLineHistory`): one line per ancestor,
//! `parentTLI<TAB>switchpoint<TAB>reason`, where the switch point is the LSN at which the child
//! branched off. Blank lines and `#` comments are allowed (`readTimeLineHistory`).

use std::fmt;

use super::{Lsn, PgWireError};

/// A PostgreSQL timeline: 1 for a fresh cluster, incremented on every promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(u32);

impl TimelineId {
    /// The timeline of a cluster that was never promoted.
    pub const FIRST: TimelineId = TimelineId(1);

    /// Validates that the id is not zero (PostgreSQL never uses timeline 0).
    pub fn new(id: u32) -> Result<TimelineId, PgWireError> {
        if id == 0 {
            return Err(PgWireError::InvalidTimeline(0));
        }
        Ok(TimelineId(id))
    }

    /// From a wire integer (replication results send timelines as int4/int8 text).
    pub fn from_u64(id: u64) -> Result<TimelineId, PgWireError> {
        u32::try_from(id)
            .map_err(|_| PgWireError::InvalidTimeline(id))
            .and_then(TimelineId::new)
    }

    /// The numeric id.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The next timeline, as a promotion would create it.
    pub fn next(self) -> Option<TimelineId> {
        self.0.checked_add(1).map(TimelineId)
    }

    /// `0000000N.history`: the file PostgreSQL writes when this timeline is created.
    pub fn history_file_name(self) -> String {
        format!("{:08X}.history", self.0)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One ancestor of a timeline: WAL of `timeline` is valid up to (not including) `switch_lsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The parent timeline.
    pub timeline: TimelineId,
    /// Where the child branched off; WAL of `timeline` after this belongs to no descendant.
    pub switch_lsn: Lsn,
    /// Free-text reason PostgreSQL recorded (e.g. `no recovery target specified`).
    pub reason: String,
}

/// The parsed content of a `.history` file: the ancestors, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TimelineHistory {
    /// Ancestors, oldest first, as in the file.
    pub entries: Vec<HistoryEntry>,
}

impl TimelineHistory {
    /// Largest history file we accept; real ones are a few hundred bytes per promotion.
    pub const MAX_LEN: usize = 16 * 1024 * 1024;

    /// Parses a history file, checking that timelines and switch points only increase as
    /// `readTimeLineHistory` requires.
    pub fn parse(content: &[u8]) -> Result<TimelineHistory, PgWireError> {
        if content.len() > Self::MAX_LEN {
            return Err(PgWireError::TooLarge {
                what: "timeline history file",
                announced: content.len() as u64,
                limit: Self::MAX_LEN as u64,
            });
        }
        let text = std::str::from_utf8(content).map_err(|e| PgWireError::InvalidHistory {
            line: 1 + content[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            reason: "not valid UTF-8".into(),
        })?;
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| PgWireError::InvalidHistory {
                line,
                reason: reason.to_string(),
            };
            let mut fields = trimmed.splitn(3, ['\t', ' ']);
            let tli_text = fields.next().unwrap_or_default();
            let lsn_text = fields
                .next()
                .ok_or_else(|| bad("missing switch point after timeline"))?;
            let reason = fields.next().unwrap_or_default().trim().to_string();
            let tli: u32 = tli_text
                .parse()
                .map_err(|_| bad(&format!("timeline {tli_text:?} is not a number")))?;
            let timeline = TimelineId::new(tli).map_err(|_| bad("timeline 0"))?;
            let switch_lsn = Lsn::parse(lsn_text.trim())
                .map_err(|_| bad(&format!("switch point {lsn_text:?} is not an LSN")))?;
            if let Some(prev) = entries.last() {
                if timeline <= prev.timeline {
                    return Err(bad("timeline IDs must be in increasing sequence"));
                }
                if switch_lsn < prev.switch_lsn {
                    return Err(bad("switch points must not go backwards"));
                }
            }
            entries.push(HistoryEntry {
                timeline,
                switch_lsn,
                reason,
            });
        }
        Ok(TimelineHistory { entries })
    }

    /// The timeline that the WAL at `lsn` belongs to in the history of `current`.
    pub fn timeline_at(&self, lsn: Lsn, current: TimelineId) -> TimelineId {
        self.entries
            .iter()
            .find(|e| lsn < e.switch_lsn)
            .map(|e| e.timeline)
            .unwrap_or(current)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn history_file_names() {
        assert_eq!(
            TimelineId::new(2).unwrap().history_file_name(),
            "00000002.history"
        );
        assert_eq!(
            TimelineId::new(0x1A).unwrap().history_file_name(),
            "0000001A.history"
        );
        assert!(TimelineId::new(0).is_err());
        assert!(TimelineId::from_u64(1 << 33).is_err());
    }

    #[test]
    fn parses_pg_history() {
        let text = b"1\t0/3000160\tno recovery target specified\n\n# comment\n2\t0/50000A0\tbefore 2024-01-01 00:00:00+00\n";
        let h = TimelineHistory::parse(text).unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[0].timeline.get(), 1);
        assert_eq!(h.entries[0].switch_lsn, Lsn(0x3000160));
        assert_eq!(h.entries[0].reason, "no recovery target specified");
        assert_eq!(h.entries[1].reason, "before 2024-01-01 00:00:00+00");
        let tli3 = TimelineId::new(3).unwrap();
        assert_eq!(h.timeline_at(Lsn(0x100), tli3).get(), 1);
        assert_eq!(h.timeline_at(Lsn(0x3000160), tli3).get(), 2);
        assert_eq!(h.timeline_at(Lsn(0x6000000), tli3).get(), 3);
    }

    #[test]
    fn rejects_bad_history() {
        let err = TimelineHistory::parse(b"1\t0/10\tx\n1\t0/20\ty\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(TimelineHistory::parse(b"x\t0/10\n").is_err());
        assert!(TimelineHistory::parse(b"1\n").is_err());
        assert!(TimelineHistory::parse(b"1\tnope\n").is_err());
        assert!(TimelineHistory::parse(b"2\t0/20\n3\t0/10\n").is_err());
        assert_eq!(TimelineHistory::parse(b"").unwrap().entries.len(), 0);
    }
}
