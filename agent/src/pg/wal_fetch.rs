//! `postgres wal-fetch %f %p`: the `restore_command` side of the repository.
//!
//! PostgreSQL reads the exit status (docs, "Recovering Using a Continuous Archive Backup"):
//! non-zero means "not archived", and recovery ends there — so exit 1 is only ever used when
//! the file truly does not exist. An exit status above 125 makes the startup process stop
//! with FATAL instead, which is what a storage outage or a corrupt object must do, or
//! recovery would end early at the wrong point. Files are written atomically (temp file,
//! fsync, rename) so a crash never leaves a half-written segment at `%p`.
//!
//! The newest partial of a timeline is served as its segment when no later WAL exists on
//! that timeline (it is zero-padded to the segment size, like `pg_receivewal`'s `.partial`).
//! After serving a segment the next `--prefetch` segments are downloaded in the background
//! into a spool directory beside `%p`, so replay is not bound by one download at a time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use storage::layout::{self, WalObject};
use storage::{RepoKey, Repository, StorageError};
use wire::pg::{SegmentName, WalFileName, WalSegmentSize};

/// Exit status for "cannot tell / must not continue": above 125, so recovery stops FATAL.
pub const EXIT_FATAL: u8 = 200;
/// Exit status for "not in the repository".
pub const EXIT_NOT_FOUND: u8 = 1;

const SPOOL_DIR: &str = ".syncbridge-prefetch";

/// Outcome of a fetch that did not fail.
pub enum Fetched {
    /// Written to the target.
    Written {
        /// Size of a WAL segment, learnt from the object (for prefetching).
        segment_size: Option<WalSegmentSize>,
    },
    /// Truly absent.
    NotFound,
}

/// Parses `%f`: a segment or a history file (any valid segment size accepts the name; the
/// size only matters for what comes next).
fn parse_name(name: &str) -> Result<WalFileName> {
    // 1 MiB segments allow the widest "seg" part, so every real name parses.
    let lenient = WalSegmentSize::new(1024 * 1024)?;
    WalFileName::parse(name, lenient)
        .with_context(|| format!("{name:?} is not a WAL segment or history file name"))
}

fn storage_name(seg: SegmentName) -> Result<layout::WalSegmentName> {
    Ok(layout::WalSegmentName::parse(&seg.to_string())?)
}

/// Retries retryable storage errors a few times; the last error is returned.
async fn with_retries<T, F, Fut>(what: &str, mut f: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if e.is_retryable() && attempt < 4 => {
                tracing::warn!("{what}: {e}; retrying (attempt {attempt})");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Looks for the newest partial of `seg`, if `seg` is the last WAL on its timeline.
async fn last_partial(
    repo: &Repository,
    seg: &layout::WalSegmentName,
) -> Result<Option<RepoKey>, StorageError> {
    let prefix = layout::wal_timeline_prefix(seg.timeline());
    let listed = with_retries("listing WAL", || repo.list(&prefix)).await?;
    let mut newest: Option<(u32, RepoKey)> = None;
    for meta in listed {
        match layout::parse_wal_key(&meta.key) {
            Some(WalObject::Segment(s)) if s > *seg => return Ok(None),
            Some(WalObject::Partial { segment, .. }) if segment > *seg => return Ok(None),
            Some(WalObject::Partial {
                segment,
                end_offset,
            }) if segment == *seg && newest.as_ref().is_none_or(|(o, _)| end_offset > *o) => {
                newest = Some((end_offset, meta.key));
            }
            _ => {}
        }
    }
    Ok(newest.map(|(_, k)| k))
}

/// Fetches `name` into `target` atomically.
pub async fn fetch(repo: &Repository, name: &str, target: &Path) -> Result<Fetched> {
    let parsed = parse_name(name)?;
    let key = match parsed {
        WalFileName::History(t) => layout::timeline_history(layout::TimelineId::new(t.get())?),
        WalFileName::Segment(s) => layout::wal_segment(&storage_name(s)?),
    };
    let data = match with_retries(&format!("fetching {key}"), || repo.get(&key)).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            let WalFileName::Segment(s) = parsed else {
                return Ok(Fetched::NotFound);
            };
            let Some(partial) = last_partial(repo, &storage_name(s)?)
                .await
                .context("looking for a partial segment")?
            else {
                return Ok(Fetched::NotFound);
            };
            tracing::info!(%partial, "serving the newest partial as {name}: it is the last WAL of its timeline");
            with_retries(&format!("fetching {partial}"), || repo.get(&partial))
                .await
                .with_context(|| format!("fetching {partial}"))?
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("fetching {key}"))),
    };
    let (data, segment_size) = match parsed {
        WalFileName::Segment(_) => {
            let size = segment_size_of(&data)
                .with_context(|| format!("reading the WAL page header of {key}"))?;
            (pad_to(data, size), Some(size))
        }
        WalFileName::History(_) => (data, None),
    };
    write_atomically(target, &data)?;
    Ok(Fetched::Written { segment_size })
}

