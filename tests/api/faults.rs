//! The fault suite: a full disk, an unreachable PostgreSQL, PostgreSQL backends terminated under
//! two instances, a misbehaving webhook and a kill -9 with requests in flight. Each case ends
//! with exact counts: every message published (in a committed transaction) is stored exactly
//! once or dead-lettered with its reason, nothing else. The kill -9 and broker-close rounds are
//! in `resilience.rs`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use amqprs::BasicProperties;
use serde_json::{json, Value};
use subgate::store::{DeliveryState, Store};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    akinon,
    delivery::{webhook, Provider, Reply},
    erp::ErpQueues,
    helpers::{eventually, header, query, temp_dir, test_settings, Broker},
    resilience::Subgate,
    store_conformance::fresh_postgres_database,
};

/// `good` customers and `bad` undecodable messages, the bad ones spread through the stream.
fn backlog(prefix: &str, good: usize, bad: usize) -> Vec<(Vec<u8>, BasicProperties)> {
    let mut out = Vec::with_capacity(good + bad);
    let every = good / bad.max(1);
    let mut bad_left = bad;
    for i in 0..good {
        out.push((
            json!({ "id": format!("{prefix}{i}"), "status": "Active",
                    "name": format!("Müşteri {i}"),
                    "contactMedium": [{ "characteristic": { "phoneNumber": format!("53{i:08}") } }] })
            .to_string()
            .into_bytes(),
            BasicProperties::default(),
        ));
        if bad_left > 0 && (i + 1) % every.max(1) == 0 {
            out.push((
                format!("not json {bad_left}").into_bytes(),
                BasicProperties::default(),
            ));
            bad_left -= 1;
        }
    }
    out
}

/// Inbox events of the ERP source. A read whose connection a test terminated is read again
/// (the store opens a new connection).
async fn erp_events(store: Arc<dyn Store>) -> i64 {
    query(store, |s| {
        let mut last = None;
        for _ in 0..5 {
            match s.inbox_stats(Some("erp")) {
                Ok(stats) => return stats.events,
                Err(e) => last = Some(e),
            }
        }
        panic!("inbox stats: {last:?}")
    })
    .await
}

/// Every good message of the backlog is stored exactly once: one inbox event and one record at
/// version 1 each.
async fn assert_stored_exactly_once(store: Arc<dyn Store>, prefix: &str, good: usize) {
    let prefix = prefix.to_owned();
    let (events, distinct, versions) = query(store, move |s| {
        let stats = s.inbox_stats(Some("erp")).expect("stats");
        let versions: Vec<Option<i64>> = (0..good)
            .map(|i| {
                s.get_record("erp.customer", &format!("{prefix}{i}"))
                    .expect("read")
                    .map(|r| r.version)
            })
            .collect();
        (stats.events, stats.distinct_dedupe_keys, versions)
    })
    .await;
    let missing = versions.iter().filter(|v| v.is_none()).count();
    let twice = versions.iter().filter(|v| **v > Some(1)).count();
    assert_eq!(
        (events, distinct, missing, twice),
        (good as i64, good as i64, 0, 0),
        "one inbox event per good message; none lost, none applied twice"
    );
}

/// Wait until every good message is stored, the queue is empty and the gateway is ready again.
async fn drained_and_ready(
    store: &Arc<dyn Store>,
    broker: &Broker,
    queues: &ErpQueues,
    good: usize,
    client: &reqwest::Client,
    gateway: &Subgate,
) {
    eventually(120, "the whole backlog stored", || async {
        (erp_events(store.clone()).await >= good as i64
            && broker.message_count(&queues.customers).await == 0)
            .then_some(())
    })
    .await;
    eventually(30, "ready again", || async {
        (readyz(client, gateway).await.0 == 200).then_some(())
    })
    .await;
}

/// The end of every case: each good message stored exactly once, each bad one dead-lettered as
/// `not_json` with subgate's reason, nothing else; then the queues are deleted. The store is
/// dropped off the runtime (a PostgreSQL client must not be).
async fn assert_final_counts(
    store: Arc<dyn Store>,
    broker: &Broker,
    queues: &ErpQueues,
    prefix: &str,
    good: usize,
    bad: usize,
) {
    assert_stored_exactly_once(store.clone(), prefix, good).await;
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
    let dead = drain_dead_letters(broker, &format!("{}.dead", queues.customers)).await;
    assert_eq!(
        dead,
        vec!["not_json".to_owned(); bad],
        "only the bad messages"
    );
    broker.delete_queues(&queues.all()).await;
}

/// Open a store of `settings` off the runtime.
async fn open_store_off_runtime(
    settings: subgate::config::Settings,
    migrate: bool,
) -> Arc<dyn Store> {
    tokio::task::spawn_blocking(move || {
        subgate::startup::open_store(&settings, migrate).expect("store")
    })
    .await
    .unwrap()
}

