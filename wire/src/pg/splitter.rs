//! Cutting the WAL stream into segment files.
//!
//! A walsender sends XLogData chunks at arbitrary LSNs (`XLogSendPhysical` stops at page or
//! segment ends only when convenient), so one chunk may end one segment and begin the next.
//! [`SegmentSplitter`] checks that chunks are contiguous and cuts them at segment boundaries
//! so each slice belongs to exactly one `pg_wal` file.

use bytes::Bytes;

use super::{Lsn, PgWireError, WalSegmentSize};

/// A run of WAL bytes that lies inside one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSlice {
    /// `XLogSegNo` of the segment.
    pub segno: u64,
    /// Offset of `data` within the segment.
    pub offset: u64,
    /// The bytes (shares the receive buffer).
    pub data: Bytes,
    /// Whether `data` ends exactly at the end of the segment.
    pub completes_segment: bool,
}

impl SegmentSlice {
    /// LSN of the first byte.
    pub fn start(&self, size: WalSegmentSize) -> Lsn {
        Lsn(self.segno * size.bytes() + self.offset)
    }
}

/// Splits contiguous XLogData into per-segment slices, refusing gaps and overlaps.
#[derive(Debug, Clone)]
pub struct SegmentSplitter {
    size: WalSegmentSize,
    next: Option<Lsn>,
}

impl SegmentSplitter {
    /// A splitter that accepts its first chunk at any LSN.
    pub fn new(size: WalSegmentSize) -> SegmentSplitter {
        SegmentSplitter { size, next: None }
    }

    /// A splitter whose first chunk must start at `start` (e.g. the requested start point).
    pub fn starting_at(size: WalSegmentSize, start: Lsn) -> SegmentSplitter {
        SegmentSplitter {
            size,
            next: Some(start),
        }
    }

    /// Where the next chunk must start, once known.
    pub fn next_lsn(&self) -> Option<Lsn> {
        self.next
    }

    /// Restarts expecting `lsn` next (used after a timeline switch mid-segment).
    pub fn reset_to(&mut self, lsn: Lsn) {
        self.next = Some(lsn);
    }

    /// Cuts `data`, which starts at `start`, into slices (empty data yields nothing).
    pub fn push(&mut self, start: Lsn, mut data: Bytes) -> Result<Vec<SegmentSlice>, PgWireError> {
        if let Some(expected) = self.next {
            if start != expected {
                return Err(PgWireError::Discontinuity {
                    expected: expected.to_string(),
                    got: start.to_string(),
                });
            }
        }
        let end = start.checked_add(data.len() as u64)?;
        let mut out = Vec::with_capacity(2);
        let mut pos = start;
        while !data.is_empty() {
            let offset = self.size.offset_in_segment(pos);
            let room = self.size.bytes() - offset;
            let take = room.min(data.len() as u64) as usize;
            let piece = data.split_to(take);
            out.push(SegmentSlice {
                segno: self.size.segment_of(pos),
                offset,
                completes_segment: take as u64 == room,
                data: piece,
            });
            pos = Lsn(pos.0 + take as u64);
        }
        self.next = Some(end);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn splits_at_boundary() {
        let size = WalSegmentSize::new(MIB).unwrap();
        let mut s = SegmentSplitter::new(size);
        let data = Bytes::from(vec![7u8; 300]);
        let slices = s.push(Lsn(MIB - 100), data).unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(
            (
                slices[0].segno,
                slices[0].offset,
                slices[0].data.len(),
                slices[0].completes_segment
            ),
            (0, MIB - 100, 100, true)
        );
        assert_eq!(
            (
                slices[1].segno,
                slices[1].offset,
                slices[1].data.len(),
                slices[1].completes_segment
            ),
            (1, 0, 200, false)
        );
        assert_eq!(s.next_lsn(), Some(Lsn(MIB + 200)));
        let e = s
            .push(Lsn(MIB + 201), Bytes::from_static(b"x"))
            .unwrap_err();
        assert!(e.to_string().contains("discontinuity"), "{e}");
        assert!(s.push(Lsn(MIB + 200), Bytes::new()).unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn reassembles_any_chunking(start_off in 0u64..(2 * MIB), chunks in proptest::collection::vec(1usize..(700 * 1024), 1..8)) {
            let size = WalSegmentSize::new(MIB).unwrap();
            let mut s = SegmentSplitter::starting_at(size, Lsn(start_off));
            let mut pos = start_off;
            let mut covered = 0u64;
            for len in chunks {
                let slices = s.push(Lsn(pos), Bytes::from(vec![0u8; len])).unwrap();
                let mut expect = pos;
                for sl in &slices {
                    prop_assert_eq!(sl.start(size), Lsn(expect));
                    prop_assert!(sl.offset + sl.data.len() as u64 <= MIB);
                    prop_assert_eq!(sl.completes_segment, sl.offset + sl.data.len() as u64 == MIB);
                    expect += sl.data.len() as u64;
                }
                prop_assert_eq!(expect, pos + len as u64);
                pos += len as u64;
                covered += len as u64;
            }
            prop_assert_eq!(s.next_lsn(), Some(Lsn(start_off + covered)));
        }
    }
}
