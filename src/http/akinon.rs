//! The Akinon Extension Subscription Gateway over HTTP (`docs/akinon.md`): the four endpoints
//! under `akinon.path_prefix`, Basic auth, the mandatory headers, the rate limit, the
//! `{"errors":[{code,field,message}]}` dialect (mapped from [`AkinonError`] in one place), and
//! the read API under `/api/v1/akinon/`.

use std::{collections::HashSet, sync::Arc, time::Instant};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, MethodRouter},
    Json, Router,
};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use super::{
    auth::{constant_time_eq, parse_authorization, AuthHeaderError, Presented},
    blocking,
    read_api::record_json,
    ApiError, AppState,
};
use crate::{
    clock::to_rfc3339,
    config::KeyStyle,
    consent::{Channel, CONSENT, CONSENT_CHANGE},
    ingest::{IngestError, IngestOutcome},
    rate_limit::{Admission, RateLimiter},
    sources::akinon::{
        self as source,
        validate::{parse_datetime, FieldError},
        CallMeta, DecodeError, Endpoint,
    },
    store::{Store, StoreError},
};

pub const REQUEST_ID: &str = "x-akinon-request-id";
pub const API_VERSION: &str = "x-akinon-api-version";
/// Longest accepted `x-akinon-request-id`.
const REQUEST_ID_MAX: usize = 200;

/// Everything that can go wrong at this boundary; [`IntoResponse`] is the only place that knows
/// statuses and wire codes (the list shared with Akinon is in `docs/akinon.md`).
#[derive(Debug, thiserror::Error)]
pub enum AkinonError {
    #[error("the Authorization header is missing")]
    MissingCredentials,
    #[error("the credentials are not valid")]
    InvalidCredentials,
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the {0} header is not valid: {1}")]
    InvalidHeader(&'static str, &'static str),
    #[error("x-akinon-api-version {0:?} is not supported; this service speaks version 2")]
    UnsupportedApiVersion(String),
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    #[error("the body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the body cannot be read: {0}")]
    UnreadableBody(String),
    #[error("{0}")]
    InvalidJson(String),
    /// Field problems, all of them at once (`missing_field`, `invalid_field`, query codes).
    #[error("invalid fields")]
    Fields(Vec<FieldError>),
    #[error("the event cannot be applied")]
    Rejected(String),
    #[error("the store is unavailable; nothing was recorded, retry later")]
    Unavailable(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal error")]
    Internal(String),
}

impl AkinonError {
    fn status_and_code(&self) -> (StatusCode, &'static str, &'static str) {
        use AkinonError::*;
        match self {
            MissingCredentials => (
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                "Authorization",
            ),
            InvalidCredentials => (
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "Authorization",
            ),
            MissingHeader(h) => (StatusCode::BAD_REQUEST, "missing_header", h),
            InvalidHeader(h, _) => (StatusCode::BAD_REQUEST, "invalid_header", h),
            UnsupportedApiVersion(_) => (
                StatusCode::BAD_REQUEST,
                "unsupported_api_version",
                API_VERSION,
            ),
            RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", ""),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type",
            ),
            PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", ""),
            UnreadableBody(_) => (StatusCode::BAD_REQUEST, "invalid_body", ""),
            InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", ""),
            Fields(_) => (StatusCode::BAD_REQUEST, "invalid_field", ""),
            Rejected(_) => (StatusCode::BAD_REQUEST, "rejected", ""),
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", ""),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", ""),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", ""),
        }
    }

    /// The wire code (metrics label; `invalid_field` for field lists).
    fn code(&self) -> &'static str {
        match self {
            AkinonError::Fields(errors) => errors.first().map_or("invalid_field", |e| e.code),
            other => other.status_and_code().1,
        }
    }
}

impl From<StoreError> for AkinonError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) | StoreError::Conflict(m) => AkinonError::Unavailable(m),
            StoreError::Failed(m) => AkinonError::Internal(m),
        }
    }
}

