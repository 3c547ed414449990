//! The admin check shared by every admin route (`/api/v1/consents` POST, `/api/v1/deliveries`,
//! `/api/v1/dead-letters`):
//! `Authorization: Bearer <admin.token>`, compared in constant time. An empty `admin.token`
//! disables the admin API (403); a missing or wrong token is refused (401).
//!
//! The read API (every other `GET` under `/api/v1/`) is guarded by [`guard_read_api`] when
//! `admin.read_token` is set: that token or the admin token, else 401.

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, Method},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{
    auth::{constant_time_eq, parse_authorization, Presented},
    ApiError, AppState,
};

pub fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = state.settings.admin.token.expose();
    if expected.is_empty() {
        return Err(ApiError::Forbidden(
            "the admin API is disabled: set admin.token".into(),
        ));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match parse_authorization(presented) {
        Ok(Presented::Bearer(token)) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            Ok(())
        }
        _ => Err(ApiError::Unauthorized(
            "a valid admin Bearer token is required".into(),
        )),
    }
}

/// Middleware of the whole router: a `GET`/`HEAD` under `/api/v1/` (the admin routes excepted:
/// they check the admin token themselves) needs the read token or the admin token once
/// `admin.read_token` is set.
pub async fn guard_read_api(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let read_token = state.settings.admin.read_token.expose();
    let guarded = !read_token.is_empty()
        && matches!(*request.method(), Method::GET | Method::HEAD)
        && request.uri().path().starts_with("/api/v1/")
        && !request.uri().path().starts_with("/api/v1/deliveries")
        && !request.uri().path().starts_with("/api/v1/dead-letters");
    if !guarded {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let admin_token = state.settings.admin.token.expose();
    match parse_authorization(presented) {
        Ok(Presented::Bearer(token))
            if constant_time_eq(token.as_bytes(), read_token.as_bytes())
                || (!admin_token.is_empty()
                    && constant_time_eq(token.as_bytes(), admin_token.as_bytes())) =>
        {
            next.run(request).await
        }
        _ => ApiError::Unauthorized("a valid read API Bearer token is required".into())
            .into_response(),
    }
}
