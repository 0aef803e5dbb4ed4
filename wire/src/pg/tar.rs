//! A streaming, sans-IO tar reader for base backup archives.
//!
//! PostgreSQL writes ustar headers (`src/port/tar.c`, `tarCreateHeader`: names up to 99
//! bytes, sizes above 8 GiB in base-256), and other tools that produce the same archives use
//! pax extended headers (`x`) or GNU long names (`L`/`K`); all three are read here. The reader
//! yields each entry's header, then its data as slices of the input buffer, so a 1 GiB
//! relation file never sits in memory. Paths are checked before they are handed out:
//! absolute paths, `..` components and NUL bytes are refused, as are headers with a bad
//! checksum. PostgreSQL's archives may end without the two zero blocks (the client adds
//! them), so [`TarReader::finish`] accepts a clean end between entries.

use bytes::{Buf, Bytes, BytesMut};

use super::PgWireError;

const BLOCK: usize = 512;

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarEntryType {
    /// `0` or NUL: a regular file.
    File,
    /// `5`.
    Directory,
    /// `2`: tablespace links under `pg_tblspc` are these.
    Symlink,
    /// `1`.
    HardLink,
    /// Any other type byte (devices, FIFOs); the caller decides.
    Other(u8),
}

/// An entry header, with pax / GNU long names already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// Relative, normalised path (no leading `./`, no trailing `/`, no `..`); the archive's
    /// root directory entry (`./`) is `.`.
    pub path: String,
    /// Kind of entry.
    pub entry_type: TarEntryType,
    /// Bytes of data that follow.
    pub size: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: u64,
    /// Target of a symlink or hard link.
    pub link_target: Option<String>,
}

/// What [`TarReader::next_event`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEvent {
    /// A new entry starts; its data follows as `Data` events.
    Entry(TarEntry),
    /// Some of the current entry's data.
    Data(Bytes),
    /// The current entry's data is complete.
    EntryEnd,
    /// The end-of-archive marker was read; nothing more will come.
    End,
}

/// Caps on what the reader buffers for metadata (file data is never buffered).
#[derive(Debug, Clone, Copy)]
pub struct TarLimits {
    /// Largest pax or GNU long-name record accepted.
    pub max_extended_header: u64,
    /// Longest path or link target accepted.
    pub max_path: usize,
}

