//! A base backup tar stream fed in two pieces: must never panic or allocate unboundedly.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::pg::tar::TarReader;

fuzz_target!(|data: &[u8]| {
    let cut = data
        .first()
        .map(|&b| b as usize % (data.len() + 1))
        .unwrap_or(0);
    let mut reader = TarReader::new();
    let mut buf = BytesMut::new();
    for part in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(part);
        loop {
            match reader.next_event(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = reader.finish();
});
