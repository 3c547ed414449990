//! Webhooks with Standard Webhooks signatures (<https://www.standardwebhooks.com>): `POST` of the
//! canonical event JSON with `webhook-id` (the event id, stable across retries and replays),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`: `v1,` + base64 HMAC-SHA256 of
//! `id.timestamp.body`, one entry per configured secret (space-separated), for rotation.

use std::time::Instant;

use base64::Engine;
use futures_util::{future::BoxFuture, StreamExt};
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderName, HeaderValue, InvalidHeaderValue, CONTENT_TYPE};
use sha2::Sha256;

use super::{
    event::payload_event_id,
    retry::{classify_status, parse_retry_after, Verdict},
    worker::{read_response, SendResult},
    Budget,
};
use crate::store::OutboxRow;

const SECRET_PREFIX: &str = "whsec_";

/// The signing keys of `whsec_<base64>` secrets (several, space-separated, for rotation).
pub fn parse_secrets(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let keys = text
        .split_whitespace()
        .map(|s| {
            let b64 = s.strip_prefix(SECRET_PREFIX).unwrap_or(s);
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .ok()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| "a webhook secret is `whsec_` followed by base64".to_owned())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("a webhook needs at least one secret".into());
    }
    Ok(keys)
}

/// `webhook-signature`: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` per key,
/// separated by spaces.
pub fn sign(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    Signer::new(keys).sign(id, &timestamp.to_string(), body)
}

/// The signing keys, each as an HMAC already keyed: per request only the message is hashed (the
/// key's two blocks are not hashed again), and the header is written into one string.
#[derive(Clone)]
pub struct Signer {
    macs: Vec<Hmac<Sha256>>,
}

impl Signer {
    pub fn new(keys: &[Vec<u8>]) -> Self {
        Signer {
            macs: keys
                .iter()
                // HMAC takes keys of any length: the error arm cannot happen.
                .filter_map(|key| Hmac::<Sha256>::new_from_slice(key).ok())
                .collect(),
        }
    }

    /// The `webhook-signature` value for `id`, `timestamp` (Unix seconds, as sent) and `body`.
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        let mut header = String::with_capacity(self.macs.len() * 48);
        for mac in &self.macs {
            let mut mac = mac.clone();
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            if !header.is_empty() {
                header.push(' ');
            }
            header.push_str("v1,");
            base64::engine::general_purpose::STANDARD
                .encode_string(mac.finalize().into_bytes(), &mut header);
        }
        header
    }
}

static WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
static WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
static WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

pub struct WebhookTransport {
    pub client: reqwest::Client,
    /// Parsed once (not per request).
    pub url: reqwest::Url,
    pub signer: Signer,
    pub concurrency: usize,
}

impl WebhookTransport {
    /// One request per row, `concurrency` in flight (completing in any order, so one slow
    /// answer does not hold a slot hostage); results in row order.
    pub async fn send(&self, rows: &[OutboxRow], budget: &Budget) -> Vec<SendResult> {
        // Boxed futures: a concrete type keeps the worker's future `Send` for tokio::spawn.
        let calls: Vec<BoxFuture<'_, (usize, SendResult)>> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| -> BoxFuture<'_, (usize, SendResult)> {
                Box::pin(async move {
                    budget.acquire().await;
                    (i, self.post(row).await)
                })
            })
            .collect();
        let mut answered: Vec<(usize, SendResult)> = futures_util::stream::iter(calls)
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        answered.sort_unstable_by_key(|(i, _)| *i);
        answered.into_iter().map(|(_, r)| r).collect()
    }

    /// The request for one row: built directly (header names are constants, values are moved in,
    /// not parsed and copied as `RequestBuilder::header` does).
    fn request(&self, row: &OutboxRow) -> Result<reqwest::Request, InvalidHeaderValue> {
        // Payloads always carry their id; the inbox id is a last resort for a damaged one.
        let id = payload_event_id(&row.payload).unwrap_or_else(|| format!("evt_{}", row.inbox_id));
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let signature = self.signer.sign(&id, &timestamp, row.payload.as_bytes());
        let mut request = reqwest::Request::new(reqwest::Method::POST, self.url.clone());
        let headers = request.headers_mut();
        headers.reserve(4);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(&WEBHOOK_ID, HeaderValue::try_from(id)?);
        headers.insert(&WEBHOOK_TIMESTAMP, HeaderValue::try_from(timestamp)?);
        headers.insert(&WEBHOOK_SIGNATURE, HeaderValue::try_from(signature)?);
        *request.body_mut() = Some(row.payload.clone().into());
        Ok(request)
    }

    /// One row, within the destination's budget (the worker's continuous pipeline).
    pub async fn send_one(&self, row: &OutboxRow, budget: &Budget) -> SendResult {
        budget.acquire().await;
        self.post(row).await
    }

    async fn post(&self, row: &OutboxRow) -> SendResult {
        let request = self.request(row);
        let started = SendResult::start();
        let clock = Instant::now();
        let request = match request {
            Ok(request) => request,
            // Cannot happen (an id, a number and base64), but a row is never lost over it.
            Err(e) => return SendResult::retry(started, clock, format!("request not built: {e}")),
        };
        match self.client.execute(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, crate::clock::now_ms()));
                let verdict = classify_status(status, retry_after);
                let body = read_response(response).await;
                SendResult::answered(started, clock, status, verdict, body)
            }
            Err(e) => SendResult::failed(started, clock, &e),
        }
    }
}

/// What [`SendResult::answered`] keeps of a response: the body of anything but a 2xx.
pub fn keep_response(verdict: Verdict, body: String) -> Option<String> {
    (verdict != Verdict::Delivered).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_reference_vector() {
        // From the Standard Webhooks specification's test vectors.
        let keys = parse_secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&keys, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn several_secrets_sign_once_each_for_rotation() {
        let keys = parse_secrets("whsec_c2VjcmV0LW9uZQ== c2VjcmV0LXR3bw==").unwrap();
        assert_eq!(keys, vec![b"secret-one".to_vec(), b"secret-two".to_vec()]);
        let header = sign(&keys, "evt_1", 1, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn unusable_secrets_are_refused() {
        assert!(parse_secrets("").is_err());
        assert!(parse_secrets("whsec_!!!").is_err());
        assert!(parse_secrets("whsec_").is_err());
    }
}
