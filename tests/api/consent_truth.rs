//! Providers hear the ledger's truth: whatever the order of the events, their sources and the
//! delivery failures, the last consent a provider receives about an address is the ledger's.
//! Against a local server that keeps contacts as Emarsys does (upserts by key field), a webhook
//! receiver, the real store (SQLite and PostgreSQL) and the real app.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{body::Bytes, extract::State, http::Uri, response::IntoResponse, Json};
use reqwest::header;
use serde_json::{json, Value};
use subgate::{
    consent::Channel,
    delivery::Worker,
    store::{DeliveryFilter, DeliveryState, Store},
};

use crate::{
    akinon::{akinon_app, post, report, LINK_SECRET, ORDER_EXAMPLE, USER_EXAMPLE},
    delivery::{webhook, Provider},
    helpers::{eventually, query, spawn_app, TestApp},
    store_conformance::fresh_postgres_database,
};

/// What the local Emarsys keeps: contacts by key value (field 3, the email), each field as last
/// set, and every upsert's field 31 in arrival order.
#[derive(Default)]
struct EmarsysState {
    contacts: Mutex<BTreeMap<String, BTreeMap<String, Value>>>,
    /// (email, field 31 as sent, if it was), in arrival order.
    upserts: Mutex<Vec<(String, Option<String>)>>,
    /// Statuses to answer before answering 200 again.
    failures: Mutex<Vec<u16>>,
}

/// A local server speaking Emarsys's contact API: `PUT /api/v2/contact/` upserts by `key_id`,
/// answers `{"replyCode":0,"replyText":"OK","data":{"ids":[…]}}`.
#[derive(Clone)]
pub struct Emarsys {
    url: String,
    state: Arc<EmarsysState>,
}

