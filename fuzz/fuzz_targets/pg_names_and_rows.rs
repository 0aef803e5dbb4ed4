//! LSNs, WAL file names and timeline history files, as read from servers and repositories.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wire::pg::{Lsn, TimelineHistory, WalFileName, WalSegmentSize};

fuzz_target!(|data: &[u8]| {
    let _ = TimelineHistory::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Lsn::parse(text);
        let _ = WalSegmentSize::from_setting(text);
        let _ = WalFileName::parse(text, WalSegmentSize::DEFAULT);
    }
});
