//! The object stores under a repository: any `object_store` backend (S3 and compatibles,
//! GCS, Azure, in-memory) or the local file system, which we implement ourselves because
//! `object_store`'s `LocalFileSystem` renames into place without fsyncing the file or the
//! directory, so a power loss could leave a named but empty object.
//!
//! This layer maps store errors to `StorageError`s that name the key and say whether they
//! are transient, and adds a bounded retry with jittered exponential backoff on top of
//! `object_store`'s own per-request retries (which, for instance, do not retry a PUT whose
//! connection was reset after the request was sent, or a GET body cut off mid-stream).

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{Attributes, GetOptions, GetRange, ObjectStore, PutOptions, PutPayload};
use rand::Rng;

use crate::error::{Result, StorageError};
use crate::layout::RepoKey;
use crate::PutMode;

/// How persistently transient failures are retried. Bounded both in attempts and in
/// time, so a dead store surfaces as an error instead of a hang.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts of one operation, including the first.
    pub max_attempts: u32,
    /// First backoff; later ones double up to `max_backoff`, with full jitter.
    pub initial_backoff: Duration,
    /// Cap of one backoff.
    pub max_backoff: Duration,
    /// No new attempt starts after this much time since the first.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        let floor = self.initial_backoff / 2;
        let span = exp.saturating_sub(floor);
        floor + span.mul_f64(rand::thread_rng().gen::<f64>())
    }

    /// Runs `op` until it succeeds, fails permanently, or the policy is exhausted.
    pub(crate) async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let delay = self.backoff(attempt - 1);
                    if !e.is_retryable()
                        || attempt >= self.max_attempts
                        || start.elapsed() + delay > self.max_elapsed
                    {
                        return Err(with_attempts(e, attempt));
                    }
                    tracing::warn!(error = %e, attempt, ?delay, "transient storage error, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn with_attempts(e: StorageError, n: u32) -> StorageError {
    match e {
        StorageError::Backend {
            key,
            op,
            retryable,
            source,
            ..
        } => StorageError::Backend {
            key,
            op,
            retryable,
            attempts: n,
            source,
        },
        other => other,
    }
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key.
    pub key: RepoKey,
    /// Stored size in bytes (container overhead included).
    pub size: u64,
    /// When the store last wrote it.
    pub last_modified: DateTime<Utc>,
}

/// A stream of stored bytes.
pub(crate) type ByteStream = BoxStream<'static, Result<Bytes>>;

/// An in-progress multipart upload.
pub(crate) enum Upload {
    Store {
        key: RepoKey,
        upload: Box<dyn object_store::MultipartUpload>,
    },
    Local(LocalUpload),
}

impl Upload {
    /// Starts uploading the next part; parts are numbered in call order.
    pub fn put_part(&mut self, data: Vec<Bytes>) -> BoxFuture<'static, Result<()>> {
        match self {
            Upload::Store { key, upload } => {
                let key = key.clone();
                let fut = upload.put_part(data.into_iter().collect::<PutPayload>());
                async move { fut.await.map_err(|e| map_err(&key, "upload part", e)) }.boxed()
            }
            Upload::Local(l) => l.put_part(data),
        }
    }

    pub async fn complete(self, mode: PutMode) -> Result<()> {
        match self {
            Upload::Store { key, mut upload } => upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|e| map_err(&key, "complete multipart upload", e)),
            Upload::Local(l) => l.complete(mode).await,
        }
    }

    pub async fn abort(self) -> Result<()> {
        match self {
            Upload::Store { key, mut upload } => upload
                .abort()
                .await
                .map_err(|e| map_err(&key, "abort multipart upload", e)),
            Upload::Local(l) => l.abort().await,
        }
    }
}

/// Where objects live.
#[derive(Clone)]
pub(crate) enum Backend {
    Store(StoreBackend),
    Local(LocalBackend),
}

