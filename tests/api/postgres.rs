//! Scale-out on PostgreSQL: the ERP pipeline end to end on the shared database, and several
//! instances competing for one RabbitMQ queue pair while one of them is killed.

use amqprs::BasicProperties;
use serde_json::json;
use subgate::store::Store;

use crate::{
    erp::{customer_version, ErpQueues, CUSTOMER_SEED},
    helpers::{eventually, query, spawn_app, temp_dir, test_settings, Broker},
    resilience::Subgate,
    store_conformance::fresh_postgres_database,
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
async fn three_instances_with_one_killed_store_30000_messages_exactly_once() {
    let url = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let queues = ErpQueues::new();
    let overrides = queues.overrides(&[("store.url", url.as_str())]);
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
    drop(instances);

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
