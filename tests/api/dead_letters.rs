//! Inbound dead letters: `subgate dead-letters list|replay` and `/api/v1/dead-letters`, against
//! the real broker, each test with its own ERP queues.

use std::process::Output;

use amqprs::{channel::QueueDeclareArguments, BasicProperties, FieldTable, FieldValue};
use serde_json::{json, Value};

use crate::{
    erp::{erp_app, ErpQueues},
    helpers::{eventually, header, spawn_app, Broker, TestApp},
};

/// `subgate dead-letters …` with a configuration that consumes `queues`.
fn cli(queues: &ErpQueues, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_subgate"))
        .arg("dead-letters")
        .args(args)
        .env("SUBGATE__ERP__ENABLED", "true")
        .env("SUBGATE__ERP__CUSTOMER_QUEUE", &queues.customers)
        .env("SUBGATE__ERP__SUBSCRIPTION_QUEUE", &queues.subscriptions)
        .env("SUBGATE__LOG__LEVEL", "warn")
        .output()
        .expect("subgate runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn listed(queues: &ErpQueues, queue: &str) -> Vec<Value> {
    let o = cli(queues, &["list", "--queue", queue, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn dead(queues: &ErpQueues) -> String {
    format!("{}.dead", queues.customers)
}

fn with_headers(message_id: Option<&str>, headers: &[(&str, &str)]) -> BasicProperties {
    let mut table = FieldTable::new();
    for (k, v) in headers {
        table.insert((*k).try_into().unwrap(), FieldValue::from((*v).to_owned()));
    }
    let mut props = BasicProperties::default();
    props.with_headers(table).with_timestamp(1_700_000_000);
    if let Some(id) = message_id {
        props.with_message_id(id);
    }
    props
}

/// The header names, without the broker's own `x-delivery-count` (quorum queues set it).
fn header_names(props: &BasicProperties) -> Vec<String> {
    let mut names: Vec<String> = props
        .headers()
        .map(|t| t.as_ref().keys().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    names.retain(|n| n != "x-delivery-count");
    names.sort();
    names
}

const EXPECTED_HEADERS: [&str; 6] = [
    "x-subgate-error",
    "x-subgate-error-code",
    "x-subgate-queue",
    "x-subgate-replayed",
    "x-subgate-routing-key",
    "x-trace",
];

/// The integer value of a header.
fn int_header(props: &BasicProperties, name: &str) -> Option<i64> {
    let value = props.headers()?.get(&name.try_into().ok()?)?;
    match value {
        FieldValue::l(v) => Some(*v),
        FieldValue::I(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// Three rejected messages in the customer queue's dead-letter queue, in this order: not JSON
/// with a message-id and a header of its own, not an object, no id.
async fn three_dead_letters(broker: &Broker, queues: &ErpQueues) -> Vec<Vec<u8>> {
    let bodies = vec![
        b"{not json".to_vec(),
        b"[1,2,3]".to_vec(),
        br#"{"status":"Active"}"#.to_vec(),
    ];
    broker
        .publish_with(
            &queues.customers,
            &bodies[0],
            with_headers(Some("bad-1"), &[("x-trace", "t-1")]),
        )
        .await;
    broker.publish(&queues.customers, &bodies[1]).await;
    broker.publish(&queues.customers, &bodies[2]).await;
    let dlq = dead(queues);
    eventually(20, "three dead letters", || async {
        (broker.message_count(&dlq).await == 3).then_some(())
    })
    .await;
    bodies
}

#[tokio::test]
async fn list_shows_each_dead_letter_with_its_reason_and_leaves_the_queue_as_it_was() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    let bodies = three_dead_letters(&broker, &queues).await;
    // The broker's own dead-lettering too: a message that expires in a queue whose
    // dead-letter route is the customer queue's.
    let expiring = format!("{}.ttl", queues.customers);
    let mut args = FieldTable::new();
    args.insert("x-message-ttl".try_into().unwrap(), FieldValue::l(0));
    args.insert(
        "x-dead-letter-exchange".try_into().unwrap(),
        FieldValue::from("subgate.dlx".to_owned()),
    );
    args.insert(
        "x-dead-letter-routing-key".try_into().unwrap(),
        FieldValue::from(queues.customers.clone()),
    );
    broker
        .channel
        .queue_declare(
            QueueDeclareArguments::new(&expiring)
                .arguments(args)
                .finish(),
        )
        .await
        .unwrap();
    broker.publish(&expiring, br#"{"id":"9"}"#).await;
    let dlq = dead(&queues);
    eventually(20, "the expired message", || async {
        (broker.message_count(&dlq).await == 4).then_some(())
    })
    .await;

    let first = listed(&queues, &queues.customers);
    assert_eq!(first.len(), 4, "{first:?}");
    assert_eq!(first[0]["id"], "bad-1", "the message-id names it");
    assert!(
        first[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("not_json: "),
        "{first:?}"
    );
    assert_eq!(first[0]["code"], "not_json");
    assert_eq!(first[0]["routing_key"], queues.customers.as_str());
    assert_eq!(first[0]["size"], bodies[0].len());
    assert_eq!(first[0]["timestamp"], "2023-11-14T22:13:20.000Z");
    assert_eq!(first[0]["replayed"], 0);
    assert_eq!(
        first[1]["id"],
        subgate::dead_letters::content_id(&bodies[1]).as_str(),
        "without a message-id, the content names it"
    );
    assert_eq!(first[1]["code"], "not_an_object");
    assert_eq!(first[2]["code"], "missing_id");
    assert_eq!(first[3]["reason"], "expired", "the broker's reason");
    assert_eq!(first[3]["routing_key"], expiring.as_str());

    // Nothing was taken out: same depth, same messages in the same order, by either name.
    assert_eq!(broker.message_count(&dlq).await, 4);
    assert_eq!(listed(&queues, &dlq), first);
    let one = listed_text(
        &queues,
        &["list", "--queue", &queues.customers, "--limit", "1"],
    );
    assert!(one.starts_with("bad-1\t"), "{one}");
    assert!(
        one.ends_with(&format!("1 message(s) listed of 4 in {dlq}\n")),
        "{one}"
    );
    assert_eq!(broker.message_count(&dlq).await, 4);

    let unknown = cli(&queues, &["list", "--queue", "no-such-queue"]);
    assert_eq!(unknown.status.code(), Some(1));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("unknown queue \"no-such-queue\""), "{err}");

    app.stop().await.expect("clean shutdown");
    let mut all = queues.all();
    all.push(expiring);
    broker.delete_queues(&all).await;
}

fn listed_text(queues: &ErpQueues, args: &[&str]) -> String {
    let o = cli(queues, args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout(&o)
}

#[tokio::test]
async fn replay_by_id_moves_exactly_that_message_back_with_its_headers_and_all_moves_the_rest() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    let bodies = three_dead_letters(&broker, &queues).await;
    // Nobody consumes the source queue now: what a replay moves stays there to be looked at.
    app.stop().await.expect("clean shutdown");
    let dlq = dead(&queues);
    let second = subgate::dead_letters::content_id(&bodies[1]);

    let o = cli(
        &queues,
        &["replay", "--queue", &queues.customers, "--id", "bad-1"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        stdout(&o),
        format!("1 message(s) moved from {dlq} to {}\n", queues.customers)
    );
    assert_eq!(broker.message_count(&queues.customers).await, 1);
    assert_eq!(broker.message_count(&dlq).await, 2);
    let (props, body) = broker
        .get(&queues.customers)
        .await
        .expect("the replayed one");
    assert_eq!(body, bodies[0]);
    assert_eq!(props.message_id().map(String::as_str), Some("bad-1"));
    assert_eq!(props.timestamp(), Some(1_700_000_000));
    assert_eq!(header(&props, "x-trace").as_deref(), Some("t-1"));
    assert_eq!(
        header(&props, "x-subgate-error-code").as_deref(),
        Some("not_json")
    );
    assert!(header(&props, "x-subgate-error")
        .unwrap()
        .starts_with("not_json: "));
    assert_eq!(
        header(&props, "x-subgate-queue").as_deref(),
        Some(queues.customers.as_str())
    );
    assert_eq!(
        header(&props, "x-subgate-routing-key").as_deref(),
        Some(queues.customers.as_str())
    );
    assert_eq!(int_header(&props, "x-subgate-replayed"), Some(1));
    assert_eq!(
        header_names(&props),
        EXPECTED_HEADERS,
        "nothing else added or dropped"
    );

    // The others stay, in their order; an id given by the dead-letter queue's name works too.
    let left = listed(&queues, &dlq);
    let ids: Vec<&str> = left.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids[0], second);
    assert_eq!(ids.len(), 2);
    let o = cli(&queues, &["replay", "--queue", &dlq, "--id", "nope"]);
    assert!(o.status.success());
    assert!(
        stdout(&o).starts_with("0 message(s) moved"),
        "{}",
        stdout(&o)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("no message with id nope"));
    assert_eq!(broker.message_count(&dlq).await, 2);

    let o = cli(&queues, &["replay", "--queue", &queues.customers, "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout(&o).starts_with("2 message(s) moved"),
        "{}",
        stdout(&o)
    );
    assert_eq!(broker.message_count(&dlq).await, 0);
    assert_eq!(broker.message_count(&queues.customers).await, 2);
    for body in &bodies[1..] {
        let (props, got) = broker.get(&queues.customers).await.unwrap();
        assert_eq!(&got, body, "in their order");
        assert_eq!(int_header(&props, "x-subgate-replayed"), Some(1));
    }

    let usage = cli(&queues, &["replay", "--queue", &queues.customers]);
    assert_eq!(usage.status.code(), Some(2), "--all or --id is required");
    broker.delete_queues(&queues.all()).await;
}

#[tokio::test]
async fn a_replayed_message_rejected_again_returns_to_the_dead_letter_queue_counted_once() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    broker
        .publish_with(
            &queues.customers,
            b"{not json",
            with_headers(Some("bad-1"), &[("x-trace", "t-1")]),
        )
        .await;
    let dlq = dead(&queues);
    eventually(20, "the dead letter", || async {
        (broker.message_count(&dlq).await == 1).then_some(())
    })
    .await;

    // subgate consumes while it runs: the message is rejected again and comes back, with its
    // headers replaced (not duplicated) and the replay counted.
    let o = cli(&queues, &["replay", "--queue", &queues.customers, "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout(&o).starts_with("1 message(s) moved"),
        "{}",
        stdout(&o)
    );
    let back = eventually(20, "the message back in the dead-letter queue", || async {
        let l = listed(&queues, &dlq);
        (l.len() == 1 && l[0]["replayed"] == 1).then_some(l)
    })
    .await;
    assert_eq!(back[0]["id"], "bad-1");
    assert_eq!(back[0]["code"], "not_json");
    let (props, body) = broker.get(&dlq).await.unwrap();
    assert_eq!(body, b"{not json");
    assert_eq!(header(&props, "x-trace").as_deref(), Some("t-1"));
    assert_eq!(header_names(&props), EXPECTED_HEADERS);
    assert_eq!(broker.message_count(&queues.customers).await, 0);
    app.stop().await.expect("clean shutdown");
    broker.delete_queues(&queues.all()).await;
}

#[tokio::test]
async fn a_message_too_large_for_one_instance_is_stored_once_replayed_through_the_api() {
    let queues = ErpQueues::new();
    let small = spawn_app(&queues.overrides(&[("ingest.max_message_bytes", "100")])).await;
    small.wait_ready().await;
    let broker = Broker::connect().await;
    let big = format!(
        r#"{{"id":"4711","status":"Active","name":"{}"}}"#,
        "x".repeat(200)
    );
    let mut props = BasicProperties::default();
    props.with_message_id("erp-4711");
    broker
        .publish_with(&queues.customers, big.as_bytes(), props)
        .await;
    let dlq = dead(&queues);
    eventually(20, "the dead letter", || async {
        (broker.message_count(&dlq).await == 1).then_some(())
    })
    .await;
    small.stop().await.expect("clean shutdown");

    let app = spawn_app(&queues.overrides(&[("admin.token", "adm1n")])).await;
    app.wait_ready().await;
    let (status, listing) = admin_get(
        &app,
        &format!("/api/v1/dead-letters?queue={}&limit=10", queues.customers),
    )
    .await;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(listing["dead_letter_queue"], dlq.as_str());
    assert_eq!(listing["count"], 1);
    assert_eq!(listing["messages"][0]["id"], "erp-4711");
    assert_eq!(listing["messages"][0]["code"], "too_large");
    assert_eq!(broker.message_count(&dlq).await, 1);

    let (status, outcome) = admin_post(
        &app,
        json!({"queue": queues.customers, "ids": ["erp-4711"]}),
    )
    .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["moved"], 1);
    assert_eq!(outcome["not_found"], json!([]));
    let (_, customer) = eventually(20, "the replayed customer", || async {
        let (status, body) = app.get_json("/api/v1/erp/customers/4711").await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(customer["state"]["status"], "Active");
    assert_eq!(broker.message_count(&dlq).await, 0);

    // Nothing left: a second replay moves nothing.
    let (status, outcome) = admin_post(&app, json!({"queue": dlq, "all": true})).await;
    assert_eq!((status, outcome["moved"].clone()), (200, json!(0)));
    app.stop().await.expect("clean shutdown");
    broker.delete_queues(&queues.all()).await;
}

async fn admin_get(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(path))
        .bearer_auth("adm1n")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn admin_post(app: &TestApp, body: Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/api/v1/dead-letters/replay"))
        .bearer_auth("adm1n")
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn dead_letters_api_wants_the_admin_token_and_answers_bad_queues_bodies_and_brokers_clearly()
{
    // A broker nobody listens on: the app serves HTTP while its consumer retries.
    let queues = ErpQueues::new();
    let app = spawn_app(&queues.overrides(&[
        ("admin.token", "adm1n"),
        ("amqp.url", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("admin.read_token", "reader"),
    ]))
    .await;
    let list = app.url(&format!("/api/v1/dead-letters?queue={}", queues.customers));
    let none = app.http.get(&list).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let reader = app
        .http
        .get(&list)
        .bearer_auth("reader")
        .send()
        .await
        .unwrap();
    assert_eq!(
        reader.status(),
        401,
        "the read token is not the admin token"
    );
    let replay = app.url("/api/v1/dead-letters/replay");
    let wrong = app
        .http
        .post(&replay)
        .bearer_auth("nope")
        .json(&json!({"queue": queues.customers, "all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let (status, body) = admin_get(&app, "/api/v1/dead-letters?queue=elsewhere").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown queue \"elsewhere\""),
        "{body}"
    );
    let (status, _) = admin_get(&app, "/api/v1/dead-letters").await;
    assert_eq!(status, 400, "queue is required");
    for bad in [
        json!({"queue": queues.customers}),
        json!({"queue": queues.customers, "all": true, "ids": ["x"]}),
        json!({"queue": queues.customers, "ids": []}),
        json!({"all": true}),
        json!({"queue": queues.customers, "all": true, "extra": 1}),
    ] {
        let (status, body) = admin_post(&app, bad.clone()).await;
        assert_eq!(status, 400, "{bad} → {body}");
    }
    let (status, body) = admin_post(&app, json!({"queue": "elsewhere", "all": true})).await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = admin_get(
        &app,
        &format!("/api/v1/dead-letters?queue={}", queues.customers),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1"),
        "{body}"
    );
    let (status, _) = admin_post(&app, json!({"queue": queues.customers, "all": true})).await;
    assert_eq!(status, 503);
    app.stop().await.expect("clean shutdown");

    // Without an admin token the admin API is off; the routes are documented.
    let app = spawn_app(&[]).await;
    let r = app
        .http
        .get(app.url("/api/v1/dead-letters?queue=secom-customer-queue"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (_, doc) = app.get_json("/openapi.json").await;
    for path in ["/api/v1/dead-letters", "/api/v1/dead-letters/replay"] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    app.stop().await.unwrap();
}
