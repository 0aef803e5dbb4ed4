//! `ObjectReader`: streams an object's original bytes while verifying it.
//!
//! A background task reads the stored bytes (resuming with a ranged GET of the same
//! version when a transfer breaks), checks each frame's header and payload CRC32C as it
//! arrives, decodes frames on the blocking pool in parallel (decrypt, decompress, length),
//! feeds the content hash in order, and hands out chunks in order. The last chunk is held
//! back until the trailer's whole-object checks (stored CRC32C, frame count, length, digest)
//! pass, so a consumer that reads to the end never takes unverified bytes as good.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::backend::ByteStream;
use crate::binding;
use crate::error::{Result, StorageError};
use crate::format::{
    bound_digest, stored_crc_after_record, ContentHash, FrameHeader, Header, Trailer, FRAME_AGE,
    FRAME_HEADER_LEN, FRAME_LZ4, FRAME_TAG, TRAILER_LEN, TRAILER_TAG,
};
use crate::frame::{decode_frame, fingerprint, short_fingerprint, DecodeError, HashChain};
use crate::layout::RepoKey;
use crate::repo::{ObjectInfo, RepoInner};
use crate::workers::WorkQueue;

/// What to verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Decode everything and check the digest (needs an identity when encrypted).
    Plaintext,
    /// For encrypted objects without an identity: check the stored bytes only.
    StoredOnlyIfEncrypted,
}

/// Reads the stored bytes, resuming after transient failures.
struct Source {
    repo: Arc<RepoInner>,
    key: RepoKey,
    stream: ByteStream,
    pos: u64,
    size: u64,
    etag: Option<String>,
    resumes: u32,
    resumed_at: u64,
}

/// Bytes a transfer must deliver between two breaks for the break count to restart.
const RESUME_PROGRESS: u64 = 1 << 20;

impl Source {
    async fn open(repo: Arc<RepoInner>, key: RepoKey) -> Result<Source> {
        let b = &repo.backend;
        let (stream, size, etag) = repo.opts.retry.run(|_| b.get_stream(&key, 0, None)).await?;
        Ok(Source {
            repo,
            key,
            stream,
            pos: 0,
            size,
            etag,
            resumes: 0,
            resumed_at: 0,
        })
    }

    async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            let err = match self.stream.next().await {
                Some(Ok(b)) => {
                    self.pos += b.len() as u64;
                    return Ok(Some(b));
                }
                None if self.pos >= self.size => return Ok(None),
                None => StorageError::Backend {
                    key: self.key.to_string(),
                    op: "read body",
                    retryable: true,
                    attempts: 1,
                    source: format!("transfer ended at {} of {} bytes", self.pos, self.size).into(),
                },
                Some(Err(e)) => e,
            };
            let policy = &self.repo.opts.retry;
            // A transfer that made real progress since the last break starts a new count,
            // so a long download over a flaky link is not abandoned for old failures.
            if self.pos >= self.resumed_at + RESUME_PROGRESS {
                self.resumes = 0;
            }
            self.resumed_at = self.pos;
            if !err.is_retryable() || self.resumes + 1 >= policy.max_attempts {
                return Err(err);
            }
            self.resumes += 1;
            tracing::warn!(key = %self.key, offset = self.pos, error = %err, "read interrupted, resuming");
            tokio::time::sleep(policy.initial_backoff * self.resumes).await;
            let b = &self.repo.backend;
            let (key, pos, etag) = (&self.key, self.pos, self.etag.clone());
            let (stream, _, _) = policy.run(|_| b.get_stream(key, pos, etag.clone())).await?;
            self.stream = stream;
        }
    }
}

/// A verified stream of an object's original bytes. Use `next_chunk`, the `Stream`
/// impl, or `into_async_read`.
pub struct ObjectReader {
    key: RepoKey,
    header: Header,
    rx: mpsc::Receiver<Result<Bytes>>,
    task: JoinHandle<()>,
    chain: Arc<HashChain>,
    info: Arc<Mutex<Option<ObjectInfo>>>,
}

