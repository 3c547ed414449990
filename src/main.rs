#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

// mimalloc: the ingest writer and the decoders allocate and free many small JSON values per
// event; against glibc's allocator it measured +8-24 % events/s (listener, AMQP, subscribe-user)
// for ~10-20 MB more resident memory (docs/benchmarks.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One rustls crypto provider (aws-lc-rs) for every crate, before anything can use TLS.
    subgate::http::tls::install_crypto_provider();
    subgate::cli::run(subgate::cli::Cli::parse())
}
