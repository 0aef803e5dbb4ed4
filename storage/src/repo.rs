//! `Repository`: opening a repository URL and the object operations every stream uses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use object_store::{Attribute, Attributes, ClientOptions, ObjectStore};
use tokio::sync::Semaphore;

use crate::backend::{Backend, LocalBackend, ObjectMeta, RetryPolicy, StoreBackend};
use crate::binding::{self, RepoContext};
use crate::error::{Result, StorageError};
use crate::format::{
    bound_digest, Binding, ContentHash, ContentKind, Header, Trailer, BLAKE3_FORMAT_VERSION,
    FORMAT_VERSION, SHA256_FORMAT_VERSION, TRAILER_LEN,
};
use crate::frame::{short_fingerprint, Keys};
use crate::layout::RepoKey;
use crate::reader::{ObjectReader, ReadMode};
use crate::redact::redact_url;
use crate::writer::ObjectWriter;
use crate::PutMode;

/// The lowest (fastest, largest) zstd level accepted. Below about -10 zstd saves little
/// more CPU on WAL while the objects keep growing (`storage/examples/codec_costs.rs`).
pub const MIN_COMPRESSION_LEVEL: i32 = -10;

/// The URL schemes this build opens (`syncbridge-agent version` lists them): a local
/// directory, memory (tests), and through `object_store` S3 and S3-compatible stores,
/// Google Cloud Storage and Azure Blob Storage.
pub const BACKENDS: &[&str] = &["file", "memory", "s3", "gs", "az"];

/// How a repository is written and read. `Default` is right for production use; tests
/// shrink sizes and retry times.
#[derive(Clone)]
pub struct RepoOptions {
    /// zstd level for new objects (1 fast .. 19 small; negative levels are zstd's fast
    /// mode, -1 to -[`MIN_COMPRESSION_LEVEL`], faster still and larger); `None` stores
    /// frames uncompressed. Readers need nothing to know about it.
    pub compression_level: Option<i32>,
    /// Original bytes per frame: the unit of parallel work and of damage location.
    pub frame_size: usize,
    /// Bytes per multipart part (at least 5 MiB, S3's minimum). Objects smaller than one
    /// part are written with a single PUT.
    pub part_size: usize,
    /// Frames compressed / decompressed at once, repository-wide.
    pub workers: usize,
    /// Parts in flight per object. Peak writer memory is about
    /// `part_size * (upload_concurrency + 1) + frame_size * 4 * workers`.
    pub upload_concurrency: usize,
    /// age recipients every new object is encrypted to (empty: no encryption).
    pub recipients: Vec<age::x25519::Recipient>,
    /// age identities used to read encrypted objects.
    pub identities: Vec<age::x25519::Identity>,
    /// Retries of transient store failures.
    pub retry: RetryPolicy,
    /// PEM bundle of extra trusted CA certificates for HTTPS stores (also `AWS_CA_BUNDLE`
    /// or the URL option `ca_bundle=`).
    pub ca_bundle: Option<PathBuf>,
    /// Extra `object_store` settings applied after the environment, e.g.
    /// `("aws_access_key_id", "...")` from a config file; names are case-insensitive and
    /// use object_store's config keys (`aws_*`, `google_*`, `azure_*`).
    pub store_config: Vec<(String, String)>,
    /// LZ4 (block format) instead of zstd for new frames when `compression_level` is set
    /// (its value is then not used): about a quarter of zstd level 1's CPU for objects
    /// about twice as large on WAL. Needs format version 3 or later.
    pub lz4: bool,
    /// Container version of new objects: 4 (the default; content hashed with XXH3-128, or
    /// BLAKE3 when encrypted), 3 (BLAKE3; `SYNCBRIDGE_FORMAT_VERSION=3`, for readers older
    /// than version 4) or 2 (SHA-256, for readers older than version 3). Readers take every
    /// version from 1 to 4, mixed in one repository.
    pub format_version: u16,
}

impl Default for RepoOptions {
    fn default() -> Self {
        RepoOptions {
            compression_level: Some(3),
            frame_size: 1 << 20,
            part_size: 8 << 20,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(1, 8),
            upload_concurrency: 4,
            recipients: Vec::new(),
            identities: Vec::new(),
            retry: RetryPolicy::default(),
            ca_bundle: None,
            store_config: Vec::new(),
            format_version: FORMAT_VERSION,
            lz4: false,
        }
    }
}

impl RepoOptions {
    /// How new frames are compressed.
    pub(crate) fn compress(&self) -> Option<crate::frame::Compress> {
        use crate::frame::Compress;
        self.compression_level.map(|level| {
            if self.lz4 {
                Compress::Lz4
            } else {
                Compress::Zstd(level)
            }
        })
    }
}

impl RepoOptions {
    /// Defaults plus the repository settings of the agent's environment, so every command
    /// encrypts and decrypts the same way: `SYNCBRIDGE_RECIPIENTS` (comma-separated
    /// `age1…`), `SYNCBRIDGE_RECIPIENTS_FILE`, `SYNCBRIDGE_IDENTITY` (identity file),
    /// `SYNCBRIDGE_FORMAT_VERSION` (2, 3 or 4, the container version of new objects) and
    /// `AWS_CA_BUNDLE`. Unset variables change nothing.
    pub fn from_env() -> Result<RepoOptions> {
        let mut o = RepoOptions::default();
        if let Ok(list) = std::env::var("SYNCBRIDGE_RECIPIENTS") {
            for r in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                o.recipients.push(crate::keys::parse_recipient(r)?);
            }
        }
        if let Some(f) = std::env::var_os("SYNCBRIDGE_RECIPIENTS_FILE") {
            o.recipients
                .extend(crate::keys::read_recipients_file(std::path::Path::new(&f))?);
        }
        if let Some(f) = std::env::var_os("SYNCBRIDGE_IDENTITY") {
            o.identities = crate::keys::read_identity_file(std::path::Path::new(&f))?;
        }
        if let Ok(v) = std::env::var("SYNCBRIDGE_FORMAT_VERSION") {
            o.format_version = v.trim().parse().map_err(|_| {
                config_err(
                    "SYNCBRIDGE_FORMAT_VERSION",
                    format!(
                        "{v:?} is not {SHA256_FORMAT_VERSION}, {BLAKE3_FORMAT_VERSION} or {FORMAT_VERSION}"
                    ),
                )
            })?;
        }
        Ok(o)
    }
}

