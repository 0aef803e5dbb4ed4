//! Is this WAL what its name says? The checks `postgres wal-fetch` and `restore` run on a
//! segment or history file before PostgreSQL sees it.
//!
//! PostgreSQL validates each page header only as it reads it
//! (`XLogReaderValidatePageHeader`, `src/backend/access/transam/xlogreader.c`), and a
//! mismatch there does not stop recovery: it logs "unexpected pageaddr" or "WAL file is from
//! different database system", treats it as the end of WAL and promotes. So a segment object
//! that holds other WAL (a swapped key, another cluster's segment, a short object) must be
//! refused before it is handed over.
//!
//! Every segment begins with `XLogLongPageHeaderData` (`src/include/access/xlog_internal.h`),
//! little-endian on every supported platform:
//!
//! | offset | field             |                                              |
//! |--------|-------------------|----------------------------------------------|
//! | 0      | `xlp_magic` u16   | `XLOG_PAGE_MAGIC`, changes with each major   |
//! | 2      | `xlp_info` u16    | flags; `XLP_LONG_HEADER` (0x0002) must be set |
//! | 4      | `xlp_tli` u32     | timeline of the first record on the page     |
//! | 8      | `xlp_pageaddr` u64| LSN of the page: the segment's start         |
//! | 16     | `xlp_rem_len` u32 | bytes of a record continued from before      |
//! | 24     | `xlp_sysid` u64   | `system_identifier` of the cluster           |
//! | 32     | `xlp_seg_size` u32| `wal_segment_size`                           |
//! | 36     | `xlp_xlog_blcksz` u32 | `XLOG_BLCKSZ`                            |
//!
//! `xlp_tli` may be older than the timeline in the file name: the first segment of a new
//! timeline starts with a copy of the parent's WAL up to the switch point.

use super::{Lsn, SegmentName, TimelineHistory, TimelineId};

