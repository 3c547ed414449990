//! Consent routes (`docs/akinon.md`, "Opt-outs from outside Akinon"):
//! - `POST /api/v1/consents` (admin, `Authorization: Bearer <admin.token>`): a provider's or an
//!   operator's report of one consent change;
//! - `GET /api/v1/consents?address=…[&channel=…]`: current state per channel and the history;
//! - `GET|POST /u/{token}`: RFC 8058 one-click unsubscribe (GET shows a confirmation page and
//!   records nothing; POST with `List-Unsubscribe=One-Click` records the opt-out).

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use super::{blocking, ApiError, AppState};
use crate::{
    clock::to_rfc3339,
    consent::{Channel, ConsentState, CONSENT, CONSENT_CHANGE},
    ingest::IngestError,
    sources::{
        akinon::validate::parse_datetime,
        consents::{verify_link, ConsentReport, LINK_SOURCE},
    },
};

/// History entries shown per channel.
const HISTORY_LIMIT: usize = 1000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/consents", get(read_consents).post(report_consent))
        .route("/u/{token}", get(confirm_page).post(one_click))
}

async fn submit(
    state: &AppState,
    envelope: crate::envelope::Envelope,
) -> Result<crate::ingest::IngestOutcome, ApiError> {
    state.ingest.submit(envelope).await.map_err(|e| match e {
        IngestError::Rejected { reason, .. } => ApiError::BadRequest(reason),
        IngestError::Unavailable(m) => ApiError::Unavailable(m),
        IngestError::Closed => ApiError::Unavailable("ingest pipeline closed".into()),
    })
}

/// `{channel, address, state: "opted_in"|"opted_out", source, occurredAt}`.
async fn report_consent(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    super::admin::require_admin(&state, &headers)?;
    let report = parse_report(&state, &body).map_err(ApiError::BadRequest)?;
    let key = report.address.key();
    let outcome = submit(&state, report.into_admin_envelope(body.to_vec())).await?;
    metrics::counter!("subgate_consent_reports_total", "via" => "admin").increment(1);
    Ok(Json(json!({
        "key": key,
        "outcome": outcome.status.as_str(),
        "inbox_id": outcome.inbox_id,
    })))
}

fn parse_report(state: &AppState, body: &[u8]) -> Result<ConsentReport, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let text = |key: &str| -> Result<&str, String> {
        v.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| format!("`{key}` is required and must be a non-empty string"))
    };
    let channel = Channel::parse(text("channel")?)
        .ok_or("`channel` must be one of email, sms, call, whatsapp, push, viber")?;
    let address = state
        .normaliser
        .address(channel, text("address")?)
        .map_err(|m| format!("`address`: {m}"))?;
    let consent = match text("state")? {
        "opted_in" => ConsentState::OptedIn,
        "opted_out" => ConsentState::OptedOut,
        _ => return Err("`state` must be opted_in or opted_out".into()),
    };
    let source = text("source")?;
    if source.len() > 64
        || !source
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("`source` must be at most 64 of [A-Za-z0-9_.-]".into());
    }
    let at = match v.get("occurredAt") {
        None | Some(Value::Null) => crate::clock::now_ms(),
        Some(Value::String(s)) => parse_datetime(s)
            .ok_or("`occurredAt` must be an ISO 8601 date-time (e.g. 2024-06-01T10:00:00Z)")?,
        Some(_) => return Err("`occurredAt` must be an ISO 8601 date-time string".into()),
    };
    Ok(ConsentReport {
        address,
        state: consent,
        at,
        reported_by: source.to_owned(),
    })
}

#[derive(serde::Deserialize)]
struct ConsentQuery {
    address: String,
    channel: Option<String>,
}