/// What is known about a stored object: enough to compare content without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object.
    pub key: RepoKey,
    /// What it holds.
    pub kind: ContentKind,
    /// Bytes a reader gets back.
    pub original_len: u64,
    /// Bytes in the store.
    pub stored_len: u64,
    /// The digest recorded in the trailer: in format versions 2 to 4 the SHA-256 over the
    /// binding and the hash of the original bytes (`format::ContentHash::of_object`,
    /// `format::bound_digest`); in version 1 the SHA-256 of the original bytes. Use
    /// [`ObjectInfo::matches_content`] to compare with bytes about to be written.
    pub sha256: [u8; 32],
    /// CRC32C of the stored bytes before the trailer.
    pub stored_crc32c: u32,
    /// Number of frames.
    pub frames: u64,
    /// Whether the frames are age-encrypted.
    pub encrypted: bool,
    /// The key and repository the object was written for (format versions 2 to 4).
    pub binding: Option<Binding>,
    /// The container version of the object (which content hash its digest uses).
    pub format_version: u16,
}

impl ObjectInfo {
    /// How this object hashes its content (by its version and encryption).
    pub fn content_hash(&self) -> ContentHash {
        ContentHash::of_object(self.format_version, self.encrypted)
    }

    /// The trailer digest content whose [`content_hash`](Self::content_hash) is
    /// `content_digest` has in this object (bound to its key and repository).
    pub fn bound(&self, content_digest: &[u8; 32]) -> [u8; 32] {
        match &self.binding {
            Some(b) => bound_digest(content_digest, b, self.content_hash()),
            None => *content_digest,
        }
    }

    /// The trailer digest `content` (taken as one byte sequence) would have in this object.
    pub fn digest_of<T: AsRef<[u8]>>(&self, content: &[T]) -> [u8; 32] {
        self.bound(&self.content_hash().digest(content))
    }

    /// Whether this object holds exactly the `original_len` bytes whose
    /// [`content_hash`](Self::content_hash) is `content_digest`.
    pub fn matches_content_digest(&self, content_digest: &[u8; 32], original_len: u64) -> bool {
        original_len == self.original_len && self.bound(content_digest) == self.sha256
    }

    /// Whether this object holds exactly `content` (taken as one byte sequence), whatever
    /// its container version.
    pub fn matches_content<T: AsRef<[u8]>>(&self, content: &[T]) -> bool {
        let len: u64 = content.iter().map(|c| c.as_ref().len() as u64).sum();
        len == self.original_len && self.digest_of(content) == self.sha256
    }

    /// The SHA-256 as lower-case hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

pub(crate) struct RepoInner {
    pub backend: Backend,
    pub url: String,
    pub opts: RepoOptions,
    pub keys: Arc<Keys>,
    /// Repository-wide cap on CPU-bound frame jobs.
    pub cpu: Arc<Semaphore>,
    /// What every object must be (from the marker), learnt on first use.
    pub context: std::sync::RwLock<Option<Arc<RepoContext>>>,
}

impl RepoInner {
    pub(crate) fn new(backend: Backend, url: String, opts: RepoOptions, keys: Arc<Keys>) -> Self {
        RepoInner {
            backend,
            url,
            cpu: Arc::new(Semaphore::new(opts.workers)),
            opts,
            keys,
            context: Default::default(),
        }
    }
}

/// A repository: cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<RepoInner>,
    /// Set on a [`scoped`](Self::scoped) view: the prefix its keys live under.
    pub(crate) scope: Option<RepoKey>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({})", self.inner.url)
    }
}

/// A configuration error; `what` (often the URL as given) is shown through [`redact_url`]:
/// a query may carry what someone took for an option (`?aws_secret_access_key=…`).
fn config_err(what: impl Into<String>, reason: impl std::fmt::Display) -> StorageError {
    StorageError::Config {
        what: redact_url(&what.into()),
        reason: reason.to_string(),
    }
}

impl Repository {
    /// Opens a repository. No request is made; the first operation reaches the store.
    ///
    /// * `file:///abs/dir` (or a bare absolute path): a local directory, created on first write;
    ///   private (files 0600, directories 0700) unless the operator created it group-readable
    ///   (then 0640/0750 with setgid kept; see `backend/local.rs`).
    /// * `s3://bucket/prefix`: S3 or a compatible store, configured by the standard AWS
    ///   environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    ///   `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `AWS_WEB_IDENTITY_TOKEN_FILE` +
    ///   `AWS_ROLE_ARN`, `AWS_CA_BUNDLE`) and URL query options: `endpoint=`, `region=`,
    ///   `path_style=true|false`, `allow_http=true`, `storage_class=`, `ca_bundle=`,
    ///   `conditional_put=etag|disabled`, `checksum=sha256` (off by default: some
    ///   S3-compatible stores reject checksum headers), `unsigned_payload=true|false`
    ///   (default: unsigned over HTTPS, signed over plain HTTP: see `default_payload_signing`).
    /// * `gs://bucket/prefix`, `az://container/prefix`: by their SDK environment.
    /// * `memory://`: an in-process store for tests (each `open` is a new, empty store).
    pub fn open(url: &str, opts: RepoOptions) -> Result<Repository> {
        let opts = sanitize(opts)?;
        let backend = open_backend(url, &opts)?;
        let keys = Arc::new(Keys {
            recipients: opts.recipients.clone(),
            identities: opts.identities.clone(),
        });
        Ok(Repository {
            inner: Arc::new(RepoInner::new(backend, redact_url(url), opts, keys)),
            scope: None,
        })
    }