impl From<ApiError> for AkinonError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unavailable(m) => AkinonError::Unavailable(m),
            other => AkinonError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for AkinonError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.status_and_code();
        match &self {
            AkinonError::Unavailable(cause) => tracing::warn!(%cause, "store unavailable"),
            AkinonError::Internal(cause) => tracing::error!(%cause, "internal error"),
            AkinonError::Rejected(cause) => tracing::warn!(%cause, "event rejected"),
            _ => {}
        }
        let errors: Vec<Value> = match &self {
            AkinonError::Fields(list) => list
                .iter()
                .map(|e| json!({ "code": e.code, "field": e.field, "message": e.message }))
                .collect(),
            other => vec![json!({ "code": code, "field": field, "message": other.to_string() })],
        };
        let mut response = (status, Json(json!({ "errors": errors }))).into_response();
        match self {
            AkinonError::RateLimited(secs) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            AkinonError::Unavailable(_) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::ingest::RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"subgate\""),
            );
        }
        response
    }
}

/// State of the Akinon routes.
#[derive(Clone)]
struct Akinon {
    app: AppState,
    limiter: Arc<RateLimiter>,
}

pub fn routes(app: &AppState) -> Router<AppState> {
    let settings = &app.settings.akinon;
    let state = Akinon {
        app: app.clone(),
        limiter: Arc::new(RateLimiter::new(
            settings.rate_limit_per_second,
            settings.rate_limit_burst,
        )),
    };
    let mut router = Router::new()
        .route("/api/v1/akinon/users/{pk}", get(read_user))
        .route("/api/v1/akinon/orders/{pk}", get(read_order));
    if !settings.enabled {
        return router.with_state(state);
    }
    let prefix = &settings.path_prefix;
    for endpoint in [
        Endpoint::SubscribeEmail,
        Endpoint::SubscribeUser,
        Endpoint::OrderInfo,
    ] {
        let handler: MethodRouter<Akinon> = post(
            move |State(state): State<Akinon>,
                  headers: HeaderMap,
                  body: Result<Bytes, BytesRejection>| {
                call(state, endpoint, headers, body)
            },
        )
        .fallback(method_not_allowed);
        let path = format!("{prefix}{}", endpoint.path());
        // Django-style callers may add a trailing slash.
        router = router
            .route(&format!("{path}/"), handler.clone())
            .route(&path, handler);
    }
    let unsubscribed: MethodRouter<Akinon> = get(unsubscribed_users).fallback(method_not_allowed);
    router
        .route(
            &format!("{prefix}/unsubscribed-users/"),
            unsubscribed.clone(),
        )
        .route(&format!("{prefix}/unsubscribed-users"), unsubscribed)
        .with_state(state)
}

async fn method_not_allowed() -> AkinonError {
    AkinonError::MethodNotAllowed
}

/// The request id as logged (before it is validated).
fn loggable_request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(REQUEST_ID_MAX).collect())
        .unwrap_or_else(|| "-".into())
}

/// Run one call inside a span carrying its request id (every log line of the call has it),
/// with the metrics and the one log line per call.
async fn instrumented(
    endpoint: &'static str,
    request_id: String,
    work: impl std::future::Future<Output = Result<Response, AkinonError>>,
) -> Response {
    let span = tracing::info_span!("akinon", endpoint, %request_id);
    async move {
        let started = Instant::now();
        let result = work.await;
        let (status, code) = match &result {
            Ok(r) => (r.status(), "ok"),
            Err(e) => (e.status_and_code().0, e.code()),
        };
        metrics::counter!("subgate_akinon_requests_total", "endpoint" => endpoint, "code" => code)
            .increment(1);
        metrics::histogram!("subgate_akinon_request_seconds", "endpoint" => endpoint)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(status = status.as_u16(), code, "akinon call");
        result.unwrap_or_else(IntoResponse::into_response)
    }
    .instrument(span)
    .await
}

async fn call(
    state: Akinon,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    instrumented(endpoint.name(), loggable_request_id(&headers), async move {
        let call = state.admit(&headers)?;
        if !is_json(headers.get(header::CONTENT_TYPE)) {
            return Err(AkinonError::UnsupportedMediaType);
        }
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AkinonError::PayloadTooLarge(state.app.settings.http.body_limit_bytes)
            } else {
                AkinonError::UnreadableBody(rejection.body_text())
            }
        })?;
        let envelope = source::decode(endpoint, body.to_vec(), &call, &state.app.normaliser)
            .map_err(|e| match e {
                DecodeError::Json(m) => AkinonError::InvalidJson(m),
                DecodeError::Fields(list) => AkinonError::Fields(list),
            })?;
        let outcome = submit(&state.app, envelope).await?;
        tracing::debug!(
            outcome = outcome.status.as_str(),
            inbox_id = outcome.inbox_id,
            "committed"
        );
        Ok(StatusCode::OK.into_response())
    })
    .await
}

