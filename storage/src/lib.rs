//! The repository: where every byte the agent reads from a server becomes durable.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
