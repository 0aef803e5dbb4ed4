//! Turning one frame of original bytes into a stored frame record and back: zstd
//! compression (skipped when it does not help, or when a sample of the frame shows it would
//! not: see [`looks_incompressible`]), optional age encryption, CRC32C. These
//! functions are CPU-bound and run on tokio's blocking pool, several frames at a time.
//!
//! The content hash of the whole object (`format::ContentHash`: by version and encryption) must
//! see frames in order although they are encoded in parallel; `HashChain` lets the job for
//! frame *i* wait its turn to feed the hasher, so a single-worker pipeline does exactly the
//! work of the three operations back to back.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::sync::{Condvar, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::format::{
    ContentHasher, FrameHeader, FRAME_AGE, FRAME_HEADER_LEN, FRAME_LZ4, FRAME_ZSTD,
};

/// age X25519 recipients and identities of a repository, with their fingerprints.
#[derive(Clone, Default)]
pub(crate) struct Keys {
    pub recipients: Vec<age::x25519::Recipient>,
    pub identities: Vec<age::x25519::Identity>,
}

impl Keys {
    pub fn recipient_fingerprints(&self) -> Vec<[u8; 32]> {
        self.recipients.iter().map(fingerprint).collect()
    }
}

/// Fingerprint of a recipient: SHA-256 of its `age1…` text. Public, so it may be stored in
/// the clear; it lets a reader say which key an object needs.
pub fn fingerprint(recipient: &age::x25519::Recipient) -> [u8; 32] {
    Sha256::digest(recipient.to_string().as_bytes()).into()
}

/// The short form of a fingerprint shown to people (first 8 bytes, hex).
pub fn short_fingerprint(fp: &[u8; 32]) -> String {
    hex::encode(&fp[..8])
}

/// How new frames are compressed (when that makes them smaller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compress {
    /// zstd at this level.
    Zstd(i32),
    /// LZ4 block format (format version 3).
    Lz4,
}

/// One encoded frame record, ready to be appended to the stored object.
pub(crate) struct EncodedFrame {
    pub record: Bytes,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// Reused per thread to join a frame written in pieces, so no fresh pages per frame.
    static JOIN_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Reused per thread for zstd output before it is copied into an exact-size record.
    static OUT_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Level-1 compressor and output buffer for [`looks_incompressible`]'s samples.
    static SAMPLER: RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Frames shorter than this are compressed without sampling first.
const SAMPLE_MIN_FRAME: usize = 256 << 10;
/// Slices compressed to judge a frame, evenly spaced from its start.
const SAMPLE_SLICES: usize = 4;
/// Bytes per slice: large enough for zstd to find the matches real data has (records,
/// pages), small enough that the sample costs ~6% of compressing a 1 MiB frame.
const SAMPLE_SLICE: usize = 16 << 10;

/// Whether zstd would not make `data` meaningfully smaller, judged by compressing
/// [`SAMPLE_SLICES`] slices of it at level 1: true when they shrink by less than 1/32.
/// Incompressible data (already compressed or encrypted values, random bytes) then skips
/// the full compression, which at level 3 costs about as much CPU as on data that does
/// compress and would only be thrown away; the frame is stored raw (flag bit 0 clear),
/// as any frame zstd does not shrink. Data that compresses at all passes the test, so
/// what it costs is at most ~3% more stored for frames that were almost incompressible.
fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < SAMPLE_MIN_FRAME {
        return false;
    }
    let stride = data.len() / SAMPLE_SLICES;
    sample_incompressible(|i| &data[i * stride..(i * stride + SAMPLE_SLICE).min(data.len())])
}

