//! The ONAP/TMF service-order listener through real HTTP(S): the contract, every error code,
//! dedupe, ordering, durability (the store made to fail for real), TLS and the rate limit.

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use subgate::startup::Application;

use crate::helpers::{run_app, spawn_app, temp_dir, test_settings, TestApp};

const PATH: &str = "/externalapi/listener/v1/listener";
const TOKEN: &str = "hub-token-0123456789";
const JSON_UTF8: &str = "application/json;charset=utf-8";
const CREATION: &str = "ServiceOrderCreationNotification";
const STATE_CHANGE: &str = "ServiceOrderStateChangeNotification";
const ITEM_CHANGE: &str = "ServiceOrderItemStateChangeNotification";

async fn listener_app(extra: &[(&str, &str)]) -> TestApp {
    let mut overrides = vec![
        ("listener.enabled", "true"),
        ("listener.bearer_token", TOKEN),
    ];
    overrides.extend_from_slice(extra);
    spawn_app(&overrides).await
}

/// A `Listener` body.
fn notification(event_id: &str, event_type: &str, event_date: &str, event: Value) -> String {
    serde_json::to_string_pretty(&json!({
        "eventId": event_id,
        "eventDate": event_date,
        "eventType": event_type,
        "event": event,
    }))
    .unwrap()
}

/// The seed's creation of order SO-1 with two items.
fn creation(event_id: &str, event_date: &str) -> String {
    notification(
        event_id,
        CREATION,
        event_date,
        json!({
            "id": "SO-1",
            "href": "/nbi/api/v4/serviceOrder/SO-1",
            "externalId": "EXT-1",
            "state": "acknowledged",
            "orderDate": "2024-05-01T09:59:00.000Z",
            "priority": "1",
            "orderItem": [
                {"id": "1", "action": "add", "state": "acknowledged",
                 "service": {"name": "vFW", "serviceState": "active"}},
                {"id": "2", "action": "add", "state": "acknowledged",
                 "service": {"name": "vLB", "serviceState": "active"}}
            ]
        }),
    )
}

fn state_change(event_id: &str, event_date: &str, state: &str) -> String {
    notification(
        event_id,
        STATE_CHANGE,
        event_date,
        json!({"id": "SO-1", "state": state}),
    )
}

fn item_change(event_id: &str, event_date: &str, item: &str, state: &str) -> String {
    notification(
        event_id,
        ITEM_CHANGE,
        event_date,
        json!({"id": "SO-1", "orderItem": [{"id": item, "state": state}]}),
    )
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("request is answered");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        text: response.text().await.unwrap(),
    }
}

/// POST with the Bearer token and `Content-Type: application/json;charset=utf-8`.
async fn post(app: &TestApp, body: &str) -> Answer {
    send(
        app.http
            .post(app.url(PATH))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(CONTENT_TYPE, JSON_UTF8)
            .body(body.to_owned()),
    )
    .await
}

/// POST that must be accepted (201).
async fn accepted(app: &TestApp, body: &str) {
    let answer = post(app, body).await;
    assert_eq!(answer.status, 201, "{}", answer.text);
}