    /// A repository on an `object_store` you built yourself (a store this crate does not
    /// configure, or a wrapper that injects failures in tests). `prefix` is the key prefix
    /// inside the store (may be empty). Conditional create is attempted and falls back to
    /// check-then-put when the store answers "not implemented".
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        description: &str,
        opts: RepoOptions,
    ) -> Result<Repository> {
        let opts = sanitize(opts)?;
        let backend = Backend::Store(StoreBackend {
            store,
            prefix: clean_prefix(description, prefix)?,
            conditional_create: true,
            attributes: Attributes::new(),
            bucket_seen: Default::default(),
        });
        let keys = Arc::new(Keys {
            recipients: opts.recipients.clone(),
            identities: opts.identities.clone(),
        });
        Ok(Repository {
            inner: Arc::new(RepoInner::new(backend, description.to_owned(), opts, keys)),
            scope: None,
        })
    }

    /// A view of this repository in which every key lives under `prefix`: a repository
    /// inside the repository, with the same store, marker, encryption and identity. Code
    /// written for a whole repository (e.g. one Redis server's stream, restore and verify)
    /// then works unchanged on one part of it (one shard of a Redis Cluster, under
    /// `redis/cluster/shards/<shard>`). Two keys are not moved: the marker stays the
    /// repository's own, and writer leases (`leases/...`) go to `leases/<prefix>/...`, so
    /// they stay plaintext like every lease. Objects are bound to their full key, so an
    /// object copied from one scope to another is refused. `list` and `list_dirs` return
    /// keys relative to the view; errors and `ObjectInfo` name the full keys. Scopes nest.
    pub fn scoped(&self, prefix: &RepoKey) -> Result<Repository> {
        let bad = |reason: &str| StorageError::InvalidKey {
            key: prefix.to_string(),
            reason: reason.into(),
        };
        if prefix.is_root() {
            return Err(bad("a scope needs a prefix"));
        }
        if *prefix == crate::layout::marker() || crate::layout::is_lease_key(prefix) {
            return Err(bad("the marker and the leases cannot be a scope"));
        }
        let full = self.full_key(prefix);
        Ok(Repository {
            inner: self.inner.clone(),
            scope: Some(full),
        })
    }

    /// The same repository (store, marker, encryption, scope) writing new objects with other
    /// buffer sizes: multipart `part_size`, `upload_concurrency` parts in flight and
    /// `frame_size` frames. Readers take any frame size, so objects stay readable by any
    /// view; used where many objects are written at once (every shard of a cluster storing
    /// its snapshot) to bound memory.
    pub fn with_write_sizes(
        &self,
        part_size: usize,
        upload_concurrency: usize,
        frame_size: usize,
    ) -> Repository {
        let mut opts = self.inner.opts.clone();
        opts.part_size = part_size.max(5 << 20);
        opts.upload_concurrency = upload_concurrency.max(1);
        opts.frame_size = frame_size.clamp(64 << 10, crate::format::MAX_FRAME_ORIGINAL as usize);
        Repository {
            inner: Arc::new(RepoInner::new(
                self.inner.backend.clone(),
                self.inner.url.clone(),
                opts,
                self.inner.keys.clone(),
            )),
            scope: self.scope.clone(),
        }
    }

    /// The prefix of a [`scoped`](Self::scoped) view (`None` for the whole repository).
    pub fn scope(&self) -> Option<&RepoKey> {
        self.scope.as_ref()
    }

    /// The key in the store of `key` as this view names it.
    pub fn full_key(&self, key: &RepoKey) -> RepoKey {
        let Some(scope) = &self.scope else {
            return key.clone();
        };
        if *key == crate::layout::marker() {
            return key.clone();
        }
        if let Some(rest) = key.as_str().strip_prefix("leases/") {
            return RepoKey::join(&["leases", scope.as_str(), rest]);
        }
        if key.as_str() == "leases" {
            return RepoKey::join(&["leases", scope.as_str()]);
        }
        if key.is_root() {
            return scope.clone();
        }
        RepoKey::join(&[scope.as_str(), key.as_str()])
    }

    /// The key this view names a store key by (the inverse of [`full_key`](Self::full_key));
    /// keys outside the view are returned unchanged.
    fn view_key(&self, full: RepoKey) -> RepoKey {
        let Some(scope) = &self.scope else {
            return full;
        };
        let text = full.as_str();
        if let Some(rest) = text
            .strip_prefix("leases/")
            .and_then(|r| r.strip_prefix(scope.as_str()))
            .and_then(|r| r.strip_prefix('/'))
        {
            return RepoKey::join(&["leases", rest]);
        }
        match text
            .strip_prefix(scope.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            Some(rest) => RepoKey::join(&[rest]),
            None => full,
        }
    }

    /// The URL this repository was opened with (query options removed).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The options in effect.
    pub fn options(&self) -> &RepoOptions {
        &self.inner.opts
    }

    /// Whether new objects are encrypted.
    pub fn encrypts(&self) -> bool {
        !self.inner.keys.recipients.is_empty()
    }

    /// The directory of a `file://` repository (`None` for object stores), so a restore can
    /// refuse to write into or over it.
    pub fn local_path(&self) -> Option<&std::path::Path> {
        match &self.inner.backend {
            Backend::Local(l) => Some(&l.root),
            Backend::Store(_) => None,
        }
    }

    /// Whether an age identity was given, so encrypted objects can be decoded.
    pub fn can_decrypt(&self) -> bool {
        !self.inner.keys.identities.is_empty()
    }

    /// Writes a small object in one call (still framed, so it may be of any size).
    pub async fn put(
        &self,
        key: &RepoKey,
        kind: ContentKind,
        data: Bytes,
        mode: PutMode,
    ) -> Result<ObjectInfo> {
        let mut w = self
            .writer_with_len(key, kind, mode, Some(data.len() as u64))
            .await?;
        w.write(data).await?;
        w.finish().await
    }

    /// Starts a streaming write of unknown length. Nothing is visible at `key` until
    /// `finish` succeeds; `abort` (or dropping the writer) leaves nothing behind.
    pub async fn writer(
        &self,
        key: &RepoKey,
        kind: ContentKind,
        mode: PutMode,
    ) -> Result<ObjectWriter> {
        self.writer_with_len(key, kind, mode, None).await
    }

    /// Starts a streaming write whose length is known up front: it is recorded in the
    /// header, sizes the parts, and `finish` fails if a different amount was written.
    pub async fn writer_with_len(
        &self,
        key: &RepoKey,
        kind: ContentKind,
        mode: PutMode,
        len: Option<u64>,
    ) -> Result<ObjectWriter> {
        let key = &self.full_key(key);
        if key.is_root() {
            return Err(StorageError::InvalidKey {
                key: String::new(),
                reason: "the repository root is not an object".into(),
            });
        }
        if key.as_str().len() > crate::format::MAX_KEY_LEN {
            return Err(StorageError::InvalidKey {
                key: key.to_string(),
                reason: format!("longer than {} bytes", crate::format::MAX_KEY_LEN),
            });
        }
        let binding = self.context().await?.binding_for(key);
        ObjectWriter::new(self.inner.clone(), key.clone(), kind, mode, len, binding)
    }

    /// Reads and fully verifies a whole object into memory. For large objects use `reader`.
    pub async fn get(&self, key: &RepoKey) -> Result<Bytes> {
        let mut r = self.reader(key).await?;
        let mut chunks = Vec::new();
        while let Some(chunk) = r.next_chunk().await? {
            chunks.push(chunk);
        }
        if chunks.len() == 1 {
            return Ok(chunks.swap_remove(0));
        }
        let total = chunks.iter().map(|c| c.len()).sum();
        let mut out = BytesMut::with_capacity(total);
        for c in chunks {
            out.extend_from_slice(&c);
        }
        Ok(out.freeze())
    }

    /// Streams an object's original bytes, verified frame by frame; the last chunk is only
    /// released (and the end only reported) after the trailer's checks pass.
    pub async fn reader(&self, key: &RepoKey) -> Result<ObjectReader> {
        let key = self.full_key(key);
        ObjectReader::open(self.inner.clone(), key, ReadMode::Plaintext).await
    }

    /// Reads an object to the end, checking everything, and returns its info. Without an
    /// identity, an encrypted object is checked up to the stored bytes (CRC32C, structure);
    /// `VerifyReport::plaintext_verified` says whether the SHA-256 was checked too.
    pub async fn verify(&self, key: &RepoKey) -> Result<VerifyReport> {
        let no_identity = self.inner.keys.identities.is_empty();
        let mode = if no_identity {
            ReadMode::StoredOnlyIfEncrypted
        } else {
            ReadMode::Plaintext
        };
        let key = &self.full_key(key);
        let mut r = ObjectReader::open(self.inner.clone(), key.clone(), mode).await?;
        while r.next_chunk().await?.is_some() {}
        let info = r.info().ok_or_else(|| StorageError::WriterClosed {
            key: key.to_string(),
            reason: "reader ended without info".into(),
        })?;
        Ok(VerifyReport {
            plaintext_verified: !(info.encrypted && no_identity),
            info,
        })
    }

    /// Reads an object's header and trailer only (a few small requests): its length, kind
    /// and the digest of its original bytes, as recorded. Use it to compare an existing
    /// object with one about to be written without downloading it.
    pub async fn info(&self, key: &RepoKey) -> Result<ObjectInfo> {
        let key = &self.full_key(key);
        let b = &self.inner.backend;
        let policy = &self.inner.opts.retry;
        let meta = policy
            .run(|_| b.head(key))
            .await?
            .ok_or_else(|| StorageError::NotFound {
                key: key.to_string(),
            })?;
        let k = key.as_str();
        let size = meta.size;
        let head_len = size.min(4096);
        let head = policy.run(|_| b.get_range(key, 0..head_len)).await?;
        let (header, hlen) = Header::parse(k, &head)?.ok_or_else(|| {
            StorageError::corrupt(
                k,
                "object length",
                "a complete header",
                format!("{size} bytes"),
                0,
            )
        })?;
        if size < (hlen + TRAILER_LEN) as u64 {
            return Err(StorageError::corrupt(
                k,
                "object length (truncated)",
                format!(">= {}", hlen + TRAILER_LEN),
                size,
                0,
            ));
        }
        let t_off = size - TRAILER_LEN as u64;
        let tail = policy.run(|_| b.get_range(key, t_off..size)).await?;
        let trailer = Trailer::parse(k, &tail, t_off)?;
        if binding::is_self_describing(key) {
            binding::check_key(key, &header)?;
        } else {
            self.context().await?.check(key, &header)?;
        }
        Ok(ObjectInfo {
            key: key.clone(),
            kind: header.kind,
            original_len: trailer.original_len,
            stored_len: size,
            sha256: trailer.sha256,
            stored_crc32c: trailer.stored_crc,
            frames: trailer.frame_count,
            encrypted: header.encrypted,
            format_version: header.version,
            binding: header.binding,
        })
    }

    /// Every object under `prefix` (use `RepoKey::root()` for all), sorted by key. On a
    /// local directory this also removes temporary files of writes killed mid-way (not
    /// written to for 6 hours); on S3 an interrupted multipart upload is invisible and is
    /// cleaned by the bucket's `AbortIncompleteMultipartUpload` lifecycle rule.
    pub async fn list(&self, prefix: &RepoKey) -> Result<Vec<ObjectMeta>> {
        let b = &self.inner.backend;
        let prefix = &self.full_key(prefix);
        let mut found = self.inner.opts.retry.run(|_| b.list(prefix)).await?;
        if self.scope.is_some() {
            for m in &mut found {
                m.key = self.view_key(std::mem::replace(&mut m.key, RepoKey::root()));
            }
        }
        Ok(found)
    }

    /// The keys one level below `prefix` that have objects under them (e.g. the backup
    /// ids under `layout::base_backups_prefix()`), sorted, without listing every object.
    /// On a local directory an empty sub-directory may be listed too.
    pub async fn list_dirs(&self, prefix: &RepoKey) -> Result<Vec<RepoKey>> {
        let b = &self.inner.backend;
        let prefix = &self.full_key(prefix);
        let found = self.inner.opts.retry.run(|_| b.list_dirs(prefix)).await?;
        Ok(found.into_iter().map(|k| self.view_key(k)).collect())
    }

    /// Whether an object exists (a store error is an error, not "no").
    pub async fn exists(&self, key: &RepoKey) -> Result<bool> {
        let key = &self.full_key(key);
        let b = &self.inner.backend;
        Ok(self.inner.opts.retry.run(|_| b.head(key)).await?.is_some())
    }

    /// Removes an object; removing an absent object succeeds.
    pub async fn delete(&self, key: &RepoKey) -> Result<()> {
        let key = &self.full_key(key);
        let b = &self.inner.backend;
        self.inner.opts.retry.run(|_| b.delete(key)).await
    }

    /// Short fingerprints of the recipients new objects are encrypted to.
    pub fn recipient_fingerprints(&self) -> Vec<String> {
        self.inner
            .keys
            .recipient_fingerprints()
            .iter()
            .map(short_fingerprint)
            .collect()
    }
}