impl Default for TarLimits {
    fn default() -> TarLimits {
        TarLimits {
            max_extended_header: 1024 * 1024,
            max_path: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtKind {
    Pax,
    GlobalPax,
    LongName,
    LongLink,
}

#[derive(Debug)]
enum State {
    Header,
    Data {
        remaining: u64,
        padding: u64,
    },
    Padding {
        remaining: u64,
    },
    Extended {
        kind: ExtKind,
        size: u64,
        padding: u64,
    },
    SecondZeroBlock,
    Done,
}

#[derive(Debug, Default)]
struct Pending {
    path: Option<String>,
    link: Option<String>,
    size: Option<u64>,
    mtime: Option<u64>,
}

/// Incremental tar reader: push bytes into a `BytesMut`, call [`TarReader::next_event`] until
/// it returns `Ok(None)`, repeat; call [`TarReader::finish`] at end of input.
#[derive(Debug)]
pub struct TarReader {
    state: State,
    offset: u64,
    limits: TarLimits,
    pending: Pending,
}

impl Default for TarReader {
    fn default() -> TarReader {
        TarReader::new()
    }
}

impl TarReader {
    /// A reader with default limits.
    pub fn new() -> TarReader {
        TarReader::with_limits(TarLimits::default())
    }

    /// A reader with explicit limits.
    pub fn with_limits(limits: TarLimits) -> TarReader {
        TarReader {
            state: State::Header,
            offset: 0,
            limits,
            pending: Pending::default(),
        }
    }

    /// Bytes of the archive consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn err(&self, reason: impl Into<String>) -> PgWireError {
        PgWireError::Tar {
            offset: self.offset,
            reason: reason.into(),
        }
    }

    /// Checks the input ended at a sensible place: between entries (PostgreSQL omits the
    /// trailer) or after the end-of-archive marker. Ending inside an entry is an error.
    pub fn finish(&self) -> Result<(), PgWireError> {
        match self.state {
            State::Header | State::SecondZeroBlock | State::Done => {
                if self.pending.path.is_some()
                    || self.pending.link.is_some()
                    || self.pending.size.is_some()
                {
                    return Err(self.err("archive ends after an extended header without its entry"));
                }
                Ok(())
            }
            State::Data { remaining, .. } => Err(self.err(format!(
                "archive ends inside an entry, {remaining} bytes missing"
            ))),
            State::Padding { .. } => {
                Err(self.err("archive ends inside the padding after an entry"))
            }
            State::Extended { .. } => Err(self.err("archive ends inside an extended header")),
        }
    }

    /// Produces the next event from `buf`, consuming what it used; `Ok(None)` means more
    /// input is needed.
    pub fn next_event(&mut self, buf: &mut BytesMut) -> Result<Option<TarEvent>, PgWireError> {
        loop {
            match self.state {
                State::Done => {
                    // Trailing record padding after the end marker: ignore.
                    self.offset += buf.len() as u64;
                    buf.clear();
                    return Ok(None);
                }
                State::Padding { remaining } => {
                    let take = remaining.min(buf.len() as u64);
                    buf.advance(take as usize);
                    self.offset += take;
                    if take < remaining {
                        self.state = State::Padding {
                            remaining: remaining - take,
                        };
                        return Ok(None);
                    }
                    self.state = State::Header;
                }
                State::Data { remaining, padding } => {
                    if remaining == 0 {
                        self.state = State::Padding { remaining: padding };
                        return Ok(Some(TarEvent::EntryEnd));
                    }
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = remaining.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    self.offset += take;
                    self.state = State::Data {
                        remaining: remaining - take,
                        padding,
                    };
                    return Ok(Some(TarEvent::Data(data)));
                }
                State::Extended {
                    kind,
                    size,
                    padding,
                } => {
                    let total = size + padding;
                    if (buf.len() as u64) < total {
                        buf.reserve((total as usize).saturating_sub(buf.len()));
                        return Ok(None);
                    }
                    let record = buf.split_to(size as usize);
                    buf.advance(padding as usize);
                    self.apply_extended(kind, &record)?;
                    self.offset += total;
                    self.state = State::Header;
                }
                State::SecondZeroBlock => {
                    if buf.len() < BLOCK {
                        return Ok(None);
                    }
                    if buf[..BLOCK].iter().any(|&b| b != 0) {
                        return Err(self
                            .err("end-of-archive marker is a single zero block followed by data"));
                    }
                    buf.advance(BLOCK);
                    self.offset += BLOCK as u64;
                    self.state = State::Done;
                    return Ok(Some(TarEvent::End));
                }
                State::Header => {
                    if buf.len() < BLOCK {
                        return Ok(None);
                    }
                    let header: [u8; BLOCK] = match buf[..BLOCK].try_into() {
                        Ok(h) => h,
                        Err(_) => return Ok(None),
                    };
                    if header.iter().all(|&b| b == 0) {
                        if self.pending.path.is_some() || self.pending.size.is_some() {
                            return Err(
                                self.err("end-of-archive marker right after an extended header")
                            );
                        }
                        buf.advance(BLOCK);
                        self.offset += BLOCK as u64;
                        self.state = State::SecondZeroBlock;
                        continue;
                    }
                    if let Some(event) = self.parse_header(&header)? {
                        buf.advance(BLOCK);
                        self.offset += BLOCK as u64;
                        return Ok(Some(event));
                    }
                    buf.advance(BLOCK);
                    self.offset += BLOCK as u64;
                }
            }
        }
    }

    /// Parses one non-zero header block. Returns `Some(Entry)` for a real entry, `None` for
    /// an extended header (the state then expects its record).
    fn parse_header(&mut self, h: &[u8; BLOCK]) -> Result<Option<TarEvent>, PgWireError> {
        let stored = self.number(&h[148..156], "checksum")?;
        let unsigned: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    u64::from(b' ')
                } else {
                    u64::from(b)
                }
            })
            .sum();
        let signed: i64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    i64::from(b' ')
                } else {
                    i64::from(b as i8)
                }
            })
            .sum();
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err(self.err(format!(
                "header checksum mismatch: stored {stored}, computed {unsigned}"
            )));
        }
        let size = self.number(&h[124..136], "size")?;
        let typeflag = h[156];
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        let ext = match typeflag {
            b'x' => Some(ExtKind::Pax),
            b'g' => Some(ExtKind::GlobalPax),
            b'L' => Some(ExtKind::LongName),
            b'K' => Some(ExtKind::LongLink),
            _ => None,
        };
        if let Some(kind) = ext {
            if size > self.limits.max_extended_header {
                return Err(PgWireError::TooLarge {
                    what: "tar extended header",
                    announced: size,
                    limit: self.limits.max_extended_header,
                });
            }
            self.state = State::Extended {
                kind,
                size,
                padding,
            };
            return Ok(None);
        }
        let pending = std::mem::take(&mut self.pending);
        let is_ustar = &h[257..263] == b"ustar\0";
        let name = match pending.path {
            Some(p) => p,
            None => {
                let base = self.field_str(&h[0..100], "name")?;
                let prefix = if is_ustar {
                    self.field_str(&h[345..500], "prefix")?
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    base
                } else {
                    format!("{prefix}/{base}")
                }
            }
        };
        let entry_type = match typeflag {
            b'0' | 0 | b'7' => TarEntryType::File,
            b'1' => TarEntryType::HardLink,
            b'2' => TarEntryType::Symlink,
            b'5' => TarEntryType::Directory,
            other => TarEntryType::Other(other),
        };
        let link_target = match (entry_type, pending.link) {
            (TarEntryType::Symlink | TarEntryType::HardLink, Some(l)) => Some(l),
            (TarEntryType::Symlink | TarEntryType::HardLink, None) => {
                Some(self.field_str(&h[157..257], "linkname")?)
            }
            _ => None,
        };
        if let Some(target) = &link_target {
            if target.is_empty() {
                return Err(self.err(format!("link {name:?} has an empty target")));
            }
            if target.len() > self.limits.max_path {
                return Err(self.err("link target too long"));
            }
            if entry_type == TarEntryType::HardLink {
                check_path(target)
                    .map_err(|r| self.err(format!("hard link target {target:?}: {r}")))?;
            }
        }
        // `tar -C dir .` starts with the root itself, `./`: a directory named ".".
        let path = match normalise(&name) {
            Err("empty path")
                if entry_type == TarEntryType::Directory && !name.starts_with('/') =>
            {
                ".".to_string()
            }
            other => other.map_err(|r| self.err(format!("entry {:?}: {r}", truncate(&name))))?,
        };
        if path.len() > self.limits.max_path {
            return Err(self.err("path too long"));
        }
        let size = pending.size.unwrap_or(size);
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        let mode = u32::try_from(self.number(&h[100..108], "mode")? & 0o7777).unwrap_or(0o600);
        let mtime = match pending.mtime {
            Some(m) => m,
            None => self.number(&h[136..148], "mtime")?,
        };
        self.state = State::Data {
            remaining: size,
            padding,
        };
        Ok(Some(TarEvent::Entry(TarEntry {
            path,
            entry_type,
            size,
            mode,
            mtime,
            link_target,
        })))
    }

    fn apply_extended(&mut self, kind: ExtKind, record: &[u8]) -> Result<(), PgWireError> {
        match kind {
            ExtKind::GlobalPax => Ok(()),
            ExtKind::LongName | ExtKind::LongLink => {
                let end = record.iter().position(|&b| b == 0).unwrap_or(record.len());
                let s = std::str::from_utf8(&record[..end])
                    .map_err(|_| self.err("GNU long name is not UTF-8"))?
                    .to_string();
                if s.len() > self.limits.max_path {
                    return Err(self.err("GNU long name too long"));
                }
                if kind == ExtKind::LongName {
                    self.pending.path = Some(s);
                } else {
                    self.pending.link = Some(s);
                }
                Ok(())
            }
            ExtKind::Pax => {
                let mut rest = record;
                while !rest.is_empty() {
                    let space = rest
                        .iter()
                        .take(20)
                        .position(|&b| b == b' ')
                        .ok_or_else(|| self.err("pax record without length"))?;
                    let len: usize = std::str::from_utf8(&rest[..space])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| self.err("pax record length is not a number"))?;
                    if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
                        return Err(self.err("pax record length does not match its content"));
                    }
                    let body = &rest[space + 1..len - 1];
                    let eq = body
                        .iter()
                        .position(|&b| b == b'=')
                        .ok_or_else(|| self.err("pax record without '='"))?;
                    let key = &body[..eq];
                    let value = std::str::from_utf8(&body[eq + 1..])
                        .map_err(|_| self.err("pax value is not UTF-8"))?;
                    match key {
                        b"path" => {
                            if value.len() > self.limits.max_path {
                                return Err(self.err("pax path too long"));
                            }
                            self.pending.path = Some(value.to_string());
                        }
                        b"linkpath" => {
                            if value.len() > self.limits.max_path {
                                return Err(self.err("pax linkpath too long"));
                            }
                            self.pending.link = Some(value.to_string());
                        }
                        b"size" => {
                            self.pending.size = Some(value.parse().map_err(|_| {
                                self.err(format!("pax size {value:?} is not a number"))
                            })?);
                        }
                        b"mtime" => {
                            let secs = value.split('.').next().unwrap_or_default();
                            self.pending.mtime = Some(secs.parse().map_err(|_| {
                                self.err(format!("pax mtime {value:?} is not a number"))
                            })?);
                        }
                        _ => {}
                    }
                    rest = &rest[len..];
                }
                Ok(())
            }
        }
    }

    /// A numeric header field: octal text (NUL/space terminated) or GNU base-256.
    fn number(&self, field: &[u8], name: &str) -> Result<u64, PgWireError> {
        if let Some(&first) = field.first() {
            if first & 0x80 != 0 {
                if first & 0x40 != 0 {
                    return Err(self.err(format!("negative {name}")));
                }
                let mut v: u64 = u64::from(first & 0x3f);
                for &b in &field[1..] {
                    v = v
                        .checked_mul(256)
                        .and_then(|v| v.checked_add(u64::from(b)))
                        .ok_or_else(|| self.err(format!("{name} overflows 64 bits")))?;
                }
                return Ok(v);
            }
        }
        let text: Vec<u8> = field
            .iter()
            .copied()
            .skip_while(|&b| b == b' ')
            .take_while(|&b| b != 0 && b != b' ')
            .collect();
        if text.is_empty() {
            return Ok(0);
        }
        let s = std::str::from_utf8(&text)
            .map_err(|_| self.err(format!("{name} field is not octal")))?;
        u64::from_str_radix(s, 8).map_err(|_| self.err(format!("{name} field {s:?} is not octal")))
    }

    fn field_str(&self, field: &[u8], name: &str) -> Result<String, PgWireError> {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        std::str::from_utf8(&field[..end])
            .map(str::to_string)
            .map_err(|_| self.err(format!("{name} is not UTF-8")))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.starts_with('/') {
        return Err("absolute paths are not allowed");
    }
    if path.contains('\0') {
        return Err("NUL byte in path");
    }
    if path.split('/').any(|c| c == "..") {
        return Err("'..' components are not allowed");
    }
    Ok(())
}

