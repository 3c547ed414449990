use serde_json::Value;

use crate::helpers::{eventually, spawn_app, unique, Broker, TestApp};

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

/// An app consuming its own pair of ERP queues.
pub async fn erp_app(extra: &[(&str, &str)]) -> (TestApp, String, String) {
    let customers = unique("cust");
    let subscriptions = unique("subs");
    let mut overrides = vec![
        ("erp.enabled", "true"),
        ("erp.customer_queue", customers.as_str()),
        ("erp.subscription_queue", subscriptions.as_str()),
    ];
    overrides.extend_from_slice(extra);
    let app = spawn_app(&overrides).await;
    app.wait_ready().await;
    (app, customers, subscriptions)
}

pub async fn customer_version(app: &TestApp, id: &str, at_least: i64) -> Value {
    eventually(10, "customer record", || async {
        let (status, body) = app.get_json(&format!("/api/v1/erp/customers/{id}")).await;
        (status == 200 && body["version"].as_i64() >= Some(at_least)).then_some(body)
    })
    .await
}

#[tokio::test]
async fn customer_seed_example_produces_the_documented_state() {
    let (app, customers, subscriptions) = erp_app(&[]).await;
    let broker = Broker::connect().await;
    broker.publish(&customers, CUSTOMER_SEED.as_bytes()).await;

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
    assert_eq!(body["version"], 1);

    // The inbox keeps the bytes as received.
    let event = body["changed_by_event"].as_i64().unwrap();
    let (status, inbox) = app.get_json(&format!("/api/v1/inbox/{event}")).await;
    assert_eq!(status, 200);
    assert_eq!(inbox["raw"]["text"], CUSTOMER_SEED);
    assert_eq!(inbox["source"], "erp");
    assert_eq!(inbox["outcome"], "applied");

    app.stop().await.unwrap();
    broker.delete_queues(&[customers, subscriptions]).await;
}
