//! The object container, version 4 (specified in `storage/FORMAT.md`; versions 1 to 3 are
//! still read): a header, a body of independently decodable frames, and a fixed-size trailer.
//! This module only lays bytes out and parses them back (no I/O), so it can be fuzzed and
//! reused by other tools.
//!
//! Every structure carries its own CRC32C, so a damaged byte is reported with the offset of
//! the structure that holds it, and the trailer's digest proves the decoded whole. From
//! version 2 the header names the key the object was written for and the repository it
//! belongs to ([`Binding`]), and the trailer's digest covers that binding
//! ([`bound_digest`]), so an intact object stored under another key, or copied from
//! another repository, is refused instead of being served as the wrong data. Versions 3
//! and 4 differ from version 2 only in the content hash inside that digest
//! ([`ContentHash`]): BLAKE3 instead of SHA-256 (a quarter of the CPU on every byte written
//! and read), and in version 4 XXH3-128 for plaintext objects (a quarter of BLAKE3's).

use crate::error::{Result, StorageError};

/// First bytes of every object (PNG-style: non-ASCII, CR LF, ^Z, LF detect mangling).
pub const MAGIC: [u8; 8] = [0x89, b'S', b'B', b'O', b'\r', b'\n', 0x1a, b'\n'];
/// Last bytes of every complete object.
pub const END_MAGIC: [u8; 8] = *b"SBOEND\r\n";
/// The container version this build writes by default and the highest it reads.
pub const FORMAT_VERSION: u16 = 4;
/// The version whose content hash is BLAKE3 for every object (written on request, for
/// readers older than version 4).
pub const BLAKE3_FORMAT_VERSION: u16 = 3;
/// The oldest container version this build writes (on request, for older readers):
/// bound to key and repository, content hashed with SHA-256.
pub const SHA256_FORMAT_VERSION: u16 = 2;
/// The oldest container version this build still reads (no binding to key or repository).
pub const UNBOUND_FORMAT_VERSION: u16 = 1;
/// Longest key a version 2 header records (keys built by `layout` are far shorter).
pub const MAX_KEY_LEN: usize = 1024;
/// Bytes of a repository id.
pub const REPO_ID_LEN: usize = 16;
/// Bytes the binding adds to a version 2 header before the key: repository id, key length.
pub const BINDING_FIXED_LEN: usize = REPO_ID_LEN + 2;
/// Domain separation for [`bound_digest`], version 2 (content hashed with SHA-256).
const BINDING_DOMAIN_V2: &[u8; 16] = b"SBO2 key binding";
/// Domain separation for [`bound_digest`], content hashed with BLAKE3 (versions 3 and 4).
const BINDING_DOMAIN_V3: &[u8; 16] = b"SBO3 key binding";
/// Domain separation for [`bound_digest`], content hashed with XXH3-128 (version 4).
const BINDING_DOMAIN_V4: &[u8; 16] = b"SBO4 key binding";
/// Fixed part of the header, before recipient fingerprints and the CRC.
pub const HEADER_FIXED_LEN: usize = 32;
/// Bytes of one recipient fingerprint (SHA-256 of the recipient string).
pub const FINGERPRINT_LEN: usize = 32;
/// Upper bound on recipients, caps the header allocation.
pub const MAX_RECIPIENTS: usize = 64;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 20;
/// Bytes of the trailer.
pub const TRAILER_LEN: usize = 68;
/// Tag byte of a frame record.
pub const FRAME_TAG: u8 = b'F';
/// Tag byte of the trailer.
pub const TRAILER_TAG: u8 = b'T';
/// Frame flag: payload is a zstd frame.
pub const FRAME_ZSTD: u8 = 0x01;
/// Frame flag (format version 3): payload is an LZ4 block. Never together with `FRAME_ZSTD`.
pub const FRAME_LZ4: u8 = 0x04;
/// Frame flag: payload is an age file (of the possibly compressed bytes).
pub const FRAME_AGE: u8 = 0x02;
/// Largest original bytes per frame a reader accepts (caps allocations from headers).
pub const MAX_FRAME_ORIGINAL: u32 = 64 << 20;
/// Largest stored payload per frame a reader accepts.
pub const MAX_FRAME_STORED: u32 = MAX_FRAME_ORIGINAL + (1 << 20);
/// Original length value meaning "not known when the header was written".
pub const UNKNOWN_LEN: u64 = u64::MAX;