/// `XLOG_PAGE_MAGIC` of each supported PostgreSQL major version (checked against the first
/// WAL segment `initdb` writes with each version's binaries, and against
/// `src/include/access/xlog_internal.h` of each release branch).
pub const XLOG_PAGE_MAGICS: [(u32, u16); 5] = [
    (14, 0xD10D),
    (15, 0xD110),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_ALL_FLAGS`: every flag bit `xlp_info` may carry.
const XLP_ALL_FLAGS: u16 = 0x000F;
/// Size of `XLogLongPageHeaderData` (`SizeOfXLogLongPHD`).
pub const LONG_PAGE_HEADER_LEN: usize = 40;

/// The long page header at the start of a WAL segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    /// `xlp_magic`.
    pub magic: u16,
    /// `xlp_info`.
    pub info: u16,
    /// `xlp_tli`.
    pub tli: u32,
    /// `xlp_pageaddr`.
    pub pageaddr: Lsn,
    /// `xlp_rem_len`.
    pub rem_len: u32,
    /// `xlp_sysid`.
    pub sysid: u64,
    /// `xlp_seg_size`.
    pub seg_size: u32,
    /// `xlp_xlog_blcksz`.
    pub xlog_blcksz: u32,
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl LongPageHeader {
    /// Reads the fields; only the length is checked here.
    pub fn parse(data: &[u8]) -> Result<LongPageHeader, WalCheckError> {
        if data.len() < LONG_PAGE_HEADER_LEN {
            return Err(WalCheckError::TooShort {
                len: data.len() as u64,
            });
        }
        Ok(LongPageHeader {
            magic: u16::from_le_bytes(le(data, 0)),
            info: u16::from_le_bytes(le(data, 2)),
            tli: u32::from_le_bytes(le(data, 4)),
            pageaddr: Lsn(u64::from_le_bytes(le(data, 8))),
            rem_len: u32::from_le_bytes(le(data, 16)),
            sysid: u64::from_le_bytes(le(data, 24)),
            seg_size: u32::from_le_bytes(le(data, 32)),
            xlog_blcksz: u32::from_le_bytes(le(data, 36)),
        })
    }
}

/// Which `xlp_magic` values are acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MagicRule {
    /// Exactly the magic of this major version (which must be in [`XLOG_PAGE_MAGICS`]).
    Major(u32),
    /// Any supported version's magic, when the version is not known to the caller.
    AnyKnown,
}

impl MagicRule {
    /// The rule for `major`, if it is a supported version.
    pub fn for_major(major: u32) -> Option<MagicRule> {
        magic_of(major).map(|_| MagicRule::Major(major))
    }

    fn accepts(self, magic: u16) -> bool {
        match self {
            MagicRule::Major(m) => magic_of(m) == Some(magic),
            MagicRule::AnyKnown => XLOG_PAGE_MAGICS.iter().any(|(_, v)| *v == magic),
        }
    }

    fn describe(self) -> String {
        match self {
            MagicRule::Major(m) => match magic_of(m) {
                Some(v) => format!("{v:#06X} (PostgreSQL {m})"),
                None => format!("the magic of PostgreSQL {m}, which is not supported"),
            },
            MagicRule::AnyKnown => format!(
                "one of PostgreSQL {}..{}'s ({})",
                XLOG_PAGE_MAGICS[0].0,
                XLOG_PAGE_MAGICS[XLOG_PAGE_MAGICS.len() - 1].0,
                XLOG_PAGE_MAGICS
                    .iter()
                    .map(|(_, v)| format!("{v:#06X}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// `XLOG_PAGE_MAGIC` of a major version.
pub fn magic_of(major: u32) -> Option<u16> {
    XLOG_PAGE_MAGICS
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, v)| *v)
}

/// The major version a magic belongs to.
pub fn major_of(magic: u16) -> Option<u32> {
    XLOG_PAGE_MAGICS
        .iter()
        .find(|(_, v)| *v == magic)
        .map(|(m, _)| *m)
}

/// What the object stored under a segment's key must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentExpectation {
    /// The segment the key names (carrying the cluster's `wal_segment_size`).
    pub segment: SegmentName,
    /// The repository's `system_identifier`, when it records one.
    pub system_identifier: Option<u64>,
    /// Acceptable `xlp_magic`.
    pub magic: MagicRule,
}

/// How much of the segment the object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// A complete segment: exactly `wal_segment_size` bytes.
    Complete,
    /// A partial stored with this end offset: exactly that many bytes (PostgreSQL gets it
    /// zero-padded, as `pg_receivewal` pads its `.partial` files).
    Partial(u64),
}

/// The field of the WAL that did not match, for messages and for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalField {
    /// The object's length.
    Length,
    /// `xlp_magic`.
    Magic,
    /// `xlp_info`.
    Info,
    /// `xlp_tli`.
    Timeline,
    /// `xlp_pageaddr`.
    PageAddr,
    /// `xlp_sysid`.
    SystemId,
    /// `xlp_seg_size`.
    SegSize,
    /// `xlp_xlog_blcksz`.
    BlockSize,
    /// The content of a history file.
    History,
}

impl WalField {
    /// The name used in messages (PostgreSQL's field name where there is one).
    pub fn name(self) -> &'static str {
        match self {
            WalField::Length => "length",
            WalField::Magic => "xlp_magic",
            WalField::Info => "xlp_info",
            WalField::Timeline => "xlp_tli",
            WalField::PageAddr => "xlp_pageaddr",
            WalField::SystemId => "xlp_sysid",
            WalField::SegSize => "xlp_seg_size",
            WalField::BlockSize => "xlp_xlog_blcksz",
            WalField::History => "history",
        }
    }
}

/// Why a WAL object is not the WAL its name says. Each variant names the field, what was
/// expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalCheckError {
    /// Shorter than the long page header.
    #[error("length: {len} bytes, shorter than a WAL segment's {LONG_PAGE_HEADER_LEN}-byte long page header")]
    TooShort {
        /// Bytes present.
        len: u64,
    },
    /// A complete segment or a partial whose length is not what was stored.
    #[error("length: {actual} bytes, expected {expected} ({what})")]
    Length {
        /// Bytes the object must have.
        expected: u64,
        /// Bytes it has.
        actual: u64,
        /// "a complete segment" or "the partial's end offset".
        what: &'static str,
    },
    /// Not a WAL page, or WAL of an unsupported or other major version.
    #[error("xlp_magic: {actual:#06X}{}, expected {expected}", major_of(*actual).map(|m| format!(" (PostgreSQL {m})")).unwrap_or_else(|| " (not a known WAL page magic)".into()))]
    Magic {
        /// What was acceptable.
        expected: String,
        /// The value found.
        actual: u16,
    },
    /// Not a long page header, or flags PostgreSQL does not define.
    #[error("xlp_info: {actual:#06X}, expected XLP_LONG_HEADER (0x0002) set and no bits outside XLP_ALL_FLAGS (0x000F)")]
    Info {
        /// The value found.
        actual: u16,
    },
    /// WAL of a newer timeline than the name's.
    #[error("xlp_tli: {actual}, expected at most {expected} (the timeline in the name)")]
    Timeline {
        /// The name's timeline.
        expected: TimelineId,
        /// The value found.
        actual: u32,
    },
    /// WAL of another position: the object belongs under another segment's key.
    #[error("xlp_pageaddr: {actual}, expected {expected} (the segment's start)")]
    PageAddr {
        /// The segment's start.
        expected: Lsn,
        /// The value found.
        actual: Lsn,
    },
    /// WAL of another cluster.
    #[error("xlp_sysid: {actual}, expected {expected} (the repository's system identifier)")]
    SystemId {
        /// The repository's system identifier.
        expected: u64,
        /// The value found.
        actual: u64,
    },
    /// WAL written with another `wal_segment_size`.
    #[error("xlp_seg_size: {actual}, expected {expected} (wal_segment_size)")]
    SegSize {
        /// The cluster's segment size.
        expected: u64,
        /// The value found.
        actual: u32,
    },
    /// A page size PostgreSQL cannot have been built with.
    #[error("xlp_xlog_blcksz: {actual}, expected a power of two from 1024 to 65536")]
    BlockSize {
        /// The value found.
        actual: u32,
    },
    /// A history file that does not parse, or that is not the history of the timeline in
    /// its name.
    #[error("history: {reason}")]
    History {
        /// What is wrong.
        reason: String,
    },
}

impl WalCheckError {
    /// The field that did not match.
    pub fn field(&self) -> WalField {
        match self {
            WalCheckError::TooShort { .. } | WalCheckError::Length { .. } => WalField::Length,
            WalCheckError::Magic { .. } => WalField::Magic,
            WalCheckError::Info { .. } => WalField::Info,
            WalCheckError::Timeline { .. } => WalField::Timeline,
            WalCheckError::PageAddr { .. } => WalField::PageAddr,
            WalCheckError::SystemId { .. } => WalField::SystemId,
            WalCheckError::SegSize { .. } => WalField::SegSize,
            WalCheckError::BlockSize { .. } => WalField::BlockSize,
            WalCheckError::History { .. } => WalField::History,
        }
    }
}

/// Checks the length of a segment object: exactly the segment size for a complete one,
/// exactly the stored end offset for a partial (never longer than a segment).
pub fn check_segment_length(
    len: u64,
    extent: Extent,
    size: super::WalSegmentSize,
) -> Result<(), WalCheckError> {
    let (expected, what) = match extent {
        Extent::Complete => (size.bytes(), "a complete segment"),
        Extent::Partial(end) => (end, "the partial's stored end offset"),
    };
    if len != expected || len > size.bytes() {
        return Err(WalCheckError::Length {
            expected: expected.min(size.bytes()),
            actual: len,
            what,
        });
    }
    Ok(())
}

/// Checks the long page header at the start of `head` (the first bytes of the segment
/// object; at least [`LONG_PAGE_HEADER_LEN`]) against what the name and the repository say.
pub fn check_segment_header(
    head: &[u8],
    expect: &SegmentExpectation,
) -> Result<LongPageHeader, WalCheckError> {
    let h = LongPageHeader::parse(head)?;
    if !expect.magic.accepts(h.magic) {
        return Err(WalCheckError::Magic {
            expected: expect.magic.describe(),
            actual: h.magic,
        });
    }
    if h.info & XLP_LONG_HEADER == 0 || h.info & !XLP_ALL_FLAGS != 0 {
        return Err(WalCheckError::Info { actual: h.info });
    }
    let size = expect.segment.size();
    if u64::from(h.seg_size) != size.bytes() {
        return Err(WalCheckError::SegSize {
            expected: size.bytes(),
            actual: h.seg_size,
        });
    }
    if !(h.xlog_blcksz.is_power_of_two() && (1024..=65536).contains(&h.xlog_blcksz)) {
        return Err(WalCheckError::BlockSize {
            actual: h.xlog_blcksz,
        });
    }
    if let Some(sysid) = expect.system_identifier {
        if h.sysid != sysid {
            return Err(WalCheckError::SystemId {
                expected: sysid,
                actual: h.sysid,
            });
        }
    }
    let start = expect.segment.start_lsn();
    if h.pageaddr != start {
        return Err(WalCheckError::PageAddr {
            expected: start,
            actual: h.pageaddr,
        });
    }
    let tli = expect.segment.timeline();
    if h.tli == 0 || h.tli > tli.get() {
        return Err(WalCheckError::Timeline {
            expected: tli,
            actual: h.tli,
        });
    }
    Ok(h)
}

/// Checks a history file stored as `timeline`'s: it parses, and it is that timeline's
/// history (its ancestors all precede it, the last one being the parent).
pub fn check_history(
    content: &[u8],
    timeline: TimelineId,
) -> Result<TimelineHistory, WalCheckError> {
    let h = TimelineHistory::parse(content).map_err(|e| WalCheckError::History {
        reason: format!("does not parse: {e}"),
    })?;
    match h.entries.last() {
        None => Err(WalCheckError::History {
            reason: format!(
                "no ancestor listed, expected a history ending at the parent of timeline {timeline}"
            ),
        }),
        Some(last) if last.timeline >= timeline => Err(WalCheckError::History {
            reason: format!(
                "last ancestor is timeline {}, expected one before timeline {timeline} (this is the history of a later timeline)",
                last.timeline
            ),
        }),
        Some(_) => Ok(h),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pg::WalSegmentSize;
    use proptest::prelude::*;

    const SYSID: u64 = 7_300_000_000_000_000_001;

    fn header(magic: u16, info: u16, tli: u32, addr: u64, sysid: u64, seg: u32) -> Vec<u8> {
        let mut h = vec![0u8; 8192];
        h[0..2].copy_from_slice(&magic.to_le_bytes());
        h[2..4].copy_from_slice(&info.to_le_bytes());
        h[4..8].copy_from_slice(&tli.to_le_bytes());
        h[8..16].copy_from_slice(&addr.to_le_bytes());
        h[24..32].copy_from_slice(&sysid.to_le_bytes());
        h[32..36].copy_from_slice(&seg.to_le_bytes());
        h[36..40].copy_from_slice(&8192u32.to_le_bytes());
        h
    }

    fn expect(tli: u32, segno: u64) -> SegmentExpectation {
        SegmentExpectation {
            segment: SegmentName::new(
                TimelineId::new(tli).unwrap(),
                segno,
                WalSegmentSize::DEFAULT,
            )
            .unwrap(),
            system_identifier: Some(SYSID),
            magic: MagicRule::Major(15),
        }
    }

    const SEG: u32 = 16 << 20;

    #[test]
    fn a_matching_header_passes() {
        let h = header(0xD110, 0x0002, 1, 6 * u64::from(SEG), SYSID, SEG);
        let got = check_segment_header(&h, &expect(1, 6)).unwrap();
        assert_eq!(got.pageaddr, Lsn(0x600_0000));
        assert_eq!(got.sysid, SYSID);
        // continuation flag and an older timeline (first segment of a new timeline)
        let h = header(0xD110, 0x0003, 1, 6 * u64::from(SEG), SYSID, SEG);
        check_segment_header(&h, &expect(2, 6)).unwrap();
        // no system identifier recorded: not checked
        let e = SegmentExpectation {
            system_identifier: None,
            ..expect(1, 6)
        };
        check_segment_header(&header(0xD110, 2, 1, 0x600_0000, 42, SEG), &e).unwrap();
    }

    #[test]
    fn each_mismatch_names_its_field() {
        let ok = || header(0xD110, 0x0002, 1, 0x600_0000, SYSID, SEG);
        let sysid_text = format!("xlp_sysid: 12345, expected {SYSID}");
        let cases: Vec<(Vec<u8>, WalField, &str)> = vec![
            (ok()[..39].to_vec(), WalField::Length, "39 bytes"),
            (
                header(0xD116, 2, 1, 0x600_0000, SYSID, SEG),
                WalField::Magic,
                "0xD116 (PostgreSQL 17), expected 0xD110 (PostgreSQL 15)",
            ),
            (
                header(0xBEEF, 2, 1, 0x600_0000, SYSID, SEG),
                WalField::Magic,
                "not a known",
            ),
            (
                header(0xD110, 0x0001, 1, 0x600_0000, SYSID, SEG),
                WalField::Info,
                "0x0001",
            ),
            (
                header(0xD110, 0x0012, 1, 0x600_0000, SYSID, SEG),
                WalField::Info,
                "0x0012",
            ),
            (
                header(0xD110, 2, 2, 0x600_0000, SYSID, SEG),
                WalField::Timeline,
                "xlp_tli: 2, expected at most 1",
            ),
            (
                header(0xD110, 2, 0, 0x600_0000, SYSID, SEG),
                WalField::Timeline,
                "xlp_tli: 0",
            ),
            (
                header(0xD110, 2, 1, 0x700_0000, SYSID, SEG),
                WalField::PageAddr,
                "xlp_pageaddr: 0/7000000, expected 0/6000000",
            ),
            (
                header(0xD110, 2, 1, 0x600_0000, 12345, SEG),
                WalField::SystemId,
                &sysid_text,
            ),
            (
                header(0xD110, 2, 1, 0x600_0000, SYSID, 1 << 20),
                WalField::SegSize,
                "xlp_seg_size: 1048576, expected 16777216",
            ),
        ];
        for (bytes, field, text) in cases {
            let err = check_segment_header(&bytes, &expect(1, 6)).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            let msg = err.to_string();
            assert!(msg.starts_with(field.name()), "{msg}");
            assert!(msg.contains(text), "{msg} lacks {text}");
        }
        let mut bad_block = ok();
        bad_block[36..40].copy_from_slice(&3000u32.to_le_bytes());
        assert_eq!(
            check_segment_header(&bad_block, &expect(1, 6))
                .unwrap_err()
                .field(),
            WalField::BlockSize
        );
    }

    #[test]
    fn magic_rules() {
        for (major, magic) in XLOG_PAGE_MAGICS {
            assert_eq!(magic_of(major), Some(magic));
            assert_eq!(major_of(magic), Some(major));
            assert!(MagicRule::AnyKnown.accepts(magic));
            assert!(MagicRule::for_major(major).unwrap().accepts(magic));
        }
        assert!(MagicRule::for_major(13).is_none());
        assert!(!MagicRule::Major(15).accepts(0xD113));
        assert!(!MagicRule::AnyKnown.accepts(0xD106));
        let e = SegmentExpectation {
            magic: MagicRule::AnyKnown,
            ..expect(1, 6)
        };
        let err =
            check_segment_header(&header(0xD0FF, 2, 1, 0x600_0000, SYSID, SEG), &e).unwrap_err();
        assert!(err.to_string().contains("0xD10D, 0xD110"), "{err}");
    }

    #[test]
    fn lengths() {
        let s = WalSegmentSize::DEFAULT;
        check_segment_length(16 << 20, Extent::Complete, s).unwrap();
        let e = check_segment_length(8192, Extent::Complete, s).unwrap_err();
        assert_eq!(e.field(), WalField::Length);
        assert_eq!(
            e.to_string(),
            "length: 8192 bytes, expected 16777216 (a complete segment)"
        );
        check_segment_length(8192, Extent::Partial(8192), s).unwrap();
        assert!(check_segment_length(8192, Extent::Partial(8200), s).is_err());
        assert!(check_segment_length(17 << 20, Extent::Partial(17 << 20), s).is_err());
    }

    #[test]
    fn histories() {
        let two = TimelineId::new(2).unwrap();
        let three = TimelineId::new(3).unwrap();
        let h2 = b"1\t0/5000100\tno recovery target specified\n";
        let h3 = b"1\t0/5000100\tno recovery target specified\n2\t0/7000000\tx\n";
        assert_eq!(check_history(h2, two).unwrap().entries.len(), 1);
        assert_eq!(check_history(h3, three).unwrap().entries.len(), 2);
        // timeline 3's history under timeline 2's name
        let e = check_history(h3, two).unwrap_err();
        assert_eq!(e.field(), WalField::History);
        assert!(e.to_string().contains("last ancestor is timeline 2"), "{e}");
        assert!(check_history(b"", two).is_err());
        assert!(check_history(b"\xff\xfe", two)
            .unwrap_err()
            .to_string()
            .contains("does not parse"));
        // a branch from timeline 1 when timeline 2 exists: parent 1 of timeline 3 is fine
        check_history(h2, three).unwrap();
    }

    proptest! {
        #[test]
        fn header_check_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128),
                                     tli in 1u32..4, segno in 0u64..1 << 20, sysid: Option<u64>,
                                     any_magic: bool) {
            let e = SegmentExpectation {
                segment: SegmentName::new(TimelineId::new(tli).unwrap(), segno, WalSegmentSize::DEFAULT).unwrap(),
                system_identifier: sysid,
                magic: if any_magic { MagicRule::AnyKnown } else { MagicRule::Major(16) },
            };
            if let Err(err) = check_segment_header(&data, &e) {
                prop_assert!(err.to_string().starts_with(err.field().name()));
            }
        }

        #[test]
        fn a_header_passes_only_where_it_belongs(segno in 0u64..1 << 20, other in 0u64..1 << 20) {
            let addr = segno * u64::from(SEG);
            let h = header(0xD110, 2, 1, addr, SYSID, SEG);
            let res = check_segment_header(&h, &expect(1, other));
            prop_assert_eq!(res.is_ok(), segno == other);
        }

        #[test]
        fn history_check_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), tli in 1u32..10) {
            let _ = check_history(&data, TimelineId::new(tli).unwrap());
        }
    }
}
