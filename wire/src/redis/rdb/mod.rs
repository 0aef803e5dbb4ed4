//! A streaming validator for RDB snapshots, the file `SAVE` writes and the payload a master
//! sends a replica (Redis `src/rdb.c` `rdbLoadRio`/`rdbLoadObject`, `src/rdb.h`; Valkey
//! `src/rdb.h` for the `VALKEY` magic).
//!
//! The agent must know a snapshot is loadable *before* it calls a generation good, but the
//! snapshot can be gigabytes and arrives in socket-sized pieces. [`RdbValidator`] is fed
//! arbitrary slices and keeps only what the current element needs: a length header, or a
//! compact blob (listpack, ziplist, intset, zipmap) up to a cap so its structure can be
//! checked. Anything larger is skipped by length, LZF streams are checked without being
//! expanded, and the CRC64 trailer (`CRC_64_REDIS`) is computed on the fly.
//!
//! Layout: a 9-byte magic (`REDIS0011`, or `VALKEY080` for Valkey 9), then opcodes (AUX,
//! SELECTDB, RESIZEDB, EXPIRETIME(_MS), FREQ, IDLE, FUNCTION2, MODULE_AUX, SLOT_INFO) and
//! key/value pairs introduced by their type byte, then `EOF` (255) and an 8-byte
//! little-endian CRC64 of everything before it (zero when the server has checksums off).
//! The meaning of type bytes 22 and up depends on the magic: Redis 7.4 (RDB 12) uses 22-25
//! for hashes with field TTLs, Valkey 9 (RDB 80) uses 22 for its `HASH_2`.

mod encodings;
mod lzf;
mod programs;

use std::collections::BTreeMap;
use std::fmt;

#[cfg(test)]
use crc::{Crc, Table, CRC_64_REDIS};

use encodings::Shape;
pub use programs::ValueKind;
use programs::{Blob, Op, TypeInfo};

#[cfg(test)]
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_REDIS);

/// Largest compact blob (listpack, ziplist, intset) buffered to check its structure; larger
/// ones are skipped by length and counted in [`RdbReport::unchecked_blobs`]. Redis' defaults
/// keep such blobs under a few KiB, so 8 MiB only bounds what a hostile peer can make us hold.
pub const DEFAULT_BLOB_CAP: usize = 8 << 20;

/// AUX values longer than this are not copied into the report.
const AUX_CAP: u64 = 4096;

/// Which server family wrote the file, from its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RdbMagic {
    /// `REDIS` followed by a 4-digit version (Redis, and Valkey up to 8.x).
    Redis,
    /// `VALKEY` followed by a 3-digit version (Valkey 9 and later, RDB 80+).
    Valkey,
}

/// Magic and version: together they decide what each type byte and opcode means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RdbFormat {
    /// The family named by the magic.
    pub magic: RdbMagic,
    /// The RDB version number after the magic.
    pub version: u32,
}

impl fmt::Display for RdbFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.magic {
            RdbMagic::Redis => write!(f, "REDIS{:04}", self.version),
            RdbMagic::Valkey => write!(f, "VALKEY{:03}", self.version),
        }
    }
}

impl RdbFormat {
    /// Oldest Redis RDB version accepted: Redis 5.0 (RDB 9). Older files use a different
    /// millisecond-time byte order and pre-stream layouts nobody runs anymore.
    pub const REDIS_MIN: u32 = 9;
    /// Newest Redis RDB version accepted: Redis 7.4/8.0 (RDB 12).
    pub const REDIS_MAX: u32 = 12;
    /// First Valkey-magic version: Valkey 9.0 (RDB 80).
    pub const VALKEY_MIN: u32 = 80;

