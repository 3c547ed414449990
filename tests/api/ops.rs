use crate::helpers::spawn_app;

#[tokio::test]
async fn healthz_metrics_and_openapi_answer() {
    let app = spawn_app(&[]).await;
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/erp/customers/{id}"].is_object());

    let metrics = app.metrics().await;
    // Every metric is described, and the counters of known label sets are there from the
    // start (another app of this test process may have counted some already).
    for (name, kind) in [
        ("subgate_committed_total", "counter"),
        ("subgate_commit_failures_total", "counter"),
        ("subgate_store_writable", "gauge"),
        ("subgate_consent_reports_total", "counter"),
        ("subgate_akinon_requests_total", "counter"),
    ] {
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "{name} HELP\n{metrics}"
        );
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}")),
            "{name} TYPE\n{metrics}"
        );
    }
    for series in [
        r#"subgate_committed_total{source="akinon",status="rejected"} "#,
        r#"subgate_committed_total{source="unsubscribe_link",status="applied"} "#,
        r#"subgate_commit_failures_total{reason="disk full"} "#,
        r#"subgate_consent_reports_total{via="link"} "#,
    ] {
        assert!(metrics.contains(series), "{series} missing\n{metrics}");
    }
    app.stop().await.unwrap();
}

/// A scrape right after start shows the series of what is configured, at 0: per queue, per
/// destination (queue and destination names are this test's own, so the values are exact).
#[tokio::test]
async fn metrics_show_every_configured_series_at_zero_right_after_start() {
    let queue = format!("ops-metrics-{:08x}", fastrand::u32(..));
    let subscriptions = format!("{queue}-subs");
    let destination = format!("d{:08x}", fastrand::u32(..));
    let list = format!(
        r#"[{{name="{destination}", kind="webhook", url="http://127.0.0.1:1/h", secret="whsec_c2VjcmV0LW9uZQ=="}}]"#
    );
    let app = spawn_app(&[
        ("erp.enabled", "true"),
        ("erp.customer_queue", queue.as_str()),
        ("erp.subscription_queue", subscriptions.as_str()),
        ("amqp.url", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("destinations", list.as_str()),
        ("delivery.enabled", "false"),
    ])
    .await;
    let metrics = app.metrics().await;
    for series in [
        format!(r#"subgate_received_total{{queue="{queue}"}} 0"#),
        format!(r#"subgate_requeued_total{{queue="{subscriptions}"}} 0"#),
        format!(r#"subgate_consumer_connected{{queue="{queue}"}} 0"#),
        format!(
            r#"subgate_delivery_attempts_total{{destination="{destination}",outcome="dead"}} 0"#
        ),
        format!(r#"subgate_delivery_pending{{destination="{destination}"}} 0"#),
        format!(r#"subgate_delivery_dead{{destination="{destination}"}} 0"#),
        r#"subgate_committed_total{source="erp",status="applied"} "#.to_owned(),
    ] {
        let found = metrics
            .lines()
            .any(|l| l.starts_with(&series) || l == series);
        assert!(found, "{series} missing\n{metrics}");
    }
    for name in [
        "subgate_received_total",
        "subgate_consumer_connected",
        "subgate_delivery_attempts_total",
        "subgate_delivery_pending",
    ] {
        assert!(metrics.contains(&format!("# HELP {name} ")), "{name}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readyz_reports_why_when_the_broker_is_unreachable() {
    // Port 1 on loopback refuses connections: the consumer keeps retrying.
    let app = spawn_app(&[
        ("erp.enabled", "true"),
        ("amqp.url", "amqp://guest:guest@127.0.0.1:1/%2f"),
    ])
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, 503);
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("secom-customer-queue"), "{reasons}");
    // The HTTP side serves meanwhile.
    let (status, _) = app.get_json("/api/v1/erp/customers/1").await;
    assert_eq!(status, 404);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_read_api_ids_answer_404_with_a_json_error() {
    let app = spawn_app(&[]).await;
    for path in [
        "/api/v1/erp/customers/nope",
        "/api/v1/erp/subscriptions/nope",
        "/api/v1/erp/customers/nope/subscriptions",
        "/api/v1/inbox/999",
    ] {
        let (status, body) = app.get_json(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    app.stop().await.unwrap();
}
