//! `RepoOptions::from_env`: the agent's commands share encryption settings through the
//! environment. (One test in this binary: it changes process environment variables.)
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use storage::keys::{generate_identity, identity_to_string};
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository};

#[tokio::test]
async fn encryption_settings_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let id = generate_identity();
    let id_file = dir.path().join("id.txt");
    std::fs::write(&id_file, identity_to_string(&id)).unwrap();
    let url = format!("file://{}/repo", dir.path().display());

    std::env::remove_var("SYNCBRIDGE_RECIPIENTS_FILE");
    std::env::remove_var("SYNCBRIDGE_IDENTITY");
    std::env::set_var("SYNCBRIDGE_RECIPIENTS", format!(" {} ,", id.to_public()));
    let writer = Repository::open(&url, RepoOptions::from_env().unwrap()).unwrap();
    assert!(writer.encrypts());
    let key = RepoKey::parse("k").unwrap();
    writer
        .put(
            &key,
            ContentKind::Other,
            Bytes::from_static(b"secret"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    assert!(
        writer.get(&key).await.is_err(),
        "recipients alone cannot read"
    );

    std::env::remove_var("SYNCBRIDGE_RECIPIENTS");
    std::env::set_var("SYNCBRIDGE_IDENTITY", &id_file);
    let reader = Repository::open(&url, RepoOptions::from_env().unwrap()).unwrap();
    assert!(!reader.encrypts());
    assert_eq!(&reader.get(&key).await.unwrap()[..], b"secret");

    std::env::set_var("SYNCBRIDGE_RECIPIENTS", "age1notakey");
    let err = RepoOptions::from_env().err().unwrap().to_string();
    assert!(err.contains("age1notakey"), "{err}");
    std::env::remove_var("SYNCBRIDGE_RECIPIENTS");
    std::env::remove_var("SYNCBRIDGE_IDENTITY");
}