/// [`looks_incompressible`] for a frame given in pieces: only the slices are gathered.
fn pieces_look_incompressible(pieces: &[Bytes]) -> bool {
    let len: usize = pieces.iter().map(Bytes::len).sum();
    if len < SAMPLE_MIN_FRAME {
        return false;
    }
    let stride = len / SAMPLE_SLICES;
    let mut slices: Vec<Vec<u8>> = Vec::with_capacity(SAMPLE_SLICES);
    for i in 0..SAMPLE_SLICES {
        let (start, end) = (i * stride, (i * stride + SAMPLE_SLICE).min(len));
        let mut slice = Vec::with_capacity(end - start);
        let mut at = 0usize;
        for p in pieces {
            let (p_start, p_end) = (at, at + p.len());
            at = p_end;
            if p_end <= start {
                continue;
            }
            if p_start >= end {
                break;
            }
            slice.extend_from_slice(&p[start.max(p_start) - p_start..end.min(p_end) - p_start]);
        }
        slices.push(slice);
    }
    sample_incompressible(|i| &slices[i])
}

/// Compresses the [`SAMPLE_SLICES`] slices `slice(i)` gives at level 1 and says whether
/// they shrank by less than 1/32.
fn sample_incompressible<'a>(slice: impl Fn(usize) -> &'a [u8]) -> bool {
    let result = SAMPLER.with(|cell| -> std::io::Result<bool> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some((zstd::bulk::Compressor::new(1)?, Vec::new()));
        }
        let Some((c, out)) = slot.as_mut() else {
            return Ok(false);
        };
        let sampled: usize = (0..SAMPLE_SLICES).map(|i| slice(i).len()).sum();
        let bound = sampled - sampled / 32;
        // The most the slices not compressed yet can add (zstd's bound for each).
        let mut rest: usize = (0..SAMPLE_SLICES)
            .map(|i| zstd::zstd_safe::compress_bound(slice(i).len()))
            .sum();
        let mut stored = 0usize;
        for i in 0..SAMPLE_SLICES {
            let slice = slice(i);
            // Decided already: even if the rest did not compress at all, the sample shrinks
            // by more than 1/32 (the same answer as compressing every slice, for a quarter
            // of the work on data that compresses well, as WAL does).
            if stored + rest < bound {
                return Ok(false);
            }
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(slice.len()));
            stored += c.compress_to_buffer(slice, &mut *out)?;
            rest -= zstd::zstd_safe::compress_bound(slice.len());
        }
        Ok(stored >= bound)
    });
    // A sampling failure only means the frame gets the full attempt.
    result.unwrap_or(false)
}

/// Compresses `data` into the thread's reusable buffer and passes the result to `then`.
fn with_compressed<R>(
    level: i32,
    data: &[u8],
    then: impl FnOnce(&[u8]) -> R,
) -> std::io::Result<R> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let reuse = matches!(&*slot, Some((l, _)) if *l == level);
        if !reuse {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let Some((_, c)) = slot.as_mut() else {
            return Err(std::io::Error::other("zstd compressor missing"));
        };
        OUT_BUF.with(|out| {
            let mut out = out.borrow_mut();
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(data.len()));
            c.compress_to_buffer(data, &mut *out)?;
            Ok(then(&out))
        })
    })
}

/// LZ4-compresses `data` (block format) into the thread's reusable buffer and passes the
/// result to `then`.
fn with_lz4<R>(
    data: &[u8],
    then: impl FnOnce(&[u8]) -> R,
) -> Result<R, lz4_flex::block::CompressError> {
    OUT_BUF.with(|out| {
        let mut out = out.borrow_mut();
        let max = lz4_flex::block::get_maximum_output_size(data.len());
        if out.len() < max {
            out.resize(max, 0);
        }
        let n = lz4_flex::block::compress_into(data, &mut out[..])?;
        Ok(then(&out[..n]))
    })
}

fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, capacity),
            None => Err(std::io::Error::other("zstd decompressor missing")),
        }
    })
}

fn frame_header(
    flags: u8,
    payload: &[u8],
    original_len: usize,
) -> Result<[u8; FRAME_HEADER_LEN], String> {
    Ok(FrameHeader {
        flags,
        stored_len: u32::try_from(payload.len()).map_err(|_| "frame too large".to_string())?,
        original_len: u32::try_from(original_len).map_err(|_| "frame too large".to_string())?,
        payload_crc: crc32c::crc32c(payload),
    }
    .encode())
}