/// The ledger for one address: each channel it is known on, with its history.
async fn read_consents(
    State(state): State<AppState>,
    Query(q): Query<ConsentQuery>,
) -> Result<Json<Value>, ApiError> {
    let channels: Vec<Channel> = match &q.channel {
        Some(c) => vec![Channel::parse(c)
            .ok_or_else(|| ApiError::BadRequest(format!("unknown channel {c:?}")))?],
        None if q.address.contains('@') => vec![Channel::Email],
        None => vec![
            Channel::Sms,
            Channel::Call,
            Channel::Whatsapp,
            Channel::Viber,
        ],
    };
    let mut keys = Vec::new();
    for channel in channels {
        let address = state
            .normaliser
            .address(channel, &q.address)
            .map_err(|m| ApiError::BadRequest(format!("address: {m}")))?;
        keys.push(address.key());
    }
    let store = state.store.clone();
    let found = blocking(move || {
        let mut out = Vec::new();
        for key in keys {
            if let Some(r) = store.get_record(CONSENT, &key)? {
                let history = store.history(CONSENT_CHANGE, &key, HISTORY_LIMIT)?;
                out.push((r, history));
            }
        }
        Ok(out)
    })
    .await?;
    if found.is_empty() {
        return Err(ApiError::NotFound {
            what: "consent for address",
            id: q.address,
        });
    }
    let channels: Vec<Value> = found
        .into_iter()
        .map(|(r, history)| {
            json!({
                "key": r.key,
                "channel": r.doc["channel"],
                "address": r.doc["address"],
                "as_sent": r.doc["as_sent"],
                "state": r.doc["state"],
                "at": r.doc["at"].as_i64().map(to_rfc3339),
                "source": r.doc["source"],
                "changed_by_event": r.changed_by,
                "history": history.iter().map(|h| json!({
                    "state": h.doc["state"],
                    "previous": h.doc["previous"],
                    "at": to_rfc3339(h.at),
                    "source": h.doc["source"],
                    "as_sent": h.doc["as_sent"],
                    "inbox_id": h.inbox_id,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "address": q.address, "channels": channels })))
}

/// Plain-text answers of the link routes (a person reads them, not a program).
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{text}</p></body></html>"
    );
    (status, Html(html)).into_response()
}

fn invalid_link() -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "Invalid link",
        "This unsubscribe link is not valid. Nothing was changed.",
    )
}

/// GET: a confirmation page with a button; records nothing (mail scanners follow links).
async fn confirm_page(State(state): State<AppState>, Path(token): Path<String>) -> Response {
    if verify_link(
        state.settings.consent.link_secret.expose().as_bytes(),
        &token,
    )
    .is_none()
    {
        return invalid_link();
    }
    let html =
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head>\
        <body><h1>Unsubscribe</h1><p>Stop receiving these messages?</p>\
        <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
        <button type=\"submit\">Unsubscribe</button></form></body></html>";
    (StatusCode::OK, Html(html)).into_response()
}

/// POST with `List-Unsubscribe=One-Click` (form-urlencoded or multipart): record the opt-out.
async fn one_click(
    State(state): State<AppState>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let Some((channel, normalised)) = verify_link(
        state.settings.consent.link_secret.expose().as_bytes(),
        &token,
    ) else {
        tracing::info!("one-click unsubscribe with an invalid token");
        return invalid_link();
    };
    if !is_one_click(&body) {
        return page(
            StatusCode::BAD_REQUEST,
            "Invalid request",
            "The request must carry List-Unsubscribe=One-Click. Nothing was changed.",
        );
    }
    let Ok(address) = state.normaliser.address(channel, &normalised) else {
        return invalid_link();
    };
    let report = ConsentReport {
        address,
        state: ConsentState::OptedOut,
        at: crate::clock::now_ms(),
        reported_by: LINK_SOURCE.into(),
    };
    match submit(&state, report.into_link_envelope(body.to_vec())).await {
        Ok(outcome) => {
            metrics::counter!("subgate_consent_reports_total", "via" => "link").increment(1);
            tracing::info!(outcome = outcome.status.as_str(), "one-click unsubscribe");
            page(
                StatusCode::OK,
                "Unsubscribed",
                "You will not receive these messages any more.",
            )
        }
        Err(e) => e.into_response(),
    }
}

/// RFC 8058 §3.1: the body is `List-Unsubscribe=One-Click`, form-urlencoded or multipart.
fn is_one_click(body: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    let urlencoded = text
        .split('&')
        .any(|pair| pair.trim() == "List-Unsubscribe=One-Click");
    let multipart = text.contains("name=\"List-Unsubscribe\"") && text.contains("One-Click");
    urlencoded || multipart
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_bodies() {
        assert!(is_one_click(b"List-Unsubscribe=One-Click"));
        assert!(is_one_click(b"a=b&List-Unsubscribe=One-Click\r\n"));
        assert!(is_one_click(
            b"--x\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--x--"
        ));
        assert!(!is_one_click(b""));
        assert!(!is_one_click(b"List-Unsubscribe=Maybe"));
    }
}