/// The segment size recorded in the long page header that starts every WAL segment
/// (`XLogLongPageHeaderData.xlp_seg_size`, `src/include/access/xlog_internal.h`), so a
/// partial can be padded without knowing the cluster's settings.
fn segment_size_of(data: &[u8]) -> Result<WalSegmentSize> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    let field = |at: usize, n: usize| {
        data.get(at..at + n)
            .context("shorter than a WAL page header")
    };
    let info = field(2, 2)?;
    let size = field(32, 4)?;
    for (info, size) in [
        (
            u16::from_le_bytes([info[0], info[1]]),
            u32::from_le_bytes([size[0], size[1], size[2], size[3]]),
        ),
        (
            u16::from_be_bytes([info[0], info[1]]),
            u32::from_be_bytes([size[0], size[1], size[2], size[3]]),
        ),
    ] {
        if info & XLP_LONG_HEADER != 0 {
            if let Ok(s) = WalSegmentSize::new(u64::from(size)) {
                return Ok(s);
            }
        }
    }
    anyhow::bail!("no long page header with a valid segment size: not a WAL segment")
}

/// Zero-pads a partial segment to the full size (a complete one is returned as is).
fn pad_to(data: Bytes, size: WalSegmentSize) -> Bytes {
    let full = size.bytes() as usize;
    if data.len() >= full {
        return data;
    }
    let mut v = Vec::with_capacity(full);
    v.extend_from_slice(&data);
    v.resize(full, 0);
    Bytes::from(v)
}

/// Writes via a temp file in the same directory, fsyncs, renames.
pub fn write_atomically(target: &Path, data: &Bytes) -> Result<()> {
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .context("target path has no file name")?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.syncbridge-tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, target)
        .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    Ok(())
}

fn spool_dir(target: &Path) -> PathBuf {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(SPOOL_DIR)
}

