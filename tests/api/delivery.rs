//! Delivery: the outbox written by ingest, the workers, and each transport against a local
//! stand-in for the provider (axum on port 0) or the real RabbitMQ. Most tests drive a worker
//! one step at a time on rows they put in the outbox, so retries and order are deterministic.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use amqprs::{
    channel::{ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments},
    BasicProperties,
};
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, Uri},
    response::{IntoResponse, Response},
};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Digest;
use subgate::{
    config::Settings,
    delivery::{
        event::{
            canonical_event_json, new_event_id, payload_event_id, ContactView, EventMeta, Outbound,
        },
        Worker,
    },
    store::{AttemptRow, DeliveryFilter, DeliveryState, NewOutboxRow, OutboxRow, Store},
};

use crate::{
    erp::ErpQueues,
    helpers::{eventually, query, spawn_app, temp_dir, test_settings, unique, Broker, HookedStore},
};

/// `whsec_` + base64("subgate-test-secret").
const SECRET: &str = "whsec_c3ViZ2F0ZS10ZXN0LXNlY3JldA==";
const KEY: &[u8] = b"subgate-test-secret";

/// What the stand-in answers.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

#[derive(Default)]
struct ProviderState {
    seen: Mutex<Vec<Seen>>,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
}

/// A local stand-in for a provider: records every request, answers the scripted replies in
/// order, then the default (200).
#[derive(Clone)]
pub struct Provider {
    pub addr: SocketAddr,
    state: Arc<ProviderState>,
}

async fn answer(
    State(state): State<Arc<ProviderState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.seen.lock().unwrap().push(Seen {
        method,
        uri,
        headers,
        body,
    });
    let reply = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| state.default.lock().unwrap().clone())
        .unwrap_or_else(|| Reply::status(200));
    tokio::time::sleep(reply.delay).await;
    let mut response = (
        axum::http::StatusCode::from_u16(reply.status).unwrap(),
        reply.body,
    )
        .into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