async fn emarsys_answer(
    State(state): State<Arc<EmarsysState>>,
    uri: Uri,
    body: Bytes,
) -> axum::response::Response {
    if let Some(status) = {
        let mut failures = state.failures.lock().unwrap();
        (!failures.is_empty()).then(|| failures.remove(0))
    } {
        let status = axum::http::StatusCode::from_u16(status).unwrap();
        return (status, r#"{"replyCode":1,"replyText":"try again"}"#).into_response();
    }
    if !uri.path().starts_with("/api/v2/contact") {
        return (axum::http::StatusCode::NOT_FOUND, "").into_response();
    }
    let call: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key_id = call["key_id"].as_str().unwrap_or("3").to_owned();
    let mut ids = Vec::new();
    for contact in call["contacts"].as_array().into_iter().flatten() {
        let Some(key) = contact[&key_id].as_str() else {
            continue;
        };
        let mut contacts = state.contacts.lock().unwrap();
        let stored = contacts.entry(key.to_owned()).or_default();
        for (field, value) in contact.as_object().into_iter().flatten() {
            stored.insert(field.clone(), value.clone());
        }
        ids.push(contacts.len());
        state
            .upserts
            .lock()
            .unwrap()
            .push((key.to_owned(), contact["31"].as_str().map(str::to_owned)));
    }
    Json(json!({"replyCode": 0, "replyText": "OK", "data": {"ids": ids}})).into_response()
}

impl Emarsys {
    pub async fn start() -> Self {
        let state = Arc::new(EmarsysState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(emarsys_answer)
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Emarsys { url, state }
    }

    /// The destination: WSSE, default field map (email = 3, opt-in = 31: 1 in, 2 out).
    pub fn destination(&self, extra: &str) -> String {
        format!(
            r#"{{name="em", kind="emarsys", url="{}", secret="s3cret", timeout="2s", retry_schedule=["0s","0s","0s","0s","0s","0s","0s","0s"]{extra}, emarsys={{user="company001"}}}}"#,
            self.url
        )
    }

    /// Field 31 of the contact with this email, as Emarsys holds it now.
    pub fn opt_in_field(&self, email: &str) -> Option<String> {
        self.state
            .contacts
            .lock()
            .unwrap()
            .get(email)
            .and_then(|c| c.get("31"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    pub fn upserts(&self) -> Vec<(String, Option<String>)> {
        self.state.upserts.lock().unwrap().clone()
    }

    pub fn fail_next(&self, statuses: &[u16]) {
        self.state
            .failures
            .lock()
            .unwrap()
            .extend_from_slice(statuses);
    }
}

/// Akinon's user example with another pk, email, email consent and modification time.
fn user(pk: u32, email: &str, allowed: bool, modified: &str) -> Value {
    let mut u: Value = serde_json::from_str(USER_EXAMPLE).unwrap();
    u["pk"] = json!(pk);
    u["email"] = json!(email);
    u["emailAllowed"] = json!(allowed);
    u["modifiedDate"] = json!(modified);
    u
}

/// Akinon's order example for order `pk`, embedding `user`.
fn order(pk: u32, user: Value) -> String {
    let mut o: Value = serde_json::from_str(ORDER_EXAMPLE).unwrap();
    o["pk"] = json!(pk);
    o["number"] = json!(format!("ORD-{pk}"));
    o["user"] = user;
    o.to_string()
}

async fn ok(app: &TestApp, path: &str, body: &str, request_id: &str) {
    let r = post(app, path, body, request_id).await;
    assert_eq!(r.status(), 200, "{path} {request_id}");
}

/// The ledger's email state for `email` (`opted_in` / `opted_out`).
async fn ledger(store: &Arc<dyn Store>, email: &str) -> Option<String> {
    let key = format!("email:{email}");
    query(store.clone(), move |s| {
        s.get_record("consent", &key)
            .unwrap()
            .and_then(|r| r.doc["state"].as_str().map(str::to_owned))
    })
    .await
}

/// Wait until no row is pending for any destination (every change sent, or dead).
async fn drained(store: &Arc<dyn Store>) {
    eventually(30, "every outbox row sent", || {
        let store = store.clone();
        async move {
            let pending = query(store, |s| {
                s.list_deliveries(&DeliveryFilter {
                    state: Some(DeliveryState::Pending),
                    limit: 10,
                    ..DeliveryFilter::default()
                })
                .unwrap()
            })
            .await;
            pending.is_empty().then_some(())
        }
    })
    .await;
}

fn emarsys_field(state: &str) -> &'static str {
    if state == "opted_in" {
        "1"
    } else {
        "2"
    }
}

async fn emarsys_app(emarsys: &Emarsys, extra: &str) -> TestApp {
    let list = format!("[{}]", emarsys.destination(extra));
    akinon_app(&[
        ("delivery.poll_interval", "20ms"),
        ("destinations", list.as_str()),
    ])
    .await
}

/// A worker for the app's first destination, stepped by the test (the destination is
/// configured with `enabled = false`, so the app runs none of its own).
fn manual_worker(app: &TestApp, store: &Arc<dyn Store>) -> Worker {
    Worker::new(&app.settings, &app.settings.destinations[0], store.clone()).unwrap()
}

#[tokio::test]
async fn order_with_stale_user_copy_does_not_reopt_in_at_emarsys() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, "").await;
    let store = app.store();
    let opted_in = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_in.to_string(), "r1").await;
    drained(&store).await;
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("1")
    );
    let opted_out = user(1, "user@example.com", false, "2024-06-02T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_out.to_string(), "r2").await;
    drained(&store).await;
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("2")
    );
    // Order 1 embeds the user as it was on June 1st (opted in).
    ok(&app, "/order-info", &order(1, opted_in), "r3").await;
    drained(&store).await;

    assert_eq!(
        ledger(&store, "user@example.com").await.as_deref(),
        Some("opted_out")
    );
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("2"),
        "Emarsys ends at opt-out: {:?}",
        emarsys.upserts()
    );
    let rows = query(store.clone(), |s| {
        s.list_deliveries(&DeliveryFilter {
            limit: 100,
            ..DeliveryFilter::default()
        })
        .unwrap()
    })
    .await;
    let entities: Vec<&str> = rows.iter().map(|r| r.entity.as_str()).collect();
    assert_eq!(
        entities,
        ["akinon:user:1", "akinon:user:1", "akinon:order:1"]
    );
    assert!(rows.iter().all(|r| r.state == DeliveryState::Delivered));
    assert!(rows
        .iter()
        .all(|r| r.contact_key.as_deref() == Some("email:user@example.com")));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn order_with_stale_user_copy_tells_the_webhook_opt_out_last() {
    let provider = Provider::start().await;
    let list = format!("[{}]", webhook("crm", &provider.url("/hooks"), ""));
    let app = akinon_app(&[
        ("delivery.poll_interval", "20ms"),
        ("destinations", list.as_str()),
    ])
    .await;
    let store = app.store();
    let opted_in = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_in.to_string(), "w1").await;
    let opted_out = user(1, "user@example.com", false, "2024-06-02T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_out.to_string(), "w2").await;
    ok(&app, "/order-info", &order(1, opted_in), "w3").await;
    drained(&store).await;

    let events: Vec<Value> = provider.seen().iter().map(|s| s.json()).collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds, ["user.changed", "user.changed", "order.changed"]);
    let last = events.last().unwrap();
    assert_eq!(last["record"], "akinon:order:1");
    assert_eq!(
        last["data"]["user"]["emailAllowed"], true,
        "the order as received"
    );
    assert_eq!(
        last["contact"]["opt_in"], false,
        "the contact as the ledger holds it"
    );
    assert_eq!(last["contact"]["consent"]["email"]["state"], "opted_out");
    assert_eq!(
        last["contact"]["consent"]["email"]["at"],
        "2024-06-02T00:00:00.000Z"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_same_three_calls_in_a_burst_end_at_opt_out() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, ", enabled=false").await;
    let store = app.store();
    let opted_in = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    let opted_out = user(1, "user@example.com", false, "2024-06-02T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_in.to_string(), "b1").await;
    ok(&app, "/subscribe-user", &opted_out.to_string(), "b2").await;
    ok(&app, "/order-info", &order(1, opted_in), "b3").await;

    let mut worker = manual_worker(&app, &store);
    // The two user rows coalesce into the latest; the order's row waits for it (same contact).
    let first = worker.step().await.unwrap();
    assert_eq!(first.delivered, 1);
    assert_eq!(
        emarsys.upserts(),
        [("user@example.com".into(), Some("2".into()))]
    );
    assert_eq!(worker.step().await.unwrap().delivered, 1);
    assert_eq!(
        emarsys.upserts(),
        [
            ("user@example.com".into(), Some("2".into())),
            ("user@example.com".into(), Some("2".into()))
        ],
        "never an opt-in"
    );
    assert_eq!(worker.step().await.unwrap().claimed, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn user_opt_out_followed_by_another_users_order_with_the_same_pk_is_sent() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, ", enabled=false").await;
    let store = app.store();
    ok(
        &app,
        "/subscribe-user",
        &user(7, "seven@example.com", false, "2024-06-02T00:00:00Z").to_string(),
        "n1",
    )
    .await;
    // Order 7 belongs to user 8: before, both were the entity `akinon:7` and the order's row
    // superseded the opt-out, which was never sent.
    let other = user(8, "eight@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/order-info", &order(7, other), "n2").await;
    let mut worker = manual_worker(&app, &store);
    assert_eq!(worker.step().await.unwrap().delivered, 2);
    assert_eq!(
        emarsys.opt_in_field("seven@example.com").as_deref(),
        Some("2")
    );
    assert_eq!(
        emarsys.opt_in_field("eight@example.com").as_deref(),
        Some("1")
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn provider_opt_out_then_an_earlier_dated_akinon_opt_in_leaves_emarsys_opted_out() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, "").await;
    let store = app.store();
    let (status, _) = report(
        &app,
        json!({"channel": "email", "address": "user@example.com", "state": "opted_out",
               "source": "emarsys", "occurredAt": "2024-06-02T00:00:00Z"}),
    )
    .await;
    assert_eq!(status, 200);
    // A profile last modified the day before says opt-in: the profile is new to subgate and
    // is stored, but its consent is older than the ledger's.
    let earlier = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/subscribe-user", &earlier.to_string(), "p1").await;
    drained(&store).await;
    assert_eq!(
        ledger(&store, "user@example.com").await.as_deref(),
        Some("opted_out")
    );
    let upserts = emarsys.upserts();
    assert_eq!(upserts.len(), 2, "{upserts:?}");
    assert!(
        upserts
            .iter()
            .all(|(_, field)| field.as_deref() == Some("2")),
        "Emarsys never hears opt-in: {upserts:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn one_click_unsubscribe_reaches_emarsys_as_opt_out() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, "").await;
    let store = app.store();
    let opted_in = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_in.to_string(), "c1").await;
    drained(&store).await;
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("1")
    );
    let normaliser = subgate::consent::Normaliser::new("TR").unwrap();
    let address = normaliser
        .address(Channel::Email, "User@Example.com")
        .unwrap();
    let token = subgate::sources::consents::sign_link(LINK_SECRET.as_bytes(), &address).unwrap();
    let r = app
        .http
        .post(app.url(&format!("/u/{token}")))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drained(&store).await;
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("2")
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_user_row_retried_after_a_consents_api_opt_out_does_not_land_last() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, ", enabled=false").await;
    let store = app.store();
    let mut worker = manual_worker(&app, &store);
    let opted_in = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_in.to_string(), "t1").await;
    emarsys.fail_next(&[503]);
    let failed = worker.step().await.unwrap();
    assert_eq!((failed.claimed, failed.retried), (1, 1));
    let (status, _) = report(
        &app,
        json!({"channel": "email", "address": "user@example.com", "state": "opted_out",
               "source": "operator", "occurredAt": "2024-06-02T00:00:00Z"}),
    )
    .await;
    assert_eq!(status, 200);
    // The user row is retried first, alone: the opt-out (another record, the same contact)
    // waits for it, then goes out last.
    let retried = worker.step().await.unwrap();
    assert_eq!((retried.claimed, retried.delivered), (1, 1));
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("1")
    );
    assert_eq!(worker.step().await.unwrap().delivered, 1);
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("2")
    );
    assert_eq!(worker.step().await.unwrap().claimed, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_opt_in_replayed_after_an_opt_out_is_sent_with_the_ledgers_opt_out() {
    let emarsys = Emarsys::start().await;
    let app = emarsys_app(&emarsys, ", enabled=false").await;
    let store = app.store();
    let mut worker = manual_worker(&app, &store);
    let opted_in = user(1, "user@example.com", true, "2024-06-01T00:00:00Z");
    ok(&app, "/subscribe-user", &opted_in.to_string(), "d1").await;
    emarsys.fail_next(&[400]);
    assert_eq!(worker.step().await.unwrap().dead, 1);
    let (status, _) = report(
        &app,
        json!({"channel": "email", "address": "user@example.com", "state": "opted_out",
               "source": "operator", "occurredAt": "2024-06-02T00:00:00Z"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(worker.step().await.unwrap().delivered, 1);
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("2")
    );
    let replayed = query(store.clone(), |s| {
        s.replay_dead(&subgate::store::ReplayRequest {
            destination: None,
            since: None,
            actor: "cli".into(),
            now: subgate::clock::now_ms(),
        })
        .unwrap()
    })
    .await;
    assert_eq!(replayed.rows, 1);
    assert_eq!(worker.step().await.unwrap().delivered, 1);
    assert_eq!(
        emarsys.opt_in_field("user@example.com").as_deref(),
        Some("2"),
        "the replayed row carries the ledger's state: {:?}",
        emarsys.upserts()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn erp_customer_and_subscription_consent_flags_reach_the_ledger_and_emarsys() {
    use amqprs::BasicProperties;
    let emarsys = Emarsys::start().await;
    let queues = crate::erp::ErpQueues::new();
    let list = format!("[{}]", emarsys.destination(""));
    let app = spawn_app(&queues.overrides(&[
        ("delivery.poll_interval", "20ms"),
        ("destinations", list.as_str()),
        (
            "erp.consent_flags",
            r#"{ emailPermission = "email", SMS_PERMISSION = "sms" }"#,
        ),
    ]))
    .await;
    app.wait_ready().await;
    let store = app.store();
    let broker = crate::helpers::Broker::connect().await;
    let at = |secs: u64| BasicProperties::default().with_timestamp(secs).finish();
    let customer = json!({"id": "134719", "status": "Active", "name": "Ayşe Yılmaz",
        "emailPermission": true,
        "contactMedium": [{"characteristic": {"phoneNumber": "5351234567",
                                              "emailAddress": "Ayse@Example.com"}}]});
    broker
        .publish_all(
            &queues.customers,
            vec![(customer.to_string().into_bytes(), at(1_717_200_000))],
        )
        .await;
    eventually(20, "Emarsys hears the ERP opt-in", || async {
        (emarsys.opt_in_field("ayse@example.com").as_deref() == Some("1")).then_some(())
    })
    .await;
    // A later subscription of the customer says no more email and no SMS.
    let subscription = json!({"id": "123462", "status": "Active",
        "characteristic": [
            {"name": "emailPermission", "valueType": "Boolean", "value": "false"},
            {"name": "SMS_PERMISSION", "valueType": "String", "value": "Hayır"}],
        "engagedParty": [{"id": "134719"}]});
    broker
        .publish_all(
            &queues.subscriptions,
            vec![(subscription.to_string().into_bytes(), at(1_717_300_000))],
        )
        .await;
    eventually(20, "Emarsys hears the ERP opt-out", || async {
        (emarsys.opt_in_field("ayse@example.com").as_deref() == Some("2")).then_some(())
    })
    .await;
    assert_eq!(
        ledger(&store, "ayse@example.com").await.as_deref(),
        Some("opted_out")
    );
    let sms = query(store.clone(), |s| {
        s.get_record("consent", "sms:+905351234567")
            .unwrap()
            .unwrap()
    })
    .await;
    assert_eq!(
        (sms.doc["state"].as_str(), sms.doc["source"].as_str()),
        (Some("opted_out"), Some("erp"))
    );
    app.stop().await.unwrap();
    broker.delete_queues(&queues.all()).await;
}

#[tokio::test]
async fn two_postgres_instances_leave_emarsys_with_the_ledgers_consent() {
    let emarsys = Emarsys::start().await;
    let url = tokio::task::spawn_blocking(fresh_postgres_database)
        .await
        .unwrap();
    let list = format!("[{}]", emarsys.destination(", batch_size=2"));
    let overrides = [
        ("store.url", url.as_str()),
        ("delivery.poll_interval", "10ms"),
        ("destinations", list.as_str()),
    ];
    let a = akinon_app(&overrides).await;
    let b = akinon_app(&overrides).await;
    let store = a.store();
    // Alternating opt-ins and opt-outs for five addresses, through both instances, from
    // subscribe-user, order-info and the consents API, with a few 500s on the way.
    emarsys.fail_next(&[500, 500, 503]);
    let mut expected = BTreeMap::new();
    for step in 0..24u32 {
        let app = if step % 2 == 0 { &a } else { &b };
        let n = step % 5;
        let email = format!("p{n}@example.com");
        let allowed = step % 3 != 0;
        let day = format!("2024-06-{:02}T00:00:00Z", 1 + step);
        match step % 3 {
            0 => {
                let (status, _) = report(
                    app,
                    json!({"channel": "email", "address": email, "source": "operator",
                           "state": if allowed { "opted_in" } else { "opted_out" },
                           "occurredAt": day}),
                )
                .await;
                assert_eq!(status, 200);
            }
            1 => {
                let body = user(100 + n, &email, allowed, &day).to_string();
                ok(app, "/subscribe-user", &body, &format!("pg-{step}")).await;
            }
            _ => {
                let body = order(step, user(100 + n, &email, allowed, &day));
                ok(app, "/order-info", &body, &format!("pg-{step}")).await;
            }
        }
        expected.insert(email, allowed);
    }
    drained(&store).await;
    for (email, allowed) in &expected {
        let state = ledger(&store, email).await.expect("the ledger knows it");
        assert_eq!(state == "opted_in", *allowed, "{email}");
        assert_eq!(
            emarsys.opt_in_field(email).as_deref(),
            Some(emarsys_field(&state)),
            "{email}: {:?}",
            emarsys.upserts()
        );
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    // A PostgreSQL client closes by blocking: not on the runtime's thread.
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
}

/// The property: consent events about one address from three sources (Akinon subscribe-user,
/// the consents API, Loymax subscription updates), in any order and dated in any order, with
/// transient delivery failures injected and the worker stepped at random points, end with the
/// provider holding the ledger's consent.
mod property {
    use proptest::prelude::*;
    use subgate::{
        consent::{ConsentState, Normaliser},
        envelope::Envelope,
        sources::{
            akinon::{self, CallMeta, Endpoint},
            amqp::{AmqpMessage, Decoder},
            consents::ConsentReport,
            loymax::LoymaxDecoder,
        },
    };

    use super::*;
    use crate::helpers::{temp_dir, test_settings};

    const EMAIL: &str = "prop@example.com";
    const ATTRIBUTE: &str = include_str!("../fixtures/loymax/attribute_update.json");
    const SUBSCRIPTION: &str = include_str!("../fixtures/loymax/subscription_update.json");

    #[derive(Debug, Clone)]
    enum Op {
        /// (source 0 akinon, 1 consents API, 2 loymax; allowed; day offset)
        Consent(u8, bool, u32),
        /// Step the worker once.
        Step,
        /// The provider answers the next requests with these statuses.
        Fail(Vec<u16>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, any::<bool>(), 0u32..20).prop_map(|(s, a, d)| Op::Consent(s, a, d)),
            2 => Just(Op::Step),
            1 => prop::collection::vec(prop::sample::select(vec![500u16, 503, 429, 502]), 1..3)
                .prop_map(Op::Fail),
        ]
    }

    fn loymax(routing_key: &str, body: &str, at_secs: u64, id: &str) -> Envelope {
        let props = amqprs::BasicProperties::default()
            .with_timestamp(at_secs)
            .with_message_id(id)
            .finish();
        LoymaxDecoder::new(Normaliser::new("RU").unwrap())
            .decode(&AmqpMessage {
                queue: "q",
                exchange: "x",
                routing_key,
                redelivered: false,
                properties: &props,
                body: body.as_bytes(),
            })
            .unwrap()
    }

    fn envelope(source: u8, allowed: bool, day: u32, n: usize) -> Envelope {
        let normaliser = Normaliser::new("TR").unwrap();
        // Distinct times: the ledger's order is the events' dates, never their arrival.
        let at = 1_717_200_000_000 + i64::from(day) * 86_400_000 + n as i64 * 1_000;
        match source {
            0 => {
                let modified = subgate::clock::to_rfc3339(at);
                let body = user(1, EMAIL, allowed, &modified).to_string();
                let call = CallMeta {
                    request_id: format!("prop-{n}"),
                    credential: "akinon".into(),
                };
                akinon::decode(
                    Endpoint::SubscribeUser,
                    body.into_bytes(),
                    &call,
                    &normaliser,
                )
                .ok()
                .unwrap()
            }
            1 => ConsentReport {
                address: normaliser.address(Channel::Email, EMAIL).unwrap(),
                state: ConsentState::from_allowed(allowed),
                at,
                reported_by: "operator".into(),
            }
            .into_admin_envelope(Vec::new()),
            _ => {
                let state = if allowed { "Enabled" } else { "Disabled" };
                let body =
                    SUBSCRIPTION.replace("\"mail\":\"Enabled\"", &format!("\"mail\":\"{state}\""));
                loymax(
                    "customer.subscription.update",
                    &body,
                    (at / 1000) as u64,
                    &format!("prop-{n}"),
                )
            }
        }
    }

    async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let emarsys = Emarsys::start().await;
        let dir = temp_dir("prop");
        let list = format!("[{}]", emarsys.destination(""));
        let settings = test_settings(&dir, &[("destinations", list.as_str())]);
        let store = subgate::startup::open_store(&settings, true).unwrap();
        let routes = Arc::new(subgate::delivery::routes::OutboxRoutes::from_settings(
            &settings,
        ));
        let (ingest, writer) = subgate::ingest::start_with_routes(
            store.clone(),
            &settings.ingest,
            routes,
            subgate::health::Health::default(),
            tokio::runtime::Handle::current(),
        );
        let mut worker = Worker::new(&settings, &settings.destinations[0], store.clone()).unwrap();
        // The Loymax member's email is known from the start (member 164 of the fixture).
        let email_attribute = ATTRIBUTE
            .replace("\"attributeCode\":\"Phone\"", "\"attributeCode\":\"Email\"")
            .replace(
                "\"newValue\":\"79540286267\"",
                &format!("\"newValue\":\"{EMAIL}\""),
            )
            .replace("\"customerId\":126", "\"customerId\":164");
        ingest
            .submit(loymax(
                "customer.attribute.update",
                &email_attribute,
                1,
                "email",
            ))
            .await
            .unwrap();
        let mut any = false;
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Consent(source, allowed, day) => {
                    ingest
                        .submit(envelope(source, allowed, day, n))
                        .await
                        .unwrap();
                    any = true;
                }
                Op::Step => {
                    worker.step().await.unwrap();
                }
                Op::Fail(statuses) => emarsys.fail_next(&statuses),
            }
        }
        // Drain: transient failures only, and a schedule long enough for them.
        for _ in 0..200 {
            if worker.step().await.unwrap().claimed == 0 {
                break;
            }
        }
        drop(ingest);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
        let state = ledger(&store, EMAIL).await;
        if any {
            let state = state.expect("a consent was recorded");
            let told = emarsys.opt_in_field(EMAIL);
            prop_assert_eq!(
                told.as_deref(),
                Some(emarsys_field(&state)),
                "upserts: {:?}",
                emarsys.upserts()
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, .. ProptestConfig::default() })]
        #[test]
        fn the_last_consent_delivered_equals_the_ledger(ops in prop::collection::vec(op(), 1..14)) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(run(ops))?;
        }
    }
}
