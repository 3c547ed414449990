//! The ONAP/TMF listener route, `POST /externalapi/listener/v1/listener`, speaking the
//! document's error dialect (`ErrorRepresentation`, mapped to the wire in one place:
//! [`ListenerError::wire`]), and the read API of the service orders it keeps. Decoding and the
//! state machine live in [`crate::sources::listener`]; the contract is in `docs/listener.md`.

use std::time::Duration;

use axum::{
    body::{Body, Bytes},
    extract::{rejection::BytesRejection, Path, State},
    http::{
        header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE},
        HeaderMap, HeaderValue, StatusCode,
    },
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use super::{auth, blocking, read_api::record_json, ApiError, AppState, Surface};
use crate::{
    config::ListenerSettings,
    ingest::IngestError,
    rate_limit::{Admission, RateLimiter},
    sources::listener::{self as source, DecodeError, Functional},
};

/// The listener route (the document's base path + `/listener`).
pub const PATH: &str = "/externalapi/listener/v1/listener";
/// Content type of every answer of the listener route.
pub const JSON_UTF8: &str = "application/json;charset=utf-8";
/// Timeline entries the read API shows (the oldest first).
const TIMELINE_LIMIT: usize = 1000;

/// The routes of one surface: the read API always, the listener route where it is served.
pub fn routes(settings: &ListenerSettings, surface: Surface) -> Router<AppState> {
    let router = Router::new().route("/api/v1/service-orders/{id}", get(service_order));
    let served = settings.enabled
        && match surface {
            Surface::Plain => settings.plain_http,
            Surface::Tls => settings.tls.enabled,
        };
    if served {
        router.route(PATH, post(create_event).layer(Extension(surface)))
    } else {
        router
    }
}

/// Who may post: the configured credentials and a token bucket per credential. One instance is
/// shared by every surface, so the rate limit holds across plain HTTP and TLS.
pub struct Access {
    credentials: Vec<Credential>,
    limiter: RateLimiter,
}

struct Credential {
    /// Names the configuration entry (`bearer_tokens[0]`): for logs, metadata and the rate
    /// limiter; never the secret or the user name.
    label: String,
    secret: Presentable,
    expires_at: Option<DateTime<Utc>>,
}

enum Presentable {
    Bearer(auth::Secret),
    Basic {
        user: String,
        password: auth::Secret,
    },
}

impl Access {
    pub fn new(settings: &ListenerSettings) -> Self {
        let mut credentials = Vec::new();
        if !settings.bearer_token.expose().is_empty() {
            credentials.push(Credential {
                label: "bearer_token".into(),
                secret: Presentable::Bearer(settings.bearer_token.clone()),
                expires_at: None,
            });
        }
        for (i, t) in settings.bearer_tokens.iter().enumerate() {
            credentials.push(Credential {
                label: format!("bearer_tokens[{i}]"),
                secret: Presentable::Bearer(t.token.clone()),
                expires_at: t.expires_at,
            });
        }
        for (i, u) in settings.basic_users.iter().enumerate() {
            credentials.push(Credential {
                label: format!("basic_users[{i}]"),
                secret: Presentable::Basic {
                    user: u.user.clone(),
                    password: u.password.clone(),
                },
                expires_at: u.expires_at,
            });
        }
        Access {
            credentials,
            limiter: RateLimiter::new(settings.rate_per_second, settings.rate_burst),
        }
    }

    /// The label of the credential the request presents. Every configured secret is compared
    /// (in constant time), so the answer time does not say which one nearly matched.
    fn authenticate(
        &self,
        header: Option<&HeaderValue>,
        now: DateTime<Utc>,
    ) -> Result<&str, ListenerError> {
        let value = header
            .map(|v| v.to_str().map_err(|_| ListenerError::InvalidCredentials))
            .transpose()?;
        let presented = auth::parse_authorization(value).map_err(|e| match e {
            auth::AuthHeaderError::Missing => ListenerError::MissingCredentials,
            auth::AuthHeaderError::Malformed => ListenerError::InvalidCredentials,
        })?;
        let mut found = None;
        for c in &self.credentials {
            let matches = match (&c.secret, &presented) {
                (Presentable::Bearer(token), auth::Presented::Bearer(given)) => {
                    auth::constant_time_eq(token.expose().as_bytes(), given.as_bytes())
                }
                (
                    Presentable::Basic { user, password },
                    auth::Presented::Basic {
                        user: given_user,
                        password: given_password,
                    },
                ) => {
                    auth::constant_time_eq(user.as_bytes(), given_user.as_bytes())
                        & auth::constant_time_eq(
                            password.expose().as_bytes(),
                            given_password.as_bytes(),
                        )
                }
                _ => false,
            };
            if matches && found.is_none() {
                found = Some(c);
            }
        }
        let credential = found.ok_or(ListenerError::InvalidCredentials)?;
        if credential.expires_at.is_some_and(|t| now >= t) {
            return Err(ListenerError::ExpiredCredentials);
        }
        Ok(&credential.label)
    }
}