/// Result of `Repository::verify`.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    /// The verified object's info.
    pub info: ObjectInfo,
    /// False when the object is encrypted and no identity was available, so only the
    /// stored bytes (not the SHA-256 of the original) could be checked.
    pub plaintext_verified: bool,
}

fn sanitize(mut o: RepoOptions) -> Result<RepoOptions> {
    const MIN_PART: usize = 5 << 20;
    if let Some(level) = o.compression_level {
        if !(MIN_COMPRESSION_LEVEL..=22).contains(&level) || level == 0 {
            return Err(config_err(
                "compression level",
                format!("{level} is not in 1..=22 nor {MIN_COMPRESSION_LEVEL}..=-1"),
            ));
        }
    }
    if o.frame_size == 0 || o.frame_size > crate::format::MAX_FRAME_ORIGINAL as usize {
        return Err(config_err(
            "frame size",
            format!("{} is not in 1..=64 MiB", o.frame_size),
        ));
    }
    if !(SHA256_FORMAT_VERSION..=FORMAT_VERSION).contains(&o.format_version) {
        return Err(config_err(
            "format version",
            format!(
                "{} is not {SHA256_FORMAT_VERSION}, {BLAKE3_FORMAT_VERSION} or {FORMAT_VERSION} (new objects are always bound to their key and repository)",
                o.format_version
            ),
        ));
    }
    if o.lz4 && o.format_version < 3 {
        return Err(config_err(
            "compression",
            format!(
                "LZ4 needs container format version 3 or later (SYNCBRIDGE_FORMAT_VERSION is {})",
                o.format_version
            ),
        ));
    }
    o.part_size = o.part_size.max(MIN_PART);
    o.workers = o.workers.max(1);
    o.upload_concurrency = o.upload_concurrency.max(1);
    o.retry.max_attempts = o.retry.max_attempts.max(1);
    Ok(o)
}