/// Encodes one frame given as one or more pieces. `level` None stores it raw.
#[cfg(test)]
pub(crate) fn encode_frame(
    pieces: &[Bytes],
    level: Option<Compress>,
    recipients: &[age::x25519::Recipient],
) -> Result<EncodedFrame, String> {
    encode_frame_then_hash(pieces, level, recipients, |_| true)
}

/// Encodes one frame given as one or more pieces (`level` None stores it raw), then passes
/// its original bytes to `hash` in one contiguous slice; `hash` returning false (the object
/// was abandoned) fails the frame.
///
/// Why after, and contiguous: a frame made of pieces is joined for the encoder anyway (in
/// the record itself when it is stored raw), and BLAKE3 (encrypted objects) hashes a
/// contiguous megabyte with its wide SIMD path, while pieces ending mid-chunk send part of
/// every piece through its one-block-at-a-time path (4% of a Redis snapshot's CPU when
/// every object was hashed with BLAKE3); XXH3 also consumes whole stripes best. Encoding first also lets frame
/// workers compress in parallel before they wait for their turn in the hash chain.
pub(crate) fn encode_frame_then_hash(
    pieces: &[Bytes],
    level: Option<Compress>,
    recipients: &[age::x25519::Recipient],
    hash: impl FnOnce(&[u8]) -> bool,
) -> Result<EncodedFrame, String> {
    let hashed = |ok: bool, frame: EncodedFrame| {
        if ok {
            Ok(frame)
        } else {
            Err("write abandoned".to_string())
        }
    };
    // Only zstd is sampled: LZ4 itself skips ahead faster and faster through data where
    // it finds no match, so on incompressible frames it costs about what the sample would,
    // and on compressible ones (WAL) the sample would be wasted work.
    let sampled = matches!(level, Some(Compress::Zstd(_)));
    if pieces.len() == 1 {
        let level = level.filter(|_| !(sampled && looks_incompressible(&pieces[0])));
        let frame = encode_contiguous(&pieces[0], level, recipients)?;
        return hashed(hash(&pieces[0]), frame);
    }
    let mut level = level;
    if sampled && pieces_look_incompressible(pieces) {
        if recipients.is_empty() {
            // Stored raw: the pieces go straight into the record, one copy instead of
            // joining them first.
            let len: usize = pieces.iter().map(Bytes::len).sum();
            let mut record = Vec::with_capacity(FRAME_HEADER_LEN + len);
            record.resize(FRAME_HEADER_LEN, 0);
            for p in pieces {
                record.extend_from_slice(p);
            }
            let header = frame_header(0, &record[FRAME_HEADER_LEN..], len)?;
            record[..FRAME_HEADER_LEN].copy_from_slice(&header);
            let ok = hash(&record[FRAME_HEADER_LEN..]);
            return hashed(
                ok,
                EncodedFrame {
                    record: Bytes::from(record),
                },
            );
        }
        level = None;
    }
    JOIN_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.clear();
        for p in pieces {
            buf.extend_from_slice(p);
        }
        let frame = encode_contiguous(&buf, level, recipients)?;
        hashed(hash(&buf), frame)
    })
}

