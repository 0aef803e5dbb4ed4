//! `syncbridge-agent`: parse the command line, set up logging, run, return an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod catalog;
mod cli;
mod expire;
mod job;
mod list;
mod pg;
mod redis;
mod repo_cmd;
mod restore;
mod util;
mod verify;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(cli.log_format);
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
