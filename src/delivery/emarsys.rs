//! Emarsys (Core API v2): contact upserts and external events.
//!
//! - Contacts: `PUT {base}/api/v2/contact/?create_if_not_exists=1` with
//!   `{"key_id": "3", "contacts": [{"3": "a@example.com", "1": "Ayşe", …}]}`, up to 1,000
//!   contacts per call, each key once per call. Per-item errors in the answer (`data.errors`,
//!   keyed by the contact's key value) make that item dead; the others are delivered.
//! - Events whose kind has an id in `event_ids`: `POST {base}/api/v2/event/{id}/trigger` with
//!   `{"key_id", "external_id", "data"}`.
//! - Authentication: `X-WSSE` UsernameToken (digest = base64 of the hex SHA-1 of
//!   nonce + created + secret, as Emarsys computes it) or an OAuth2 client-credentials bearer
//!   token, fetched from `token_url` and cached until shortly before it expires.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use base64::Engine;
use futures_util::{future::BoxFuture, StreamExt};
use serde_json::{json, Map, Value};
use sha1::{Digest, Sha1};

use super::{
    retry::{classify_status, parse_retry_after, Verdict},
    worker::{read_response, SendResult},
    Budget,
};
use crate::{
    config::{EmarsysAuth, EmarsysSettings},
    http::auth::Secret,
    store::OutboxRow,
};

/// A token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The `X-WSSE` header value.
pub fn wsse_header(user: &str, secret: &str, nonce: &str, created: &str) -> String {
    let hex_digest = hex::encode(Sha1::digest(format!("{nonce}{created}{secret}").as_bytes()));
    let digest = base64::engine::general_purpose::STANDARD.encode(hex_digest);
    format!(
        "UsernameToken Username=\"{user}\", PasswordDigest=\"{digest}\", Nonce=\"{nonce}\", Created=\"{created}\""
    )
}