/// Encodes a contiguous frame; `level` is `None` when it is to be stored raw (the caller
/// has sampled it already).
fn encode_contiguous(
    data: &[u8],
    level: Option<Compress>,
    recipients: &[age::x25519::Recipient],
) -> Result<EncodedFrame, String> {
    let h = FRAME_HEADER_LEN;
    // The record is allocated at its exact size, so only the pages it needs are touched.
    let record_from = |payload: &[u8]| {
        let mut r = Vec::with_capacity(h + payload.len());
        r.resize(h, 0);
        r.extend_from_slice(payload);
        r
    };
    let mut flags = 0u8;
    let mut record = None;
    match level {
        Some(Compress::Zstd(level)) => {
            let compressed = with_compressed(level, data, |z| {
                (z.len() < data.len()).then(|| record_from(z))
            })
            .map_err(|e| format!("zstd: {e}"))?;
            if let Some(r) = compressed {
                record = Some(r);
                flags |= FRAME_ZSTD;
            }
        }
        Some(Compress::Lz4) => {
            let compressed = with_lz4(data, |z| (z.len() < data.len()).then(|| record_from(z)))
                .map_err(|e| format!("lz4: {e}"))?;
            if let Some(r) = compressed {
                record = Some(r);
                flags |= FRAME_LZ4;
            }
        }
        None => {}
    }
    let mut record = match record {
        Some(r) => r,
        None => record_from(data),
    };
    if !recipients.is_empty() {
        let enc =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| format!("age: {e}"))?;
        let plain = &record[h..];
        let mut out = Vec::with_capacity(h + plain.len() + 256 + plain.len() / 4096 * 16);
        out.resize(h, 0);
        let mut w = enc.wrap_output(&mut out).map_err(|e| format!("age: {e}"))?;
        w.write_all(plain).map_err(|e| format!("age: {e}"))?;
        w.finish().map_err(|e| format!("age: {e}"))?;
        record = out;
        flags |= FRAME_AGE;
    }
    let header = frame_header(flags, &record[h..], data.len())?;
    record[..h].copy_from_slice(&header);
    Ok(EncodedFrame {
        record: Bytes::from(record),
    })
}

/// Why a frame could not be decoded (the caller adds key and offset).
pub(crate) enum DecodeError {
    /// No identity matches, or the ciphertext is damaged.
    Decrypt(String),
    /// zstd or LZ4 failed or produced the wrong length.
    Decompress { expected: u64, actual: String },
}

/// Decodes one frame's payload (already CRC-checked) into its original bytes.
pub(crate) fn decode_frame(
    header: &FrameHeader,
    payload: &[u8],
    identities: &[age::x25519::Identity],
) -> Result<Bytes, DecodeError> {
    let decrypted;
    let mut data: &[u8] = payload;
    if header.flags & FRAME_AGE != 0 {
        let dec = age::Decryptor::new(payload).map_err(|e| DecodeError::Decrypt(e.to_string()))?;
        let mut r = dec
            .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| DecodeError::Decrypt(e.to_string()))?;
        let cap = payload.len();
        let mut out = Vec::with_capacity(cap);
        (&mut r)
            .take(cap as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| DecodeError::Decrypt(e.to_string()))?;
        decrypted = out;
        data = &decrypted;
    }
    let want = header.original_len as usize;
    if header.flags & FRAME_LZ4 != 0 {
        let out = lz4_flex::block::decompress(data, want).map_err(|e| DecodeError::Decompress {
            expected: want as u64,
            actual: format!("lz4 error: {e}"),
        })?;
        if out.len() != want {
            return Err(DecodeError::Decompress {
                expected: want as u64,
                actual: format!("{} bytes", out.len()),
            });
        }
        Ok(Bytes::from(out))
    } else if header.flags & FRAME_ZSTD != 0 {
        let out = decompress(data, want).map_err(|e| DecodeError::Decompress {
            expected: want as u64,
            actual: format!("zstd error: {e}"),
        })?;
        if out.len() != want {
            return Err(DecodeError::Decompress {
                expected: want as u64,
                actual: format!("{} bytes", out.len()),
            });
        }
        Ok(Bytes::from(out))
    } else if data.len() != want {
        Err(DecodeError::Decompress {
            expected: want as u64,
            actual: format!("{} bytes", data.len()),
        })
    } else if data.as_ptr() == payload.as_ptr() {
        Ok(Bytes::copy_from_slice(data))
    } else {
        Ok(Bytes::from(decrypted_owned(data)))
    }
}

fn decrypted_owned(data: &[u8]) -> Vec<u8> {
    data.to_vec()
}

/// Feeds frames to one content hasher in frame order although they are processed in
/// parallel.
pub(crate) struct HashChain {
    state: Mutex<ChainState>,
    turn: Condvar,
}

struct ChainState {
    next: u64,
    hasher: ContentHasher,
    abandoned: bool,
}

