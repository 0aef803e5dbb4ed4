//! Every stored byte is covered by a check: flipping any single byte of an object, or cutting
//! it anywhere, makes reading it fail with an error naming the object (never a panic, never
//! wrong bytes). Garbage is rejected the same way.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use proptest::prelude::*;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository, StorageError};

fn repo(store: Arc<InMemory>) -> Repository {
    Repository::from_store(
        store,
        "",
        "memory://",
        RepoOptions {
            frame_size: 1024,
            workers: 2,
            ..RepoOptions::default()
        },
    )
    .unwrap()
}

async fn pristine() -> (Arc<InMemory>, Vec<u8>, Vec<u8>) {
    let store = Arc::new(InMemory::new());
    let original: Vec<u8> = (0..2500u32)
        .map(|i| (i * 13 % 256) as u8 ^ (i >> 8) as u8)
        .collect();
    repo(store.clone())
        .put(
            &RepoKey::parse("obj").unwrap(),
            ContentKind::Other,
            Bytes::from(original.clone()),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    let stored = store
        .get(&Path::from("obj"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    (store, stored, original)
}

/// Stores `bytes` as the object and reads it back; returns the error (panics if it read).
async fn read_fails(store: &Arc<InMemory>, bytes: Vec<u8>, what: &str) -> StorageError {
    store.put(&Path::from("obj"), bytes.into()).await.unwrap();
    match repo(store.clone())
        .get(&RepoKey::parse("obj").unwrap())
        .await
    {
        Ok(b) => panic!("{what}: read {} bytes from a damaged object", b.len()),
        Err(e) => {
            assert!(e.to_string().contains("obj"), "{what}: {e}");
            assert!(
                matches!(
                    e,
                    StorageError::Corrupt { .. } | StorageError::UnsupportedVersion { .. }
                ),
                "{what}: {e}"
            );
            e
        }
    }
}

#[tokio::test]
async fn every_single_byte_flip_is_detected() {
    let (store, stored, original) = pristine().await;
    assert!(
        repo(store.clone())
            .get(&RepoKey::parse("obj").unwrap())
            .await
            .unwrap()
            == original
    );
    for at in 0..stored.len() {
        for mask in [0x01u8, 0x80] {
            let mut b = stored.clone();
            b[at] ^= mask;
            read_fails(&store, b, &format!("flip {mask:#x} at {at}")).await;
        }
    }
}

#[tokio::test]
async fn every_truncation_is_detected() {
    let (store, stored, _) = pristine().await;
    for len in 0..stored.len() {
        read_fails(&store, stored[..len].to_vec(), &format!("cut at {len}")).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn garbage_is_rejected(bytes in prop::collection::vec(any::<u8>(), 0..4096), keep_magic in any::<bool>()) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = Arc::new(InMemory::new());
            let mut b = bytes;
            if keep_magic && b.len() >= 8 {
                b[..8].copy_from_slice(&storage::format::MAGIC);
            }
            read_fails(&store, b, "garbage").await;
        });
    }

    #[test]
    fn multi_byte_damage_is_rejected(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6)
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (store, stored, _) = pristine().await;
            let mut b = stored.clone();
            for (i, x) in &flips {
                let at = i.index(b.len());
                b[at] ^= x;
            }
            if b != stored {
                read_fails(&store, b, "multi-byte damage").await;
            }
        });
    }
}
