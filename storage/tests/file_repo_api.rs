//! API behaviour of file:// repositories that the conformance suite
//! (tests/tests/storage_conformance.rs: the same checks over memory://, file:// and S3)
//! does not cover.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository, StorageError};

fn small_opts() -> RepoOptions {
    RepoOptions {
        frame_size: 64 << 10,
        part_size: 5 << 20,
        workers: 2,
        ..RepoOptions::default()
    }
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
