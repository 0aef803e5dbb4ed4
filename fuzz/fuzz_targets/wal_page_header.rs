//! The WAL checks `postgres wal-fetch` and restore run before PostgreSQL sees a segment or
//! a history file (`wire::pg::page`): the long page header against what the segment's name
//! and the repository say, the object's length, and a history file's content against its
//! timeline. Must never panic; what a check accepts must satisfy what it promises.
//!
//! Input: `[size shift][timeline u32][segno u64][flags][sysid u64][length u64][bytes…]`.
//! With flag 0x80 the first 40 bytes are XORed onto a header that matches the name, so
//! the accepting paths are reached, not only the refusals.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::pg::page::{
    check_history, check_segment_header, check_segment_length, major_of, magic_of, Extent,
    MagicRule, SegmentExpectation, LONG_PAGE_HEADER_LEN,
};
use wire::pg::{SegmentName, TimelineId, WalSegmentSize};

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 30 {
        return;
    }
    let size = WalSegmentSize::new(1 << (20 + u64::from(data[0] % 11))).expect("valid size");
    let Ok(tli) = TimelineId::new(u32::from_le_bytes(data[1..5].try_into().expect("4"))) else {
        return;
    };
    let Ok(segment) = SegmentName::new(tli, u64_at(data, 5), size) else {
        return;
    };
    let flags = data[13];
    let sysid = u64_at(data, 14);
    let len = u64_at(data, 22);
    let rest = &data[30..];
    let major = 14 + u32::from(flags % 7); // 19 and 20 are not supported
    let magic = MagicRule::for_major(major).unwrap_or(MagicRule::AnyKnown);
    let expect = SegmentExpectation {
        segment,
        system_identifier: (flags & 0x40 != 0).then_some(sysid),
        magic,
    };

    let mut head = rest.to_vec();
    if flags & 0x80 != 0 {
        let mut h = Vec::with_capacity(LONG_PAGE_HEADER_LEN);
        h.extend_from_slice(&magic_of(major).unwrap_or(0xD110).to_le_bytes());
        h.extend_from_slice(&0x0002u16.to_le_bytes());
        h.extend_from_slice(&tli.get().to_le_bytes());
        h.extend_from_slice(&segment.start_lsn().0.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // padding
        h.extend_from_slice(&sysid.to_le_bytes());
        h.extend_from_slice(&(size.bytes() as u32).to_le_bytes());
        h.extend_from_slice(&8192u32.to_le_bytes());
        for (i, b) in head.iter().take(LONG_PAGE_HEADER_LEN).enumerate() {
            h[i] ^= b;
        }
        if head.len() > LONG_PAGE_HEADER_LEN {
            h.extend_from_slice(&head[LONG_PAGE_HEADER_LEN..]);
        }
        head = h;
    }

    match check_segment_header(&head, &expect) {
        Ok(h) => {
            assert_eq!(h.pageaddr, segment.start_lsn(), "pageaddr");
            assert_eq!(u64::from(h.seg_size), size.bytes(), "seg_size");
            assert!(h.tli >= 1 && h.tli <= tli.get(), "timeline {}", h.tli);
            assert!(major_of(h.magic).is_some(), "magic {:#x}", h.magic);
            if let MagicRule::Major(m) = magic {
                assert_eq!(major_of(h.magic), Some(m));
            }
            if let Some(s) = expect.system_identifier {
                assert_eq!(h.sysid, s, "sysid");
            }
            assert!(h.info & 0x0002 != 0, "XLP_LONG_HEADER");
        }
        Err(e) => {
            let _ = (e.to_string(), e.field().name());
        }
    }

    let extent = if flags & 0x20 != 0 {
        Extent::Partial(len % (size.bytes() * 2))
    } else {
        Extent::Complete
    };
    let object_len = u64::from_le_bytes(data[22..30].try_into().expect("8")).rotate_left(17)
        % (size.bytes() * 2);
    match check_segment_length(object_len, extent, size) {
        Ok(()) => {
            assert!(object_len <= size.bytes());
            match extent {
                Extent::Complete => assert_eq!(object_len, size.bytes()),
                Extent::Partial(end) => assert_eq!(object_len, end),
            }
        }
        Err(e) => {
            let _ = (e.to_string(), e.field().name());
        }
    }

    match check_history(rest, tli) {
        Ok(h) => {
            let last = h.entries.last().expect("a history has an ancestor");
            assert!(last.timeline < tli, "history of a later timeline");
        }
        Err(e) => {
            let _ = (e.to_string(), e.field().name());
        }
    }
});