    /// Parses the 9-byte header.
    pub fn parse(header: &[u8; 9]) -> Result<Self, RdbError> {
        let digits = |d: &[u8]| -> Option<u32> {
            if d.iter().all(u8::is_ascii_digit) {
                std::str::from_utf8(d).ok()?.parse().ok()
            } else {
                None
            }
        };
        let bad = || RdbError::BadMagic {
            found: String::from_utf8_lossy(header).into_owned(),
        };
        if &header[..5] == b"REDIS" {
            let version = digits(&header[5..]).ok_or_else(bad)?;
            if !(Self::REDIS_MIN..=Self::REDIS_MAX).contains(&version) {
                return Err(RdbError::UnsupportedVersion { version, offset: 5 });
            }
            Ok(Self {
                magic: RdbMagic::Redis,
                version,
            })
        } else if &header[..6] == b"VALKEY" {
            let version = digits(&header[6..]).ok_or_else(bad)?;
            if version < Self::VALKEY_MIN {
                return Err(RdbError::UnsupportedVersion { version, offset: 6 });
            }
            Ok(Self {
                magic: RdbMagic::Valkey,
                version,
            })
        } else {
            Err(bad())
        }
    }

    fn type_info(&self, code: u8) -> Option<TypeInfo> {
        match self.magic {
            RdbMagic::Redis => match programs::common_type(code) {
                Some((since, t)) => (since <= self.version).then_some(t),
                None if self.version >= 12 => programs::redis_only_type(code),
                None => None,
            },
            RdbMagic::Valkey => programs::common_type(code)
                .map(|(_, t)| t)
                .or_else(|| programs::valkey_only_type(code)),
        }
    }

    fn has_function2(&self) -> bool {
        self.magic == RdbMagic::Valkey || self.version >= 10
    }

    fn has_slot_info(&self) -> bool {
        self.magic == RdbMagic::Valkey || self.version >= 12
    }
}

/// Why a snapshot is not loadable. Every variant names the byte offset, so an operator can
/// look at the file (`xxd -s OFFSET`) and a bad generation can be reported precisely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdbError {
    /// The first bytes are neither `REDIS` nor `VALKEY` plus digits.
    #[error("not an RDB file: bad magic {found:?} at offset 0")]
    BadMagic {
        /// The header as text.
        found: String,
    },
    /// A version this validator does not know the layout of.
    #[error("unsupported RDB version {version} at offset {offset}")]
    UnsupportedVersion {
        /// The version number in the header.
        version: u32,
        /// Where the version digits start.
        offset: u64,
    },
    /// An opcode byte that this format does not define.
    #[error("unsupported RDB opcode {opcode} at offset {offset}")]
    UnsupportedOpcode {
        /// The opcode byte.
        opcode: u8,
        /// Where it is.
        offset: u64,
    },
    /// A value type byte that this format does not define.
    #[error("unsupported RDB type {rdb_type} at offset {offset}")]
    UnsupportedType {
        /// The type byte.
        rdb_type: u8,
        /// Where it is.
        offset: u64,
    },
    /// Bytes that break the layout (bad length encoding, listpack damage, ...).
    #[error("corrupt RDB at offset {offset}: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
        /// Where the broken element starts.
        offset: u64,
    },
    /// The CRC64 trailer does not match the content.
    #[error(
        "checksum mismatch: trailer at offset {offset} says {stored:#018x}, content hashes to {computed:#018x}"
    )]
    ChecksumMismatch {
        /// The trailer's value.
        stored: u64,
        /// The CRC64 of the bytes before the trailer.
        computed: u64,
        /// Where the trailer is.
        offset: u64,
    },
    /// The input ended before the EOF opcode and checksum.
    #[error("truncated at offset {offset}")]
    Truncated {
        /// How many bytes were received.
        offset: u64,
    },
    /// Bytes after the checksum.
    #[error("unexpected bytes after the RDB checksum at offset {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: u64,
    },
}

/// What a valid snapshot holds, for the catalog and for comparing with `DBSIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdbReport {
    /// Magic and version.
    pub format: RdbFormat,
    /// Keys per database number.
    pub keys_per_db: BTreeMap<u64, u64>,
    /// Keys with a TTL per database number.
    pub expires_per_db: BTreeMap<u64, u64>,
    /// Keys per logical type.
    pub keys_per_kind: BTreeMap<ValueKind, u64>,
    /// Keys per RDB type (encoding), by Redis' name for it (`hash_listpack`, `set_intset`).
    pub keys_per_encoding: BTreeMap<&'static str, u64>,
    /// AUX fields (`redis-ver`, `repl-id`, `repl-offset`, ...); long values are elided.
    pub aux: BTreeMap<String, String>,
    /// Function libraries (`FUNCTION2` opcodes).
    pub functions: u64,
    /// Module AUX sections.
    pub module_aux: u64,
    /// Keys preceded by an LRU idle time (`IDLE`, maxmemory-policy *-lru).
    pub lru_entries: u64,
    /// Keys preceded by an LFU counter (`FREQ`, maxmemory-policy *-lfu).
    pub lfu_entries: u64,
    /// The CRC64 trailer, `None` when the server wrote zero (checksums disabled).
    pub checksum: Option<u64>,
    /// Compact blobs larger than the cap, skipped by length instead of checked inside.
    pub unchecked_blobs: u64,
    /// Total size in bytes.
    pub size: u64,
}

