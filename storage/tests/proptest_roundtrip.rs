//! Property: whatever the size (0 B to 64 MiB), the write chunking, the frame size and the
//! read buffer size, an object reads back byte-identical with a matching SHA-256.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use proptest::prelude::*;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository};
use tokio::io::AsyncReadExt;

/// Half zeros (compressible frames), half random (stored raw), rotated per MiB.
fn make_data(len: usize, seed: u64) -> Vec<u8> {
    let mut block = vec![0u8; 1 << 20];
    let mut x = seed | 1;
    for b in block.iter_mut().skip(1 << 19) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut out = Vec::with_capacity(len);
    let mut rot = (seed as usize) % block.len();
    while out.len() < len {
        let take = (block.len() - rot).min(len - out.len());
        out.extend_from_slice(&block[rot..rot + take]);
        rot = (rot + 7919) % block.len();
    }
    out
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => 0usize..4096,
        3 => 0usize..(3 << 20),
        1 => (32usize << 20)..=(64 << 20),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(
        len in size_strategy(),
        seed in any::<u64>(),
        chunks in prop::collection::vec(1usize..(3 << 20), 1..8),
        read_buf in 1usize..(256 << 10),
        frame_kb in prop::sample::select(vec![4usize, 64, 1024]),
        workers in 1usize..4,
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            // Keep the number of frames reasonable for tiny frames.
            let frame_size = if len / (frame_kb << 10) > 2048 { 1 << 20 } else { frame_kb << 10 };
            let repo = Repository::open("memory://", RepoOptions {
                frame_size,
                part_size: 5 << 20,
                workers,
                ..RepoOptions::default()
            }).unwrap();
            let data = Bytes::from(make_data(len, seed));
            let key = RepoKey::parse("p/obj").unwrap();
            let mut w = repo.writer(&key, ContentKind::Other, PutMode::CreateNew).await.unwrap();
            let mut pos = 0;
            let mut i = 0;
            while pos < data.len() {
                let n = chunks[i % chunks.len()].min(data.len() - pos);
                w.write(data.slice(pos..pos + n)).await.unwrap();
                pos += n;
                i += 1;
            }
            let info = w.finish().await.unwrap();
            prop_assert!(info.matches_content(&[&data]));
            prop_assert_eq!(info.original_len, len as u64);

            let mut r = repo.reader(&key).await.unwrap().into_async_read();
            let mut back = Vec::with_capacity(len);
            let mut buf = vec![0u8; read_buf];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 { break; }
                back.extend_from_slice(&buf[..n]);
            }
            prop_assert_eq!(back.len(), data.len());
            prop_assert!(back[..] == data[..]);
            Ok(())
        })?;
    }
}

/// The upper end of the property's range, always exercised (the property picks it only
/// with some probability).
#[tokio::test]
async fn round_trip_64_mib_exactly() {
    let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
    let data = Bytes::from(make_data(64 << 20, 42));
    let key = RepoKey::parse("p/64mib").unwrap();
    let mut w = repo
        .writer(&key, ContentKind::Other, PutMode::CreateNew)
        .await
        .unwrap();
    let mut pos = 0;
    for n in [1usize, 4095, 1 << 20, 3_333_333].iter().cycle() {
        if pos >= data.len() {
            break;
        }
        let n = (*n).min(data.len() - pos);
        w.write(data.slice(pos..pos + n)).await.unwrap();
        pos += n;
    }
    let info = w.finish().await.unwrap();
    assert!(info.matches_content(&[&data]));
    // The one-shot XXH3-128 of the whole (version 4, plaintext), against the writer's
    // streamed hash over pieces of every size.
    let mut want = [0u8; 32];
    want[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(&data).to_be_bytes());
    assert!(info.matches_content_digest(&want, data.len() as u64));
    let mut r = repo.reader(&key).await.unwrap().into_async_read();
    let mut back = Vec::new();
    let mut buf = vec![0u8; 100_003];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back[..] == data[..]);
}
