//! The repository: where every byte the agent reads from a server becomes durable.
//!
//! Everything the agent stores goes through one pipeline into one repository: cut into
//! frames, compressed (zstd or LZ4), checksummed (CRC32C per frame and per object, a digest
//! of the original bytes bound to key and repository: in format version 4 XXH3-128, or
//! BLAKE3 when encrypted, inside SHA-256; BLAKE3 or SHA-256 in older objects), optionally encrypted to age X25519 recipients, and uploaded in parts
//! with bounded memory. Objects use the versioned container described in
//! `storage/FORMAT.md`; readers verify everything.
//!
//! # API at a glance
//!
//! ```no_run
//! # async fn demo() -> Result<(), storage::StorageError> {
//! use bytes::Bytes;
//! use storage::{layout, ContentKind, PutMode, RepoOptions, Repository};
//!
//! let repo = Repository::open("file:///var/lib/syncbridge/repo", RepoOptions::default())?;
//! let seg = layout::WalSegmentName::parse("000000010000000000000003")?;
//! let key = layout::wal_segment(&seg);
//!
//! // Small object in one call; CreateNew never overwrites.
//! match repo.put(&key, ContentKind::WalSegment, Bytes::from_static(b"..."), PutMode::CreateNew).await {
//!     Ok(info) => println!("stored {} sha256 {}", info.key, info.sha256_hex()),
//!     Err(e) if matches!(e, storage::StorageError::AlreadyExists { .. }) => {
//!         let existing = repo.info(&key).await?; // header + trailer only
//!         println!("already there with sha256 {}", existing.sha256_hex());
//!     }
//!     Err(e) => return Err(e),
//! }
//!
//! // Streams: bounded memory whatever the size; nothing visible until finish().
//! let mut w = repo.writer(&key, ContentKind::WalSegment, PutMode::Overwrite).await?;
//! w.write(Bytes::from_static(b"more")).await?;
//! let info = w.finish().await?;
//!
//! // Reading: get() for small objects, reader() to stream (verified chunks).
//! let all = repo.get(&key).await?;
//! let mut r = repo.reader(&key).await?;
//! while let Some(chunk) = r.next_chunk().await? { let _ = chunk; }
//! # let _ = (info, all); Ok(()) }
//! ```
//!
//! * [`Repository`] (cheap `Clone`): `open(url, RepoOptions)`; `put(key, kind, Bytes,
//!   PutMode) -> ObjectInfo`; `writer(key, kind, mode)` / `writer_with_len(.., Some(len))`
//!   -> [`ObjectWriter`] (`write(Bytes)`, `finish() -> ObjectInfo`, `abort()`;
//!   `keep_records` + `finish_with_records` -> [`EncodedRecord`]s that `append_encoded`
//!   puts into another object holding the same bytes without encoding them again); `get(key)
//!   -> Bytes`; `reader(key)` -> [`ObjectReader`] (`next_chunk()`, `Stream`,
//!   `into_async_read()`); `info(key)` (header + trailer only: length, SHA-256);
//!   `verify(key)`; `list(prefix) -> Vec<ObjectMeta>`; `list_dirs(prefix)`; `exists`;
//!   `delete`; `read_marker`; `from_store(Arc<dyn ObjectStore>, ..)` for custom stores;
//!   `init_marker(&RepoMarker) -> MarkerInit::{Created, Existing}`.
//! * [`RepoOptions`]: compression level, frame/part sizes, workers, upload concurrency,
//!   age `recipients` / `identities` (see [`keys`]), [`RetryPolicy`], CA bundle,
//!   `store_config` (object_store keys such as `aws_access_key_id`).
//! * [`layout`]: the only place keys are built ([`RepoKey`], `wal_segment`, `wal_partial`,
//!   `timeline_history`, `base_backup_chunk`/`_manifest`, `redis_snapshot`, `redis_chunk`,
//!   `redis_generation_manifest`) and parsed back (`parse_wal_key`, ...).
//! * [`Lease`]: one writer per stream (`acquire` waits for a live holder, takes over an
//!   expired lease with a create-new write; `check` before every write).
//! * [`RepoMarker`]: what the repository holds; `init_marker` creates or returns it and
//!   refuses to mix encrypted and plain objects.
//! * [`StorageError`]: every variant names its key; `is_not_found()` (only a true absence),
//!   `is_retryable()`, `is_corrupt()`; `Corrupt { key, check, expected, actual, offset }`.
//! * [`mod@format`]: the container layout (specified in `storage/FORMAT.md`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod binding;
pub mod crc;
pub mod error;
pub mod format;
mod frame;
pub mod keys;
pub mod layout;
pub mod lease;
mod marker;
mod reader;
mod redact;
mod repo;
mod workers;
mod writer;

pub use backend::{ObjectMeta, RetryPolicy};
pub use error::{Result, StorageError};
pub use format::{Binding, ContentKind, RepoId};
pub use layout::{LeaseScope, RepoKey};
pub use lease::{Lease, LeaseError, LeaseGuard, LeaseOptions};
pub use marker::{EncryptionInfo, MarkerInit, RepoKind, RepoMarker};
pub use reader::ObjectReader;
pub use redact::redact_url;
pub use repo::{
    ObjectInfo, RepoOptions, Repository, VerifyReport, BACKENDS, MIN_COMPRESSION_LEVEL,
};
pub use writer::{EncodedRecord, ObjectWriter};

/// Whether a write may replace an existing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with `StorageError::AlreadyExists` if the key exists (atomic where the store
    /// supports conditional create; otherwise checked just before publishing).
    CreateNew,
    /// Replace whatever is there.
    Overwrite,
}
