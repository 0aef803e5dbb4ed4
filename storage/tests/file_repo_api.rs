//! Round trips and API behaviour against memory:// and file:// repositories.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use storage::{
    layout, ContentKind, PutMode, RepoKey, RepoKind, RepoMarker, RepoOptions, Repository,
    StorageError,
};

fn small_opts() -> RepoOptions {
    RepoOptions {
        frame_size: 64 << 10,
        part_size: 5 << 20,
        workers: 2,
        ..RepoOptions::default()
    }
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    // Half-compressible pseudo-random bytes.
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if i % 2 == 0 {
                (x >> 56) as u8
            } else {
                b'a'
            }
        })
        .collect()
}

async fn exercise(repo: &Repository) {
    let key = RepoKey::parse("t/obj").unwrap();
    for len in [0usize, 1, 65535, 65536, 65537, 3 << 20, 12 << 20] {
        let d = data(len, len as u64);
        let info = repo
            .put(
                &key,
                ContentKind::Other,
                Bytes::from(d.clone()),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        assert_eq!(info.original_len, len as u64);
        let back = repo.get(&key).await.unwrap();
        assert_eq!(back.len(), d.len());
        assert!(back == d, "round trip of {len} bytes");
        let i2 = repo.info(&key).await.unwrap();
        assert_eq!(i2.sha256, info.sha256);
        assert_eq!(i2.stored_len, info.stored_len);
    }
    // Streaming with odd chunks, larger than a part.
    let d = data(13 << 20, 7);
    let mut w = repo
        .writer(&key, ContentKind::Other, PutMode::Overwrite)
        .await
        .unwrap();
    for c in d.chunks(777_777) {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    let info = w.finish().await.unwrap();
    assert_eq!(info.original_len, d.len() as u64);
    assert!(repo.get(&key).await.unwrap() == d);
    let v = repo.verify(&key).await.unwrap();
    assert!(v.plaintext_verified);
    assert_eq!(v.info.sha256, info.sha256);
}

#[tokio::test]
async fn memory_round_trip() {
    let repo = Repository::open("memory://", small_opts()).unwrap();
    exercise(&repo).await;
}

#[tokio::test]
async fn file_round_trip_and_no_temp_files_left() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let repo = Repository::open(&url, small_opts()).unwrap();
    exercise(&repo).await;
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".sbtmp-"), "temporary file left: {name}");
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