impl RdbReport {
    /// Keys in all databases.
    pub fn total_keys(&self) -> u64 {
        self.keys_per_db.values().sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    Select,
    Expire,
    Aux,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Magic,
    Opcode,
    Program,
    Skip {
        remaining: u64,
        lzf: Option<lzf::LzfCheck>,
        started: u64,
    },
    Checksum,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    program: &'static [Op],
    pc: usize,
    remaining: u64,
}

enum StrHeader {
    Int { used: usize, value: i64 },
    Raw { used: usize, len: u64 },
    Lzf { used: usize, clen: u64, len: u64 },
}

/// Decodes `rdbLoadLen`'s length encoding: `(value, bytes used, is-special-encoding)`.
fn read_len(d: &[u8]) -> Result<Option<(u64, usize, bool)>, &'static str> {
    let Some(&b0) = d.first() else {
        return Ok(None);
    };
    Ok(match b0 >> 6 {
        0 => Some((u64::from(b0 & 0x3F), 1, false)),
        1 => d
            .get(1)
            .map(|&b1| ((u64::from(b0 & 0x3F) << 8) | u64::from(b1), 2, false)),
        2 => match b0 {
            0x80 => d.get(1..5).map(|b| {
                (
                    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                    5,
                    false,
                )
            }),
            0x81 => d.get(1..9).map(|b| {
                (
                    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                    9,
                    false,
                )
            }),
            _ => return Err("invalid length encoding"),
        },
        _ => Some((u64::from(b0 & 0x3F), 1, true)),
    })
}

fn read_str_header(d: &[u8]) -> Result<Option<StrHeader>, &'static str> {
    let Some((v, used, encoded)) = read_len(d)? else {
        return Ok(None);
    };
    if !encoded {
        return Ok(Some(StrHeader::Raw { used, len: v }));
    }
    let int = |n: usize| -> Option<StrHeader> {
        let b = d.get(1..1 + n)?;
        let value = match n {
            1 => i64::from(b[0] as i8),
            2 => i64::from(i16::from_le_bytes([b[0], b[1]])),
            _ => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        };
        Some(StrHeader::Int { used: 1 + n, value })
    };
    Ok(match v {
        0 => int(1),
        1 => int(2),
        2 => int(4),
        3 => {
            let Some((clen, u1, e1)) = read_len(&d[1..])? else {
                return Ok(None);
            };
            let Some((len, u2, e2)) = read_len(&d[1 + u1..])? else {
                return Ok(None);
            };
            if e1 || e2 {
                return Err("invalid LZF length encoding");
            }
            Some(StrHeader::Lzf {
                used: 1 + u1 + u2,
                clen,
                len,
            })
        }
        _ => return Err("unknown string encoding"),
    })
}

/// Validates an RDB stream fed in arbitrary pieces; see the module docs.
pub struct RdbValidator {
    buf: Vec<u8>,
    offset: u64,
    /// CRC-64/REDIS of the bytes so far (SIMD: at 1 GiB/s of snapshot the table-driven
    /// version was a seventh of the capture's CPU).
    crc: crc_fast::Digest,
    state: State,
    stack: Vec<Frame>,
    top: Top,
    last_len: u64,
    format: Option<RdbFormat>,
    db: u64,
    pending_expire: bool,
    pending_aux: Vec<String>,
    blob_cap: usize,
    failed: Option<RdbError>,
    report: Tally,
}

