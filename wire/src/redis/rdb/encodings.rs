//! Structural checks of the compact encodings Redis stores as opaque strings inside an RDB:
//! listpack (`src/listpack.c`), ziplist (`src/ziplist.c`), intset (`src/intset.c`) and
//! zipmap (`src/zipmap.c`).
//!
//! Each check walks the whole blob, bounds-checks every entry against the blob's end and
//! returns the number of elements, so the caller can insist on pairs or triples. Nothing
//! here allocates; a blob is already capped by the caller.

/// What a compact blob must hold, so a hash listpack with an odd element count is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Any number of elements (lists, sets, stream nodes).
    Single,
    /// Field/value or member/score pairs (hashes, sorted sets).
    Pairs,
    /// Field/value/TTL triples (Redis 7.4 `HASH_LISTPACK_EX`).
    Triples,
}

impl Shape {
    fn accepts(self, count: u64) -> bool {
        match self {
            Shape::Single => true,
            Shape::Pairs => count % 2 == 0,
            Shape::Triples => count % 3 == 0,
        }
    }
}

fn u16_le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Size in bytes of a listpack entry's back-length field for an entry of `len` bytes
/// (`lpEncodeBacklen` in listpack.c).
fn listpack_backlen_size(len: u64) -> usize {
    match len {
        0..=127 => 1,
        128..=16382 => 2,
        16383..=2097150 => 3,
        2097151..=268435454 => 4,
        _ => 5,
    }
}

/// Decodes the back-length field stored right after an entry, whose last byte is at
/// `end - 1` (`lpDecodeBacklen`).
fn decode_backlen(b: &[u8], end: usize) -> Option<u64> {
    let mut val = 0u64;
    let mut shift = 0u32;
    let mut p = end.checked_sub(1)?;
    loop {
        let byte = *b.get(p)?;
        val |= u64::from(byte & 127) << shift;
        if byte & 128 == 0 {
            return Some(val);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
        p = p.checked_sub(1)?;
    }
}

/// Validates a listpack: header total bytes and count, every entry's encoding and
/// back-length, the terminator. Returns the element count.
pub(crate) fn validate_listpack(b: &[u8], shape: Shape) -> Result<u64, &'static str> {
    const HEADER: usize = 6;
    if b.len() < HEADER + 1 {
        return Err("listpack shorter than its header");
    }
    let total = u32_le(b, 0).ok_or("listpack header")? as usize;
    if total != b.len() {
        return Err("listpack total-bytes header does not match its length");
    }
    let declared = u16_le(b, 4).ok_or("listpack header")?;
    let mut p = HEADER;
    let mut count = 0u64;
    loop {
        let first = *b.get(p).ok_or("listpack entry runs past the end")?;
        if first == 0xFF {
            break;
        }
        let (header, data): (usize, u64) = if first & 0x80 == 0 {
            (1, 0)
        } else if first & 0xC0 == 0x80 {
            (1, u64::from(first & 0x3F))
        } else if first & 0xE0 == 0xC0 {
            (2, 0)
        } else if first & 0xF0 == 0xE0 {
            let second = *b.get(p + 1).ok_or("listpack entry runs past the end")?;
            (2, (u64::from(first & 0x0F) << 8) | u64::from(second))
        } else {
            match first {
                0xF0 => (
                    5,
                    u64::from(u32_le(b, p + 1).ok_or("listpack entry runs past the end")?),
                ),
                0xF1 => (3, 0),
                0xF2 => (4, 0),
                0xF3 => (5, 0),
                0xF4 => (9, 0),
                _ => return Err("listpack entry has an invalid encoding byte"),
            }
        };
        let entry_len = header as u64 + data;
        let back = listpack_backlen_size(entry_len);
        let end = (p as u64)
            .checked_add(entry_len)
            .and_then(|e| e.checked_add(back as u64))
            .ok_or("listpack entry length overflows")?;
        // The terminator must still follow the entry.
        if end >= b.len() as u64 {
            return Err("listpack entry runs past the end");
        }
        let end = end as usize;
        if decode_backlen(b, end) != Some(entry_len) {
            return Err("listpack entry back-length does not match the entry");
        }
        p = end;
        count += 1;
    }
    if p != b.len() - 1 {
        return Err("listpack terminator is not the last byte");
    }
    if declared != u16::MAX && u64::from(declared) != count {
        return Err("listpack element count does not match its header");
    }
    if !shape.accepts(count) {
        return Err("listpack element count does not fit its type (pairs or triples)");
    }
    Ok(count)
}

