//! Retry and resume paths with a store wrapper that injects failures (in the manner of
//! Neon's `simulate_failures`): transfers cut off mid-body, failed PUTs, failed HEADs.
#![allow(clippy::unwrap_used)]

mod support;

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository, RetryPolicy, StorageError};

/// Wraps a store; the first `cut_gets` GET bodies end with an error after `cut_after`
/// bytes, the first `fail_puts` single PUTs fail with a transient error.
#[derive(Debug)]
struct Flaky {
    inner: InMemory,
    cut_gets: AtomicUsize,
    cut_after: usize,
    fail_puts: AtomicUsize,
    gets: AtomicUsize,
    puts: AtomicUsize,
}

impl fmt::Display for Flaky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flaky")
    }
}

fn transient(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "Flaky",
        source: format!("{what}: connection reset by peer").into(),
    }
}

fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        if take(&self.fail_puts) {
            // Half the failures happen after the store applied the write (lost reply).
            if self.puts.load(Ordering::SeqCst) % 2 == 0 {
                self.inner.put_opts(location, payload, opts).await?;
            }
            return Err(transient("put"));
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let mut res = self.inner.get_opts(location, options).await?;
        if take(&self.cut_gets) {
            let GetResultPayload::Stream(stream) = res.payload else {
                unreachable!("memory store streams")
            };
            let limit = self.cut_after;
            let mut sent = 0usize;
            let cut: BoxStream<'static, object_store::Result<Bytes>> = stream
                .flat_map(move |item| {
                    let out: Vec<object_store::Result<Bytes>> = match item {
                        Ok(b) if sent + b.len() > limit => {
                            let head = b.slice(..limit - sent);
                            sent = limit;
                            vec![Ok(head), Err(transient("body"))]
                        }
                        Ok(b) => {
                            sent += b.len();
                            vec![Ok(b)]
                        }
                        Err(e) => vec![Err(e)],
                    };
                    futures::stream::iter(out)
                })
                .take_while({
                    let mut failed = false;
                    move |r| {
                        let keep = !failed;
                        failed |= r.is_err();
                        futures::future::ready(keep)
                    }
                })
                .boxed();
            res.payload = GetResultPayload::Stream(cut);
        }
        Ok(res)
    }

    async fn get_range(&self, location: &Path, range: Range<u64>) -> object_store::Result<Bytes> {
        self.inner.get_range(location, range).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

fn flaky(cut_gets: usize, cut_after: usize, fail_puts: usize) -> Arc<Flaky> {
    Arc::new(Flaky {
        inner: InMemory::new(),
        cut_gets: AtomicUsize::new(cut_gets),
        cut_after,
        fail_puts: AtomicUsize::new(fail_puts),
        gets: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
    })
}

fn opts() -> RepoOptions {
    RepoOptions {
        frame_size: 64 << 10,
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_elapsed: Duration::from_secs(10),
        },
        ..RepoOptions::default()
    }
}

fn data(n: usize) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn reads_resume_after_cut_transfers() {
    let store = flaky(0, 0, 0);
    let repo = Repository::from_store(store.clone(), "p", "flaky://", opts()).unwrap();
    let key = RepoKey::parse("obj").unwrap();
    let d = data(3 << 20);
    let info = repo
        .put(&key, ContentKind::Other, d.clone(), PutMode::CreateNew)
        .await
        .unwrap();
    let third = (info.stored_len / 3) as usize;

    // Two transfers in a row break part-way; the reader resumes from where it was.
    let store2 = Arc::new(Flaky {
        inner: store.inner.fork(),
        cut_gets: AtomicUsize::new(2),
        cut_after: third,
        fail_puts: AtomicUsize::new(0),
        gets: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
    });
    let repo2 = Repository::from_store(store2.clone(), "p", "flaky://", opts()).unwrap();
    // Learn the repository's context (one marker GET) before counting the object's GETs.
    repo2.repository_id().await.unwrap();
    store2.gets.store(0, Ordering::SeqCst);
    let got = repo2.get(&key).await.map_err(|e| e.to_string());
    assert!(
        got.as_ref().is_ok_and(|g| *g == d),
        "{:?}",
        got.map(|g| g.len())
    );
    assert_eq!(
        store2.gets.load(Ordering::SeqCst),
        3,
        "one GET plus two resumes"
    );

    // A transfer that keeps breaking ends in a clear, retryable error naming the object.
    let store3 = Arc::new(Flaky {
        inner: store.inner.fork(),
        cut_gets: AtomicUsize::new(usize::MAX),
        cut_after: 1000,
        fail_puts: AtomicUsize::new(0),
        gets: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
    });
    let repo3 = Repository::from_store(store3, "p", "flaky://", opts()).unwrap();
    let Err(e) = repo3.get(&key).await else {
        panic!("a transfer that never gets far must fail")
    };
    assert!(e.is_retryable(), "{e}");
    assert!(
        e.to_string().contains("obj") && e.to_string().contains("connection reset"),
        "{e}"
    );
}

