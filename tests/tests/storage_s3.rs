//! What only S3 has, against real SeaweedFS: injected faults through the harness's
//! FaultProxy, request counts, a missing bucket. The checks every store must pass (round
//! trips, create-new, listing, not-found, marker) are in `storage_conformance.rs`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository, RetryPolicy};
use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
use syncbridge_tests::s3::S3Server;

fn opts(s3: &S3Server, endpoint: &str) -> RepoOptions {
    RepoOptions {
        frame_size: 256 << 10,
        part_size: 5 << 20,
        workers: 2,
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            max_elapsed: Duration::from_secs(20),
        },
        store_config: vec![
            ("aws_access_key_id".into(), s3.access_key().into()),
            ("aws_secret_access_key".into(), s3.secret_key().into()),
            ("aws_region".into(), s3.region().into()),
            ("aws_endpoint".into(), endpoint.into()),
            ("aws_allow_http".into(), "true".into()),
        ],
        ..RepoOptions::default()
    }
}

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

#[tokio::test]
async fn s3_objects_arrive_intact_through_transient_faults() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let repo = Repository::open(&s3.repo_url("faults"), opts(&s3, &proxy.url())).unwrap();
    // The first requests of each kind fail, reset or stall.
    proxy.fail_first("PUT", 2, Fault::SlowDown503);
    proxy.fail_first("PUT", 1, Fault::Reset);
    proxy.fail_first("POST", 1, Fault::InternalError500);
    proxy.fail_first("POST", 1, Fault::Reset);
    proxy.fail_first("GET", 1, Fault::SlowDown503);
    proxy.fail_first("GET", 1, Fault::Reset);
    proxy.fail_first("HEAD", 1, Fault::InternalError500);
    proxy.fail_first("HEAD", 1, Fault::Delay(Duration::from_millis(300)));

    let small_key = RepoKey::parse("small").unwrap();
    let small = data(100_000, 3);
    repo.put(
        &small_key,
        ContentKind::Other,
        Bytes::from(small.clone()),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let big_key = RepoKey::parse("big").unwrap();
    let big = data(16 << 20, 4);
    let mut w = repo
        .writer(&big_key, ContentKind::Other, PutMode::CreateNew)
        .await
        .unwrap();
    for c in big.chunks(1 << 20) {
        w.write(Bytes::copy_from_slice(c)).await.unwrap();
    }
    w.finish().await.unwrap();
    assert!(repo.get(&small_key).await.unwrap() == small);
    assert!(repo.get(&big_key).await.unwrap() == big);
    let faulted = proxy.injected_total();
    assert!(faulted >= 8, "the proxy injected {faulted} faults");
}

#[tokio::test]
async fn s3_permanent_failure_is_a_clear_error_and_leaves_nothing() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let repo = Repository::open(&s3.repo_url("perm"), opts(&s3, &proxy.url())).unwrap();

    // Every single PUT fails.
    proxy.add_rule(FaultRule::method("PUT", Fault::InternalError500).always());
    let key = RepoKey::parse("never/small").unwrap();
    let err = repo
        .put(
            &key,
            ContentKind::Other,
            Bytes::from(data(1000, 1)),
            PutMode::CreateNew,
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("permanent PUT failure: {msg}");
    assert!(err.is_retryable(), "{msg}");
    assert!(msg.contains("never/small") && msg.contains("500"), "{msg}");

    // Every part upload fails: the multipart upload is aborted, nothing is visible.
    let key2 = RepoKey::parse("never/big").unwrap();
    let mut w = repo
        .writer(&key2, ContentKind::Other, PutMode::Overwrite)
        .await
        .unwrap();
    let res = async {
        for _ in 0..12 {
            w.write(Bytes::from(data(1 << 20, 9))).await?;
        }
        w.finish().await
    }
    .await;
    let msg = res.unwrap_err().to_string();
    eprintln!("permanent part failure: {msg}");
    assert!(msg.contains("never/big"), "{msg}");

    proxy.clear_rules();
    assert!(!repo.exists(&key).await.unwrap());
    assert!(!repo.exists(&key2).await.unwrap());
    assert!(repo.list(&RepoKey::root()).await.unwrap().is_empty());
}

#[tokio::test]
async fn s3_small_objects_take_one_put_large_ones_multipart() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let repo = Repository::open(&s3.repo_url("count"), opts(&s3, &proxy.url())).unwrap();
    let small = RepoKey::parse("small").unwrap();
    repo.put(
        &small,
        ContentKind::Other,
        Bytes::from(data(300_000, 1)),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    assert_eq!(proxy.requests("PUT"), 1, "one PUT");
    assert_eq!(proxy.requests("POST"), 0, "no multipart");
    assert_eq!(
        proxy.requests("HEAD"),
        0,
        "create-new is a conditional PUT, not HEAD + PUT"
    );

    proxy.clear_rules();
    let big = RepoKey::parse("big").unwrap();
    let d = data(14 << 20, 2);
    let info = repo
        .put(&big, ContentKind::Other, Bytes::from(d), PutMode::Overwrite)
        .await
        .unwrap();
    let parts = info.stored_len.div_ceil(5 << 20) as usize;
    assert_eq!(
        proxy.requests("POST"),
        2,
        "create + complete multipart upload"
    );
    assert_eq!(proxy.requests("PUT"), 1 + parts, "{parts} equal parts");
}

#[tokio::test]
async fn s3_missing_bucket_is_not_a_missing_object() {
    // wal-fetch exits 1 ("no such file", recovery ends) only on a true NotFound; a wrong
    // bucket must be a hard error instead.
    let s3 = S3Server::start();
    let repo = Repository::open("s3://no-such-bucket-sb/x", opts(&s3, &s3.endpoint())).unwrap();
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
    for e in [
        repo.get(&key).await.unwrap_err(),
        repo.info(&key).await.unwrap_err(),
    ] {
        eprintln!("{e}");
        assert!(!e.is_not_found(), "{e}");
        assert!(e.to_string().contains("bucket"), "{e}");
    }
    assert!(repo.exists(&key).await.is_err());
}