impl ObjectReader {
    pub(crate) async fn open(repo: Arc<RepoInner>, key: RepoKey, mode: ReadMode) -> Result<Self> {
        // The marker defines the context; every other object is checked against it.
        let context = if binding::is_self_describing(&key) {
            None
        } else {
            let r = crate::repo::Repository {
                inner: repo.clone(),
                scope: None,
            };
            Some(r.context().await?)
        };
        let mut src = Source::open(repo.clone(), key.clone()).await?;
        let mut buf = BytesMut::new();
        let (header, hlen) = loop {
            if let Some(h) = Header::parse(key.as_str(), &buf)? {
                break h;
            }
            match src.next().await? {
                Some(b) => buf.extend_from_slice(&b),
                None => {
                    return Err(StorageError::corrupt(
                        &key,
                        "truncated object",
                        "a complete header",
                        format!("{} bytes", buf.len()),
                        0,
                    ))
                }
            }
        };
        match &context {
            Some(ctx) => ctx.check(&key, &header)?,
            None => binding::check_key(&key, &header)?,
        }
        let decode = mode == ReadMode::Plaintext || !header.encrypted;
        if header.encrypted && decode {
            check_identity(&repo, &key, &header)?;
        }
        let header_crc = crc32c::crc32c(&buf[..hlen]);
        buf.advance(hlen);
        let (tx, rx) = mpsc::channel(2);
        let chain = Arc::new(HashChain::new(
            ContentHash::of_object(header.version, header.encrypted).hasher(),
        ));
        let info = Arc::new(Mutex::new(None));
        let repo_for_queue = repo.clone();
        let job = Job {
            repo,
            key: key.clone(),
            header: header.clone(),
            src,
            buf,
            offset: hlen as u64,
            stored_crc: header_crc,
            decode,
            chain: chain.clone(),
            tx,
            held: None,
            info: info.clone(),
            queue: decode_queue(&repo_for_queue, &key),
        };
        let task = tokio::spawn(job.run());
        Ok(ObjectReader {
            key,
            header,
            rx,
            task,
            chain,
            info,
        })
    }

    /// The object's header (kind, encryption, declared length).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The key being read.
    pub fn key(&self) -> &RepoKey {
        &self.key
    }

    /// The next verified chunk; `None` once the whole object has been verified.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        match self.rx.recv().await {
            Some(r) => r.map(Some),
            None => {
                if self.info().is_some() {
                    Ok(None)
                } else {
                    Err(StorageError::WriterClosed {
                        key: self.key.to_string(),
                        reason: "reader task ended without verifying the trailer".into(),
                    })
                }
            }
        }
    }

    /// The verified info, available once the end has been reached.
    pub fn info(&self) -> Option<ObjectInfo> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// An `AsyncRead` over the verified bytes; errors become `io::Error`s whose message
    /// names the object and the failed check.
    pub fn into_async_read(self) -> impl tokio::io::AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.map(|r| r.map_err(std::io::Error::other)))
    }
}

impl Stream for ObjectReader {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) if self.info().is_none() => {
                Poll::Ready(Some(Err(StorageError::WriterClosed {
                    key: self.key.to_string(),
                    reason: "reader task ended without verifying the trailer".into(),
                })))
            }
            other => other,
        }
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        self.chain.abandon();
        self.task.abort();
    }
}

fn check_identity(repo: &RepoInner, key: &RepoKey, header: &Header) -> Result<()> {
    let fps: Vec<String> = header.recipients.iter().map(short_fingerprint).collect();
    if repo.keys.identities.is_empty() {
        return Err(StorageError::IdentityRequired {
            key: key.to_string(),
            recipients: fps.join(", "),
        });
    }
    let matches = repo
        .keys
        .identities
        .iter()
        .any(|id| header.recipients.contains(&fingerprint(&id.to_public())));
    if !matches {
        return Err(StorageError::Decrypt {
            key: key.to_string(),
            offset: 0,
            reason: format!(
                "none of the given identities matches the object's recipients ({})",
                fps.join(", ")
            ),
        });
    }
    Ok(())
}

struct Job {
    repo: Arc<RepoInner>,
    key: RepoKey,
    header: Header,
    src: Source,
    buf: BytesMut,
    offset: u64,
    stored_crc: u32,
    decode: bool,
    chain: Arc<HashChain>,
    tx: mpsc::Sender<Result<Bytes>>,
    held: Option<Bytes>,
    info: Arc<Mutex<Option<ObjectInfo>>>,
    queue: Arc<WorkQueue<QueuedDecode>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        // The reader went away (or finished): frames not yet decoded are not needed.
        self.queue.clear();
    }
}

type DecodeJob = oneshot::Receiver<Result<Bytes>>;

/// A frame waiting for a decode worker loop.
struct QueuedDecode {
    fh: FrameHeader,
    payload: Bytes,
    index: u64,
    offset: u64,
    chain: Arc<HashChain>,
    result: oneshot::Sender<Result<Bytes>>,
}

