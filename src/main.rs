#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // One rustls crypto provider (aws-lc-rs) for every crate, before anything can use TLS.
    subgate::http::tls::install_crypto_provider();
    subgate::cli::run(subgate::cli::Cli::parse())
}
