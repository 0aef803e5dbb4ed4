//! The object stores under a repository: any `object_store` backend (S3 and compatibles,
//! GCS, Azure, in-memory) or the local file system, which we implement ourselves because
//! `object_store`'s `LocalFileSystem` renames into place without fsyncing the file or the
//! directory, so a power loss could leave a named but empty object.
//!
//! One file per concern:
//! * this file: [`Backend`], the dispatch of every operation to an `object_store` or to
//!   the local directory, and the `object_store` side of it;
//! * [`local`]: the local directory (fsync, atomic publish, permissions);
//! * [`classify`]: store errors mapped to `StorageError`s that name the key and say
//!   whether they are transient;
//! * [`retry`]: [`RetryPolicy`], and which layer retries what (read its module docs
//!   before adding a retry loop anywhere).

mod classify;
mod local;
mod retry;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{Attributes, GetOptions, GetRange, ObjectStore, PutOptions, PutPayload};

use crate::error::{Result, StorageError};
use crate::layout::RepoKey;
use crate::PutMode;

use classify::{map_err, missing_bucket, not_implemented};
pub(crate) use local::{LocalBackend, LocalUpload};
pub use retry::RetryPolicy;

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

    pub(crate) fn path(&self, key: &RepoKey) -> StorePath {
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
            Backend::Local(l) => l.list_dirs(prefix).await?,
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