/// What an object holds; recorded so a stray object explains itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentKind {
    /// Anything not listed (tests, tools).
    Other,
    /// The repository marker.
    Marker,
    /// A complete PostgreSQL WAL segment.
    WalSegment,
    /// A partial WAL segment.
    WalPartial,
    /// A timeline history file.
    TimelineHistory,
    /// One delta of a WAL segment in progress (bytes `[start, end)`, named by its key).
    WalDelta,
    /// Base backup data.
    BaseBackupData,
    /// A base backup manifest (server's or agent's).
    BaseBackupManifest,
    /// A Redis RDB snapshot.
    RedisSnapshot,
    /// A chunk of the Redis replication stream.
    RedisCommands,
    /// A Redis generation manifest.
    RedisManifest,
    /// A kind written by a newer version.
    Unknown(u8),
}

impl ContentKind {
    /// The byte stored in the header.
    pub fn code(self) -> u8 {
        match self {
            ContentKind::Other => 0,
            ContentKind::Marker => 1,
            ContentKind::WalSegment => 2,
            ContentKind::WalPartial => 3,
            ContentKind::TimelineHistory => 4,
            ContentKind::BaseBackupData => 5,
            ContentKind::BaseBackupManifest => 6,
            ContentKind::RedisSnapshot => 7,
            ContentKind::RedisCommands => 8,
            ContentKind::RedisManifest => 9,
            ContentKind::WalDelta => 10,
            ContentKind::Unknown(c) => c,
        }
    }

    /// Inverse of `code`; unknown codes are kept, not rejected (forward compatibility).
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => ContentKind::Other,
            1 => ContentKind::Marker,
            2 => ContentKind::WalSegment,
            3 => ContentKind::WalPartial,
            4 => ContentKind::TimelineHistory,
            5 => ContentKind::BaseBackupData,
            6 => ContentKind::BaseBackupManifest,
            7 => ContentKind::RedisSnapshot,
            8 => ContentKind::RedisCommands,
            9 => ContentKind::RedisManifest,
            10 => ContentKind::WalDelta,
            c => ContentKind::Unknown(c),
        }
    }

    /// A short lower-case name for listings.
    pub fn name(self) -> String {
        match self {
            ContentKind::Other => "other".into(),
            ContentKind::Marker => "marker".into(),
            ContentKind::WalSegment => "wal-segment".into(),
            ContentKind::WalPartial => "wal-partial".into(),
            ContentKind::TimelineHistory => "timeline-history".into(),
            ContentKind::BaseBackupData => "base-backup-data".into(),
            ContentKind::BaseBackupManifest => "base-backup-manifest".into(),
            ContentKind::RedisSnapshot => "redis-snapshot".into(),
            ContentKind::RedisCommands => "redis-commands".into(),
            ContentKind::RedisManifest => "redis-manifest".into(),
            ContentKind::WalDelta => "wal-delta".into(),
            ContentKind::Unknown(c) => format!("unknown-{c}"),
        }
    }
}

/// Codec recorded in the header: the writer's intent. Each frame's flags say what was
/// actually applied (incompressible frames are stored raw).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Frames stored as is.
    None,
    /// Frames compressed with zstd when that makes them smaller.
    Zstd,
    /// Frames compressed with LZ4 (block format) when that makes them smaller (format
    /// version 3): about a quarter of zstd level 1's CPU, larger objects.
    Lz4,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
            Codec::Lz4 => 2,
        }
    }
}

/// A repository's identity (random, from the marker), recorded in every version 2 object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RepoId(pub [u8; REPO_ID_LEN]);

impl RepoId {
    /// A new random id, for a new repository.
    pub fn random() -> Self {
        RepoId(rand::random())
    }

    /// Parses the 32 hex digits the marker stores.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(RepoId(bytes.try_into().ok()?))
    }

    /// Lower-case hex, as the marker stores it and messages show it.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a version 2 object is: the key it was written for, in the repository of this id.
/// Readers compare it with the key they asked for and the repository they opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The repository the object was written into.
    pub repo_id: RepoId,
    /// The key the object was written under.
    pub key: String,
}

