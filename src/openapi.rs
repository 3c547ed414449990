//! The OpenAPI document served at `/openapi.json`, written by hand and kept next to the routes.

pub const DOCUMENT: &str = include_str!("../openapi.json");
