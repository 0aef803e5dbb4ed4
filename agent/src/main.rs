//! `syncbridge-agent`: parse the command line, set up logging, run, return an exit code.
// One justified exception: a setsockopt no safe crate offers (src/pg/rcvlowat.rs).
#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod catalog;
mod cli;
mod config;
mod expire;
mod http;
mod job;
mod list;
mod pg;
mod pin;
mod redis;
mod repo_cmd;
mod restore;
mod run;
mod util;
mod verify;

/// jemalloc instead of glibc's malloc: a sidecar's memory limit is shared by long-lived
/// tasks that free buffers of megabytes on many tokio threads, and glibc keeps them resident
/// in per-thread arenas (its dynamic mmap threshold moves such buffers onto the heap after
/// the first free). The `run_sidecar` benchmark's peak RSS: 119 MiB with glibc, 89 and 93
/// MiB with jemalloc (mimalloc: 206); see benches/README.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