async fn submit(
    app: &AppState,
    envelope: crate::envelope::Envelope,
) -> Result<IngestOutcome, AkinonError> {
    app.ingest.submit(envelope).await.map_err(|e| match e {
        IngestError::Rejected { reason, .. } => AkinonError::Rejected(reason),
        IngestError::Unavailable(m) => AkinonError::Unavailable(m),
        IngestError::Closed => AkinonError::Unavailable("the ingest pipeline is shut down".into()),
    })
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(mime) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl Akinon {
    /// Auth, rate limit and the mandatory headers, in that order.
    fn admit(&self, headers: &HeaderMap) -> Result<CallMeta, AkinonError> {
        let credential = self.authenticate(headers)?;
        if let Admission::Limited { retry_after } = self.limiter.check(&credential) {
            return Err(AkinonError::RateLimited(
                retry_after.as_secs_f64().ceil().max(1.0) as u64,
            ));
        }
        let request_id = match headers.get(REQUEST_ID).map(|v| v.to_str()) {
            None => return Err(AkinonError::MissingHeader(REQUEST_ID)),
            Some(Ok(v)) if v.trim().is_empty() => {
                return Err(AkinonError::MissingHeader(REQUEST_ID))
            }
            Some(Ok(v)) if v.len() > REQUEST_ID_MAX => {
                return Err(AkinonError::InvalidHeader(
                    REQUEST_ID,
                    "longer than 200 characters",
                ))
            }
            Some(Ok(v)) => v.trim().to_owned(),
            Some(Err(_)) => {
                return Err(AkinonError::InvalidHeader(REQUEST_ID, "not visible ASCII"))
            }
        };
        match headers.get(API_VERSION).map(|v| v.to_str().map(str::trim)) {
            None | Some(Ok("")) => return Err(AkinonError::MissingHeader(API_VERSION)),
            Some(Ok("2")) => {}
            Some(Ok(other)) => return Err(AkinonError::UnsupportedApiVersion(other.to_owned())),
            Some(Err(_)) => return Err(AkinonError::UnsupportedApiVersion("<not ASCII>".into())),
        }
        Ok(CallMeta {
            request_id,
            credential,
        })
    }

    /// The user name of the configured pair the Basic credentials match. Every configured pair
    /// is compared, in constant time, whatever matched before.
    fn authenticate(&self, headers: &HeaderMap) -> Result<String, AkinonError> {
        let value = match headers.get(header::AUTHORIZATION).map(|v| v.to_str()) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return Err(AkinonError::InvalidCredentials),
        };
        let (user, password) = match parse_authorization(value) {
            Ok(Presented::Basic { user, password }) => (user, password),
            Err(AuthHeaderError::Missing) => return Err(AkinonError::MissingCredentials),
            Ok(Presented::Bearer(_)) | Err(AuthHeaderError::Malformed) => {
                return Err(AkinonError::InvalidCredentials)
            }
        };
        let mut matched = None;
        for (name, secret) in self.app.settings.akinon.credentials() {
            let ok = constant_time_eq(name.as_bytes(), user.as_bytes())
                & constant_time_eq(secret.expose().as_bytes(), password.as_bytes());
            if ok && matched.is_none() {
                matched = Some(name.to_owned());
            }
        }
        matched.ok_or(AkinonError::InvalidCredentials)
    }
}

async fn unsubscribed_users(
    State(state): State<Akinon>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    instrumented(
        "unsubscribed-users",
        loggable_request_id(&headers),
        async move {
            state.admit(&headers)?;
            let Query(params) = query.map_err(|e| {
                AkinonError::Fields(vec![FieldError::new("invalid_query", "", e.body_text())])
            })?;
            let settings = &state.app.settings.akinon;
            let (from, to) = window(
                &params,
                i64::try_from(settings.unsubscribed_max_range.as_millis()).unwrap_or(i64::MAX),
            )
            .map_err(AkinonError::Fields)?;
            let store = state.app.store.clone();
            let max = settings.unsubscribed_max_changes;
            let answer = blocking(move || unsubscribed_between(store.as_ref(), from, to, max))
                .await?
                .map_err(|e| AkinonError::Fields(vec![e]))?;
            Ok(Json(answer.to_json(settings.unsubscribed_keys)).into_response())
        },
    )
    .await
}

