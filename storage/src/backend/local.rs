//! The local directory as a store (`file://`).
//!
//! Writes go to `.<name>.sbtmp-<random>` in the target directory, are fsynced, then
//! linked (create-new, atomic: fails if the name exists) or renamed (overwrite) into
//! place, and the directory is fsynced.
//!
//! # Permissions
//!
//! A repository holds copies of data directories that PostgreSQL keeps at 0700 (with
//! `pg_authid`'s password verifiers in them) and Redis snapshots, so what it creates is
//! private whatever the process umask: files 0600, directories 0700, the repository
//! directory included when this creates it. Group access follows PostgreSQL's own rule
//! for its data directory (`initdb --allow-group-access`, `GetDataDirectoryCreatePerm` in
//! `src/common/file_perm.c`): when the repository directory already exists and is
//! group-readable (created by the operator, e.g. `install -d -m 0750 -g backup DIR`,
//! optionally with the setgid bit so the group is inherited), new files are 0640 and new
//! directories 0750 (setgid kept). Nothing is ever world-accessible. Files written by
//! earlier versions keep their mode.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use rand::Rng;

use super::{ByteStream, ObjectMeta};
use crate::error::{Result, StorageError};
use crate::layout::RepoKey;
use crate::PutMode;

/// The modes of what the repository creates (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Modes {
    /// Of an object file.
    pub file: u32,
    /// Of a directory.
    pub dir: u32,
}

impl Modes {
    /// Owner only: the default.
    pub const PRIVATE: Modes = Modes {
        file: 0o600,
        dir: 0o700,
    };
    /// Owner, and the group of a repository directory that is group-readable.
    pub const GROUP: Modes = Modes {
        file: 0o640,
        dir: 0o750,
    };

    /// The modes for a repository at `root`: group access only when `root` exists and
    /// its group may read it.
    pub fn for_root(root: &FsPath) -> Modes {
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() && m.permissions().mode() & 0o040 != 0 => Modes::GROUP,
            _ => Modes::PRIVATE,
        }
    }
}

/// A directory tree as a store (see the module docs).
#[derive(Clone)]
pub(crate) struct LocalBackend {
    pub root: PathBuf,
}

pub(crate) struct LocalUpload {
    key: RepoKey,
    tmp: PathBuf,
    dest: PathBuf,
    file: Arc<File>,
    next_offset: u64,
}

pub(super) fn blocking<T: Send + 'static>(
    key: &RepoKey,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> impl std::future::Future<Output = Result<T>> {
    let key = key.clone();
    async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StorageError::Backend {
                key: key.to_string(),
                op: "file system task",
                retryable: false,
                attempts: 1,
                source: Box::new(e),
            })?
    }
}

/// What marks a temporary file in its name (`.<name>.sbtmp-<random>`).
const TMP_MARK: &str = ".sbtmp-";

/// A temporary file not written to for this long was left by a writer that was killed
/// (a live writer appends every part as it goes, and fsyncs and renames at the end).
const ABANDONED_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Removes a temporary file a killed writer left behind, once it is clearly abandoned,
/// so kill -9 leaves no garbage that grows forever. Listing calls this as it passes.
fn remove_if_abandoned(path: &FsPath) {
    let age = std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    if age.is_some_and(|a| a >= ABANDONED_TEMP_AGE) {
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a temporary file left by an interrupted write")
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "could not remove an abandoned temporary file: {e}")
            }
        }
    }
}

fn tmp_name(dest: &FsPath) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let r: u64 = rand::thread_rng().gen();
    dest.with_file_name(format!(".{name}{TMP_MARK}{r:016x}"))
}

fn fsync_dir(key: &RepoKey, dir: &FsPath) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(key, "fsync directory", dir, e))
}

/// Repository directories this process has seen exist. One that disappears afterwards is
/// never created again by a write: it was deleted or unmounted under a running stream, and
/// recreating it would store objects (and let a slot advance) in a tree without a marker
/// that no command can read.
static SEEN_ROOTS: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn root_seen(root: &FsPath, mark: bool) -> bool {
    let mut seen = SEEN_ROOTS.lock().unwrap_or_else(|p| p.into_inner());
    if mark {
        seen.insert(root.to_path_buf())
    } else {
        seen.contains(root)
    }
}

