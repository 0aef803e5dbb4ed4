//! `redis verify`: read back every generation and prove it restorable — the snapshot through
//! the RDB validator (checksums of the container are verified by the reader), the chunks as
//! a gap-free chain from the snapshot's offset whose bodies parse into whole commands of
//! exactly the recorded length, and time indexes that stay inside their chunks and only
//! move forward. `redis restore` runs the same chain and chunk checks (
//! [`orphan_problems`], [`chunk_problems`]) before it writes anything.

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use storage::{layout, Repository};
use wire::redis::command::CommandDecoder;
use wire::redis::rdb::{RdbReport, RdbValidator};

use super::chunk::{self, ChunkHeader};
use super::manifest::GenerationManifest;
use crate::catalog::redis::{Generation, RedisCatalog};

/// What one generation looks like on inspection.
#[derive(Debug)]
pub struct GenerationCheck {
    /// The manifest.
    pub manifest: GenerationManifest,
    /// The snapshot's report, or why it is unusable.
    pub snapshot: std::result::Result<RdbReport, String>,
    /// Chunks in the chain.
    pub chunks: usize,
    /// Commands in them.
    pub commands: u64,
    /// Offset the chain reaches.
    pub end_offset: u64,
    /// Problems found in the chunks (gaps, unparsable bodies, bad indexes).
    pub problems: Vec<String>,
    /// Chunks off the chain (after a gap, or overlapping), in key order.
    pub orphans: Vec<layout::RepoKey>,
}

impl GenerationCheck {
    /// Whether the generation can be restored to every point it covers.
    pub fn is_ok(&self) -> bool {
        self.snapshot.is_ok() && self.problems.is_empty()
    }
}

/// Counts what a verification has read, for progress reports: objects and stored bytes.
#[derive(Debug, Default)]
pub struct Tally {
    /// Objects read to the end (or found damaged).
    pub objects: std::sync::atomic::AtomicU64,
    /// Their stored bytes.
    pub bytes: std::sync::atomic::AtomicU64,
}

impl Tally {
    /// Records one object of `stored` bytes.
    pub fn add(&self, stored: u64) {
        use std::sync::atomic::Ordering;
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(stored, Ordering::Relaxed);
    }
}

/// Reads the snapshot through the RDB validator; the error names the object.
async fn check_snapshot(
    repo: &Repository,
    key: &layout::RepoKey,
) -> std::result::Result<(RdbReport, u64), String> {
    let mut reader = repo.reader(key).await.map_err(|e| format!("{e}"))?;
    let mut validator = RdbValidator::new();
    while let Some(piece) = reader.next_chunk().await.map_err(|e| format!("{e}"))? {
        validator.feed(&piece).map_err(|e| format!("{key}: {e}"))?;
    }
    let stored = reader.info().map_or(0, |i| i.stored_len);
    validator
        .finish()
        .map(|r| (r, stored))
        .map_err(|e| format!("{key}: {e}"))
}

/// What one chunk of the chain holds, checked on its own (the time order across chunks is
/// checked once all are read).
struct ChunkCheck {
    problems: Vec<String>,
    commands: u64,
    /// Its time index's first and last times, when it has one and it is in order.
    times: Option<(i64, i64)>,
}

/// Reads a whole object, verified, and its stored size.
async fn read_counted(repo: &Repository, key: &layout::RepoKey) -> storage::Result<(Bytes, u64)> {
    let mut reader = repo.reader(key).await?;
    let mut data = BytesMut::new();
    while let Some(piece) = reader.next_chunk().await? {
        data.extend_from_slice(&piece);
    }
    let stored = reader.info().map_or(0, |i| i.stored_len);
    Ok((data.freeze(), stored))
}

async fn check_chunk(
    repo: &Repository,
    key: layout::RepoKey,
    expected: (u64, u64),
    tally: &Tally,
) -> ChunkCheck {
    let read = read_counted(repo, &key).await;
    tally.add(read.as_ref().map_or(0, |(_, stored)| *stored));
    let data = match read {
        Ok((d, _)) => d,
        Err(e) => {
            return ChunkCheck {
                problems: vec![format!("{e}")],
                commands: 0,
                times: None,
            }
        }
    };
    let (header, body) = match chunk::decode(key.as_str(), data) {
        Ok(x) => x,
        Err(e) => {
            return ChunkCheck {
                problems: vec![format!("{e:#}")],
                commands: 0,
                times: None,
            }
        }
    };
    let mut last_ms = i64::MIN;
    let (problems, commands) = chunk_problems(&key, expected, &header, &body, &mut last_ms);
    let times = match (header.time_index.first(), problems.is_empty()) {
        (Some(&(_, first)), true) => Some((first, last_ms)),
        _ => None,
    };
    ChunkCheck {
        problems,
        commands,
        times,
    }
}

/// Checks one generation, reading the snapshot and up to `jobs` chunks at once; each object
/// read is counted in `tally`.
pub async fn check_generation(
    repo: &Repository,
    generation: Generation,
    jobs: usize,
    tally: &Tally,
) -> Result<GenerationCheck> {
    use futures::stream::{self, StreamExt};
    let Generation {
        id,
        manifest,
        chain,
        orphans,
        ..
    } = generation;
    let key = layout::redis_snapshot(&id);
    let snapshot = async {
        let r = check_snapshot(repo, &key).await;
        tally.add(r.as_ref().map_or(0, |(_, stored)| *stored));
        r.map(|(report, _)| report)
    };
    let mut problems = orphan_problems(&manifest, &chain, &orphans);
    let chunks = stream::iter(chain.iter().map(|&(start, end)| {
        let key = layout::redis_chunk(&id, start, end);
        check_chunk(repo, key, (start, end), tally)
    }))
    .buffered(jobs.max(1))
    .collect::<Vec<ChunkCheck>>();
    let (snapshot, checked) = tokio::join!(snapshot, chunks);
    let mut commands = 0u64;
    let mut last_ms = i64::MIN;
    for ((start, end), c) in chain.iter().zip(checked) {
        problems.extend(c.problems);
        commands += c.commands;
        if let Some((first, last)) = c.times {
            if first < last_ms {
                problems.push(format!(
                    "{}: time index starts at {first} ms, before the previous chunk's last entry ({last_ms} ms)",
                    layout::redis_chunk(&id, *start, *end)
                ));
            }
            last_ms = last_ms.max(last);
        }
    }
    let end_offset = chain.last().map_or(manifest.snapshot_offset, |(_, e)| *e);
    Ok(GenerationCheck {
        manifest,
        snapshot,
        chunks: chain.len(),
        commands,
        end_offset,
        problems,
        orphans,
    })
}

