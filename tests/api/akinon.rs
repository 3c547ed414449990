//! The Akinon Extension Subscription Gateway (`docs/contracts/akinon-extension-subscription-gateway.md`), end to end over HTTP.

use reqwest::{header, RequestBuilder, Response};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

pub const USER: &str = "akinon";
pub const PASSWORD: &str = "0123-akinon-pass";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789";
pub const LINK_SECRET: &str = "link-secret-0123456789";

/// The document's subscribe-user example, as printed.
pub const USER_EXAMPLE: &str = r#"{
  "pk": 1,
  "username": "username",
  "firstName": "Test",
  "lastName": "User",
  "email": "user@example.com",
  "phone": "05351234567",
  "gender": "M",
  "dateOfBirth": "1990-01-01",
  "languageCode": "tr",
  "emailAllowed": true,
  "smsAllowed": true,
  "callAllowed": true,
  "whatsappAllowed": false,
  "isActive": true,
  "isStaff": false,
  "userType": "registered",
  "attributes": {
    "logged_ip": "127.0.0.1"
  },
  "dateJoined": "2024-01-01T00:00:00Z",
  "lastLogin": "2024-06-01T00:00:00Z",
  "modifiedDate": "2024-06-01T00:00:00Z"
}"#;

/// The document's order-info example, as printed.
pub const ORDER_EXAMPLE: &str = r#"{
  "pk": 1,
  "number": "ORD-0001",
  "status": "approved",
  "currency": "try",
  "amount": "199.99",
  "discountAmount": "10.00",
  "shippingAmount": "0.00",
  "createdDate": "2024-01-01T00:00:00Z",
  "user": {
    "pk": 1,
    "username": "username",
    "firstName": "Test",
    "lastName": "User",
    "email": "user@example.com",
    "phone": "05351234567",
    "gender": "M",
    "dateOfBirth": "1990-01-01",
    "languageCode": "tr",
    "emailAllowed": true,
    "smsAllowed": true,
    "callAllowed": true,
    "whatsappAllowed": false,
    "isActive": true,
    "isStaff": false,
    "userType": "registered",
    "attributes": {
      "logged_ip": "127.0.0.1"
    },
    "dateJoined": "2024-01-01T00:00:00Z",
    "lastLogin": "2024-06-01T00:00:00Z",
    "modifiedDate": "2024-06-01T00:00:00Z"
  },
  "orderItems": [
    {
      "pk": 1,
      "product": {
        "pk": 10,
        "sku": "SKU-001"
      },
      "price": "99.99",
      "priceCurrency": "try",
      "taxRate": "18.00",
      "status": "approved"
    }
  ]
}"#;

pub const EMAIL_EXAMPLE: &str = r#"{
  "email": "user@example.com",
  "domain": "example.com"
}"#;

/// An app with Akinon credentials, an admin token and a link secret configured.
pub async fn akinon_app(extra: &[(&str, &str)]) -> TestApp {
    let mut overrides = vec![
        ("akinon.username", USER),
        ("akinon.password", PASSWORD),
        ("admin.token", ADMIN_TOKEN),
        ("consent.link_secret", LINK_SECRET),
    ];
    overrides.extend_from_slice(extra);
    spawn_app(&overrides).await
}

/// A request as Akinon Commerce sends it: Basic auth, both headers, JSON.
pub fn akinon(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    request_id: &str,
) -> RequestBuilder {
    app.http
        .request(method, app.url(path))
        .basic_auth(USER, Some(PASSWORD))
        .header("x-akinon-request-id", request_id)
        .header("x-akinon-api-version", "2")
        .header(header::CONTENT_TYPE, "application/json")
}

pub async fn post(app: &TestApp, path: &str, body: &str, request_id: &str) -> Response {
    akinon(app, reqwest::Method::POST, path, request_id)
        .body(body.to_owned())
        .send()
        .await
        .expect("request is sent")
}