/// The queue an object's frames wait in for decoding, and what a worker loop does with
/// each: decrypt, decompress, check the length, then hash it in order.
fn decode_queue(repo: &Arc<RepoInner>, key: &RepoKey) -> Arc<WorkQueue<QueuedDecode>> {
    let keys = repo.keys.clone();
    let key = key.clone();
    WorkQueue::new(move |job: QueuedDecode| {
        let result = match decode_frame(&job.fh, &job.payload, &keys.identities) {
            Ok(bytes) => {
                if job.chain.update(job.index, &bytes) {
                    Ok(bytes)
                } else {
                    Err(StorageError::WriterClosed {
                        key: key.to_string(),
                        reason: "read abandoned".into(),
                    })
                }
            }
            Err(e) => {
                // A failed frame ends the read: release frames waiting to be hashed.
                job.chain.abandon();
                Err(match e {
                    DecodeError::Decrypt(reason) => StorageError::Decrypt {
                        key: key.to_string(),
                        offset: job.offset,
                        reason,
                    },
                    DecodeError::Decompress { expected, actual } => StorageError::corrupt(
                        &key,
                        "frame decompression",
                        format!("{expected} bytes"),
                        actual,
                        job.offset,
                    ),
                })
            }
        };
        let _ = job.result.send(result);
    })
}

impl Job {
    async fn run(mut self) {
        if let Err(e) = self.drive().await {
            self.chain.abandon();
            let _ = self.tx.send(Err(e)).await;
        }
    }

