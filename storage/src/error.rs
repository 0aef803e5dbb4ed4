//! Errors of the repository. Every variant that concerns one object names its key, so an
//! operator reading a log line knows which object to look at, and says whether retrying
//! could help (`is_retryable`), so callers such as `wal-fetch` can tell "this segment does
//! not exist" (exit 1, recovery ends) from "the store is unwell" (retry, then fail hard).

use std::fmt;

/// Everything that can go wrong in the repository.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The object does not exist. Only this variant means "truly absent".
    #[error("object {key} not found in the repository")]
    NotFound {
        /// The key that was looked up.
        key: String,
    },

    /// The repository itself (a local directory) does not exist, so nothing can be said
    /// about the object: not the same as `NotFound`. A new repository is created by its
    /// first write (`init_marker`).
    #[error("object {key}: the repository directory {location} does not exist (not mounted, wrong URL, or not initialised yet)")]
    RepositoryMissing {
        /// The object looked up.
        key: String,
        /// The missing directory.
        location: String,
    },

    /// A create-new write found an object already at the key; it was not overwritten.
    #[error("object {key} already exists in the repository (not overwritten)")]
    AlreadyExists {
        /// The key that was written.
        key: String,
    },

    /// A stored object failed verification: it is damaged, truncated or not ours.
    #[error(
        "object {key} is corrupt: {check} check failed at stored offset {offset}: expected {expected}, found {actual}"
    )]
    Corrupt {
        /// The object.
        key: String,
        /// Which check failed (e.g. "header magic", "frame crc32c", "sha256").
        check: &'static str,
        /// What the format says should be there.
        expected: String,
        /// What was found.
        actual: String,
        /// Byte offset in the stored object where the failing structure starts.
        offset: u64,
    },

    /// An intact object that is not the one its key names: written for another key, copied
    /// from another repository, plaintext in an encrypted repository, or an unbound
    /// (format version 1) object in a repository whose objects are all bound. Someone or
    /// something put it there; it is never served.
    #[error("object {key} is refused: {reason}")]
    WrongObject {
        /// The key that was read.
        key: String,
        /// What the object is instead, naming both sides.
        reason: String,
    },

    /// The object was written by a newer format version this build cannot read.
    #[error(
        "object {key} uses container format version {version}, this build reads up to {supported}"
    )]
    UnsupportedVersion {
        /// The object.
        key: String,
        /// Version found in the header.
        version: u16,
        /// Highest version this build understands.
        supported: u16,
    },

    /// The object is encrypted and no identity was given.
    #[error(
        "object {key} is encrypted to recipient(s) {recipients}; pass an age identity file (--identity) to read it"
    )]
    IdentityRequired {
        /// The object.
        key: String,
        /// Short fingerprints of the recipients the object is encrypted to.
        recipients: String,
    },

    /// Decryption failed: wrong identity, or the ciphertext was tampered with.
    #[error("object {key}: cannot decrypt frame at stored offset {offset}: {reason}")]
    Decrypt {
        /// The object.
        key: String,
        /// Offset of the frame.
        offset: u64,
        /// What age reported.
        reason: String,
    },

    /// Encryption or compression failed while writing (should not happen; names the cause).
    #[error("object {key}: encoding failed: {reason}")]
    Encode {
        /// The object.
        key: String,
        /// The cause.
        reason: String,
    },

    /// The object store failed. `retryable` says whether trying again later could succeed;
    /// the message names the operation, the attempts made and the last cause.
    #[error("object {key}: {op} failed{} ({}): {source}", attempts_note(*.attempts), if *.retryable { "transient, retryable" } else { "permanent" })]
    Backend {
        /// The object or prefix.
        key: String,
        /// What was being done ("put", "get", "list", "upload part", ...).
        op: &'static str,
        /// Whether the cause is transient.
        retryable: bool,
        /// How many attempts were made, including retries.
        attempts: u32,
        /// The last cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A local file-system operation failed (file:// repositories).
    #[error("object {key}: {op} {path}: {source}")]
    Io {
        /// The object or prefix.
        key: String,
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },

    /// A key or key component is not valid (see `layout`).
    #[error("invalid repository key {key:?}: {reason}")]
    InvalidKey {
        /// The rejected text.
        key: String,
        /// Why.
        reason: String,
    },

    /// The repository URL or an option is invalid.
    #[error("invalid repository configuration {what}: {reason}")]
    Config {
        /// The URL or option.
        what: String,
        /// Why.
        reason: String,
    },

    /// The repository marker disagrees with how the repository is being opened.
    #[error("repository marker mismatch: {reason}")]
    MarkerMismatch {
        /// What differs.
        reason: String,
    },

    /// A streaming write ended without finish (aborted or a previous error).
    #[error("object {key}: writer is no longer usable: {reason}")]
    WriterClosed {
        /// The object.
        key: String,
        /// Why.
        reason: String,
    },
}

impl StorageError {
    /// Whether trying the same operation again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StorageError::Backend {
                retryable: true,
                ..
            }
        ) || matches!(self, StorageError::Io { source, .. } if io_retryable(source))
    }

    /// True only when the object is absent (not when the store could not be asked).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    /// True for any failed verification of stored bytes.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StorageError::Corrupt { .. } | StorageError::WrongObject { .. }
        )
    }

    /// The key the error is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            StorageError::NotFound { key }
            | StorageError::RepositoryMissing { key, .. }
            | StorageError::AlreadyExists { key }
            | StorageError::Corrupt { key, .. }
            | StorageError::WrongObject { key, .. }
            | StorageError::UnsupportedVersion { key, .. }
            | StorageError::IdentityRequired { key, .. }
            | StorageError::Decrypt { key, .. }
            | StorageError::Encode { key, .. }
            | StorageError::Backend { key, .. }
            | StorageError::Io { key, .. }
            | StorageError::WriterClosed { key, .. } => Some(key),
            StorageError::InvalidKey { .. }
            | StorageError::Config { .. }
            | StorageError::MarkerMismatch { .. } => None,
        }
    }

    pub(crate) fn corrupt(
        key: impl fmt::Display,
        check: &'static str,
        expected: impl fmt::Display,
        actual: impl fmt::Display,
        offset: u64,
    ) -> Self {
        StorageError::Corrupt {
            key: key.to_string(),
            check,
            expected: expected.to_string(),
            actual: actual.to_string(),
            offset,
        }
    }

    pub(crate) fn io(
        key: impl fmt::Display,
        op: &'static str,
        path: &std::path::Path,
        source: std::io::Error,
    ) -> Self {
        StorageError::Io {
            key: key.to_string(),
            op,
            path: path.display().to_string(),
            source,
        }
    }
}

fn attempts_note(attempts: u32) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts")
    } else {
        String::new()
    }
}

fn io_retryable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        Interrupted | TimedOut | WouldBlock | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Shorthand used throughout the crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