/// Every way the listener route refuses a request, as the document's `ErrorRepresentation`.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// 400/21–24 and 422 (functional errors).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("header `{0}` is required")]
    MissingHeader(&'static str),
    #[error("header `{header}` {problem}")]
    InvalidHeader {
        header: &'static str,
        problem: String,
    },
    #[error("an `Authorization` header with Bearer or Basic credentials is required")]
    MissingCredentials,
    #[error("the credentials in the `Authorization` header are not valid")]
    InvalidCredentials,
    #[error("the credentials in the `Authorization` header have expired")]
    ExpiredCredentials,
    #[error("too many requests for this credential; retry after {} s", retry_secs(.retry_after))]
    TooManyRequests { retry_after: Duration },
    /// The cause is logged, never shown.
    #[error("internal error")]
    Internal(String),
    /// The store cannot commit, or subgate is shutting down: nothing was stored.
    #[error("the notification was not stored; retry later")]
    Unavailable(String),
}

fn retry_secs(d: &Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

impl ListenerError {
    /// The one mapping to the wire: HTTP status, the document's numeric code, and its reason.
    pub fn wire(&self) -> (StatusCode, u16, &'static str) {
        use StatusCode as S;
        match self {
            ListenerError::Decode(DecodeError::MissingBody) => (S::BAD_REQUEST, 21, "Missing body"),
            ListenerError::Decode(DecodeError::InvalidBody(_)) => {
                (S::BAD_REQUEST, 22, "Invalid body")
            }
            ListenerError::Decode(DecodeError::MissingFields(_)) => {
                (S::BAD_REQUEST, 23, "Missing body field")
            }
            ListenerError::Decode(DecodeError::InvalidField { .. }) => {
                (S::BAD_REQUEST, 24, "Invalid body field")
            }
            ListenerError::MissingHeader(_) => (S::BAD_REQUEST, 25, "Missing header"),
            ListenerError::InvalidHeader { .. } => (S::BAD_REQUEST, 26, "Invalid header value"),
            ListenerError::MissingCredentials => (S::UNAUTHORIZED, 40, "Missing credentials"),
            ListenerError::InvalidCredentials => (S::UNAUTHORIZED, 41, "Invalid credentials"),
            ListenerError::ExpiredCredentials => (S::UNAUTHORIZED, 42, "Expired credentials"),
            ListenerError::TooManyRequests { .. } => (S::FORBIDDEN, 53, "Too many requests"),
            ListenerError::Decode(DecodeError::Functional(f)) => {
                let (code, reason) = match f {
                    Functional::NoServiceOrder(_) => (100, "No service order"),
                    Functional::InvalidOrderState(_) => (101, "Invalid service order state"),
                    Functional::NoOrderItem(_) => (102, "No order item"),
                    Functional::InvalidOrderItem(_) => (103, "Invalid order item"),
                    Functional::EventIdConflict(_) => (104, "eventId already used"),
                };
                (S::UNPROCESSABLE_ENTITY, code, reason)
            }
            ListenerError::Internal(_) => (S::INTERNAL_SERVER_ERROR, 1, "Internal error"),
            ListenerError::Unavailable(_) => (
                S::SERVICE_UNAVAILABLE,
                5,
                "The service is temporarily unavailable",
            ),
        }
    }
}

impl From<IngestError> for ListenerError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Unavailable(cause) => ListenerError::Unavailable(cause),
            IngestError::Closed => ListenerError::Unavailable("ingest pipeline closed".into()),
            IngestError::Rejected { reason, .. } => match Functional::from_rejection(&reason) {
                Some(f) => ListenerError::Decode(f.into()),
                None => ListenerError::Internal(format!("event rejected by the store: {reason}")),
            },
        }
    }
}

