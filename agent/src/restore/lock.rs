//! One restore per target directory: the directory itself is locked with `flock(2)` for the
//! whole restore, so a second restore into it fails at once instead of both passing the
//! emptiness check and interleaving their writes.
//!
//! The lock is taken on the directory's own file descriptor rather than on a lock file, so
//! nothing is written beside the target and no stale lock file can be left over or unlinked
//! under a holder (flock locks belong to the open file, and go away when the process does).
//! The holder's pid is found in `/proc/locks` for the message.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// A held lock on a directory; released when dropped.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    /// Locks the existing directory `dir`, failing at once (naming the holder when it can)
    /// if another process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        let file =
            File::open(dir).with_context(|| format!("opening {} to lock it", dir.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(DirLock { _lock: lock }),
            Err((_, Errno::EWOULDBLOCK)) => {
                let who = holder(&meta).map(|h| format!(" ({h})")).unwrap_or_default();
                bail!(
                    "another restore is writing into {}{who}: wait for it to finish, or choose another target",
                    dir.display()
                )
            }
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", dir.display())),
        }
    }

    /// Locks `dir` if it exists; `None` if it does not (nothing is created).
    pub fn acquire_if_exists(dir: &Path) -> Result<Option<DirLock>> {
        match std::fs::metadata(dir) {
            Ok(_) => DirLock::acquire(dir).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        }
    }
}

/// Creates `dir` (its missing parents with the default mode, itself with `mode`) unless it
/// exists, then locks it.
pub fn create_and_lock(dir: &Path, mode: u32) -> Result<DirLock> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            // Created by a concurrent restore: the lock below decides.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    DirLock::acquire(dir)
}

/// "held by pid N: program subcommand" of the process holding a flock on the file `meta` describes, from
/// `/proc/locks` (lines like `1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF`).
fn holder(meta: &std::fs::Metadata) -> Option<String> {
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4).map(|p| p.to_string()))
            .flatten()
    })?;
    // The program's name and first argument only: the rest may hold URLs or options not
    // meant for the output.
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .take(2)
                .enumerate()
                .map(|(i, a)| {
                    let a = String::from_utf8_lossy(a).into_owned();
                    match (i, a.rsplit_once('/')) {
                        (0, Some((_, name))) => name.to_string(),
                        _ => a,
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|c| !c.is_empty());
    Some(match cmd {
        Some(c) => format!("held by pid {pid}: {c}"),
        None => format!("held by pid {pid}"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn second_lock_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        // flock locks conflict between open file descriptions, even in one process.
        let err = DirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another restore"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
        assert!(DirLock::acquire_if_exists(&dir.path().join("no"))
            .unwrap()
            .is_none());
        let made = dir.path().join("a/b");
        let _lock = create_and_lock(&made, 0o700).unwrap();
        assert!(DirLock::acquire(&made).is_err());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&made).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }
}
