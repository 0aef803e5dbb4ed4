//! The stored beginning of a WAL segment that is not complete yet: a chain of delta
//! objects (`<segment>.delta.<start>-<end>`, storage/FORMAT.md "WAL deltas"), or an older
//! build's whole-prefix `.partial.<end>` objects.
//!
//! Two readings of the same objects, on purpose:
//! * a **reader** (`wal-fetch`, restore planning) wants exactly the bytes the stream
//!   stored: the chain must start at 0 and link without a gap or an overlap, or it is
//!   refused naming the missing or overlapping delta ([`SegmentPartials::newest`]);
//! * the **writer** resuming after a restart continues from the end of the part of the
//!   chain that links from 0, and treats everything else as garbage to delete once its new
//!   deltas cover it ([`SegmentPartials::resume`]).

use std::io::Write;

use anyhow::{bail, Context, Result};
#[cfg(test)]
use storage::layout;
use storage::layout::WalObject;
use storage::{RepoKey, Repository};

/// One delta of a segment: bytes `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delta {
    /// First byte held.
    pub start: u32,
    /// Byte after the last one held.
    pub end: u32,
    /// Its object.
    pub key: RepoKey,
}

/// Every partial-segment object stored for one segment.
#[derive(Debug, Clone, Default)]
pub struct SegmentPartials {
    /// Older builds' whole-prefix partials: (end offset, key).
    pub whole: Vec<(u32, RepoKey)>,
    /// Deltas, in chain order once [`sort`](Self::sort)ed.
    pub deltas: Vec<Delta>,
}

/// What a reader assembles a partial segment from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartialSource {
    /// One object holding bytes `[0, end)`.
    Whole {
        /// Bytes held.
        end: u32,
        /// The object.
        key: RepoKey,
    },
    /// Deltas that concatenate to bytes `[0, end)`.
    Chain {
        /// Bytes held.
        end: u32,
        /// The deltas in order.
        deltas: Vec<Delta>,
    },
}

impl PartialSource {
    /// Bytes of the segment it holds.
    pub fn end(&self) -> u32 {
        match self {
            PartialSource::Whole { end, .. } | PartialSource::Chain { end, .. } => *end,
        }
    }

    /// The object (or the chain's first and last) for messages.
    pub fn describe(&self) -> String {
        match self {
            PartialSource::Whole { key, .. } => key.to_string(),
            PartialSource::Chain { deltas, .. } => match (deltas.first(), deltas.last()) {
                (Some(a), Some(b)) if deltas.len() > 1 => {
                    format!(
                        "{} .. {} ({} deltas)",
                        a.key,
                        b.key.file_name(),
                        deltas.len()
                    )
                }
                (Some(a), _) => a.key.to_string(),
                _ => "an empty chain".into(),
            },
        }
    }
}

/// What the writer continues from after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// Bytes of the segment already durable (the chain from 0, or an older whole partial).
    pub durable: u32,
    /// Where the next delta starts: the end of the chain that links from 0 (0 when the
    /// durable bytes are an older whole partial: the chain then starts afresh at 0).
    pub chain_end: u32,
    /// The linked chain's deltas, in order (deleted last to first once the segment is whole).
    pub chain: Vec<RepoKey>,
    /// Objects to delete once the stored chain reaches their end: (end, key).
    pub stale: Vec<(u32, RepoKey)>,
}

impl SegmentPartials {
    /// Records `object` (stored under `key`) if it is a partial or a delta.
    pub fn add(&mut self, object: &WalObject, key: RepoKey) {
        match object {
            WalObject::Partial { end_offset, .. } => self.whole.push((*end_offset, key)),
            WalObject::Delta { start, end, .. } => self.deltas.push(Delta {
                start: *start,
                end: *end,
                key,
            }),
            WalObject::Segment(_) | WalObject::History(_) => {}
        }
    }

    /// Puts both lists in order (a listing already is; this makes it independent of that).
    pub fn sort(&mut self) {
        self.whole.sort();
        self.deltas.sort();
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.whole.is_empty() && self.deltas.is_empty()
    }