/// Drain a dead-letter queue; every message must carry subgate's reason (none the broker's own
/// `delivery_limit`). Returns the reason codes.
async fn drain_dead_letters(broker: &Broker, queue: &str) -> Vec<String> {
    let mut codes = Vec::new();
    while let Some((props, body)) = broker.get(queue).await {
        let code = header(&props, "x-subgate-error-code").unwrap_or_else(|| {
            panic!(
                "a dead letter without x-subgate-error ({:?}): {}",
                header(&props, "x-first-death-reason"),
                String::from_utf8_lossy(&body)
            )
        });
        codes.push(code);
    }
    codes
}

async fn readyz(client: &reqwest::Client, gateway: &Subgate) -> (u16, Value) {
    match client.get(gateway.url("/readyz")).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({ "error": e.to_string() })),
    }
}

fn reasons(body: &Value) -> Vec<String> {
    body["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of one Prometheus sample line (`name{labels} value`), 0 when absent.
async fn metric(client: &reqwest::Client, gateway: &Subgate, sample: &str) -> f64 {
    let text = client
        .get(gateway.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A small tmpfs mounted for one test (needs root or CAP_SYS_ADMIN); unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(prefix: &str, megabytes: u32) -> Option<Self> {
        let dir = temp_dir(prefix);
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Tmpfs { dir })
    }

    /// Fill the file system to ENOSPC, appending to one file; returns it. Called again, it takes
    /// what was freed meanwhile (SQLite truncating its WAL).
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("filler file");
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if let Err(e) = file.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(28), "filled to ENOSPC: {e}");
                break;
            }
        }
        // Whatever fits in the last partial chunk, byte by byte through a smaller buffer.
        let _ = file.write_all(&chunk[..4096]);
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn store_at(dir: &Path, overrides: &[(&str, &str)]) -> Arc<dyn Store> {
    subgate::startup::open_store(&test_settings(dir, overrides), true).expect("store")
}

#[tokio::test]
async fn a_full_disk_for_30_s_dead_letters_nothing_and_subgate_resumes_by_itself() {
    let Some(disk) = Tmpfs::mount("enospc", 16) else {
        eprintln!(
            "SKIPPED a_full_disk_for_30_s_…: a tmpfs cannot be mounted here (needs root or \
             CAP_SYS_ADMIN); run the suite as root to include it"
        );
        return;
    };
    const GOOD: usize = 1_500;
    const BAD: usize = 10;
    let queues = ErpQueues::new();
    // A delivery limit of 2: a single redelivery per message would already dead-letter it.
    let overrides = queues.overrides(&[
        ("amqp.prefetch", "50"),
        ("amqp.delivery_limit", "2"),
        ("ingest.store_retry_ms", "200"),
        ("ingest.store_retry_max_ms", "1000"),
        ("akinon.username", akinon::USER),
        ("akinon.password", akinon::PASSWORD),
    ]);
    let gateway = Subgate::start(&disk.dir, &overrides);
    gateway.wait_ready().await;
    let store = store_at(&disk.dir, &overrides);
    let filler = disk.fill();

    let broker = Broker::connect().await;
    broker
        .publish_all(&queues.customers, backlog("full", GOOD, BAD))
        .await;
    let client = reqwest::Client::new();
    let body = eventually(60, "readyz names the full disk", || async {
        let (status, body) = readyz(&client, &gateway).await;
        (status == 503
            && reasons(&body)
                .iter()
                .any(|r| r.starts_with("store: disk full")))
        .then_some(body)
    })
    .await;
    assert_eq!(body["components"]["store"]["ready"], false, "{body}");
    // An HTTP call is tried once: a small commit may still fit where the WAL has room; if it
    // does not, the answer is 503 with Retry-After, for Akinon to call again.
    let answer = client
        .post(gateway.url("/subscribe-email"))
        .basic_auth(akinon::USER, Some(akinon::PASSWORD))
        .header("x-akinon-request-id", "full-disk-1")
        .header("x-akinon-api-version", "2")
        .header("content-type", "application/json")
        .body(akinon::EMAIL_EXAMPLE)
        .send()
        .await
        .expect("akinon call");
    match answer.status().as_u16() {
        200 => {}
        503 => assert_eq!(
            answer.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"5"[..])
        ),
        other => panic!("an Akinon call during the outage answered {other}"),
    }

    // Thirty seconds of full disk, kept full (what SQLite frees by truncating its WAL is taken
    // again). A small commit can still fit now and then in the WAL's own pages, so readiness
    // may flicker; most of the time it says why not.
    let until = Instant::now() + Duration::from_secs(30);
    let (mut samples, mut not_ready) = (0, 0);
    while Instant::now() < until {
        disk.fill();
        samples += 1;
        if readyz(&client, &gateway).await.0 == 503 {
            not_ready += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        not_ready * 2 > samples,
        "not ready in {not_ready} of {samples} samples while the disk was full"
    );
    assert!(
        metric(
            &client,
            &gateway,
            "subgate_commit_failures_total{reason=\"disk full\"}"
        )
        .await
            > 0.0
    );
    assert_eq!(
        metric(&client, &gateway, "subgate_store_writable").await,
        0.0
    );
    let stored_during = erp_events(store.clone()).await;
    assert!(
        stored_during < GOOD as i64,
        "the outage held part of the backlog ({stored_during})"
    );

    std::fs::remove_file(&filler).expect("free the space");
    drained_and_ready(&store, &broker, &queues, GOOD, &client, &gateway).await;
    assert_eq!(
        metric(&client, &gateway, "subgate_store_writable").await,
        1.0
    );
    drop(gateway);
    assert_final_counts(store, &broker, &queues, "full", GOOD, BAD).await;
}