#[derive(Clone)]
pub(crate) struct StoreBackend {
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store (no leading or trailing slash), may be empty.
    pub prefix: String,
    /// Whether the store honours `If-None-Match: *` (object_store `PutMode::Create`).
    pub conditional_create: bool,
    /// Attributes (e.g. storage class) set on every write.
    pub attributes: Attributes,
    /// Set once the bucket is known to exist: until then a 404 without a body (HEAD) is
    /// double-checked, because "no such bucket" must not read as "no such object".
    pub bucket_seen: Arc<std::sync::atomic::AtomicBool>,
}

impl StoreBackend {
    fn saw_bucket(&self) {
        self.bucket_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// After a 404, makes sure it meant "no such object": a listing of the key's parent
    /// fails if the bucket (or container) itself is missing.
    async fn check_bucket(&self, key: &RepoKey) -> Result<()> {
        if self.bucket_seen.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let parent = match key.as_str().rsplit_once('/') {
            Some((p, _)) => RepoKey::parse(p)?,
            None => RepoKey::root(),
        };
        let path = self.path(&parent);
        let query = (!path.as_ref().is_empty()).then_some(&path);
        match self.store.list_with_delimiter(query).await {
            Ok(_) => {
                self.saw_bucket();
                Ok(())
            }
            Err(e) => Err(missing_bucket(key, e)),
        }
    }

    fn path(&self, key: &RepoKey) -> StorePath {
        match (self.prefix.is_empty(), key.is_root()) {
            (true, _) => StorePath::from(key.as_str()),
            (false, true) => StorePath::from(self.prefix.as_str()),
            (false, false) => StorePath::from(format!("{}/{}", self.prefix, key.as_str())),
        }
    }
}

impl Backend {
    /// One-shot write of a whole (small) object.
    pub async fn put(&self, key: &RepoKey, data: Vec<Bytes>, mode: PutMode) -> Result<()> {
        match self {
            Backend::Store(s) => {
                let create = mode == PutMode::CreateNew;
                if create && !s.conditional_create && self.head(key).await?.is_some() {
                    return Err(StorageError::AlreadyExists {
                        key: key.to_string(),
                    });
                }
                let opts = PutOptions {
                    mode: if create && s.conditional_create {
                        object_store::PutMode::Create
                    } else {
                        object_store::PutMode::Overwrite
                    },
                    attributes: s.attributes.clone(),
                    ..Default::default()
                };
                let payload: PutPayload = data.iter().cloned().collect();
                match s.store.put_opts(&s.path(key), payload, opts).await {
                    Ok(_) => Ok(()),
                    // A store without conditional writes (501 Not Implemented): fall back
                    // to check-then-put, which is what `conditional_put=disabled` does.
                    Err(e) if create && s.conditional_create && not_implemented(&e) => {
                        tracing::warn!(%key, "the object store does not support conditional create (If-None-Match); checking before writing instead; set ?conditional_put=disabled to skip this attempt");
                        if self.head(key).await?.is_some() {
                            return Err(StorageError::AlreadyExists {
                                key: key.to_string(),
                            });
                        }
                        let payload: PutPayload = data.into_iter().collect();
                        let opts = PutOptions {
                            attributes: s.attributes.clone(),
                            ..Default::default()
                        };
                        s.store
                            .put_opts(&s.path(key), payload, opts)
                            .await
                            .map(|_| ())
                            .map_err(|e| map_err(key, "put", e))
                    }
                    Err(e) => Err(map_err(key, "put", e)),
                }
            }
            Backend::Local(l) => l.put(key, data, mode).await,
        }
    }

    /// Begins a multipart upload; nothing is visible until `complete`.
    pub async fn start_upload(&self, key: &RepoKey) -> Result<Upload> {
        match self {
            Backend::Store(s) => {
                let opts = object_store::PutMultipartOptions {
                    attributes: s.attributes.clone(),
                    ..Default::default()
                };
                let upload = s
                    .store
                    .put_multipart_opts(&s.path(key), opts)
                    .await
                    .map_err(|e| map_err(key, "start multipart upload", e))?;
                Ok(Upload::Store {
                    key: key.clone(),
                    upload,
                })
            }
            Backend::Local(l) => l.start_upload(key).await.map(Upload::Local),
        }
    }