    /// Ensures `buf` holds at least `n` bytes; false at end of object.
    async fn fill(&mut self, n: usize) -> Result<bool> {
        while self.buf.len() < n {
            match self.src.next().await? {
                Some(b) => self.buf.extend_from_slice(&b),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn truncated(&self, what: &str) -> StorageError {
        StorageError::corrupt(
            &self.key,
            "truncated object",
            what,
            format!(
                "end of object after {} bytes",
                self.offset + self.buf.len() as u64
            ),
            self.offset,
        )
    }

    /// Passes a decoded chunk on, keeping the newest one back. False if nobody listens.
    async fn deliver(&mut self, chunk: Bytes) -> bool {
        match self.held.replace(chunk) {
            Some(prev) => self.tx.send(Ok(prev)).await.is_ok(),
            None => true,
        }
    }

    async fn drive(&mut self) -> Result<()> {
        let mut jobs: VecDeque<DecodeJob> = VecDeque::new();
        let mut frames = 0u64;
        let mut original = 0u64;
        let workers = self.repo.opts.workers;
        loop {
            if !self.fill(1).await? {
                return Err(self.truncated("a frame or the trailer"));
            }
            match self.buf[0] {
                FRAME_TAG => {
                    if !self.fill(FRAME_HEADER_LEN).await? {
                        return Err(self.truncated("a frame header"));
                    }
                    let fh = FrameHeader::parse(
                        self.key.as_str(),
                        &self.buf[..FRAME_HEADER_LEN],
                        self.offset,
                        self.header.frame_size,
                    )?;
                    if fh.flags & FRAME_LZ4 != 0 && self.header.version < 3 {
                        return Err(StorageError::corrupt(
                            &self.key,
                            "frame flags",
                            "no LZ4 before format version 3",
                            format!("{:02x}", fh.flags),
                            self.offset,
                        ));
                    }
                    if (fh.flags & FRAME_AGE != 0) != self.header.encrypted {
                        return Err(StorageError::corrupt(
                            &self.key,
                            "frame encryption flag",
                            format!("encrypted={}", self.header.encrypted),
                            format!("encrypted={}", !self.header.encrypted),
                            self.offset,
                        ));
                    }
                    let total = FRAME_HEADER_LEN + fh.stored_len as usize;
                    if !self.fill(total).await? {
                        return Err(self.truncated("a complete frame"));
                    }
                    let record = self.buf.split_to(total).freeze();
                    let payload = record.slice(FRAME_HEADER_LEN..);
                    let crc = crc32c::crc32c(&payload);
                    if crc != fh.payload_crc {
                        return Err(StorageError::corrupt(
                            &self.key,
                            "frame payload crc32c",
                            format!("{:08x}", fh.payload_crc),
                            format!("{crc:08x}"),
                            self.offset,
                        ));
                    }
                    self.stored_crc = stored_crc_after_record(self.stored_crc, &record);
                    if self.decode {
                        while jobs.len() >= 2 * workers {
                            if let Some(j) = jobs.pop_front() {
                                let chunk = self.join(j).await?;
                                if !self.deliver(chunk).await {
                                    return Ok(());
                                }
                            }
                        }
                        jobs.push_back(self.spawn_decode(fh, payload, frames).await?);
                    }
                    frames += 1;
                    original += u64::from(fh.original_len);
                    self.offset += total as u64;
                }
                TRAILER_TAG => {
                    if !self.fill(TRAILER_LEN).await? {
                        return Err(self.truncated("a complete trailer"));
                    }
                    let t =
                        Trailer::parse(self.key.as_str(), &self.buf[..TRAILER_LEN], self.offset)?;
                    self.buf.advance(TRAILER_LEN);
                    let end = self.offset + TRAILER_LEN as u64;
                    if !self.buf.is_empty() || self.fill(1).await? {
                        return Err(StorageError::corrupt(
                            &self.key,
                            "object end",
                            "end of object after the trailer",
                            "more bytes",
                            end,
                        ));
                    }
                    while let Some(j) = jobs.pop_front() {
                        let chunk = self.join(j).await?;
                        if !self.deliver(chunk).await {
                            return Ok(());
                        }
                    }
                    self.check_trailer(&t, frames, original)?;
                    *self.info.lock().unwrap_or_else(|e| e.into_inner()) = Some(ObjectInfo {
                        key: self.key.clone(),
                        kind: self.header.kind,
                        original_len: original,
                        stored_len: end,
                        sha256: t.sha256,
                        stored_crc32c: t.stored_crc,
                        frames,
                        encrypted: self.header.encrypted,
                        binding: self.header.binding.clone(),
                        format_version: self.header.version,
                    });
                    if let Some(last) = self.held.take() {
                        let _ = self.tx.send(Ok(last)).await;
                    }
                    return Ok(());
                }
                other => {
                    return Err(StorageError::corrupt(
                        &self.key,
                        "record tag",
                        "46 (frame) or 54 (trailer)",
                        format!("{other:02x}"),
                        self.offset,
                    ))
                }
            }
        }
    }

    fn check_trailer(&self, t: &Trailer, frames: u64, original: u64) -> Result<()> {
        let k = &self.key;
        let at = self.offset;
        if t.stored_crc != self.stored_crc {
            return Err(StorageError::corrupt(
                k,
                "stored crc32c",
                format!("{:08x}", t.stored_crc),
                format!("{:08x}", self.stored_crc),
                at,
            ));
        }
        if t.frame_count != frames {
            return Err(StorageError::corrupt(
                k,
                "frame count",
                t.frame_count,
                frames,
                at,
            ));
        }
        if t.original_len != original {
            return Err(StorageError::corrupt(
                k,
                "original length",
                t.original_len,
                original,
                at,
            ));
        }
        if let Some(declared) = self.header.original_len {
            if declared != original {
                return Err(StorageError::corrupt(
                    k,
                    "header original length",
                    declared,
                    original,
                    18,
                ));
            }
        }
        if self.decode {
            let hash = ContentHash::of_object(self.header.version, self.header.encrypted);
            let sha = self.chain.finish(frames).ok_or_else(|| {
                StorageError::corrupt(k, "content hash", "all frames hashed", "incomplete", at)
            })?;
            let (sha, check) = match (&self.header.binding, hash) {
                (Some(b), ContentHash::Sha256) => (
                    bound_digest(&sha, b, hash),
                    "sha256 of key, repository and content",
                ),
                (Some(b), ContentHash::Blake3) => (
                    bound_digest(&sha, b, hash),
                    "sha256 of key, repository and content (BLAKE3)",
                ),
                (Some(b), ContentHash::Xxh3) => (
                    bound_digest(&sha, b, hash),
                    "sha256 of key, repository and content (XXH3-128)",
                ),
                (None, _) => (sha, "sha256 of original bytes"),
            };
            if sha != t.sha256 {
                return Err(StorageError::corrupt(
                    k,
                    check,
                    hex::encode(t.sha256),
                    hex::encode(sha),
                    at,
                ));
            }
        }
        Ok(())
    }

    async fn spawn_decode(
        &mut self,
        fh: FrameHeader,
        payload: Bytes,
        index: u64,
    ) -> Result<DecodeJob> {
        let (tx, rx) = oneshot::channel();
        let job = QueuedDecode {
            fh,
            payload,
            index,
            offset: self.offset,
            chain: self.chain.clone(),
            result: tx,
        };
        self.queue
            .push(job, &self.repo.cpu, self.repo.opts.workers)
            .await
            .map_err(|e| StorageError::Encode {
                key: self.key.to_string(),
                reason: e.to_string(),
            })?;
        Ok(rx)
    }

    async fn join(&mut self, j: DecodeJob) -> Result<Bytes> {
        j.await.map_err(|_| StorageError::Encode {
            key: self.key.to_string(),
            reason: "decode worker ended without a result".into(),
        })?
    }
}