/// `[fromDate, toDate)` in Unix ms, validated.
fn window(params: &[(String, String)], max_range_ms: i64) -> Result<(i64, i64), Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut read = |name: &str| {
        let Some((_, text)) = params.iter().find(|(k, _)| k == name) else {
            errors.push(FieldError::new(
                "missing_field",
                name,
                "this query parameter is required",
            ));
            return None;
        };
        // An unencoded `+` of an offset arrives as a space; a date alone is its midnight UTC.
        let parsed = parse_datetime(text)
            .or_else(|| parse_datetime(&text.replace(' ', "+")))
            .or_else(|| date_only(text));
        if parsed.is_none() {
            errors.push(FieldError::new(
                "invalid_field",
                name,
                "must be an ISO 8601 date-time (e.g. 2024-06-01T10:00:00Z) or date (2024-06-01)",
            ));
        }
        parsed
    };
    let from = read("fromDate");
    let to = read("toDate");
    let (Some(from), Some(to)) = (from, to) else {
        return Err(errors);
    };
    if to <= from {
        return Err(vec![FieldError::new(
            "invalid_range",
            "toDate",
            "toDate must be after fromDate",
        )]);
    }
    if to - from > max_range_ms {
        return Err(vec![FieldError::new(
            "range_too_large",
            "toDate",
            format!(
                "the range may span at most {} (akinon.unsubscribed_max_range)",
                crate::config::format_duration(&std::time::Duration::from_millis(
                    max_range_ms as u64
                ))
            ),
        )]);
    }
    Ok((from, to))
}