    /// Size and time of an object, `None` when absent.
    pub async fn head(&self, key: &RepoKey) -> Result<Option<ObjectMeta>> {
        match self {
            Backend::Store(s) => match s.store.head(&s.path(key)).await {
                Ok(m) => {
                    s.saw_bucket();
                    Ok(Some(ObjectMeta {
                        key: key.clone(),
                        size: m.size,
                        last_modified: m.last_modified,
                    }))
                }
                Err(object_store::Error::NotFound { .. }) => {
                    s.check_bucket(key).await?;
                    Ok(None)
                }
                Err(e) => Err(map_err(key, "head", e)),
            },
            Backend::Local(l) => l.head(key).await,
        }
    }

    /// Bytes `range` of an object.
    pub async fn get_range(&self, key: &RepoKey, range: std::ops::Range<u64>) -> Result<Bytes> {
        match self {
            Backend::Store(s) => s
                .store
                .get_range(&s.path(key), range)
                .await
                .map_err(|e| map_err(key, "get range", e)),
            Backend::Local(l) => l.get_range(key, range).await,
        }
    }

    /// Streams an object from `offset`, optionally only if its version is still `etag`.
    /// Returns the stream, the object's total size and its version tag.
    pub async fn get_stream(
        &self,
        key: &RepoKey,
        offset: u64,
        etag: Option<String>,
    ) -> Result<(ByteStream, u64, Option<String>)> {
        match self {
            Backend::Store(s) => {
                let opts = GetOptions {
                    range: (offset > 0).then_some(GetRange::Offset(offset)),
                    if_match: etag,
                    ..Default::default()
                };
                let res = match s.store.get_opts(&s.path(key), opts).await {
                    Ok(res) => {
                        s.saw_bucket();
                        res
                    }
                    Err(e) => {
                        let err = map_err(key, "get", e);
                        if err.is_not_found() {
                            s.check_bucket(key).await?;
                        }
                        return Err(err);
                    }
                };
                let size = res.meta.size;
                let etag = res.meta.e_tag.clone();
                let k = key.clone();
                let stream = res
                    .into_stream()
                    .map_err(move |e| map_err(&k, "read body", e))
                    .boxed();
                Ok((stream, size, etag))
            }
            Backend::Local(l) => l.get_stream(key, offset).await,
        }
    }