/// Validates a ziplist (the pre-7.0 compact encoding): header bytes/tail/count, each entry's
/// prevlen and encoding, the terminator. Returns the element count.
pub(crate) fn validate_ziplist(b: &[u8], shape: Shape) -> Result<u64, &'static str> {
    const HEADER: usize = 10;
    if b.len() < HEADER + 1 {
        return Err("ziplist shorter than its header");
    }
    if u32_le(b, 0).ok_or("ziplist header")? as usize != b.len() {
        return Err("ziplist total-bytes header does not match its length");
    }
    let tail = u32_le(b, 4).ok_or("ziplist header")? as usize;
    let declared = u16_le(b, 8).ok_or("ziplist header")?;
    let mut p = HEADER;
    let mut prev_len = 0usize;
    let mut last_entry = HEADER;
    let mut count = 0u64;
    loop {
        let first = *b.get(p).ok_or("ziplist entry runs past the end")?;
        if first == 0xFF {
            break;
        }
        let (prevlen_size, prevlen) = if first < 254 {
            (1, usize::from(first))
        } else if first == 254 {
            (
                5,
                u32_le(b, p + 1).ok_or("ziplist entry runs past the end")? as usize,
            )
        } else {
            return Err("ziplist entry has an invalid prevlen");
        };
        if prevlen != prev_len {
            return Err("ziplist entry prevlen does not match the previous entry");
        }
        let e = p + prevlen_size;
        let enc = *b.get(e).ok_or("ziplist entry runs past the end")?;
        let (enc_size, data): (usize, usize) = match enc >> 6 {
            0 => (1, usize::from(enc & 0x3F)),
            1 => {
                let second = *b.get(e + 1).ok_or("ziplist entry runs past the end")?;
                (2, (usize::from(enc & 0x3F) << 8) | usize::from(second))
            }
            2 => {
                if enc != 0x80 {
                    return Err("ziplist entry has an invalid string encoding");
                }
                let len = b
                    .get(e + 1..e + 5)
                    .ok_or("ziplist entry runs past the end")?;
                (
                    5,
                    u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize,
                )
            }
            _ => match enc {
                0xC0 => (1, 2),
                0xD0 => (1, 4),
                0xE0 => (1, 8),
                0xF0 => (1, 3),
                0xFE => (1, 1),
                0xF1..=0xFD => (1, 0),
                _ => return Err("ziplist entry has an invalid integer encoding"),
            },
        };
        let entry = prevlen_size + enc_size + data;
        let end = p
            .checked_add(entry)
            .ok_or("ziplist entry length overflows")?;
        if end >= b.len() {
            return Err("ziplist entry runs past the end");
        }
        last_entry = p;
        prev_len = entry;
        p = end;
        count += 1;
    }
    if p != b.len() - 1 {
        return Err("ziplist terminator is not the last byte");
    }
    let expected_tail = if count == 0 { HEADER } else { last_entry };
    if tail != expected_tail {
        return Err("ziplist tail offset does not point at the last entry");
    }
    if declared != u16::MAX && u64::from(declared) != count {
        return Err("ziplist element count does not match its header");
    }
    if !shape.accepts(count) {
        return Err("ziplist element count does not fit its type (pairs)");
    }
    Ok(count)
}

/// Validates an intset: element width 2, 4 or 8, length matching the blob, members strictly
/// ascending (`intsetValidateIntegrity`). Returns the element count.
pub(crate) fn validate_intset(b: &[u8]) -> Result<u64, &'static str> {
    let width = u32_le(b, 0).ok_or("intset shorter than its header")? as usize;
    let len = u32_le(b, 4).ok_or("intset shorter than its header")? as usize;
    if !matches!(width, 2 | 4 | 8) {
        return Err("intset has an invalid element width");
    }
    if len.checked_mul(width).and_then(|n| n.checked_add(8)) != Some(b.len()) {
        return Err("intset length does not match its size");
    }
    if len == 0 {
        return Err("intset is empty");
    }
    let mut prev: Option<i64> = None;
    for chunk in b[8..].chunks_exact(width) {
        let v = match width {
            2 => i64::from(i16::from_le_bytes([chunk[0], chunk[1]])),
            4 => i64::from(i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])),
            _ => i64::from_le_bytes(chunk.try_into().map_err(|_| "intset element")?),
        };
        if prev.is_some_and(|p| p >= v) {
            return Err("intset members are not strictly ascending");
        }
        prev = Some(v);
    }
    Ok(len as u64)
}