/// Creates missing directories between `root` and `dir` with `modes.dir`, fsyncing each
/// parent so the new entries survive a crash.
fn create_dirs(key: &RepoKey, root: &FsPath, dir: &FsPath, modes: Modes) -> Result<()> {
    if dir.is_dir() {
        root_seen(root, true);
        return Ok(());
    }
    if dir == root {
        if root_seen(root, false) {
            return Err(StorageError::RepositoryMissing {
                key: key.to_string(),
                location: root.display().to_string(),
            });
        }
        // The repository directory itself is created on first write (missing parents
        // too, private as well: they lead to the repository).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(modes.dir)
            .create(root)
            .map_err(|e| StorageError::io(key, "create repository directory", root, e))?;
        if let Some(parent) = root.parent() {
            fsync_dir(key, parent)?;
        }
        root_seen(root, true);
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent != dir && parent.starts_with(root) {
            create_dirs(key, root, parent, modes)?;
        }
    }
    match std::fs::DirBuilder::new().mode(modes.dir).create(dir) {
        Ok(()) => {
            set_dir_mode(key, dir, modes)?;
            if let Some(parent) = dir.parent() {
                fsync_dir(key, parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StorageError::io(key, "create directory", dir, e)),
    }
}

/// Gives a new directory exactly `modes.dir` whatever the umask (which can only have
/// removed bits), keeping the setgid bit the kernel copies from a setgid parent.
fn set_dir_mode(key: &RepoKey, dir: &FsPath, modes: Modes) -> Result<()> {
    let current = std::fs::metadata(dir)
        .map_err(|e| StorageError::io(key, "stat", dir, e))?
        .permissions()
        .mode();
    let wanted = modes.dir | (current & 0o2000);
    if current & 0o7777 != wanted {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(wanted))
            .map_err(|e| StorageError::io(key, "set permissions", dir, e))?;
    }
    Ok(())
}

/// Creates a new temporary file with exactly `modes.file` (never an existing one).
fn create_tmp(tmp: &FsPath, modes: Modes) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(modes.file)
        .open(tmp)?;
    // The umask may have removed a group bit that was asked for.
    if modes != Modes::PRIVATE {
        f.set_permissions(std::fs::Permissions::from_mode(modes.file))?;
    }
    Ok(f)
}

/// Moves the fsynced temporary file into place and fsyncs the directory.
fn publish(key: &RepoKey, tmp: &FsPath, dest: &FsPath, mode: PutMode) -> Result<()> {
    let res = match mode {
        PutMode::Overwrite => std::fs::rename(tmp, dest)
            .map_err(|e| StorageError::io(key, "rename into place", dest, e)),
        PutMode::CreateNew => match std::fs::hard_link(tmp, dest) {
            Ok(()) => {
                let _ = std::fs::remove_file(tmp);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(tmp);
                Err(StorageError::AlreadyExists {
                    key: key.to_string(),
                })
            }
            // File systems without hard links: check, then rename (not atomic).
            Err(_) if !dest.exists() => std::fs::rename(tmp, dest)
                .map_err(|e| StorageError::io(key, "rename into place", dest, e)),
            Err(_) => {
                let _ = std::fs::remove_file(tmp);
                Err(StorageError::AlreadyExists {
                    key: key.to_string(),
                })
            }
        },
    };
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    res?;
    if let Some(dir) = dest.parent() {
        fsync_dir(key, dir)?;
    }
    Ok(())
}

impl LocalBackend {
    pub(super) fn path(&self, key: &RepoKey) -> PathBuf {
        if key.is_root() {
            self.root.clone()
        } else {
            self.root.join(key.as_str())
        }
    }

    pub(super) async fn put(&self, key: &RepoKey, data: Vec<Bytes>, mode: PutMode) -> Result<()> {
        let (root, dest, k) = (self.root.clone(), self.path(key), key.clone());
        blocking(key, move || {
            let dir = dest.parent().unwrap_or(&root).to_path_buf();
            let modes = Modes::for_root(&root);
            create_dirs(&k, &root, &dir, modes)?;
            if mode == PutMode::CreateNew && dest.exists() {
                return Err(StorageError::AlreadyExists { key: k.to_string() });
            }
            let tmp = tmp_name(&dest);
            let write = || -> std::io::Result<()> {
                let mut f = create_tmp(&tmp, modes)?;
                for piece in &data {
                    f.write_all(piece)?;
                }
                f.sync_all()
            };
            if let Err(e) = write() {
                let _ = std::fs::remove_file(&tmp);
                return Err(StorageError::io(&k, "write", &tmp, e));
            }
            publish(&k, &tmp, &dest, mode)
        })
        .await
    }

