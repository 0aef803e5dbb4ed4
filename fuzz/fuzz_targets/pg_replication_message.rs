//! CopyData payloads from a walsender or a BASE_BACKUP stream, and backend framing.
#![no_main]
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wire::pg::basebackup::BackupCopyMessage;
use wire::pg::frame::next_frame;
use wire::pg::ReplicationMessage;

fuzz_target!(|data: &[u8]| {
    let _ = ReplicationMessage::parse(Bytes::copy_from_slice(data));
    let _ = BackupCopyMessage::parse(Bytes::copy_from_slice(data));
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = next_frame(&mut buf, 1 << 20) {}
});