fn open_backend(url_text: &str, opts: &RepoOptions) -> Result<Backend> {
    if url_text.starts_with('/') {
        return local_backend(url_text, PathBuf::from(url_text));
    }
    let url = url::Url::parse(url_text).map_err(|e| config_err(url_text, e))?;
    match url.scheme() {
        "file" => {
            if url
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(config_err(
                    url_text,
                    "file:// URLs take an absolute path (file:///dir)",
                ));
            }
            let path = url
                .to_file_path()
                .map_err(|_| config_err(url_text, "not a valid absolute file path"))?;
            local_backend(url_text, path)
        }
        "memory" => Ok(Backend::Store(StoreBackend {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: clean_prefix(url_text, url.path())?,
            conditional_create: true,
            attributes: Attributes::new(),
            bucket_seen: Default::default(),
        })),
        "s3" | "s3a" => s3_backend(url_text, &url, opts),
        "gs" => {
            let bucket = url.host_str().unwrap_or_default();
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new().with_client_options(
                client_options(url_text, &url, opts, &env_with_prefix("AWS_"))?,
            );
            for (k, v) in env_with_prefix("GOOGLE_") {
                if let Ok(key) = k.parse::<object_store::gcp::GoogleConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            for (k, v) in &opts.store_config {
                let key = <object_store::gcp::GoogleConfigKey as std::str::FromStr>::from_str(
                    &k.to_ascii_lowercase(),
                )
                .map_err(|e| config_err(format!("store option {k}"), e))?;
                b = b.with_config(key, v);
            }
            let store = b
                .with_bucket_name(bucket)
                .with_retry(store_retry(&opts.retry))
                .build()
                .map_err(|e| config_err(url_text, e))?;
            Ok(store_backend(
                url_text,
                &url,
                Arc::new(store),
                true,
                Attributes::new(),
            )?)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new().with_client_options(
                client_options(url_text, &url, opts, &env_with_prefix("AWS_"))?,
            );
            for (k, v) in env_with_prefix("AZURE_") {
                if let Ok(key) = k.parse::<object_store::azure::AzureConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            for (k, v) in &opts.store_config {
                let key = <object_store::azure::AzureConfigKey as std::str::FromStr>::from_str(
                    &k.to_ascii_lowercase(),
                )
                .map_err(|e| config_err(format!("store option {k}"), e))?;
                b = b.with_config(key, v);
            }
            let store = b
                .with_url(url_text.split('?').next().unwrap_or(url_text))
                .with_retry(store_retry(&opts.retry))
                .build()
                .map_err(|e| config_err(url_text, e))?;
            Ok(store_backend(
                url_text,
                &url,
                Arc::new(store),
                true,
                Attributes::new(),
            )?)
        }
        other => Err(config_err(
            url_text,
            format!("unsupported scheme {other:?} (use file://, s3://, gs://, az:// or memory://)"),
        )),
    }
}

fn local_backend(url_text: &str, path: PathBuf) -> Result<Backend> {
    if !path.is_absolute() {
        return Err(config_err(url_text, "the path must be absolute"));
    }
    // Created on first write, so a mistyped URL used for reading creates nothing.
    if path.exists() && !path.is_dir() {
        return Err(config_err(
            url_text,
            format!("{} is not a directory", path.display()),
        ));
    }
    Ok(Backend::Local(LocalBackend { root: path }))
}

fn clean_prefix(url_text: &str, path: &str) -> Result<String> {
    let key = RepoKey::parse(path).map_err(|e| config_err(url_text, format!("prefix: {e}")))?;
    Ok(key.as_str().to_owned())
}

fn store_backend(
    url_text: &str,
    url: &url::Url,
    store: Arc<dyn ObjectStore>,
    conditional_create: bool,
    attributes: Attributes,
) -> Result<Backend> {
    Ok(Backend::Store(StoreBackend {
        store,
        prefix: clean_prefix(url_text, url.path())?,
        conditional_create,
        attributes,
        bucket_seen: Default::default(),
    }))
}

fn store_retry(p: &RetryPolicy) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: p.initial_backoff,
            max_backoff: p.max_backoff,
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: (p.max_elapsed / 2).max(Duration::from_secs(1)),
    }
}