    /// The end of the deltas that link from 0, ignoring anything after a gap.
    fn linked(&self) -> (u32, Vec<&Delta>) {
        let mut deltas: Vec<&Delta> = self.deltas.iter().collect();
        deltas.sort();
        let mut end = 0u32;
        let mut chain = Vec::new();
        for d in deltas {
            if d.start == end {
                end = d.end;
                chain.push(d);
            }
        }
        (end, chain)
    }

    /// How far the segment is durably stored, for planning (a broken chain counts up to its
    /// gap; [`newest`](Self::newest) is what refuses it when the bytes are read).
    pub fn durable_end(&self) -> u32 {
        let whole = self.whole.iter().map(|(e, _)| *e).max().unwrap_or(0);
        whole.max(self.linked().0)
    }

    /// What a reader serves: the exact delta chain, or (when there are no deltas, or an older
    /// whole partial is longer than the whole chain) the longest whole partial. A chain that
    /// does not link exactly is an error naming the segment and the delta.
    pub fn newest(&self, segment: &str) -> Result<Option<PartialSource>> {
        let mut deltas = self.deltas.clone();
        deltas.sort();
        let mut end = 0u32;
        for (i, d) in deltas.iter().enumerate() {
            if d.start > end {
                let expected = match deltas.get(i.wrapping_sub(1)).filter(|_| i > 0) {
                    Some(prev) => format!("after {}", prev.key),
                    None => "at the start of the chain".into(),
                };
                bail!(
                    "the delta chain of segment {segment} has a gap: bytes {end:#X}..{:#X} are missing \
                     (a delta named {segment}.delta.{end:08X}-… is expected {expected}, the next stored is {})",
                    d.start,
                    d.key
                );
            }
            if d.start < end {
                let prev = &deltas[i - 1];
                bail!(
                    "the delta chain of segment {segment} overlaps: {} and {} both hold bytes {:#X}..{:#X}",
                    prev.key,
                    d.key,
                    d.start,
                    end.min(d.end)
                );
            }
            end = d.end;
        }
        let whole = self.whole.iter().max_by_key(|(e, _)| *e);
        Ok(match whole {
            Some((we, key)) if *we > end => Some(PartialSource::Whole {
                end: *we,
                key: key.clone(),
            }),
            _ if deltas.is_empty() => None,
            _ => Some(PartialSource::Chain { end, deltas }),
        })
    }

    /// What the writer continues from (see the module docs).
    pub fn resume(&self) -> Resume {
        let (chain_end, linked) = self.linked();
        let whole_end = self.whole.iter().map(|(e, _)| *e).max().unwrap_or(0);
        let chain: Vec<RepoKey> = linked.iter().map(|d| d.key.clone()).collect();
        let mut stale: Vec<(u32, RepoKey)> = self
            .deltas
            .iter()
            .filter(|d| !chain.contains(&d.key))
            .map(|d| (d.end, d.key.clone()))
            .collect();
        stale.extend(self.whole.iter().cloned());
        if whole_end > chain_end {
            // An older build's partial holds more than the chain: start a new chain at 0 (its
            // first delta rewrites that prefix once) and retire the old chain with it.
            stale.extend(linked.iter().map(|d| (d.end, d.key.clone())));
            return Resume {
                durable: whole_end,
                chain_end: 0,
                chain: Vec::new(),
                stale,
            };
        }
        Resume {
            durable: chain_end,
            chain_end,
            chain,
            stale,
        }
    }
}

/// Writes `source`'s bytes to `out` in order, each object checked (its container, its
/// binding to its key, and for a delta its exact length), and returns the first bytes (for
/// the WAL page header) and the length.
pub async fn assemble(
    repo: &Repository,
    source: &PartialSource,
    out: &mut impl Write,
    head_len: usize,
) -> Result<(u64, Vec<u8>)> {
    let mut head = Vec::new();
    let mut total = 0u64;
    let parts: Vec<(RepoKey, Option<u64>)> = match source {
        PartialSource::Whole { key, .. } => vec![(key.clone(), None)],
        PartialSource::Chain { deltas, .. } => deltas
            .iter()
            .map(|d| (d.key.clone(), Some(u64::from(d.end - d.start))))
            .collect(),
    };
    for (key, want) in parts {
        let mut reader = repo
            .reader(&key)
            .await
            .with_context(|| format!("fetching {key}"))?;
        let mut len = 0u64;
        while let Some(chunk) = reader
            .next_chunk()
            .await
            .with_context(|| format!("fetching {key}"))?
        {
            if head.len() < head_len {
                let n = (head_len - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..n]);
            }
            out.write_all(&chunk)
                .context("writing the assembled segment")?;
            len += chunk.len() as u64;
        }
        if let Some(w) = want {
            if len != w {
                bail!("{key} holds {len} bytes, but its name says {w}");
            }
        }
        total += len;
    }
    Ok((total, head))
}

