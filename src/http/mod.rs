//! HTTP: one router with the ops routes, the read API, and (later) each HTTP source's routes.

pub mod auth;
mod deliveries;
mod error;
mod ops;
mod read_api;

use std::sync::Arc;

use axum::{extract::DefaultBodyLimit, Router};
pub use error::ApiError;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{config::Settings, health::Health, ingest::Ingest, store::Store};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub ingest: Ingest,
    pub health: Health,
    pub metrics: PrometheusHandle,
}

pub fn router(state: AppState) -> Router {
    let limit = state.settings.http.body_limit_bytes;
    Router::new()
        .merge(ops::routes())
        .merge(read_api::routes())
        .merge(deliveries::routes())
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Run a blocking store call off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}
