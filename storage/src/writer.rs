//! `ObjectWriter`: the streaming write pipeline.
//!
//! ```text
//! write(Bytes) ─► cut into frames ─► ordered queue ─► worker loops on the blocking pool
//!                 (≤ workers, repository-wide): content hash in frame order (HashChain), zstd,
//!                 age, CRC32C (see `workers.rs`)
//!             ◄── results in order ◄──┘
//!   stored bytes ─► parts of part_size ─► ≤ upload_concurrency part uploads in flight
//! finish(): last frame, trailer, single PUT (if it all fit in one part) or last part +
//!           complete; nothing is visible at the key before that.
//! ```
//!
//! A frame record another writer already encoded from the same bytes (a WAL delta's, for
//! the complete segment) can take the place of a frame (`keep_records`, `append_encoded`):
//! it is checked and only hashed, in the same ordered queue.
//!
//! Backpressure: `write` waits while `4 × workers` frames are queued or
//! `upload_concurrency` parts are in flight, so memory stays bounded by roughly
//! `part_size × (upload_concurrency + 1) + 4 × workers × frame_size` whatever the size.
//! Unknown-length objects double their part size every 900 parts, so S3's 10 000-part
//! limit is reached only far beyond 5 TiB.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::workers::WorkQueue;

use crate::backend::Upload;
use crate::error::{Result, StorageError};
use crate::format::{bound_digest, Binding, Codec, ContentHash, ContentKind, Header, Trailer};
use crate::format::{
    stored_crc_after_record, FrameHeader, FRAME_AGE, FRAME_HEADER_LEN, FRAME_LZ4, FRAME_TAG,
    FRAME_ZSTD,
};
use crate::frame::{encode_frame_then_hash, Compress, HashChain};
use crate::layout::RepoKey;
use crate::repo::{ObjectInfo, RepoInner};
use crate::PutMode;

const PART_GROWTH_EVERY: u32 = 900;
const MAX_PART_SIZE: usize = 5 << 30;

/// Part size for an object: with a known length one size for every part, large enough
/// for 9 000 parts (stored bytes never exceed the original by more than 1/64 + 1 MiB);
/// otherwise the configured size, grown by `next_part_size`.
fn initial_part_size(expected_len: Option<u64>, configured: usize) -> usize {
    match expected_len {
        Some(len) => {
            let need = (len + len / 64 + (1 << 20)).div_ceil(9_000) as usize;
            need.next_multiple_of(1 << 20)
                .clamp(configured, MAX_PART_SIZE)
        }
        None => configured,
    }
}

/// Unknown length: double the part size every `PART_GROWTH_EVERY` parts. From 5 MiB this
/// passes 5 TiB after ~9 700 parts, below S3's 10 000-part limit; from 8 MiB sooner.
fn next_part_size(current: usize, parts_sent: u32) -> usize {
    if parts_sent % PART_GROWTH_EVERY == 0 {
        (current * 2).min(MAX_PART_SIZE)
    } else {
        current
    }
}

/// Writes smaller than this are copied into a shared buffer instead of kept as pieces.
const SMALL_WRITE: usize = 16 << 10;
/// Size of that buffer.
const SMALL_BUF: usize = 256 << 10;

/// A byte sequence kept as the `Bytes` it arrived in (no copying), split on demand.
#[derive(Default)]
struct Pieces {
    pieces: VecDeque<Bytes>,
    len: usize,
}

impl Pieces {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.pieces.push_back(b);
        }
    }

    fn take_all(&mut self) -> Vec<Bytes> {
        self.len = 0;
        self.pieces.drain(..).collect()
    }

    /// The first `n` bytes (or all, if fewer), splitting a piece if needed.
    fn take_front(&mut self, n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut want = n.min(self.len);
        while want > 0 {
            let Some(mut p) = self.pieces.pop_front() else {
                break;
            };
            if p.len() > want {
                let rest = p.split_off(want);
                self.pieces.push_front(rest);
            }
            want -= p.len();
            self.len -= p.len();
            out.push(p);
        }
        out
    }
}