async fn order(app: &TestApp, id: &str) -> Value {
    let (status, body) = app.get_json(&format!("/api/v1/service-orders/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn listener_events(app: &TestApp) -> i64 {
    let store = app.store();
    tokio::task::spawn_blocking(move || store.inbox_stats(Some("listener")).unwrap().events)
        .await
        .unwrap()
}

/// An `ErrorRepresentation` answer with exactly this code, status and reason.
fn assert_error(answer: &Answer, status: u16, code: u64, reason: &str) -> String {
    assert_eq!(answer.status, status, "{}", answer.text);
    assert_eq!(answer.content_type(), JSON_UTF8);
    let body = answer.json();
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        body,
        json!({"code": code, "reason": reason, "message": message, "status": status}),
        "{}",
        answer.text
    );
    message
}

/// A second connection on the app's SQLite file, to make its commits fail for real.
fn sqlite(app: &TestApp) -> rusqlite::Connection {
    rusqlite::Connection::open(app.dir.join("subgate.db")).unwrap()
}

#[tokio::test]
async fn creation_answers_201_with_the_stored_listener_and_creates_the_order() {
    let app = listener_app(&[]).await;
    let body = creation("e-1", "2024-05-01T10:00:00.000Z");
    let answer = post(&app, &body).await;

    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.content_type(), JSON_UTF8);
    assert_eq!(
        answer.text, body,
        "the body as received is the stored Listener"
    );

    let order = order(&app, "SO-1").await;
    assert_eq!(order["id"], "SO-1");
    assert_eq!(order["state"], "acknowledged");
    assert_eq!(order["state_event_date"], "2024-05-01T10:00:00.000Z");
    assert_eq!(order["order"]["externalId"], "EXT-1");
    assert_eq!(
        order["order"]["priority"], "1",
        "unknown properties are kept"
    );
    assert_eq!(order["items"][0]["id"], "1");
    assert_eq!(order["items"][0]["state"], "acknowledged");
    assert_eq!(order["items"][1]["item"]["service"]["name"], "vLB");
    assert_eq!(order["version"], 1);
    let timeline = order["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 1);
    assert_eq!(timeline[0]["event_id"], "e-1");
    assert_eq!(timeline[0]["outcome"], "applied");

    // The inbox keeps the raw bytes and the eventId.
    let inbox = order["changed_by_event"].as_i64().unwrap();
    let (status, event) = app.get_json(&format!("/api/v1/inbox/{inbox}")).await;
    assert_eq!(status, 200);
    assert_eq!(event["raw"]["text"], body.as_str());
    assert_eq!(event["source"], "listener");
    assert_eq!(event["kind"], "service_order.created");
    assert_eq!(event["meta"]["event_id"], "e-1");
    assert_eq!(event["meta"]["credential"], "bearer_token");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn json_content_type_without_charset_is_accepted() {
    let app = listener_app(&[]).await;
    let answer = send(
        app.http
            .post(app.url(PATH))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(CONTENT_TYPE, "application/json")
            .body(creation("e-1", "2024-05-01T10:00:00Z")),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.content_type(), JSON_UTF8);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn event_id_replay_answers_201_and_records_nothing_new() {
    let app = listener_app(&[]).await;
    let body = creation("e-1", "2024-05-01T10:00:00.000Z");
    accepted(&app, &body).await;
    let replay = post(&app, &body).await;
    assert_eq!(replay.status, 201, "{}", replay.text);
    assert_eq!(replay.text, body);

    let order = order(&app, "SO-1").await;
    assert_eq!(order["version"], 1);
    assert_eq!(order["timeline"].as_array().unwrap().len(), 1);
    assert_eq!(listener_events(&app).await, 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn semantic_duplicate_with_new_event_id_answers_201_and_changes_nothing() {
    let app = listener_app(&[]).await;
    accepted(
        &app,
        &state_change("e-1", "2024-05-01T10:00:00Z", "inProgress"),
    )
    .await;
    let before = order(&app, "SO-1").await;
    // The hub re-emits the same logical notification with a fresh eventId (and a later date).
    let again = state_change("e-2", "2024-05-01T10:05:00Z", "inProgress");
    let answer = post(&app, &again).await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.text, again);

    let after = order(&app, "SO-1").await;
    assert_eq!(after, before);
    assert_eq!(listener_events(&app).await, 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn completed_arriving_before_in_progress_stays_completed_and_the_late_one_is_ignored() {
    let app = listener_app(&[]).await;
    let completed = state_change("e-3", "2024-05-01T10:30:00Z", "completed");
    let in_progress = state_change("e-2", "2024-05-01T10:10:00Z", "inProgress");
    accepted(&app, &completed).await;
    let late = post(&app, &in_progress).await;
    assert_eq!(late.status, 201, "a stale notification is still accepted");

    let order = order(&app, "SO-1").await;
    assert_eq!(order["state"], "completed");
    assert_eq!(order["state_event_date"], "2024-05-01T10:30:00.000Z");
    assert_eq!(order["version"], 1);
    let timeline = order["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 2);
    assert_eq!(timeline[1]["event_id"], "e-2");
    assert_eq!(timeline[1]["outcome"], "ignored");
    assert_eq!(timeline[1]["ignored"][0]["target"], "order");
    assert_eq!(timeline[1]["ignored"][0]["state"], "inProgress");
    assert_eq!(timeline[1]["ignored"][0]["current"], "completed");
    assert_eq!(timeline[1]["ignored"][0]["why"], "backwards");

    // Recorded in the inbox, raw kept, outcome stale.
    let inbox = timeline[1]["inbox_event"].as_i64().unwrap();
    let (_, event) = app.get_json(&format!("/api/v1/inbox/{inbox}")).await;
    assert_eq!(event["outcome"], "stale");
    assert_eq!(event["raw"]["text"], in_progress.as_str());
    assert_eq!(listener_events(&app).await, 2);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_older_active_state_does_not_undo_a_newer_one_but_a_newer_one_does() {
    let app = listener_app(&[]).await;
    for body in [
        state_change("e-1", "2024-05-01T10:00:00Z", "inProgress"),
        state_change("e-3", "2024-05-01T10:20:00Z", "held"),
        // Older than held: stale.
        state_change("e-2", "2024-05-01T10:10:00Z", "pending"),
    ] {
        accepted(&app, &body).await;
    }
    let held = order(&app, "SO-1").await;
    assert_eq!(held["state"], "held");
    assert_eq!(held["timeline"][2]["ignored"][0]["why"], "stale");

    // Back to inProgress later on: same semantic key as e-1, but it changes the order.
    let resumed = state_change("e-4", "2024-05-01T10:40:00Z", "inProgress");
    accepted(&app, &resumed).await;
    let order = order(&app, "SO-1").await;
    assert_eq!(order["state"], "inProgress");
    assert_eq!(order["state_event_date"], "2024-05-01T10:40:00.000Z");
    assert_eq!(order["timeline"].as_array().unwrap().len(), 4);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn item_state_changes_merge_into_the_items_without_replacing_the_list() {
    let app = listener_app(&[]).await;
    accepted(&app, &creation("e-1", "2024-05-01T10:00:00Z")).await;
    let answer = post(
        &app,
        &item_change("e-2", "2024-05-01T10:10:00Z", "2", "completed"),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);

    let order = order(&app, "SO-1").await;
    assert_eq!(
        order["state"], "acknowledged",
        "the order state is untouched"
    );
    let items = order["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], "1");
    assert_eq!(items[0]["state"], "acknowledged");
    assert_eq!(items[1]["id"], "2");
    assert_eq!(items[1]["state"], "completed");
    assert_eq!(items[1]["state_event_date"], "2024-05-01T10:10:00.000Z");
    assert_eq!(
        items[1]["item"]["action"], "add",
        "the item keeps what it had"
    );
    assert_eq!(
        order["timeline"][1]["changes"],
        json!([{"target": "item", "item_id": "2", "from": "acknowledged", "to": "completed"}])
    );

    // A late, older item notification does not move the item backwards.
    accepted(
        &app,
        &item_change("e-0", "2024-05-01T10:05:00Z", "2", "inProgress"),
    )
    .await;
    let order = self::order(&app, "SO-1").await;
    assert_eq!(order["items"][1]["state"], "completed");
    assert_eq!(order["timeline"][2]["outcome"], "ignored");
    assert_eq!(order["timeline"][2]["ignored"][0]["item_id"], "2");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_notification_for_an_unknown_order_creates_it() {
    let app = listener_app(&[]).await;
    let (status, _) = app.get_json("/api/v1/service-orders/SO-1").await;
    assert_eq!(status, 404);
    let answer = post(
        &app,
        &item_change("e-1", "2024-05-01T10:00:00Z", "7", "inProgress"),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    let order = order(&app, "SO-1").await;
    assert_eq!(order["state"], Value::Null);
    assert_eq!(order["items"][0]["id"], "7");
    assert_eq!(order["items"][0]["state"], "inProgress");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn body_errors_answer_400_with_codes_21_to_24_naming_the_field() {
    let app = listener_app(&[]).await;
    let m = assert_error(&post(&app, "").await, 400, 21, "Missing body");
    assert!(m.contains("no body"), "{m}");
    let m = assert_error(&post(&app, "{not json").await, 400, 22, "Invalid body");
    assert!(m.contains("not JSON"), "{m}");
    let m = assert_error(&post(&app, "[1, 2]").await, 400, 22, "Invalid body");
    assert!(m.contains("JSON array"), "{m}");

    let mut body: Value = serde_json::from_str(&creation("e-1", "2024-05-01T10:00:00Z")).unwrap();
    body.as_object_mut().unwrap().remove("eventId");
    let m = assert_error(
        &post(&app, &body.to_string()).await,
        400,
        23,
        "Missing body field",
    );
    assert_eq!(m, "body field `eventId` is required");

    body["eventId"] = json!("e-1");
    body["eventType"] = json!("ServiceOrderShippedNotification");
    let m = assert_error(
        &post(&app, &body.to_string()).await,
        400,
        24,
        "Invalid body field",
    );
    assert!(
        m.starts_with("body field `eventType` must be one of"),
        "{m}"
    );

    body["eventType"] = json!(CREATION);
    body["eventDate"] = json!("yesterday");
    let m = assert_error(
        &post(&app, &body.to_string()).await,
        400,
        24,
        "Invalid body field",
    );
    assert!(
        m.starts_with("body field `eventDate` must be an RFC 3339 date-time"),
        "{m}"
    );

    body["eventDate"] = json!("2024-05-01T10:00:00Z");
    body["event"] = json!("SO-1");
    let m = assert_error(
        &post(&app, &body.to_string()).await,
        400,
        24,
        "Invalid body field",
    );
    assert!(m.starts_with("body field `event` must be an object"), "{m}");

    assert_eq!(listener_events(&app).await, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn header_errors_answer_400_with_codes_25_and_26() {
    let app = listener_app(&[]).await;
    let body = creation("e-1", "2024-05-01T10:00:00Z");
    let missing = send(
        app.http
            .post(app.url(PATH))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(body.clone()),
    )
    .await;
    let m = assert_error(&missing, 400, 25, "Missing header");
    assert_eq!(m, "header `Content-Type` is required");

    for content_type in ["text/plain", "application/json;charset=iso-8859-1"] {
        let invalid = send(
            app.http
                .post(app.url(PATH))
                .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
                .header(CONTENT_TYPE, content_type)
                .body(body.clone()),
        )
        .await;
        let m = assert_error(&invalid, 400, 26, "Invalid header value");
        assert!(
            m.starts_with("header `Content-Type` must be application/json"),
            "{m}"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn credential_errors_answer_401_with_codes_40_41_42() {
    let app = listener_app(&[
        (
            "listener.bearer_tokens",
            r#"[{ token = "old-token", expires_at = "2020-01-01T00:00:00Z" }]"#,
        ),
        (
            "listener.basic_users",
            r#"[{ user = "hub", password = "hub-password" }]"#,
        ),
    ])
    .await;
    let body = creation("e-1", "2024-05-01T10:00:00Z");
    let with_auth = |auth: Option<&str>| {
        let mut request = app
            .http
            .post(app.url(PATH))
            .header(CONTENT_TYPE, JSON_UTF8)
            .body(body.clone());
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth.to_owned());
        }
        request
    };

    let missing = send(with_auth(None)).await;
    assert_error(&missing, 401, 40, "Missing credentials");
    assert_eq!(
        missing.headers["www-authenticate"],
        r#"Bearer realm="subgate", Basic realm="subgate""#
    );
    for wrong in [
        "Bearer not-the-token",
        "Bearer",
        "Digest abc",
        "Basic aHViOndyb25n",
    ] {
        assert_error(
            &send(with_auth(Some(wrong))).await,
            401,
            41,
            "Invalid credentials",
        );
    }
    let expired = send(with_auth(Some("Bearer old-token"))).await;
    assert_error(&expired, 401, 42, "Expired credentials");
    assert_eq!(listener_events(&app).await, 0);

    // Basic credentials work too: "hub:hub-password".
    let basic = send(with_auth(Some("Basic aHViOmh1Yi1wYXNzd29yZA=="))).await;
    assert_eq!(basic.status, 201, "{}", basic.text);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn rate_limit_per_credential_answers_403_with_code_53() {
    let app = listener_app(&[
        ("listener.rate_per_second", "0.001"),
        ("listener.rate_burst", "2"),
        ("listener.bearer_tokens", r#"[{ token = "second-token" }]"#),
    ])
    .await;
    for (i, date) in ["2024-05-01T10:00:00Z", "2024-05-01T10:01:00Z"]
        .iter()
        .enumerate()
    {
        let body = state_change(&format!("e-{i}"), date, ["inProgress", "held"][i]);
        accepted(&app, &body).await;
    }
    let limited = post(
        &app,
        &state_change("e-9", "2024-05-01T10:02:00Z", "completed"),
    )
    .await;
    let m = assert_error(&limited, 403, 53, "Too many requests");
    assert!(
        m.starts_with("too many requests for this credential"),
        "{m}"
    );
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        order(&app, "SO-1").await["state"],
        "held",
        "the limited one was not stored"
    );

    // Another credential has its own bucket.
    let other = send(
        app.http
            .post(app.url(PATH))
            .header(AUTHORIZATION, "Bearer second-token")
            .header(CONTENT_TYPE, JSON_UTF8)
            .body(state_change("e-9", "2024-05-01T10:02:00Z", "completed")),
    )
    .await;
    assert_eq!(other.status, 201, "{}", other.text);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn functional_errors_answer_422_with_codes_100_to_103() {
    let app = listener_app(&[]).await;
    let cases = [
        (
            notification(
                "e-1",
                STATE_CHANGE,
                "2024-05-01T10:00:00Z",
                json!({"state": "held"}),
            ),
            100,
            "No service order",
            "`event.id` is missing",
        ),
        (
            notification(
                "e-1",
                STATE_CHANGE,
                "2024-05-01T10:00:00Z",
                json!({"id": "SO-1", "state": "shipped"}),
            ),
            101,
            "Invalid service order state",
            "`event.state` must be one of acknowledged, rejected, pending, held, inProgress",
        ),
        (
            notification(
                "e-1",
                ITEM_CHANGE,
                "2024-05-01T10:00:00Z",
                json!({"id": "SO-1"}),
            ),
            102,
            "No order item",
            "must carry the changed item in `event.orderItem`",
        ),
        (
            notification(
                "e-1",
                ITEM_CHANGE,
                "2024-05-01T10:00:00Z",
                json!({"id": "SO-1", "orderItem": [{"id": "1"}]}),
            ),
            103,
            "Invalid order item",
            "`event.orderItem[0].state` is required",
        ),
    ];
    for (body, code, reason, names) in cases {
        let m = assert_error(&post(&app, &body).await, 422, code, reason);
        assert!(m.contains(names), "{code}: {m}");
    }
    assert_eq!(listener_events(&app).await, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_event_id_reused_for_another_notification_answers_422_with_code_104() {
    let app = listener_app(&[]).await;
    accepted(
        &app,
        &state_change("e-1", "2024-05-01T10:00:00Z", "inProgress"),
    )
    .await;
    let reused = post(
        &app,
        &state_change("e-1", "2024-05-01T10:10:00Z", "completed"),
    )
    .await;
    let m = assert_error(&reused, 422, 104, "eventId already used");
    assert!(
        m.starts_with("`eventId` \"e-1\" was already used by inbox event"),
        "{m}"
    );
    let order = self::order(&app, "SO-1").await;
    assert_eq!(order["state"], "inProgress");
    assert_eq!(listener_events(&app).await, 1);

    // Reused for a copy of another known notification: refused as well, and the pipeline goes on.
    accepted(&app, &state_change("e-2", "2024-05-01T10:10:00Z", "held")).await;
    let copy = post(&app, &state_change("e-1", "2024-05-01T10:10:00Z", "held")).await;
    assert_error(&copy, 422, 104, "eventId already used");
    accepted(
        &app,
        &state_change("e-3", "2024-05-01T10:20:00Z", "completed"),
    )
    .await;
    let order = self::order(&app, "SO-1").await;
    assert_eq!(order["state"], "completed");
    assert_eq!(order["timeline"].as_array().unwrap().len(), 3);
    assert_eq!(listener_events(&app).await, 3);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_store_failure_inside_the_transaction_answers_500_with_code_1() {
    let app = listener_app(&[]).await;
    sqlite(&app)
        .execute_batch(
            "CREATE TRIGGER test_history_refused BEFORE INSERT ON history
             BEGIN SELECT RAISE(ABORT, 'history refused by the test'); END;",
        )
        .unwrap();
    let answer = post(&app, &creation("e-1", "2024-05-01T10:00:00Z")).await;
    let m = assert_error(&answer, 500, 1, "Internal error");
    assert_eq!(m, "internal error", "the cause is logged, not shown");
    let (status, _) = app.get_json("/api/v1/service-orders/SO-1").await;
    assert_eq!(status, 404);
    assert_eq!(listener_events(&app).await, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_commit_that_fails_answers_503_with_code_5_and_the_retry_is_stored() {
    let app = listener_app(&[]).await;
    // Every inbox insert now leaves a deferred foreign-key violation: COMMIT itself fails.
    sqlite(&app)
        .execute_batch(
            "CREATE TABLE test_guard_parent (id INTEGER PRIMARY KEY);
             CREATE TABLE test_guard (parent INTEGER
                 REFERENCES test_guard_parent (id) DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER test_commit_fails AFTER INSERT ON inbox
             BEGIN INSERT INTO test_guard (parent) VALUES (1); END;",
        )
        .unwrap();
    let body = creation("e-1", "2024-05-01T10:00:00Z");
    let answer = post(&app, &body).await;
    let m = assert_error(&answer, 503, 5, "The service is temporarily unavailable");
    assert_eq!(m, "the notification was not stored; retry later");
    let (status, _) = app.get_json("/api/v1/service-orders/SO-1").await;
    assert_eq!(status, 404, "nothing was committed");
    assert_eq!(listener_events(&app).await, 0);

    sqlite(&app)
        .execute_batch("DROP TRIGGER test_commit_fails;")
        .unwrap();
    let retry = post(&app, &body).await;
    assert_eq!(retry.status, 201, "{}", retry.text);
    assert_eq!(order(&app, "SO-1").await["state"], "acknowledged");
    assert_eq!(listener_events(&app).await, 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_listener_is_served_over_tls_with_a_certificate_generated_by_the_test() {
    subgate::http::tls::install_crypto_provider();
    let dir = temp_dir("tls");
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert_pem = generated.cert.pem();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();

    let settings = test_settings(
        &dir,
        &[
            ("listener.enabled", "true"),
            ("listener.bearer_token", TOKEN),
            ("listener.plain_http", "false"),
            ("listener.tls.enabled", "true"),
            ("listener.tls.addr", "127.0.0.1:0"),
            ("listener.tls.cert_path", cert_path.to_str().unwrap()),
            ("listener.tls.key_path", key_path.to_str().unwrap()),
        ],
    );
    let built = Application::build(settings.clone()).await.unwrap();
    let tls_addr = built.tls_addr().expect("TLS is enabled");
    let app = run_app(built, settings, dir);

    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let body = creation("e-1", "2024-05-01T10:00:00Z");
    let answer = send(
        https
            .post(format!("https://127.0.0.1:{}{PATH}", tls_addr.port()))
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(CONTENT_TYPE, JSON_UTF8)
            .body(body.clone()),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.content_type(), JSON_UTF8);
    assert_eq!(answer.text, body);

    let order = order(&app, "SO-1").await;
    let inbox = order["changed_by_event"].as_i64().unwrap();
    let (_, event) = app.get_json(&format!("/api/v1/inbox/{inbox}")).await;
    assert_eq!(event["meta"]["transport"], "https");

    // plain_http = false: the listener route is not served on the plain address.
    assert_eq!(post(&app, &body).await.status, 404);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn openapi_documents_the_listener_and_metrics_count_its_requests() {
    let app = listener_app(&[]).await;
    let (_, doc) = app.get_json("/openapi.json").await;
    assert!(doc["paths"][PATH]["post"]["responses"]["422"].is_object());
    assert!(doc["paths"]["/api/v1/service-orders/{id}"]["get"].is_object());

    accepted(&app, &creation("e-1", "2024-05-01T10:00:00Z")).await;
    assert_eq!(post(&app, "").await.status, 400);
    let metrics = app.metrics().await;
    for series in [
        r#"subgate_listener_notifications_total{event_type="ServiceOrderCreationNotification",outcome="applied"}"#,
        r#"subgate_listener_requests_total{status="201",code="none"}"#,
        r#"subgate_listener_requests_total{status="400",code="21"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    app.stop().await.unwrap();
}