/// Checks and normalises an entry path: `./a//b/` becomes `a/b`.
fn normalise(path: &str) -> Result<String, &'static str> {
    check_path(path)?;
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() {
        return Err("empty path");
    }
    Ok(parts.join("/"))
}

/// Builds tar headers the way PostgreSQL does, for tests and fake servers.
pub mod build {
    /// A ustar header block for `path` (≤ 99 bytes), with a correct checksum.
    pub fn ustar_header(
        path: &str,
        typeflag: u8,
        size: u64,
        mode: u32,
        mtime: u64,
        link: &str,
    ) -> [u8; 512] {
        let mut h = [0u8; 512];
        put(&mut h[0..100], path.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        if size < 0o77777777777 {
            octal(&mut h[124..136], size);
        } else {
            h[124] = 0x80;
            for (i, b) in size.to_be_bytes().iter().enumerate() {
                h[128 + i] = *b;
            }
        }
        octal(&mut h[136..148], mtime);
        h[156] = typeflag;
        put(&mut h[157..257], link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        octal(&mut h[148..155], sum);
        h
    }

    fn put(field: &mut [u8], v: &[u8]) {
        let n = v.len().min(field.len());
        field[..n].copy_from_slice(&v[..n]);
    }

    fn octal(field: &mut [u8], v: u64) {
        let width = field.len() - 1;
        let s = format!("{v:0width$o}");
        put(field, s.as_bytes());
        field[width] = 0;
    }

    /// One pax record `"len key=value\n"`.
    pub fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}").len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    /// Pads `data` to a whole number of blocks.
    pub fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        let pad = (512 - v.len() % 512) % 512;
        v.resize(v.len() + pad, 0);
        v
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Collected {
        entry: TarEntry,
        data: Vec<u8>,
    }

    fn read_all(chunks: &[&[u8]]) -> Result<(Vec<Collected>, bool), PgWireError> {
        let mut r = TarReader::new();
        let mut buf = BytesMut::new();
        let mut out: Vec<Collected> = Vec::new();
        let mut ended = false;
        let mut open = false;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(ev) = r.next_event(&mut buf)? {
                match ev {
                    TarEvent::Entry(entry) => {
                        assert!(!open);
                        open = true;
                        out.push(Collected {
                            entry,
                            data: Vec::new(),
                        });
                    }
                    TarEvent::Data(d) => out.last_mut().unwrap().data.extend_from_slice(&d),
                    TarEvent::EntryEnd => open = false,
                    TarEvent::End => ended = true,
                }
            }
        }
        r.finish()?;
        Ok((out, ended))
    }