/// `(lower-case name, value)` of environment variables starting with `prefix`, as
/// object_store's `from_env` reads them.
fn env_with_prefix(prefix: &str) -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

fn query(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn parse_bool(url_text: &str, name: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(config_err(
            url_text,
            format!("{name}={v}: expected true or false"),
        )),
    }
}

/// `env`: the `AWS_*` environment as [`env_with_prefix`] gives it (a parameter so tests can
/// choose it).
fn client_options(
    url_text: &str,
    url: &url::Url,
    opts: &RepoOptions,
    env: &[(String, String)],
) -> Result<ClientOptions> {
    let mut co = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(300));
    let bundle = query(url, "ca_bundle")
        .map(PathBuf::from)
        .or_else(|| opts.ca_bundle.clone())
        .or_else(|| {
            env.iter()
                .find(|(k, _)| k == "aws_ca_bundle")
                .map(|(_, v)| PathBuf::from(v))
        });
    if let Some(path) = bundle {
        let pem = std::fs::read(&path)
            .map_err(|e| config_err(format!("CA bundle {}", path.display()), e))?;
        let certs = object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| config_err(format!("CA bundle {}", path.display()), e))?;
        if certs.is_empty() {
            return Err(config_err(
                format!("CA bundle {}", path.display()),
                "no PEM certificates found",
            ));
        }
        for c in certs {
            co = co.with_root_certificate(c);
        }
    }
    if let Some(v) = query(url, "allow_http") {
        co = co.with_allow_http(parse_bool(url_text, "allow_http", &v)?);
    }
    Ok(co)
}

fn s3_backend(url_text: &str, url: &url::Url, opts: &RepoOptions) -> Result<Backend> {
    let (b, conditional, attributes) = s3_builder(url_text, url, opts, &env_with_prefix("AWS_"))?;
    let store = b.build().map_err(|e| config_err(url_text, e))?;
    store_backend(url_text, url, Arc::new(store), conditional, attributes)
}

/// The S3 client as configured by the URL, the `AWS_*` environment `env` (lower-case names,
/// as [`env_with_prefix`] gives them) and the store options, whether conditional puts are
/// on, and the attributes every object gets.
fn s3_builder(
    url_text: &str,
    url: &url::Url,
    opts: &RepoOptions,
    env: &[(String, String)],
) -> Result<(object_store::aws::AmazonS3Builder, bool, Attributes)> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
    use std::str::FromStr;
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| config_err(url_text, "missing bucket (s3://bucket/prefix)"))?;
    let known = [
        "endpoint",
        "region",
        "path_style",
        "allow_http",
        "storage_class",
        "ca_bundle",
        "conditional_put",
        "checksum",
        "unsigned_payload",
    ];
    for (k, _) in url.query_pairs() {
        if !known.contains(&k.as_ref()) {
            return Err(config_err(
                url_text,
                format!("unknown option {k:?} (known: {})", known.join(", ")),
            ));
        }
    }
    // Client options first: `with_client_options` replaces them wholesale, so the
    // environment (e.g. AWS_ALLOW_HTTP) must be applied after it.
    let mut b = AmazonS3Builder::new()
        .with_client_options(client_options(url_text, url, opts, env)?)
        .with_retry(store_retry(&opts.retry));
    let mut env_unsigned = false;
    let mut env_endpoint = false;
    for (k, v) in env {
        if let Ok(key) = AmazonS3ConfigKey::from_str(k) {
            env_unsigned |= matches!(key, AmazonS3ConfigKey::UnsignedPayload);
            env_endpoint |= matches!(key, AmazonS3ConfigKey::Endpoint);
            b = b.with_config(key, v);
        }
    }
    b = b.with_bucket_name(bucket);
    let mut configured_endpoint = false;
    let mut configured_unsigned = false;
    for (k, v) in &opts.store_config {
        let key = AmazonS3ConfigKey::from_str(&k.to_ascii_lowercase())
            .map_err(|e| config_err(format!("store option {k}"), e))?;
        configured_endpoint |= matches!(key, AmazonS3ConfigKey::Endpoint);
        configured_unsigned |= matches!(key, AmazonS3ConfigKey::UnsignedPayload);
        b = b.with_config(key, v);
    }
    if let Some(ep) = query(url, "endpoint") {
        b = b.with_endpoint(ep);
    }
    if let Some(r) = query(url, "region") {
        b = b.with_region(r);
    }
    let custom_endpoint = configured_endpoint || query(url, "endpoint").is_some() || env_endpoint;
    // S3-compatible stores behind a custom endpoint mostly want path-style requests.
    let path_style = match query(url, "path_style") {
        Some(v) => parse_bool(url_text, "path_style", &v)?,
        None => custom_endpoint,
    };
    b = b.with_virtual_hosted_style_request(!path_style);
    if let Some(v) = query(url, "allow_http") {
        b = b.with_config(
            AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp),
            v,
        );
    }
    if let Some(v) = query(url, "checksum") {
        b = b.with_config(AmazonS3ConfigKey::Checksum, v);
    }
    if let Some(v) = query(url, "unsigned_payload") {
        b = b.with_unsigned_payload(parse_bool(url_text, "unsigned_payload", &v)?);
    } else if !env_unsigned && !configured_unsigned {
        b = default_payload_signing(b);
    }
    let conditional = match query(url, "conditional_put").as_deref() {
        None | Some("etag") => true,
        Some("disabled") | Some("none") => false,
        Some(other) => {
            return Err(config_err(
                url_text,
                format!("conditional_put={other}: expected etag or disabled"),
            ))
        }
    };
    b = b.with_conditional_put(if conditional {
        S3ConditionalPut::ETagMatch
    } else {
        S3ConditionalPut::Disabled
    });
    let mut attributes = Attributes::new();
    if let Some(sc) = query(url, "storage_class") {
        attributes.insert(Attribute::StorageClass, sc.into());
    }
    Ok((b, conditional, attributes))
}