/// How an object hashes its original bytes (the digest inside [`bound_digest`]; in
/// version 1, the trailer's digest itself), chosen by its version and whether it is
/// encrypted ([`ContentHash::of_object`]).
///
/// Why a non-cryptographic hash for plaintext objects in version 4: the content hash is
/// never stored in the clear, and inside an encrypted object it is what stops someone
/// without the key from re-binding the object to another key (they cannot compute it
/// without the plaintext); there it must be preimage-resistant and stays BLAKE3. A
/// plaintext object can be rewritten whole, digest included, by anyone who can write to the
/// bucket, whatever the hash, so there the content hash only has to catch accidents
/// (damage, a codec that does not give back what it was given) end to end, which a 128-bit
/// XXH3 does, at a quarter of BLAKE3's CPU: the largest cost of streaming WAL left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentHash {
    /// SHA-256 (FIPS 180-4): versions 1 and 2.
    Sha256,
    /// BLAKE3 with its default 32-byte output: version 3, and encrypted objects of
    /// version 4.
    Blake3,
    /// XXH3-128 (<https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md>, seed 0),
    /// its 16 bytes big-endian then 16 zero bytes: plaintext objects of version 4.
    Xxh3,
}

impl ContentHash {
    /// The content hash of an object of container `version` (a version this build reads),
    /// encrypted or not.
    pub fn of_object(version: u16, encrypted: bool) -> ContentHash {
        match version {
            0..=2 => ContentHash::Sha256,
            3 => ContentHash::Blake3,
            _ if encrypted => ContentHash::Blake3,
            _ => ContentHash::Xxh3,
        }
    }

    /// A hasher in its initial state.
    pub fn hasher(self) -> ContentHasher {
        match self {
            ContentHash::Sha256 => ContentHasher::Sha256(sha2::Sha256::default()),
            ContentHash::Blake3 => ContentHasher::Blake3(Box::default()),
            ContentHash::Xxh3 => ContentHasher::Xxh3(Box::default()),
        }
    }

    /// The hash of `pieces` taken as one byte sequence.
    pub fn digest<T: AsRef<[u8]>>(self, pieces: &[T]) -> [u8; 32] {
        let mut h = self.hasher();
        for p in pieces {
            h.update(p.as_ref());
        }
        h.finalize()
    }

    /// Whether nobody can make two contents with the same hash: true for SHA-256 and
    /// BLAKE3, false for XXH3-128 (accidents only), so "the digests match" means "the
    /// contents are equal" only for the first two; compare the bytes otherwise.
    pub fn collision_resistant(self) -> bool {
        !matches!(self, ContentHash::Xxh3)
    }

    /// The algorithm's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ContentHash::Sha256 => "SHA-256",
            ContentHash::Blake3 => "BLAKE3",
            ContentHash::Xxh3 => "XXH3-128",
        }
    }

    /// The domain tag of [`bound_digest`] over a content digest of this hash: it names the
    /// hash, so a header whose version or encryption flag was rewritten (its CRC is no
    /// secret) cannot make one hash's digest pass for another's.
    fn binding_domain(self) -> &'static [u8; 16] {
        match self {
            ContentHash::Sha256 => BINDING_DOMAIN_V2,
            ContentHash::Blake3 => BINDING_DOMAIN_V3,
            ContentHash::Xxh3 => BINDING_DOMAIN_V4,
        }
    }
}

/// A content hash in progress (see [`ContentHash`]).
#[derive(Clone)]
pub enum ContentHasher {
    /// SHA-256 (versions 1 and 2).
    Sha256(sha2::Sha256),
    /// BLAKE3 (version 3, encrypted objects of 4); boxed, its state is about 2 KiB.
    Blake3(Box<blake3::Hasher>),
    /// XXH3-128 (plaintext objects of version 4); boxed, its state is about 600 bytes.
    Xxh3(Box<xxhash_rust::xxh3::Xxh3>),
}

impl ContentHasher {
    /// Hashes more bytes. BLAKE3 hashes up to 16 of its 1 KiB chunks at once (AVX-512,
    /// AVX2, SSE4.1, chosen at run time), so large pieces are fastest.
    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        match self {
            ContentHasher::Sha256(h) => h.update(data),
            ContentHasher::Blake3(h) => {
                h.update(data);
            }
            ContentHasher::Xxh3(h) => h.update(data),
        }
    }

    /// The digest of everything hashed so far (the state is kept).
    pub fn finalize(&self) -> [u8; 32] {
        use sha2::Digest;
        match self {
            ContentHasher::Sha256(h) => h.clone().finalize().into(),
            ContentHasher::Blake3(h) => *h.finalize().as_bytes(),
            ContentHasher::Xxh3(h) => {
                let mut out = [0u8; 32];
                out[..16].copy_from_slice(&h.digest128().to_be_bytes());
                out
            }
        }
    }

    /// Which algorithm this is.
    pub fn algorithm(&self) -> ContentHash {
        match self {
            ContentHasher::Sha256(_) => ContentHash::Sha256,
            ContentHasher::Blake3(_) => ContentHash::Blake3,
            ContentHasher::Xxh3(_) => ContentHash::Xxh3,
        }
    }
}

