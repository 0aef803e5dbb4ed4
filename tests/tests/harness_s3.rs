//! Smoke tests of the S3 part of the harness: object_store against SeaweedFS.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use syncbridge_tests::s3::{S3Server, TempRepo};

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn exercise(store: &dyn ObjectStore) {
    // Single PUT, GET, HEAD.
    let small = Path::from("smoke/small.bin");
    let small_data = pattern(1000, 1);
    store
        .put(&small, PutPayload::from(small_data.clone()))
        .await
        .unwrap();
    let got = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from(small_data));
    assert_eq!(store.head(&small).await.unwrap().size, 1000);

    // Multipart PUT of 13 MiB in 5 MiB parts (the S3 minimum part size).
    let big = Path::from("smoke/big.bin");
    let big_data = pattern(13 * 1024 * 1024, 2);
    let upload = store.put_multipart(&big).await.unwrap();
    let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 * 1024 * 1024);
    for chunk in big_data.chunks(1024 * 1024) {
        writer.wait_for_capacity(2).await.unwrap();
        writer.write(chunk);
    }
    writer.finish().await.unwrap();
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), big_data.len());
    assert!(got == big_data, "multipart object differs");
    // A ranged GET of the second part's start.
    let range = store
        .get_range(&big, 5 * 1024 * 1024..5 * 1024 * 1024 + 10)
        .await
        .unwrap();
    assert_eq!(&range[..], &big_data[5 * 1024 * 1024..5 * 1024 * 1024 + 10]);

    // List.
    let mut listed: Vec<(String, u64)> = store
        .list(Some(&Path::from("smoke")))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("smoke/big.bin".to_string(), big_data.len() as u64),
            ("smoke/small.bin".to_string(), 1000)
        ]
    );

    // Delete.
    store.delete(&small).await.unwrap();
    store.delete(&big).await.unwrap();
    assert!(matches!(
        store.get(&small).await,
        Err(object_store::Error::NotFound { .. })
    ));
    let left: Vec<_> = store
        .list(Some(&Path::from("smoke")))
        .try_collect()
        .await
        .unwrap();
    assert!(left.is_empty(), "objects left after delete: {left:?}");
}

#[tokio::test]
async fn seaweedfs_put_multipart_get_list_delete() {
    let s3 = S3Server::start();
    assert!((3..=63).contains(&s3.bucket().len()));
    assert_eq!(
        s3.repo_url("pg/main"),
        format!("s3://{}/pg/main", s3.bucket())
    );
    let env = s3.env();
    assert!(env.contains(&("AWS_ENDPOINT_URL".to_string(), s3.endpoint())));
    exercise(&s3.object_store()).await;
}

#[tokio::test]
async fn temp_repo_put_multipart_get_list_delete() {
    let repo = TempRepo::new();
    assert!(repo.url().starts_with("file:///"));
    exercise(&repo.object_store()).await;
}
