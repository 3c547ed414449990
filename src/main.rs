#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    subgate::cli::run(subgate::cli::Cli::parse())
}