/// A TCP proxy in front of PostgreSQL that can be cut (connections dropped, new ones refused)
/// and restored on the same port.
struct CuttableProxy {
    port: u16,
    task: Mutex<Option<JoinHandle<()>>>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CuttableProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let proxy = CuttableProxy {
            port,
            task: Mutex::new(None),
            links: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let links = self.links.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links.lock().unwrap().push(link);
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Drop every connection and stop listening: connecting is refused.
    async fn cut(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
        // The aborted accept loop drops its listener at its next poll.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn restore(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind the proxy's port");
        self.serve(listener);
    }

    fn url(&self, database_url: &str) -> String {
        database_url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port))
    }
}

#[tokio::test]
async fn postgres_unreachable_for_a_while_dead_letters_nothing_and_readyz_says_why() {
    const GOOD: usize = 1_000;
    const BAD: usize = 5;
    let direct = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let proxy = CuttableProxy::start().await;
    let through = proxy.url(&direct);
    let queues = ErpQueues::new();
    let overrides = queues.overrides(&[
        ("store.url", through.as_str()),
        ("amqp.prefetch", "50"),
        ("amqp.delivery_limit", "2"),
        ("ingest.store_retry_ms", "200"),
        ("ingest.store_retry_max_ms", "1000"),
    ]);
    let dir = temp_dir("pg-outage");
    let gateway = Subgate::start(&dir, &overrides);
    gateway.wait_ready().await;
    let direct_overrides: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| {
            if *k == "store.url" {
                (*k, direct.as_str())
            } else {
                (*k, *v)
            }
        })
        .collect();
    let settings = test_settings(&dir, &direct_overrides);
    let store = open_store_off_runtime(settings, true).await;

    proxy.cut().await;
    let broker = Broker::connect().await;
    broker
        .publish_all(&queues.customers, backlog("pgout", GOOD, BAD))
        .await;
    let client = reqwest::Client::new();
    eventually(60, "readyz says PostgreSQL refuses connections", || async {
        let (status, body) = readyz(&client, &gateway).await;
        (status == 503
            && reasons(&body)
                .iter()
                .any(|r| r.starts_with("store: connection refused")))
        .then_some(())
    })
    .await;
    assert_eq!(
        erp_events(store.clone()).await,
        0,
        "nothing could be stored"
    );
    // Long enough for several backoff rounds (each at most a second).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        metric(
            &client,
            &gateway,
            "subgate_commit_failures_total{reason=\"connection refused\"}"
        )
        .await
            >= 2.0,
        "several failed attempts, counted by reason"
    );

    proxy.restore().await;
    drained_and_ready(&store, &broker, &queues, GOOD, &client, &gateway).await;
    drop(gateway);
    assert_final_counts(store, &broker, &queues, "pgout", GOOD, BAD).await;
}

