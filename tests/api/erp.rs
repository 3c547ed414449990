use std::sync::Arc;

use amqprs::BasicProperties;
use serde_json::{json, Value};
use subgate::store::InboxStats;

use crate::helpers::{
    close_broker_connections, eventually, header, query, spawn_app, spawn_app_with_store, temp_dir,
    test_settings, unique, Broker, HookedStore, TestApp,
};

pub const CUSTOMER_SEED: &str = r#"{
  "id": "134719",
  "status": "Active",
  "name": "Customer Name Here",
  "contactMedium": [
    {
      "characteristic": {
        "city": "İSTANBUL(Anadolu)",
        "country": "Türkiye",
        "phoneNumber": "5xxxxxxxxx",
        "socialNetworkId": "11111111111",
        "street1": "içerenköy"
        }
    }
  ]
}"#;

pub const SUBSCRIPTION_SEED: &str = r#"{
   "id":"123462",
   "agreementType":"Kiralama",
   "documentNumber":"108999",
   "name":"RAMAZAN ÖZEKİNCİ",
   "status":"Active",
   "characteristic":[
      {
         "name":"CAMPAIGN",
         "valueType":"String",
         "value":"24 AY TAAHHÜTLÜ"
      },
      {
         "name":"MONTAGEADRESS",
         "valueType":"String",
         "value":"PINAR MAH. ONDOKUZ MAYIS BLV. AK TOWERS NO:42 İÇ KAPI NO:84"
      },
      {
         "name":"MONTAGECOUNTY",
         "valueType":"String",
         "value":"ESENYURT"
      },
      {
         "name":"MONTAGECITY",
         "valueType":"String",
         "value":"İSTANBUL(Avrupa)"
      },
      {
         "name":"MONTAGE_DATE",
         "valueType":"Date",
         "value":"2021-08-16"
      },
      {
         "name":"TOTAL_PAST_DUE_INSTALMENT",
         "valueType":"Float",
         "value":"0.0"
      },
      {
         "name":"PANELBRAND",
         "valueType":"String",
         "value":"EBS"
      },
      {
         "name":"PANELMODEL",
         "valueType":"String",
         "value":"CPX-300W"
      },
      {
         "name":"PANELNO",
         "valueType":"String",
         "value":"1065885"
      },
      {
         "name":"SALESEMP","valueType":"String","value":"ÜMİT"
      },
      {
         "name":"STAGE","valueType":"String","value":"6 - Sinyal Alımı Gerçekleşti"
      }
   ],
   "completionDate":{"endDateTime":"2023-08-16","startDateTime":"2021-08-13"},
   "engagedParty":[ { "id" : "134719" } ]
 }"#;

pub struct ErpQueues {
    pub customers: String,
    pub subscriptions: String,
}

impl Default for ErpQueues {
    fn default() -> Self {
        Self::new()
    }
}

impl ErpQueues {
    pub fn new() -> Self {
        Self {
            customers: unique("cust"),
            subscriptions: unique("subs"),
        }
    }

    pub fn overrides<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut o = vec![
            ("erp.enabled", "true"),
            ("erp.customer_queue", self.customers.as_str()),
            ("erp.subscription_queue", self.subscriptions.as_str()),
        ];
        o.extend_from_slice(extra);
        o
    }

    pub fn all(&self) -> Vec<String> {
        vec![
            self.customers.clone(),
            self.subscriptions.clone(),
            format!("{}.dead", self.customers),
            format!("{}.dead", self.subscriptions),
        ]
    }
}

/// An app consuming its own pair of ERP queues.
pub async fn erp_app(extra: &[(&str, &str)]) -> (TestApp, ErpQueues) {
    let queues = ErpQueues::new();
    let app = spawn_app(&queues.overrides(extra)).await;
    app.wait_ready().await;
    (app, queues)
}

async fn finish(app: TestApp, queues: ErpQueues, broker: Broker) {
    app.stop().await.expect("clean shutdown");
    broker.delete_queues(&queues.all()).await;
}

/// The customer record once its version reaches `at_least`.
pub async fn customer_version(app: &TestApp, id: &str, at_least: i64) -> Value {
    eventually(20, "customer record", || async {
        let (status, body) = app.get_json(&format!("/api/v1/erp/customers/{id}")).await;
        (status == 200 && body["version"].as_i64() >= Some(at_least)).then_some(body)
    })
    .await
}

