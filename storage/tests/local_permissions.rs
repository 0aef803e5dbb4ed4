//! What a `file://` repository creates is private whatever the umask (files 0600,
//! directories 0700, the repository directory included), and group-readable (0640/0750)
//! only when the operator made the repository directory group-readable beforehand.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use bytes::Bytes;
use storage::{ContentKind, PutMode, RepoKey, RepoKind, RepoMarker, RepoOptions, Repository};

/// Writes the marker, a small object and a multipart one (several parts) under nested
/// directories, through the public API.
async fn fill(root: &Path) {
    let opts = RepoOptions {
        part_size: 5 << 20,
        ..RepoOptions::default()
    };
    let repo = Repository::open(&format!("file://{}", root.display()), opts).unwrap();
    repo.init_marker(&RepoMarker::new(RepoKind::Postgres))
        .await
        .unwrap();
    let small = RepoKey::parse("postgres/wal/00000001/000000010000000000000001").unwrap();
    repo.put(
        &small,
        ContentKind::WalSegment,
        Bytes::from_static(b"wal"),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let big = RepoKey::parse("postgres/base/20260101T000000Z/data.tar.000").unwrap();
    let mut w = repo
        .writer(&big, ContentKind::BaseBackupData, PutMode::Overwrite)
        .await
        .unwrap();
    // Incompressible, so the stored object spans several parts.
    let data = support::random_bytes(12 << 20, 0x9e37_79b9_7f4a_7c15);
    w.write(Bytes::from(data)).await.unwrap();
    w.finish().await.unwrap();
}

/// Every entry under `root` (root included) with its mode bits.
fn modes(root: &Path) -> Vec<(String, bool, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push((
            p.display().to_string(),
            m.is_dir(),
            m.permissions().mode() & 0o7777,
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn umask() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Umask:"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "Umask: unknown".into())
}

#[tokio::test]
async fn a_new_file_repository_is_private_files_0600_directories_0700() {
    let tmp = tempfile::tempdir().unwrap();
    // Two levels that do not exist yet: the repository directory and its parent.
    let root = tmp.path().join("backups/repo");
    fill(&root).await;
    let all = modes(&tmp.path().join("backups"));
    let files = all.iter().filter(|(_, dir, _)| !dir).count();
    assert!(files >= 3, "expected marker and two objects, got {all:?}");
    for (path, dir, mode) in &all {
        let want = if *dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{path} is {mode:o} ({})", umask());
    }
}

#[tokio::test]
async fn a_group_readable_repository_directory_gives_the_group_read_access_and_no_more() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    // What an operator does for a backup group: install -d -m 2750 -g backup DIR.
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(&root)
        .unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2750)).unwrap();
    fill(&root).await;
    let all = modes(&root);
    for (path, dir, mode) in &all {
        let want = if *dir { 0o2750 } else { 0o640 };
        assert_eq!(*mode, want, "{path} is {mode:o} ({})", umask());
    }
    assert!(
        all.iter().filter(|(_, dir, _)| !dir).count() >= 3,
        "{all:?}"
    );
}

#[tokio::test]
async fn an_existing_private_repository_directory_stays_private() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&root)
        .unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711)).unwrap();
    fill(&root).await;
    for (path, dir, mode) in modes(&root) {
        if path == root.display().to_string() {
            // The operator's directory is left as it was.
            assert_eq!(mode, 0o711);
            continue;
        }
        let want = if dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{path} is {mode:o} ({})", umask());
    }
}