impl HashChain {
    /// A chain that has hashed nothing yet into `hasher`.
    pub fn new(hasher: ContentHasher) -> Self {
        HashChain {
            state: Mutex::new(ChainState {
                next: 0,
                hasher,
                abandoned: false,
            }),
            turn: Condvar::new(),
        }
    }

    /// Blocks until every frame before `index` has been hashed, then hashes `data`.
    /// Returns false when the chain was abandoned (the object is being dropped).
    pub fn update(&self, index: u64, data: &[u8]) -> bool {
        self.update_pieces(index, std::slice::from_ref(&data))
    }

    /// `update` for a frame given in pieces.
    pub fn update_pieces<T: AsRef<[u8]>>(&self, index: u64, pieces: &[T]) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.next != index && !st.abandoned {
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.abandoned {
            return false;
        }
        for p in pieces {
            st.hasher.update(p.as_ref());
        }
        st.next += 1;
        drop(st);
        self.turn.notify_all();
        true
    }

    /// Wakes and releases every waiting job (used when the object is dropped or fails).
    pub fn abandon(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.abandoned = true;
        drop(st);
        self.turn.notify_all();
    }

    /// The digest after `frames` frames; None if not all were hashed.
    pub fn finish(&self, frames: u64) -> Option<[u8; 32]> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (st.next == frames && !st.abandoned).then(|| st.hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// xorshift64* bytes: incompressible to zstd.
    fn random(len: usize, mut state: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            v.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn flags_of(data: &[u8]) -> u8 {
        let f = encode_frame(
            &[Bytes::copy_from_slice(data)],
            Some(Compress::Zstd(3)),
            &[],
        )
        .unwrap();
        let h = FrameHeader::parse("k", &f.record[..FRAME_HEADER_LEN], 0, 1 << 20).unwrap();
        let Ok(back) = decode_frame(&h, &f.record[FRAME_HEADER_LEN..], &[]) else {
            panic!("the frame does not decode");
        };
        assert_eq!(&back[..], data, "the frame decodes to its bytes");
        h.flags
    }

    #[test]
    fn random_frames_are_stored_raw_without_a_full_compression() {
        let data = random(1 << 20, 7);
        assert!(looks_incompressible(&data));
        assert_eq!(flags_of(&data) & FRAME_ZSTD, 0);
    }

    #[test]
    fn frames_that_compress_are_compressed() {
        // Text-like records, and half zeros / half random: both shrink, so both are tried.
        let mut text: Vec<u8> = (0..(1 << 20) / 16)
            .flat_map(|i: u32| format!("row {i:08} ok...").into_bytes())
            .collect();
        text.truncate(1 << 20);
        assert!(!looks_incompressible(&text));
        assert_ne!(flags_of(&text) & FRAME_ZSTD, 0);
        let mut half = vec![0u8; 1 << 19];
        half.extend(random(1 << 19, 9));
        assert!(!looks_incompressible(&half));
        assert_ne!(flags_of(&half) & FRAME_ZSTD, 0);
    }

    #[test]
    fn frames_in_pieces_are_judged_like_whole_ones() {
        let random_frame = random(1 << 20, 11);
        let pieces: Vec<Bytes> = random_frame
            .chunks(20_000)
            .map(Bytes::copy_from_slice)
            .collect();
        assert!(pieces_look_incompressible(&pieces));
        let f = encode_frame(&pieces, Some(Compress::Zstd(3)), &[]).unwrap();
        let h = FrameHeader::parse("k", &f.record[..FRAME_HEADER_LEN], 0, 1 << 20).unwrap();
        assert_eq!(h.flags & FRAME_ZSTD, 0);
        assert_eq!(&f.record[FRAME_HEADER_LEN..], &random_frame[..]);
        let mut half = vec![7u8; 1 << 19];
        half.extend(random(1 << 19, 5));
        let pieces: Vec<Bytes> = half.chunks(30_000).map(Bytes::copy_from_slice).collect();
        assert!(!pieces_look_incompressible(&pieces));
        let f = encode_frame(&pieces, Some(Compress::Zstd(3)), &[]).unwrap();
        let h = FrameHeader::parse("k", &f.record[..FRAME_HEADER_LEN], 0, 1 << 20).unwrap();
        assert_ne!(h.flags & FRAME_ZSTD, 0);
    }

    /// The sample's verdict with every slice compressed (what the early exit must equal).
    fn full_sample_verdict(data: &[u8]) -> bool {
        let stride = data.len() / SAMPLE_SLICES;
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        let (mut sampled, mut stored) = (0, 0);
        for i in 0..SAMPLE_SLICES {
            let slice = &data[i * stride..(i * stride + SAMPLE_SLICE).min(data.len())];
            stored += c.compress(slice).unwrap().len();
            sampled += slice.len();
        }
        stored >= sampled - sampled / 32
    }

    #[test]
    fn sampling_stops_early_with_the_same_verdict() {
        // Compressible, incompressible, and mixes where the last slices decide.
        let mut cases = vec![vec![0u8; 1 << 20], random(1 << 20, 13)];
        for random_from in [1usize, 2, 3] {
            let stride = (1 << 20) / SAMPLE_SLICES;
            let mut d = random(1 << 20, 17 + random_from as u64);
            d[..random_from * stride].fill(b'w');
            cases.push(d);
            let mut d = vec![b'w'; 1 << 20];
            d[..random_from * stride].copy_from_slice(&random(random_from * stride, 3));
            cases.push(d);
        }
        for (i, d) in cases.iter().enumerate() {
            assert_eq!(looks_incompressible(d), full_sample_verdict(d), "case {i}");
        }
    }

    #[test]
    fn lz4_frames_of_random_bytes_are_stored_raw() {
        let data = random(1 << 20, 21);
        let f = encode_frame(&[Bytes::copy_from_slice(&data)], Some(Compress::Lz4), &[]).unwrap();
        let h = FrameHeader::parse("k", &f.record[..FRAME_HEADER_LEN], 0, 1 << 20).unwrap();
        assert_eq!(
            h.flags & (FRAME_LZ4 | FRAME_ZSTD),
            0,
            "LZ4 did not shrink it"
        );
        assert_eq!(&f.record[FRAME_HEADER_LEN..], &data[..]);
    }

    #[test]
    fn small_frames_are_not_sampled() {
        let data = random(64 << 10, 3);
        assert!(!looks_incompressible(&data));
        // zstd itself finds it does not help.
        assert_eq!(flags_of(&data) & FRAME_ZSTD, 0);
    }

    #[test]
    fn lz4_frames_round_trip_and_damage_is_refused() {
        let mut text: Vec<u8> = (0..(1 << 20) / 16)
            .flat_map(|i: u32| format!("row {i:08} ok...").into_bytes())
            .collect();
        text.truncate(1 << 20);
        let pieces: Vec<Bytes> = text.chunks(100_000).map(Bytes::copy_from_slice).collect();
        for input in [vec![Bytes::from(text.clone())], pieces] {
            let f = encode_frame(&input, Some(Compress::Lz4), &[]).unwrap();
            let h = FrameHeader::parse("k", &f.record[..FRAME_HEADER_LEN], 0, 1 << 20).unwrap();
            assert_eq!(h.flags, FRAME_LZ4);
            assert!(f.record.len() < text.len() / 4);
            let Ok(back) = decode_frame(&h, &f.record[FRAME_HEADER_LEN..], &[]) else {
                panic!("the frame does not decode");
            };
            assert_eq!(&back[..], &text[..]);
            // A payload that decodes to another length, or not at all, is refused.
            let short = FrameHeader {
                original_len: h.original_len - 1,
                ..h
            };
            assert!(decode_frame(&short, &f.record[FRAME_HEADER_LEN..], &[]).is_err());
            let cut = &f.record[FRAME_HEADER_LEN..f.record.len() - 7];
            assert!(decode_frame(&h, cut, &[]).is_err());
        }
        // Incompressible frames stay raw.
        let data = random(1 << 20, 5);
        let f = encode_frame(&[Bytes::from(data)], Some(Compress::Lz4), &[]).unwrap();
        assert_eq!(f.record[1], 0);
    }
}
