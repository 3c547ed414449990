//! The admin API over the outbox: `/api/v1/deliveries` (list, one row with its attempts,
//! replay of dead rows). Authenticated with `Authorization: Bearer <admin.token>`; an empty
//! `admin.token` disables it (403); see [`super::admin`].

use axum::{
    extract::{Path, Query, State},
    http::HeaderMap,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, AppState};
use crate::{
    delivery::{parse_since, row_json},
    store::{DeliveryFilter, DeliveryState, ReplayRequest},
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/deliveries", get(list))
        .route("/api/v1/deliveries/replay", post(replay))
        .route("/api/v1/deliveries/{id}", get(one))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// pending | delivered | dead | superseded
    state: Option<String>,
    destination: Option<String>,
    since: Option<String>,
    /// Rows with a larger id (paging: the previous answer's `next_after`).
    after: Option<i64>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    super::admin::require_admin(&state, &headers)?;
    let filter = DeliveryFilter {
        state: match q.state.as_deref() {
            None => None,
            Some(s) => Some(DeliveryState::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "state {s:?}: use pending, delivered, dead or superseded"
                ))
            })?),
        },
        destination: q.destination,
        since: since(q.since.as_deref())?,
        after_id: q.after,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    let limit = filter.limit;
    let store = state.store.clone();
    let rows = blocking(move || store.list_deliveries(&filter)).await?;
    let next_after = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(json!({
        "deliveries": rows.iter().map(row_json).collect::<Vec<_>>(),
        "next_after": next_after,
    })))
}

fn since(text: Option<&str>) -> Result<Option<i64>, ApiError> {
    text.map(|t| parse_since(t, crate::clock::now_ms()))
        .transpose()
        .map_err(|m| ApiError::BadRequest(format!("since: {m}")))
}

/// One row: its state, the event as sent, and every attempt.
async fn one(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    super::admin::require_admin(&state, &headers)?;
    let number: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("delivery id {id:?} is not a number")))?;
    let store = state.store.clone();
    let (row, attempts) = blocking(move || {
        let row = store.delivery(number)?;
        let attempts = store.delivery_attempts(number)?;
        Ok((row, attempts))
    })
    .await?;
    let row = row.ok_or(ApiError::NotFound {
        what: "delivery",
        id,
    })?;
    let mut body = row_json(&row);
    if let Some(map) = body.as_object_mut() {
        map.insert(
            "event".into(),
            serde_json::from_str(&row.payload).unwrap_or(Value::Null),
        );
        map.insert(
            "attempts".into(),
            json!(attempts
                .iter()
                .map(|a| json!({
                    "attempt": a.attempt,
                    "at": crate::clock::to_rfc3339(a.started_at),
                    "latency_ms": a.latency_ms,
                    "outcome": a.outcome,
                    "status": a.status,
                    "error": a.error,
                    "response": a.response,
                    "next_attempt_at": a.next_attempt_at.map(crate::clock::to_rfc3339),
                }))
                .collect::<Vec<_>>()),
        );
    }
    Ok(Json(body))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    destination: Option<String>,
    since: Option<String>,
}

/// Replay dead rows (all, or one destination's, or those created since a time). The body is
/// optional JSON `{"destination": "crm", "since": "24h"}`.
async fn replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    super::admin::require_admin(&state, &headers)?;
    let request: ReplayBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("replay body: {e}")))?
    };
    let replay = ReplayRequest {
        destination: request.destination,
        since: since(request.since.as_deref())?,
        actor: "api".into(),
        now: crate::clock::now_ms(),
    };
    let store = state.store.clone();
    let outcome = blocking(move || store.replay_dead(&replay)).await?;
    tracing::info!(
        replay_id = outcome.replay_id,
        rows = outcome.rows,
        "dead deliveries replayed (api)"
    );
    Ok(Json(
        json!({ "replay_id": outcome.replay_id, "replayed": outcome.rows }),
    ))
}
