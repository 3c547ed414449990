//! Read API over the Loymax projections: a member (followed to its survivor after a merge) with
//! its cards and purchase totals, a card (by id or number) with its history, and a member's
//! purchases with their refunds.

use axum::{
    extract::{Path, State},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use super::{blocking, read_api::record_json, ApiError, AppState};
use crate::{
    clock::to_rfc3339,
    sources::loymax::{
        model::{MemberDoc, Totals},
        project::resolve_merges,
        CARD, CARD_HISTORY, CARD_NUMBER, MEMBER, MEMBER_UID, PURCHASE, PURCHASE_MEMBER, REFUND,
        REFUND_MEMBER, REFUND_PURCHASE,
    },
    store::{Record, Store, StoreError},
};

/// Most history entries returned with a card.
const CARD_HISTORY_LIMIT: usize = 1000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/loymax/members/{id}", get(member))
        .route(
            "/api/v1/loymax/members/{id}/purchases",
            get(member_purchases),
        )
        .route("/api/v1/loymax/cards/{id}", get(card))
}

/// A member as looked up: the survivor of any merge, and the profile asked for when it is not
/// the survivor.
struct FoundMember {
    chain: Vec<String>,
    survivor: Record,
    doc: MemberDoc,
    requested: Option<Record>,
}

impl FoundMember {
    /// The survivor and every profile merged into it.
    fn profiles(&self) -> Vec<String> {
        let mut keys = vec![self.survivor.key.clone()];
        keys.extend(self.doc.merged_from.iter().cloned());
        keys
    }
}

/// By customer id, else by uid.
fn find_member(store: &dyn Store, id: &str) -> Result<Option<FoundMember>, StoreError> {
    let key = match store.get_record(MEMBER, id)? {
        Some(_) => id.to_owned(),
        None => match store.get_record(MEMBER_UID, id)? {
            Some(r) => match r.doc.get("customer_id").and_then(Value::as_str) {
                Some(key) => key.to_owned(),
                None => return Ok(None),
            },
            None => return Ok(None),
        },
    };
    let (chain, survivor) = resolve_merges(&key, |k| store.get_record(MEMBER, k))?;
    let Some(survivor) = survivor else {
        return Ok(None);
    };
    let doc = serde_json::from_value(survivor.doc.clone())
        .map_err(|e| StoreError::Failed(format!("stored member {key} is unreadable: {e}")))?;
    let requested = if chain.len() > 1 {
        store.get_record(MEMBER, &key)?
    } else {
        None
    };
    Ok(Some(FoundMember {
        chain,
        survivor,
        doc,
        requested,
    }))
}

fn totals_json(totals: &Totals) -> Value {
    json!({
        "count": totals.count,
        "amount": totals.amount,
        "refunds": totals.refunds,
        "refunded_amount": totals.refunded_amount,
        "net_amount": totals.net_amount(),
    })
}

fn not_found(what: &'static str, id: String) -> ApiError {
    ApiError::NotFound { what, id }
}

async fn member(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let key = id.clone();
    let answer = blocking(move || {
        let Some(found) = find_member(store.as_ref(), &key)? else {
            return Ok(None);
        };
        let mut cards = Vec::with_capacity(found.doc.cards.len());
        for card in &found.doc.cards {
            if let Some(r) = store.get_record(CARD, card)? {
                cards.push(record_json(&r));
            }
        }
        Ok(Some(json!({
            "requested_id": key,
            "customer_id": found.survivor.key,
            "merge_chain": found.chain,
            "member": record_json(&found.survivor),
            "merged_member": found.requested.as_ref().map(record_json),
            "cards": cards,
            "purchases": totals_json(&found.doc.purchases),
        })))
    })
    .await?;
    answer.map(Json).ok_or_else(|| not_found("member", id))
}

async fn member_purchases(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let key = id.clone();
    let answer = blocking(move || {
        let Some(found) = find_member(store.as_ref(), &key)? else {
            return Ok(None);
        };
        let mut purchases = Vec::new();
        let mut refunds = Vec::new();
        for profile in found.profiles() {
            for pid in store.links_to(PURCHASE_MEMBER, &profile)? {
                if let Some(r) = store.get_record(PURCHASE, &pid)? {
                    let refund_ids = store.links_to(REFUND_PURCHASE, &pid)?;
                    purchases.push((r, refund_ids));
                }
            }
            for rid in store.links_to(REFUND_MEMBER, &profile)? {
                if let Some(r) = store.get_record(REFUND, &rid)? {
                    refunds.push(r);
                }
            }
        }
        let by_time = |r: &Record| {
            (
                r.doc["date_time"].as_str().map(str::to_owned),
                r.key.clone(),
            )
        };
        purchases.sort_by_key(|(r, _)| by_time(r));
        refunds.sort_by_key(by_time);
        let purchases: Vec<Value> = purchases
            .iter()
            .map(|(r, refund_ids)| {
                let mut v = record_json(r);
                v["refund_ids"] = json!(refund_ids);
                v
            })
            .collect();
        Ok(Some(json!({
            "requested_id": key,
            "customer_id": found.survivor.key,
            "totals": totals_json(&found.doc.purchases),
            "purchases": purchases,
            "refunds": refunds.iter().map(record_json).collect::<Vec<_>>(),
        })))
    })
    .await?;
    answer.map(Json).ok_or_else(|| not_found("member", id))
}

/// By card id, else by card number.
async fn card(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let key = id.clone();
    let answer = blocking(move || {
        let record = match store.get_record(CARD, &key)? {
            Some(r) => Some(r),
            None => match store.get_record(CARD_NUMBER, &key)? {
                Some(index) => match index.doc.get("card").and_then(Value::as_str) {
                    Some(card) => store.get_record(CARD, card)?,
                    None => None,
                },
                None => None,
            },
        };
        let Some(record) = record else {
            return Ok(None);
        };
        let history: Vec<Value> = store
            .history(CARD_HISTORY, &record.key, CARD_HISTORY_LIMIT)?
            .into_iter()
            .map(|h| {
                json!({
                    "at": to_rfc3339(h.at),
                    "event": h.doc.get("event"),
                    "changes": h.doc.get("changes"),
                    "inbox_id": h.inbox_id,
                })
            })
            .collect();
        Ok(Some(json!({
            "requested_id": key,
            "card": record_json(&record),
            "history": history,
        })))
    })
    .await?;
    answer.map(Json).ok_or_else(|| not_found("card", id))
}