/// Whether request bodies are covered by the SigV4 signature, when the operator did not say
/// (`?unsigned_payload=`, `AWS_UNSIGNED_PAYLOAD`, a store option).
///
/// Signing a body means a SHA-256 pass over every byte before it is sent (about 0.6 CPU s
/// per GiB here, as much as the rest of a WAL upload's hashing). Over HTTPS that pass buys
/// little: TLS already keeps the body from being changed in transit, and every object
/// carries its own checksums and key binding (FORMAT.md), checked whenever it is read. So
/// bodies go `UNSIGNED-PAYLOAD` when the endpoint is HTTPS (AWS itself when no endpoint is
/// set), and stay signed over plain HTTP, where the signature is the only thing a man in
/// the middle cannot forge. An endpoint that is not plainly `https://` keeps the
/// signature. Behind a proxy that ends TLS and forwards plain HTTP to the store, the
/// operator keeps it with `unsigned_payload=false`.
fn default_payload_signing(
    b: object_store::aws::AmazonS3Builder,
) -> object_store::aws::AmazonS3Builder {
    use object_store::aws::AmazonS3ConfigKey;
    let https = match b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        None => true,
        Some(endpoint) => endpoint
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://")),
    };
    b.with_unsigned_payload(https)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Bodies are signed over plain HTTP only, unless the operator says otherwise; the
    /// endpoint and the override may come from the URL, a store option or the environment
    /// (given here, so the test does not depend on the one it runs in).
    #[test]
    fn payloads_are_signed_over_http_only_by_default() {
        use object_store::aws::AmazonS3ConfigKey;
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let unsigned = |url_text: &str, store: &[(&str, &str)], env: &[(&str, &str)]| {
            let url = url::Url::parse(url_text).unwrap();
            let opts = RepoOptions {
                store_config: pairs(store),
                ..RepoOptions::default()
            };
            let (b, _, _) = s3_builder(url_text, &url, &opts, &pairs(env)).unwrap();
            b.get_config_value(&AmazonS3ConfigKey::UnsignedPayload)
                .unwrap()
        };
        let https = "s3://b/p?endpoint=https://s3.example:9000";
        let http = "s3://b/p?endpoint=http://127.0.0.1:1&allow_http=true";
        assert_eq!(unsigned(https, &[], &[]), "true");
        assert_eq!(
            unsigned("s3://b/p?endpoint=HTTPS://s3.example", &[], &[]),
            "true"
        );
        assert_eq!(unsigned(http, &[], &[]), "false");
        // No endpoint anywhere: AWS itself, over HTTPS.
        assert_eq!(unsigned("s3://b/p", &[], &[]), "true");
        // The endpoint from the environment or a store option.
        let env_https = [("aws_endpoint_url", "https://minio.internal:9000")];
        let env_http = [("aws_endpoint_url", "http://minio.internal:9000")];
        assert_eq!(unsigned("s3://b/p", &[], &env_https), "true");
        assert_eq!(unsigned("s3://b/p", &[], &env_http), "false");
        assert_eq!(
            unsigned("s3://b/p", &[("endpoint", "https://s")], &env_http),
            "true"
        );
        assert_eq!(
            unsigned("s3://b/p", &[("endpoint", "http://s")], &env_https),
            "false"
        );
        // An endpoint that is not plainly HTTPS keeps the signature (the safe side).
        assert_eq!(
            unsigned("s3://b/p", &[], &[("aws_endpoint", "s3.example")]),
            "false"
        );
        // The operator's word wins either way, from wherever it comes.
        let env_signed = [("aws_unsigned_payload", "false")];
        let env_unsigned = [("aws_unsigned_payload", "true")];
        assert_eq!(unsigned(https, &[], &env_signed), "false");
        assert_eq!(unsigned(http, &[], &env_unsigned), "true");
        assert_eq!(
            unsigned(https, &[("aws_unsigned_payload", "false")], &[]),
            "false"
        );
        assert_eq!(
            unsigned(&format!("{https}&unsigned_payload=false"), &[], &[]),
            "false"
        );
        assert_eq!(
            unsigned(&format!("{http}&unsigned_payload=true"), &[], &[]),
            "true"
        );
        assert_eq!(
            unsigned(
                &format!("{https}&unsigned_payload=false"),
                &[],
                &env_unsigned
            ),
            "false",
            "the URL wins over the environment"
        );
        let bad = "s3://b/p?unsigned_payload=maybe";
        match s3_builder(
            bad,
            &url::Url::parse(bad).unwrap(),
            &RepoOptions::default(),
            &[],
        ) {
            Err(e) => assert!(e.to_string().contains("unsigned_payload=maybe"), "{e}"),
            Ok(_) => panic!("{bad} was accepted"),
        }
    }

    fn err(url: &str, opts: RepoOptions) -> String {
        Repository::open(url, opts).unwrap_err().to_string()
    }

    /// Someone told that credentials do not go in the URL's userinfo tries the query: the
    /// refusal names the option but never shows its value, nor a userinfo.
    #[test]
    fn configuration_errors_never_echo_secrets() {
        let o = RepoOptions::default;
        for url in [
            "s3://b/p?aws_secret_access_key=TOPSECRET",
            "s3://b/p?endpoint=http://h:1&secret=TOPSECRET",
            "s3://KEY:TOPSECRET@/p",
            "ftp://u:TOPSECRET@h/p",
            "file://u:TOPSECRET@host/x",
        ] {
            let e = err(url, o());
            assert!(!e.contains("TOPSECRET") && !e.contains("KEY"), "{url}: {e}");
        }
    }

    #[test]
    fn urls_are_validated() {
        let o = RepoOptions::default;
        assert!(err("ftp://x/y", o()).contains("unsupported scheme"));
        assert!(err("s3:///prefix", o()).contains("missing bucket"));
        assert!(err("s3://b/p?bogus=1", o()).contains("unknown option \"bogus\""));
        assert!(err("s3://b/p?path_style=maybe", o()).contains("expected true or false"));
        assert!(err("s3://b/p?conditional_put=x", o()).contains("etag or disabled"));
        assert!(err("s3://b/bad%20prefix", o()).contains("prefix"));
        assert!(err("file://host/x", o()).contains("absolute path"));
        let bad_level = RepoOptions {
            compression_level: Some(99),
            ..o()
        };
        assert!(err("memory://", bad_level).contains("compression level"));
        for level in [0, MIN_COMPRESSION_LEVEL - 1, 23] {
            let bad = RepoOptions {
                compression_level: Some(level),
                ..o()
            };
            assert!(
                err("memory://", bad).contains("compression level"),
                "{level}"
            );
        }
        let s3 = Repository::open(
            "s3://bucket/some/prefix?endpoint=http://127.0.0.1:1&allow_http=true&region=x&storage_class=STANDARD_IA",
            o(),
        )
        .unwrap();
        assert_eq!(
            s3.url(),
            "s3://bucket/some/prefix",
            "query (may hold secrets) is not shown"
        );
        match &s3.inner.backend {
            Backend::Store(s) => {
                assert_eq!(s.prefix, "some/prefix");
                assert!(s.conditional_create);
                assert_eq!(s.attributes.len(), 1);
            }
            Backend::Local(_) => panic!("expected an object store"),
        }
    }

    #[test]
    fn custom_ca_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let o = |p: &std::path::Path| RepoOptions {
            ca_bundle: Some(p.to_path_buf()),
            ..RepoOptions::default()
        };
        let url = "s3://b/p?endpoint=https://127.0.0.1:1";
        assert!(err(url, o(&missing)).contains("missing.pem"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(err(url, o(&empty)).contains("no PEM certificates"));
        // A real self-signed CA certificate is accepted.
        let cert = dir.path().join("ca.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=sb-test-ca",
            ])
            .arg("-keyout")
            .arg(dir.path().join("ca.key"))
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        Repository::open(url, o(&cert)).unwrap();
    }
}

