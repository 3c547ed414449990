//! HTTP: one router with the ops routes, the read API, and each HTTP source's routes; served on
//! `http.addr`, and over TLS on `listener.tls.addr` when that is enabled ([`tls_router`]).

pub mod admin;
pub mod akinon;
pub mod auth;
mod consents;
mod dead_letters;
mod deliveries;
mod error;
pub mod listener;
mod loymax;
mod ops;
mod read_api;
pub mod tls;

use std::sync::Arc;

use axum::{extract::DefaultBodyLimit, Router};
pub use error::ApiError;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{config::Settings, consent::Normaliser, health::Health, ingest::Ingest, store::Store};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub ingest: Ingest,
    pub health: Health,
    pub metrics: PrometheusHandle,
    /// Address normalisation (`consent.default_region`), for every source that records consent.
    pub normaliser: Normaliser,
    /// The listener's credentials and rate-limit buckets, shared by both surfaces.
    pub listener: Arc<listener::Access>,
}

/// Which server a router is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `http.addr`.
    Plain,
    /// `listener.tls.addr`.
    Tls,
}

impl Surface {
    pub fn scheme(self) -> &'static str {
        match self {
            Surface::Plain => "http",
            Surface::Tls => "https",
        }
    }
}

/// The router of the plain HTTP server.
pub fn router(state: AppState) -> Router {
    surface_router(state, Surface::Plain)
}

/// The router of the TLS server: the same routes, with the listener where it is served over TLS.
pub fn tls_router(state: AppState) -> Router {
    surface_router(state, Surface::Tls)
}

fn surface_router(state: AppState, surface: Surface) -> Router {
    let limit = state.settings.http.body_limit_bytes;
    Router::new()
        .merge(ops::routes())
        .merge(read_api::routes())
        .merge(akinon::routes(&state))
        .merge(consents::routes())
        .merge(loymax::routes())
        .merge(listener::routes(&state.settings.listener, surface))
        .merge(deliveries::routes())
        .merge(dead_letters::routes())
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::guard_read_api,
        ))
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