impl IntoResponse for ListenerError {
    fn into_response(self) -> Response {
        let (status, code, reason) = self.wire();
        match &self {
            ListenerError::Internal(cause) => {
                tracing::error!(%cause, code, "listener: internal error")
            }
            ListenerError::Unavailable(cause) => {
                tracing::warn!(%cause, code, "listener: notification not stored")
            }
            _ => tracing::debug!(code, "listener: request refused"),
        }
        metrics::counter!(
            "subgate_listener_requests_total",
            "status" => status.as_u16().to_string(),
            "code" => code.to_string()
        )
        .increment(1);
        let body = json!({
            "code": code,
            "reason": reason,
            "message": self.to_string(),
            "status": status.as_u16(),
        });
        let mut response = json_response(status, body.to_string());
        let headers = response.headers_mut();
        match &self {
            ListenerError::MissingCredentials
            | ListenerError::InvalidCredentials
            | ListenerError::ExpiredCredentials => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="subgate", Basic realm="subgate""#),
                );
            }
            ListenerError::TooManyRequests { retry_after } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_secs(retry_after)));
            }
            ListenerError::Unavailable(_) => {
                headers.insert(
                    RETRY_AFTER,
                    HeaderValue::from(crate::ingest::RETRY_AFTER_SECS),
                );
            }
            _ => {}
        }
        response
    }
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8))],
        body.into(),
    )
        .into_response()
}

/// `POST /externalapi/listener/v1/listener`: 201 with the stored `Listener` (the body as
/// received) once the notification is committed; an `ErrorRepresentation` otherwise.
async fn create_event(
    State(state): State<AppState>,
    Extension(surface): Extension<Surface>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match accept_notification(&state, surface, &headers, body).await {
        Ok(raw) => {
            metrics::counter!(
                "subgate_listener_requests_total",
                "status" => "201",
                "code" => "none"
            )
            .increment(1);
            json_response(StatusCode::CREATED, raw)
        }
        Err(e) => e.into_response(),
    }
}

#[tracing::instrument(skip_all, fields(transport = surface.scheme(), event_type, order_id, outcome))]
async fn accept_notification(
    state: &AppState,
    surface: Surface,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ListenerError> {
    let credential = state
        .listener
        .authenticate(headers.get(AUTHORIZATION), Utc::now())?
        .to_owned();
    if let Admission::Limited { retry_after } = state.listener.limiter.check(&credential) {
        return Err(ListenerError::TooManyRequests { retry_after });
    }
    if state.health.is_draining() {
        return Err(ListenerError::Unavailable("draining: shutting down".into()));
    }
    check_content_type(headers)?;
    let body = body.map_err(|r| {
        DecodeError::InvalidBody(format!("the body cannot be read: {}", r.body_text()))
    })?;
    let notification = source::decode(&body)?;
    let span = tracing::Span::current();
    span.record("event_type", notification.event_type.as_str());
    span.record("order_id", notification.order.id.as_str());
    let event_type = notification.event_type.as_str();

    let mut transport = Map::new();
    transport.insert("credential".into(), Value::String(credential));
    transport.insert("transport".into(), surface.scheme().into());
    let envelope = notification.into_envelope(body.to_vec(), transport);
    let outcome = state.ingest.submit(envelope).await?;

    span.record("outcome", outcome.status.as_str());
    tracing::debug!(
        inbox_id = outcome.inbox_id,
        "listener: notification committed"
    );
    metrics::counter!(
        "subgate_listener_notifications_total",
        "event_type" => event_type,
        "outcome" => outcome.status.as_str()
    )
    .increment(1);
    Ok(body)
}

/// `Content-Type` must be `application/json`, with no charset or `charset=utf-8`.
fn check_content_type(headers: &HeaderMap) -> Result<(), ListenerError> {
    let value = headers
        .get(CONTENT_TYPE)
        .ok_or(ListenerError::MissingHeader("Content-Type"))?;
    let invalid = |problem: String| ListenerError::InvalidHeader {
        header: "Content-Type",
        problem,
    };
    let expected = "must be application/json or application/json;charset=utf-8";
    let text = value
        .to_str()
        .map_err(|_| invalid(format!("{expected}; got a non-ASCII value")))?;
    let mut parts = text.split(';');
    let media_type = parts.next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return Err(invalid(format!("{expected}; got {text:?}")));
    }
    for parameter in parts {
        let Some((name, value)) = parameter.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset") && !value.eq_ignore_ascii_case("utf-8") {
            return Err(invalid(format!("{expected}; got charset {value:?}")));
        }
    }
    Ok(())
}