#[tokio::test]
async fn create_new_never_overwrites() {
    for url in [
        "memory://".to_string(),
        format!("file://{}", tempfile::tempdir().unwrap().keep().display()),
    ] {
        let repo = Repository::open(&url, small_opts()).unwrap();
        let seg = layout::WalSegmentName::parse("000000010000000000000001").unwrap();
        let key = layout::wal_segment(&seg);
        let a = repo
            .put(
                &key,
                ContentKind::WalSegment,
                Bytes::from_static(b"first"),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        let err = repo
            .put(
                &key,
                ContentKind::WalSegment,
                Bytes::from_static(b"second"),
                PutMode::CreateNew,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains(key.as_str()));
        assert_eq!(repo.info(&key).await.unwrap().sha256, a.sha256);
        assert_eq!(&repo.get(&key).await.unwrap()[..], b"first");
        // Multipart create-new also refuses.
        let mut w = repo
            .writer(&key, ContentKind::WalSegment, PutMode::CreateNew)
            .await
            .unwrap();
        let big = data(12 << 20, 1);
        let res = async {
            w.write(Bytes::from(big)).await?;
            w.finish().await
        }
        .await;
        assert!(
            matches!(res, Err(StorageError::AlreadyExists { .. })),
            "{res:?}"
        );
        assert_eq!(&repo.get(&key).await.unwrap()[..], b"first");
        repo.put(
            &key,
            ContentKind::WalSegment,
            Bytes::from_static(b"third"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        assert_eq!(&repo.get(&key).await.unwrap()[..], b"third");
    }
}

#[tokio::test]
async fn not_found_is_distinguishable() {
    let repo = Repository::open("memory://", small_opts()).unwrap();
    let key = RepoKey::parse("nope").unwrap();
    let e = repo.get(&key).await.unwrap_err();
    assert!(e.is_not_found() && !e.is_retryable(), "{e}");
    assert!(repo.info(&key).await.unwrap_err().is_not_found());
    assert!(!repo.exists(&key).await.unwrap());
    repo.delete(&key).await.unwrap();
}

#[tokio::test]
async fn list_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "memory://".to_string(),
        format!("file://{}/sub", dir.path().display()),
    ] {
        let repo = Repository::open(&url, small_opts()).unwrap();
        let g = layout::GenerationId::parse("g1").unwrap();
        for (s, e) in [(0u64, 10u64), (10, 20)] {
            repo.put(
                &layout::redis_chunk(&g, s, e),
                ContentKind::RedisCommands,
                Bytes::from_static(b"x"),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        }
        repo.put(
            &layout::redis_snapshot(&g),
            ContentKind::RedisSnapshot,
            Bytes::from_static(b"rdb"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        if let Some(root) = url.strip_prefix("file://") {
            // A temporary file left by a crash is not an object.
            let dir = std::path::Path::new(root).join("redis/gen/g1/chunks");
            std::fs::write(
                dir.join(".00000000000000000020-00000000000000000030.sbtmp-0123"),
                b"x",
            )
            .unwrap();
        }
        let chunks = repo.list(&layout::redis_chunks_prefix(&g)).await.unwrap();
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].key < chunks[1].key);
        assert_eq!(repo.list(&RepoKey::root()).await.unwrap().len(), 3);
        assert_eq!(
            repo.list_dirs(&layout::redis_generations_prefix())
                .await
                .unwrap(),
            vec![layout::redis_generation_prefix(&g)]
        );
        assert_eq!(
            repo.list_dirs(&RepoKey::root()).await.unwrap(),
            vec![RepoKey::parse("redis").unwrap()]
        );
        assert_eq!(
            repo.list_dirs(&layout::redis_generation_prefix(&g))
                .await
                .unwrap(),
            vec![layout::redis_chunks_prefix(&g)]
        );
        assert!(repo
            .list_dirs(&RepoKey::parse("nothing/here").unwrap())
            .await
            .unwrap()
            .is_empty());
        repo.delete(&chunks[0].key).await.unwrap();
        assert_eq!(
            repo.list(&layout::redis_generation_prefix(&g))
                .await
                .unwrap()
                .len(),
            2
        );
    }
}

#[tokio::test]
async fn marker_create_then_existing() {
    let repo = Repository::open("memory://", small_opts()).unwrap();
    assert!(repo.read_marker().await.unwrap().is_none());
    let mut m = RepoMarker::new(RepoKind::Postgres);
    m.system_identifier = Some("7300000000000000001".into());
    let first = repo.init_marker(&m).await.unwrap();
    assert!(matches!(first, storage::MarkerInit::Created(_)));
    let mut other = m.clone();
    other.system_identifier = Some("42".into());
    let second = repo.init_marker(&other).await.unwrap();
    assert_eq!(second, storage::MarkerInit::Existing(m.clone()));
    assert_eq!(repo.read_marker().await.unwrap(), Some(m));
}

#[tokio::test]
async fn file_repo_directory_is_created_on_first_write_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not/yet");
    let repo = Repository::open(&format!("file://{}", root.display()), small_opts()).unwrap();
    assert!(repo.list(&RepoKey::root()).await.unwrap().is_empty());
    // A missing repository directory (unmounted volume, typo) is not "object not found".
    let e = repo.get(&RepoKey::parse("x").unwrap()).await.unwrap_err();
    assert!(
        matches!(e, StorageError::RepositoryMissing { .. }) && !e.is_not_found(),
        "{e}"
    );
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(repo.exists(&RepoKey::parse("x").unwrap()).await.is_err());
    // ...but a new repository has no marker yet, and its first write creates it.
    assert!(repo.read_marker().await.unwrap().is_none());
    assert!(!root.exists(), "reading must not create the repository");
    repo.put(
        &RepoKey::parse("a/b").unwrap(),
        ContentKind::Other,
        Bytes::from_static(b"1"),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    assert!(root.join("a/b").is_file());
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Repository::open(&format!("file://{}", file.display()), small_opts()).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn handles_can_move_between_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Repository>();
    send::<storage::ObjectWriter>();
    send::<storage::ObjectReader>();
    send_sync::<StorageError>();
}