/// The digest a version 2 to 4 trailer records: SHA-256 over a domain tag naming the
/// content hash, the binding and the hash of the original bytes (`content_digest`, of
/// `hash`: see [`ContentHash::of_object`]).
///
/// Why nested: the content hash is never stored in the clear, so someone who can write to
/// the bucket but cannot decrypt an object cannot compute the digest the same content
/// would have under another key or repository (the outer hash needs the inner one, which
/// needs the plaintext). A plain `SHA-256(content || binding)` would not do: a trailer's
/// hash could be length-extended over an appended frame. The domain tag differs per
/// content hash, so rewriting a header's version or encryption flag (its CRC is no secret)
/// cannot make one hash's digest pass for another's.
pub fn bound_digest(content_digest: &[u8; 32], binding: &Binding, hash: ContentHash) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(hash.binding_domain());
    h.update(binding.repo_id.0);
    h.update((binding.key.len() as u16).to_le_bytes());
    h.update(binding.key.as_bytes());
    h.update(content_digest);
    h.finalize().into()
}

/// The decoded object header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Container version.
    pub version: u16,
    /// What the object holds.
    pub kind: ContentKind,
    /// Intended codec.
    pub codec: Codec,
    /// Whether frames are age-encrypted.
    pub encrypted: bool,
    /// Original length when known at write time.
    pub original_len: Option<u64>,
    /// Largest original bytes in one frame.
    pub frame_size: u32,
    /// SHA-256 fingerprints of the age recipients' public keys.
    pub recipients: Vec<[u8; FINGERPRINT_LEN]>,
    /// Versions 2 and 3: the key and repository the object was written for; `None` in
    /// version 1.
    pub binding: Option<Binding>,
}

impl Header {
    /// Encoded length of this header.
    pub fn encoded_len(&self) -> usize {
        let binding = self
            .binding
            .as_ref()
            .map_or(0, |b| BINDING_FIXED_LEN + b.key.len());
        HEADER_FIXED_LEN + FINGERPRINT_LEN * self.recipients.len() + binding + 4
    }