    fn file(path: &str, data: &[u8]) -> Vec<u8> {
        let mut v = ustar_header(path, b'0', data.len() as u64, 0o600, 1_700_000_000, "").to_vec();
        v.extend(padded(data));
        v
    }

    fn sample_archive() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(ustar_header("base", b'5', 0, 0o700, 1, ""));
        v.extend(file("base/1/1259", &[1u8; 8192 + 17]));
        v.extend(ustar_header(
            "pg_tblspc/16385",
            b'2',
            0,
            0o777,
            1,
            "/srv/ts",
        ));
        v.extend(file("PG_VERSION", b"17\n"));
        // GNU long name
        let long = format!("{}/file", "d".repeat(150));
        let mut name = long.as_bytes().to_vec();
        name.push(0);
        v.extend(ustar_header(
            "././@LongLink",
            b'L',
            name.len() as u64,
            0,
            0,
            "",
        ));
        v.extend(padded(&name));
        v.extend(file("ignored-short-name", b"long"));
        // pax path + size
        let pax = [
            pax_record("path", &format!("{}/pax", "p".repeat(120))),
            pax_record("mtime", "1700000001.5"),
        ]
        .concat();
        v.extend(ustar_header(
            "PaxHeaders/x",
            b'x',
            pax.len() as u64,
            0,
            0,
            "",
        ));
        v.extend(padded(&pax));
        v.extend(file("short", b"pax data"));
        v.extend(file("empty", b""));
        v
    }

    #[test]
    fn reads_pg_style_archive() {
        let mut archive = sample_archive();
        archive.extend([0u8; 1024]);
        let (entries, ended) = read_all(&[&archive]).unwrap();
        assert!(ended);
        let paths: Vec<&str> = entries.iter().map(|e| e.entry.path.as_str()).collect();
        assert_eq!(
            paths[..4],
            ["base", "base/1/1259", "pg_tblspc/16385", "PG_VERSION"]
        );
        assert_eq!(entries[1].data.len(), 8192 + 17);
        assert_eq!(entries[2].entry.entry_type, TarEntryType::Symlink);
        assert_eq!(entries[2].entry.link_target.as_deref(), Some("/srv/ts"));
        assert_eq!(entries[3].data, b"17\n");
        assert!(entries[4].entry.path.ends_with("/file") && entries[4].entry.path.len() == 155);
        assert_eq!(entries[5].entry.path, format!("{}/pax", "p".repeat(120)));
        assert_eq!(entries[5].entry.mtime, 1_700_000_001);
        assert_eq!(entries[5].data, b"pax data");
        assert_eq!(entries[6].data, b"");
    }

    #[test]
    fn accepts_missing_trailer_but_not_truncation() {
        let archive = sample_archive();
        assert!(read_all(&[&archive]).is_ok());
        let e = read_all(&[&archive[..archive.len() - 600]]).unwrap_err();
        assert!(e.to_string().contains("ends inside"), "{e}");
    }

    #[test]
    fn rejects_traversal_and_bad_checksums() {
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/.."] {
            let e = read_all(&[&file(bad, b"x")]).unwrap_err();
            assert!(e.to_string().contains("not allowed"), "{bad}: {e}");
        }
        let mut h = file("ok", b"x");
        h[0] = b'p';
        let e = read_all(&[&h]).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let hl = ustar_header("a", b'1', 0, 0, 0, "../../etc/shadow");
        assert!(read_all(&[&hl]).is_err());
    }

    #[test]
    fn root_directory_entry_is_dot() {
        let mut v = ustar_header("./", b'5', 0, 0o755, 0, "").to_vec();
        v.extend(file("./a", b"x"));
        let (entries, _) = read_all(&[&v]).unwrap();
        assert_eq!(entries[0].entry.path, ".");
        assert_eq!(entries[1].entry.path, "a");
        assert!(
            read_all(&[&file("./", b"x")]).is_err(),
            "a file cannot be the root"
        );
    }

    #[test]
    fn caps_extended_headers() {
        let h = ustar_header("././@LongLink", b'L', 10 << 20, 0, 0, "");
        let e = read_all(&[&h]).unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
    }

    #[test]
    fn big_sizes_in_base256() {
        let h = ustar_header("big", b'0', 10 << 30, 0o600, 0, "");
        let mut r = TarReader::new();
        let mut buf = BytesMut::from(&h[..]);
        match r.next_event(&mut buf).unwrap() {
            Some(TarEvent::Entry(e)) => assert_eq!(e.size, 10 << 30),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn split_anywhere_same_result(cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4)) {
            let mut archive = sample_archive();
            archive.extend([0u8; 1024]);
            let whole = read_all(&[&archive]).unwrap();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(archive.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for p in points {
                chunks.push(&archive[prev..p]);
                prev = p;
            }
            chunks.push(&archive[prev..]);
            prop_assert_eq!(read_all(&chunks).unwrap(), whole);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read_all(&[&data]);
        }
    }

    #[test]
    fn every_single_split_point() {
        let mut archive = sample_archive();
        archive.extend([0u8; 1024]);
        let whole = read_all(&[&archive]).unwrap();
        for p in 0..=archive.len() {
            assert_eq!(
                read_all(&[&archive[..p], &archive[p..]]).unwrap(),
                whole,
                "split at {p}"
            );
        }
    }
}
