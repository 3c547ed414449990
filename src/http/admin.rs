//! The admin check shared by every admin route (`/api/v1/consents` POST, `/api/v1/deliveries`):
//! `Authorization: Bearer <admin.token>`, compared in constant time. An empty `admin.token`
//! disables the admin API (403); a missing or wrong token is refused (401).

use axum::http::{header, HeaderMap};

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