/// Checks every generation, oldest first.
pub async fn check_all(repo: &Repository, jobs: usize) -> Result<Vec<GenerationCheck>> {
    let tally = Tally::default();
    let mut out = Vec::new();
    for generation in RedisCatalog::load(repo).await?.generations {
        out.push(check_generation(repo, generation, jobs, &tally).await?);
    }
    Ok(out)
}

/// Why each chunk left out of the chain (the catalog's [`crate::catalog::redis::chain_from`]) breaks it: it overlaps a chunk of
/// the chain, starts before the snapshot, or follows a gap.
pub fn orphan_problems(
    manifest: &GenerationManifest,
    chain: &[(u64, u64)],
    orphans: &[layout::RepoKey],
) -> Vec<String> {
    let end = chain.last().map_or(manifest.snapshot_offset, |(_, e)| *e);
    orphans
        .iter()
        .map(|k| {
            let Some(layout::RedisObject::Chunk { id, start, end: e }) = layout::parse_redis_key(k)
            else {
                return format!("{k} is not a chunk key");
            };
            if let Some((cs, ce)) = chain.iter().find(|(cs, ce)| start < *ce && *cs < e) {
                format!(
                    "{k} overlaps {} (offsets {start}..{e} and {cs}..{ce})",
                    layout::redis_chunk(&id, *cs, *ce)
                )
            } else if start < manifest.snapshot_offset {
                format!(
                    "{k} starts before the snapshot's offset {}",
                    manifest.snapshot_offset
                )
            } else if e <= start {
                format!("{k} is empty")
            } else {
                format!("{k} does not continue the chain (gap before it: the chain ends at offset {end})")
            }
        })
        .collect()
}

/// What is wrong with one chunk of the chain, read from `key` and expected to hold the
/// offsets `expected`: a header naming other offsets (the object is another chunk's, e.g.
/// two swapped), a body that does not parse into whole commands ending exactly at its end,
/// a time index outside the chunk or going backwards (`last_ms` carries the previous
/// chunk's last time). Returns the problems and the commands counted.
pub fn chunk_problems(
    key: &layout::RepoKey,
    expected: (u64, u64),
    header: &ChunkHeader,
    body: &Bytes,
    last_ms: &mut i64,
) -> (Vec<String>, u64) {
    let mut problems = Vec::new();
    if (header.start, header.end) != expected {
        problems.push(format!(
            "{key}: holds offsets {}..{}, not {}..{} (the object of another chunk)",
            header.start, header.end, expected.0, expected.1
        ));
    }
    let mut buf = BytesMut::from(&body[..]);
    let mut dec = CommandDecoder::new();
    let mut offset = header.start;
    let mut commands = 0u64;
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(cmd)) => {
                offset += cmd.wire_len();
                commands += 1;
            }
            Ok(None) => break,
            Err(e) => {
                problems.push(format!("{key}: at offset {offset}: {e}"));
                break;
            }
        }
    }
    if offset != header.end || !buf.is_empty() {
        problems.push(format!(
            "{key}: commands end at offset {offset} with {} bytes left over",
            buf.len()
        ));
    }
    // Offsets never go back either: restore cuts at the last entry at or before T, so an
    // entry with a later time but an earlier offset would drop commands made before T.
    let mut last_off = header.start;
    for (off, ms) in &header.time_index {
        if *off < last_off || *off > header.end || *ms < *last_ms {
            problems.push(format!(
                "{key}: time index entry ({off}, {ms}) out of order or outside the chunk"
            ));
            break;
        }
        *last_ms = *ms;
        last_off = *off;
    }
    (problems, commands)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A time index whose offsets go back (a later time at an earlier offset) is refused,
    /// like one whose times go back; equal offsets (a chunk sealed with no new command) pass.
    #[test]
    fn time_index_offsets_must_not_go_back() {
        let body = Bytes::from_static(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n");
        let header = |index: Vec<(u64, i64)>| ChunkHeader {
            replid: "r".into(),
            start: 100,
            end: 128,
            db_at_start: 0,
            db_at_end: 0,
            commands: 2,
            time_index: index,
        };
        let key = layout::RepoKey::parse("redis/x").unwrap();
        let run = |index| {
            let mut last_ms = i64::MIN;
            chunk_problems(&key, (100, 128), &header(index), &body, &mut last_ms).0
        };
        assert!(run(vec![(114, 1000), (128, 1001), (128, 1002)]).is_empty());
        let p = run(vec![(128, 1000), (114, 1001)]);
        assert!(p.len() == 1 && p[0].contains("out of order"), "{p:?}");
        let p = run(vec![(114, 1001), (128, 1000)]);
        assert!(p.len() == 1 && p[0].contains("out of order"), "{p:?}");
        let p = run(vec![(99, 1000)]);
        assert!(p.len() == 1 && p[0].contains("outside the chunk"), "{p:?}");
    }
}
