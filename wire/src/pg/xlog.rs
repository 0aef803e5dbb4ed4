//! Just enough of the WAL record format to find transaction commit and abort times in a
//! segment, so restore can tell up front whether a `--to-time` target lies inside the
//! archived WAL (PostgreSQL's recovery only stops at a commit or abort record whose time is
//! past the target; `src/backend/access/transam/xlogrecovery.c`, `recoveryStopsBefore`).
//!
//! Layout (`src/include/access/xlog_internal.h`, `xlogrecord.h`, `xact.h`): every page starts
//! with a header (40 bytes on a segment's first page, 24 otherwise; `xlp_rem_len` says how many
//! bytes of a record begun on an earlier page continue here); records are 8-byte aligned and
//! may cross pages; each has a 24-byte header (`xl_tot_len`, `xl_xid`, `xl_prev`, `xl_info`,
//! `xl_rmid`, `xl_crc`), block headers, and the record's main data last. For `RM_XACT_ID`
//! commit/abort records the main data begins with `xact_time` (µs since 2000-01-01).
//! The scan stops at the first record that is incomplete, zero, or fails its CRC32C (the
//! end of valid WAL), and never panics on bad input. Byte order is little-endian, as on
//! every platform the agent supports.

use super::Lsn;

const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;
const RECORD_HEADER: usize = 24;
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

/// Whether a transaction record commits or aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactOutcome {
    /// `XLOG_XACT_COMMIT` or `XLOG_XACT_COMMIT_PREPARED`.
    Commit,
    /// `XLOG_XACT_ABORT` or `XLOG_XACT_ABORT_PREPARED`.
    Abort,
}

/// A commit or abort record found in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactRecord {
    /// Where the record starts.
    pub lsn: Lsn,
    /// The transaction id in the record header.
    pub xid: u32,
    /// `xact_time`: microseconds since 2000-01-01 00:00 UTC.
    pub time: i64,
    /// Commit or abort.
    pub outcome: XactOutcome,
}

/// What a segment scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentScan {
    /// Commit and abort records, in WAL order.
    pub xacts: Vec<XactRecord>,
    /// End of the last complete, valid record.
    pub valid_end: Option<Lsn>,
    /// Start of the last complete, valid record: the `recovery_target_lsn` that makes
    /// PostgreSQL (with `recovery_target_inclusive`) replay exactly up to the end of this
    /// WAL, and fail if it cannot get there.
    pub last_record: Option<Lsn>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Scans the bytes of one WAL segment (or the first bytes of one) that begins at