impl Provider {
    pub async fn start() -> Self {
        let state = Arc::new(ProviderState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Provider { addr, state }
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn then(&self, reply: Reply) -> &Self {
        self.state.script.lock().unwrap().push_back(reply);
        self
    }
    pub fn by_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = Some(reply);
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

/// `SUBGATE__DESTINATIONS`: one webhook to `url`.
pub fn webhook(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"{{name="{name}", kind="webhook", url="{url}", secret="{SECRET}", timeout="1s"{extra}}}"#
    )
}

/// A store with the given destinations, and no app (tests step the workers themselves).
fn outbox(destinations: &str) -> (Settings, Arc<dyn Store>) {
    let dir = temp_dir("outbox");
    let list = format!("[{destinations}]");
    let settings = test_settings(&dir, &[("destinations", list.as_str())]);
    let store = subgate::startup::open_store(&settings, true).expect("store");
    (settings, store)
}

fn worker(settings: &Settings, store: &Arc<dyn Store>, index: usize) -> Worker {
    Worker::new(settings, &settings.destinations[index], store.clone()).expect("worker")
}

/// A canonical customer event (inbox id, entity, version marker, optional email).
fn customer_event(inbox_id: i64, entity: &str, version: i64, email: Option<&str>) -> String {
    let meta = EventMeta {
        inbox_id,
        kind: "customer.changed",
        source: "erp",
        entity,
        occurred_at: None,
        received_at: 1_700_000_000_000,
    };
    let outbound = Outbound {
        record: "customer",
        data: json!({ "id": entity, "version": version }),
        contact: email.map(|e| ContactView {
            email: Some(e.to_owned()),
            first_name: Some(format!("Ayşe {version}")),
            opt_in: Some(true),
            ..ContactView::default()
        }),
    };
    canonical_event_json(&new_event_id(), &meta, &outbound)
}

/// Queue rows directly (as ingest would), oldest first: (destination, entity, payload, coalesce).
fn enqueue(store: &Arc<dyn Store>, rows: &[(&str, &str, String, bool, &str)]) -> Vec<i64> {
    let mut ids = Vec::new();
    store
        .write(&mut |tx| {
            ids.clear();
            for (i, (destination, entity, payload, coalesce, schedule)) in rows.iter().enumerate() {
                ids.push(tx.insert_outbox(&NewOutboxRow {
                    destination,
                    source: "erp",
                    kind: "customer.changed",
                    entity: &format!("erp:customer:{entity}"),
                    contact_key: None,
                    inbox_id: i as i64 + 1,
                    payload,
                    coalesce: *coalesce,
                    schedule,
                    created_at: subgate::clock::now_ms(),
                })?);
            }
            Ok(())
        })
        .expect("rows queued");
    ids
}

async fn row(store: &Arc<dyn Store>, id: i64) -> OutboxRow {
    query(store.clone(), move |s| {
        s.delivery(id).unwrap().expect("row")
    })
    .await
}

async fn attempts(store: &Arc<dyn Store>, id: i64) -> Vec<AttemptRow> {
    query(store.clone(), move |s| s.delivery_attempts(id).unwrap()).await
}

fn verify_signature(seen: &Seen) {
    let id = seen.header("webhook-id");
    let timestamp = seen.header("webhook-timestamp");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&seen.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(seen.header("webhook-signature"), expected);
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp is now ({age} s)");
}

#[tokio::test]
async fn erp_change_reaches_the_webhook_signed_and_a_duplicate_sends_nothing() {
    let provider = Provider::start().await;
    let queues = ErpQueues::new();
    let list = format!("[{}]", webhook("crm", &provider.url("/hooks"), ""));
    let app = spawn_app(&queues.overrides(&[
        ("delivery.poll_interval", "50ms"),
        ("destinations", list.as_str()),
    ]))
    .await;
    app.wait_ready().await;
    let broker = Broker::connect().await;
    let first = json!({"id": "c-1", "status": "Active", "name": "Ayşe Nur Yılmaz",
        "contactMedium": [{"characteristic": {"emailAddress": "ayse@example.com", "phoneNumber": "5351234567"}}]})
    .to_string();
    broker.publish(&queues.customers, first.as_bytes()).await;
    eventually(20, "the webhook call", || async {
        (provider.seen().len() == 1).then_some(())
    })
    .await;
    // The same bytes again (a duplicate: no new state, no outbox row), then another customer.
    broker.publish(&queues.customers, first.as_bytes()).await;
    let second = json!({"id": "c-2", "status": "Active", "name": "Can"}).to_string();
    broker.publish(&queues.customers, second.as_bytes()).await;
    eventually(20, "the second webhook call", || async {
        (provider.seen().len() >= 2).then_some(())
    })
    .await;

    let seen = provider.seen();
    assert_eq!(seen.len(), 2, "the duplicate was not delivered");
    let call = &seen[0];
    assert_eq!(call.method, Method::POST);
    assert_eq!(call.uri.path(), "/hooks");
    assert_eq!(call.header("content-type"), "application/json");
    verify_signature(call);
    let event = call.json();
    assert_eq!(call.header("webhook-id"), event["id"].as_str().unwrap());
    assert_eq!(event["type"], "customer.changed");
    assert_eq!(event["source"], "erp");
    assert_eq!(event["entity"], "c-1");
    assert_eq!(event["data"]["name"], "Ayşe Nur Yılmaz");
    assert_eq!(
        event["contact"],
        json!({"email": "ayse@example.com", "phone": "5351234567", "phone_e164": "+905351234567",
               "first_name": "Ayşe Nur", "last_name": "Yılmaz"}),
        "the ERP says nothing of consent, and the ledger knows nothing of this person"
    );
    assert_eq!(event["record"], "erp:customer:c-1");
    // A UUIDv7, not the inbox id: unique across instances and stores.
    let id = event["id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(&id[14..15], "7", "{id}");
    assert_ne!(seen[0].json()["id"], seen[1].json()["id"]);
    assert_eq!(seen[1].json()["entity"], "c-2");

    let store = app.store();
    let rows = eventually(20, "both rows recorded as delivered", || {
        let store = store.clone();
        async move {
            let rows = query(store, |s| {
                s.list_deliveries(&DeliveryFilter {
                    limit: 10,
                    ..DeliveryFilter::default()
                })
                .unwrap()
            })
            .await;
            rows.iter()
                .all(|r| r.state == DeliveryState::Delivered)
                .then_some(rows)
        }
    })
    .await;
    assert_eq!(rows.len(), 2, "one row per real change");
    let metrics = app.metrics().await;
    for series in [
        r#"subgate_delivery_attempts_total{destination="crm",outcome="delivered"}"#,
        r#"subgate_delivery_seconds_bucket{destination="crm""#,
        r#"subgate_delivery_pending{destination="crm"}"#,
        r#"subgate_delivery_oldest_pending_age_seconds{destination="crm"}"#,
        r#"subgate_delivery_dead{destination="crm"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
    app.stop().await.unwrap();
    broker.delete_queues(&queues.all()).await;
}

#[tokio::test]
async fn retries_after_a_500_and_a_timeout_then_delivers_with_every_attempt_recorded() {
    let provider = Provider::start().await;
    provider
        .then(Reply::status(500).body("oops"))
        .then(Reply::status(200).delay(Duration::from_secs(3)));
    let (settings, store) = outbox(&webhook(
        "crm",
        &provider.url("/h"),
        r#", retry_schedule=["0s", "0s", "0s"]"#,
    ));
    let ids = enqueue(
        &store,
        &[("crm", "1", customer_event(1, "1", 1, None), false, "0,0,0")],
    );
    let mut w = worker(&settings, &store, 0);
    let steps = [
        w.step().await.unwrap(),
        w.step().await.unwrap(),
        w.step().await.unwrap(),
    ];
    assert_eq!(
        steps.map(|s| (s.retried, s.delivered)),
        [(1, 0), (1, 0), (0, 1)]
    );
    let tried = attempts(&store, ids[0]).await;
    assert_eq!(
        tried
            .iter()
            .map(|a| (a.attempt, a.outcome.as_str(), a.status))
            .collect::<Vec<_>>(),
        [
            (1, "retry", Some(500)),
            (2, "retry", None),
            (3, "delivered", Some(200))
        ]
    );
    assert_eq!(tried[0].response.as_deref(), Some("oops"));
    assert!(
        tried[1].error.as_deref().unwrap().starts_with("timeout"),
        "{:?}",
        tried[1].error
    );
    // Same event, same webhook-id on every attempt.
    let seen = provider.seen();
    assert_eq!(seen.len(), 3);
    let id = seen[0].header("webhook-id");
    assert_eq!(id, seen[0].json()["id"].as_str().unwrap());
    assert!(seen.iter().all(|s| s.header("webhook-id") == id));
    let r = row(&store, ids[0]).await;
    assert_eq!((r.state, r.attempts), (DeliveryState::Delivered, 3));
}

#[tokio::test]
async fn a_retry_waits_its_scheduled_delay_and_is_not_claimed_before() {
    let provider = Provider::start().await;
    provider.by_default(Reply::status(503));
    let (settings, store) = outbox(&webhook("crm", &provider.url("/h"), ""));
    let ids = enqueue(
        &store,
        &[("crm", "1", customer_event(1, "1", 1, None), false, "60000")],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().retried, 1);
    assert!(w.step().await.unwrap().is_idle(), "not due yet");
    let tried = attempts(&store, ids[0]).await;
    let wait = tried[0].next_attempt_at.unwrap() - tried[0].started_at;
    // 60 s ± 20 % jitter (plus the attempt's own latency).
    assert!((48_000..=73_000).contains(&wait), "{wait}");
}

#[tokio::test]
async fn http_429_retry_after_sets_the_next_attempt_within_bounds() {
    let provider = Provider::start().await;
    provider.then(Reply::status(429).header("retry-after", "7"));
    let (settings, store) = outbox(&webhook("crm", &provider.url("/h"), ""));
    let ids = enqueue(
        &store,
        &[("crm", "1", customer_event(1, "1", 1, None), false, "5000")],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().retried, 1);
    let tried = attempts(&store, ids[0]).await;
    assert_eq!(tried[0].status, Some(429));
    let wait = tried[0].next_attempt_at.unwrap() - tried[0].started_at;
    assert!((7_000..9_000).contains(&wait), "{wait}");
}

#[tokio::test]
async fn http_400_is_dead_at_once_with_the_response_kept() {
    let provider = Provider::start().await;
    provider.then(Reply::status(400).body(r#"{"error":"unknown field"}"#));
    let (settings, store) = outbox(&webhook("crm", &provider.url("/h"), ""));
    let ids = enqueue(
        &store,
        &[(
            "crm",
            "1",
            customer_event(1, "1", 1, None),
            false,
            "5000,5000",
        )],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().dead, 1);
    let r = row(&store, ids[0]).await;
    assert_eq!(
        (r.state, r.attempts, r.last_status),
        (DeliveryState::Dead, 1, Some(400))
    );
    assert_eq!(
        r.last_response.as_deref(),
        Some(r#"{"error":"unknown field"}"#)
    );
    assert_eq!(provider.seen().len(), 1);
}

fn subgate_cli(settings: &Settings, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_subgate"))
        .args(args)
        .env("SUBGATE__STORE__URL", &settings.store.url)
        .output()
        .expect("subgate runs")
}

#[tokio::test]
async fn exhausted_schedule_is_dead_then_a_recorded_replay_delivers() {
    let provider = Provider::start().await;
    provider.then(Reply::status(500)).then(Reply::status(502));
    let (settings, store) = outbox(&webhook("crm", &provider.url("/h"), ""));
    let ids = enqueue(
        &store,
        &[("crm", "1", customer_event(1, "1", 1, None), false, "0")],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().retried, 1);
    assert_eq!(w.step().await.unwrap().dead, 1, "one retry in the schedule");
    assert_eq!(row(&store, ids[0]).await.state, DeliveryState::Dead);

    let listed = subgate_cli(&settings, &["deliveries", "list", "--dead"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}");
    assert!(
        text.contains(&format!("{}\tcrm\tdead\t2 attempt(s)", ids[0])),
        "{text}"
    );

    let refused = subgate_cli(&settings, &["deliveries", "replay"]);
    assert_eq!(refused.status.code(), Some(2), "--dead is required");
    let replayed = subgate_cli(
        &settings,
        &["deliveries", "replay", "--dead", "--destination", "crm"],
    );
    let text = String::from_utf8_lossy(&replayed.stdout);
    assert!(replayed.status.success(), "{text}");
    assert!(text.starts_with("1 dead delivery replayed"), "{text}");

    let r = row(&store, ids[0]).await;
    assert_eq!(
        (r.state, r.attempts, r.replays),
        (DeliveryState::Pending, 0, 1)
    );
    assert_eq!(w.step().await.unwrap().delivered, 1);
    assert_eq!(row(&store, ids[0]).await.state, DeliveryState::Delivered);
    assert_eq!(attempts(&store, ids[0]).await.len(), 3);
}

#[tokio::test]
async fn a_later_change_waits_while_an_earlier_one_of_the_same_entity_is_retried() {
    let provider = Provider::start().await;
    provider.then(Reply::status(500));
    let (settings, store) = outbox(&webhook("crm", &provider.url("/h"), ""));
    enqueue(
        &store,
        &[
            ("crm", "A", customer_event(1, "A", 1, None), false, "0,0"),
            ("crm", "A", customer_event(2, "A", 2, None), false, "0,0"),
            ("crm", "B", customer_event(3, "B", 1, None), false, "0,0"),
        ],
    );
    let mut w = worker(&settings, &store, 0);
    // Step 1 claims the heads A1 and B1 (A2 waits behind A1); A1 fails.
    assert_eq!(w.step().await.unwrap().claimed, 2);
    // Step 2: only A1 again (A2 still waits). Step 3: A2.
    assert_eq!(w.step().await.unwrap().claimed, 1);
    assert_eq!(w.step().await.unwrap().claimed, 1);
    assert!(w.step().await.unwrap().is_idle());
    let order: Vec<(String, i64)> = provider
        .seen()
        .iter()
        .map(|s| {
            let e = s.json();
            (
                e["entity"].as_str().unwrap().to_owned(),
                e["data"]["version"].as_i64().unwrap(),
            )
        })
        .filter(|(entity, _)| entity == "A")
        .collect();
    assert_eq!(order, [("A".into(), 1), ("A".into(), 1), ("A".into(), 2)]);
}

#[tokio::test]
async fn a_lease_held_by_a_crashed_worker_is_taken_over_once_it_expires() {
    let provider = Provider::start().await;
    let (settings, store) = outbox(&webhook("crm", &provider.url("/h"), ""));
    let ids = enqueue(
        &store,
        &[("crm", "1", customer_event(1, "1", 1, None), false, "0")],
    );
    // A worker that claimed and died: its lease runs until now + 200 ms.
    let now = subgate::clock::now_ms();
    let claimed = query(store.clone(), move |s| {
        s.claim_deliveries(&subgate::store::ClaimRequest {
            destination: "crm".into(),
            owner: "crashed".into(),
            now,
            lease_until: now + 200,
            limit: 10,
            coalesce: false,
        })
        .unwrap()
    })
    .await;
    assert_eq!(claimed.len(), 1);
    let mut w = worker(&settings, &store, 0);
    assert!(
        w.step().await.unwrap().is_idle(),
        "leased rows are not claimed"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while w.step().await.unwrap().delivered == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease expired and another worker took the row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(row(&store, ids[0]).await.state, DeliveryState::Delivered);
}

#[tokio::test]
async fn one_hanging_destination_does_not_hold_up_the_healthy_one_and_a_stop_releases_its_leases() {
    let healthy = Provider::start().await;
    let hanging = Provider::start().await;
    hanging.by_default(Reply::status(200).delay(Duration::from_secs(30)));
    let queues = ErpQueues::new();
    let list = format!(
        "[{}, {}]",
        webhook("down", &hanging.url("/h"), ", concurrency=1"),
        webhook("up", &healthy.url("/h"), "")
    );
    let app = spawn_app(&queues.overrides(&[
        ("delivery.poll_interval", "50ms"),
        ("destinations", list.as_str()),
        ("shutdown.timeout", "5s"),
    ]))
    .await;
    app.wait_ready().await;
    let broker = Broker::connect().await;
    let messages = (0..50)
        .map(|i| {
            let body = json!({"id": format!("h{i}"), "status": "Active", "name": "X"});
            (body.to_string().into_bytes(), BasicProperties::default())
        })
        .collect();
    broker.publish_all(&queues.customers, messages).await;
    eventually(30, "all 50 at the healthy destination", || async {
        (healthy.seen().len() == 50).then_some(())
    })
    .await;
    let store = app.store();
    let down = query(store.clone(), |s| s.delivery_stats("down").unwrap()).await;
    assert_eq!(down.pending, 50, "nothing reached the hanging destination");
    let (status, _) = app.get_json("/readyz").await;
    assert_eq!(
        status, 200,
        "ready while a provider is down: the outbox holds the rows"
    );
    // A graceful stop interrupts the hanging request and releases the worker's leases.
    app.stop().await.unwrap();
    let leased = query(store, |s| {
        s.list_deliveries(&DeliveryFilter {
            destination: Some("down".into()),
            limit: 100,
            ..DeliveryFilter::default()
        })
        .unwrap()
        .iter()
        .filter(|r| r.locked_until.is_some())
        .count()
    })
    .await;
    assert_eq!(leased, 0, "no lease survives a graceful stop");
    broker.delete_queues(&queues.all()).await;
}

fn emarsys(url: &str, extra: &str) -> String {
    format!(
        r#"{{name="em", kind="emarsys", url="{url}", secret="api-s3cret", timeout="2s", emarsys={{user="company001"{extra}}}}}"#
    )
}

/// Recompute the X-WSSE digest with the secret.
fn verify_wsse(header: &str) {
    let field = |name: &str| {
        let start = header.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        let end = header[start..].find('"').unwrap() + start;
        header[start..end].to_owned()
    };
    assert!(header.starts_with("UsernameToken "), "{header}");
    assert_eq!(field("Username"), "company001");
    let (nonce, created) = (field("Nonce"), field("Created"));
    let hex_digest = hex::encode(sha1::Sha1::digest(format!("{nonce}{created}api-s3cret")));
    assert_eq!(
        field("PasswordDigest"),
        base64::engine::general_purpose::STANDARD.encode(hex_digest)
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(&created).is_ok(),
        "{created}"
    );
}

#[tokio::test]
async fn emarsys_batch_with_one_failing_item_kills_only_that_item() {
    let provider = Provider::start().await;
    provider.then(Reply::status(200).body(
        r#"{"replyCode":0,"replyText":"OK","data":{"ids":["11","13"],
            "errors":{"bad@example":{"2010":"Invalid email address"}}}}"#,
    ));
    let (settings, store) = outbox(&emarsys(&provider.url(""), ""));
    let ids = enqueue(
        &store,
        &[
            (
                "em",
                "1",
                customer_event(1, "1", 1, Some("a@example.com")),
                true,
                "0",
            ),
            (
                "em",
                "2",
                customer_event(2, "2", 1, Some("bad@example")),
                true,
                "0",
            ),
            (
                "em",
                "3",
                customer_event(3, "3", 1, Some("c@example.com")),
                true,
                "0",
            ),
        ],
    );
    let mut w = worker(&settings, &store, 0);
    let report = w.step().await.unwrap();
    assert_eq!((report.claimed, report.delivered, report.dead), (3, 2, 1));

    let seen = provider.seen();
    assert_eq!(seen.len(), 1, "one call for the batch");
    let call = &seen[0];
    assert_eq!(call.method, Method::PUT);
    assert_eq!(call.uri.path(), "/api/v2/contact/");
    assert_eq!(call.uri.query(), Some("create_if_not_exists=1"));
    verify_wsse(&call.header("x-wsse"));
    assert_eq!(
        call.json(),
        json!({"key_id": "3", "contacts": [
            {"1": "Ayşe 1", "3": "a@example.com", "31": "1"},
            {"1": "Ayşe 1", "3": "bad@example", "31": "1"},
            {"1": "Ayşe 1", "3": "c@example.com", "31": "1"},
        ]})
    );
    let states = [
        row(&store, ids[0]).await,
        row(&store, ids[1]).await,
        row(&store, ids[2]).await,
    ];
    assert_eq!(
        states.each_ref().map(|r| r.state),
        [
            DeliveryState::Delivered,
            DeliveryState::Dead,
            DeliveryState::Delivered
        ]
    );
    assert!(states[1]
        .last_error
        .as_deref()
        .unwrap()
        .contains("Invalid email address"));
}

#[tokio::test]
async fn emarsys_coalesces_pending_updates_of_one_contact_into_the_latest() {
    let provider = Provider::start().await;
    let (settings, store) = outbox(&emarsys(&provider.url(""), ""));
    let ids = enqueue(
        &store,
        &[
            (
                "em",
                "1",
                customer_event(1, "1", 1, Some("a@example.com")),
                true,
                "0",
            ),
            (
                "em",
                "1",
                customer_event(2, "1", 2, Some("a@example.com")),
                true,
                "0",
            ),
            (
                "em",
                "1",
                customer_event(3, "1", 3, Some("a@example.com")),
                true,
                "0",
            ),
        ],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().delivered, 1);
    let sent = provider.seen()[0].json();
    assert_eq!(
        sent["contacts"],
        json!([{"1": "Ayşe 3", "3": "a@example.com", "31": "1"}])
    );
    let first = row(&store, ids[0]).await;
    assert_eq!(
        (first.state, first.superseded_by),
        (DeliveryState::Superseded, Some(ids[2]))
    );
    assert_eq!(row(&store, ids[1]).await.state, DeliveryState::Superseded);
    assert_eq!(row(&store, ids[2]).await.state, DeliveryState::Delivered);
}

#[tokio::test]
async fn emarsys_event_kinds_trigger_external_events_with_oauth2() {
    let provider = Provider::start().await;
    provider.then(Reply::status(200).body(r#"{"access_token":"tok-1","expires_in":3600}"#));
    let extra = format!(
        r#", auth="oauth2", token_url="{}", event_ids={{"customer.changed"="77"}}"#,
        provider.url("/oauth2/token")
    );
    let (settings, store) = outbox(&emarsys(&provider.url(""), &extra));
    enqueue(
        &store,
        &[(
            "em",
            "1",
            customer_event(1, "1", 1, Some("a@example.com")),
            false,
            "0",
        )],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().delivered, 1);
    let seen = provider.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].uri.path(), "/oauth2/token");
    assert_eq!(
        seen[0].header("authorization"),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("company001:api-s3cret")
        )
    );
    assert_eq!(&seen[0].body[..], b"grant_type=client_credentials");
    assert_eq!(seen[1].method, Method::POST);
    assert_eq!(seen[1].uri.path(), "/api/v2/event/77/trigger");
    assert_eq!(seen[1].header("authorization"), "Bearer tok-1");
    assert_eq!(
        seen[1].json(),
        json!({"key_id": "3", "external_id": "a@example.com", "data": {"id": "1", "version": 1}})
    );
}

#[tokio::test]
async fn amqp_destination_republishes_with_confirms_and_the_row_id_as_message_id() {
    let broker = Broker::connect().await;
    let exchange = unique("events");
    let queue = unique("events-q");
    let ch = broker.connection.open_channel(None).await.unwrap();
    ch.exchange_declare(
        ExchangeDeclareArguments::new(&exchange, "topic")
            .durable(true)
            .finish(),
    )
    .await
    .unwrap();
    ch.queue_declare(QueueDeclareArguments::new(&queue).durable(true).finish())
        .await
        .unwrap();
    ch.queue_bind(QueueBindArguments::new(
        &queue,
        &exchange,
        "customer.changed",
    ))
    .await
    .unwrap();
    let (settings, store) = outbox(&format!(
        r#"{{name="bus", kind="amqp", exchange="{exchange}", timeout="5s"}}"#
    ));
    let payload = customer_event(1, "1", 1, None);
    let ids = enqueue(&store, &[("bus", "1", payload.clone(), false, "0")]);
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().delivered, 1);
    let (props, body) = broker.get(&queue).await.expect("the republished event");
    assert_eq!(body, payload.as_bytes());
    assert_eq!(props.message_id(), Some(&ids[0].to_string()));
    assert_eq!(props.delivery_mode(), Some(2));
    assert_eq!(
        props.content_type().map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        props.message_type().map(String::as_str),
        Some("customer.changed")
    );
    assert_eq!(
        crate::helpers::header(&props, "x-subgate-event-id"),
        payload_event_id(&payload)
    );
    ch.close().await.unwrap();
    broker.delete_queues(&[queue]).await;
}

#[tokio::test]
async fn amqp_destination_retries_what_no_queue_would_receive() {
    let (settings, store) = outbox(&format!(
        r#"{{name="bus", kind="amqp", exchange="{}", timeout="5s"}}"#,
        unique("unbound")
    ));
    let ids = enqueue(
        &store,
        &[("bus", "1", customer_event(1, "1", 1, None), false, "60000")],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().retried, 1);
    let r = row(&store, ids[0]).await;
    assert!(
        r.last_error.as_deref().unwrap().starts_with("unroutable"),
        "{:?}",
        r.last_error
    );
}

#[tokio::test]
async fn deliveries_api_wants_the_admin_token_lists_dead_rows_and_replays_them() {
    let provider = Provider::start().await;
    provider.by_default(Reply::status(410).body("gone"));
    let list = format!("[{}]", webhook("crm", &provider.url("/h"), ""));
    let app = spawn_app(&[
        ("destinations", list.as_str()),
        ("delivery.enabled", "false"),
        ("admin.token", "adm1n"),
    ])
    .await;
    let store = app.store();
    let event = customer_event(1, "1", 1, None);
    let event_id = payload_event_id(&event).unwrap();
    let ids = enqueue(&store, &[("crm", "1", event, false, "0")]);
    let mut w = worker(&app.settings, &store, 0);
    assert_eq!(w.step().await.unwrap().dead, 1);

    let url = app.url("/api/v1/deliveries?state=dead&destination=crm");
    let none = app.http.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let wrong = app.http.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let listed: Value = app
        .http
        .get(&url)
        .bearer_auth("adm1n")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["deliveries"][0]["id"], ids[0]);
    assert_eq!(listed["deliveries"][0]["last_status"], 410);
    assert_eq!(listed["deliveries"][0]["last_response"], "gone");

    let one: Value = app
        .http
        .get(app.url(&format!("/api/v1/deliveries/{}", ids[0])))
        .bearer_auth("adm1n")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["event"]["id"], event_id.as_str());
    assert_eq!(listed["deliveries"][0]["event_id"], event_id.as_str());
    assert_eq!(one["attempts"][0]["outcome"], "dead");

    let replayed = app
        .http
        .post(app.url("/api/v1/deliveries/replay"))
        .bearer_auth("adm1n")
        .json(&json!({"destination": "crm"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 200);
    let body: Value = replayed.json().await.unwrap();
    assert_eq!(body["replayed"], 1);
    assert_eq!(row(&store, ids[0]).await.state, DeliveryState::Pending);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn deliveries_api_is_forbidden_without_a_configured_token_and_documented() {
    let app = spawn_app(&[]).await;
    let r = app
        .http
        .get(app.url("/api/v1/deliveries"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (_, doc) = app.get_json("/openapi.json").await;
    for path in [
        "/api/v1/deliveries",
        "/api/v1/deliveries/{id}",
        "/api/v1/deliveries/replay",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    app.stop().await.unwrap();
}

/// `subgate serve` as a process (for kill -9).
struct Process(std::process::Child);

impl Process {
    fn start(dir: &std::path::Path, port: u16, overrides: &[(&str, &str)]) -> Self {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_subgate"));
        cmd.arg("serve")
            .env("SUBGATE__HTTP__ADDR", format!("127.0.0.1:{port}"))
            .env(
                "SUBGATE__STORE__URL",
                format!("sqlite://{}", dir.join("subgate.db").display()),
            )
            .env("SUBGATE__LOG__LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in overrides {
            cmd.env(
                format!("SUBGATE__{}", k.replace('.', "__").to_ascii_uppercase()),
                v,
            );
        }
        Process(cmd.spawn().expect("subgate starts"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn kill_9_during_delivery_resumes_after_restart_at_least_once() {
    let provider = Provider::start().await;
    provider.by_default(Reply::status(200).delay(Duration::from_millis(300)));
    let queues = ErpQueues::new();
    let dir = temp_dir("kill9-delivery");
    let list = format!(
        "[{}]",
        webhook("crm", &provider.url("/h"), ", concurrency=1, batch_size=4")
    );
    let overrides = queues.overrides(&[
        ("destinations", list.as_str()),
        ("delivery.poll_interval", "50ms"),
        ("delivery.lease", "2s"),
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let first = Process::start(&dir, port, &overrides);
    let ready = format!("http://127.0.0.1:{port}/readyz");
    subgate::http::tls::install_crypto_provider();
    let client = reqwest::Client::new();
    eventually(30, "the process ready (queues declared)", || async {
        let r = client.get(&ready).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let broker = Broker::connect().await;
    let messages = (0..20)
        .map(|i| {
            let body = json!({"id": format!("k{i}"), "status": "Active", "name": "X"});
            (body.to_string().into_bytes(), BasicProperties::default())
        })
        .collect();
    broker.publish_all(&queues.customers, messages).await;
    eventually(30, "deliveries under way", || async {
        (provider.seen().len() >= 3).then_some(())
    })
    .await;
    drop(first); // SIGKILL, mid-request: the provider answers each call after 300 ms.
    let at_kill = provider.seen().len();
    assert!(at_kill < 20, "killed mid-way ({at_kill})");

    let _second = Process::start(&dir, port, &overrides);
    let settings = test_settings(&dir, &overrides);
    let store = subgate::startup::open_store(&settings, false).unwrap();
    eventually(60, "every row delivered after the restart", || {
        let store = store.clone();
        async move {
            let delivered = query(store, |s| {
                s.list_deliveries(&DeliveryFilter {
                    state: Some(DeliveryState::Delivered),
                    limit: 100,
                    ..DeliveryFilter::default()
                })
                .map(|rows| rows.len())
                .unwrap_or(0)
            })
            .await;
            (delivered == 20).then_some(())
        }
    })
    .await;
    let mut entities: Vec<String> = provider
        .seen()
        .iter()
        .map(|s| s.json()["entity"].as_str().unwrap().to_owned())
        .collect();
    assert!(entities.len() >= 20, "at least once");
    entities.sort();
    entities.dedup();
    assert_eq!(entities.len(), 20, "every change reached the provider");
    broker.delete_queues(&queues.all()).await;
}

#[tokio::test]
async fn the_pipelined_drain_keeps_per_entity_order_under_retries() {
    let provider = Provider::start().await;
    provider.then(Reply::status(503));
    let (settings, store) = outbox(&webhook(
        "crm",
        &provider.url("/h"),
        ", batch_size=2, concurrency=2",
    ));
    let mut rows = Vec::new();
    for v in 1..=3 {
        rows.push(("crm", "A", customer_event(v, "A", v, None), false, "0,0"));
        for b in 0..3 {
            let entity = format!("B{v}{b}");
            rows.push((
                "crm",
                "B",
                customer_event(100 + v * 10 + b, &entity, 1, None),
                false,
                "0,0",
            ));
        }
    }
    // The B rows share one ordering key too ("erp:B"): two interleaved streams.
    enqueue(&store, &rows);
    let mut w = worker(&settings, &store, 0);
    let report = w
        .drain(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.delivered, report.retried), (12, 1));
    let versions = |entity_prefix: &str| -> Vec<i64> {
        provider
            .seen()
            .iter()
            .map(Seen::json)
            .filter(|e| e["entity"].as_str().unwrap().starts_with(entity_prefix))
            .map(|e| e["inbox_id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(
        versions("A"),
        [1, 1, 2, 3],
        "A1 retried before A2 and A3 went out"
    );
    let b = versions("B");
    let mut sorted = b.clone();
    sorted.sort_unstable();
    assert_eq!(b, sorted, "B rows in commit order");
}

#[tokio::test]
async fn emarsys_429_retries_the_whole_call_after_retry_after() {
    let provider = Provider::start().await;
    provider.then(Reply::status(429).header("retry-after", "30"));
    let (settings, store) = outbox(&emarsys(&provider.url(""), ""));
    let ids = enqueue(
        &store,
        &[
            (
                "em",
                "1",
                customer_event(1, "1", 1, Some("a@example.com")),
                true,
                "5000",
            ),
            (
                "em",
                "2",
                customer_event(2, "2", 1, Some("b@example.com")),
                true,
                "5000",
            ),
        ],
    );
    let mut w = worker(&settings, &store, 0);
    assert_eq!(w.step().await.unwrap().retried, 2);
    assert_eq!(provider.seen().len(), 1, "one call for both contacts");
    for id in ids {
        let tried = attempts(&store, id).await;
        assert_eq!(tried[0].status, Some(429));
        let wait = tried[0].next_attempt_at.unwrap() - tried[0].started_at;
        assert!((30_000..32_000).contains(&wait), "{wait}");
    }
}

#[tokio::test]
async fn a_429_pauses_the_destination_and_gives_back_what_was_claimed_ahead() {
    let provider = Provider::start().await;
    provider.then(Reply::status(429).header("retry-after", "30"));
    let (settings, store) = outbox(&webhook(
        "crm",
        &provider.url("/h"),
        ", batch_size=1, concurrency=1",
    ));
    let ids = enqueue(
        &store,
        &[
            ("crm", "1", customer_event(1, "1", 1, None), false, "5000"),
            ("crm", "2", customer_event(2, "2", 1, None), false, "5000"),
            ("crm", "3", customer_event(3, "3", 1, None), false, "5000"),
        ],
    );
    let mut w = worker(&settings, &store, 0);
    let report = w
        .drain(&tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.claimed, report.retried), (1, 1));
    assert_eq!(provider.seen().len(), 1, "nothing more sent while paused");
    for id in &ids[1..] {
        let r = row(&store, *id).await;
        assert_eq!(
            (r.attempts, r.locked_until),
            (0, None),
            "row {id} given back"
        );
    }
}

#[tokio::test]
async fn akinon_subscribe_user_reaches_the_webhook_with_its_contact_view() {
    use crate::akinon::{akinon_app, post, USER_EXAMPLE};
    let provider = Provider::start().await;
    let list = format!("[{}]", webhook("crm", &provider.url("/hooks"), ""));
    let app = akinon_app(&[
        ("delivery.enabled", "false"),
        ("destinations", list.as_str()),
    ])
    .await;
    let r = post(&app, "/subscribe-user", USER_EXAMPLE, "req-outbound-1").await;
    assert_eq!(r.status(), 200);
    // A retried call changes nothing, so nothing more is delivered.
    let r = post(&app, "/subscribe-user", USER_EXAMPLE, "req-outbound-1").await;
    assert_eq!(r.status(), 200);
    // Driven by hand: the first step sends the one row, the next finds nothing to claim.
    let mut w = worker(&app.settings, &app.store(), 0);
    let first = w.step().await.unwrap();
    assert_eq!((first.claimed, first.delivered), (1, 1), "{first:?}");
    assert!(
        w.step().await.unwrap().is_idle(),
        "one real change, one row"
    );
    let seen = provider.seen();
    assert_eq!(seen.len(), 1, "one real change, one delivery");
    verify_signature(&seen[0]);
    let event = seen[0].json();
    assert_eq!(event["type"], "user.changed");
    assert_eq!(event["source"], "akinon");
    assert_eq!(event["entity"], "1");
    assert_eq!(
        event["data"]["username"], "username",
        "unknown fields travel too"
    );
    let consent = |state: &str, address: &str| {
        json!({"state": state, "address": address, "at": "2024-06-01T00:00:00.000Z",
               "source": "akinon"})
    };
    assert_eq!(
        event["contact"],
        json!({"email": "user@example.com", "phone": "05351234567",
               "phone_e164": "+905351234567", "first_name": "Test", "last_name": "User",
               "birth_date": "1990-01-01", "gender": "male", "opt_in": true,
               "consent": {
                   "email": consent("opted_in", "user@example.com"),
                   "sms": consent("opted_in", "+905351234567"),
                   "call": consent("opted_in", "+905351234567"),
                   "whatsapp": consent("opted_out", "+905351234567")}})
    );
    assert_eq!(event["record"], "akinon:user:1");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn answers_are_recorded_when_the_transaction_that_also_claims_fails() {
    let provider = Provider::start().await;
    let (settings, inner) = outbox(&webhook(
        "crm",
        &provider.url("/h"),
        ", batch_size=2, concurrency=1",
    ));
    let rows: Vec<_> = (1..=6)
        .map(|i| {
            let entity = format!("E{i}");
            (
                "crm",
                "E",
                customer_event(i, &entity, 1, None),
                false,
                "0,0",
            )
        })
        .collect();
    // One ordering key: each row waits for the one before, so every answer is recorded
    // together with the claim of the next.
    let ids = enqueue(&inner, &rows);
    let failing = Arc::new(HookedStore::new(inner.clone()).failing_one_record_then_claim());
    let store: Arc<dyn Store> = failing.clone();
    let mut w = worker(&settings, &store, 0);
    let stop = tokio_util::sync::CancellationToken::new();
    for _ in 0..10 {
        // As `serve` does, a failed drain is simply run again.
        let _ = w.drain(&stop).await;
        if inner.delivery_stats("crm").unwrap().pending == 0 {
            break;
        }
    }
    assert!(
        failing.record_then_claim_failed(),
        "the failure was injected"
    );
    for id in &ids {
        let r = row(&inner, *id).await;
        assert_eq!(
            (r.state, r.attempts),
            (DeliveryState::Delivered, 1),
            "row {id}"
        );
        assert_eq!(attempts(&inner, *id).await.len(), 1, "row {id}");
    }
    assert_eq!(provider.seen().len(), 6, "nothing sent twice");
}
