//! WAL segment sizes and file names (`src/include/access/xlog_internal.h`: `XLogFileName`,
//! `XLogFromFileName`, `IsValidWalSegSize`).
//!
//! A segment file is named `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split
//! into "xlogid" (`segno / segments_per_xlogid`) and "seg" (`segno % segments_per_xlogid`),
//! where `segments_per_xlogid = 2^32 / segment size`. The same name therefore means different
//! LSNs for different segment sizes, which is why every name here carries its size.

use std::fmt;

use super::{Lsn, PgWireError, TimelineId};

/// A validated `wal_segment_size`: a power of two from 1 MiB to 1 GiB (`IsValidWalSegSize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalSegmentSize(u64);

impl WalSegmentSize {
    /// The default `initdb --wal-segsize`.
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(16 * 1024 * 1024);
    const MIN: u64 = 1024 * 1024;
    const MAX: u64 = 1024 * 1024 * 1024;

    /// Validates a size in bytes.
    pub fn new(bytes: u64) -> Result<WalSegmentSize, PgWireError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(WalSegmentSize(bytes))
        } else {
            Err(PgWireError::InvalidSegmentSize { bytes })
        }
    }

    /// Reads the answer to `SHOW wal_segment_size` (`16MB`, `1GB`, or plain bytes).
    pub fn from_setting(text: &str) -> Result<WalSegmentSize, PgWireError> {
        let bad = || PgWireError::InvalidSegmentSizeSetting {
            text: text.chars().take(32).collect(),
        };
        let t = text.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        let num: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" => 1024,
            "MB" => 1024 * 1024,
            "GB" => 1024 * 1024 * 1024,
            _ => return Err(bad()),
        };
        WalSegmentSize::new(num.checked_mul(mult).ok_or_else(bad)?)
    }

    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// How many segments share one "xlogid" (the middle 8 hex digits of a name).
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.0
    }

    /// The segment number that contains `lsn` (`XLByteToSeg`).
    pub fn segment_of(self, lsn: Lsn) -> u64 {
        lsn.0 / self.0
    }

    /// Offset of `lsn` within its segment (`XLogSegmentOffset`).
    pub fn offset_in_segment(self, lsn: Lsn) -> u64 {
        lsn.0 & (self.0 - 1)
    }

    /// The start of the segment containing `lsn`.
    pub fn segment_start(self, lsn: Lsn) -> Lsn {
        Lsn(lsn.0 - self.offset_in_segment(lsn))
    }
}

impl fmt::Display for WalSegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1024 * 1024 * 1024 {
            write!(f, "{}GB", self.0 >> 30)
        } else {
            write!(f, "{}MB", self.0 >> 20)
        }
    }
}

/// A WAL segment: timeline plus segment number, named as in `pg_wal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentName {
    timeline: TimelineId,
    segno: u64,
    size: WalSegmentSize,
}

impl SegmentName {
    /// The segment of `timeline` that contains `lsn`.
    pub fn from_lsn(timeline: TimelineId, lsn: Lsn, size: WalSegmentSize) -> SegmentName {
        SegmentName {
            timeline,
            segno: size.segment_of(lsn),
            size,
        }
    }

    /// From a segment number (`XLogSegNo`).
    pub fn new(
        timeline: TimelineId,
        segno: u64,
        size: WalSegmentSize,
    ) -> Result<SegmentName, PgWireError> {
        if segno.checked_mul(size.bytes()).is_none() {
            return Err(PgWireError::LsnOverflow(format!(
                "segment number {segno:X}"
            )));
        }
        Ok(SegmentName {
            timeline,
            segno,
            size,
        })
    }