/// `segment_start`. Records continuing into the next segment are not reported. Several
/// consecutive segments may be passed as one slice (each starts with its long page
/// header): records crossing from one into the next are then found too.
pub fn scan_segment(data: &[u8], segment_start: Lsn) -> SegmentScan {
    let mut out = SegmentScan::default();
    // Page size from the long header of the first page (XLOG_BLCKSZ, 8 KiB by default).
    let page = match u32_at(data, 36) {
        Some(p) if (1024..=65536).contains(&p) && p.is_power_of_two() => p as usize,
        _ => return out,
    };
    // Lift the page headers out: `logical` holds record bytes only, `lsns[i]` is the LSN of
    // the first byte of page i's payload. Headers are multiples of 8 bytes, so 8-byte
    // alignment in `logical` is alignment in LSN space.
    let mut logical = Vec::with_capacity(data.len());
    let mut page_starts: Vec<(usize, u64)> = Vec::new();
    let mut first_rem = 0usize;
    for (i, p) in data.chunks(page).enumerate() {
        let Some(info) = u16_at(p, 2) else { break };
        let Some(pageaddr) = u64_at(p, 8) else { break };
        let expected = segment_start.0 + (i * page) as u64;
        if pageaddr != expected {
            break;
        }
        let header = if info & XLP_LONG_HEADER != 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        if i == 0 {
            first_rem = u32_at(p, 16).unwrap_or(0) as usize;
        }
        if p.len() < header {
            break;
        }
        page_starts.push((logical.len(), expected + header as u64));
        logical.extend_from_slice(&p[header..]);
    }
    let lsn_of = |pos: usize| -> Lsn {
        let idx = page_starts
            .partition_point(|(l, _)| *l <= pos)
            .saturating_sub(1);
        match page_starts.get(idx) {
            Some((l, lsn)) => Lsn(lsn + (pos - l) as u64),
            None => segment_start,
        }
    };
    let mut pos = align8(first_rem);
    while let Some(tot_len) = u32_at(&logical, pos) {
        let tot_len = tot_len as usize;
        if tot_len < RECORD_HEADER || pos + tot_len > logical.len() {
            break;
        }
        let rec = &logical[pos..pos + tot_len];
        let Some(stored_crc) = u32_at(rec, 20) else {
            break;
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[RECORD_HEADER..]), &rec[..20]);
        if crc != stored_crc {
            break;
        }
        let rmid = rec[17];
        let info = rec[16];
        if rmid == RM_XACT_ID {
            let outcome = match info & XLOG_XACT_OPMASK {
                0x00 | 0x30 => Some(XactOutcome::Commit),
                0x20 | 0x40 => Some(XactOutcome::Abort),
                _ => None,
            };
            if let (Some(outcome), Some(time)) = (outcome, main_data_time(rec)) {
                out.xacts.push(XactRecord {
                    lsn: lsn_of(pos),
                    xid: u32_at(rec, 4).unwrap_or(0),
                    time,
                    outcome,
                });
            }
        }
        out.valid_end = Some(lsn_of(pos + tot_len - 1)).map(|l| Lsn(l.0 + 1));
        out.last_record = Some(lsn_of(pos));
        pos += align8(tot_len);
    }
    out
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// The first 8 bytes of a record's main data, for records without block references.
fn main_data_time(rec: &[u8]) -> Option<i64> {
    let mut p = RECORD_HEADER;
    let main_len = loop {
        match *rec.get(p)? {
            XLR_BLOCK_ID_DATA_SHORT => break usize::from(*rec.get(p + 1)?),
            XLR_BLOCK_ID_DATA_LONG => break u32_at(rec, p + 1)? as usize,
            XLR_BLOCK_ID_ORIGIN => p += 3,
            XLR_BLOCK_ID_TOPLEVEL_XID => p += 5,
            _ => return None,
        }
    };
    if main_len < 8 || main_len > rec.len() - RECORD_HEADER {
        return None;
    }
    let start = rec.len() - main_len;
    Some(u64_at(rec, start)? as i64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(rmid: u8, info: u8, xid: u32, main: &[u8]) -> Vec<u8> {
        let tot = RECORD_HEADER + 2 + main.len();
        let mut r = Vec::new();
        r.extend_from_slice(&(tot as u32).to_le_bytes());
        r.extend_from_slice(&xid.to_le_bytes());
        r.extend_from_slice(&0u64.to_le_bytes());
        r.push(info);
        r.push(rmid);
        r.extend_from_slice(&[0, 0]);
        r.extend_from_slice(&[0; 4]);
        r.push(XLR_BLOCK_ID_DATA_SHORT);
        r.push(main.len() as u8);
        r.extend_from_slice(main);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&r[RECORD_HEADER..]), &r[..20]);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    fn page_header(long: bool, addr: u64, rem: u32) -> Vec<u8> {
        let mut h = vec![0u8; if long { 40 } else { 24 }];
        h[0..2].copy_from_slice(&0xD116u16.to_le_bytes());
        h[2..4].copy_from_slice(&(if long { 2u16 } else { 1 }).to_le_bytes());
        h[8..16].copy_from_slice(&addr.to_le_bytes());
        h[16..20].copy_from_slice(&rem.to_le_bytes());
        if long {
            h[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
            h[36..40].copy_from_slice(&8192u32.to_le_bytes());
        }
        h
    }

    #[test]
    fn finds_commits_across_a_page_boundary() {
        let start = 0x0300_0000u64;
        let mut commit = 1_000_000i64.to_le_bytes().to_vec();
        commit.extend_from_slice(&[0; 4]);
        let mut stream = Vec::new();
        // filler records until the commit straddles the first page's end
        let filler = record(2, 0, 0, &[7u8; 200]);
        while stream.len() + 40 + filler.len() < 8192 - 10 {
            stream.extend_from_slice(&filler);
            while stream.len() % 8 != 0 {
                stream.push(0);
            }
        }
        let commit_at = stream.len();
        stream.extend_from_slice(&record(RM_XACT_ID, 0x00, 4242, &commit));
        let page1_payload = 8192 - 40;
        let mut seg = page_header(true, start, 0);
        seg.extend_from_slice(&stream[..page1_payload.min(stream.len())]);
        seg.resize(8192, 0);
        let rest = &stream[page1_payload..];
        let mut p2 = page_header(false, start + 8192, rest.len() as u32);
        p2[2..4].copy_from_slice(&1u16.to_le_bytes());
        seg.extend_from_slice(&p2);
        seg.extend_from_slice(rest);
        let scan = scan_segment(&seg, Lsn(start));
        assert_eq!(scan.xacts.len(), 1, "{scan:?}");
        let x = scan.xacts[0];
        assert_eq!(
            (x.xid, x.time, x.outcome),
            (4242, 1_000_000, XactOutcome::Commit)
        );
        assert_eq!(x.lsn, Lsn(start + 40 + commit_at as u64));
        assert_eq!(scan.last_record, Some(x.lsn));
        assert!(scan.valid_end.unwrap() > x.lsn);
        // corrupt one byte of the commit: the scan ends before it
        let mut bad = seg.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        assert!(scan_segment(&bad, Lsn(start)).xacts.is_empty());
        // truncated anywhere: never panics
        for cut in (0..seg.len()).step_by(97) {
            let _ = scan_segment(&seg[..cut], Lsn(start));
        }
    }

    /// Lays a record stream out in 8 KiB pages of `seg`-byte segments starting at `start`:
    /// long headers at segment starts, `xlp_rem_len` from `records` (logical start, length).
    fn paginate(stream: &[u8], start: u64, seg: usize, records: &[(usize, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            let addr = start + out.len() as u64;
            let long = out.len() % seg == 0;
            let rem = records
                .iter()
                .find(|(r, l)| *r < pos && r + l > pos)
                .map_or(0, |(r, l)| (r + l - pos) as u32);
            let mut h = page_header(long, addr, rem);
            if rem > 0 {
                h[2] |= 1; // XLP_FIRST_IS_CONTRECORD
            }
            let n = (8192 - h.len()).min(stream.len() - pos);
            out.extend_from_slice(&h);
            out.extend_from_slice(&stream[pos..pos + n]);
            pos += n;
            if pos < stream.len() || out.len() % 8192 != 0 {
                out.resize(out.len().div_ceil(8192) * 8192, 0);
            }
        }
        out
    }

    /// A record with `len` bytes of long main data (crosses pages when large).
    fn long_record(len: usize) -> Vec<u8> {
        let tot = RECORD_HEADER + 5 + len;
        let mut r = Vec::new();
        r.extend_from_slice(&(tot as u32).to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&0u64.to_le_bytes());
        r.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 0]);
        r.push(XLR_BLOCK_ID_DATA_LONG);
        r.extend_from_slice(&(len as u32).to_le_bytes());
        r.extend_from_slice(&vec![3u8; len]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&r[RECORD_HEADER..]), &r[..20]);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    /// LSN of logical offset `at` in a stream paginated from `start` (segment size `seg`).
    fn lsn_at(start: u64, seg: usize, mut at: usize) -> u64 {
        let mut lsn = start;
        let mut page = 0usize;
        loop {
            let h = if page % (seg / 8192) == 0 { 40 } else { 24 };
            if at < 8192 - h {
                return lsn + (h + at) as u64;
            }
            at -= 8192 - h;
            lsn += 8192;
            page += 1;
        }
    }

    #[test]
    fn a_record_crossing_into_the_last_segment_is_found_by_joining() {
        const SEG: usize = 1 << 20;
        let start = 5 * SEG as u64;
        let mut stream = Vec::new();
        let mut records = Vec::new();
        let mut push = |stream: &mut Vec<u8>, r: &[u8]| {
            records.push((stream.len(), r.len()));
            stream.extend_from_slice(r);
            while stream.len() % 8 != 0 {
                stream.push(0);
            }
        };
        let filler = record(2, 0, 0, &[7u8; 200]);
        let payload_first_seg = SEG - (SEG / 8192) * 24 - 16;
        while stream.len() + filler.len() < payload_first_seg - 1000 {
            push(&mut stream, &filler);
        }
        // A 20 KB record crossing into the second segment, then a torn one: the archive
        // ends mid-record, and no record starts and ends in the second segment.
        let long_at = stream.len();
        push(&mut stream, &long_record(20_000));
        let torn = record(2, 0, 0, &[1u8; 100]);
        records.push((stream.len(), torn.len()));
        stream.extend_from_slice(&torn[..torn.len() / 2]);
        let wal = paginate(&stream, start, SEG, &records);
        assert!(wal.len() > SEG);
        let long_lsn = lsn_at(start, SEG, long_at);
        assert!(long_lsn < start + SEG as u64);
        let (first, second) = wal.split_at(SEG);
        let alone = scan_segment(second, Lsn(start + SEG as u64));
        assert_eq!(alone.last_record, None, "{alone:?}");
        let first_scan = scan_segment(first, Lsn(start));
        assert!(first_scan.last_record.unwrap().0 < long_lsn);
        // Joined, the crossing record is the last complete one, at its true LSN.
        let joined = scan_segment(&wal, Lsn(start));
        assert_eq!(joined.last_record, Some(Lsn(long_lsn)), "{joined:?}");
        assert!(joined.valid_end.unwrap().0 > start + SEG as u64);
    }
}