/// Validates a zipmap (the pre-2.6 hash encoding). Returns the number of field/value pairs.
pub(crate) fn validate_zipmap(b: &[u8]) -> Result<u64, &'static str> {
    const END: u8 = 0xFF;
    if b.len() < 2 || b[b.len() - 1] != END {
        return Err("zipmap does not end with its terminator");
    }
    let read_len = |p: usize| -> Result<(usize, usize), &'static str> {
        let first = *b.get(p).ok_or("zipmap entry runs past the end")?;
        match first {
            0..=253 => Ok((1, usize::from(first))),
            254 => Ok((
                5,
                u32_le(b, p + 1).ok_or("zipmap entry runs past the end")? as usize,
            )),
            _ => Err("zipmap length byte is the terminator"),
        }
    };
    let mut p = 1usize;
    let mut count = 0u64;
    while *b.get(p).ok_or("zipmap entry runs past the end")? != END {
        let (s, l) = read_len(p)?;
        p = p.checked_add(s + l).ok_or("zipmap overflow")?;
        let (s, l) = read_len(p)?;
        p += s;
        let free = usize::from(*b.get(p).ok_or("zipmap entry runs past the end")?);
        p = p.checked_add(1 + l + free).ok_or("zipmap overflow")?;
        if p >= b.len() {
            return Err("zipmap entry runs past the end");
        }
        count += 1;
    }
    if p != b.len() - 1 {
        return Err("zipmap terminator is not the last byte");
    }
    if count == 0 {
        return Err("zipmap is empty");
    }
    if b[0] != 254 && u64::from(b[0]) != count {
        return Err("zipmap element count does not match its header");
    }
    Ok(count)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Builds a listpack the way listpack.c lays it out, for tests.
    pub(crate) fn listpack(entries: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for e in entries {
            let mut ent = Vec::new();
            if e.len() < 64 {
                ent.push(0x80 | e.len() as u8);
            } else {
                ent.push(0xE0 | (e.len() >> 8) as u8);
                ent.push(e.len() as u8);
            }
            ent.extend_from_slice(e);
            let l = ent.len() as u64;
            body.extend_from_slice(&ent);
            match listpack_backlen_size(l) {
                1 => body.push(l as u8),
                2 => {
                    body.push((l >> 7) as u8);
                    body.push((l & 127) as u8 | 128);
                }
                _ => unreachable!(),
            }
        }
        let total = 6 + body.len() + 1;
        let mut out = (total as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&body);
        out.push(0xFF);
        out
    }

    #[test]
    fn listpack_roundtrip_and_shapes() {
        let big = vec![b'x'; 300];
        let lp = listpack(&[b"a", b"bb", &big]);
        assert_eq!(validate_listpack(&lp, Shape::Single), Ok(3));
        assert!(validate_listpack(&lp, Shape::Pairs).is_err());
        assert_eq!(validate_listpack(&lp, Shape::Triples), Ok(3));
    }

    #[test]
    fn listpack_rejects_every_truncation_and_most_flips() {
        let lp = listpack(&[b"field", b"value", b"other", b"thing"]);
        for cut in 0..lp.len() {
            assert!(
                validate_listpack(&lp[..cut], Shape::Pairs).is_err(),
                "cut {cut}"
            );
        }
        let mut bad = lp.clone();
        bad[6] ^= 0x40;
        assert!(validate_listpack(&bad, Shape::Pairs).is_err());
    }

    #[test]
    fn intset_checks_order() {
        let mut s = 2u32.to_le_bytes().to_vec();
        s.extend_from_slice(&2u32.to_le_bytes());
        s.extend_from_slice(&1i16.to_le_bytes());
        s.extend_from_slice(&5i16.to_le_bytes());
        assert_eq!(validate_intset(&s), Ok(2));
        s[8] = 9;
        assert!(validate_intset(&s).is_err());
    }

    #[test]
    fn zipmap_and_ziplist_basics() {
        // zipmap {"a": "b"}: count, keylen, key, vallen, free, val, end
        let zm = [1u8, 1, b'a', 1, 0, b'b', 0xFF];
        assert_eq!(validate_zipmap(&zm), Ok(1));
        assert!(validate_zipmap(&zm[..6]).is_err());
        // ziplist ["ab", 7 (imm)]
        let mut zl = vec![0u8; 10];
        zl.extend_from_slice(&[0, 0x02, b'a', b'b']); // prevlen 0, str len 2
        let second = zl.len();
        zl.extend_from_slice(&[4, 0xF1 + 7]); // prevlen 4, imm 7
        zl.push(0xFF);
        let total = zl.len() as u32;
        zl[0..4].copy_from_slice(&total.to_le_bytes());
        zl[4..8].copy_from_slice(&(second as u32).to_le_bytes());
        zl[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(validate_ziplist(&zl, Shape::Pairs), Ok(2));
        zl[second] = 5;
        assert!(validate_ziplist(&zl, Shape::Pairs).is_err());
    }
}
