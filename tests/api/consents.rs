//! Opt-outs from outside Akinon: the admin API and one-click unsubscribe links.

use reqwest::header;
use serde_json::{json, Value};

use crate::akinon::{akinon_app, report, unsubscribed, ADMIN_TOKEN, LINK_SECRET};

fn consent_events(app: &crate::helpers::TestApp) -> i64 {
    let store = app.store();
    store.inbox_stats(Some("admin")).unwrap().events
        + store.inbox_stats(Some("unsubscribe_link")).unwrap().events
}

#[tokio::test]
async fn consent_reports_need_the_admin_token_and_a_retry_is_a_duplicate() {
    let app = akinon_app(&[]).await;
    let body = json!({ "channel": "email", "address": "A@Example.com", "state": "opted_out",
                       "source": "emarsys", "occurredAt": "2024-06-01T10:00:00Z" });
    for auth in [None, Some("wrong-token")] {
        let mut r = app.http.post(app.url("/api/v1/consents")).json(&body);
        if let Some(token) = auth {
            r = r.bearer_auth(token);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["code"], "unauthorized");
    }
    assert_eq!(consent_events(&app), 0);

    let (status, first) = report(&app, body.clone()).await;
    assert_eq!((status, first["outcome"].as_str()), (200, Some("applied")));
    assert_eq!(first["key"], "email:a@example.com");
    let (status, again) = report(&app, body).await;
    assert_eq!(
        (status, again["outcome"].as_str()),
        (200, Some("duplicate"))
    );
    assert_eq!(consent_events(&app), 1);

    let (status, ledger) = app.get_json("/api/v1/consents?address=a@example.com").await;
    assert_eq!(status, 200);
    let email = &ledger["channels"][0];
    assert_eq!(email["state"], "opted_out");
    assert_eq!(email["source"], "emarsys");
    assert_eq!(email["as_sent"], "A@Example.com");
    assert_eq!(email["at"], "2024-06-01T10:00:00.000Z");
    assert_eq!(email["history"].as_array().unwrap().len(), 1);

    let (status, bad) = report(
        &app,
        json!({ "channel": "fax", "address": "x", "state": "opted_out", "source": "s" }),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn admin_api_is_closed_without_a_configured_token() {
    let app = akinon_app(&[("admin.token", "")]).await;
    let r = app
        .http
        .post(app.url("/api/v1/consents"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "channel": "email", "address": "a@example.com", "state": "opted_out", "source": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn read_api_needs_the_read_or_admin_token_once_one_is_configured() {
    let app = akinon_app(&[("admin.read_token", "read-token-0123")]).await;
    let body = json!({ "channel": "email", "address": "b@example.com", "state": "opted_out",
                       "source": "emarsys", "occurredAt": "2024-06-01T10:00:00Z" });
    assert_eq!(report(&app, body).await.0, 200);
    let get = |token: Option<&'static str>, path: &'static str| {
        let mut r = app.http.get(app.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap() }
    };
    for token in [None, Some("wrong")] {
        for path in [
            "/api/v1/consents?address=b@example.com",
            "/api/v1/erp/customers/1",
            "/api/v1/akinon/users/1",
            "/api/v1/service-orders/1",
        ] {
            let r = get(token, path).await;
            assert_eq!(r.status(), 401, "{path} with {token:?}");
            let err: Value = r.json().await.unwrap();
            assert_eq!(err["error"]["code"], "unauthorized");
        }
    }
    for token in ["read-token-0123", ADMIN_TOKEN] {
        let r = get(Some(token), "/api/v1/consents?address=b@example.com").await;
        assert_eq!(r.status(), 200);
        let ledger: Value = r.json().await.unwrap();
        assert_eq!(ledger["channels"][0]["state"], "opted_out");
    }
    // Health, metrics and the upstream contracts' own routes are not behind the read token.
    assert_eq!(get(None, "/healthz").await.status(), 200);
    let r = get(
        None,
        "/unsubscribed-users?fromDate=2024-06-01T00:00:00Z&toDate=2024-06-02T00:00:00Z",
    )
    .await;
    assert_eq!(
        r.status(),
        401,
        "Akinon's route keeps Akinon's Basic credentials"
    );
    app.stop().await.unwrap();
}

/// The URL `subgate unsubscribe-link` prints, made relative to the test app.
fn printed_link(email: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_subgate"))
        .args(["unsubscribe-link", "--email", email])
        .env("SUBGATE__CONSENT__LINK_SECRET", LINK_SECRET)
        .env(
            "SUBGATE__CONSENT__LINK_BASE_URL",
            "https://mail.example.com/",
        )
        .output()
        .expect("subgate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let path = url
        .strip_prefix("https://mail.example.com")
        .expect("link starts with the base URL");
    assert!(path.starts_with("/u/"), "{url}");
    // Opaque: the link does not carry the address, in any case, nor its base64.
    let lower = path.to_ascii_lowercase();
    assert!(!lower.contains(&email.to_ascii_lowercase()), "{url}");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    assert!(
        !path.contains(&b64.encode(format!("email:{}", email.to_ascii_lowercase()))[..12]),
        "{url}"
    );
    path.to_owned()
}

#[tokio::test]
async fn one_click_unsubscribe_records_the_opt_out_and_a_tampered_token_records_nothing() {
    let app = akinon_app(&[]).await;
    let path = printed_link("User@Example.com");

    // GET shows a confirmation page and records nothing (mail scanners follow links).
    let page = app.http.get(app.url(&path)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("name=\"List-Unsubscribe\" value=\"One-Click\""),
        "{html}"
    );
    assert_eq!(consent_events(&app), 0);

    // A tampered token: 400, nothing recorded.
    // (A byte of the opaque token is changed: the tag no longer matches.)
    let mut chars: Vec<char> = path.chars().collect();
    chars[4] = if chars[4] == 'A' { 'B' } else { 'A' };
    let tampered: String = chars.into_iter().collect();
    for p in [tampered.as_str(), "/u/not-a-token"] {
        let r = app
            .http
            .post(app.url(p))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{p}");
        assert_eq!(app.http.get(app.url(p)).send().await.unwrap().status(), 400);
    }
    // A POST without the one-click body changes nothing either.
    let r = app.http.post(app.url(&path)).body("").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(consent_events(&app), 0);
    let (status, _) = app
        .get_json("/api/v1/consents?address=user@example.com")
        .await;
    assert_eq!(status, 404);

    // The real one-click POST (RFC 8058), twice: the second changes nothing.
    for _ in 0..2 {
        let r = app
            .http
            .post(app.url(&path))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (_, ledger) = app
        .get_json("/api/v1/consents?address=user@example.com")
        .await;
    let email = &ledger["channels"][0];
    assert_eq!(email["state"], "opted_out");
    assert_eq!(email["source"], "unsubscribe_link");
    assert_eq!(email["history"].as_array().unwrap().len(), 1);

    // And Akinon hears about it at the next poll.
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::minutes(5)).to_rfc3339();
    let to = (now + chrono::Duration::minutes(5)).to_rfc3339();
    let (status, body) = unsubscribed(&app, &from, &to).await;
    assert_eq!(status, 200);
    assert_eq!(body["emailUnsubscribed"], json!(["user@example.com"]));
    app.stop().await.unwrap();
}

#[test]
fn unsubscribe_link_refuses_without_a_secret() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_subgate"))
        .args(["unsubscribe-link", "--email", "a@example.com"])
        .env_remove("SUBGATE__CONSENT__LINK_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("consent.link_secret"));
}