/// How a writer encodes frames: a record from one writer may go into another's object
/// only when these are equal (the reader checks flags against the header, and the
/// recipients decide who can decrypt).
#[derive(Debug, PartialEq, Eq)]
struct EncodeSettings {
    frame_size: usize,
    level: Option<Compress>,
    recipients: Vec<[u8; 32]>,
    version: u16,
}

impl EncodeSettings {
    /// The settings for an error message (fingerprints shortened).
    fn describe(&self) -> String {
        let recipients: Vec<String> = self
            .recipients
            .iter()
            .map(crate::frame::short_fingerprint)
            .collect();
        format!(
            "frame size {}, codec {:?}, recipients [{}], format version {}",
            self.frame_size,
            self.level,
            recipients.join(", "),
            self.version
        )
    }
}

/// One encoded frame record of an object, with the original bytes it was made from.
///
/// Why: a WAL segment in progress is stored as delta objects and then written whole; the
/// whole segment can start with (or contain) the deltas' records instead of compressing
/// those bytes again ([`ObjectWriter::append_encoded`]), so each byte is compressed once.
/// The original bytes are kept (zero-copy slices of what was written, so usually of a
/// buffer the caller holds anyway) so that reuse can check it is given the same bytes.
#[derive(Clone)]
pub struct EncodedRecord {
    record: Bytes,
    plain: Vec<Bytes>,
    original_len: u64,
    settings: Arc<EncodeSettings>,
}

impl EncodedRecord {
    /// Original bytes the record decodes to.
    pub fn original_len(&self) -> u64 {
        self.original_len
    }

    /// Stored bytes of the record (frame header and payload).
    pub fn stored_len(&self) -> u64 {
        self.record.len() as u64
    }
}

impl std::fmt::Debug for EncodedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedRecord")
            .field("original_len", &self.original_len)
            .field("stored_len", &self.record.len())
            .finish_non_exhaustive()
    }
}

/// Whether the byte sequences `a` and `b` (cut into pieces anywhere) are equal. Pieces
/// that are the same memory compare in O(1) (a record's bytes are normally slices of the
/// very buffer the caller passes again), others byte by byte.
fn same_bytes(a: &[Bytes], b: &[Bytes]) -> bool {
    let total = |v: &[Bytes]| v.iter().map(Bytes::len).sum::<usize>();
    if total(a) != total(b) {
        return false;
    }
    let (mut ia, mut ib) = (
        a.iter().filter(|p| !p.is_empty()),
        b.iter().filter(|p| !p.is_empty()),
    );
    let (mut pa, mut pb): (&[u8], &[u8]) = (&[], &[]);
    loop {
        if pa.is_empty() {
            match ia.next() {
                Some(p) => pa = p,
                None => return pb.is_empty() && ib.next().is_none(),
            }
        }
        if pb.is_empty() {
            match ib.next() {
                Some(p) => pb = p,
                None => return false,
            }
        }
        let n = pa.len().min(pb.len());
        if pa.as_ptr() != pb.as_ptr() && pa[..n] != pb[..n] {
            return false;
        }
        pa = &pa[n..];
        pb = &pb[n..];
    }
}

/// The checks on a reused record, before it is appended: it is one well-formed frame
/// record (header CRC, flags, payload CRC) that decodes to `original_len` bytes, with the
/// codec and encryption of `settings`. Returns the reason it is refused.
fn check_record(
    record: &[u8],
    original_len: u64,
    settings: &EncodeSettings,
) -> std::result::Result<(), String> {
    if record.len() < FRAME_HEADER_LEN || record[0] != FRAME_TAG {
        return Err("it is not a frame record".into());
    }
    let fh = FrameHeader::parse(
        "",
        &record[..FRAME_HEADER_LEN],
        0,
        settings.frame_size as u32,
    )
    .map_err(|e| match e {
        StorageError::Corrupt {
            check,
            expected,
            actual,
            ..
        } => format!("{check}: expected {expected}, found {actual}"),
        other => other.to_string(),
    })?;
    if FRAME_HEADER_LEN + fh.stored_len as usize != record.len() {
        return Err(format!(
            "its header says {} stored bytes, it has {}",
            fh.stored_len,
            record.len() - FRAME_HEADER_LEN
        ));
    }
    let crc = crc32c::crc32c(&record[FRAME_HEADER_LEN..]);
    if crc != fh.payload_crc {
        return Err(format!(
            "payload crc32c {crc:08x}, its header says {:08x}",
            fh.payload_crc
        ));
    }
    if u64::from(fh.original_len) != original_len {
        return Err(format!(
            "it decodes to {} bytes, {original_len} were given with it",
            fh.original_len
        ));
    }
    let codec_ok = match settings.level {
        None => fh.flags & (FRAME_ZSTD | FRAME_LZ4) == 0,
        Some(Compress::Zstd(_)) => fh.flags & FRAME_LZ4 == 0,
        Some(Compress::Lz4) => fh.flags & FRAME_ZSTD == 0 && settings.version >= 3,
    };
    let encrypted = !settings.recipients.is_empty();
    if !codec_ok || (fh.flags & FRAME_AGE != 0) != encrypted {
        return Err(format!(
            "frame flags {:02x} do not match the object's codec {:?} and encryption {encrypted}",
            fh.flags, settings.level
        ));
    }
    Ok(())
}

