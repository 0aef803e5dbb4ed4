//! The replica side of a master connection: PSYNC reply, snapshot transfer, then commands,
//! over arbitrary bytes fed in two pieces. Must never panic or allocate unboundedly.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::redis::{handshake::decode_psync_reply, CommandDecoder, RdbTransferDecoder};

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map(|&b| b as usize % (data.len() + 1)).unwrap_or(0);
    let mut buf = BytesMut::new();
    let mut phase = 0;
    let mut transfer = RdbTransferDecoder::new();
    let mut commands = CommandDecoder::new();
    for part in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(part);
        loop {
            let progressed = match phase {
                0 => match decode_psync_reply(&mut buf) {
                    Ok(Some(_)) => {
                        phase = 1;
                        true
                    }
                    _ => false,
                },
                1 => match transfer.decode(&mut buf) {
                    Ok(Some(_)) => {
                        if transfer.is_done() {
                            phase = 2;
                        }
                        true
                    }
                    _ => false,
                },
                _ => matches!(commands.decode(&mut buf), Ok(Some(_))),
            };
            if !progressed {
                break;
            }
        }
    }
});
