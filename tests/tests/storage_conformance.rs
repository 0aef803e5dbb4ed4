//! One storage conformance suite, the shape of object_store's `integration.rs`: every
//! check is a function of a `Repository`, and the same checks run over `memory://`,
//! `file://` (a temp directory; each check is followed by the local store's own
//! invariants: no temporary file left, files 0600 and directories 0700) and real
//! SeaweedFS over S3. Test names are `<backend>::<check>`.
//!
//! What only one backend has stays in its own file: injected S3 faults, request counts and
//! the missing bucket (`storage_s3.rs`), temporary-file cleanup and permissions of
//! operator-made directories (`storage/tests/local_*.rs`), corruption and encryption
//! (`storage/tests/`).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use storage::{
    layout, ContentKind, MarkerInit, PutMode, RepoKey, RepoKind, RepoMarker, RepoOptions,
    Repository, RetryPolicy, StorageError,
};
use syncbridge_tests::s3::S3Server;

const FRAME: usize = 64 << 10;

fn opts() -> RepoOptions {
    RepoOptions {
        frame_size: FRAME,
        part_size: 5 << 20,
        workers: 2,
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            max_elapsed: Duration::from_secs(20),
        },
        ..RepoOptions::default()
    }
}

/// Pseudo-random bytes, one in three compressible.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                b'.'
            } else {
                x as u8
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------

/// Whole objects of every size around a frame and a part, one-shot and streamed, read
/// back whole, streamed, by header and trailer (`info`), and verified.
async fn round_trip_sizes_and_streams(repo: &Repository) {
    let key = RepoKey::parse("t/obj").unwrap();
    for len in [0usize, 1, FRAME - 1, FRAME, FRAME + 1, 3 << 20, 11 << 20] {
        let d = data(len, len as u64 + 1);
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
        assert!(
            repo.get(&key).await.unwrap() == d,
            "round trip of {len} bytes"
        );
        assert_eq!(repo.info(&key).await.unwrap(), info, "info of {len} bytes");
    }
    // Unknown length, odd chunks, several parts.
    let d = data(13 << 20, 99);
    let mut w = repo
        .writer(&key, ContentKind::Other, PutMode::Overwrite)
        .await
        .unwrap();
    for c in d.chunks(777_777) {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    let info = w.finish().await.unwrap();
    assert_eq!(info.original_len, d.len() as u64);
    assert!(info.stored_len > 5 << 20, "exercises multipart");
    let mut r = repo.reader(&key).await.unwrap();
    let mut streamed = Vec::with_capacity(d.len());
    while let Some(chunk) = r.next().await {
        streamed.extend_from_slice(&chunk.unwrap());
    }
    assert!(streamed == d, "streamed read");
    let v = repo.verify(&key).await.unwrap();
    assert!(v.plaintext_verified);
    assert_eq!(v.info.sha256, info.sha256);
    let listed = repo.list(&RepoKey::root()).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((&listed[0].key, listed[0].size), (&key, info.stored_len));
}

/// `CreateNew` never replaces an object, one-shot or multipart; `Overwrite` does.
async fn create_new_never_overwrites(repo: &Repository) {
    let seg = layout::WalSegmentName::parse("000000010000000000000007").unwrap();
    let key = layout::wal_segment(&seg);
    let first = repo
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
    assert!(err.to_string().contains(key.as_str()), "{err}");
    assert_eq!(repo.info(&key).await.unwrap().sha256, first.sha256);
    assert_eq!(&repo.get(&key).await.unwrap()[..], b"first");
    let mut w = repo
        .writer(&key, ContentKind::WalSegment, PutMode::CreateNew)
        .await
        .unwrap();
    let res = async {
        w.write(Bytes::from(data(12 << 20, 5))).await?;
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
    assert_eq!(repo.list(&RepoKey::root()).await.unwrap().len(), 1);
}

/// A missing object is a not-found error (never retried, never another error), absent
/// for `exists`, and deleting it succeeds.
async fn not_found_is_distinguishable(repo: &Repository) {
    // The repository itself exists (a missing one is an error of its own).
    repo.put(
        &RepoKey::parse("here").unwrap(),
        ContentKind::Other,
        Bytes::from_static(b"x"),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
    let e = repo.get(&key).await.unwrap_err();
    assert!(e.is_not_found() && !e.is_retryable(), "{e}");
    assert!(e.to_string().contains(key.as_str()), "{e}");
    assert!(repo.info(&key).await.unwrap_err().is_not_found());
    assert!(repo.reader(&key).await.err().unwrap().is_not_found());
    assert!(!repo.exists(&key).await.unwrap());
    repo.delete(&key).await.unwrap();
    assert!(repo
        .list(&RepoKey::parse("postgres").unwrap())
        .await
        .unwrap()
        .is_empty());
}

/// Listing is recursive and sorted, `list_dirs` gives one level, delete removes one.
async fn list_list_dirs_and_delete(repo: &Repository) {
    let g = layout::GenerationId::parse("g1").unwrap();
    for (s, e) in [(10u64, 20u64), (0, 10)] {
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
    let chunks = repo.list(&layout::redis_chunks_prefix(&g)).await.unwrap();
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert!(chunks[0].key < chunks[1].key);
    assert_eq!(chunks[0].key, layout::redis_chunk(&g, 0, 10));
    let all = repo.list(&RepoKey::root()).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
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
    let left = repo
        .list(&layout::redis_generation_prefix(&g))
        .await
        .unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!repo.exists(&chunks[0].key).await.unwrap());
    assert!(repo.exists(&chunks[1].key).await.unwrap());
}

/// The marker is created once; a second `init_marker` returns the first one unchanged.
async fn marker_create_then_existing(repo: &Repository) {
    assert!(repo.read_marker().await.unwrap().is_none());
    let mut m = RepoMarker::new(RepoKind::Postgres);
    m.system_identifier = Some("7300000000000000001".into());
    let first = repo.init_marker(&m).await.unwrap();
    assert!(matches!(first, MarkerInit::Created(_)), "{first:?}");
    // A new repository gets a random id, recorded in the marker (format v2 binds every
    // object to it).
    let id = first.marker().repository_id.clone().unwrap();
    assert_eq!(id, repo.repository_id().await.unwrap().to_hex());
    let mut other = m.clone();
    other.system_identifier = Some("42".into());
    let second = repo.init_marker(&other).await.unwrap();
    assert!(matches!(second, MarkerInit::Existing(_)), "{second:?}");
    assert_eq!(second.marker(), first.marker());
    assert_eq!(
        repo.read_marker().await.unwrap().as_ref(),
        Some(first.marker())
    );
}

/// Encrypted objects read back with the identity, and without it only their stored bytes
/// can be verified.
async fn encrypted_round_trip(repo: &Repository, reopen: impl Fn(RepoOptions) -> Repository) {
    let _ = repo;
    let id = storage::keys::generate_identity();
    let with_keys = reopen(RepoOptions {
        recipients: vec![id.to_public()],
        identities: vec![id],
        ..opts()
    });
    let key = RepoKey::parse("secret/obj").unwrap();
    let d = data(3 * FRAME + 5, 11);
    let info = with_keys
        .put(
            &key,
            ContentKind::Other,
            Bytes::from(d.clone()),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    assert!(info.encrypted);
    assert!(with_keys.get(&key).await.unwrap() == d);
    let without = reopen(opts());
    assert!(
        without.get(&key).await.is_err(),
        "read without the identity"
    );
    let v = without.verify(&key).await.unwrap();
    assert!(!v.plaintext_verified);
}

// ---------------------------------------------------------------------------------------
// The backends
// ---------------------------------------------------------------------------------------

/// Credentials, region and `endpoint` of a test SeaweedFS, as store options.
fn s3_config(s3: &S3Server, endpoint: String) -> Vec<(String, String)> {
    vec![
        ("aws_access_key_id".into(), s3.access_key().into()),
        ("aws_secret_access_key".into(), s3.secret_key().into()),
        ("aws_region".into(), s3.region().into()),
        ("aws_endpoint".into(), endpoint),
    ]
}

/// A fresh, empty repository location of one kind.
enum Store {
    Memory(std::sync::Arc<object_store::memory::InMemory>),
    File(tempfile::TempDir),
    S3(Box<S3Server>),
    /// SeaweedFS over HTTPS (private CA): bodies go `UNSIGNED-PAYLOAD` there by default, so
    /// every check here also covers unsigned one-shot puts, multipart parts, conditional
    /// creates and deletes.
    S3Https(Box<S3Server>),
}

impl Store {
    fn memory() -> Store {
        Store::Memory(std::sync::Arc::new(object_store::memory::InMemory::new()))
    }

    fn file() -> Store {
        Store::File(tempfile::tempdir().unwrap())
    }

    fn s3() -> Store {
        Store::S3(Box::new(S3Server::start()))
    }

    fn s3_https() -> Store {
        Store::S3Https(Box::new(S3Server::start_with_https()))
    }

    /// A repository in this location; every call sees the same objects.
    fn repo(&self, o: RepoOptions) -> Repository {
        match self {
            // memory:// is a new store at every open, so share one through from_store.
            Store::Memory(m) => Repository::from_store(m.clone(), "conf", "memory://", o).unwrap(),
            Store::File(dir) => {
                Repository::open(&format!("file://{}", dir.path().join("repo").display()), o)
                    .unwrap()
            }
            Store::S3(s3) => {
                let mut store_config = s3_config(s3, s3.endpoint());
                store_config.push(("aws_allow_http".into(), "true".into()));
                let o = RepoOptions { store_config, ..o };
                Repository::open(&s3.repo_url("conf"), o).unwrap()
            }
            Store::S3Https(s3) => {
                let o = RepoOptions {
                    store_config: s3_config(s3, s3.https_endpoint().unwrap()),
                    ca_bundle: s3.ca_cert().map(Path::to_path_buf),
                    ..o
                };
                Repository::open(&s3.repo_url("conf"), o).unwrap()
            }
        }
    }

    /// Invariants of the store itself after a check.
    fn after(&self) {
        if let Store::File(dir) = self {
            check_local_tree(&dir.path().join("repo"));
        }
    }
}

/// No temporary file is left; files are 0600 and directories 0700.
fn check_local_tree(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", p.display());
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                assert!(!name.contains(".sbtmp-"), "temporary file left: {name}");
                stack.push(e.path());
            }
        }
    }
}

/// Objects of container versions 2 (SHA-256 content hash), 3 (BLAKE3) and 4 (XXH3-128)
/// side by side in one repository, written by handles of each version: each handle reads,
/// checks and verifies all, whole and streamed, and each object says which version it is.
async fn mixed_format_versions(repo: &Repository, reopen: impl Fn(RepoOptions) -> Repository) {
    let v2 = reopen(RepoOptions {
        format_version: 2,
        ..opts()
    });
    let v3 = reopen(RepoOptions {
        format_version: 3,
        ..opts()
    });
    let init = repo
        .init_marker(&RepoMarker::new(RepoKind::Postgres))
        .await
        .unwrap();
    assert!(matches!(init, MarkerInit::Created(_)), "{init:?}");
    assert_eq!(init.marker().format_version, 4);
    let keys: Vec<RepoKey> = (0..3)
        .map(|i| RepoKey::parse(&format!("t/v{}", i + 2)).unwrap())
        .collect();
    let d: Vec<Vec<u8>> = (0..3).map(|i| data(3 * FRAME + 17, 40 + i)).collect();
    for (i, w) in [&v2, &v3, repo].into_iter().enumerate() {
        let info = w
            .put(
                &keys[i],
                ContentKind::WalSegment,
                Bytes::from(d[i].clone()),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        assert_eq!(info.format_version, i as u16 + 2);
    }
    for r in [repo, &v2, &v3] {
        for i in 0..3 {
            let info = r.info(&keys[i]).await.unwrap();
            assert_eq!(info.format_version, i as u16 + 2, "{}", keys[i]);
            assert!(info.matches_content(&[&d[i]]), "{}", keys[i]);
            assert!(r.get(&keys[i]).await.unwrap() == d[i], "{}", keys[i]);
            let mut streamed = Vec::new();
            let mut rd = r.reader(&keys[i]).await.unwrap();
            while let Some(c) = rd.next().await {
                streamed.extend_from_slice(&c.unwrap());
            }
            assert!(streamed == d[i], "streamed {}", keys[i]);
            let v = r.verify(&keys[i]).await.unwrap();
            assert!(v.plaintext_verified);
            assert_eq!(v.info, info);
        }
    }
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn round_trip_sizes_and_streams() {
                let s = Store::$backend();
                super::round_trip_sizes_and_streams(&s.repo(opts())).await;
                s.after();
            }

            #[tokio::test]
            async fn create_new_never_overwrites() {
                let s = Store::$backend();
                super::create_new_never_overwrites(&s.repo(opts())).await;
                s.after();
            }

            #[tokio::test]
            async fn not_found_is_distinguishable() {
                let s = Store::$backend();
                super::not_found_is_distinguishable(&s.repo(opts())).await;
                s.after();
            }

            #[tokio::test]
            async fn list_list_dirs_and_delete() {
                let s = Store::$backend();
                super::list_list_dirs_and_delete(&s.repo(opts())).await;
                s.after();
            }

            #[tokio::test]
            async fn marker_create_then_existing() {
                let s = Store::$backend();
                super::marker_create_then_existing(&s.repo(opts())).await;
                s.after();
            }

            #[tokio::test]
            async fn mixed_format_versions() {
                let s = Store::$backend();
                super::mixed_format_versions(&s.repo(opts()), |o| s.repo(o)).await;
                s.after();
            }

            #[tokio::test]
            async fn encrypted_round_trip() {
                let s = Store::$backend();
                super::encrypted_round_trip(&s.repo(opts()), |o| s.repo(o)).await;
                s.after();
            }
        }
    };
}

conformance!(memory);
conformance!(file);
conformance!(s3);
conformance!(s3_https);
