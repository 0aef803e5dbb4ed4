//! The repository marker: the first object of a repository, saying what it holds
//! (PostgreSQL cluster or Redis replication history), which format it uses and whether it
//! is encrypted. It is never encrypted itself, so a reader without the identity learns
//! that it needs one; streams compare it on every start so two clusters never share a
//! repository by accident.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::format::{ContentKind, FORMAT_VERSION};
use crate::layout;
use crate::repo::Repository;
use crate::PutMode;

/// What kind of server the repository backs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoKind {
    /// A PostgreSQL cluster (WAL and base backups).
    Postgres,
    /// A Redis or Valkey server (snapshots and command streams).
    Redis,
}

/// How objects in the repository are encrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// Always "age-x25519" for now.
    pub scheme: String,
    /// Short fingerprints of the recipients (see `frame::short_fingerprint`).
    pub recipients: Vec<String>,
}

/// The repository marker (stored as JSON in a container object at `layout::marker()`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoMarker {
    /// What the repository backs up.
    pub kind: RepoKind,
    /// Container format version of the repository.
    pub format_version: u16,
    /// PostgreSQL `system_identifier` (IDENTIFY_SYSTEM), as decimal text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// Redis replication id the repository started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_id: Option<String>,
    /// Encryption, when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
}

impl RepoMarker {
    /// A marker for a new repository of `kind`; encryption is filled in by `init_marker`.
    pub fn new(kind: RepoKind) -> Self {
        RepoMarker {
            kind,
            format_version: FORMAT_VERSION,
            system_identifier: None,
            replication_id: None,
            encryption: None,
        }
    }
}

/// Outcome of `Repository::init_marker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkerInit {
    /// The marker was written now.
    Created(RepoMarker),
    /// A marker was already there; compare it with what you expected.
    Existing(RepoMarker),
}

impl MarkerInit {
    /// The marker in the repository, either way.
    pub fn marker(&self) -> &RepoMarker {
        match self {
            MarkerInit::Created(m) | MarkerInit::Existing(m) => m,
        }
    }
}

impl Repository {
    fn encryption_info(&self) -> Option<EncryptionInfo> {
        self.encrypts().then(|| EncryptionInfo {
            scheme: "age-x25519".into(),
            recipients: self.recipient_fingerprints(),
        })
    }

    /// Reads the marker; `Ok(None)` if the repository has none yet.
    pub async fn read_marker(&self) -> Result<Option<RepoMarker>> {
        let key = layout::marker();
        let data = match self.get_unencrypted(&key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(None),
            // A local repository directory that does not exist yet: a new repository.
            Err(StorageError::RepositoryMissing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| StorageError::corrupt(&key, "marker JSON", "a repository marker", e, 0))
    }

    async fn get_unencrypted(&self, key: &layout::RepoKey) -> Result<Bytes> {
        // The marker is written without encryption even in encrypted repositories.
        self.without_encryption().get(key).await
    }

    /// Writes the marker if there is none (create-new, never overwriting) and returns what
    /// is in the repository. The `encryption` field is set from the repository's
    /// recipients. An existing marker whose encryption disagrees with how the repository
    /// was opened is an error (`MarkerMismatch`), so plaintext never lands in an encrypted
    /// repository or the other way round; other fields are for the caller to compare.
    pub async fn init_marker(&self, marker: &RepoMarker) -> Result<MarkerInit> {
        let mut marker = marker.clone();
        marker.encryption = self.encryption_info();
        if let Some(existing) = self.read_marker().await? {
            return self.check_encryption(existing).map(MarkerInit::Existing);
        }
        let json = serde_json::to_vec_pretty(&marker).map_err(|e| StorageError::Encode {
            key: layout::marker().to_string(),
            reason: e.to_string(),
        })?;
        let plain = self.without_encryption();
        match plain
            .put(
                &layout::marker(),
                ContentKind::Marker,
                Bytes::from(json),
                PutMode::CreateNew,
            )
            .await
        {
            Ok(_) => Ok(MarkerInit::Created(marker)),
            Err(StorageError::AlreadyExists { .. }) => {
                let existing = self
                    .read_marker()
                    .await?
                    .ok_or_else(|| StorageError::NotFound {
                        key: layout::marker().to_string(),
                    })?;
                self.check_encryption(existing).map(MarkerInit::Existing)
            }
            Err(e) => Err(e),
        }
    }

    fn check_encryption(&self, existing: RepoMarker) -> Result<RepoMarker> {
        match (&existing.encryption, self.encrypts()) {
            (Some(enc), false) => Err(StorageError::MarkerMismatch {
                reason: format!(
                    "the repository is encrypted ({} to {}) but no recipients were given; pass the same --recipient(s)",
                    enc.scheme,
                    enc.recipients.join(", ")
                ),
            }),
            (None, true) => Err(StorageError::MarkerMismatch {
                reason: "the repository is not encrypted but recipients were given; refusing to mix encrypted and plain objects".into(),
            }),
            _ => Ok(existing),
        }
    }

    fn without_encryption(&self) -> Repository {
        Repository {
            inner: std::sync::Arc::new(crate::repo::RepoInner {
                backend: self.inner.backend.clone(),
                url: self.inner.url.clone(),
                opts: self.inner.opts.clone(),
                keys: std::sync::Arc::new(Default::default()),
                cpu: self.inner.cpu.clone(),
            }),
        }
    }
}