/// An Emarsys contact from a canonical event's contact view, through the field map. `None`
/// when the key field is missing.
pub fn map_contact(
    settings: &EmarsysSettings,
    key_field: &str,
    contact: &Value,
) -> Option<(String, Map<String, Value>)> {
    let text = |name: &str| {
        contact
            .get(name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let key = text(key_field)?;
    let mut out = Map::new();
    for (field, id) in &settings.fields {
        let value = match field.as_str() {
            "gender" => text("gender")
                .and_then(|g| settings.gender_values.get(&g.to_ascii_lowercase()).cloned()),
            other => text(other),
        };
        if let Some(v) = value {
            out.insert(id.clone(), Value::String(v));
        }
    }
    if let Some(opt_in) = contact.get("opt_in").and_then(Value::as_bool) {
        let v = if opt_in {
            &settings.opt_in_true
        } else {
            &settings.opt_in_false
        };
        out.insert(settings.opt_in_field.clone(), Value::String(v.clone()));
    }
    Some((key, out))
}

/// Split items into calls of at most `max` in which every key appears once (the answer's
/// per-item errors are keyed by it). Items keep their order within and across calls.
pub fn unique_key_batches<T>(items: Vec<(String, T)>, max: usize) -> Vec<Vec<(String, T)>> {
    type Batch<T> = (HashSet<String>, Vec<(String, T)>);
    let mut batches: Vec<Batch<T>> = Vec::new();
    for (key, item) in items {
        let slot = batches
            .iter()
            .position(|(keys, list)| list.len() < max && !keys.contains(&key));
        let index = match slot {
            Some(i) => i,
            None => {
                batches.push((HashSet::new(), Vec::new()));
                batches.len() - 1
            }
        };
        let (keys, list) = &mut batches[index];
        keys.insert(key.clone());
        list.push((key, item));
    }
    batches.into_iter().map(|(_, list)| list).collect()
}

/// Per-item errors of a contact answer: key value → error text.
pub fn item_errors(body: &Value) -> BTreeMap<String, String> {
    body.pointer("/data/errors")
        .and_then(Value::as_object)
        .map(|errors| {
            errors
                .iter()
                .map(|(k, v)| (k.to_lowercase(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

pub struct EmarsysTransport {
    client: reqwest::Client,
    base: String,
    settings: EmarsysSettings,
    secret: Secret,
    key_field: String,
    concurrency: usize,
    /// OAuth2: the bearer token and when to renew it.
    token: Option<(String, Instant)>,
}

struct ContactItem {
    row: usize,
    fields: Map<String, Value>,
}

impl EmarsysTransport {
    pub fn new(
        client: reqwest::Client,
        base: String,
        settings: EmarsysSettings,
        secret: Secret,
        concurrency: usize,
    ) -> Self {
        let key_field = settings.key_field().unwrap_or("email").to_owned();
        EmarsysTransport {
            client,
            base: base.trim_end_matches('/').to_owned(),
            settings,
            secret,
            key_field,
            concurrency,
            token: None,
        }
    }

    pub async fn send(&mut self, rows: &[OutboxRow], budget: &Budget) -> Vec<SendResult> {
        let started = SendResult::start();
        let clock = Instant::now();
        let mut results: Vec<Option<SendResult>> = rows.iter().map(|_| None).collect();
        let mut contacts: Vec<(String, ContactItem)> = Vec::new();
        let mut events: Vec<(usize, String, String, Value)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let event: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
            let mapped = map_contact(&self.settings, &self.key_field, &event["contact"]);
            let Some((key, fields)) = mapped else {
                results[i] = Some(dead(
                    started,
                    clock,
                    format!("the event has no contact {}", self.key_field),
                ));
                continue;
            };
            match self.settings.event_ids.get(&row.kind) {
                Some(id) => events.push((i, id.clone(), key, event["data"].clone())),
                None => contacts.push((key, ContactItem { row: i, fields })),
            }
        }

        let auth = match self.authorization().await {
            Ok(a) => a,
            Err(e) => {
                return results
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| SendResult::retry(started, clock, e.clone())))
                    .collect();
            }
        };

        for batch in unique_key_batches(contacts, 1000) {
            budget.acquire().await;
            for (row, result) in self.upsert(&batch, &auth).await {
                results[row] = Some(result);
            }
        }
        let this = &*self;
        let auth_ref = &auth;
        let calls: Vec<BoxFuture<'_, (usize, SendResult)>> = events
            .into_iter()
            .map(
                |(row, id, key, data)| -> BoxFuture<'_, (usize, SendResult)> {
                    Box::pin(async move {
                        budget.acquire().await;
                        (row, this.trigger(&id, &key, data, auth_ref).await)
                    })
                },
            )
            .collect();
        let triggered: Vec<(usize, SendResult)> = futures_util::stream::iter(calls)
            .buffered(this.concurrency)
            .collect()
            .await;
        for (row, result) in triggered {
            results[row] = Some(result);
        }
        if results
            .iter()
            .flatten()
            .any(|r| r.status == Some(401) && self.settings.auth == EmarsysAuth::Oauth2)
        {
            // An expired or revoked token: fetch a new one next time.
            self.token = None;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| SendResult::retry(started, clock, "not sent".to_owned())))
            .collect()
    }

    /// The authentication header for this round of calls.
    async fn authorization(&mut self) -> Result<Authorization, String> {
        match self.settings.auth {
            EmarsysAuth::Wsse => Ok(Authorization::Wsse),
            EmarsysAuth::Oauth2 => {
                if let Some((token, renew_at)) = &self.token {
                    if Instant::now() < *renew_at {
                        return Ok(Authorization::Bearer(token.clone()));
                    }
                }
                let (token, lifetime) = self.fetch_token().await?;
                let renew_at = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN);
                self.token = Some((token.clone(), renew_at));
                Ok(Authorization::Bearer(token))
            }
        }
    }

    async fn fetch_token(&self) -> Result<(String, Duration), String> {
        let answer = self
            .client
            .post(&self.settings.token_url)
            .basic_auth(&self.settings.user, Some(self.secret.expose()))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| format!("oauth2 token request failed: {}", e.without_url()))?;
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.unwrap_or(Value::Null);
        match body.get("access_token").and_then(Value::as_str) {
            Some(token) if (200..300).contains(&status) => {
                let secs = body
                    .get("expires_in")
                    .and_then(Value::as_u64)
                    .unwrap_or(3600);
                Ok((token.to_owned(), Duration::from_secs(secs)))
            }
            _ => Err(format!("oauth2 token request answered HTTP {status}")),
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Authorization,
    ) -> reqwest::RequestBuilder {
        let builder = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        match auth {
            Authorization::Wsse => {
                let nonce = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
                let created = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
                builder.header(
                    "X-WSSE",
                    wsse_header(&self.settings.user, self.secret.expose(), &nonce, &created),
                )
            }
            Authorization::Bearer(token) => builder.bearer_auth(token),
        }
    }

    /// One contact call; a result per item (by row index).
    async fn upsert(
        &self,
        batch: &[(String, ContactItem)],
        auth: &Authorization,
    ) -> Vec<(usize, SendResult)> {
        let started = SendResult::start();
        let clock = Instant::now();
        let body = json!({
            "key_id": self.settings.key_id,
            "contacts": batch.iter().map(|(_, c)| Value::Object(c.fields.clone())).collect::<Vec<_>>(),
        });
        let sent = self
            .request(
                reqwest::Method::PUT,
                "/api/v2/contact/?create_if_not_exists=1",
                auth,
            )
            .body(body.to_string())
            .send()
            .await;
        let (status, verdict, text) = match sent {
            Ok(response) => answered(response).await,
            Err(e) => {
                let failed = SendResult::failed(started, clock, &e);
                return batch.iter().map(|(_, c)| (c.row, failed.clone())).collect();
            }
        };
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let errors = item_errors(&parsed);
        let reply_code = parsed.get("replyCode").and_then(Value::as_i64).unwrap_or(0);
        batch
            .iter()
            .map(|(key, c)| {
                let mut result =
                    SendResult::answered(started, clock, status, verdict, text.clone());
                if verdict == Verdict::Delivered {
                    if let Some(error) = errors.get(&key.to_lowercase()) {
                        result.verdict = Verdict::Dead;
                        result.error = Some(format!("contact rejected: {error}"));
                        result.response = Some(text.clone());
                    } else if reply_code != 0 && errors.is_empty() {
                        result.verdict = Verdict::Dead;
                        result.error = Some(format!("replyCode {reply_code}"));
                        result.response = Some(text.clone());
                    }
                }
                (c.row, result)
            })
            .collect()
    }

    async fn trigger(
        &self,
        event_id: &str,
        key: &str,
        data: Value,
        auth: &Authorization,
    ) -> SendResult {
        let started = SendResult::start();
        let clock = Instant::now();
        let body = json!({
            "key_id": self.settings.key_id,
            "external_id": key,
            "data": data,
        });
        let path = format!("/api/v2/event/{event_id}/trigger");
        match self
            .request(reqwest::Method::POST, &path, auth)
            .body(body.to_string())
            .send()
            .await
        {
            Ok(response) => {
                let (status, verdict, text) = answered(response).await;
                SendResult::answered(started, clock, status, verdict, text)
            }
            Err(e) => SendResult::failed(started, clock, &e),
        }
    }
}

enum Authorization {
    Wsse,
    Bearer(String),
}

async fn answered(response: reqwest::Response) -> (u16, Verdict, String) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, crate::clock::now_ms()));
    let verdict = classify_status(status, retry_after);
    (status, verdict, read_response(response).await)
}

