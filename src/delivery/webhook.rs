//! Webhooks with Standard Webhooks signatures (<https://www.standardwebhooks.com>): `POST` of the
//! canonical event JSON with `webhook-id` (the event id, stable across retries and replays),
//! `webhook-timestamp` (Unix seconds) and `webhook-signature`: `v1,` + base64 HMAC-SHA256 of
//! `id.timestamp.body`, one entry per configured secret (space-separated), for rotation.

use std::time::Instant;

use base64::Engine;
use futures_util::{future::BoxFuture, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    event::event_id,
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
    keys.iter()
        .map(|key| {
            // HMAC takes keys of any length; the error arm cannot happen.
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                return String::new();
            };
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            let digest = mac.finalize().into_bytes();
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub struct WebhookTransport {
    pub client: reqwest::Client,
    /// Parsed once (not per request).
    pub url: reqwest::Url,
    pub keys: Vec<Vec<u8>>,
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

    async fn post(&self, row: &OutboxRow) -> SendResult {
        let id = event_id(row.inbox_id);
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(&self.keys, &id, timestamp, row.payload.as_bytes());
        let started = SendResult::start();
        let clock = Instant::now();
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(row.payload.clone())
            .send()
            .await;
        match sent {
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
