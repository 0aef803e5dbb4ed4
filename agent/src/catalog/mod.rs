//! The catalog: one typed view of what a repository holds, read with one listing per part,
//! so every command that asks "what is in this repository" gets the same answer.
//!
//! * [`pg`]: PostgreSQL base backups (one listing of `postgres/base/`: the ids with their
//!   pins, `expiring` tombstones and last writes, which a delimiter listing of ids alone
//!   would not give; then each `backup.json`), WAL per timeline (segments, deltas, partials,
//!   history files) and the restorable range. `wal-fetch` asks only about the segment in
//!   progress of one timeline ([`pg::segment_in_progress`], a listing of that timeline).
//! * [`redis`]: Redis generations and their chunk chains.
//! * [`retention`]: what a retention policy keeps (a pure function of the catalog).
//!
//! Readers: `list`, `verify`, `expire`, `restore` planning (both engines), `postgres
//! wal-fetch` (the segment in progress), `postgres backup` (is its WAL stored), `postgres
//! stream` and `redis stream` (where to resume). Raw object tools (`repo ls|check`) list
//! keys directly on purpose: they look at objects, not at what the objects mean.

pub mod pg;
pub mod redis;
pub mod retention;
