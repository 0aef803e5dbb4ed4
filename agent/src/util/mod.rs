//! Small parsers and helpers shared by every command, so that each thing a user types
//! (a duration, a time, a secret in a file) and each URL shown back means the same
//! everywhere.

pub mod duration;
pub mod output;
pub mod redact;
pub mod secret_file;
pub mod time;
