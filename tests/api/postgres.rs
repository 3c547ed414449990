//! Scale-out on PostgreSQL: the ERP pipeline end to end on the shared database, and several
//! instances competing for one RabbitMQ queue pair while one of them is killed.

use amqprs::BasicProperties;
use serde_json::json;
use subgate::store::{DeliveryFilter, DeliveryState, OutboxRow, Store};

use crate::{
    delivery::{webhook, Provider, Reply},
    erp::{customer_version, ErpQueues, CUSTOMER_SEED},
    helpers::{eventually, query, spawn_app, temp_dir, test_settings, Broker},
    resilience::Subgate,
    store_conformance::{
        claim, fresh_postgres_database, fresh_store, queue_one_per_entity, Backend,
    },
};

#[tokio::test]
async fn erp_seed_on_postgres_produces_the_documented_state() {
    let url = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let queues = ErpQueues::new();
    let app = spawn_app(&queues.overrides(&[("store.url", url.as_str())])).await;
    app.wait_ready().await;
    let broker = Broker::connect().await;
    broker
        .publish(&queues.customers, CUSTOMER_SEED.as_bytes())
        .await;
    broker
        .publish(&queues.customers, CUSTOMER_SEED.as_bytes())
        .await;
    let body = customer_version(&app, "134719", 1).await;
    assert_eq!(
        body["state"]["contact_medium"][0]["characteristic"]["city"],
        "İSTANBUL(Anadolu)"
    );
    let stats = eventually(20, "both deliveries handled", || async {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let handled = text.contains(&format!(
            "subgate_received_total{{queue=\"{}\"}} 2",
            queues.customers
        ));
        let drained = broker.message_count(&queues.customers).await == 0;
        (handled && drained).then_some(())
    });
    stats.await;
    let inbox = query(app.store(), |s| s.inbox_stats(Some("erp")).unwrap()).await;
    assert_eq!(
        inbox.events, 1,
        "the identical second snapshot is a duplicate"
    );
    app.stop().await.unwrap();
    broker.delete_queues(&queues.all()).await;
}

const CUSTOMERS: usize = 20_000;
const SUBSCRIPTIONS: usize = 10_000;

fn customer(i: usize) -> Vec<u8> {
    json!({ "id": format!("pc{i}"), "status": "Active", "name": format!("Müşteri {i}") })
        .to_string()
        .into_bytes()
}

