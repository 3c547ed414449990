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
    assert!(metrics.contains("# TYPE") || metrics.is_empty());
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
