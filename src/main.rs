#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // First thing: one rustls crypto provider (aws-lc-rs) for every crate.
    subgate::delivery::install_crypto_provider();
    subgate::cli::run(subgate::cli::Cli::parse())
}
