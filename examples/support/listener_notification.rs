//! The listener notifications the benchmarks send (`http_bench` over HTTP, `bench_ingest` straight
//! to the ingest writer), so both measure the same stream.

/// The `n`th notification of a connection. Each order goes through the life the hub reports:
/// creation (acknowledged, two items), inProgress, item 1 completed, completed; the next order
/// starts after that. Every notification is new (no duplicate): each one is a real state change
/// committed to the store.
pub fn notification(run: u64, conn: u64, n: u64) -> String {
    let order = format!("SO-{run}-{conn}-{}", n / 4);
    let event_id = format!("bench-{run}-{conn}-{n}");
    let date = format!("2024-05-01T10:{:02}:00.000Z", n % 4);
    let (event_type, event) = match n % 4 {
        0 => (
            "ServiceOrderCreationNotification",
            format!(
                r#"{{"id":"{order}","href":"/serviceOrder/{order}","externalId":"EXT-{n}","state":"acknowledged","orderDate":"2024-05-01T09:59:00.000Z","orderItem":[{{"id":"1","action":"add","state":"acknowledged","service":{{"name":"vFW"}}}},{{"id":"2","action":"add","state":"acknowledged","service":{{"name":"vLB"}}}}]}}"#
            ),
        ),
        1 => (
            "ServiceOrderStateChangeNotification",
            format!(r#"{{"id":"{order}","state":"inProgress"}}"#),
        ),
        2 => (
            "ServiceOrderItemStateChangeNotification",
            format!(r#"{{"id":"{order}","orderItem":[{{"id":"1","state":"completed"}}]}}"#),
        ),
        _ => (
            "ServiceOrderStateChangeNotification",
            format!(r#"{{"id":"{order}","state":"completed","completionDateTime":"{date}"}}"#),
        ),
    };
    format!(
        r#"{{"eventId":"{event_id}","eventDate":"{date}","eventType":"{event_type}","event":{event}}}"#
    )
}
