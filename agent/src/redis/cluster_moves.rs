//! Keys moving between shards at the moment restored: "a `DEL` during a move means
//! moved" (docs/design/redis-cluster.md, "Restore", hazard (b)).
//!
//! `MIGRATE` (`migrateCommand` in Redis `src/cluster.c`) sends each key to the target as
//! `RESTORE-ASKING`, which the target executes and propagates to its replicas, and only then
//! deletes the keys on the source, propagating `DEL`. The agent reads each shard's stream
//! on a link of its own, and a command's index time is a bound at or after its execution
//! ([`super::exec_time`]), tight when reading keeps up and up to the offset probe's period
//! late when it does not. So a cut at T can hold the source's `DEL` (indexed at or before T)
//! and not the target's `RESTORE-ASKING` of the same key (executed before T, indexed after
//! it): the key would be in neither restored shard although it existed at T. (The opposite
//! case, both copies, is left to placement by owner, which keeps one of two identical
//! copies.)
//!
//! The rule: a key whose last command on its source at or before T, within [`WINDOW_MS`],
//! is a `DEL`/`UNLINK`, which no command of the source mentions after that (up to
//! [`WINDOW_MS`] past T), and whose first mention on another shard after that shard's cut,
//! within [`WINDOW_MS`], is a `RESTORE`/`RESTORE-ASKING` of it (and that shard does not
//! mention it in the window before its cut), was moving at T: that `RESTORE` is replayed on
//! the target's restored data. Its payload is the value at the move, which is the value at
//! T (the source deleted it right after, and nothing touched it in between). "Mentions"
//! compares every argument with the key, so a value equal to a key name only makes the rule
//! more careful, never wrong.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use storage::layout::{self, ShardKey};
use storage::Repository;
use wire::redis::command::CommandDecoder;

use super::chunk;
use crate::catalog::redis::RedisCatalog;

/// How far around T commands are considered: far more than an index time is ever late
/// while the offset probe answers (its period, 100 ms).
pub const WINDOW_MS: i64 = 5_000;

/// A command of a shard's stream near T.
#[derive(Debug, Clone)]
pub struct TimedCommand {
    /// Its arguments.
    pub args: Vec<Bytes>,
    /// Its wire bytes.
    pub raw: Bytes,
}

/// One shard's commands near T: those a restore to T replays, from `T - WINDOW_MS`, and
/// those after its cut, up to `T + WINDOW_MS`.
#[derive(Debug, Default)]
pub struct ShardWindow {
    /// Replayed (index time at or before T), oldest first.
    pub before: Vec<TimedCommand>,
    /// Not replayed (after the cut), oldest first.
    pub after: Vec<TimedCommand>,
}

/// Reads the commands of `view`'s generation for T that lie within [`WINDOW_MS`] of T.
/// Objects are read as a restore reads them (bound to their keys, checked).
pub async fn window(view: &Repository, to_ms: i64) -> Result<ShardWindow> {
    let catalog = RedisCatalog::load(view).await?;
    let mut out = ShardWindow::default();
    let Some(generation) = catalog.for_time(Some(to_ms)) else {
        return Ok(out);
    };
    let (from, until) = (to_ms - WINDOW_MS, to_ms + WINDOW_MS);
    for (start, end) in &generation.chain {
        let key = layout::redis_chunk(&generation.id, *start, *end);
        let data = view
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?;
        let (header, body) = chunk::decode(key.as_str(), data)?;
        let (Some(first), Some(last)) = (header.time_index.first(), header.time_index.last())
        else {
            continue;
        };
        if last.1 <= from || first.1 > until {
            continue;
        }
        let mut offset = header.start;
        let mut buf = BytesMut::from(&body[..]);
        let mut dec = CommandDecoder::new();
        let mut index = header.time_index.iter().peekable();
        while let Some(cmd) = dec
            .decode(&mut buf)
            .with_context(|| format!("{key}: a command at offset {offset}"))?
        {
            offset += cmd.wire_len();
            // The first index entry at or past the command's end dates it (inside MULTI,
            // the EXEC's).
            while index.peek().is_some_and(|(o, _)| *o < offset) {
                index.next();
            }
            let Some(&&(_, ms)) = index.peek() else {
                break;
            };
            if ms <= from || ms > until {
                continue;
            }
            let timed = TimedCommand {
                args: cmd.args,
                raw: cmd.raw,
            };
            if ms <= to_ms {
                out.before.push(timed);
            } else {
                out.after.push(timed);
            }
        }
    }
    Ok(out)
}

fn is_named(args: &[Bytes], names: &[&str]) -> bool {
    args.first()
        .is_some_and(|n| names.iter().any(|m| n.eq_ignore_ascii_case(m.as_bytes())))
}

/// A key that was moving at T.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovingKey {
    /// The key.
    pub key: Bytes,
    /// The shard it was deleted from at or before T.
    pub source: ShardKey,
    /// The shard whose `RESTORE` of it came after its cut.
    pub target: ShardKey,
    /// That `RESTORE` command's wire bytes: replayed, it puts the key back with its value at
    /// the move.
    pub restore: Bytes,
}

