//! The catalog: one typed view of what a repository holds, read with one listing per part,
//! so every command that asks "what is in this repository" gets the same answer.
//!
//! * [`pg`]: PostgreSQL WAL per timeline (segments, deltas, partials, history files).
//! * [`redis`]: Redis generations and their chunk chains.
//! * [`retention`]: what a retention policy keeps (a pure function of the catalog).

pub mod pg;
pub mod redis;
pub mod retention;
