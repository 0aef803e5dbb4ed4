//! The Redis command-stream chunk decoder, as `redis restore` and `redis verify` run it:
//! the chunk container (`SBRC1\n`, JSON header, body whose length must match the
//! offsets; `agent/src/redis/chunk.rs`) and then the replicated commands in its body
//! (`wire::redis::CommandDecoder`), replayed up to a cut offset taken from the header's
//! time index. Must never panic or allocate unboundedly.
//!
//! The agent is a binary crate, so the chunk module is compiled in here from its source
//! file (`#[path]`): the code fuzzed is the code shipped, with no copy to drift.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wire::redis::CommandDecoder;

#[allow(dead_code)]
#[path = "../../agent/src/redis/chunk.rs"]
mod chunk;

fuzz_target!(|data: &[u8]| {
    let Ok((header, body)) = chunk::decode("fuzz", Bytes::copy_from_slice(data)) else {
        return;
    };
    // What decode accepts is exactly what encode writes.
    let again = chunk::encode(&header, &body).expect("encode");
    let (h2, b2) = chunk::decode("fuzz", again).expect("re-decode");
    assert_eq!((&h2, &b2), (&header, &body));
    // The replay loop of restore.rs: commands up to the last indexed offset.
    let cut = header
        .time_index
        .last()
        .map_or(header.end, |(off, _)| *off);
    let mut offset = header.start;
    let mut buf = BytesMut::from(&body[..]);
    let mut dec = CommandDecoder::new();
    while offset < cut {
        match dec.decode(&mut buf) {
            Ok(Some(cmd)) => {
                let len = cmd.wire_len();
                assert!(len > 0, "a command of no bytes would loop forever");
                offset = offset.saturating_add(len);
                let _ = (cmd.is_replication_only(), cmd.name());
            }
            Ok(None) | Err(_) => break,
        }
    }
});
