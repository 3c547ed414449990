//! The admin API over inbound dead letters: `GET /api/v1/dead-letters?queue=Q&limit=N` lists a
//! consumed queue's dead-letter queue (leaving every message in it), `POST
//! /api/v1/dead-letters/replay` moves messages back to the queue (see [`crate::dead_letters`]).
//! Authenticated with `Authorization: Bearer <admin.token>` like `/api/v1/deliveries`.

use axum::{
    extract::{Query, State},
    http::HeaderMap,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::dead_letters::{self as dl, DeadLetterError, Selection};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/dead-letters", get(list))
        .route("/api/v1/dead-letters/replay", post(replay))
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        match e {
            DeadLetterError::UnknownQueue { .. } => ApiError::BadRequest(e.to_string()),
            DeadLetterError::Missing(queue) => ApiError::NotFound {
                what: "queue",
                id: queue,
            },
            DeadLetterError::Broker(m) => ApiError::BrokerUnavailable(m),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    queue: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    super::admin::require_admin(&state, &headers)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let queue = q
        .queue
        .ok_or_else(|| ApiError::BadRequest("queue is required".into()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let listing = dl::list(&state.settings, &queue, limit).await?;
    Ok(Json(json!(listing)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    queue: String,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    ids: Vec<String>,
}

/// Move dead letters back: `{"queue": "Q", "all": true}` or `{"queue": "Q", "ids": [...]}`.
async fn replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    super::admin::require_admin(&state, &headers)?;
    let request: ReplayBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("replay body: {e}")))?;
    let selection = match (request.all, request.ids.is_empty()) {
        (true, true) => Selection::All,
        (false, false) => Selection::Ids(request.ids.into_iter().collect()),
        (true, false) => {
            return Err(ApiError::BadRequest(
                "replay body: give either \"all\": true or \"ids\", not both".into(),
            ))
        }
        (false, true) => {
            return Err(ApiError::BadRequest(
                "replay body: give \"all\": true or a non-empty \"ids\"".into(),
            ))
        }
    };
    let outcome = dl::replay(&state.settings, &request.queue, &selection).await?;
    tracing::info!(
        queue = %outcome.queue,
        moved = outcome.moved,
        "dead letters replayed (api)"
    );
    Ok(Json(json!(outcome)))
}
