//! Benchmark (not a test) of the ingest writer alone, in process: no HTTP, no broker, so that a
//! change to the store can be compared with less of the machine's noise than the end-to-end
//! benchmarks have. `--concurrency` callers each submit one listener notification at a time and
//! wait for its commit (as 64 HTTP connections do in `scripts/bench-listener`), into a fresh
//! SQLite database with `synchronous = full`.
//!
//!   cargo run --release --example bench_ingest -- [--events N] [--concurrency C] [--rounds R]
//!
//! Prints per round: events/s, mean batch, and the writer thread's CPU per event (from /proc).

#[path = "support/listener_notification.rs"]
mod listener_notification;

use listener_notification::notification;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use subgate::{
    config::{IngestSettings, SqliteSynchronous},
    ingest::{self, IngestStatus},
    sources::listener,
    store::{sqlite::SqliteStore, Store},
};

#[derive(Parser)]
struct Args {
    /// Notifications per round.
    #[arg(long, default_value_t = 40_000)]
    events: u64,
    /// Callers with one notification in flight each.
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// CPU seconds (user + system) of this process's thread named `name`.
fn thread_cpu(name: &str) -> Option<f64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // Fields after the ")" that ends the command name: utime and stime are 12th and 13th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 =
                fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
            return Some(ticks / 100.0);
        }
    }
    None
}

async fn round(args: &Args, run: u64) -> anyhow::Result<(f64, f64, f64)> {
    let dir =
        std::env::temp_dir().join(format!("subgate-bench-ingest-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
        &dir.join("bench.db"),
        SqliteSynchronous::Full,
    )?);
    store.migrate()?;
    let settings = IngestSettings {
        batch_max: 512,
        batch_wait_ms: 0,
        queue_capacity: 4096,
        max_message_bytes: 1 << 20,
        store_retry_ms: 100,
        store_retry_max_ms: 1000,
    };
    let (ingest, writer) = ingest::start(store, &settings, tokio::runtime::Handle::current());
    // The writer thread exists once `start` returns; let it name itself.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cpu_before = thread_cpu("subgate-ingest").unwrap_or(0.0);
    let per_caller = args.events / args.concurrency;
    let started = Instant::now();
    let mut callers = Vec::new();
    for conn in 0..args.concurrency {
        let ingest = ingest.clone();
        callers.push(tokio::spawn(async move {
            let mut applied = 0u64;
            for n in 0..per_caller {
                let raw = notification(run, conn, n).into_bytes();
                let decoded = listener::decode(&raw).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let outcome = ingest
                    .submit(decoded.into_envelope(raw, Default::default()))
                    .await?;
                if outcome.status == IngestStatus::Applied {
                    applied += 1;
                }
            }
            anyhow::Ok(applied)
        }));
    }
    let mut applied = 0;
    for caller in callers {
        applied += caller.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = thread_cpu("subgate-ingest").unwrap_or(0.0) - cpu_before;
    let total = per_caller * args.concurrency;
    anyhow::ensure!(
        applied == total,
        "{applied} of {total} notifications applied"
    );
    drop(ingest);
    tokio::task::spawn_blocking(move || writer.join()).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((total as f64 / elapsed, cpu * 1e6 / total as f64, elapsed))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "# ingest writer alone: {} listener notifications per round, {} callers, SQLite synchronous=full",
        args.events, args.concurrency
    );
    let mut rates = Vec::new();
    for r in 0..args.rounds {
        let (rate, cpu_us, secs) = round(&args, r as u64).await?;
        println!(
            "round {}: {rate:.0} events/s in {secs:.1} s; writer CPU {cpu_us:.0} us per event",
            r + 1
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median {:.0} events/s", rates[rates.len() / 2]);
    Ok(())
}
