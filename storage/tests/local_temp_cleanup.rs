//! A writer killed mid-way (kill -9) leaves a hidden temporary file in a `file://`
//! repository. It is never listed as an object, and once abandoned (no write for hours)
//! listing removes it, so repeated crashes leave no garbage that grows forever.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository};

#[tokio::test]
async fn abandoned_temporary_files_are_removed_by_listing_and_fresh_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open(
        &format!("file://{}", dir.path().display()),
        RepoOptions::default(),
    )
    .unwrap();
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
    repo.put(
        &key,
        ContentKind::WalSegment,
        Bytes::from_static(b"wal"),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let wal_dir = dir.path().join("postgres/wal/00000001");
    let stale = wal_dir.join(".000000010000000000000002.sbtmp-00000000deadbeef");
    let fresh = wal_dir.join(".000000010000000000000003.sbtmp-00000000feedf00d");
    let unrelated = wal_dir.join(".keep");
    for p in [&stale, &fresh, &unrelated] {
        std::fs::write(p, b"half an object").unwrap();
    }
    let old = SystemTime::now() - Duration::from_secs(7 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&unrelated)
        .unwrap()
        .set_modified(old)
        .unwrap();

    let listed = repo.list(&RepoKey::root()).await.unwrap();
    let keys: Vec<String> = listed.iter().map(|m| m.key.to_string()).collect();
    assert_eq!(
        keys,
        vec![key.to_string()],
        "temporary files are not objects"
    );
    assert!(!stale.exists(), "an abandoned temporary file is removed");
    assert!(
        fresh.exists(),
        "a write that may still be running is left alone"
    );
    assert!(
        unrelated.exists(),
        "hidden files that are not ours are left alone"
    );
}
