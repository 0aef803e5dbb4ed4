//! The fault proxy in front of real SeaweedFS: object_store's retries ride out injected
//! failures and the proxy proves it injected them.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, PutPayload, RetryConfig, WriteMultipart};
use syncbridge_tests::proxy::{Fault, FaultProxy, FaultRule};
use syncbridge_tests::s3::S3Server;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn fast_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn object_store_retries_through_injected_faults() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let store = s3
        .object_store_builder()
        .with_endpoint(proxy.url())
        .with_retry(fast_retries())
        .build()
        .unwrap();

    proxy.fail_first("PUT", 3, Fault::SlowDown503);
    proxy.fail_first("POST", 2, Fault::InternalError500);
    proxy.fail_first("GET", 2, Fault::SlowDown503);
    proxy.fail_first("GET", 1, Fault::Reset);
    proxy.fail_first("HEAD", 1, Fault::Delay(Duration::from_millis(200)));
    proxy.fail_first("DELETE", 2, Fault::InternalError500);

    let small = Path::from("faults/small");
    store
        .put(&small, PutPayload::from(pattern(4096)))
        .await
        .unwrap();

    // Multipart: CreateMultipartUpload (POST), two part PUTs, CompleteMultipartUpload (POST).
    let big = Path::from("faults/big");
    let big_data = pattern(7 * 1024 * 1024);
    let mut writer =
        WriteMultipart::new_with_chunk_size(store.put_multipart(&big).await.unwrap(), 5 << 20);
    writer.write(&big_data);
    writer.finish().await.unwrap();

    let got = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from(pattern(4096)));
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert!(got == big_data, "multipart object differs after retries");
    assert_eq!(store.head(&big).await.unwrap().size, big_data.len() as u64);
    store.delete(&small).await.unwrap();
    store.delete(&big).await.unwrap();

    assert_eq!(proxy.injected("PUT", Fault::SlowDown503), 3);
    assert_eq!(proxy.injected("POST", Fault::InternalError500), 2);
    assert_eq!(proxy.injected("GET", Fault::SlowDown503), 2);
    assert_eq!(proxy.injected("GET", Fault::Reset), 1);
    assert_eq!(
        proxy.injected("HEAD", Fault::Delay(Duration::from_millis(200))),
        1
    );
    assert_eq!(proxy.injected("DELETE", Fault::InternalError500), 2);
    // Every injected failure cost exactly one extra request.
    assert_eq!(proxy.forwarded("PUT"), 3, "1 single PUT + 2 part PUTs");
    assert_eq!(proxy.forwarded("POST"), 2, "create + complete multipart");
    assert_eq!(proxy.forwarded("DELETE"), 2);
    // The objects really are gone upstream (checked directly, bypassing the proxy).
    let direct = s3.object_store();
    assert!(matches!(
        direct.head(&small).await,
        Err(object_store::Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_permanent_failure_surfaces_after_bounded_retries() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port());
    let mut retries = fast_retries();
    retries.max_retries = 3;
    let store = s3
        .object_store_builder()
        .with_endpoint(proxy.url())
        .with_retry(retries)
        .build()
        .unwrap();
    proxy.add_rule(FaultRule::method("PUT", Fault::SlowDown503).always());
    let err = store
        .put(&Path::from("never"), PutPayload::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(
        proxy.injected("PUT", Fault::SlowDown503),
        4,
        "1 try + 3 retries"
    );
    assert!(matches!(
        s3.object_store().head(&Path::from("never")).await,
        Err(object_store::Error::NotFound { .. })
    ));
}