/// What a frame worker does with a queued frame.
enum FrameWork {
    /// Hash and encode these original bytes.
    Encode(Vec<Bytes>),
    /// Only hash these original bytes: `record` (checked already) is their frame record.
    Reuse { plain: Vec<Bytes>, record: Bytes },
}

/// A frame's stored record, and its original bytes when the writer keeps records.
struct FrameDone {
    record: Bytes,
    plain: Option<Vec<Bytes>>,
}

type FrameResult = std::result::Result<FrameDone, String>;

struct QueuedFrame {
    index: u64,
    work: FrameWork,
    /// Hand the original bytes back with the record (`ObjectWriter::keep_records`).
    keep_plain: bool,
    result: oneshot::Sender<FrameResult>,
}

/// The queue an object's frames wait in, and what a worker loop does with each: hash it
/// in order (`HashChain`), then compress / encrypt / checksum it (a reused record is only
/// hashed).
fn frame_queue(repo: &Arc<RepoInner>) -> Arc<WorkQueue<(Arc<HashChain>, QueuedFrame)>> {
    let level = repo.opts.compress();
    let keys = repo.keys.clone();
    WorkQueue::new(move |(chain, job): (Arc<HashChain>, QueuedFrame)| {
        let keep = job.keep_plain;
        let result = match job.work {
            FrameWork::Encode(plain) => {
                encode_frame_then_hash(&plain, level, &keys.recipients, |bytes| {
                    chain.update(job.index, bytes)
                })
                .map(|enc| FrameDone {
                    record: enc.record,
                    plain: keep.then_some(plain),
                })
            }
            FrameWork::Reuse { plain, record } => {
                if chain.update_pieces(job.index, &plain) {
                    Ok(FrameDone {
                        record,
                        plain: keep.then_some(plain),
                    })
                } else {
                    Err("write abandoned".to_string())
                }
            }
        };
        let _ = job.result.send(result);
    })
}

enum State {
    Open,
    Failed(String),
    Done,
}

/// A streaming write in progress (see the module docs). Call `finish` to publish the
/// object; dropping the writer or calling `abort` publishes nothing.
pub struct ObjectWriter {
    repo: Arc<RepoInner>,
    key: RepoKey,
    kind: ContentKind,
    mode: PutMode,
    encrypted: bool,
    expected_len: Option<u64>,
    chain: Arc<HashChain>,
    /// Container version written (decides the content hash).
    version: u16,
    /// Original bytes not yet cut into a frame (zero-copy pieces; small writes coalesced).
    pending: Pieces,
    /// Small writes are gathered here before becoming a piece.
    small: BytesMut,
    frames: u64,
    original_len: u64,
    /// Frames waiting for a worker loop.
    queue: Arc<WorkQueue<(Arc<HashChain>, QueuedFrame)>>,
    /// Results in frame order.
    jobs: VecDeque<oneshot::Receiver<FrameResult>>,
    /// Stored bytes not yet handed to an upload (records, zero-copy).
    part: Pieces,
    part_size: usize,
    stored_len: u64,
    stored_crc: u32,
    upload: Option<Upload>,
    uploads: FuturesUnordered<BoxFuture<'static, Result<()>>>,
    parts_sent: u32,
    /// Every frame so far with its original bytes, when the caller wants them back
    /// (`keep_records`).
    records: Option<Vec<EncodedRecord>>,
    /// How this writer encodes frames (what a reused record must match).
    settings: Arc<EncodeSettings>,
    /// The key and repository the object is bound to (header and trailer digest).
    binding: Binding,
    state: State,
}

