//! The repository marker: the first object of a repository, saying what it holds
//! (PostgreSQL cluster or Redis replication history), which format it uses and whether it
//! is encrypted. It is never encrypted itself, so a reader without the identity learns
//! that it needs one; streams compare it on every start so two clusters never share a
//! repository by accident.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::binding::RepoContext;
use crate::error::{Result, StorageError};
use crate::format::{Binding, ContentKind, RepoId, FORMAT_VERSION};
use crate::layout;
use crate::repo::Repository;
use crate::writer::ObjectWriter;
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
    /// The repository's id (32 hex digits), bound into every object's header so an object
    /// copied from another repository is refused. Absent in repositories created by
    /// format version 1 builds (see `binding` for how those are read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
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
            repository_id: None,
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
    /// Also learns the repository's context from it when none is known yet, so a command
    /// that reads the marker and then objects (wal-fetch, restore) reads it once.
    pub async fn read_marker(&self) -> Result<Option<RepoMarker>> {
        let found = self.read_marker_bytes().await?;
        if self.cached_context().is_none() {
            // A marker this handle must refuse is refused when an object is read.
            if let Ok(ctx) = self.context_from(found.as_ref()) {
                self.set_context(ctx);
            }
        }
        Ok(found.map(|(m, _)| m))
    }

    /// The marker and its stored JSON (from which an old repository's id is derived).
    async fn read_marker_bytes(&self) -> Result<Option<(RepoMarker, Bytes)>> {
        let key = layout::marker();
        let plain = self.without_encryption();
        let mut reader = match plain.reader(&key).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Ok(None),
            // A local repository directory that does not exist yet: a new repository.
            Err(StorageError::RepositoryMissing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let header = reader.header().clone();
        let mut data = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            data.extend_from_slice(&chunk);
        }
        let marker: RepoMarker = serde_json::from_slice(&data)
            .map_err(|e| StorageError::corrupt(&key, "marker JSON", "a repository marker", e, 0))?;
        if let Some(id) = &marker.repository_id {
            let id = RepoId::from_hex(id).ok_or_else(|| {
                StorageError::corrupt(&key, "marker repository_id", "32 hex digits", id, 0)
            })?;
            if let Some(b) = &header.binding {
                if b.repo_id != id {
                    return Err(StorageError::corrupt(
                        &key,
                        "marker header repository id",
                        id,
                        b.repo_id,
                        0,
                    ));
                }
            }
        }
        Ok(Some((marker, Bytes::from(data))))
    }

    /// What every object of this repository must be, read from the marker once per
    /// `Repository` (see `binding`).
    ///
    /// The marker itself is not authenticated (it is never encrypted), so a reader holding
    /// an identity does not let it turn encryption off: a marker without encryption is
    /// refused, and without a marker plaintext objects are refused. Otherwise anyone who
    /// can write to the bucket could replace the marker by an unencrypted one and then
    /// inject plaintext objects bound to it.
    ///
    /// Boxed: reading the marker goes through the object reader, which asks for the
    /// context of every other key.
    pub(crate) fn context(&self) -> futures::future::BoxFuture<'_, Result<Arc<RepoContext>>> {
        Box::pin(async move {
            if let Some(ctx) = self.cached_context() {
                return Ok(ctx);
            }
            let found = self.read_marker_bytes().await?;
            let ctx = self.context_from(found.as_ref())?;
            self.set_context(ctx.clone());
            Ok(ctx)
        })
    }

    /// The context a marker (or its absence) gives this handle.
    fn context_from(&self, found: Option<&(RepoMarker, Bytes)>) -> Result<Arc<RepoContext>> {
        Ok(match found {
            Some((marker, _)) if marker.encryption.is_none() && self.can_decrypt() => {
                return Err(StorageError::WrongObject {
                        key: layout::marker().to_string(),
                        reason: "it says the repository is not encrypted, but an identity was given. \
                                 The marker is not authenticated: someone who can write to the bucket \
                                 could rewrite it to turn off the refusal of plaintext objects. If this \
                                 repository really is not encrypted, do not pass --identity (or unset \
                                 SYNCBRIDGE_IDENTITY)"
                            .into(),
                    });
            }
            Some((marker, json)) => Arc::new(context_of(marker, json)?),
            // No marker (a new repository, or one whose marker was deleted): a reader
            // holding an identity still takes only encrypted objects.
            None => Arc::new(RepoContext {
                encrypted: self.can_decrypt(),
                ..RepoContext::unmarked()
            }),
        })
    }

    fn cached_context(&self) -> Option<Arc<RepoContext>> {
        self.inner
            .context
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_context(&self, ctx: Arc<RepoContext>) {
        *self
            .inner
            .context
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(ctx);
    }

    /// The repository's id: from the marker, derived from an old marker's bytes, or the
    /// all-zero id while there is no marker.
    pub async fn repository_id(&self) -> Result<RepoId> {
        Ok(self.context().await?.repo_id)
    }

    /// Writes the marker if there is none (create-new, never overwriting) and returns what
    /// is in the repository. The `encryption` field is set from the repository's
    /// recipients. An existing marker whose encryption disagrees with how the repository
    /// was opened is an error (`MarkerMismatch`), so plaintext never lands in an encrypted
    /// repository or the other way round; other fields are for the caller to compare.
    pub async fn init_marker(&self, marker: &RepoMarker) -> Result<MarkerInit> {
        let mut marker = marker.clone();
        marker.encryption = self.encryption_info();
        let id = RepoId::random();
        marker.repository_id = Some(id.to_hex());
        marker.format_version = self.inner.opts.format_version;
        if let Some((existing, json)) = self.read_marker_bytes().await? {
            self.set_context(Arc::new(context_of(&existing, &json)?));
            return self.check_encryption(existing).map(MarkerInit::Existing);
        }
        let json = serde_json::to_vec_pretty(&marker).map_err(|e| StorageError::Encode {
            key: layout::marker().to_string(),
            reason: e.to_string(),
        })?;
        let plain = self.without_encryption();
        let key = layout::marker();
        let written = async {
            let binding = Binding {
                repo_id: id,
                key: key.as_str().to_owned(),
            };
            let len = Some(json.len() as u64);
            let mut w = ObjectWriter::new(
                plain.inner.clone(),
                key.clone(),
                ContentKind::Marker,
                PutMode::CreateNew,
                len,
                binding,
            )?;
            w.write(Bytes::from(json)).await?;
            w.finish().await
        };
        match written.await {
            Ok(_) => {
                self.set_context(Arc::new(RepoContext {
                    repo_id: id,
                    encrypted: marker.encryption.is_some(),
                    bound_only: true,
                }));
                Ok(MarkerInit::Created(marker))
            }
            Err(StorageError::AlreadyExists { .. }) => {
                let (existing, json) =
                    self.read_marker_bytes()
                        .await?
                        .ok_or_else(|| StorageError::NotFound {
                            key: key.to_string(),
                        })?;
                self.set_context(Arc::new(context_of(&existing, &json)?));
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

    pub(crate) fn without_encryption(&self) -> Repository {
        let mut inner = crate::repo::RepoInner::new(
            self.inner.backend.clone(),
            self.inner.url.clone(),
            self.inner.opts.clone(),
            Arc::new(Default::default()),
        );
        inner.cpu = self.inner.cpu.clone();
        Repository {
            inner: Arc::new(inner),
            scope: self.scope.clone(),
        }
    }
}

/// The context a marker defines. A marker without an id (written by a format version 1
/// build) gets one derived from its stored bytes, and its repository keeps accepting
/// unbound objects.
fn context_of(marker: &RepoMarker, json: &[u8]) -> Result<RepoContext> {
    let encrypted = marker.encryption.is_some();
    match &marker.repository_id {
        Some(text) => {
            let repo_id = RepoId::from_hex(text).ok_or_else(|| {
                StorageError::corrupt(
                    layout::marker(),
                    "marker repository_id",
                    "32 hex digits",
                    text,
                    0,
                )
            })?;
            Ok(RepoContext {
                repo_id,
                encrypted,
                bound_only: true,
            })
        }
        None => {
            let digest = Sha256::digest(json);
            let mut id = [0u8; 16];
            id.copy_from_slice(&digest[..16]);
            Ok(RepoContext {
                repo_id: RepoId(id),
                encrypted,
                bound_only: false,
            })
        }
    }
}
