//! Sans-IO protocol codecs: bytes in, typed values out.
//!
//! Nothing here touches a socket or a runtime, so every parser can be fed its input split at
//! any point (proptest) and fuzzed. The agent's drivers own the I/O.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
pub mod pg;
pub mod redis;
