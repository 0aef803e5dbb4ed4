//! The streaming RDB validator fed a header plus arbitrary bytes in two pieces: it must never
//! panic, and splitting must not change the verdict.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wire::redis::rdb::{validate, RdbValidator};

fuzz_target!(|data: &[u8]| {
    let mut file = if data.first().is_some_and(|b| b & 1 == 0) {
        b"REDIS0011".to_vec()
    } else {
        b"VALKEY080".to_vec()
    };
    file.extend_from_slice(data.get(1..).unwrap_or_default());
    let whole = validate(&file);
    let cut = data.get(1).map_or(0, |&b| usize::from(b) * file.len() / 256);
    let mut v = RdbValidator::with_blob_cap(4096);
    let split = v.feed(&file[..cut]).and_then(|()| v.feed(&file[cut..])).and_then(|()| v.finish());
    assert_eq!(whole.is_ok(), split.is_ok());
});