fn dead(started: i64, clock: Instant, error: String) -> SendResult {
    SendResult {
        verdict: Verdict::Dead,
        started_at: started,
        latency: clock.elapsed(),
        status: None,
        error: Some(error),
        response: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wsse_digest_is_base64_of_the_hex_sha1_of_nonce_created_secret() {
        let header = wsse_header(
            "user001",
            "s3cret",
            "d36e3162829ed4c8",
            "2024-01-02T03:04:05Z",
        );
        let hex_digest = hex::encode(Sha1::digest(b"d36e3162829ed4c82024-01-02T03:04:05Zs3cret"));
        let digest = base64::engine::general_purpose::STANDARD.encode(hex_digest);
        assert_eq!(
            header,
            format!("UsernameToken Username=\"user001\", PasswordDigest=\"{digest}\", Nonce=\"d36e3162829ed4c8\", Created=\"2024-01-02T03:04:05Z\"")
        );
    }

    #[test]
    fn contacts_map_through_the_field_map_gender_and_opt_in_values() {
        let settings = EmarsysSettings::default();
        let contact = json!({"email": "a@example.com", "first_name": "Ayşe", "gender": "Female",
                             "opt_in": false, "phone": " "});
        let (key, fields) = map_contact(&settings, "email", &contact).unwrap();
        assert_eq!(key, "a@example.com");
        assert_eq!(
            Value::Object(fields),
            json!({"3": "a@example.com", "1": "Ayşe", "5": "2", "31": "2"})
        );
        assert!(map_contact(&settings, "email", &json!({"phone": "1"})).is_none());
    }

    #[test]
    fn batches_hold_each_key_once_and_at_most_max_items() {
        let items = vec![
            ("a".to_owned(), 1),
            ("b".to_owned(), 2),
            ("a".to_owned(), 3),
            ("c".to_owned(), 4),
        ];
        let batches = unique_key_batches(items, 2);
        let shape: Vec<Vec<i32>> = batches
            .iter()
            .map(|b| b.iter().map(|(_, v)| *v).collect())
            .collect();
        assert_eq!(shape, vec![vec![1, 2], vec![3, 4]]);
    }

    #[test]
    fn item_errors_are_read_by_key_and_an_empty_list_means_none() {
        let body = json!({"replyCode": 0, "data": {"ids": [1],
            "errors": {"Bad@Example.com": {"2010": "Invalid email"}}}});
        let errors = item_errors(&body);
        assert_eq!(errors.len(), 1);
        assert!(errors["bad@example.com"].contains("Invalid email"));
        assert!(item_errors(&json!({"data": {"errors": []}})).is_empty());
    }
}
