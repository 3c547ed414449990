//! HTTP load generator for `scripts/bench-http`: N keep-alive connections, each sending requests
//! back to back for a fixed time (and at most a fixed count), against one target on loopback.
//!
//! ```text
//! http_bench healthz  BASE_URL CONNECTIONS SECONDS
//! http_bench listener BASE_URL CONNECTIONS SECONDS TOKEN
//! ```
//! Prints one line: `target=… connections=… seconds=… ok=… failed=… rate=…/s p50_ms=… p99_ms=…`.
//! Listener requests follow each order's life (creation, inProgress, item completed, completed),
//! every one a real change: each 201 is a durable commit, not a duplicate.

#[path = "support/listener_notification.rs"]
mod listener_notification;

use listener_notification::notification;
use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

/// Upper bound on requests per connection, whatever the duration.
const MAX_REQUESTS_PER_CONNECTION: u64 = 2_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Healthz,
    Listener,
}

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest is built without a rustls provider of its own: use subgate's (aws-lc-rs).
    subgate::http::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: http_bench healthz|listener BASE_URL CONNECTIONS SECONDS [TOKEN]";
    let (target, base, connections, seconds, token) = match args.as_slice() {
        [t, base, c, s, rest @ ..] => {
            let target = match t.as_str() {
                "healthz" => Target::Healthz,
                "listener" => Target::Listener,
                _ => {
                    eprintln!("{usage}");
                    return ExitCode::from(2);
                }
            };
            let (Ok(c), Ok(s)) = (c.parse::<usize>(), s.parse::<u64>()) else {
                eprintln!("{usage}");
                return ExitCode::from(2);
            };
            (target, base.clone(), c, s, rest.first().cloned())
        }
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    if target == Target::Listener && token.is_none() {
        eprintln!("listener needs a TOKEN");
        return ExitCode::from(2);
    }
    let duration = Duration::from_secs(seconds);
    let started = Instant::now();
    let deadline = started + duration;
    let run = std::process::id();
    let mut tasks = Vec::with_capacity(connections);
    for conn in 0..connections {
        let base = base.clone();
        let token = token.clone().unwrap_or_default();
        tasks.push(tokio::spawn(async move {
            // One client per task: one keep-alive connection each.
            let mut ok = 0u64;
            let mut failed = 0u64;
            let mut latencies = Vec::new();
            let client = match reqwest::Client::builder().pool_max_idle_per_host(1).build() {
                Ok(client) => client,
                Err(e) => {
                    eprintln!("cannot build an HTTP client: {e}");
                    return (ok, 1, latencies);
                }
            };
            for n in 0..MAX_REQUESTS_PER_CONNECTION {
                if Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                let request = match target {
                    Target::Healthz => client.get(format!("{base}/healthz")),
                    Target::Listener => client
                        .post(format!("{base}/externalapi/listener/v1/listener"))
                        .bearer_auth(&token)
                        .header("content-type", "application/json;charset=utf-8")
                        .body(notification(u64::from(run), conn as u64, n)),
                };
                match request.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        ok += 1;
                    }
                    Ok(r) => {
                        if failed == 0 {
                            eprintln!("first failure: HTTP {}", r.status());
                        }
                        failed += 1;
                    }
                    Err(e) => {
                        if failed == 0 {
                            eprintln!("first failure: {e}");
                        }
                        failed += 1;
                    }
                }
                latencies.push(sent.elapsed());
            }
            (ok, failed, latencies)
        }));
    }
    let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
    for task in tasks {
        if let Ok((o, f, l)) = task.await {
            ok += o;
            failed += f;
            latencies.extend(l);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "target={} connections={connections} seconds={elapsed:.1} ok={ok} failed={failed} rate={:.0}/s p50_ms={:.2} p99_ms={:.2}",
        match target {
            Target::Healthz => "healthz",
            Target::Listener => "listener",
        },
        ok as f64 / elapsed,
        pct(0.50),
        pct(0.99),
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