/// `GET /api/v1/service-orders/{id}`: the order's state, its items with their states, the
/// record's provenance, and the timeline of its notifications (applied and ignored, with why).
async fn service_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let key = id.clone();
    let (record, timeline) = blocking(move || {
        Ok((
            store.get_record(source::SERVICE_ORDER, &key)?,
            store.history(source::SERVICE_ORDER, &key, TIMELINE_LIMIT)?,
        ))
    })
    .await?;
    let record = record.ok_or(ApiError::NotFound {
        what: "service order",
        id,
    })?;
    // The record's provenance, with the order document's own fields at the top level.
    let mut body = record_json(&record);
    if let (Some(out), Value::Object(doc)) = (body.as_object_mut(), &record.doc) {
        out.remove("state");
        for (k, v) in doc {
            out.insert(k.clone(), v.clone());
        }
        let entries: Vec<Value> = timeline
            .into_iter()
            .map(|h| {
                let mut entry = json!({ "inbox_event": h.inbox_id });
                if let (Some(e), Value::Object(doc)) = (entry.as_object_mut(), h.doc) {
                    e.extend(doc);
                }
                entry
            })
            .collect();
        out.insert(
            "timeline_truncated".into(),
            json!(entries.len() >= TIMELINE_LIMIT),
        );
        out.insert("timeline".into(), Value::Array(entries));
    }
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        h
    }

    #[test]
    fn json_content_types_with_or_without_utf8_charset_are_accepted() {
        for ok in [
            "application/json",
            "application/json;charset=utf-8",
            "application/json; charset=UTF-8",
            "Application/JSON; charset=\"utf-8\"",
        ] {
            assert!(check_content_type(&headers(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/json;charset=iso-8859-1",
            "application/xml",
        ] {
            let err = check_content_type(&headers(bad)).unwrap_err();
            assert_eq!(err.wire().1, 26, "{bad}");
        }
        let err = check_content_type(&HeaderMap::new()).unwrap_err();
        assert_eq!(err.wire().1, 25);
    }

    /// Draining cannot be timed through real HTTP without a race (the listener closes on the
    /// same signal), so the handler runs here against a real store and ingest writer.
    #[tokio::test]
    async fn a_draining_instance_answers_503_with_code_5_and_stores_nothing() {
        let dir = std::env::temp_dir().join(format!("subgate-drain-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut settings = crate::config::Settings::defaults().unwrap();
        settings.store.url = format!("sqlite://{}", dir.join("subgate.db").display());
        settings.listener.enabled = true;
        settings.listener.bearer_token = auth::Secret::new("t");
        let store = crate::startup::open_store(&settings, true).unwrap();
        let (ingest, writer) = crate::ingest::start(
            store.clone(),
            &settings.ingest,
            tokio::runtime::Handle::current(),
        );
        let state = AppState {
            listener: std::sync::Arc::new(Access::new(&settings.listener)),
            normaliser: crate::consent::Normaliser::new(&settings.consent.default_region).unwrap(),
            settings: std::sync::Arc::new(settings),
            store: store.clone(),
            ingest,
            health: crate::health::Health::default(),
            metrics: crate::telemetry::metrics_handle(),
        };
        state.health.start_draining();
        let mut headers = headers(JSON_UTF8);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let body = Bytes::from_static(
            br#"{"eventId":"e","eventDate":"2024-05-01T10:00:00Z",
                 "eventType":"ServiceOrderCreationNotification",
                 "event":{"id":"SO-1","state":"acknowledged"}}"#,
        );
        let err = accept_notification(&state, Surface::Plain, &headers, Ok(body))
            .await
            .unwrap_err();
        assert_eq!(
            err.wire(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                5,
                "The service is temporarily unavailable"
            )
        );
        assert_eq!(store.inbox_stats(None).unwrap().events, 0);
        drop(state);
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap();
    }

    #[test]
    fn only_our_own_rejections_are_functional_errors() {
        let conflict = ListenerError::from(IngestError::Rejected {
            reason: "event_id_conflict: `eventId` \"e\" was already used".into(),
            raw: Vec::new(),
        });
        assert_eq!(conflict.wire().1, 104);
        let other = ListenerError::from(IngestError::Rejected {
            reason: "store error: constraint failed".into(),
            raw: Vec::new(),
        });
        assert_eq!(other.wire().1, 1);
        assert_eq!(ListenerError::from(IngestError::Closed).wire().1, 5);
    }
}