async fn inbox_stats(app: &TestApp) -> InboxStats {
    query(app.store(), |s| s.inbox_stats(Some("erp")).expect("stats")).await
}

fn customer(id: &str, name: &str) -> Vec<u8> {
    json!({ "id": id, "status": "Active", "name": name })
        .to_string()
        .into_bytes()
}

fn with_timestamp(secs: u64) -> BasicProperties {
    let mut p = BasicProperties::default();
    p.with_timestamp(secs);
    p
}

#[tokio::test]
async fn customer_seed_example_produces_the_documented_state() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    broker
        .publish(&queues.customers, CUSTOMER_SEED.as_bytes())
        .await;

    let body = customer_version(&app, "134719", 1).await;
    let state = &body["state"];
    assert_eq!(state["id"], "134719");
    assert_eq!(state["status"], "Active");
    assert_eq!(state["status_known"], true);
    assert_eq!(state["name"], "Customer Name Here");
    let c = &state["contact_medium"][0]["characteristic"];
    assert_eq!(c["city"], "İSTANBUL(Anadolu)");
    assert_eq!(c["country"], "Türkiye");
    assert_eq!(c["phoneNumber"], "5xxxxxxxxx");
    assert_eq!(c["socialNetworkId"], "11111111111");
    assert_eq!(c["street1"], "içerenköy");
    assert_eq!(state["flags"], json!([]));
    assert_eq!(body["version"], 1);

    // The inbox keeps the bytes as received.
    let event = body["changed_by_event"].as_i64().unwrap();
    let (status, inbox) = app.get_json(&format!("/api/v1/inbox/{event}")).await;
    assert_eq!(status, 200);
    assert_eq!(inbox["raw"]["text"], CUSTOMER_SEED);
    assert_eq!(inbox["source"], "erp");
    assert_eq!(inbox["kind"], "customer.changed");
    assert_eq!(inbox["outcome"], "applied");
    assert_eq!(inbox["meta"]["queue"], queues.customers.as_str());

    finish(app, queues, broker).await;
}

#[tokio::test]
async fn subscription_seed_example_produces_the_documented_state_and_links_the_customer() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    // The subscription names a customer not seen yet: it is stored anyway.
    broker
        .publish(&queues.subscriptions, SUBSCRIPTION_SEED.as_bytes())
        .await;

    let body = eventually(20, "subscription", || async {
        let (status, body) = app.get_json("/api/v1/erp/subscriptions/123462").await;
        (status == 200).then_some(body)
    })
    .await;
    let s = &body["state"];
    assert_eq!(s["agreement_type"], "Kiralama");
    assert_eq!(s["document_number"], "108999");
    assert_eq!(s["name"], "RAMAZAN ÖZEKİNCİ");
    assert_eq!(s["status"], "Active");
    assert_eq!(s["completion_date"]["start_date_time"], "2021-08-13");
    assert_eq!(s["completion_date"]["end_date_time"], "2023-08-16");
    assert_eq!(s["engaged_party"], json!(["134719"]));
    let p = &s["properties"];
    assert_eq!(p.as_object().unwrap().len(), 11);
    assert_eq!(p["CAMPAIGN"]["typed"], "24 AY TAAHHÜTLÜ");
    assert_eq!(p["MONTAGE_DATE"]["typed"], "2021-08-16");
    assert_eq!(p["MONTAGE_DATE"]["value_type"], "Date");
    // Exact decimal text, not a float round-trip.
    assert_eq!(p["TOTAL_PAST_DUE_INSTALMENT"]["typed"].to_string(), "0.0");
    assert_eq!(p["STAGE"]["value"], "6 - Sinyal Alımı Gerçekleşti");
    assert_eq!(s["flags"], json!([]));

    let (status, list) = app
        .get_json("/api/v1/erp/customers/134719/subscriptions")
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["customer_known"], false);
    assert_eq!(list["subscriptions"][0]["id"], "123462");

    broker
        .publish(&queues.customers, CUSTOMER_SEED.as_bytes())
        .await;
    customer_version(&app, "134719", 1).await;
    let (_, list) = app
        .get_json("/api/v1/erp/customers/134719/subscriptions")
        .await;
    assert_eq!(list["customer_known"], true);

    finish(app, queues, broker).await;
}