impl ObjectWriter {
    pub(crate) fn new(
        repo: Arc<RepoInner>,
        key: RepoKey,
        kind: ContentKind,
        mode: PutMode,
        expected_len: Option<u64>,
        binding: Binding,
    ) -> Result<Self> {
        let opts = &repo.opts;
        let version = opts.format_version;
        let header = Header {
            version,
            kind,
            codec: match opts.compress() {
                Some(Compress::Zstd(_)) => Codec::Zstd,
                Some(Compress::Lz4) => Codec::Lz4,
                None => Codec::None,
            },
            encrypted: !repo.keys.recipients.is_empty(),
            original_len: expected_len,
            frame_size: opts.frame_size as u32,
            recipients: repo.keys.recipient_fingerprints(),
            binding: Some(binding.clone()),
        }
        .encode();
        let part_size = initial_part_size(expected_len, opts.part_size);
        let repo_for_queue = repo.clone();
        let mut part = Pieces::default();
        part.push(Bytes::from(header.clone()));
        Ok(ObjectWriter {
            encrypted: !repo.keys.recipients.is_empty(),
            stored_crc: crc32c::crc32c(&header),
            stored_len: header.len() as u64,
            repo,
            key,
            kind,
            mode,
            expected_len,
            chain: Arc::new(HashChain::new(
                ContentHash::of_object(version, !repo_for_queue.keys.recipients.is_empty())
                    .hasher(),
            )),
            version,
            pending: Pieces::default(),
            small: BytesMut::new(),
            frames: 0,
            original_len: 0,
            queue: frame_queue(&repo_for_queue),
            jobs: VecDeque::new(),
            part,
            part_size,
            upload: None,
            uploads: FuturesUnordered::new(),
            parts_sent: 0,
            records: None,
            settings: Arc::new(EncodeSettings {
                frame_size: repo_for_queue.opts.frame_size,
                level: repo_for_queue.opts.compress(),
                recipients: repo_for_queue.keys.recipient_fingerprints(),
                version,
            }),
            binding,
            state: State::Open,
        })
    }

    /// Keeps every frame record this writer stores, with the original bytes it was made
    /// from, for [`finish_with_records`](Self::finish_with_records). Call before the first
    /// write. The original bytes stay referenced until the records are dropped (zero-copy
    /// slices of what was written; writes under 16 KiB are copies).
    pub fn keep_records(&mut self) -> Result<()> {
        self.check_open()?;
        if self.frames != 0 || self.original_len != 0 {
            return Err(StorageError::Encode {
                key: self.key.to_string(),
                reason: "keep_records must come before the first write".into(),
            });
        }
        self.records = Some(Vec::new());
        Ok(())
    }

    /// [`finish`](Self::finish), and every frame record of the object in order (needs
    /// [`keep_records`](Self::keep_records)), for [`append_encoded`](Self::append_encoded)
    /// into a later object holding the same bytes.
    pub async fn finish_with_records(mut self) -> Result<(ObjectInfo, Vec<EncodedRecord>)> {
        self.check_open()?;
        if self.records.is_none() {
            return Err(StorageError::Encode {
                key: self.key.to_string(),
                reason: "finish_with_records needs keep_records before the first write".into(),
            });
        }
        match self.finish_inner().await {
            Ok(info) => {
                self.state = State::Done;
                Ok((info, self.records.take().unwrap_or_default()))
            }
            Err(e) => {
                self.fail(&e).await;
                Err(e)
            }
        }
    }