#[tokio::test]
async fn postgres_backends_terminated_five_times_under_two_instances_lose_and_duplicate_nothing() {
    const GOOD: usize = 6_000;
    const BAD: usize = 10;
    let url = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let database = url.rsplit('/').next().unwrap_or_default().to_owned();
    let queues = ErpQueues::new();
    let overrides = queues.overrides(&[
        ("store.url", url.as_str()),
        ("amqp.prefetch", "100"),
        ("amqp.delivery_limit", "2"),
        ("ingest.batch_wait_ms", "20"),
        ("ingest.store_retry_ms", "100"),
        ("ingest.store_retry_max_ms", "1000"),
    ]);
    let dir = temp_dir("pg-terminate");
    let settings = test_settings(&dir, &overrides);
    let store = open_store_off_runtime(settings, true).await;
    let instances = [
        Subgate::start(&dir, &overrides),
        Subgate::start(&dir, &overrides),
    ];
    for instance in &instances {
        instance.wait_ready().await;
    }
    let broker = Broker::connect().await;
    broker
        .publish_all(&queues.customers, backlog("pgt", GOOD, BAD))
        .await;

    let mut terminated = 0;
    for round in 1..=5 {
        let threshold = (round * GOOD / 7) as i64;
        eventually(120, "progress before the next termination", || async {
            (erp_events(store.clone()).await >= threshold).then_some(())
        })
        .await;
        let name = database.clone();
        terminated += tokio::task::spawn_blocking(move || {
            let mut admin = postgres::Client::connect(
                "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                postgres::NoTls,
            )
            .expect("admin connection");
            admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&name],
                )
                .expect("terminate")
                .len()
        })
        .await
        .unwrap();
    }
    assert!(
        erp_events(store.clone()).await < GOOD as i64,
        "the terminations happened mid-stream"
    );
    assert!(terminated >= 5, "backends were terminated ({terminated})");

    eventually(180, "the whole backlog stored", || async {
        (erp_events(store.clone()).await >= GOOD as i64
            && broker.message_count(&queues.customers).await == 0)
            .then_some(())
    })
    .await;
    drop(instances);
    // The test's own store handle was terminated too; a new one reads the result.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
    let settings = test_settings(&dir, &overrides);
    let store = open_store_off_runtime(settings, false).await;
    assert_final_counts(store, &broker, &queues, "pgt", GOOD, BAD).await;
}

#[tokio::test]
async fn a_webhook_answering_500_then_hanging_then_429_then_200_and_a_kill_9_in_flight_delivers_each_row(
) {
    let provider = Provider::start().await;
    // Row 1: 500, then a hang past the 1 s timeout, then 429 with Retry-After, then 200.
    provider
        .then(Reply::status(500))
        .then(Reply::status(200).delay(Duration::from_secs(3)))
        .then(Reply::status(429).header("retry-after", "1"))
        .then(Reply::status(200));
    let queues = ErpQueues::new();
    let list = format!(
        "[{}]",
        webhook(
            "crm",
            &provider.url("/hook"),
            r#", retry_schedule=["200ms", "200ms", "200ms", "200ms"]"#
        )
    );
    let overrides = queues.overrides(&[
        ("destinations", list.as_str()),
        ("delivery.poll_interval", "50ms"),
        ("delivery.jitter_percent", "0"),
        ("delivery.lease", "3s"),
    ]);
    let dir = temp_dir("webhook-faults");
    let mut gateway = Subgate::start(&dir, &overrides);
    gateway.wait_ready().await;
    let store = store_at(&dir, &overrides);
    let broker = Broker::connect().await;
    broker
        .publish(
            &queues.customers,
            br#"{"id":"w1","status":"Active","name":"Ayse Yilmaz"}"#,
        )
        .await;
    let rows = |store: Arc<dyn Store>| async move {
        query(store, |s| {
            s.list_deliveries(&subgate::store::DeliveryFilter {
                limit: 100,
                ..Default::default()
            })
            .expect("deliveries")
        })
        .await
    };
    eventually(60, "row 1 delivered after 500, timeout, 429", || async {
        let rows = rows(store.clone()).await;
        (rows.len() == 1 && rows[0].state == DeliveryState::Delivered).then_some(())
    })
    .await;
    let first = rows(store.clone()).await.remove(0);
    assert_eq!(first.attempts, 4, "500, timeout, 429, 200");
    assert_eq!(provider.seen().len(), 4);

    // Row 2: the request hangs; subgate is killed while it is in flight.
    provider.then(Reply::status(200).delay(Duration::from_secs(30)));
    broker
        .publish(
            &queues.customers,
            br#"{"id":"w2","status":"Active","name":"Mehmet Oz"}"#,
        )
        .await;
    eventually(30, "row 2's request in flight", || async {
        (provider.seen().len() == 5).then_some(())
    })
    .await;
    gateway.kill_9();
    let second = Subgate::start(&dir, &overrides);
    second.wait_ready().await;
    eventually(
        60,
        "row 2 delivered by the restarted process after its lease",
        || async {
            let rows = rows(store.clone()).await;
            (rows.len() == 2 && rows.iter().all(|r| r.state == DeliveryState::Delivered))
                .then_some(())
        },
    )
    .await;
    drop(second);
    let seen = provider.seen();
    let ids: Vec<String> = seen.iter().map(|s| s.header("webhook-id")).collect();
    assert_eq!(seen.len(), 6, "row 2 sent once more after the takeover");
    assert_eq!(
        ids[4], ids[5],
        "the same event id, for the receiver to dedupe"
    );
    assert_eq!(
        ids.iter().filter(|id| **id == ids[0]).count(),
        4,
        "row 1: four attempts"
    );
    broker.delete_queues(&queues.all()).await;
}