fn subscription(i: usize) -> Vec<u8> {
    json!({
        "id": format!("ps{i}"), "status": "Active", "agreementType": "Kiralama",
        "engagedParty": [{ "id": format!("pc{}", i % CUSTOMERS) }],
        "characteristic": [{ "name": "CAMPAIGN", "valueType": "String", "value": "24 AY TAAHHÜTLÜ" }]
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn three_instances_with_one_killed_store_30000_messages_exactly_once_and_deliver_every_row() {
    let provider = Provider::start().await;
    let url = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let queues = ErpQueues::new();
    let list = format!("[{}]", webhook("crm", &provider.url("/h"), ""));
    let overrides = queues.overrides(&[
        ("store.url", url.as_str()),
        ("destinations", list.as_str()),
        ("delivery.poll_interval", "50ms"),
        // The killed instance's leases come back quickly.
        ("delivery.lease", "3s"),
    ]);
    let dir = temp_dir("pg-instances");
    let settings = test_settings(&dir, &overrides);
    let store =
        tokio::task::spawn_blocking(move || subgate::startup::open_store(&settings, true).unwrap())
            .await
            .unwrap();

    let mut instances: Vec<Subgate> = (0..3).map(|_| Subgate::start(&dir, &overrides)).collect();
    for instance in &instances {
        instance.wait_ready().await;
    }
    let broker = Broker::connect().await;
    let none = BasicProperties::default;
    broker
        .publish_all(
            &queues.customers,
            (0..CUSTOMERS).map(|i| (customer(i), none())).collect(),
        )
        .await;
    broker
        .publish_all(
            &queues.subscriptions,
            (0..SUBSCRIPTIONS)
                .map(|i| (subscription(i), none()))
                .collect(),
        )
        .await;

    let events = |store: std::sync::Arc<dyn Store>| async move {
        query(store, |s| s.inbox_stats(Some("erp")).unwrap()).await
    };
    eventually(120, "a part of the stream committed", || async {
        (events(store.clone()).await.events > 3_000).then_some(())
    })
    .await;
    instances[0].kill_9();
    assert!(
        events(store.clone()).await.events < (CUSTOMERS + SUBSCRIPTIONS) as i64,
        "killed mid-stream"
    );
    instances[0] = Subgate::start(&dir, &overrides);
    instances[0].wait_ready().await;

    eventually(240, "every message", || async {
        let done = events(store.clone()).await.events >= (CUSTOMERS + SUBSCRIPTIONS) as i64;
        let drained = broker.message_count(&queues.customers).await == 0
            && broker.message_count(&queues.subscriptions).await == 0;
        (done && drained).then_some(())
    })
    .await;
    let rows = eventually(240, "every outbox row delivered", || {
        let store = store.clone();
        async move {
            let rows = all_deliveries(store).await;
            (rows.len() == CUSTOMERS + SUBSCRIPTIONS
                && rows.iter().all(|r| r.state == DeliveryState::Delivered))
            .then_some(rows)
        }
    })
    .await;
    drop(instances);
    // At least once: the receiver saw every row's event (the killed instance's in-flight rows
    // may have gone out twice).
    let seen: std::collections::HashSet<i64> = provider
        .seen()
        .iter()
        .map(|s| s.json()["inbox_id"].as_i64().unwrap())
        .collect();
    let lost = rows.iter().filter(|r| !seen.contains(&r.inbox_id)).count();
    assert_eq!(lost, 0, "no outbox row lost");

    let stats = events(store.clone()).await;
    assert_eq!(
        stats.events,
        (CUSTOMERS + SUBSCRIPTIONS) as i64,
        "one inbox event per message"
    );
    assert_eq!(stats.distinct_dedupe_keys, stats.events);
    let versions = query(store, |s| {
        let mut v: Vec<Option<i64>> = (0..CUSTOMERS)
            .map(|i| {
                s.get_record("erp.customer", &format!("pc{i}"))
                    .unwrap()
                    .map(|r| r.version)
            })
            .collect();
        v.extend((0..SUBSCRIPTIONS).map(|i| {
            s.get_record("erp.subscription", &format!("ps{i}"))
                .unwrap()
                .map(|r| r.version)
        }));
        v
    })
    .await;
    let missing = versions.iter().filter(|v| v.is_none()).count();
    let twice = versions.iter().filter(|v| **v > Some(1)).count();
    assert_eq!((missing, twice), (0, 0), "none lost, none applied twice");
    broker.delete_queues(&queues.all()).await;
}

/// Every outbox row, oldest first.
async fn all_deliveries(store: std::sync::Arc<dyn Store>) -> Vec<OutboxRow> {
    query(store, |s| {
        let mut rows = Vec::new();
        loop {
            let page = s
                .list_deliveries(&DeliveryFilter {
                    after_id: rows.last().map(|r: &OutboxRow| r.id),
                    limit: 1_000,
                    ..DeliveryFilter::default()
                })
                .unwrap();
            if page.is_empty() {
                return rows;
            }
            rows.extend(page);
        }
    })
    .await
}

/// `subgate_delivery_attempts_total{destination, outcome="delivered"}` of one instance.
async fn delivered_by(instance: &Subgate, destination: &str) -> u64 {
    let text = reqwest::get(instance.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!(
        "subgate_delivery_attempts_total{{destination=\"{destination}\",outcome=\"delivered\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn two_instances_deliver_each_outbox_row_once_in_per_entity_order() {
    const ENTITIES: usize = 30;
    const VERSIONS: usize = 10;
    let provider = Provider::start().await;
    // Slow enough that both instances have rows in flight at once.
    provider.by_default(Reply::status(200).delay(std::time::Duration::from_millis(10)));
    let url = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let queues = ErpQueues::new();
    let list = format!(
        "[{}]",
        webhook("crm", &provider.url("/h"), ", concurrency=2, batch_size=4")
    );
    let overrides = queues.overrides(&[
        ("store.url", url.as_str()),
        ("destinations", list.as_str()),
        ("delivery.poll_interval", "20ms"),
    ]);
    let dir = temp_dir("pg-outbox");
    let settings = test_settings(&dir, &overrides);
    let store =
        tokio::task::spawn_blocking(move || subgate::startup::open_store(&settings, true).unwrap())
            .await
            .unwrap();
    let instances: Vec<Subgate> = (0..2).map(|_| Subgate::start(&dir, &overrides)).collect();
    for instance in &instances {
        instance.wait_ready().await;
    }
    // Every customer changes VERSIONS times, interleaved; both instances consume and deliver.
    let broker = Broker::connect().await;
    let messages = (0..VERSIONS)
        .flat_map(|v| {
            (0..ENTITIES).map(move |e| {
                let body = json!({ "id": format!("oc{e}"), "status": "Active", "name": format!("Ad {v}") });
                (body.to_string().into_bytes(), BasicProperties::default())
            })
        })
        .collect();
    broker.publish_all(&queues.customers, messages).await;

    let total = ENTITIES * VERSIONS;
    let rows = eventually(120, "every outbox row delivered", || {
        let store = store.clone();
        async move {
            let rows = all_deliveries(store).await;
            (rows.len() == total && rows.iter().all(|r| r.state == DeliveryState::Delivered))
                .then_some(rows)
        }
    })
    .await;
    let by_instance = [
        delivered_by(&instances[0], "crm").await,
        delivered_by(&instances[1], "crm").await,
    ];
    // Both instances stop cleanly: whatever they had in flight is finished, so what the
    // receiver saw is final (no waiting for a duplicate that might still come).
    let mut instances = instances;
    for instance in &mut instances {
        instance.stop(30).await;
    }
    // And nothing is left to send: a worker's step claims nothing.
    let settings = test_settings(&dir, &overrides);
    let mut worker =
        subgate::delivery::Worker::new(&settings, &settings.destinations[0], store.clone())
            .expect("worker");
    let report = worker.step().await.unwrap();
    assert!(report.is_idle(), "{report:?}");
    // It holds a handle of the synchronous PostgreSQL store: dropped off the runtime threads.
    tokio::task::spawn_blocking(move || drop(worker))
        .await
        .unwrap();
    let seen = provider.seen();
    assert_eq!(seen.len(), total, "each row delivered once");
    let attempts = query(store.clone(), {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        move |s| {
            ids.iter()
                .map(|id| s.delivery_attempts(*id).unwrap().len())
                .sum::<usize>()
        }
    })
    .await;
    assert_eq!(attempts, total, "one attempt per row");

    // Per entity, the receiver saw the rows in outbox (commit) order.
    let outbox_id: std::collections::HashMap<i64, i64> =
        rows.iter().map(|r| (r.inbox_id, r.id)).collect();
    for e in 0..ENTITIES {
        let entity = format!("oc{e}");
        let order: Vec<i64> = seen
            .iter()
            .map(|s| s.json())
            .filter(|event| event["entity"] == entity.as_str())
            .map(|event| outbox_id[&event["inbox_id"].as_i64().unwrap()])
            .collect();
        assert_eq!(order.len(), VERSIONS, "{entity}: every change");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "{entity}: delivered in commit order");
    }
    assert_eq!(by_instance.iter().sum::<u64>(), total as u64);
    assert!(
        by_instance.iter().all(|n| *n > 0),
        "both instances delivered: {by_instance:?}"
    );
    drop(instances);
    broker.delete_queues(&queues.all()).await;
    // The synchronous PostgreSQL client must not be dropped on a runtime thread.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
}

/// The plan of `sql` as run (`EXPLAIN (ANALYZE, {options} COSTS OFF)`), one line per item, in
/// a transaction rolled back afterwards (the statement's writes and locks are undone).
fn explain_analyze(
    client: &mut postgres::Client,
    options: &str,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Vec<String> {
    let mut tx = client.transaction().unwrap();
    let plan = tx
        .query(
            &format!("EXPLAIN (ANALYZE, {options} COSTS OFF) {sql}"),
            params,
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().unwrap();
    plan
}

/// Claiming probes each candidate's key whatever the planner's statistics say. With the outbox
/// analysed while it was empty (autovacuum lags behind a burst), the former `NOT EXISTS` guard
/// was planned as a scan of every pending row per candidate: 302,000 buffers and 0.9 s to claim
/// 128 of 11,000 rows, so three instances took minutes to deliver a 30,000-row backlog.
#[test]
fn claiming_from_a_backlog_reads_few_pages_even_with_statistics_from_an_empty_outbox() {
    let (store, url) = fresh_store(Backend::Postgres);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute("ALTER TABLE outbox SET (autovacuum_enabled = false); ANALYZE outbox")
        .unwrap();
    queue_one_per_entity(&store, "crm", "erp", 11_000);

    let now = 1_000_000i64;
    let plan = explain_analyze(
        &mut client,
        "BUFFERS,",
        subgate::store::postgres::CLAIM_CANDIDATES,
        &[&"crm", &now, &128i64],
    );
    let text = plan.join("\n");
    assert!(
        text.contains("rows=128 loops=1"),
        "128 rows claimed:\n{text}"
    );
    // The top node's buffers: every page the claim touched.
    let buffers: u64 = plan
        .iter()
        .find_map(|line| line.trim().strip_prefix("Buffers: shared "))
        .map(|counts| {
            counts
                .split(' ')
                .filter_map(|c| c.split_once('=')?.1.parse::<u64>().ok())
                .sum()
        })
        .expect("a Buffers line");
    assert!(
        buffers < 5_000,
        "the claim read {buffers} buffers; its plan:\n{text}"
    );

    let claimed = store
        .claim_deliveries(&claim("crm", "w1", now, 128))
        .unwrap();
    assert_eq!(claimed.len(), 128);
    assert_eq!(claimed[0].entity, "erp:0");
}

/// A retention chunk reads what it purges, not the whole outbox: the payload check was planned
/// as a hash anti-join over every outbox row, once per chunk (so purging a large outbox took time
/// quadratic in its size). 20,000 rows: `ANALYZE` reads them all (it samples 30,000), so the
/// statistics, and the plan, are the same every run. Other tables may be scanned at this size;
/// the payload check must not scan the outbox.
#[test]
fn a_retention_chunk_probes_the_outbox_per_payload_instead_of_reading_all_of_it() {
    let (store, url) = fresh_store(Backend::Postgres);
    drop(store);
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute(
            "INSERT INTO outbox_payloads (id, payload) SELECT g, '{}' FROM generate_series(1, 20000) g;
             INSERT INTO outbox (destination, source, kind, entity, inbox_id, payload_id, schedule,
                                 created_at, next_attempt_at, state, finished_at)
               SELECT 'crm', 'erp', 'customer.changed', 'erp:' || g, g, g, '5000', 1, 1,
                      'delivered', 10
               FROM generate_series(1, 20000) g;
             INSERT INTO delivery_attempts (outbox_id, destination, attempt, started_at, latency_ms, outcome)
               SELECT g, 'crm', 1, 1, 1, 'delivered' FROM generate_series(1, 20000) g;
             ANALYZE",
        )
        .unwrap();
    let plan = explain_analyze(
        &mut client,
        "",
        subgate::store::postgres::PURGE_FINISHED,
        &[&100i64, &2_000i64],
    );
    let text = plan.join("\n");
    // The payload check probes the outbox per payload (the old anti-join read all of it).
    assert!(
        !text.contains("Seq Scan on outbox o ("),
        "a chunk of 2,000 reads the whole outbox:\n{text}"
    );
    assert!(
        text.contains("Delete on outbox_payloads p (actual time") && text.contains("rows=2000"),
        "the chunk purges 2,000 rows:\n{text}"
    );
}