    /// Serialises the header.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.encoded_len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(self.kind.code());
        out.push(self.codec.code());
        out.push(u8::from(self.encrypted));
        out.push(0);
        out.extend_from_slice(&self.original_len.unwrap_or(UNKNOWN_LEN).to_le_bytes());
        out.extend_from_slice(&self.frame_size.to_le_bytes());
        out.extend_from_slice(&(self.recipients.len() as u16).to_le_bytes());
        for r in &self.recipients {
            out.extend_from_slice(r);
        }
        if let Some(b) = &self.binding {
            out.extend_from_slice(&b.repo_id.0);
            out.extend_from_slice(&(b.key.len() as u16).to_le_bytes());
            out.extend_from_slice(b.key.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a header from the start of `buf`. `Ok(None)` while `buf` is too short;
    /// `Ok(Some((header, len)))` once complete.
    pub fn parse(key: &str, buf: &[u8]) -> Result<Option<(Header, usize)>> {
        if buf.len() < 14 {
            // Fail early on a wrong magic even when short, so garbage is named quickly.
            let n = buf.len().min(MAGIC.len());
            if buf[..n] != MAGIC[..n] {
                return Err(magic_err(key, &buf[..n]));
            }
            return Ok(None);
        }
        if buf[..8] != MAGIC {
            return Err(magic_err(key, &buf[..8]));
        }
        let version = u16_at(buf, 8);
        if !(UNBOUND_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(StorageError::UnsupportedVersion {
                key: key.to_owned(),
                version,
                supported: FORMAT_VERSION,
            });
        }
        let len = u32_at(buf, 10) as usize;
        let bound = version >= 2;
        let (min, max) = if bound {
            let min = HEADER_FIXED_LEN + BINDING_FIXED_LEN + 4;
            (min, min + FINGERPRINT_LEN * MAX_RECIPIENTS + MAX_KEY_LEN)
        } else {
            let min = HEADER_FIXED_LEN + 4;
            (min, min + FINGERPRINT_LEN * MAX_RECIPIENTS)
        };
        if !(min..=max).contains(&len) {
            return Err(StorageError::corrupt(
                key,
                "header length",
                format!("{min}..={max}"),
                len,
                10,
            ));
        }
        if buf.len() < len {
            return Ok(None);
        }
        let stored_crc = u32_at(buf, len - 4);
        let crc = crc32c::crc32c(&buf[..len - 4]);
        if crc != stored_crc {
            return Err(StorageError::corrupt(
                key,
                "header crc32c",
                format!("{stored_crc:08x}"),
                format!("{crc:08x}"),
                0,
            ));
        }
        let count = u16_at(buf, 30) as usize;
        let binding_at = HEADER_FIXED_LEN + FINGERPRINT_LEN * count;
        let binding = if bound {
            // Version 2: the recipients are followed by the repository id and the key.
            if count > MAX_RECIPIENTS || binding_at + BINDING_FIXED_LEN + 4 > len {
                return Err(StorageError::corrupt(
                    key,
                    "header recipient count",
                    format!("at most {MAX_RECIPIENTS} fitting the header length {len}"),
                    count,
                    30,
                ));
            }
            let mut id = [0u8; REPO_ID_LEN];
            id.copy_from_slice(&buf[binding_at..binding_at + REPO_ID_LEN]);
            let key_len = u16_at(buf, binding_at + REPO_ID_LEN) as usize;
            let key_at = binding_at + BINDING_FIXED_LEN;
            if key_len > MAX_KEY_LEN || key_at + key_len + 4 != len {
                return Err(StorageError::corrupt(
                    key,
                    "header key length",
                    len.saturating_sub(key_at + 4),
                    key_len,
                    (binding_at + REPO_ID_LEN) as u64,
                ));
            }
            let bound_key = std::str::from_utf8(&buf[key_at..key_at + key_len]).map_err(|_| {
                StorageError::corrupt(
                    key,
                    "header key",
                    "UTF-8 text",
                    "other bytes",
                    key_at as u64,
                )
            })?;
            Some(Binding {
                repo_id: RepoId(id),
                key: bound_key.to_owned(),
            })
        } else {
            if len != binding_at + 4 {
                return Err(StorageError::corrupt(
                    key,
                    "header recipient count",
                    (len - HEADER_FIXED_LEN - 4) / FINGERPRINT_LEN,
                    count,
                    30,
                ));
            }
            None
        };
        let codec = match buf[15] {
            0 => Codec::None,
            1 => Codec::Zstd,
            2 if version >= 3 => Codec::Lz4,
            c => {
                let known = if version >= 3 { "0, 1 or 2" } else { "0 or 1" };
                return Err(StorageError::corrupt(key, "header codec", known, c, 15));
            }
        };
        let encrypted = match buf[16] {
            0 => false,
            1 => true,
            f => return Err(StorageError::corrupt(key, "header flags", "0 or 1", f, 16)),
        };
        let original_len = match u64_at(buf, 18) {
            UNKNOWN_LEN => None,
            n => Some(n),
        };
        let frame_size = u32_at(buf, 26);
        if frame_size == 0 || frame_size > MAX_FRAME_ORIGINAL {
            return Err(StorageError::corrupt(
                key,
                "header frame size",
                format!("1..={MAX_FRAME_ORIGINAL}"),
                frame_size,
                26,
            ));
        }
        let recipients = (0..count)
            .map(|i| {
                let at = HEADER_FIXED_LEN + i * FINGERPRINT_LEN;
                let mut fp = [0u8; FINGERPRINT_LEN];
                fp.copy_from_slice(&buf[at..at + FINGERPRINT_LEN]);
                fp
            })
            .collect();
        Ok(Some((
            Header {
                version,
                kind: ContentKind::from_code(buf[14]),
                codec,
                encrypted,
                original_len,
                frame_size,
                recipients,
                binding,
            },
            len,
        )))
    }
}

fn magic_err(key: &str, found: &[u8]) -> StorageError {
    StorageError::corrupt(
        key,
        "header magic (not a SyncBridge object?)",
        hex::encode(MAGIC),
        hex::encode(found),
        0,
    )
}

/// The running CRC32C of an object's stored bytes after one more frame `record` (header and
/// payload). For a large payload it is combined from the CRC32C of the record's header and
/// the payload CRC32C that header carries (computed by the writer's encoder, or checked by
/// the reader just before) instead of reading the payload a second time: the combination
/// ([`crate::crc::crc32c_combine`]) costs 0.2 µs whatever the length, reading 4 KiB about
/// as much, a megabyte about 75 µs.
pub(crate) fn stored_crc_after_record(crc: u32, record: &[u8]) -> u32 {
    const COMBINE_FROM: usize = 4 << 10;
    let (Some(header), Some(payload_crc)) = (
        record.get(..FRAME_HEADER_LEN),
        record
            .get(12..16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes),
    ) else {
        return crc32c::crc32c_append(crc, record);
    };
    let payload_len = record.len() - FRAME_HEADER_LEN;
    if payload_len < COMBINE_FROM {
        return crc32c::crc32c_append(crc, record);
    }
    crate::crc::crc32c_combine(
        crc32c::crc32c_append(crc, header),
        payload_crc,
        payload_len as u64,
    )
}

/// A frame header: what follows and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// `FRAME_ZSTD` or `FRAME_LZ4`, | `FRAME_AGE`.
    pub flags: u8,
    /// Payload bytes that follow the header.
    pub stored_len: u32,
    /// Bytes the payload decodes to.
    pub original_len: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

impl FrameHeader {
    /// Serialises the frame header (including its own CRC).
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = FRAME_TAG;
        out[1] = self.flags;
        out[4..8].copy_from_slice(&self.stored_len.to_le_bytes());
        out[8..12].copy_from_slice(&self.original_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..16]);
        out[16..20].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a frame header that starts at stored `offset`; `buf` holds at least
    /// `FRAME_HEADER_LEN` bytes and starts with `FRAME_TAG`.
    pub fn parse(key: &str, buf: &[u8], offset: u64, frame_size: u32) -> Result<FrameHeader> {
        let stored_crc = u32_at(buf, 16);
        let crc = crc32c::crc32c(&buf[..16]);
        if crc != stored_crc {
            return Err(StorageError::corrupt(
                key,
                "frame header crc32c",
                format!("{stored_crc:08x}"),
                format!("{crc:08x}"),
                offset,
            ));
        }
        let flags = buf[1];
        if flags & !(FRAME_ZSTD | FRAME_LZ4 | FRAME_AGE) != 0
            || flags & (FRAME_ZSTD | FRAME_LZ4) == FRAME_ZSTD | FRAME_LZ4
            || buf[2] != 0
            || buf[3] != 0
        {
            return Err(StorageError::corrupt(
                key,
                "frame flags",
                "known flags",
                hex::encode(&buf[1..4]),
                offset,
            ));
        }
        let h = FrameHeader {
            flags,
            stored_len: u32_at(buf, 4),
            original_len: u32_at(buf, 8),
            payload_crc: u32_at(buf, 12),
        };
        if h.original_len == 0 || h.original_len > frame_size {
            return Err(StorageError::corrupt(
                key,
                "frame original length",
                format!("1..={frame_size}"),
                h.original_len,
                offset,
            ));
        }
        if h.stored_len > MAX_FRAME_STORED {
            return Err(StorageError::corrupt(
                key,
                "frame stored length",
                format!("<= {MAX_FRAME_STORED}"),
                h.stored_len,
                offset,
            ));
        }
        Ok(h)
    }
}

/// The trailer: totals and whole-object checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Number of frames.
    pub frame_count: u64,
    /// Total original bytes.
    pub original_len: u64,
    /// The digest: [`bound_digest`] (versions 2 to 4); SHA-256 of the original bytes
    /// (version 1).
    pub sha256: [u8; 32],
    /// CRC32C of every stored byte before the trailer.
    pub stored_crc: u32,
}

