//! Delivery benchmark (run it with `scripts/bench-delivery`).
//!
//! A local receiver answers 200 to every POST. In the same run, the same HTTP client (the one
//! the webhook destination builds) sends the same N bodies twice:
//! (a) a plain loop: the bodies, `concurrency` requests in flight, nothing recorded — the limit;
//! (b) subgate: N rows in a fresh SQLite outbox (synchronous = full, as by default), drained by
//!     one webhook worker as `serve` runs it (claim with a lease, sign, send, record every
//!     attempt durably; the next batch claimed and the last one recorded while one is sent).
//! Prints deliveries/s of both and the ratio b/a.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde_json::json;
use subgate::{
    config::{ConfigSource, Settings},
    delivery::{
        event::{canonical_event, ContactView, EventMeta, Outbound},
        Worker,
    },
    store::{NewOutboxRow, Store},
};

struct Options {
    rows: usize,
    concurrency: usize,
    batch: usize,
}

fn options() -> Options {
    let mut o = Options {
        rows: 100_000,
        concurrency: 16,
        batch: 512,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < args.len() {
        let v = &args[i + 1];
        match args[i].as_str() {
            "--rows" => o.rows = v.parse().expect("--rows N"),
            "--concurrency" => o.concurrency = v.parse().expect("--concurrency N"),
            "--batch" => o.batch = v.parse().expect("--batch N"),
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
            canonical_event(&meta, &outbound).to_string()
        })
        .collect()
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
) -> Duration {
    let keys =
        subgate::delivery::webhook::parse_secrets("whsec_c3ViZ2F0ZS1iZW5jaA==").expect("key");
    let started = Instant::now();
    let sent: Vec<bool> = futures_util::stream::iter(bodies.iter().enumerate().map(|(i, b)| {
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
    let elapsed = started.elapsed();
    assert!(
        sent.iter().all(|ok| *ok),
        "every plain request answered 200"
    );
    elapsed
}

async fn through_outbox(settings: &Settings, store: Arc<dyn Store>, bodies: &[String]) -> Duration {
    let schedule = "5000,30000";
    let now = subgate::clock::now_ms();
    for (chunk_index, chunk) in bodies.chunks(5000).enumerate() {
        store
            .write(&mut |tx| {
                for (i, body) in chunk.iter().enumerate() {
                    let n = chunk_index * 5000 + i;
                    tx.insert_outbox(&NewOutboxRow {
                        destination: "bench",
                        source: "erp",
                        kind: "customer.changed",
                        entity: &format!("erp:{}", 1_000_000 + n),
                        inbox_id: n as i64 + 1,
                        payload: body,
                        coalesce: false,
                        schedule,
                        created_at: now,
                    })?;
                }
                Ok(())
            })
            .expect("outbox rows written");
    }
    let mut worker =
        Worker::new(settings, &settings.destinations[0], store).expect("webhook worker");
    let started = Instant::now();
    // What `subgate serve` runs: the pipelined drain (claim ahead, record behind).
    let report = worker
        .drain(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("drain");
    assert_eq!(
        report.delivered, report.claimed,
        "every delivery answered 200"
    );
    let delivered = report.delivered;
    let elapsed = started.elapsed();
    assert_eq!(delivered, bodies.len());
    elapsed
}

#[tokio::main]
async fn main() {
    subgate::http::tls::install_crypto_provider();
    let o = options();
    let addr = start_receiver();
    let url = format!("http://{addr}/hooks");
    let dir = std::env::temp_dir().join(format!("subgate-bench-delivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let destination = format!(
        r#"[{{name="bench", kind="webhook", url="{url}", secret="whsec_c3ViZ2F0ZS1iZW5jaA==", timeout="1s", concurrency={}, batch_size={}}}]"#,
        o.concurrency, o.batch
    );
    let settings = Settings::load(&ConfigSource {
        file: None,
        env: vec![
            (
                "SUBGATE__STORE__URL".into(),
                format!("sqlite://{}", dir.join("bench.db").display()),
            ),
            ("SUBGATE__DESTINATIONS".into(), destination),
        ],
    })
    .expect("settings");
    let store = subgate::startup::open_store(&settings, true).expect("store");
    let client = subgate::delivery::http_client(settings.destinations[0].timeout).expect("client");
    let bodies = bodies(o.rows);
    let bytes: usize = bodies.iter().map(String::len).sum();
    println!(
        "{} deliveries of {} bytes on average, concurrency {}, claim batch {}, sqlite synchronous = {:?}",
        o.rows,
        bytes / o.rows.max(1),
        o.concurrency,
        o.batch,
        settings.store.sqlite_synchronous
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
    let plain = plain_loop(&client, &url, &bodies, o.concurrency, false).await;
    let signed = plain_loop(&client, &url, &bodies, o.concurrency, true).await;
    let outbox = through_outbox(&settings, store, &bodies).await;
    let rate = |d: Duration| o.rows as f64 / d.as_secs_f64();
    println!(
        "plain loop (same client, same bodies): {:>8.0} deliveries/s ({:.2} s)",
        rate(plain),
        plain.as_secs_f64()
    );
    println!(
        "subgate outbox → webhook worker:       {:>8.0} deliveries/s ({:.2} s)",
        rate(outbox),
        outbox.as_secs_f64()
    );
    println!(
        "plain loop + webhook headers (signed): {:>8.0} deliveries/s ({:.2} s)",
        rate(signed),
        signed.as_secs_f64()
    );
    println!("ratio subgate / plain: {:.2}", rate(outbox) / rate(plain));
    println!(
        "ratio subgate / signed plain loop: {:.2}",
        rate(outbox) / rate(signed)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