    /// Appends `record` (from another object's [`finish_with_records`]) as this object's
    /// next frame instead of encoding `plain` again: `plain` must be the bytes the record
    /// was made from. Bytes written before and not yet in a frame become a frame of their
    /// own first, shorter than the frame size (FORMAT.md allows frames of any length up
    /// to it); a record holds what it holds, so an object made this way may have several
    /// short frames.
    ///
    /// Only the content hash is computed again (in frame order, by the frame workers). The
    /// record is refused, naming this object, unless it was encoded with this writer's
    /// frame size, codec and recipients, `plain` equals its original bytes, and it is one
    /// intact frame record of that length (header and payload CRC32C, flags).
    ///
    /// [`finish_with_records`]: Self::finish_with_records
    pub async fn append_encoded(
        &mut self,
        record: &EncodedRecord,
        plain: Vec<Bytes>,
    ) -> Result<()> {
        self.check_open()?;
        let refuse = |reason: String| StorageError::Encode {
            key: self.key.to_string(),
            reason: format!("reused frame record refused: {reason}"),
        };
        let checked = if *record.settings != *self.settings {
            Err(refuse(format!(
                "it was encoded with other settings ({}; this object: {})",
                record.settings.describe(),
                self.settings.describe()
            )))
        } else if !same_bytes(&record.plain, &plain) {
            let len: usize = plain.iter().map(Bytes::len).sum();
            Err(refuse(format!(
                "the {len} bytes given are not the {} bytes it was made from",
                record.original_len
            )))
        } else {
            check_record(&record.record, record.original_len, &self.settings).map_err(refuse)
        };
        let result = match checked {
            Ok(()) => self.append_inner(record, plain).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.fail(e).await;
        }
        result
    }

    async fn append_inner(&mut self, record: &EncodedRecord, plain: Vec<Bytes>) -> Result<()> {
        let len = record.original_len;
        if let Some(exp) = self.expected_len {
            if self.original_len + len > exp {
                return Err(StorageError::Encode {
                    key: self.key.to_string(),
                    reason: format!("more bytes written than the declared length {exp}"),
                });
            }
        }
        self.submit_pending().await?;
        self.original_len += len;
        self.submit(FrameWork::Reuse {
            plain,
            record: record.record.clone(),
        })
        .await
    }

    /// The key being written.
    pub fn key(&self) -> &RepoKey {
        &self.key
    }

    /// Original bytes accepted so far.
    pub fn bytes_written(&self) -> u64 {
        self.original_len
    }

    fn check_open(&self) -> Result<()> {
        match &self.state {
            State::Open => Ok(()),
            State::Failed(reason) => Err(StorageError::WriterClosed {
                key: self.key.to_string(),
                reason: reason.clone(),
            }),
            State::Done => Err(StorageError::WriterClosed {
                key: self.key.to_string(),
                reason: "already finished or aborted".into(),
            }),
        }
    }

