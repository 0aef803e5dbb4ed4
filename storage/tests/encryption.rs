//! age encryption: off by default; when on, every object is encrypted, the marker says so,
//! and a reader without the identity gets a clear error.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use storage::keys::{generate_identity, recipient_fingerprint};
use storage::{
    ContentKind, MarkerInit, PutMode, RepoKey, RepoKind, RepoMarker, RepoOptions, Repository,
    StorageError,
};

fn open(url: &str, f: impl FnOnce(&mut RepoOptions)) -> Repository {
    let mut o = RepoOptions {
        frame_size: 32 << 10,
        ..RepoOptions::default()
    };
    f(&mut o);
    Repository::open(url, o).unwrap()
}

#[tokio::test]
async fn encrypted_round_trip_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let id = generate_identity();
    let other = generate_identity();
    let writer = open(&url, |o| o.recipients = vec![id.to_public()]);
    let key = RepoKey::parse("redis/gen/g1/snapshot.rdb").unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
    let info = writer
        .put(
            &key,
            ContentKind::RedisSnapshot,
            Bytes::from(data.clone()),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    assert!(info.encrypted);

    // The stored bytes do not contain the plaintext pattern.
    let stored = std::fs::read(dir.path().join(key.as_str())).unwrap();
    assert!(!stored.windows(64).any(|w| w == &data[..64]));

    // The recipients-only sidecar cannot read what it wrote.
    let e = writer.get(&key).await.unwrap_err();
    assert!(matches!(e, StorageError::IdentityRequired { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(key.as_str()) && msg.contains("--identity"),
        "{msg}"
    );
    assert!(
        msg.contains(&recipient_fingerprint(&id.to_public())),
        "{msg}"
    );

    // A wrong identity is named as such.
    let wrong = open(&url, |o| o.identities = vec![other.clone()]);
    let e = wrong.get(&key).await.unwrap_err();
    assert!(matches!(e, StorageError::Decrypt { .. }), "{e}");
    assert!(
        e.to_string().contains("none of the given identities"),
        "{e}"
    );

    // The right identity reads it.
    let reader = open(&url, |o| o.identities = vec![other, id.clone()]);
    assert!(reader.get(&key).await.unwrap() == data);
    let v = reader.verify(&key).await.unwrap();
    assert!(v.plaintext_verified);

    // Without identity, verify still checks the stored bytes.
    let v = writer.verify(&key).await.unwrap();
    assert!(!v.plaintext_verified);
    assert_eq!(v.info.sha256, info.sha256);

    // info() works without identity (callers compare SHA-256 before overwriting).
    assert_eq!(writer.info(&key).await.unwrap().sha256, info.sha256);
}

#[tokio::test]
async fn marker_records_encryption_and_refuses_mixing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let id = generate_identity();
    let enc = open(&url, |o| o.recipients = vec![id.to_public()]);
    let m = RepoMarker::new(RepoKind::Redis);
    let created = enc.init_marker(&m).await.unwrap();
    let MarkerInit::Created(written) = created else {
        panic!("expected a new marker")
    };
    let e = written.encryption.clone().unwrap();
    assert_eq!(e.scheme, "age-x25519");
    assert_eq!(e.recipients, vec![recipient_fingerprint(&id.to_public())]);

    // The marker is readable without identity.
    let plain = open(&url, |_| {});
    assert_eq!(plain.read_marker().await.unwrap(), Some(written.clone()));
    // Opening it for writing without recipients is refused.
    let err = plain.init_marker(&m).await.unwrap_err();
    assert!(matches!(err, StorageError::MarkerMismatch { .. }), "{err}");
    assert!(err.to_string().contains("encrypted"), "{err}");
    // With the same recipients it is the existing marker.
    assert_eq!(
        enc.init_marker(&m).await.unwrap(),
        MarkerInit::Existing(written)
    );

    // And a plain repository refuses recipients.
    let dir2 = tempfile::tempdir().unwrap();
    let url2 = format!("file://{}", dir2.path().display());
    open(&url2, |_| {}).init_marker(&m).await.unwrap();
    let err = open(&url2, |o| o.recipients = vec![id.to_public()])
        .init_marker(&m)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::MarkerMismatch { .. }), "{err}");
}
