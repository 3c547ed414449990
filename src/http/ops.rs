//! Ops routes: liveness, readiness, Prometheus metrics, the OpenAPI document.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};
use serde_json::json;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready when the store answers, every consumer is connected and we are not draining.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let store = state.store.clone();
    let store_ok = tokio::task::spawn_blocking(move || store.ping())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| {
            r.map_err(|e| format!("{}: {}", crate::ingest::outage_reason(&e), e.message()))
        });
    let components = state.health.snapshot();
    let mut reasons = Vec::new();
    // The writer's own finding (the `store` component) says more than a read can: a full disk
    // still reads. A failed read is reported only when the writer has not said why.
    let writer_down = components.get("store").is_some_and(|c| !c.ready);
    if let (Err(e), false) = (&store_ok, writer_down) {
        reasons.push(format!("store: {e}"));
    }
    for (name, c) in &components {
        if !c.ready {
            reasons.push(format!("{name}: {}", c.detail));
        }
    }
    if state.health.is_draining() {
        reasons.push("draining: shutting down".into());
    }
    let ready = reasons.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "reasons": reasons,
        "store": store_ok.is_ok() && !writer_down,
        "components": components,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
}