impl Trailer {
    /// Serialises the trailer.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut out = [0u8; TRAILER_LEN];
        out[0] = TRAILER_TAG;
        out[4..12].copy_from_slice(&self.frame_count.to_le_bytes());
        out[12..20].copy_from_slice(&self.original_len.to_le_bytes());
        out[20..52].copy_from_slice(&self.sha256);
        out[52..56].copy_from_slice(&self.stored_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..56]);
        out[56..60].copy_from_slice(&crc.to_le_bytes());
        out[60..68].copy_from_slice(&END_MAGIC);
        out
    }

    /// Parses a trailer found at stored `offset`; `buf` is exactly `TRAILER_LEN` bytes.
    pub fn parse(key: &str, buf: &[u8], offset: u64) -> Result<Trailer> {
        if buf.len() != TRAILER_LEN || buf[0] != TRAILER_TAG {
            return Err(StorageError::corrupt(
                key,
                "trailer tag",
                format!("{TRAILER_TAG:02x}"),
                buf.first().map(|b| format!("{b:02x}")).unwrap_or_default(),
                offset,
            ));
        }
        if buf[60..68] != END_MAGIC {
            return Err(StorageError::corrupt(
                key,
                "trailer end magic",
                hex::encode(END_MAGIC),
                hex::encode(&buf[60..68]),
                offset + 60,
            ));
        }
        let stored = u32_at(buf, 56);
        let crc = crc32c::crc32c(&buf[..56]);
        if stored != crc || buf[1..4] != [0, 0, 0] {
            return Err(StorageError::corrupt(
                key,
                "trailer crc32c",
                format!("{stored:08x}"),
                format!("{crc:08x}"),
                offset,
            ));
        }
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&buf[20..52]);
        Ok(Trailer {
            frame_count: u64_at(buf, 4),
            original_len: u64_at(buf, 12),
            sha256,
            stored_crc: u32_at(buf, 52),
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stored_crc_after_record_equals_reading_every_byte() {
        for payload_len in [0usize, 1, 100, (4 << 10) - 1, 4 << 10, 1 << 20, 3_000_001] {
            let payload: Vec<u8> = (0..payload_len)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut record = FrameHeader {
                flags: 0,
                stored_len: payload_len as u32,
                original_len: payload_len as u32,
                payload_crc: crc32c::crc32c(&payload),
            }
            .encode()
            .to_vec();
            record.extend_from_slice(&payload);
            for before in [0u32, 0xdead_beef] {
                assert_eq!(
                    stored_crc_after_record(before, &record),
                    crc32c::crc32c_append(before, &record),
                    "payload of {payload_len} bytes"
                );
            }
        }
        // Shorter than a frame header: read as it is.
        assert_eq!(
            stored_crc_after_record(7, b"short"),
            crc32c::crc32c_append(7, b"short")
        );
    }

    #[test]
    fn header_round_trip_and_short_input() {
        let h = Header {
            version: 1,
            kind: ContentKind::WalSegment,
            codec: Codec::Zstd,
            encrypted: true,
            original_len: Some(16 << 20),
            frame_size: 1 << 20,
            recipients: vec![[7u8; 32], [9u8; 32]],
            binding: None,
        };
        round_trip(&h);
        let h2 = Header {
            version: 2,
            binding: Some(Binding {
                repo_id: RepoId([3; 16]),
                key: "postgres/wal/00000001/000000010000000000000003".into(),
            }),
            ..h.clone()
        };
        round_trip(&h2);
        let h3 = Header {
            recipients: vec![],
            ..h2.clone()
        };
        round_trip(&h3);
        round_trip(&Header {
            version: 3,
            ..h2.clone()
        });
    }

    #[test]
    fn bound_digest_depends_on_key_repository_and_content() {
        let b = |id: u8, key: &str| Binding {
            repo_id: RepoId([id; 16]),
            key: key.into(),
        };
        let hashes = [ContentHash::Sha256, ContentHash::Blake3, ContentHash::Xxh3];
        for v in hashes {
            let d = bound_digest(&[1; 32], &b(1, "a"), v);
            assert_ne!(d, bound_digest(&[1; 32], &b(1, "b"), v));
            assert_ne!(d, bound_digest(&[1; 32], &b(2, "a"), v));
            assert_ne!(d, bound_digest(&[2; 32], &b(1, "a"), v));
            assert_eq!(d, bound_digest(&[1; 32], &b(1, "a"), v));
        }
        // The content hash is part of the digest: the same inner bytes give another digest.
        for (i, x) in hashes.iter().enumerate() {
            for y in &hashes[i + 1..] {
                assert_ne!(
                    bound_digest(&[1; 32], &b(1, "a"), *x),
                    bound_digest(&[1; 32], &b(1, "a"), *y)
                );
            }
        }
    }

    #[test]
    fn version_4_bound_digest_is_the_documented_layout() {
        // Built from storage/FORMAT.md by hand: SHA-256 of the tag, the repository id, the
        // key's length (u16 LE) and the key, then XXH3-128 big-endian and 16 zero bytes.
        use sha2::{Digest, Sha256};
        let binding = Binding {
            repo_id: RepoId([0xab; 16]),
            key: "postgres/wal/00000001/000000010000000000000003".into(),
        };
        let content = b"some WAL bytes";
        let mut inner = xxhash_rust::xxh3::xxh3_128(content).to_be_bytes().to_vec();
        inner.extend_from_slice(&[0u8; 16]);
        let mut h = Sha256::new();
        h.update(b"SBO4 key binding");
        h.update([0xab; 16]);
        h.update((binding.key.len() as u16).to_le_bytes());
        h.update(binding.key.as_bytes());
        h.update(&inner);
        let want: [u8; 32] = h.finalize().into();
        let got = bound_digest(
            &ContentHash::Xxh3.digest(&[&content[..]]),
            &binding,
            ContentHash::Xxh3,
        );
        assert_eq!(hex::encode(got), hex::encode(want));
    }

    #[test]
    fn content_hash_per_version() {
        for encrypted in [false, true] {
            assert_eq!(ContentHash::of_object(1, encrypted), ContentHash::Sha256);
            assert_eq!(ContentHash::of_object(2, encrypted), ContentHash::Sha256);
            assert_eq!(ContentHash::of_object(3, encrypted), ContentHash::Blake3);
        }
        assert_eq!(ContentHash::of_object(4, true), ContentHash::Blake3);
        assert_eq!(ContentHash::of_object(4, false), ContentHash::Xxh3);
        // Known answers: FIPS 180-4 and the BLAKE3 reference for "abc".
        assert_eq!(
            hex::encode(ContentHash::Sha256.digest(&[&b"ab"[..], b"c"])),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex::encode(ContentHash::Blake3.digest(&[&b"a"[..], b"bc"])),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        // The xxHash reference implementation (C, via Python `xxhash.xxh3_128_hexdigest`,
        // canonical big-endian), then the zero padding.
        assert_eq!(
            hex::encode(ContentHash::Xxh3.digest::<&[u8]>(&[])),
            format!("99aa06d3014798d86001c324468d497f{}", "0".repeat(32))
        );
        assert_eq!(
            hex::encode(ContentHash::Xxh3.digest(&[&b"a"[..], b"bc"])),
            format!("06b05ab6733a618578af5f94892f3950{}", "0".repeat(32))
        );
        // Pieces of any size give the hash of the whole.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for h in [ContentHash::Sha256, ContentHash::Blake3, ContentHash::Xxh3] {
            let whole = h.digest(&[&data[..]]);
            let pieces: Vec<&[u8]> = data.chunks(3333).collect();
            assert_eq!(h.digest(&pieces), whole, "{}", h.name());
        }
    }

    #[test]
    fn v2_header_refuses_bad_key_length() {
        let h = Header {
            version: 2,
            kind: ContentKind::Other,
            codec: Codec::None,
            encrypted: false,
            original_len: None,
            frame_size: 1 << 20,
            recipients: vec![],
            binding: Some(Binding {
                repo_id: RepoId([0; 16]),
                key: "abc".into(),
            }),
        };
        let mut bytes = h.encode();
        // Claim a longer key than the header holds, then fix the CRC.
        let at = HEADER_FIXED_LEN + REPO_ID_LEN;
        bytes[at] = 9;
        let n = bytes.len();
        let crc = crc32c::crc32c(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let err = Header::parse("k", &bytes).unwrap_err().to_string();
        assert!(err.contains("header key length"), "{err}");
    }

    fn round_trip(h: &Header) {
        let bytes = h.encode();
        assert_eq!(bytes.len(), h.encoded_len());
        for cut in 0..bytes.len() {
            assert!(
                Header::parse("k", &bytes[..cut]).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let (parsed, len) = Header::parse("k", &bytes).unwrap().unwrap();
        assert_eq!(&parsed, h);
        assert_eq!(len, bytes.len());
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        let err = Header::parse("k", &bad).unwrap_err().to_string();
        assert!(err.contains("header crc32c"), "{err}");
        let err = Header::parse("k", b"PGDMP").unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }

    #[test]
    fn frame_and_trailer_round_trip() {
        let f = FrameHeader {
            flags: FRAME_ZSTD,
            stored_len: 10,
            original_len: 20,
            payload_crc: 0xdeadbeef,
        };
        assert_eq!(FrameHeader::parse("k", &f.encode(), 0, 1 << 20).unwrap(), f);
        let t = Trailer {
            frame_count: 3,
            original_len: 99,
            sha256: [1; 32],
            stored_crc: 5,
        };
        assert_eq!(Trailer::parse("k", &t.encode(), 0).unwrap(), t);
        let mut bad = t.encode();
        bad[30] ^= 0x10;
        assert!(Trailer::parse("k", &bad, 0)
            .unwrap_err()
            .to_string()
            .contains("trailer crc32c"));
    }
}
