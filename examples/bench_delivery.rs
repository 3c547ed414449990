//! Delivery benchmark (run it with `scripts/bench-delivery`).
//!
//! A local receiver answers 200 to every POST. In the same run, the same HTTP client (the one
//! the webhook destination builds) sends the same N bodies twice:
//! (a) a plain loop: the bodies, `concurrency` requests in flight, nothing recorded — the limit;
//! (b) subgate: N rows in a fresh outbox (SQLite with synchronous = full, as by default; with
//!     `--store postgres`, a fresh database on 127.0.0.1:5432), drained by
//!     one webhook worker as `serve` runs it (claim with a lease, sign, send, record every
//!     attempt durably; the next batch claimed and the last one recorded while one is sent).
//! Prints deliveries/s of both and the ratio b/a, per round (`--rounds`, default 3: the machine is
//! shared, so one run proves little) and the median. Each round sends the plain loops and drains
//! a fresh outbox, in the same process, with the same allocator as `subgate serve` (the system's),
//! each in a runtime task as `serve` runs a worker.

#[path = "support/pg_bench_db.rs"]
mod pg_bench_db;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;

use serde_json::json;
use subgate::{
    config::{ConfigSource, Settings},
    delivery::{
        event::{canonical_event_json, new_event_id, ContactView, EventMeta, Outbound},
        Worker,
    },
    store::{NewOutboxRow, Store},
};

struct Options {
    rows: usize,
    concurrency: usize,
    batch: usize,
    rounds: usize,
    /// sqlite | postgres (a fresh database per round on 127.0.0.1:5432)
    store: String,
}

fn options() -> Options {
    let mut o = Options {
        rows: 100_000,
        concurrency: 16,
        batch: 512,
        rounds: 3,
        store: "sqlite".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < args.len() {
        let v = &args[i + 1];
        match args[i].as_str() {
            "--rows" => o.rows = v.parse().expect("--rows N"),
            "--concurrency" => o.concurrency = v.parse().expect("--concurrency N"),
            "--batch" => o.batch = v.parse().expect("--batch N"),
            "--rounds" => o.rounds = v.parse().expect("--rounds N"),
            "--store" if v == "sqlite" || v == "postgres" => o.store = v.clone(),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o
}

/// ~600-byte canonical customer events with Turkish text, one entity each.
fn bodies(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let entity = format!("{}", 1_000_000 + i);
            let meta = EventMeta {
                inbox_id: i as i64 + 1,
                kind: "customer.changed",
                source: "erp",
                entity: &entity,
                occurred_at: Some(1_700_000_000_000),
                received_at: 1_700_000_000_500,
            };
            let outbound = Outbound {
                record: "customer",
                data: json!({
                    "id": entity, "status": "Active", "name": format!("Çağlar Şahin {i}"),
                    "contact_medium": [{"characteristic": {
                        "city": "İSTANBUL(Anadolu)", "country": "Türkiye",
                        "phoneNumber": format!("5{i:09}"),
                        "street1": "Içerenköy Mah. Değirmenyolu Cad. No:12"}}],
                    "extra": {}, "flags": []
                }),
                contact: Some(ContactView {
                    email: Some(format!("musteri{i}@example.com")),
                    phone: Some(format!("5{i:09}")),
                    first_name: Some("Çağlar".into()),
                    last_name: Some(format!("Şahin {i}")),
                    ..ContactView::default()
                }),
            };
            canonical_event_json(&new_event_id(), &meta, &outbound)
        })
        .collect()
}

/// CPU time this process (every thread: client, receiver, worker, store) has used so far, from
/// /proc/self/stat (utime + stime, in clock ticks of 10 ms). Unlike wall time it does not depend
/// on what else the shared machine runs.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// How long a phase took, on the clock and in CPU.
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

/// The receiver: 200 to everything, on its own runtime thread.
fn start_receiver() -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("receiver runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            let app = axum::Router::new().fallback(|| async { "" });
            axum::serve(listener, app).await.expect("serve");
        });
    });
    rx.recv().expect("receiver address")
}