    pub(super) async fn start_upload(&self, key: &RepoKey) -> Result<LocalUpload> {
        let (root, dest, k) = (self.root.clone(), self.path(key), key.clone());
        blocking(key, move || {
            let dir = dest.parent().unwrap_or(&root).to_path_buf();
            let modes = Modes::for_root(&root);
            create_dirs(&k, &root, &dir, modes)?;
            let tmp = tmp_name(&dest);
            let file =
                create_tmp(&tmp, modes).map_err(|e| StorageError::io(&k, "create", &tmp, e))?;
            Ok(LocalUpload {
                key: k,
                tmp,
                dest,
                file: Arc::new(file),
                next_offset: 0,
            })
        })
        .await
    }

    pub(super) async fn head(&self, key: &RepoKey) -> Result<Option<ObjectMeta>> {
        let (path, k, root) = (self.path(key), key.clone(), self.root.clone());
        blocking(key, move || match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: k,
                size: m.len(),
                last_modified: m.modified().map(DateTime::<Utc>::from).unwrap_or_default(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                check_root(&k, &root)?;
                Ok(None)
            }
            Err(e) => Err(StorageError::io(&k, "stat", &path, e)),
        })
        .await
    }

    pub(super) async fn get_range(
        &self,
        key: &RepoKey,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        let (path, k, root) = (self.path(key), key.clone(), self.root.clone());
        blocking(key, move || {
            let f = open_existing(&k, &path, &root)?;
            let len = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(0);
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, range.start)
                .map_err(|e| StorageError::io(&k, "read", &path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    pub(super) async fn get_stream(
        &self,
        key: &RepoKey,
        offset: u64,
    ) -> Result<(ByteStream, u64, Option<String>)> {
        let (path, k) = (self.path(key), key.clone());
        let root = self.root.clone();
        let f = blocking(key, move || open_existing(&k, &path, &root)).await?;
        let size = f
            .metadata()
            .map_err(|e| StorageError::io(key, "stat", &self.path(key), e))?
            .len();
        let file = Arc::new(f);
        let k = key.clone();
        let path = self.path(key);
        const CHUNK: u64 = 1 << 20;
        let stream = futures::stream::try_unfold(offset, move |pos| {
            let (file, k, path) = (file.clone(), k.clone(), path.clone());
            async move {
                if pos >= size {
                    return Ok(None);
                }
                let n = CHUNK.min(size - pos) as usize;
                let k2 = k.clone();
                let buf = blocking(&k, move || {
                    let mut buf = vec![0u8; n];
                    let mut filled = 0;
                    while filled < n {
                        match file.read_at(&mut buf[filled..], pos + filled as u64) {
                            Ok(0) => break,
                            Ok(m) => filled += m,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => return Err(StorageError::io(&k2, "read", &path, e)),
                        }
                    }
                    buf.truncate(filled);
                    Ok(buf)
                })
                .await?;
                if buf.is_empty() {
                    // The file shrank under us: end here, the reader reports truncation.
                    return Ok(None);
                }
                let next = pos + buf.len() as u64;
                Ok(Some((Bytes::from(buf), next)))
            }
        })
        .boxed();
        Ok((stream, size, None))
    }

    pub(super) async fn list(&self, prefix: &RepoKey) -> Result<Vec<ObjectMeta>> {
        let (root, start, k) = (self.root.clone(), self.path(prefix), prefix.clone());
        blocking(prefix, move || {
            let mut out = Vec::new();
            let mut stack = vec![start];
            while let Some(p) = stack.pop() {
                let meta = match std::fs::metadata(&p) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(StorageError::io(&k, "stat", &p, e)),
                };
                if meta.is_dir() {
                    let rd =
                        std::fs::read_dir(&p).map_err(|e| StorageError::io(&k, "list", &p, e))?;
                    for entry in rd {
                        let entry = entry.map_err(|e| StorageError::io(&k, "list", &p, e))?;
                        // Temporary files (and anything else hidden) are not objects.
                        let name = entry.file_name();
                        let name = name.to_string_lossy();
                        if name.starts_with('.') {
                            if name.contains(TMP_MARK) {
                                remove_if_abandoned(&entry.path());
                            }
                            continue;
                        }
                        stack.push(entry.path());
                    }
                } else if meta.is_file() {
                    let Ok(rel) = p.strip_prefix(&root) else {
                        continue;
                    };
                    let Some(rel) = rel.to_str() else { continue };
                    let Ok(key) = RepoKey::parse(rel) else {
                        continue;
                    };
                    if key.is_root() || !key.starts_with(&k) {
                        continue;
                    }
                    out.push(ObjectMeta {
                        key,
                        size: meta.len(),
                        last_modified: meta
                            .modified()
                            .map(DateTime::<Utc>::from)
                            .unwrap_or_default(),
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    /// The immediate sub-directories of `prefix`, unsorted.
    pub(super) async fn list_dirs(&self, prefix: &RepoKey) -> Result<Vec<RepoKey>> {
        let (dir, k) = (self.path(prefix), prefix.clone());
        blocking(prefix, move || {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(StorageError::io(&k, "list", &dir, e)),
            };
            let mut out = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|e| StorageError::io(&k, "list", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || !entry.path().is_dir() {
                    continue;
                }
                let text = if k.is_root() {
                    name
                } else {
                    format!("{}/{name}", k.as_str())
                };
                if let Ok(key) = RepoKey::parse(&text) {
                    out.push(key);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn delete(&self, key: &RepoKey) -> Result<()> {
        let (path, k) = (self.path(key), key.clone());
        blocking(key, move || match std::fs::remove_file(&path) {
            Ok(()) => match path.parent() {
                Some(dir) => fsync_dir(&k, dir),
                None => Ok(()),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(&k, "delete", &path, e)),
        })
        .await
    }
}

/// A missing object in a missing repository directory is not "not found": the directory
/// may be an unmounted volume or a typo, and `wal-fetch` must not end recovery on that.
fn check_root(key: &RepoKey, root: &FsPath) -> Result<()> {
    if root.is_dir() {
        Ok(())
    } else {
        Err(StorageError::RepositoryMissing {
            key: key.to_string(),
            location: root.display().to_string(),
        })
    }
}

fn open_existing(key: &RepoKey, path: &FsPath, root: &FsPath) -> Result<File> {
    match File::open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            check_root(key, root)?;
            Err(StorageError::NotFound {
                key: key.to_string(),
            })
        }
        Err(e) => Err(StorageError::io(key, "open", path, e)),
    }
}

/// Objects larger than this have their parts' write-out started as they are written
/// ([`start_writeback`]): large snapshots. WAL segments and base backup chunks stay
/// below it and are left to the fsync in `complete`, which costs them nothing more.
const WRITEBACK_AFTER: u64 = 64 << 20;

/// Starts writing a range out to disk without waiting for it and drops its pages that are
/// already clean (`posix_fadvise(DONTNEED)` starts the write-out of dirty pages, as
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` does; PostgreSQL's `pg_flush_data` falls back
/// to it). Left alone, the kernel starts only once a tenth of memory is dirty, so a large
/// object's whole content waited for the fsync in `complete`, and the object filled the
/// page cache with pages nobody reads back (fresh pages are most of the cost of a
/// buffered write on a VM). Only a hint: errors are ignored, `complete` fsyncs.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        offset,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

impl LocalUpload {
    pub(super) fn put_part(&mut self, data: Vec<Bytes>) -> BoxFuture<'static, Result<()>> {
        let offset = self.next_offset;
        self.next_offset += data.iter().map(|b| b.len() as u64).sum::<u64>();
        let hint = self.next_offset > WRITEBACK_AFTER;
        let (file, key, tmp) = (self.file.clone(), self.key.clone(), self.tmp.clone());
        blocking(&self.key.clone(), move || {
            let mut at = offset;
            for piece in &data {
                file.write_all_at(piece, at)
                    .map_err(|e| StorageError::io(&key, "write", &tmp, e))?;
                at += piece.len() as u64;
            }
            if hint {
                // Everything so far: starts this part's write-out and lets go of the
                // pages of earlier parts already on disk.
                start_writeback(&file, 0, at);
            }
            Ok(())
        })
        .boxed()
    }

    pub(super) async fn complete(self, mode: PutMode) -> Result<()> {
        let key = self.key.clone();
        blocking(&key, move || {
            if let Err(e) = self.file.sync_all() {
                let _ = std::fs::remove_file(&self.tmp);
                return Err(StorageError::io(&self.key, "fsync", &self.tmp, e));
            }
            publish(&self.key, &self.tmp, &self.dest, mode)
        })
        .await
    }

    pub(super) async fn abort(self) -> Result<()> {
        let key = self.key.clone();
        blocking(&key, move || match std::fs::remove_file(&self.tmp) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(
                &self.key,
                "remove temporary",
                &self.tmp,
                e,
            )),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_deleted_repository_directory_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let b = LocalBackend { root: root.clone() };
        let key = RepoKey::parse("postgres/wal/00000001/x").unwrap();
        b.put(&key, vec![Bytes::from_static(b"a")], PutMode::Overwrite)
            .await
            .unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        let err = b
            .put(&key, vec![Bytes::from_static(b"b")], PutMode::Overwrite)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::RepositoryMissing { .. }),
            "{err}"
        );
        assert!(b.start_upload(&key).await.is_err());
        assert!(!root.exists());
    }
}