/// Runs `wal-fetch` and maps the outcome to PostgreSQL's exit-status contract.
pub async fn run(
    repo: &Repository,
    repo_url: &str,
    name: &str,
    target: &Path,
    prefetch: usize,
) -> ExitCode {
    let spool = spool_dir(target);
    // Served from the prefetch spool if a background fetch already has it.
    let spooled = spool.join(name);
    if spooled.is_file() && std::fs::rename(&spooled, target).is_ok() {
        tracing::debug!(name, "served from the prefetch spool");
        let size = std::fs::metadata(target)
            .ok()
            .and_then(|m| WalSegmentSize::new(m.len()).ok());
        if let Some(Ok(WalFileName::Segment(s))) = size.map(|size| WalFileName::parse(name, size)) {
            start_prefetch(repo_url, s, prefetch, &spool);
        }
        return ExitCode::SUCCESS;
    }
    match fetch(repo, name, target).await {
        Ok(Fetched::Written { segment_size }) => {
            if let (Some(size), Ok(WalFileName::Segment(_))) = (segment_size, parse_name(name)) {
                if let Ok(WalFileName::Segment(s)) = WalFileName::parse(name, size) {
                    start_prefetch(repo_url, s, prefetch, &spool);
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Fetched::NotFound) => {
            tracing::info!(name, "not in the repository");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(e) => {
            eprintln!("error: wal-fetch {name}: {e:#}");
            eprintln!("(exiting with {EXIT_FATAL} so that PostgreSQL stops instead of ending recovery at the wrong point)");
            ExitCode::from(EXIT_FATAL)
        }
    }
}

/// Starts a detached `postgres wal-prefetch` for the segments after `seg`.
fn start_prefetch(repo_url: &str, seg: SegmentName, count: usize, spool: &Path) {
    if count == 0 {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let _ = std::fs::create_dir_all(spool);
    let spawned = std::process::Command::new(exe)
        .args(["postgres", "wal-prefetch", "--repo", repo_url, "--spool"])
        .arg(spool)
        .args([
            "--after",
            &seg.to_string(),
            "--segment-size",
            &seg.size().bytes().to_string(),
            "--count",
            &count.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        tracing::warn!("could not start WAL prefetch: {e}");
    }
}

/// The background half: fetches up to `count` segments after `after` into `spool`, in
/// parallel, skipping ones already there or being fetched; stops at the first missing one.
pub async fn prefetch(
    repo: &Repository,
    spool: &Path,
    after: SegmentName,
    count: usize,
) -> Result<()> {
    std::fs::create_dir_all(spool).with_context(|| format!("creating {}", spool.display()))?;
    // Spooled segments at or before `after` will never be asked for again.
    if let Ok(entries) = std::fs::read_dir(spool) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Ok(s) = SegmentName::parse(n.trim_end_matches(".lock"), after.size()) {
                if s.timeline() == after.timeline() && s.segno() <= after.segno() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let mut names = Vec::new();
    let mut cur = after;
    for _ in 0..count {
        let Some(next) = cur.next() else { break };
        names.push(next);
        cur = next;
    }
    let tasks = names.into_iter().map(|seg| {
        let repo = repo.clone();
        let spool = spool.to_path_buf();
        async move {
            let name = seg.to_string();
            let dest = spool.join(&name);
            let lock = spool.join(format!("{name}.lock"));
            if dest.exists() {
                return;
            }
            if let Ok(meta) = std::fs::metadata(&lock) {
                let stale = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(300));
                if !stale {
                    return;
                }
                let _ = std::fs::remove_file(&lock);
            }
            if std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
                .is_err()
            {
                return;
            }
            let Ok(key) = storage_name(seg).map(|s| layout::wal_segment(&s)) else {
                return;
            };
            if let Ok(data) = repo.get(&key).await {
                let _ = write_atomically(&dest, &data);
            }
            let _ = std::fs::remove_file(&lock);
        }
    });
    futures::future::join_all(tasks).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn long_header(seg_size: u32) -> Vec<u8> {
        let mut v = vec![0u8; 40];
        v[0..2].copy_from_slice(&0xD116u16.to_le_bytes()); // xlp_magic (PG 17)
        v[2..4].copy_from_slice(&0x0002u16.to_le_bytes()); // XLP_LONG_HEADER
        v[32..36].copy_from_slice(&seg_size.to_le_bytes());
        v[36..40].copy_from_slice(&8192u32.to_le_bytes());
        v
    }

    #[test]
    fn segment_size_from_the_long_page_header() {
        assert_eq!(
            segment_size_of(&long_header(16 << 20)).unwrap().bytes(),
            16 << 20
        );
        assert_eq!(
            segment_size_of(&long_header(1 << 30)).unwrap().bytes(),
            1 << 30
        );
        assert!(segment_size_of(&long_header(3 << 20)).is_err());
        assert!(segment_size_of(&[0u8; 10]).is_err());
        let mut short_header = long_header(16 << 20);
        short_header[2] = 0;
        assert!(segment_size_of(&short_header).is_err(), "not a long header");
    }

    #[test]
    fn partials_are_zero_padded() {
        let size = WalSegmentSize::new(1 << 20).unwrap();
        let padded = pad_to(Bytes::from_static(b"abc"), size);
        assert_eq!(padded.len(), 1 << 20);
        assert_eq!(&padded[..3], b"abc");
        assert!(padded[3..].iter().all(|&b| b == 0));
        let full = Bytes::from(vec![1u8; 1 << 20]);
        assert_eq!(pad_to(full.clone(), size), full);
    }

    #[test]
    fn names_restore_command_asks_for() {
        assert!(matches!(
            parse_name("00000002.history").unwrap(),
            WalFileName::History(_)
        ));
        assert!(matches!(
            parse_name("000000010000000100000FFF").unwrap(),
            WalFileName::Segment(_)
        ));
        assert!(parse_name("RECOVERYXLOG").is_err());
        assert!(parse_name("../../etc/passwd").is_err());
    }
}
