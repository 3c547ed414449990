#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

// glibc malloc spent ~20% of the gateway's CPU under load (cross-thread frees between the tokio
// workers that decode and the ingest writer that drops; arena locks, consolidation): mimalloc
// is a thread-caching allocator built for exactly that (see scripts/bench-amqp).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One rustls crypto provider (aws-lc-rs) for every crate, before anything can use TLS.
    subgate::http::tls::install_crypto_provider();
    subgate::cli::run(subgate::cli::Cli::parse())
}