/// Reads `source` into memory (restore planning reads a few segments this way).
pub async fn read_all(repo: &Repository, source: &PartialSource) -> Result<bytes::Bytes> {
    let mut buf = Vec::with_capacity(source.end() as usize);
    assemble(repo, source, &mut buf, 0).await?;
    Ok(buf.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SEG: &str = "000000010000000000000003";

    fn parts(deltas: &[(u32, u32)], whole: &[u32]) -> SegmentPartials {
        let seg = layout::WalSegmentName::parse(SEG).unwrap();
        let mut p = SegmentPartials::default();
        // Added out of order on purpose.
        for &(a, b) in deltas.iter().rev() {
            let key = layout::wal_delta(&seg, a, b);
            p.add(&layout::parse_wal_key(&key).unwrap(), key);
        }
        for &e in whole {
            let key = layout::wal_partial(&seg, e);
            p.add(&layout::parse_wal_key(&key).unwrap(), key);
        }
        p
    }

    #[test]
    fn an_exact_chain_is_served_whole() {
        let p = parts(&[(0, 100), (100, 250), (250, 4096)], &[]);
        let src = p.newest(SEG).unwrap().unwrap();
        assert_eq!(src.end(), 4096);
        let PartialSource::Chain { deltas, .. } = &src else {
            panic!("{src:?}")
        };
        assert_eq!(
            deltas.iter().map(|d| d.start).collect::<Vec<_>>(),
            [0, 100, 250]
        );
        assert_eq!(p.durable_end(), 4096);
        let r = p.resume();
        assert_eq!((r.durable, r.chain_end, r.chain.len()), (4096, 4096, 3));
        assert!(r.stale.is_empty());
    }

    #[test]
    fn a_missing_middle_delta_is_named() {
        let p = parts(&[(0, 100), (250, 4096)], &[]);
        let err = p.newest(SEG).unwrap_err().to_string();
        assert!(
            err.contains("gap")
                && err.contains("0x64..0xFA")
                && err.contains(&format!("{SEG}.delta.00000064-")),
            "{err}"
        );
        // Planning counts up to the gap; the writer continues there and retires the rest.
        assert_eq!(p.durable_end(), 100);
        let r = p.resume();
        assert_eq!((r.durable, r.chain_end), (100, 100));
        assert_eq!(r.stale.len(), 1);
        assert_eq!(r.stale[0].0, 4096);
    }

    #[test]
    fn a_chain_not_starting_at_zero_or_overlapping_is_refused() {
        let err = parts(&[(100, 200)], &[]).newest(SEG).unwrap_err();
        assert!(
            err.to_string().contains("at the start of the chain"),
            "{err}"
        );
        let err = parts(&[(0, 200), (100, 300)], &[])
            .newest(SEG)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("overlaps") && err.contains("0x64..0xC8"),
            "{err}"
        );
    }

    #[test]
    fn older_whole_partials_are_still_read() {
        let p = parts(&[], &[100, 300]);
        assert_eq!(
            p.newest(SEG).unwrap(),
            Some(PartialSource::Whole {
                end: 300,
                key: layout::wal_partial(&layout::WalSegmentName::parse(SEG).unwrap(), 300)
            })
        );
        // The writer restarts a chain at 0 and retires both once it passes them.
        let r = p.resume();
        assert_eq!((r.durable, r.chain_end), (300, 0));
        assert_eq!(r.stale.len(), 2);
        // A longer chain wins over a shorter whole partial (an upgrade in progress).
        let p = parts(&[(0, 400)], &[300]);
        assert_eq!(p.newest(SEG).unwrap().unwrap().end(), 400);
        assert!(parts(&[], &[]).newest(SEG).unwrap().is_none());
    }
}