/// A date without a time (`2024-06-01`) → Unix ms of 00:00 UTC that day.
fn date_only(text: &str) -> Option<i64> {
    let date = chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// The `unsubscribed-users` answer: per channel, the addresses in the form Commerce last sent.
#[derive(Debug, Default, PartialEq)]
pub struct Unsubscribed {
    pub email: Vec<String>,
    pub sms: Vec<String>,
    pub call: Vec<String>,
}

impl Unsubscribed {
    fn to_json(&self, style: KeyStyle) -> Value {
        let names = match style {
            KeyStyle::Camel => ["emailUnsubscribed", "smsUnsubscribed", "callUnsubscribed"],
            KeyStyle::Snake => [
                "email_unsubscribed",
                "sms_unsubscribed",
                "call_unsubscribed",
            ],
        };
        let mut map = Map::new();
        for (name, list) in names.into_iter().zip([&self.email, &self.sms, &self.call]) {
            map.insert(name.into(), json!(list));
        }
        Value::Object(map)
    }
}

/// Addresses whose consent changed to opted-out inside `[from, to)`, reported by a source other
/// than Akinon, and still opted out now. `Ok(Err(_))`: the window holds more than `max` changes.
fn unsubscribed_between(
    store: &dyn Store,
    from: i64,
    to: i64,
    max: usize,
) -> Result<Result<Unsubscribed, FieldError>, StoreError> {
    let changes = store.history_between(CONSENT_CHANGE, from, to, max.saturating_add(1))?;
    if changes.len() > max {
        return Ok(Err(FieldError::new(
            "range_too_large",
            "toDate",
            format!("more than {max} consent changes in this range; ask for a narrower one"),
        )));
    }
    let mut seen = HashSet::new();
    let mut answer = Unsubscribed::default();
    for change in changes {
        let doc = &change.doc;
        let opted_out = doc["state"] == "opted_out" && doc["source"] != source::SOURCE;
        if !opted_out || !seen.insert(change.key.clone()) {
            continue;
        }
        let channel = doc["channel"].as_str().and_then(Channel::parse);
        let list = match channel {
            Some(Channel::Email) => &mut answer.email,
            Some(Channel::Sms) => &mut answer.sms,
            Some(Channel::Call) => &mut answer.call,
            _ => continue,
        };
        let Some(current) = store.get_record(CONSENT, &change.key)? else {
            continue;
        };
        if current.doc["state"] != "opted_out" {
            continue;
        }
        let normalised = doc["address"].as_str().unwrap_or_default();
        let form_key = match channel {
            Some(Channel::Email) => format!("email:{normalised}"),
            _ => format!("phone:{normalised}"),
        };
        let form = store
            .get_record(source::ADDRESS_FORM, &form_key)?
            .and_then(|r| r.doc.as_str().map(str::to_owned))
            .or_else(|| current.doc["as_sent"].as_str().map(str::to_owned))
            .unwrap_or_else(|| normalised.to_owned());
        list.push(form);
    }
    Ok(Ok(answer))
}

/// `GET /api/v1/akinon/users/{pk}`: the profile, its consents as the ledger has them now, and
/// the orders that name it.
async fn read_user(
    State(state): State<Akinon>,
    Path(pk): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.app.store.clone();
    let normaliser = state.app.normaliser.clone();
    let key = pk.clone();
    let found = blocking(move || {
        let Some(user) = store.get_record(source::USER, &key)? else {
            return Ok(None);
        };
        let mut consents = Vec::new();
        for consent_key in source::user_consent_keys(&user.doc, &normaliser) {
            if let Some(r) = store.get_record(CONSENT, &consent_key)? {
                consents.push(json!({
                    "channel": r.doc["channel"],
                    "address": r.doc["address"],
                    "state": r.doc["state"],
                    "at": r.doc["at"].as_i64().map(to_rfc3339),
                    "source": r.doc["source"],
                    "changed_by_event": r.changed_by,
                }));
            }
        }
        let orders = store.links_to(source::ORDER_USER, &key)?;
        Ok(Some((user, consents, orders)))
    })
    .await?;
    let (user, consents, orders) = found.ok_or(ApiError::NotFound {
        what: "akinon user",
        id: pk,
    })?;
    let mut body = record_json(&user);
    body["consents"] = json!(consents);
    body["orders"] = json!(orders);
    Ok(Json(body))
}

/// `GET /api/v1/akinon/orders/{pk}`.
async fn read_order(
    State(state): State<Akinon>,
    Path(pk): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.app.store.clone();
    let key = pk.clone();
    let found = blocking(move || {
        let order = store.get_record(source::ORDER, &key)?;
        let user = store.links_from(source::ORDER_USER, &key)?;
        Ok(order.map(|o| (o, user)))
    })
    .await?;
    let (order, user) = found.ok_or(ApiError::NotFound {
        what: "akinon order",
        id: pk,
    })?;
    let mut body = record_json(&order);
    body["user"] = json!(user.first());
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn window_errors_name_the_query_field() {
        let day = 86_400_000;
        let fields = |p: &[(&str, &str)]| -> Vec<(&'static str, String)> {
            window(&params(p), day)
                .unwrap_err()
                .into_iter()
                .map(|e| (e.code, e.field))
                .collect()
        };
        assert_eq!(
            fields(&[]),
            [
                ("missing_field", "fromDate".into()),
                ("missing_field", "toDate".into())
            ]
        );
        assert_eq!(
            fields(&[
                ("fromDate", "yesterday"),
                ("toDate", "2024-06-01T11:00:00Z")
            ]),
            [("invalid_field", "fromDate".into())]
        );
        assert_eq!(
            fields(&[
                ("fromDate", "2024-06-01T11:00:00Z"),
                ("toDate", "2024-06-01T11:00:00Z")
            ]),
            [("invalid_range", "toDate".into())]
        );
        assert_eq!(
            fields(&[
                ("fromDate", "2024-06-01T11:00:00Z"),
                ("toDate", "2024-06-03T11:00:00Z")
            ]),
            [("range_too_large", "toDate".into())]
        );
        // An unencoded "+03:00" arrives as " 03:00" and is still understood.
        assert_eq!(
            window(
                &params(&[
                    ("fromDate", "2024-06-01T13:00:00 03:00"),
                    ("toDate", "2024-06-01T11:00:00Z")
                ]),
                day
            ),
            Ok((1_717_236_000_000, 1_717_239_600_000))
        );
        // Dates alone are midnight UTC: fromDate=2024-06-01&toDate=2024-06-02 is that day.
        assert_eq!(
            window(
                &params(&[("fromDate", "2024-06-01"), ("toDate", "2024-06-02")]),
                day
            ),
            Ok((1_717_200_000_000, 1_717_286_400_000))
        );
        assert_eq!(
            window(
                &params(&[
                    ("fromDate", "2024-06-01"),
                    ("toDate", "2024-06-01T12:00:00Z")
                ]),
                day
            ),
            Ok((1_717_200_000_000, 1_717_243_200_000))
        );
        assert_eq!(
            fields(&[("fromDate", "2024-06-31"), ("toDate", "2024-07-01")]),
            [("invalid_field", "fromDate".into())]
        );
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.x+json",
        ] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", ""] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}