async fn plain_loop(
    client: &reqwest::Client,
    url: &str,
    bodies: &[String],
    concurrency: usize,
    signed: bool,
) -> Took {
    let keys =
        subgate::delivery::webhook::parse_secrets("whsec_c3ViZ2F0ZS1iZW5jaA==").expect("key");
    let (started, cpu) = (Instant::now(), cpu_time());
    // Indices, not `iter().enumerate()`: a closure over borrowed items makes the future
    // not `Send` for every lifetime, so it could not run in a spawned task.
    let sent: Vec<bool> = futures_util::stream::iter((0..bodies.len()).map(|i| {
        let b = &bodies[i];
        let mut request = client.post(url).header("content-type", "application/json");
        if signed {
            let id = format!("evt_{i}");
            let ts = chrono::Utc::now().timestamp();
            request = request
                .header(
                    "webhook-signature",
                    subgate::delivery::webhook::sign(&keys, &id, ts, b.as_bytes()),
                )
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string());
        }
        let request = request.body(b.clone());
        async move {
            match request.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            }
        }
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await;
    let took = Took {
        wall: started.elapsed(),
        cpu: cpu_time() - cpu,
    };
    assert!(
        sent.iter().all(|ok| *ok),
        "every plain request answered 200"
    );
    took
}

async fn through_outbox(settings: &Settings, store: Arc<dyn Store>, bodies: &[String]) -> Took {
    let schedule = "5000,30000";
    let now = subgate::clock::now_ms();
    // The stores are synchronous (PostgreSQL's client runs its own runtime): called off the
    // runtime's cooperative scheduling, as the worker's `spawn_blocking` does.
    use tokio::task::block_in_place as blocking;
    for (chunk_index, chunk) in bodies.chunks(5000).enumerate() {
        blocking(|| {
            store
                .write(&mut |tx| {
                    for (i, body) in chunk.iter().enumerate() {
                        let n = chunk_index * 5000 + i;
                        tx.insert_outbox(&NewOutboxRow {
                            destination: "bench",
                            source: "erp",
                            kind: "customer.changed",
                            entity: &format!("erp:customer:{}", 1_000_000 + n),
                            // As ingest writes it: every contact row has its contact key.
                            contact_key: Some(&format!("email:musteri{n}@example.com")),
                            inbox_id: n as i64 + 1,
                            payload: body,
                            coalesce: false,
                            schedule,
                            created_at: now,
                        })?;
                    }
                    Ok(())
                })
                .expect("outbox rows written")
        });
    }
    let mut worker =
        Worker::new(settings, &settings.destinations[0], store).expect("webhook worker");
    let (started, cpu) = (Instant::now(), cpu_time());
    // What `subgate serve` runs: the pipelined drain (claim ahead, record behind).
    let report = worker
        .drain(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("drain");
    assert_eq!(
        report.delivered, report.claimed,
        "every delivery answered 200"
    );
    let took = Took {
        wall: started.elapsed(),
        cpu: cpu_time() - cpu,
    };
    assert_eq!(report.delivered, bodies.len());
    blocking(move || drop(worker));
    took
}

fn settings(dir: &std::path::Path, round: usize, url: &str, o: &Options) -> Settings {
    let destination = format!(
        r#"[{{name="bench", kind="webhook", url="{url}", secret="whsec_c3ViZ2F0ZS1iZW5jaA==", timeout="1s", concurrency={}, batch_size={}}}]"#,
        o.concurrency, o.batch
    );
    let store_url = if o.store == "postgres" && round > 0 {
        pg_bench_db::create("subgate_bench_delivery")
    } else {
        format!(
            "sqlite://{}",
            dir.join(format!("bench-{round}.db")).display()
        )
    };
    Settings::load(&ConfigSource {
        file: None,
        env: vec![
            ("SUBGATE__STORE__URL".into(), store_url),
            ("SUBGATE__DESTINATIONS".into(), destination),
        ],
    })
    .expect("settings")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() {
    // Every phase runs in a task of the multi-threaded runtime, as `subgate serve` runs its
    // delivery workers (not on the thread that blocks on `main`, whose every wake-up is a
    // cross-thread unpark).
    tokio::spawn(run()).await.expect("benchmark task");
}

async fn run() {
    subgate::http::tls::install_crypto_provider();
    let o = options();
    let addr = start_receiver();
    let url = format!("http://{addr}/hooks");
    let dir = std::env::temp_dir().join(format!("subgate-bench-delivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let first = tokio::task::block_in_place(|| settings(&dir, 0, &url, &o));
    let client = subgate::delivery::http_client(first.destinations[0].timeout).expect("client");
    let bodies = bodies(o.rows);
    let bytes: usize = bodies.iter().map(String::len).sum();
    println!(
        "{} deliveries of {} bytes on average, concurrency {}, claim batch {}, store {} (sqlite synchronous = {:?}), {} rounds",
        o.rows,
        bytes / o.rows.max(1),
        o.concurrency,
        o.batch,
        o.store,
        first.store.sqlite_synchronous,
        o.rounds
    );
    // Warm up connections and caches once, then measure.
    plain_loop(
        &client,
        &url,
        &bodies[..bodies.len().min(2000)],
        o.concurrency,
        false,
    )
    .await;
    let rate = |t: Took| o.rows as f64 / t.wall.as_secs_f64();
    let cpu_us = |t: Took| t.cpu.as_secs_f64() * 1e6 / o.rows as f64;
    let (mut plains, mut outboxes, mut signeds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain_cpu, mut outbox_cpu) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds.max(1) {
        let (settings, store) = tokio::task::block_in_place(|| {
            let settings = settings(&dir, round, &url, &o);
            let store = subgate::startup::open_store(&settings, true).expect("store");
            (settings, store)
        });
        let plain_took = plain_loop(&client, &url, &bodies, o.concurrency, false).await;
        let outbox_took = through_outbox(&settings, store, &bodies).await;
        let signed_took = plain_loop(&client, &url, &bodies, o.concurrency, true).await;
        let (plain, outbox, signed) = (rate(plain_took), rate(outbox_took), rate(signed_took));
        println!(
            "round {round}: plain {plain:>6.0}/s, subgate {outbox:>6.0}/s, signed plain {signed:>6.0}/s; \
             ratio subgate / plain {:.2}, subgate / signed {:.2}; CPU per delivery: plain {:.1} µs, \
             subgate {:.1} µs, signed plain {:.1} µs",
            outbox / plain,
            outbox / signed,
            cpu_us(plain_took),
            cpu_us(outbox_took),
            cpu_us(signed_took)
        );
        plain_cpu.push(cpu_us(plain_took));
        outbox_cpu.push(cpu_us(outbox_took));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.join(format!("bench-{round}.db{suffix}")));
        }
        tokio::task::block_in_place(|| pg_bench_db::drop(&settings.store.url));
        plains.push(plain);
        outboxes.push(outbox);
        signeds.push(signed);
    }
    let ratios: Vec<f64> = outboxes.iter().zip(&plains).map(|(b, a)| b / a).collect();
    let signed_ratios: Vec<f64> = outboxes.iter().zip(&signeds).map(|(b, c)| b / c).collect();
    println!(
        "plain loop (same client, same bodies):    {:>8.0} deliveries/s (median)",
        median(plains)
    );
    println!(
        "subgate outbox → webhook worker:          {:>8.0} deliveries/s (median)",
        median(outboxes)
    );
    println!(
        "plain loop + webhook headers (signed):    {:>8.0} deliveries/s (median)",
        median(signeds)
    );
    println!(
        "median ratio subgate / plain: {:.2} (rounds: {}); subgate / signed plain loop: {:.2}",
        median(ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(signed_ratios)
    );
    println!(
        "median CPU per delivery (all threads): plain loop {:.1} µs, subgate {:.1} µs",
        median(plain_cpu),
        median(outbox_cpu)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
