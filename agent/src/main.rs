//! `syncbridge-agent`: parse the command line, set up logging, run, return an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod catalog;
mod cli;
mod expire;
mod list;
mod pg;
mod redis;
mod repo_cmd;
mod restore;
mod util;
mod verify;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNCBRIDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