    /// Appends bytes. Waits when the pipeline is full (backpressure). Pieces of 16 KiB or
    /// more are kept without copying until their frame is encoded, so a slice of a large
    /// buffer keeps that buffer alive that long; smaller writes are copied and coalesced.
    /// Not cancel-safe: if this future is dropped before it completes, drop (or `abort`)
    /// the writer too.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        self.check_open()?;
        match self.write_inner(data).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail(&e).await;
                Err(e)
            }
        }
    }

    async fn write_inner(&mut self, mut data: Bytes) -> Result<()> {
        self.original_len += data.len() as u64;
        if let Some(exp) = self.expected_len {
            if self.original_len > exp {
                return Err(StorageError::Encode {
                    key: self.key.to_string(),
                    reason: format!("more bytes written than the declared length {exp}"),
                });
            }
        }
        let fs = self.repo.opts.frame_size;
        while !data.is_empty() {
            let room = fs - self.pending.len() - self.small.len();
            let piece = data.split_to(room.min(data.len()));
            if piece.len() < SMALL_WRITE {
                if self.small.capacity() == 0 {
                    self.small.reserve(SMALL_BUF);
                }
                self.small.extend_from_slice(&piece);
                if self.small.len() >= SMALL_BUF {
                    let s = self.small.split().freeze();
                    self.pending.push(s);
                }
            } else {
                if !self.small.is_empty() {
                    let s = self.small.split().freeze();
                    self.pending.push(s);
                }
                self.pending.push(piece);
            }
            if self.pending.len() + self.small.len() == fs {
                self.submit_pending().await?;
            }
        }
        Ok(())
    }

    async fn submit_pending(&mut self) -> Result<()> {
        if !self.small.is_empty() {
            let s = self.small.split().freeze();
            self.pending.push(s);
        }
        let pieces = self.pending.take_all();
        if pieces.is_empty() {
            return Ok(());
        }
        self.submit(FrameWork::Encode(pieces)).await
    }

    /// Queues a frame. Worker loops on the blocking pool take frames in order and keep
    /// going while there are frames, so consecutive frames need no hand-off through this
    /// task; a loop holds one of the repository's CPU permits while it runs.
    async fn submit(&mut self, work: FrameWork) -> Result<()> {
        // Four frames per worker in flight: with only two, a worker that finished its
        // frames idles until this task gets a time slice to queue the next one, which on a
        // busy 2-core machine cost a single worker 20-25% of its throughput.
        while self.jobs.len() >= 4 * self.repo.opts.workers {
            self.collect_one().await?;
        }
        let index = self.frames;
        self.frames += 1;
        let (tx, rx) = oneshot::channel();
        self.jobs.push_back(rx);
        let job = QueuedFrame {
            index,
            work,
            keep_plain: self.records.is_some(),
            result: tx,
        };
        self.queue
            .push(
                (self.chain.clone(), job),
                &self.repo.cpu,
                self.repo.opts.workers,
            )
            .await
            .map_err(|e| StorageError::Encode {
                key: self.key.to_string(),
                reason: e.to_string(),
            })
    }

    async fn collect_one(&mut self) -> Result<()> {
        let Some(job) = self.jobs.pop_front() else {
            return Ok(());
        };
        let done = job
            .await
            .map_err(|_| "frame worker ended without a result".to_string())
            .and_then(|r| r)
            .map_err(|reason| StorageError::Encode {
                key: self.key.to_string(),
                reason,
            })?;
        self.stored_crc = stored_crc_after_record(self.stored_crc, &done.record);
        self.stored_len += done.record.len() as u64;
        if let Some(records) = self.records.as_mut() {
            let plain = done.plain.unwrap_or_default();
            records.push(EncodedRecord {
                record: done.record.clone(),
                original_len: plain.iter().map(|p| p.len() as u64).sum(),
                plain,
                settings: self.settings.clone(),
            });
        }
        self.append_stored(done.record).await
    }

    async fn append_stored(&mut self, bytes: Bytes) -> Result<()> {
        self.part.push(bytes);
        while self.part.len() >= self.part_size {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn send_part(&mut self) -> Result<()> {
        if self.upload.is_none() {
            if self.mode == PutMode::CreateNew && self.exists().await? {
                return Err(StorageError::AlreadyExists {
                    key: self.key.to_string(),
                });
            }
            let b = &self.repo.backend;
            let key = &self.key;
            self.upload = Some(self.repo.opts.retry.run(|_| b.start_upload(key)).await?);
        }
        while self.uploads.len() >= self.repo.opts.upload_concurrency {
            if let Some(r) = self.uploads.next().await {
                r?;
            }
        }
        let data = self.part.take_front(self.part_size);
        if let Some(up) = self.upload.as_mut() {
            self.uploads.push(up.put_part(data));
        }
        self.parts_sent += 1;
        if self.expected_len.is_none() {
            self.part_size = next_part_size(self.part_size, self.parts_sent);
        }
        Ok(())
    }

    // `&mut self` here and in `put_single`: a future holding `&ObjectWriter` would need
    // the writer to be `Sync` (its upload is not), so a capture could not be spawned.
    async fn exists(&mut self) -> Result<bool> {
        let b = &self.repo.backend;
        let key = &self.key;
        Ok(self.repo.opts.retry.run(|_| b.head(key)).await?.is_some())
    }

    /// Publishes the object: after `Ok`, readers see all of it; after `Err`, nothing new
    /// is visible at the key.
    pub async fn finish(mut self) -> Result<ObjectInfo> {
        self.check_open()?;
        match self.finish_inner().await {
            Ok(info) => {
                self.state = State::Done;
                Ok(info)
            }
            Err(e) => {
                self.fail(&e).await;
                Err(e)
            }
        }
    }

    async fn finish_inner(&mut self) -> Result<ObjectInfo> {
        self.submit_pending().await?;
        while !self.jobs.is_empty() {
            self.collect_one().await?;
        }
        if let Some(exp) = self.expected_len {
            if exp != self.original_len {
                return Err(StorageError::Encode {
                    key: self.key.to_string(),
                    reason: format!(
                        "declared length {exp} but {} bytes were written",
                        self.original_len
                    ),
                });
            }
        }
        let content_digest =
            self.chain
                .finish(self.frames)
                .ok_or_else(|| StorageError::Encode {
                    key: self.key.to_string(),
                    reason: "frame hashing did not complete".into(),
                })?;
        let hash = ContentHash::of_object(self.version, self.encrypted);
        let sha256 = bound_digest(&content_digest, &self.binding, hash);
        let trailer = Trailer {
            frame_count: self.frames,
            original_len: self.original_len,
            sha256,
            stored_crc: self.stored_crc,
        };
        let info = ObjectInfo {
            key: self.key.clone(),
            kind: self.kind,
            original_len: self.original_len,
            stored_len: self.stored_len + crate::format::TRAILER_LEN as u64,
            sha256,
            stored_crc32c: self.stored_crc,
            frames: self.frames,
            encrypted: self.encrypted,
            binding: Some(self.binding.clone()),
            format_version: self.version,
        };
        let trailer = Bytes::copy_from_slice(&trailer.encode());
        if self.upload.is_none() && self.part.len() + trailer.len() <= self.part_size {
            self.part.push(trailer);
            let data = self.part.take_all();
            self.put_single(data, &info).await?;
            return Ok(info);
        }
        self.append_stored(trailer).await?;
        if self.part.len() > 0 {
            // The last part may be short; S3 allows that.
            let data = self.part.take_all();
            if let Some(up) = self.upload.as_mut() {
                self.uploads.push(up.put_part(data));
            }
        }
        while let Some(r) = self.uploads.next().await {
            r?;
        }
        if self.mode == PutMode::CreateNew && self.exists().await? {
            return Err(StorageError::AlreadyExists {
                key: self.key.to_string(),
            });
        }
        let up = self.upload.take().ok_or_else(|| StorageError::Encode {
            key: self.key.to_string(),
            reason: "multipart upload missing".into(),
        })?;
        up.complete(self.mode).await?;
        Ok(info)
    }

    /// One PUT, retried. A create-new PUT that hits "already exists" on a retry checks
    /// whether the existing object is the one it wrote itself (its first attempt may have
    /// succeeded with the reply lost) by comparing trailers.
    async fn put_single(&mut self, data: Vec<Bytes>, info: &ObjectInfo) -> Result<()> {
        let b = &self.repo.backend;
        let key = &self.key;
        let mode = self.mode;
        let mut last_attempt = 0;
        let res = self
            .repo
            .opts
            .retry
            .run(|attempt| {
                last_attempt = attempt;
                b.put(key, data.clone(), mode)
            })
            .await;
        match res {
            Err(StorageError::AlreadyExists { .. }) if last_attempt > 1 => {
                let repo = crate::repo::Repository {
                    inner: self.repo.clone(),
                    scope: None,
                };
                match repo.info(key).await {
                    Ok(existing)
                        if existing.sha256 == info.sha256
                            && existing.stored_crc32c == info.stored_crc32c
                            && existing.stored_len == info.stored_len =>
                    {
                        Ok(())
                    }
                    _ => Err(StorageError::AlreadyExists {
                        key: key.to_string(),
                    }),
                }
            }
            other => other,
        }
    }

    /// Abandons the write; nothing becomes visible and a started multipart upload is
    /// aborted.
    pub async fn abort(mut self) -> Result<()> {
        self.state = State::Done;
        self.chain.abandon();
        self.queue.clear();
        self.jobs.clear();
        self.uploads.clear();
        match self.upload.take() {
            Some(up) => up.abort().await,
            None => Ok(()),
        }
    }

    async fn fail(&mut self, e: &StorageError) {
        self.state = State::Failed(e.to_string());
        self.chain.abandon();
        self.queue.clear();
        self.jobs.clear();
        self.uploads.clear();
        if let Some(up) = self.upload.take() {
            if let Err(err) = up.abort().await {
                tracing::warn!(key = %self.key, error = %err, "could not abort multipart upload");
            }
        }
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        self.chain.abandon();
        self.queue.clear();
        if let Some(up) = self.upload.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let key = self.key.clone();
                handle.spawn(async move {
                    if let Err(err) = up.abort().await {
                        tracing::warn!(%key, error = %err, "could not abort multipart upload");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::frame::encode_frame;

    /// Parts needed to store `total` bytes of unknown length starting at `base`.
    fn parts_for(total: u64, base: usize) -> (u32, usize) {
        let (mut size, mut sent, mut done) = (base, 0u32, 0u64);
        while done < total {
            done += size as u64;
            sent += 1;
            size = next_part_size(size, sent);
        }
        (sent, size)
    }

    #[test]
    fn unknown_length_reaches_5_tib_within_10000_parts() {
        for base in [5usize << 20, 8 << 20, 16 << 20] {
            let (n, _) = parts_for(5 << 40, base);
            assert!(n <= 10_000, "base {base}: {n} parts");
        }
        // Memory stays modest for ordinary sizes: 100 GiB never needs parts above 64 MiB.
        let (_, size) = parts_for(100 << 30, 8 << 20);
        assert!(size <= 64 << 20, "{size}");
    }

    fn settings(level: Option<Compress>, encrypted: bool) -> EncodeSettings {
        EncodeSettings {
            frame_size: 1 << 20,
            level,
            recipients: if encrypted { vec![[7; 32]] } else { vec![] },
            version: 3,
        }
    }

    #[test]
    fn reused_records_are_checked_before_they_are_appended() {
        let text: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let zstd = Some(Compress::Zstd(1));
        let record = encode_frame(&[Bytes::from(text.clone())], zstd, &[])
            .unwrap()
            .record;
        let ok = settings(zstd, false);
        check_record(&record, 100_000, &ok).unwrap();
        let refused = |r: &[u8], len: u64, s: &EncodeSettings| check_record(r, len, s).unwrap_err();
        assert!(refused(&record, 99_999, &ok).contains("decodes to 100000 bytes"));
        // A damaged payload, a damaged header, a cut record.
        let mut bad = record.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        assert!(refused(&bad, 100_000, &ok).contains("payload crc32c"));
        let mut bad = record.to_vec();
        bad[9] ^= 1;
        assert!(refused(&bad, 100_000, &ok).contains("frame header crc32c"));
        assert!(refused(&record[..record.len() - 1], 100_000, &ok).contains("stored bytes"));
        assert!(refused(&record[..10], 100_000, &ok).contains("not a frame record"));
        // Flags the object's codec and encryption would not have.
        assert!(refused(&record, 100_000, &settings(None, false)).contains("flags"));
        assert!(refused(&record, 100_000, &settings(Some(Compress::Lz4), false)).contains("flags"));
        assert!(refused(&record, 100_000, &settings(zstd, true)).contains("flags"));
    }

    #[test]
    fn same_bytes_compares_content_whatever_the_cut() {
        let all = Bytes::from((0..1000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let copy = Bytes::from(all.to_vec());
        assert!(same_bytes(
            std::slice::from_ref(&all),
            &[copy.slice(..300), copy.slice(300..)]
        ));
        assert!(same_bytes(
            &[all.slice(..10), Bytes::new(), all.slice(10..)],
            &[all.slice(..500), all.slice(500..)]
        ));
        let mut other = all.to_vec();
        other[999] ^= 1;
        assert!(!same_bytes(
            std::slice::from_ref(&all),
            &[Bytes::from(other)]
        ));
        assert!(!same_bytes(std::slice::from_ref(&all), &[all.slice(..999)]));
        assert!(!same_bytes(&[all.slice(1..)], &[all.slice(..999)]));
    }

    #[test]
    fn known_length_fits_in_9000_equal_parts() {
        for len in [0u64, 1 << 20, 100 << 30, 5 << 40] {
            let p = initial_part_size(Some(len), 8 << 20) as u64;
            assert!(p >= 8 << 20);
            assert!(
                (len + len / 64 + (1 << 20)).div_ceil(p) <= 9_000,
                "{len}: {p}"
            );
        }
    }
}