#[derive(Default)]
struct Tally {
    keys_per_db: BTreeMap<u64, u64>,
    expires_per_db: BTreeMap<u64, u64>,
    keys_per_kind: BTreeMap<ValueKind, u64>,
    keys_per_encoding: BTreeMap<&'static str, u64>,
    aux: BTreeMap<String, String>,
    functions: u64,
    module_aux: u64,
    lru_entries: u64,
    lfu_entries: u64,
    checksum: Option<u64>,
    unchecked_blobs: u64,
}

impl Default for RdbValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RdbValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdbValidator")
            .field("offset", &self.offset)
            .field("state", &self.state)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

enum Step {
    /// Consumed this many bytes; keep going.
    Advanced(usize),
    /// The current element needs more input.
    NeedMore,
}

impl RdbValidator {
    /// A validator with the default blob cap.
    pub fn new() -> Self {
        Self::with_blob_cap(DEFAULT_BLOB_CAP)
    }

    /// A validator that buffers compact blobs up to `blob_cap` bytes to check them.
    pub fn with_blob_cap(blob_cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            offset: 0,
            crc: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Redis),
            state: State::Magic,
            stack: Vec::new(),
            top: Top::Other,
            last_len: 0,
            format: None,
            db: 0,
            pending_expire: false,
            pending_aux: Vec::new(),
            blob_cap,
            failed: None,
            report: Tally::default(),
        }
    }

    /// The format, once the header has been read.
    pub fn format(&self) -> Option<RdbFormat> {
        self.format
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.offset + self.buf.len() as u64
    }

    /// True once the EOF opcode and checksum have been read.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds the next piece of the snapshot. The first error is final: later calls return it.
    pub fn feed(&mut self, input: &[u8]) -> Result<(), RdbError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = if self.buf.is_empty() {
            self.run(input)
                .map(|used| self.buf.extend_from_slice(&input[used..]))
        } else {
            self.buf.extend_from_slice(input);
            let buf = std::mem::take(&mut self.buf);
            let result = self.run(&buf);
            self.buf = buf;
            result.map(|used| {
                self.buf.drain(..used);
            })
        };
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    /// Ends the input: the report if the snapshot was complete and valid.
    pub fn finish(self) -> Result<RdbReport, RdbError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        let (Some(format), State::Done) = (self.format, &self.state) else {
            return Err(RdbError::Truncated {
                offset: self.bytes_seen(),
            });
        };
        let t = self.report;
        Ok(RdbReport {
            format,
            keys_per_db: t.keys_per_db,
            expires_per_db: t.expires_per_db,
            keys_per_kind: t.keys_per_kind,
            keys_per_encoding: t.keys_per_encoding,
            aux: t.aux,
            functions: t.functions,
            module_aux: t.module_aux,
            lru_entries: t.lru_entries,
            lfu_entries: t.lfu_entries,
            checksum: t.checksum,
            unchecked_blobs: t.unchecked_blobs,
            size: self.offset,
        })
    }

    fn corrupt(&self, reason: impl Into<String>, offset: u64) -> RdbError {
        RdbError::Corrupt {
            reason: reason.into(),
            offset,
        }
    }

    /// Runs the state machine over `data`; returns how many bytes were consumed.
    fn run(&mut self, data: &[u8]) -> Result<usize, RdbError> {
        // The CRC takes the consumed bytes in one call at the end (and before the trailer
        // is compared): per step (an opcode, a length, a 20-byte value) the SIMD CRC's
        // setup would cost more than the bytes themselves.
        let mut crc_from = 0usize;
        let result = self.run_steps(data, &mut crc_from);
        if let Ok(pos) = result {
            self.crc.update(&data[crc_from..pos]);
        }
        result
    }

    fn run_steps(&mut self, data: &[u8], crc_from: &mut usize) -> Result<usize, RdbError> {
        let mut pos = 0usize;
        loop {
            let rest = &data[pos..];
            let step = match &mut self.state {
                State::Done => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    return Err(RdbError::TrailingBytes {
                        offset: self.offset,
                    });
                }
                State::Skip {
                    remaining,
                    lzf,
                    started,
                } => {
                    let n = (*remaining).min(rest.len() as u64) as usize;
                    if n == 0 {
                        return Ok(pos);
                    }
                    let chunk = &rest[..n];
                    *remaining -= n as u64;
                    let started = *started;
                    if let Some(check) = lzf.as_mut() {
                        check.feed(chunk).map_err(|r| RdbError::Corrupt {
                            reason: r.into(),
                            offset: started,
                        })?;
                        if *remaining == 0 {
                            check.finish().map_err(|r| RdbError::Corrupt {
                                reason: r.into(),
                                offset: started,
                            })?;
                        }
                    }
                    if *remaining == 0 {
                        self.state = State::Program;
                    }
                    Step::Advanced(n)
                }
                State::Magic => match rest.get(..9) {
                    None => Step::NeedMore,
                    Some(header) => {
                        let mut h = [0u8; 9];
                        h.copy_from_slice(header);
                        self.format = Some(RdbFormat::parse(&h)?);
                        self.state = State::Opcode;
                        Step::Advanced(9)
                    }
                },
                State::Opcode => self.step_opcode(rest)?,
                State::Program => self.step_program(rest)?,
                State::Checksum => match rest.get(..8) {
                    None => Step::NeedMore,
                    Some(trailer) => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(trailer);
                        let stored = u64::from_le_bytes(b);
                        self.crc.update(&data[*crc_from..pos]);
                        // The trailer itself is not part of the checksum.
                        *crc_from = pos + 8;
                        let computed = self.crc.finalize();
                        if stored != 0 && stored != computed {
                            return Err(RdbError::ChecksumMismatch {
                                stored,
                                computed,
                                offset: self.offset,
                            });
                        }
                        self.report.checksum = (stored != 0).then_some(stored);
                        self.state = State::Done;
                        Step::Advanced(8)
                    }
                },
            };
            match step {
                Step::NeedMore => return Ok(pos),
                Step::Advanced(n) => {
                    self.offset += n as u64;
                    pos += n;
                }
            }
        }
    }

    fn begin(&mut self, program: &'static [Op], top: Top) {
        self.stack.push(Frame {
            program,
            pc: 0,
            remaining: 1,
        });
        self.top = top;
        self.state = State::Program;
    }

    fn step_opcode(&mut self, rest: &[u8]) -> Result<Step, RdbError> {
        let Some(&code) = rest.first() else {
            return Ok(Step::NeedMore);
        };
        let format = self.format.ok_or(RdbError::Truncated { offset: 0 })?;
        let at = self.offset;
        match code {
            255 => self.state = State::Checksum,
            254 => self.begin(programs::ONE_LEN, Top::Select),
            253 => {
                self.pending_expire = true;
                self.begin(programs::SECONDS, Top::Expire)
            }
            252 => {
                self.pending_expire = true;
                self.begin(programs::MILLIS, Top::Expire)
            }
            251 => self.begin(programs::TWO_LENS, Top::Other),
            250 => self.begin(programs::AUX, Top::Aux),
            249 => {
                self.report.lfu_entries += 1;
                self.begin(programs::ONE_BYTE, Top::Other)
            }
            248 => {
                self.report.lru_entries += 1;
                self.begin(programs::ONE_LEN, Top::Other)
            }
            247 => {
                self.report.module_aux += 1;
                self.begin(programs::MODULE_AUX, Top::Other)
            }
            245 if format.has_function2() => {
                self.report.functions += 1;
                self.begin(programs::FUNCTION, Top::Other)
            }
            244 if format.has_slot_info() => self.begin(programs::THREE_LENS, Top::Other),
            243..=255 => {
                return Err(RdbError::UnsupportedOpcode {
                    opcode: code,
                    offset: at,
                })
            }
            _ => {
                let Some(info) = format.type_info(code) else {
                    return Err(RdbError::UnsupportedType {
                        rdb_type: code,
                        offset: at,
                    });
                };
                *self.report.keys_per_db.entry(self.db).or_default() += 1;
                if std::mem::take(&mut self.pending_expire) {
                    *self.report.expires_per_db.entry(self.db).or_default() += 1;
                }
                *self.report.keys_per_kind.entry(info.kind).or_default() += 1;
                *self.report.keys_per_encoding.entry(info.name).or_default() += 1;
                // Value first, key on top: the key is read first.
                self.stack.push(Frame {
                    program: info.program,
                    pc: 0,
                    remaining: 1,
                });
                self.stack.push(Frame {
                    program: programs::KEY,
                    pc: 0,
                    remaining: 1,
                });
                self.top = Top::Other;
                self.state = State::Program;
            }
        }
        Ok(Step::Advanced(1))
    }

    fn finish_top(&mut self) {
        match self.top {
            Top::Select => self.db = self.last_len,
            Top::Aux => {
                let mut it = std::mem::take(&mut self.pending_aux).into_iter();
                if let (Some(k), Some(v)) = (it.next(), it.next()) {
                    self.report.aux.insert(k, v);
                }
            }
            Top::Expire | Top::Other => {}
        }
        self.top = Top::Other;
        self.state = State::Opcode;
    }

    fn step_program(&mut self, rest: &[u8]) -> Result<Step, RdbError> {
        let at = self.offset;
        let Some(frame) = self.stack.last_mut() else {
            self.finish_top();
            return Ok(Step::Advanced(0));
        };
        if frame.pc == frame.program.len() {
            frame.remaining -= 1;
            if frame.remaining == 0 {
                self.stack.pop();
            } else {
                frame.pc = 0;
            }
            return Ok(Step::Advanced(0));
        }
        let op = frame.program[frame.pc];
        match op {
            Op::Repeat(body) => {
                frame.pc += 1;
                if self.last_len > 0 {
                    self.stack.push(Frame {
                        program: body,
                        pc: 0,
                        remaining: self.last_len,
                    });
                }
                Ok(Step::Advanced(0))
            }
            Op::Len | Op::WhenOpcode | Op::ModuleValues => {
                let Some((value, used, encoded)) =
                    read_len(rest).map_err(|r| self.corrupt(r, at))?
                else {
                    return Ok(Step::NeedMore);
                };
                if encoded {
                    return Err(self.corrupt("a length carries the string-encoding flag", at));
                }
                match op {
                    Op::WhenOpcode if value != 2 => {
                        return Err(self.corrupt("module AUX when-opcode is not UINT", at));
                    }
                    Op::ModuleValues => {
                        let operand: &'static [Op] = match value {
                            0 => &[],
                            1 | 2 => &[Op::Len],
                            3 => &[Op::Raw(4)],
                            4 => &[Op::Raw(8)],
                            5 => &[Op::Str(Blob::Any)],
                            _ => {
                                return Err(self
                                    .corrupt(format!("unknown module value opcode {value}"), at))
                            }
                        };
                        if value == 0 {
                            self.advance_pc();
                        } else {
                            // Stay on ModuleValues: it runs again after the operand.
                            self.stack.push(Frame {
                                program: operand,
                                pc: 0,
                                remaining: 1,
                            });
                        }
                        return Ok(Step::Advanced(used));
                    }
                    _ => {}
                }
                self.last_len = value;
                self.advance_pc();
                Ok(Step::Advanced(used))
            }
            Op::Raw(n) => {
                if rest.len() < usize::from(n) {
                    return Ok(Step::NeedMore);
                }
                self.advance_pc();
                Ok(Step::Advanced(usize::from(n)))
            }
            Op::OldDouble => {
                let Some(&len) = rest.first() else {
                    return Ok(Step::NeedMore);
                };
                let need = if len >= 253 { 1 } else { 1 + usize::from(len) };
                if rest.len() < need {
                    return Ok(Step::NeedMore);
                }
                self.advance_pc();
                Ok(Step::Advanced(need))
            }
            Op::Str(blob) => self.step_string(rest, blob, at),
        }
    }

    fn advance_pc(&mut self) {
        if let Some(frame) = self.stack.last_mut() {
            frame.pc += 1;
        }
    }

    /// Resolves what a string must contain now (a quicklist node depends on its container).
    fn effective_blob(&self, blob: Blob, at: u64) -> Result<Blob, RdbError> {
        if blob != Blob::QuicklistNode {
            return Ok(blob);
        }
        match self.last_len {
            1 => Ok(Blob::Any),
            2 => Ok(Blob::Listpack(Shape::Single)),
            n => Err(self.corrupt(
                format!("quicklist node container {n} is neither plain (1) nor packed (2)"),
                at,
            )),
        }
    }

    fn step_string(&mut self, rest: &[u8], blob: Blob, at: u64) -> Result<Step, RdbError> {
        let Some(header) = read_str_header(rest).map_err(|r| self.corrupt(r, at))? else {
            return Ok(Step::NeedMore);
        };
        let blob = self.effective_blob(blob, at)?;
        let captures = !matches!(blob, Blob::Any);
        let cap = if blob == Blob::Aux {
            AUX_CAP
        } else {
            self.blob_cap as u64
        };
        match header {
            StrHeader::Int { used, value } => {
                match blob {
                    Blob::Any => {}
                    Blob::Aux => self.pending_aux.push(value.to_string()),
                    _ => {
                        return Err(self.corrupt(
                            format!(
                                "expected {} but found an integer-encoded string",
                                describe(blob)
                            ),
                            at,
                        ))
                    }
                }
                self.advance_pc();
                Ok(Step::Advanced(used))
            }
            StrHeader::Raw { used, len } => {
                if captures && len <= cap {
                    let end = used + len as usize;
                    let Some(body) = rest.get(used..end) else {
                        return Ok(Step::NeedMore);
                    };
                    self.check_blob(blob, body, at)?;
                    self.advance_pc();
                    return Ok(Step::Advanced(end));
                }
                self.skip_large(blob, len, None, at)?;
                Ok(Step::Advanced(used))
            }
            StrHeader::Lzf { used, clen, len } => {
                if captures && clen <= cap && len <= cap {
                    let end = used + clen as usize;
                    let Some(packed) = rest.get(used..end) else {
                        return Ok(Step::NeedMore);
                    };
                    let body =
                        lzf::decompress(packed, len as usize).map_err(|r| self.corrupt(r, at))?;
                    self.check_blob(blob, &body, at)?;
                    self.advance_pc();
                    return Ok(Step::Advanced(end));
                }
                self.skip_large(blob, clen, Some(lzf::LzfCheck::new(len)), at)?;
                Ok(Step::Advanced(used))
            }
        }
    }

    fn skip_large(
        &mut self,
        blob: Blob,
        len: u64,
        lzf: Option<lzf::LzfCheck>,
        at: u64,
    ) -> Result<(), RdbError> {
        match blob {
            Blob::Any => {}
            Blob::Aux => self.pending_aux.push(format!("<{len} bytes>")),
            Blob::StreamId => {
                return Err(self.corrupt("stream node key is not a 16-byte stream ID", at))
            }
            _ => self.report.unchecked_blobs += 1,
        }
        self.advance_pc();
        if len > 0 {
            self.state = State::Skip {
                remaining: len,
                lzf,
                started: at,
            };
        } else if let Some(check) = lzf {
            check.finish().map_err(|r| self.corrupt(r, at))?;
        }
        Ok(())
    }

    fn check_blob(&mut self, blob: Blob, body: &[u8], at: u64) -> Result<(), RdbError> {
        let result = match blob {
            Blob::Any => Ok(0),
            Blob::Aux => {
                self.pending_aux
                    .push(String::from_utf8_lossy(body).into_owned());
                Ok(0)
            }
            Blob::Listpack(shape) => encodings::validate_listpack(body, shape),
            Blob::Ziplist(shape) => encodings::validate_ziplist(body, shape),
            Blob::Intset => encodings::validate_intset(body),
            Blob::Zipmap => encodings::validate_zipmap(body),
            Blob::StreamId if body.len() == 16 => Ok(0),
            Blob::StreamId => Err("stream node key is not a 16-byte stream ID"),
            Blob::QuicklistNode => Err("unresolved quicklist node"),
        };
        result.map(|_| ()).map_err(|r| self.corrupt(r, at))
    }
}

fn describe(blob: Blob) -> &'static str {
    match blob {
        Blob::Listpack(_) | Blob::QuicklistNode => "a listpack",
        Blob::Ziplist(_) => "a ziplist",
        Blob::Intset => "an intset",
        Blob::Zipmap => "a zipmap",
        Blob::StreamId => "a stream ID",
        Blob::Any | Blob::Aux => "a string",
    }
}

/// Validates a whole in-memory snapshot (tests, `verify` on small files).
pub fn validate(bytes: &[u8]) -> Result<RdbReport, RdbError> {
    let mut v = RdbValidator::new();
    v.feed(bytes)?;
    v.finish()
}

#[cfg(test)]
mod tests;