    /// Every object under `prefix` (recursively), sorted by key.
    pub async fn list(&self, prefix: &RepoKey) -> Result<Vec<ObjectMeta>> {
        let mut out = match self {
            Backend::Store(s) => {
                let base = s.path(&RepoKey::root());
                let path = s.path(prefix);
                let query = if path.as_ref().is_empty() {
                    None
                } else {
                    Some(&path)
                };
                let items: Vec<object_store::ObjectMeta> = s
                    .store
                    .list(query)
                    .try_collect()
                    .await
                    .map_err(|e| map_err(prefix, "list", e))?;
                items
                    .into_iter()
                    .filter_map(|m| {
                        let rel = match m.location.prefix_match(&base) {
                            Some(parts) => parts
                                .map(|p| p.as_ref().to_owned())
                                .collect::<Vec<_>>()
                                .join("/"),
                            None => return None,
                        };
                        let key = RepoKey::parse(&rel).ok()?;
                        (!key.is_root() && key.starts_with(prefix)).then_some(ObjectMeta {
                            key,
                            size: m.size,
                            last_modified: m.last_modified,
                        })
                    })
                    .collect::<Vec<_>>()
            }
            Backend::Local(l) => l.list(prefix).await?,
        };
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The immediate "sub-directories" of `prefix` (keys one level deeper that have
    /// objects under them), sorted, without listing those objects.
    pub async fn list_dirs(&self, prefix: &RepoKey) -> Result<Vec<RepoKey>> {
        let mut out = match self {
            Backend::Store(s) => {
                let base = s.path(&RepoKey::root());
                let path = s.path(prefix);
                let query = if path.as_ref().is_empty() {
                    None
                } else {
                    Some(&path)
                };
                let res = s
                    .store
                    .list_with_delimiter(query)
                    .await
                    .map_err(|e| map_err(prefix, "list", e))?;
                res.common_prefixes
                    .into_iter()
                    .filter_map(|p| {
                        let rel = p
                            .prefix_match(&base)?
                            .map(|part| part.as_ref().to_owned())
                            .collect::<Vec<_>>()
                            .join("/");
                        RepoKey::parse(&rel).ok().filter(|k| !k.is_root())
                    })
                    .collect::<Vec<_>>()
            }
            Backend::Local(l) => {
                let (dir, k) = (l.path(prefix), prefix.clone());
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
                .await?
            }
        };
        out.sort();
        Ok(out)
    }

    /// Removes an object; absent objects are not an error.
    pub async fn delete(&self, key: &RepoKey) -> Result<()> {
        match self {
            Backend::Store(s) => match s.store.delete(&s.path(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(map_err(key, "delete", e)),
            },
            Backend::Local(l) => l.delete(key).await,
        }
    }
}

/// Maps an object_store error, deciding whether it is transient.
pub(crate) fn map_err(key: &RepoKey, op: &'static str, e: object_store::Error) -> StorageError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } if names_missing_bucket(&e) => missing_bucket(key, e),
        E::NotFound { .. } => StorageError::NotFound {
            key: key.to_string(),
        },
        E::AlreadyExists { .. } | E::Precondition { .. } if op == "put" => {
            StorageError::AlreadyExists {
                key: key.to_string(),
            }
        }
        e if names_untrusted_certificate(&e) => StorageError::Backend {
            key: key.to_string(),
            op: "connecting over TLS (the server's certificate is not trusted: give its CA \
                 with --ca-bundle, AWS_CA_BUNDLE or ?ca_bundle=)",
            retryable: false,
            attempts: 1,
            source: Box::new(e),
        },
        e => {
            let retryable = match &e {
                E::Generic { .. } | E::JoinError { .. } => generic_is_transient(&e),
                _ => false,
            };
            StorageError::Backend {
                key: key.to_string(),
                op,
                retryable,
                attempts: 1,
                source: Box::new(e),
            }
        }
    }
}

/// Whether a 404 is about the bucket/container rather than the object (S3 `NoSuchBucket`,
/// Azure `ContainerNotFound`, GCS "bucket does not exist").
fn names_missing_bucket(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("NoSuchBucket")
            || text.contains("ContainerNotFound")
            || text.contains("bucket does not exist")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether the TLS handshake failed on the server's certificate (rustls "invalid peer
/// certificate: UnknownIssuer", a name or date mismatch): trying again cannot help.
fn names_untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("invalid peer certificate") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn missing_bucket(key: &RepoKey, e: object_store::Error) -> StorageError {
    StorageError::Backend {
        key: key.to_string(),
        op: "finding the bucket (missing or not accessible: check the repository URL)",
        retryable: false,
        attempts: 1,
        source: Box::new(e),
    }
}

fn not_implemented(e: &object_store::Error) -> bool {
    let text = format!("{e} {:?}", e);
    matches!(e, object_store::Error::NotImplemented)
        || text.contains("status code: 501")
        || text.contains("NotImplemented")
}

/// object_store does not expose HTTP status codes; its messages carry them
/// ("... status code: 400 Bad Request"). A 4xx other than 408/429 is the caller's fault
/// and is not retried; everything else (5xx, resets, timeouts, body errors) is transient.
fn generic_is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(" | ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    // reqwest refusing to build the request (bad URL, http:// not allowed) is permanent.
    if text.contains("builder error") || text.contains("scheme is not allowed") {
        return false;
    }
    for marker in ["status code: ", "status: "] {
        for (i, _) in text.match_indices(marker) {
            let code: String = text[i + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(code) = code.parse::<u16>() {
                if (400..500).contains(&code) && code != 408 && code != 429 {
                    return false;
                }
            }
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// Local file system
// ---------------------------------------------------------------------------------------

/// A directory tree as a store. Writes go to `.<name>.sbtmp-<random>` in the target
/// directory, are fsynced, then linked (create-new, atomic: fails if the name exists) or
/// renamed (overwrite) into place, and the directory is fsynced.
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

fn blocking<T: Send + 'static>(
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
pub(crate) const ABANDONED_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

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

/// Creates missing directories between `root` and `dir`, fsyncing each parent so the new
/// entries survive a crash. The root itself only if this process never saw it.
fn create_dirs(key: &RepoKey, root: &FsPath, dir: &FsPath) -> Result<()> {
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
        // The repository directory itself is created on first write.
        std::fs::create_dir_all(root)
            .map_err(|e| StorageError::io(key, "create repository directory", root, e))?;
        if let Some(parent) = root.parent() {
            fsync_dir(key, parent)?;
        }
        root_seen(root, true);
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if parent != dir && parent.starts_with(root) {
            create_dirs(key, root, parent)?;
        }
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                fsync_dir(key, parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StorageError::io(key, "create directory", dir, e)),
    }
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
    fn path(&self, key: &RepoKey) -> PathBuf {
        if key.is_root() {
            self.root.clone()
        } else {
            self.root.join(key.as_str())
        }
    }

    async fn put(&self, key: &RepoKey, data: Vec<Bytes>, mode: PutMode) -> Result<()> {
        let (root, dest, k) = (self.root.clone(), self.path(key), key.clone());
        blocking(key, move || {
            let dir = dest.parent().unwrap_or(&root).to_path_buf();
            create_dirs(&k, &root, &dir)?;
            if mode == PutMode::CreateNew && dest.exists() {
                return Err(StorageError::AlreadyExists { key: k.to_string() });
            }
            let tmp = tmp_name(&dest);
            let write = || -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
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

    async fn start_upload(&self, key: &RepoKey) -> Result<LocalUpload> {
        let (root, dest, k) = (self.root.clone(), self.path(key), key.clone());
        blocking(key, move || {
            let dir = dest.parent().unwrap_or(&root).to_path_buf();
            create_dirs(&k, &root, &dir)?;
            let tmp = tmp_name(&dest);
            let file = File::create(&tmp).map_err(|e| StorageError::io(&k, "create", &tmp, e))?;
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

    async fn head(&self, key: &RepoKey) -> Result<Option<ObjectMeta>> {
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

    async fn get_range(&self, key: &RepoKey, range: std::ops::Range<u64>) -> Result<Bytes> {
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

    async fn get_stream(
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

    async fn list(&self, prefix: &RepoKey) -> Result<Vec<ObjectMeta>> {
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

    async fn delete(&self, key: &RepoKey) -> Result<()> {
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

impl LocalUpload {
    fn put_part(&mut self, data: Vec<Bytes>) -> BoxFuture<'static, Result<()>> {
        let offset = self.next_offset;
        self.next_offset += data.iter().map(|b| b.len() as u64).sum::<u64>();
        let (file, key, tmp) = (self.file.clone(), self.key.clone(), self.tmp.clone());
        blocking(&self.key.clone(), move || {
            let mut at = offset;
            for piece in &data {
                file.write_all_at(piece, at)
                    .map_err(|e| StorageError::io(&key, "write", &tmp, e))?;
                at += piece.len() as u64;
            }
            Ok(())
        })
        .boxed()
    }

    async fn complete(self, mode: PutMode) -> Result<()> {
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

    async fn abort(self) -> Result<()> {
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

    #[test]
    fn classifies_http_status_in_messages() {
        let e =
            std::io::Error::other("Server returned non-2xx status code: 503 Service Unavailable");
        assert!(generic_is_transient(&e));
        let e = std::io::Error::other("Server returned non-2xx status code: 400 Bad Request: x");
        assert!(!generic_is_transient(&e));
        let e = std::io::Error::other("status code: 429 Too Many Requests");
        assert!(generic_is_transient(&e));
        let e = std::io::Error::other("connection reset by peer");
        assert!(generic_is_transient(&e));
    }
}
