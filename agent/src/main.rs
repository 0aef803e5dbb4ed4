//! `syncbridge-agent`: parse the command line, set up logging, run, return an exit code.
#![forbid(unsafe_code)]

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
mod redis;
mod repo_cmd;
mod restore;
mod run;
mod util;
mod verify;

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