/// The keys that were moving at T (see the module docs), from every shard's window.
pub fn moved_keys(windows: &BTreeMap<ShardKey, ShardWindow>) -> Vec<MovingKey> {
    // Per shard: every argument mentioned before its cut, and the first command after its
    // cut mentioning each argument.
    let mut before_mentions: HashMap<&ShardKey, HashSet<&Bytes>> = HashMap::new();
    let mut first_after: HashMap<&ShardKey, HashMap<&Bytes, &TimedCommand>> = HashMap::new();
    for (shard, w) in windows {
        let seen = before_mentions.entry(shard).or_default();
        for c in &w.before {
            seen.extend(c.args.iter().skip(1));
        }
        let first = first_after.entry(shard).or_default();
        for c in &w.after {
            for a in c.args.iter().skip(1) {
                first.entry(a).or_insert(c);
            }
        }
    }
    let mut out = Vec::new();
    for (source, w) in windows {
        // Keys whose last mention at or before T on the source is a deletion.
        let mut deleted: BTreeMap<&Bytes, bool> = BTreeMap::new();
        for c in &w.before {
            let deletes = is_named(&c.args, &["DEL", "UNLINK"]);
            for a in c.args.iter().skip(1) {
                deleted.insert(a, deletes);
            }
        }
        let mentioned_after = first_after.get(source);
        for (key, _) in deleted.into_iter().filter(|(_, d)| *d) {
            if mentioned_after.is_some_and(|m| m.contains_key(key)) {
                continue;
            }
            for target in windows.keys().filter(|t| *t != source) {
                if before_mentions.get(target).is_some_and(|m| m.contains(key)) {
                    continue;
                }
                let Some(c) = first_after.get(target).and_then(|m| m.get(key)) else {
                    continue;
                };
                if is_named(&c.args, &["RESTORE", "RESTORE-ASKING"]) && c.args.get(1) == Some(key) {
                    out.push(MovingKey {
                        key: key.clone(),
                        source: source.clone(),
                        target: target.clone(),
                        restore: c.raw.clone(),
                    });
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cmd(args: &[&str]) -> TimedCommand {
        let raw = Bytes::from(args.join(" "));
        TimedCommand {
            args: args.iter().map(|a| Bytes::from(a.to_string())).collect(),
            raw,
        }
    }

    fn shard(n: u32) -> ShardKey {
        ShardKey::nth(n)
    }

    #[test]
    fn a_key_deleted_on_its_source_and_restored_after_the_target_cut_was_moving() {
        let mut w = BTreeMap::new();
        w.insert(
            shard(1),
            ShardWindow {
                before: vec![
                    cmd(&["SET", "k", "old"]),
                    cmd(&["DEL", "k", "gone", "back"]),
                    cmd(&["DEL", "user"]),
                    cmd(&["SET", "back", "again"]),
                ],
                after: vec![cmd(&["SET", "other", "x"])],
            },
        );
        w.insert(
            shard(2),
            ShardWindow {
                before: vec![cmd(&["SET", "unrelated", "x"])],
                after: vec![
                    cmd(&["RESTORE-ASKING", "k", "0", "payload-k", "REPLACE"]),
                    cmd(&["RESTORE-ASKING", "back", "0", "payload-b"]),
                    cmd(&["SET", "user", "later"]),
                ],
            },
        );
        let moved = moved_keys(&w);
        // k was moving; "back" was re-created on the source; "user" is not restored
        // on the target; "gone" is simply gone.
        assert_eq!(
            moved,
            vec![MovingKey {
                key: Bytes::from("k"),
                source: shard(1),
                target: shard(2),
                restore: Bytes::from("RESTORE-ASKING k 0 payload-k REPLACE"),
            }]
        );
    }

    #[test]
    fn a_key_the_source_or_the_target_mentions_elsewhere_is_left_alone() {
        // The source mentions k after T (re-created and moved again later): not moving at T.
        let mut w = BTreeMap::new();
        w.insert(
            shard(1),
            ShardWindow {
                before: vec![cmd(&["DEL", "k"])],
                after: vec![cmd(&["SET", "k", "new"])],
            },
        );
        w.insert(
            shard(2),
            ShardWindow {
                before: vec![],
                after: vec![cmd(&["RESTORE-ASKING", "k", "0", "p"])],
            },
        );
        assert!(moved_keys(&w).is_empty());
        // The target held k before its cut: k is there already.
        w.get_mut(&shard(1)).unwrap().after.clear();
        w.get_mut(&shard(2)).unwrap().before = vec![cmd(&["SET", "k", "v"])];
        assert!(moved_keys(&w).is_empty());
        // The target's first mention is not a RESTORE of k.
        w.get_mut(&shard(2)).unwrap().before.clear();
        w.get_mut(&shard(2)).unwrap().after = vec![
            cmd(&["SET", "k", "v"]),
            cmd(&["RESTORE-ASKING", "k", "0", "p"]),
        ];
        assert!(moved_keys(&w).is_empty());
        // Without the SET, it is moving.
        w.get_mut(&shard(2)).unwrap().after.remove(0);
        assert_eq!(moved_keys(&w).len(), 1);
    }
}