#[tokio::test]
async fn property_bag_types_every_value_type_and_flags_what_it_cannot() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    let body = json!({
        "id": 777,
        "characteristic": [
            { "name": "S", "valueType": "String", "value": "metin" },
            { "name": "D", "valueType": "Date", "value": "2021-08-16" },
            { "name": "F", "valueType": "Float", "value": "1234.50" },
            { "name": "BADF", "valueType": "Float", "value": "12,5" },
            { "name": "DUP", "valueType": "String", "value": "first" }
        ],
        "properties": [
            { "name": "I", "valueType": "Integer", "value": "42" },
            { "name": "B", "valueType": "Boolean", "value": "true" },
            { "name": "U", "valueType": "Money", "value": "10 TL" },
            { "name": "DUP", "valueType": "String", "value": "second" }
        ]
    });
    broker
        .publish(&queues.subscriptions, body.to_string().as_bytes())
        .await;
    let record = eventually(20, "subscription", || async {
        let (status, body) = app.get_json("/api/v1/erp/subscriptions/777").await;
        (status == 200).then_some(body)
    })
    .await;
    let p = &record["state"]["properties"];
    assert_eq!(p["S"]["typed"], "metin");
    assert_eq!(p["D"]["typed"], "2021-08-16");
    assert_eq!(p["F"]["typed"].to_string(), "1234.50");
    assert_eq!(p["BADF"]["typed"], Value::Null);
    assert_eq!(p["BADF"]["value"], "12,5");
    assert_eq!(p["BADF"]["flag"], "unparseable_value");
    assert_eq!(p["I"]["typed"], 42);
    assert_eq!(p["I"]["from"], "properties[0]");
    assert_eq!(p["B"]["typed"], true);
    assert_eq!(p["U"]["typed"], Value::Null);
    assert_eq!(p["U"]["value"], "10 TL");
    assert_eq!(p["U"]["flag"], "unknown_value_type");
    assert_eq!(p["DUP"]["typed"], "second");
    assert_eq!(record["state"]["duplicate_properties"][0]["name"], "DUP");
    let flags = record["state"]["flags"].to_string();
    for f in [
        "BADF:unparseable_value",
        "U:unknown_value_type",
        "DUP:duplicate_name",
    ] {
        assert!(flags.contains(f), "{f} in {flags}");
    }
    finish(app, queues, broker).await;
}

#[tokio::test]
async fn a_then_b_then_a_ends_at_a_and_identical_snapshot_is_a_noop() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    let a = customer("500", "Ayşe");
    let b = customer("500", "Ayşe Yılmaz");
    broker.publish(&queues.customers, &a).await;
    customer_version(&app, "500", 1).await;
    broker.publish(&queues.customers, &b).await;
    customer_version(&app, "500", 2).await;
    broker.publish(&queues.customers, &a).await;
    let body = customer_version(&app, "500", 3).await;
    assert_eq!(body["state"]["name"], "Ayşe");

    // The same snapshot again changes nothing.
    broker.publish(&queues.customers, &a).await;
    broker
        .publish(&queues.customers, &customer("501", "sentinel"))
        .await;
    customer_version(&app, "501", 1).await;
    let body = customer_version(&app, "500", 3).await;
    assert_eq!(body["version"], 3);
    assert_eq!(body["state"]["name"], "Ayşe");
    let stats = inbox_stats(&app).await;
    // a, b, a (re-applied), sentinel; the identical repeat is a duplicate, not a row.
    assert_eq!(stats.events, 4);
    finish(app, queues, broker).await;
}

