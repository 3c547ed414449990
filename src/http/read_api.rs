//! The read API under `/api/v1/`: the state the projections hold, with when and from which
//! inbox event each record last changed.

use axum::{
    extract::{Path, State},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use super::{blocking, ApiError, AppState};
use crate::{clock::to_rfc3339, sources::erp, store::Record};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/erp/customers/{id}", get(erp_customer))
        .route(
            "/api/v1/erp/customers/{id}/subscriptions",
            get(erp_customer_subscriptions),
        )
        .route("/api/v1/erp/subscriptions/{id}", get(erp_subscription))
        .route("/api/v1/inbox/{id}", get(inbox_event))
}

/// A record as the API shows it: the document plus its provenance.
pub fn record_json(record: &Record) -> Value {
    json!({
        "id": record.key,
        "kind": record.kind,
        "state": record.doc,
        "version": record.version,
        "changed_at": to_rfc3339(record.changed_at),
        "changed_by_event": record.changed_by,
        "last_seen_at": to_rfc3339(record.seen_at),
        "last_seen_event": record.seen_by,
        "occurred_at": record.occurred_at.map(to_rfc3339),
    })
}

async fn get_record(
    state: &AppState,
    kind: &'static str,
    what: &'static str,
    id: String,
) -> Result<Record, ApiError> {
    let store = state.store.clone();
    let key = id.clone();
    blocking(move || store.get_record(kind, &key))
        .await?
        .ok_or(ApiError::NotFound { what, id })
}

async fn erp_customer(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = get_record(&state, erp::CUSTOMER, "customer", id).await?;
    Ok(Json(record_json(&record)))
}

async fn erp_subscription(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = get_record(&state, erp::SUBSCRIPTION, "subscription", id).await?;
    Ok(Json(record_json(&record)))
}

/// The subscriptions naming this customer as engaged party. A subscription may name a customer
/// not seen yet: the list answers as long as the customer or one of its subscriptions is known.
async fn erp_customer_subscriptions(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let key = id.clone();
    let (customer, subscriptions) = blocking(move || {
        let customer = store.get_record(erp::CUSTOMER, &key)?;
        let mut subscriptions = Vec::new();
        for sid in store.links_to(erp::SUBSCRIPTION_PARTY, &key)? {
            if let Some(r) = store.get_record(erp::SUBSCRIPTION, &sid)? {
                subscriptions.push(r);
            }
        }
        Ok((customer, subscriptions))
    })
    .await?;
    if customer.is_none() && subscriptions.is_empty() {
        return Err(ApiError::NotFound {
            what: "customer",
            id,
        });
    }
    Ok(Json(json!({
        "customer_id": id,
        "customer_known": customer.is_some(),
        "subscriptions": subscriptions.iter().map(record_json).collect::<Vec<_>>(),
    })))
}

/// One inbox event: metadata and the raw payload as received (text when it is UTF-8).
async fn inbox_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let number: i64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("inbox id {id:?} is not a number")))?;
    let store = state.store.clone();
    let event = blocking(move || store.inbox_event(number))
        .await?
        .ok_or(ApiError::NotFound {
            what: "inbox event",
            id,
        })?;
    let raw = match std::str::from_utf8(&event.raw) {
        Ok(text) => json!({ "encoding": "utf-8", "text": text }),
        Err(_) => json!({ "encoding": "hex", "text": hex::encode(&event.raw) }),
    };
    Ok(Json(json!({
        "id": event.id,
        "source": event.source,
        "kind": event.kind,
        "entity": event.entity,
        "dedupe_key": event.dedupe_key,
        "occurred_at": event.occurred_at.map(to_rfc3339),
        "received_at": to_rfc3339(event.received_at),
        "outcome": event.outcome,
        "meta": event.meta,
        "raw": raw,
    })))
}