#[cfg(test)]
mod level_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Negative levels (zstd's fast mode) write ordinary zstd frames: objects read back
    /// and verify like any other, whatever level the reader was opened with.
    #[tokio::test]
    async fn negative_levels_round_trip() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i / 7 % 13) as u8).collect();
        let data = Bytes::from(data);
        let key = RepoKey::parse("postgres/wal/test-object").unwrap();
        for level in [-1, MIN_COMPRESSION_LEVEL] {
            let opts = RepoOptions {
                compression_level: Some(level),
                ..RepoOptions::default()
            };
            let repo = Repository::open("memory://", opts).unwrap();
            let info = repo
                .put(
                    &key,
                    ContentKind::WalSegment,
                    data.clone(),
                    crate::PutMode::Overwrite,
                )
                .await
                .unwrap();
            assert!(
                info.stored_len < data.len() as u64 / 4,
                "{level}: compressed"
            );
            assert_eq!(repo.get(&key).await.unwrap(), data, "{level}");
            repo.verify(&key).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_scoped_view_is_a_repository_under_its_prefix() {
        let repo = Repository::open("memory://", RepoOptions::default()).unwrap();
        let marker = crate::RepoMarker::new(crate::RepoKind::Redis);
        repo.init_marker(&marker).await.unwrap();
        let k = |t: &str| RepoKey::parse(t).unwrap();
        let a = repo.scoped(&k("redis/cluster/shards/s01")).unwrap();
        let b = repo.scoped(&k("redis/cluster/shards/s02")).unwrap();
        let chunk = k("redis/gen/g1/chunks/1-2");
        a.put(
            &chunk,
            ContentKind::RedisCommands,
            Bytes::from_static(b"aa"),
            crate::PutMode::CreateNew,
        )
        .await
        .unwrap();
        b.put(
            &chunk,
            ContentKind::RedisCommands,
            Bytes::from_static(b"bb"),
            crate::PutMode::CreateNew,
        )
        .await
        .unwrap();
        assert_eq!(a.get(&chunk).await.unwrap(), Bytes::from_static(b"aa"));
        assert_eq!(b.get(&chunk).await.unwrap(), Bytes::from_static(b"bb"));
        // The view lists its own keys, relative to it; the store holds them under the prefix.
        let listed: Vec<String> = a
            .list(&k("redis/gen"))
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key.to_string())
            .collect();
        assert_eq!(listed, ["redis/gen/g1/chunks/1-2"]);
        assert_eq!(
            a.list_dirs(&k("redis/gen")).await.unwrap(),
            [k("redis/gen/g1")]
        );
        assert!(repo
            .exists(&k("redis/cluster/shards/s02/redis/gen/g1/chunks/1-2"))
            .await
            .unwrap());
        assert!(repo.list(&k("redis/gen")).await.unwrap().is_empty());
        // The marker is the repository's; leases stay under leases/.
        assert!(a.exists(&crate::layout::marker()).await.unwrap());
        assert_eq!(
            a.read_marker().await.unwrap(),
            repo.read_marker().await.unwrap()
        );
        assert_eq!(a.read_marker().await.unwrap().unwrap().kind, marker.kind);
        assert_eq!(
            a.full_key(&k("leases/redis-stream/0000000000000001"))
                .as_str(),
            "leases/redis/cluster/shards/s01/redis-stream/0000000000000001"
        );
        // Nested views compose; the root of a view is its prefix.
        let nested = a.scoped(&k("x")).unwrap();
        assert_eq!(
            nested.full_key(&RepoKey::root()).as_str(),
            "redis/cluster/shards/s01/x"
        );
        // An object moved from one view to the other is refused: bound to its full key.
        let stolen = repo
            .get(&k("redis/cluster/shards/s01/redis/gen/g1/chunks/1-2"))
            .await
            .unwrap();
        assert_eq!(stolen, Bytes::from_static(b"aa"));
        let path = |s: &str| format!("redis/cluster/shards/{s}/redis/gen/g1/chunks/1-2");
        let Backend::Store(store) = &repo.inner.backend else {
            panic!("memory is an object store")
        };
        let raw = store
            .store
            .get(&store.path(&k(&path("s01"))))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        b.delete(&chunk).await.unwrap();
        store
            .store
            .put(&store.path(&k(&path("s02"))), raw.into())
            .await
            .unwrap();
        let err = b.get(&chunk).await.unwrap_err().to_string();
        assert!(
            err.contains("it was written for redis/cluster/shards/s01"),
            "{err}"
        );
        a.delete(&chunk).await.unwrap();
        assert!(!a.exists(&chunk).await.unwrap());
        assert!(repo.scoped(&RepoKey::root()).is_err());
        assert!(repo.scoped(&k("leases/x")).is_err());
    }
}