#[tokio::test]
async fn older_amqp_timestamp_does_not_overwrite_a_newer_snapshot() {
    let (app, queues) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    broker
        .publish_with(
            &queues.customers,
            &customer("600", "newer"),
            with_timestamp(2_000_000_000),
        )
        .await;
    customer_version(&app, "600", 1).await;
    broker
        .publish_with(
            &queues.customers,
            &customer("600", "older"),
            with_timestamp(1_900_000_000),
        )
        .await;
    broker
        .publish(&queues.customers, &customer("601", "sentinel"))
        .await;
    customer_version(&app, "601", 1).await;

    let body = customer_version(&app, "600", 1).await;
    assert_eq!(body["state"]["name"], "newer");
    assert_eq!(body["version"], 1);
    assert_eq!(body["occurred_at"], "2033-05-18T03:33:20.000Z");
    // The stale snapshot is still recorded in the inbox, marked stale.
    let store = app.store();
    let outcomes = query(store, |s| {
        (1..=3)
            .filter_map(|id| s.inbox_event(id).expect("inbox"))
            .map(|e| e.outcome)
            .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(outcomes, vec!["applied", "stale", "applied"]);
    finish(app, queues, broker).await;
}

#[tokio::test]
async fn rejected_inputs_land_in_the_dead_letter_queue_with_their_reason() {
    let (app, queues) = erp_app(&[("ingest.max_message_bytes", "2000")]).await;
    let broker = Broker::connect().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", b"{not json".to_vec()),
        ("not_utf8", b"\xff\xfe{}".to_vec()),
        ("not_an_object", b"[1,2,3]".to_vec()),
        ("missing_id", br#"{"status":"Active"}"#.to_vec()),
        ("missing_id", br#"{"id":""}"#.to_vec()),
        (
            "too_large",
            format!(r#"{{"id":"1","name":"{}"}}"#, "x".repeat(3000)).into_bytes(),
        ),
    ];
    for (_, body) in &cases {
        broker.publish(&queues.customers, body).await;
    }
    // The next good message is still processed.
    broker
        .publish(&queues.customers, &customer("700", "good"))
        .await;
    customer_version(&app, "700", 1).await;

    let dead = format!("{}.dead", queues.customers);
    for (code, body) in &cases {
        let (props, got) =
            eventually(20, "dead letter", || async { broker.get(&dead).await }).await;
        assert_eq!(&got, body, "the dead letter keeps the original bytes");
        let reason = header(&props, "x-subgate-error").expect("reason header");
        assert!(reason.starts_with(&format!("{code}: ")), "{reason}");
        assert_eq!(
            header(&props, "x-subgate-error-code").as_deref(),
            Some(*code)
        );
        assert_eq!(
            header(&props, "x-subgate-queue").as_deref(),
            Some(queues.customers.as_str())
        );
    }
    assert_eq!(broker.message_count(&queues.customers).await, 0);
    assert_eq!(inbox_stats(&app).await.events, 1);
    finish(app, queues, broker).await;
}

#[tokio::test]
async fn redelivered_message_is_acked_without_second_apply() {
    let queues = ErpQueues::new();
    let connection_name = unique("conn");
    let dir = temp_dir("redeliver");
    let overrides = queues.overrides(&[("amqp.connection_name", connection_name.as_str())]);
    let settings = test_settings(&dir, &overrides);
    let inner = subgate::startup::open_store(&settings, true).unwrap();
    // After the message is committed and before it is acked, the broker closes the channel.
    let name = connection_name.clone();
    let store = Arc::new(HookedStore::new(inner).after_first_commit(move || {
        assert_eq!(close_broker_connections(&name), 1);
    }));
    let app = spawn_app_with_store(dir, &overrides, store).await;
    app.wait_ready().await;
    let broker = Broker::connect().await;
    let mut props = BasicProperties::default();
    props.with_message_id("erp-msg-1");
    broker
        .publish_with(&queues.customers, CUSTOMER_SEED.as_bytes(), props)
        .await;

    // The consumer reconnects, the message comes back (redelivered) and is recognised.
    let received = format!("subgate_received_total{{queue=\"{}\"}} 2", queues.customers);
    let metrics = eventually(30, "the redelivery", || async {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains(&received).then_some(text)
    })
    .await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("subgate_committed_total")
                && l.contains("status=\"duplicate\"")
                && l.contains("source=\"erp\"")),
        "a duplicate was counted:\n{metrics}"
    );
    assert!(
        metrics.contains("subgate_amqp_reconnects_total"),
        "the reconnect was counted"
    );
    // Both deliveries settled (the commit, then the duplicate), each with its latency recorded.
    let settled = format!(
        "subgate_amqp_settle_seconds_count{{queue=\"{}\"}} 2",
        queues.customers
    );
    let metrics = eventually(30, "both settle times", || async {
        let text = app.metrics().await;
        text.contains(&settled).then_some(text)
    })
    .await;
    assert!(
        metrics.contains("subgate_ingest_wait_seconds_count"),
        "the time events waited for the writer is exposed:\n{metrics}"
    );
    let body = customer_version(&app, "134719", 1).await;
    assert_eq!(body["version"], 1, "applied once");
    assert_eq!(inbox_stats(&app).await.events, 1);
    // It was acked: after a graceful stop nothing is back in the queue.
    let customers = queues.customers.clone();
    app.stop().await.unwrap();
    assert_eq!(broker.message_count(&customers).await, 0);
    broker.delete_queues(&queues.all()).await;
}