#[tokio::test]
async fn create_new_put_survives_lost_replies() {
    // The first PUT fails before applying, the second after applying (reply lost): the
    // retry then finds "already exists", recognises its own object and succeeds.
    let store = flaky(0, 0, 2);
    let repo = Repository::from_store(store.clone(), "", "flaky://", opts()).unwrap();
    let key = RepoKey::parse("postgres/wal/00000001/000000010000000000000009").unwrap();
    let d = data(100_000);
    let info = repo
        .put(&key, ContentKind::WalSegment, d.clone(), PutMode::CreateNew)
        .await
        .unwrap();
    assert_eq!(store.puts.load(Ordering::SeqCst), 3);
    assert_eq!(repo.info(&key).await.unwrap().sha256, info.sha256);
    assert!(repo.get(&key).await.unwrap() == d);
    // A genuinely different object at the key is still refused.
    let e = repo
        .put(&key, ContentKind::WalSegment, data(99), PutMode::CreateNew)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::AlreadyExists { .. }), "{e}");
}

#[tokio::test]
async fn put_gives_up_after_the_policy_with_the_last_cause() {
    let store = flaky(0, 0, usize::MAX);
    let repo = Repository::from_store(store.clone(), "", "flaky://", opts()).unwrap();
    let key = RepoKey::parse("x").unwrap();
    let e = repo
        .put(&key, ContentKind::Other, data(10), PutMode::Overwrite)
        .await
        .unwrap_err();
    assert_eq!(store.puts.load(Ordering::SeqCst), 4, "max_attempts");
    let msg = e.to_string();
    assert!(e.is_retryable(), "{msg}");
    assert!(
        msg.contains("object x: put failed after 4 attempts") && msg.contains("connection reset"),
        "{msg}"
    );
}

#[tokio::test]
async fn long_transfers_survive_many_breaks_while_progressing() {
    let store = flaky(0, 0, 0);
    let repo = Repository::from_store(store.clone(), "", "flaky://", opts()).unwrap();
    let key = RepoKey::parse("big").unwrap();
    let d = Bytes::from(support::random_bytes(12 << 20, 0x1234_5678_9abc_def1));
    repo.put(&key, ContentKind::Other, d.clone(), PutMode::CreateNew)
        .await
        .unwrap();
    // Ten breaks, each after 1.2 MiB of progress: more breaks than max_attempts (4).
    let breaking = Arc::new(Flaky {
        inner: store.inner.fork(),
        cut_gets: AtomicUsize::new(10),
        cut_after: 1_200_000,
        fail_puts: AtomicUsize::new(0),
        gets: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
    });
    let repo2 = Repository::from_store(breaking.clone(), "", "flaky://", opts()).unwrap();
    repo2.repository_id().await.unwrap();
    breaking.gets.store(0, Ordering::SeqCst);
    let got = repo2.get(&key).await.map_err(|e| e.to_string());
    assert!(
        got.as_ref().is_ok_and(|g| *g == d),
        "{:?}",
        got.map(|g| g.len())
    );
    assert_eq!(breaking.gets.load(Ordering::SeqCst), 11);
}
