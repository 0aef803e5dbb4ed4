//! The repository: where every byte the agent reads from a server becomes durable.
//!
//! Everything the agent stores goes through one pipeline into one repository: cut into
//! frames, compressed (zstd), checksummed (CRC32C per frame and per object, SHA-256 of the
//! original bytes), optionally encrypted to age X25519 recipients, and uploaded in parts
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
//! * [`Repository`]: `open(url, RepoOptions)`, `put`, `writer`/`writer_with_len`, `get`,
//!   `reader`, `info`, `verify`, `list`, `exists`, `delete`, `read_marker`, `init_marker`.
//! * [`layout`]: the only place keys are built ([`RepoKey`], WAL, base backups, Redis).
//! * [`RepoMarker`]: what the repository holds; `init_marker` creates or returns it.
//! * [`StorageError`]: names the key; `is_not_found()`, `is_retryable()`, `is_corrupt()`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
pub mod error;
pub mod format;
mod frame;
pub mod keys;
pub mod layout;
mod marker;
mod reader;
mod repo;
mod writer;

pub use backend::{ObjectMeta, RetryPolicy};
pub use error::{Result, StorageError};
pub use format::ContentKind;
pub use layout::RepoKey;
pub use marker::{EncryptionInfo, MarkerInit, RepoKind, RepoMarker};
pub use reader::ObjectReader;
pub use repo::{ObjectInfo, RepoOptions, Repository, VerifyReport};
pub use writer::ObjectWriter;

/// Whether a write may replace an existing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with `StorageError::AlreadyExists` if the key exists (atomic where the store
    /// supports conditional create; otherwise checked just before publishing).
    CreateNew,
    /// Replace whatever is there.
    Overwrite,
}
