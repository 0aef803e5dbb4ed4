//! The catalog: one typed view of what a repository holds, read with one listing per part,
//! so every command that asks "what is in this repository" gets the same answer.
//!
//! * [`pg`]: PostgreSQL base backups (ids by a delimiter listing, then each `backup.json`),
//!   WAL per timeline (segments, deltas, partials, history files) and the restorable range.
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