pub async fn unsubscribed(app: &TestApp, from: &str, to: &str) -> (u16, Value) {
    let r = akinon(app, reqwest::Method::GET, "/unsubscribed-users", "poll-1")
        .query(&[("fromDate", from), ("toDate", to)])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Assert an Akinon error answer: status, and the first error's code and field.
pub async fn assert_error(r: Response, status: u16, code: &str, field: &str) {
    assert_eq!(r.status().as_u16(), status, "status");
    let body: Value = r.json().await.expect("a JSON error body");
    let first = &body["errors"][0];
    assert_eq!(first["code"], code, "{body}");
    assert_eq!(first["field"], field, "{body}");
    assert!(
        first["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

pub async fn report(app: &TestApp, body: Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/api/v1/consents"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn akinon_events(app: &TestApp) -> i64 {
    app.store().inbox_stats(Some("akinon")).unwrap().events
}

fn with(example: &str, changes: Value) -> String {
    let mut v: Value = serde_json::from_str(example).unwrap();
    for (k, val) in changes.as_object().unwrap() {
        v[k] = val.clone();
    }
    v.to_string()
}

#[tokio::test]
async fn subscribe_email_example_answers_200_with_no_body_and_opts_the_address_in() {
    let app = akinon_app(&[]).await;
    let r = post(&app, "/subscribe-email", EMAIL_EXAMPLE, "req-email-1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    let (status, body) = app
        .get_json("/api/v1/consents?address=User@Example.com")
        .await;
    assert_eq!(status, 200);
    let email = &body["channels"][0];
    assert_eq!(email["channel"], "email");
    assert_eq!(email["address"], "user@example.com");
    assert_eq!(email["state"], "opted_in");
    assert_eq!(email["source"], "akinon");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn subscribe_user_example_stores_the_profile_and_its_consents() {
    let app = akinon_app(&[]).await;
    let r = post(&app, "/subscribe-user", USER_EXAMPLE, "req-user-1").await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());

    let (status, body) = app.get_json("/api/v1/akinon/users/1").await;
    assert_eq!(status, 200);
    assert_eq!(body["state"]["firstName"], "Test");
    // Unknown fields are accepted and kept.
    assert_eq!(body["state"]["username"], "username");
    assert_eq!(body["state"]["attributes"]["logged_ip"], "127.0.0.1");
    assert_eq!(body["occurred_at"], "2024-06-01T00:00:00.000Z");
    let consents: Vec<(String, String, String)> = body["consents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().to_owned(),
                c["address"].as_str().unwrap().to_owned(),
                c["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expect = |ch: &str, addr: &str, st: &str| (ch.to_owned(), addr.to_owned(), st.to_owned());
    assert_eq!(
        consents,
        [
            expect("email", "user@example.com", "opted_in"),
            expect("sms", "+905351234567", "opted_in"),
            expect("call", "+905351234567", "opted_in"),
            expect("whatsapp", "+905351234567", "opted_out"),
        ]
    );

    // The inbox keeps the bytes as received, with the request id.
    let event = body["changed_by_event"].as_i64().unwrap();
    let (_, inbox) = app.get_json(&format!("/api/v1/inbox/{event}")).await;
    assert_eq!(inbox["raw"]["text"], USER_EXAMPLE);
    assert_eq!(inbox["source"], "akinon");
    assert_eq!(inbox["meta"]["request_id"], "req-user-1");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn order_info_example_stores_the_order_and_applies_the_embedded_user() {
    let app = akinon_app(&[]).await;
    let r = post(&app, "/order-info", ORDER_EXAMPLE, "req-order-1").await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());

    let (status, order) = app.get_json("/api/v1/akinon/orders/1").await;
    assert_eq!(status, 200);
    // Decimal strings are kept exactly as sent.
    assert_eq!(order["state"]["amount"], "199.99");
    assert_eq!(order["state"]["discountAmount"], "10.00");
    assert_eq!(order["state"]["orderItems"][0]["price"], "99.99");
    assert_eq!(order["state"]["orderItems"][0]["taxRate"], "18.00");
    assert_eq!(order["state"]["orderItems"][0]["product"]["sku"], "SKU-001");
    assert_eq!(order["user"], "1");

    let (status, user) = app.get_json("/api/v1/akinon/users/1").await;
    assert_eq!(status, 200);
    assert_eq!(user["state"]["email"], "user@example.com");
    assert_eq!(user["orders"], json!(["1"]));
    assert_eq!(user["consents"].as_array().unwrap().len(), 4);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn retried_call_answers_200_and_changes_nothing() {
    let app = akinon_app(&[]).await;
    for _ in 0..3 {
        let r = post(&app, "/subscribe-user", USER_EXAMPLE, "req-retry").await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(akinon_events(&app), 1);
    let (_, user) = app.get_json("/api/v1/akinon/users/1").await;
    assert_eq!(user["version"], 1);
    let (_, consents) = app
        .get_json("/api/v1/consents?address=user@example.com")
        .await;
    assert_eq!(
        consents["channels"][0]["history"].as_array().unwrap().len(),
        1
    );

    // The same request id with another body is another call.
    let changed = with(USER_EXAMPLE, json!({ "firstName": "Changed" }));
    assert_eq!(
        post(&app, "/subscribe-user", &changed, "req-retry")
            .await
            .status(),
        200
    );
    assert_eq!(akinon_events(&app), 2);
    let (_, user) = app.get_json("/api/v1/akinon/users/1").await;
    assert_eq!(
        (user["version"].as_i64(), &user["state"]["firstName"]),
        (Some(2), &json!("Changed"))
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn older_modified_date_never_overwrites_a_newer_profile() {
    let app = akinon_app(&[]).await;
    let newer = with(
        USER_EXAMPLE,
        json!({ "firstName": "Newer", "emailAllowed": false, "modifiedDate": "2024-06-02T00:00:00Z" }),
    );
    let older = with(
        USER_EXAMPLE,
        json!({ "firstName": "Older", "emailAllowed": true }),
    );
    assert_eq!(
        post(&app, "/subscribe-user", &newer, "r-new")
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&app, "/subscribe-user", &older, "r-old")
            .await
            .status(),
        200
    );

    let (_, user) = app.get_json("/api/v1/akinon/users/1").await;
    assert_eq!(user["state"]["firstName"], "Newer");
    assert_eq!(user["consents"][0]["state"], "opted_out");
    // The older call is still recorded, as stale.
    let stale = app.store().inbox_stats(Some("akinon")).unwrap();
    assert_eq!(stale.events, 2);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn header_and_auth_errors_answer_their_status_code_and_field() {
    let app = akinon_app(&[]).await;
    let url = app.url("/subscribe-user");
    let full = || {
        app.http
            .post(&url)
            .basic_auth(USER, Some(PASSWORD))
            .header("x-akinon-request-id", "r1")
            .header("x-akinon-api-version", "2")
            .header(header::CONTENT_TYPE, "application/json")
            .body(USER_EXAMPLE)
    };
    let bare = || app.http.post(&url).body(USER_EXAMPLE);

    let r = bare()
        .header("x-akinon-request-id", "r1")
        .header("x-akinon-api-version", "2")
        .header(header::CONTENT_TYPE, "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()[header::WWW_AUTHENTICATE],
        "Basic realm=\"subgate\""
    );
    assert_error(r, 401, "missing_credentials", "Authorization").await;
    let wrong = bare().basic_auth(USER, Some("wrong")).send().await.unwrap();
    assert_error(wrong, 401, "invalid_credentials", "Authorization").await;
    let other_user = bare()
        .basic_auth("someone", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_error(other_user, 401, "invalid_credentials", "Authorization").await;
    let bearer = bare().bearer_auth(PASSWORD).send().await.unwrap();
    assert_error(bearer, 401, "invalid_credentials", "Authorization").await;

    let no_id = bare()
        .basic_auth(USER, Some(PASSWORD))
        .header("x-akinon-api-version", "2")
        .header(header::CONTENT_TYPE, "application/json")
        .send()
        .await
        .unwrap();
    assert_error(no_id, 400, "missing_header", "x-akinon-request-id").await;
    let no_version = bare()
        .basic_auth(USER, Some(PASSWORD))
        .header("x-akinon-request-id", "r1")
        .header(header::CONTENT_TYPE, "application/json")
        .send()
        .await
        .unwrap();
    assert_error(no_version, 400, "missing_header", "x-akinon-api-version").await;
    let v1 = bare()
        .basic_auth(USER, Some(PASSWORD))
        .header("x-akinon-request-id", "r1")
        .header("x-akinon-api-version", "1")
        .header(header::CONTENT_TYPE, "application/json")
        .send()
        .await
        .unwrap();
    assert_error(v1, 400, "unsupported_api_version", "x-akinon-api-version").await;
    let text = bare()
        .basic_auth(USER, Some(PASSWORD))
        .header("x-akinon-request-id", "r1")
        .header("x-akinon-api-version", "2")
        .header(header::CONTENT_TYPE, "text/plain")
        .send()
        .await
        .unwrap();
    assert_error(text, 415, "unsupported_media_type", "Content-Type").await;
    let not_json = full().body("{\"pk\": 1,").send().await.unwrap();
    assert_error(not_json, 400, "invalid_json", "").await;
    let array = full().body("[1]").send().await.unwrap();
    assert_error(array, 400, "invalid_json", "").await;

    // Nothing of the above was recorded.
    assert_eq!(akinon_events(&app), 0);
    assert_eq!(full().send().await.unwrap().status(), 200);
    assert_eq!(akinon_events(&app), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn field_errors_name_the_field() {
    let app = akinon_app(&[]).await;
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "/subscribe-email",
            r#"{"domain":"example.com"}"#.into(),
            "missing_field",
            "email",
        ),
        (
            "/subscribe-email",
            r#"{"email":"not-an-email","domain":"example.com"}"#.into(),
            "invalid_field",
            "email",
        ),
        (
            "/subscribe-user",
            with(USER_EXAMPLE, json!({ "pk": "1" })),
            "invalid_field",
            "pk",
        ),
        (
            "/subscribe-user",
            with(USER_EXAMPLE, json!({ "email": null })),
            "missing_field",
            "email",
        ),
        (
            "/subscribe-user",
            with(USER_EXAMPLE, json!({ "smsAllowed": "true" })),
            "invalid_field",
            "smsAllowed",
        ),
        (
            "/subscribe-user",
            with(USER_EXAMPLE, json!({ "modifiedDate": "01.06.2024" })),
            "invalid_field",
            "modifiedDate",
        ),
        (
            "/subscribe-user",
            with(USER_EXAMPLE, json!({ "phone": "call me" })),
            "invalid_field",
            "phone",
        ),
        (
            "/subscribe-user",
            with(USER_EXAMPLE, json!({ "attributes": [] })),
            "invalid_field",
            "attributes",
        ),
        (
            "/order-info",
            with(ORDER_EXAMPLE, json!({ "currency": "TRY" })),
            "invalid_field",
            "currency",
        ),
        (
            "/order-info",
            with(ORDER_EXAMPLE, json!({ "amount": 199.99 })),
            "invalid_field",
            "amount",
        ),
        (
            "/order-info",
            with(ORDER_EXAMPLE, json!({ "user": { "pk": 1 } })),
            "missing_field",
            "user.email",
        ),
        (
            "/order-info",
            with(
                ORDER_EXAMPLE,
                json!({ "orderItems": [{ "pk": 1, "product": { "pk": 10, "sku": "S" },
                "price": "99,99", "priceCurrency": "try", "taxRate": "18.00", "status": "approved" }] }),
            ),
            "invalid_field",
            "orderItems[0].price",
        ),
    ];
    for (i, (path, body, code, field)) in cases.into_iter().enumerate() {
        let r = post(&app, path, &body, &format!("bad-{i}")).await;
        assert_error(r, 400, code, field).await;
    }
    // Several problems are reported together.
    let body = with(USER_EXAMPLE, json!({ "pk": null, "isStaff": 0 }));
    let r = post(&app, "/subscribe-user", &body, "bad-many").await;
    let errors: Value = r.json().await.unwrap();
    assert_eq!(errors["errors"][0]["field"], "pk");
    assert_eq!(errors["errors"][1]["field"], "isStaff");
    assert_eq!(akinon_events(&app), 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn rotated_credentials_are_all_accepted() {
    let app = akinon_app(&[(
        "akinon.extra_credentials",
        r#"[{ username = "akinon-next", password = "next-pass-0000" }]"#,
    )])
    .await;
    for (user, pass, id) in [
        (USER, PASSWORD, "a"),
        ("akinon-next", "next-pass-0000", "b"),
    ] {
        let r = app
            .http
            .post(app.url("/subscribe-email"))
            .basic_auth(user, Some(pass))
            .header("x-akinon-request-id", id)
            .header("x-akinon-api-version", "2")
            .header(header::CONTENT_TYPE, "application/json")
            .body(EMAIL_EXAMPLE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{user}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn body_over_the_limit_answers_413() {
    let app = akinon_app(&[("http.body_limit_bytes", "1024")]).await;
    let padded = with(
        USER_EXAMPLE,
        json!({ "attributes": { "pad": "x".repeat(2000) } }),
    );
    let r = post(&app, "/subscribe-user", &padded, "big").await;
    assert_error(r, 413, "payload_too_large", "").await;
    assert_eq!(akinon_events(&app), 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn calls_over_the_rate_limit_answer_429_with_retry_after() {
    let app = akinon_app(&[
        ("akinon.rate_limit_per_second", "0.01"),
        ("akinon.rate_limit_burst", "2"),
    ])
    .await;
    for id in ["r1", "r2"] {
        assert_eq!(
            post(&app, "/subscribe-email", EMAIL_EXAMPLE, id)
                .await
                .status(),
            200
        );
    }
    let r = post(&app, "/subscribe-email", EMAIL_EXAMPLE, "r3").await;
    assert_eq!(r.headers()[header::RETRY_AFTER], "100");
    assert_error(r, 429, "rate_limited", "").await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn path_prefix_moves_the_endpoints_and_trailing_slashes_are_accepted() {
    let app = akinon_app(&[("akinon.path_prefix", "/ext/akinon")]).await;
    assert_eq!(
        post(&app, "/ext/akinon/subscribe-email", EMAIL_EXAMPLE, "p1")
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&app, "/ext/akinon/subscribe-email/", EMAIL_EXAMPLE, "p2")
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&app, "/subscribe-email", EMAIL_EXAMPLE, "p3")
            .await
            .status(),
        404
    );
    let r = akinon(
        &app,
        reqwest::Method::GET,
        "/ext/akinon/subscribe-email",
        "p4",
    )
    .send()
    .await
    .unwrap();
    assert_error(r, 405, "method_not_allowed", "").await;
    app.stop().await.unwrap();
}

/// Commerce sends the user at 09:00; a provider reports opt-outs between 10:00 and 11:00.
#[tokio::test]
async fn unsubscribed_users_lists_outside_opt_outs_still_in_effect() {
    let app = akinon_app(&[]).await;
    let user = with(
        USER_EXAMPLE,
        json!({ "modifiedDate": "2024-06-01T09:00:00Z" }),
    );
    assert_eq!(
        post(&app, "/subscribe-user", &user, "u-0900")
            .await
            .status(),
        200
    );

    let change = |address: &str, channel: &str, state: &str, at: &str| json!({ "channel": channel, "address": address, "state": state, "source": "emarsys", "occurredAt": at });
    for body in [
        // Unsubscribed at 10:00, re-subscribed at 10:30: not in the 11:00 answer.
        change(
            "back@example.com",
            "email",
            "opted_out",
            "2024-06-01T10:00:00Z",
        ),
        change(
            "back@example.com",
            "email",
            "opted_in",
            "2024-06-01T10:30:00Z",
        ),
        // Commerce's own user, in other forms: answered as Commerce sent them.
        change(
            "USER@example.com",
            "email",
            "opted_out",
            "2024-06-01T10:15:00Z",
        ),
        change(
            "+90 535 123 45 67",
            "sms",
            "opted_out",
            "2024-06-01T10:20:00Z",
        ),
        // Outside the window.
        change(
            "late@example.com",
            "email",
            "opted_out",
            "2024-06-01T11:00:00Z",
        ),
        change("+905359999999", "call", "opted_out", "2024-06-01T09:59:59Z"),
        // Whatsapp is not part of the answer.
        change(
            "+905351234567",
            "whatsapp",
            "opted_out",
            "2024-06-01T10:40:00Z",
        ),
    ] {
        let (status, answer) = report(&app, body).await;
        assert_eq!(status, 200, "{answer}");
    }
    // Akinon's own opt-out is not reported back to it.
    let own = json!({ "pk": 2, "email": "own@example.com", "emailAllowed": false, "phone": null,
                      "modifiedDate": "2024-06-01T10:45:00Z" });
    assert_eq!(
        post(&app, "/subscribe-user", &with(USER_EXAMPLE, own), "u-own")
            .await
            .status(),
        200
    );

    let (status, body) = unsubscribed(&app, "2024-06-01T10:00:00Z", "2024-06-01T11:00:00Z").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "emailUnsubscribed": ["user@example.com"],
            "smsUnsubscribed": ["05351234567"],
            "callUnsubscribed": []
        })
    );
    // A window that holds both 10:00 and 10:30 of back@ but ends before 10:30 still lists it
    // only if it is still opted out now: it is not.
    let (_, early) = unsubscribed(&app, "2024-06-01T09:00:00Z", "2024-06-01T10:10:00Z").await;
    assert_eq!(early["emailUnsubscribed"], json!([]));
    assert_eq!(early["callUnsubscribed"], json!(["+905359999999"]));
    // Dates alone are midnight UTC: the whole of 1 June.
    let (status, day) = unsubscribed(&app, "2024-06-01", "2024-06-02").await;
    assert_eq!(status, 200, "{day}");
    let mut emails: Vec<String> = serde_json::from_value(day["emailUnsubscribed"].clone()).unwrap();
    emails.sort();
    assert_eq!(emails, ["late@example.com", "user@example.com"]);
    assert_eq!(day["smsUnsubscribed"], json!(["05351234567"]));
    assert_eq!(day["callUnsubscribed"], json!(["+905359999999"]));
    // A date-only toDate is exclusive: nothing of 1 June is in the window that ends there.
    let (_, before) = unsubscribed(&app, "2024-05-31", "2024-06-01").await;
    assert_eq!(before["emailUnsubscribed"], json!([]));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn unsubscribed_users_answers_snake_case_when_configured() {
    let app = akinon_app(&[("akinon.unsubscribed_keys", "snake")]).await;
    let (status, body) = unsubscribed(&app, "2024-06-01T10:00:00Z", "2024-06-01T11:00:00Z").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({ "email_unsubscribed": [], "sms_unsubscribed": [], "call_unsubscribed": [] })
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn unsubscribed_users_query_errors_name_the_field() {
    let app = akinon_app(&[("akinon.unsubscribed_max_range", "24h")]).await;
    let get = |query: &'static [(&'static str, &'static str)]| {
        akinon(&app, reqwest::Method::GET, "/unsubscribed-users", "q")
            .query(query)
            .send()
    };
    assert_error(
        get(&[("toDate", "2024-06-01T11:00:00Z")]).await.unwrap(),
        400,
        "missing_field",
        "fromDate",
    )
    .await;
    assert_error(
        get(&[
            ("fromDate", "last tuesday"),
            ("toDate", "2024-06-01T11:00:00Z"),
        ])
        .await
        .unwrap(),
        400,
        "invalid_field",
        "fromDate",
    )
    .await;
    assert_error(
        get(&[
            ("fromDate", "2024-06-01T11:00:00Z"),
            ("toDate", "2024-06-01T10:00:00Z"),
        ])
        .await
        .unwrap(),
        400,
        "invalid_range",
        "toDate",
    )
    .await;
    assert_error(
        get(&[
            ("fromDate", "2024-06-01T11:00:00Z"),
            ("toDate", "2024-06-03T11:00:00Z"),
        ])
        .await
        .unwrap(),
        400,
        "range_too_large",
        "toDate",
    )
    .await;
    let no_auth =
        app.http
            .get(app.url(
                "/unsubscribed-users?fromDate=2024-06-01T10:00:00Z&toDate=2024-06-01T11:00:00Z",
            ))
            .send()
            .await
            .unwrap();
    assert_error(no_auth, 401, "missing_credentials", "Authorization").await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn phone_forms_are_one_address_answered_in_the_form_commerce_sent_last() {
    let app = akinon_app(&[]).await;
    for (i, phone) in ["05351234567", "5351234567", "+905351234567"]
        .into_iter()
        .enumerate()
    {
        let body = with(
            USER_EXAMPLE,
            json!({ "pk": i + 1, "phone": phone, "modifiedDate": format!("2024-06-01T09:0{i}:00Z") }),
        );
        assert_eq!(
            post(&app, "/subscribe-user", &body, &format!("ph-{i}"))
                .await
                .status(),
            200
        );
    }
    let (status, ledger) = app
        .get_json("/api/v1/consents?address=0535%20123%2045%2067")
        .await;
    assert_eq!(status, 200);
    let sms = &ledger["channels"][0];
    assert_eq!(
        (sms["channel"].as_str(), sms["key"].as_str()),
        (Some("sms"), Some("sms:+905351234567"))
    );
    // One address: the same opt-in three times is one change.
    assert_eq!(sms["history"].as_array().unwrap().len(), 1);

    report(
        &app,
        json!({ "channel": "sms", "address": "905351234567", "state": "opted_out",
                "source": "revotas", "occurredAt": "2024-06-01T10:05:00Z" }),
    )
    .await;
    let (_, body) = unsubscribed(&app, "2024-06-01T10:00:00Z", "2024-06-01T11:00:00Z").await;
    assert_eq!(body["smsUnsubscribed"], json!(["+905351234567"]));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn store_that_cannot_commit_answers_503_not_200() {
    let app = akinon_app(&[]).await;
    let db = app.dir.join("subgate.db");
    // Another connection holds the write lock: the ingest transaction cannot begin.
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = post(&app, "/subscribe-user", USER_EXAMPLE, "while-down").await;
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..]),
        "Akinon is told when to call again"
    );
    assert_error(r, 503, "store_unavailable", "").await;
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    assert_eq!(akinon_events(&app), 0);
    let (status, _) = app.get_json("/api/v1/akinon/users/1").await;
    assert_eq!(status, 404);
    // Akinon retries: now it is recorded.
    assert_eq!(
        post(&app, "/subscribe-user", USER_EXAMPLE, "while-down")
            .await
            .status(),
        200
    );
    assert_eq!(akinon_events(&app), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn openapi_documents_the_akinon_and_consent_routes() {
    let app = akinon_app(&[]).await;
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/subscribe-email",
        "/subscribe-user",
        "/order-info",
        "/unsubscribed-users",
        "/api/v1/akinon/users/{id}",
        "/api/v1/akinon/orders/{id}",
        "/api/v1/consents",
        "/u/{token}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    app.stop().await.unwrap();
}