    /// Parses a 24-hex-digit name, refusing anything PostgreSQL would never write.
    pub fn parse(name: &str, size: WalSegmentSize) -> Result<SegmentName, PgWireError> {
        let bad = |reason| PgWireError::InvalidFileName {
            name: name.chars().take(64).collect(),
            reason,
        };
        if name.len() != 24 {
            return Err(bad("a WAL segment name has exactly 24 hex digits"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
        {
            return Err(bad("a WAL segment name has only upper-case hex digits"));
        }
        let field = |range: std::ops::Range<usize>| {
            u64::from_str_radix(&name[range], 16).map_err(|_| bad("not hex"))
        };
        let tli = field(0..8)?;
        let xlogid = field(8..16)?;
        let seg = field(16..24)?;
        let timeline = TimelineId::from_u64(tli).map_err(|_| bad("timeline 0 does not exist"))?;
        if seg >= size.segments_per_xlogid() {
            return Err(bad("segment part too large for this WAL segment size"));
        }
        let segno = xlogid * size.segments_per_xlogid() + seg;
        SegmentName::new(timeline, segno, size).map_err(|_| bad("beyond the WAL address space"))
    }

    /// The timeline this segment belongs to.
    pub fn timeline(self) -> TimelineId {
        self.timeline
    }

    /// `XLogSegNo`.
    pub fn segno(self) -> u64 {
        self.segno
    }

    /// The segment size the name was computed with.
    pub fn size(self) -> WalSegmentSize {
        self.size
    }

    /// First LSN inside this segment.
    pub fn start_lsn(self) -> Lsn {
        Lsn(self.segno * self.size.bytes())
    }

    /// First LSN after this segment (may be `u64::MAX + 1` for the very last one: saturates).
    pub fn end_lsn(self) -> Lsn {
        Lsn(self.start_lsn().0.saturating_add(self.size.bytes()))
    }

    /// The following segment on the same timeline, if the address space has one.
    pub fn next(self) -> Option<SegmentName> {
        SegmentName::new(self.timeline, self.segno.checked_add(1)?, self.size).ok()
    }

    /// The same position on another timeline (a new timeline starts inside a segment of the old).
    pub fn on_timeline(self, timeline: TimelineId) -> SegmentName {
        SegmentName { timeline, ..self }
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = self.size.segments_per_xlogid();
        write!(
            f,
            "{:08X}{:08X}{:08X}",
            self.timeline.get(),
            self.segno / per,
            self.segno % per
        )
    }
}

/// What `restore_command`'s `%f` can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileName {
    /// A WAL segment.
    Segment(SegmentName),
    /// `0000000N.history`.
    History(TimelineId),
}

impl WalFileName {
    /// Parses a file name PostgreSQL requests during recovery.
    pub fn parse(name: &str, size: WalSegmentSize) -> Result<WalFileName, PgWireError> {
        if let Some(hex) = name.strip_suffix(".history") {
            let bad = |reason| PgWireError::InvalidFileName {
                name: name.chars().take(64).collect(),
                reason,
            };
            if hex.len() != 8
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
            {
                return Err(bad(
                    "a history file name is 8 upper-case hex digits + .history",
                ));
            }
            let tli = u32::from_str_radix(hex, 16).map_err(|_| bad("not hex"))?;
            return TimelineId::new(tli)
                .map(WalFileName::History)
                .map_err(|_| bad("timeline 0 does not exist"));
        }
        SegmentName::parse(name, size).map(WalFileName::Segment)
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => s.fmt(f),
            WalFileName::History(t) => f.write_str(&t.history_file_name()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn tli(n: u32) -> TimelineId {
        TimelineId::new(n).unwrap()
    }

    #[test]
    fn segment_sizes() {
        assert!(WalSegmentSize::new(1 << 20).is_ok());
        assert!(WalSegmentSize::new(1 << 30).is_ok());
        for bad in [0, 1 << 19, 1 << 31, 3 << 20, 16_000_000] {
            assert!(WalSegmentSize::new(bad).is_err(), "{bad}");
        }
        assert_eq!(
            WalSegmentSize::from_setting("16MB").unwrap(),
            WalSegmentSize::DEFAULT
        );
        assert_eq!(
            WalSegmentSize::from_setting("1GB").unwrap().bytes(),
            1 << 30
        );
        assert_eq!(
            WalSegmentSize::from_setting("1048576").unwrap().bytes(),
            1 << 20
        );
        assert!(WalSegmentSize::from_setting("16 parsecs").is_err());
        assert!(WalSegmentSize::from_setting("3MB").is_err());
        assert!(WalSegmentSize::from_setting("99999999999999999999GB").is_err());
    }

    #[test]
    fn names_match_pg_wal() {
        let s16 = WalSegmentSize::DEFAULT;
        let name = SegmentName::from_lsn(tli(1), Lsn::parse("0/3000028").unwrap(), s16);
        assert_eq!(name.to_string(), "000000010000000000000003");
        assert_eq!(name.start_lsn(), Lsn(0x300_0000));
        assert_eq!(name.end_lsn(), Lsn(0x400_0000));
        let name = SegmentName::from_lsn(tli(2), Lsn::parse("1/FF000000").unwrap(), s16);
        assert_eq!(name.to_string(), "0000000200000001000000FF");
        assert_eq!(name.next().unwrap().to_string(), "000000020000000200000000");
        // 1 GiB segments: only 4 per xlogid
        let s1g = WalSegmentSize::new(1 << 30).unwrap();
        let name = SegmentName::from_lsn(tli(1), Lsn::parse("1/C0000000").unwrap(), s1g);
        assert_eq!(name.to_string(), "000000010000000100000003");
    }

    #[test]
    fn parse_errors_are_clear() {
        let s16 = WalSegmentSize::DEFAULT;
        let e = SegmentName::parse("00000001000000000000003", s16).unwrap_err();
        assert!(e.to_string().contains("24 hex digits"), "{e}");
        let e = SegmentName::parse("00000001000000000000000g", s16).unwrap_err();
        assert!(e.to_string().contains("hex"), "{e}");
        let e = SegmentName::parse("000000010000000000000100", s16).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        assert!(SegmentName::parse("000000000000000000000001", s16).is_err());
        assert!(SegmentName::parse("00000001000000000000000a", s16).is_err());
        assert!(SegmentName::parse("0000000100000000000000€1", s16).is_err());
    }

    #[test]
    fn wal_file_names() {
        let s16 = WalSegmentSize::DEFAULT;
        assert_eq!(
            WalFileName::parse("00000002.history", s16).unwrap(),
            WalFileName::History(tli(2))
        );
        assert!(WalFileName::parse("00000000.history", s16).is_err());
        assert!(WalFileName::parse("2.history", s16).is_err());
        assert!(matches!(
            WalFileName::parse("000000010000000000000003", s16).unwrap(),
            WalFileName::Segment(_)
        ));
        assert!(WalFileName::parse("000000010000000000000003.partial", s16).is_err());
    }

    proptest! {
        #[test]
        fn names_round_trip(t in 1u32.., lsn: u64, shift in 20u32..=30) {
            let size = WalSegmentSize::new(1 << shift).unwrap();
            let name = SegmentName::from_lsn(TimelineId::new(t).unwrap(), Lsn(lsn), size);
            let parsed = SegmentName::parse(&name.to_string(), size).unwrap();
            prop_assert_eq!(parsed, name);
            prop_assert!(name.start_lsn() <= Lsn(lsn));
            prop_assert!(Lsn(lsn).0 - name.start_lsn().0 < size.bytes());
            prop_assert_eq!(size.segment_start(Lsn(lsn)), name.start_lsn());
        }

        #[test]
        fn parse_never_panics(name in "[0-9A-Fa-z.]{0,30}") {
            let _ = WalFileName::parse(&name, WalSegmentSize::DEFAULT);
        }
    }
}
