//! Delivery: real changes out to providers, at least once, in commit order per destination and
//! entity, through a durable outbox (see `docs/delivery.md`).
//!
//! - [`event`]: the canonical event every destination receives, and the contact view;
//! - [`contact`]: the contact view's consents, from the ledger;
//! - [`routes`]: which destinations an event goes to (used by the ingest transaction to write
//!   one outbox row per matching destination);
//! - [`retry`]: the pure retry policy (classification, schedule, jitter, `Retry-After`);
//! - [`worker`]: one worker per destination: claim due rows with a lease, send, record;
//! - [`webhook`], [`emarsys`], [`amqp`]: the three transports;
//! - [`retention`]: finished rows are purged `delivery.retention` after they finished.
//!
//! Nothing here runs in the ingest path: the pipeline only writes outbox rows; workers are tokio
//! tasks that read them back through the store (`spawn_blocking`, short transactions).

pub mod amqp;
pub mod contact;
pub mod emarsys;
pub mod event;
pub mod retention;
pub mod retry;
pub mod routes;
pub mod webhook;
pub mod worker;

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::worker::{StepReport, Worker};
use crate::{config::Settings, rate_limit::RateLimiter, store::Store};

/// An HTTP client for one destination: its own connection pool, rustls with aws-lc-rs and the
/// Mozilla roots, the destination's timeout, no redirects (a 3xx is an answer, not a detour).
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    use tokio_rustls::rustls::{self, crypto::aws_lc_rs, RootCertStore};
    let roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("subgate/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// A destination's request budget: waits for a token instead of refusing.
pub struct Budget {
    limiter: Option<RateLimiter>,
}

impl Budget {
    /// `per_minute == 0`: unlimited. Bursts of up to one second's worth.
    pub fn per_minute(per_minute: u32) -> Self {
        let limiter = (per_minute > 0).then(|| {
            let per_second = f64::from(per_minute) / 60.0;
            RateLimiter::new(per_second, (per_minute / 60).max(1))
        });
        Self { limiter }
    }

    pub async fn acquire(&self) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        while let crate::rate_limit::Admission::Limited { retry_after } = limiter.check("") {
            tokio::time::sleep(retry_after).await;
        }
    }
}

/// One worker per enabled destination (none when `delivery.enabled` is false). Built at
/// startup so a destination that cannot be set up fails the start, not the first delivery.
pub fn workers(settings: &Arc<Settings>, store: &Arc<dyn Store>) -> anyhow::Result<Vec<Worker>> {
    if !settings.delivery.enabled {
        return Ok(Vec::new());
    }
    settings
        .destinations
        .iter()
        .filter(|d| d.enabled)
        .map(|d| Worker::new(settings, d, store.clone()))
        .collect()
}

/// Run the workers and the metrics sampler until `shutdown`; each worker then releases its
/// leases.
pub fn spawn(
    workers: Vec<Worker>,
    settings: &Arc<Settings>,
    store: &Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut tasks: Vec<JoinHandle<()>> = workers
        .into_iter()
        .map(|w| {
            tracing::info!(destination = %w.destination(), "delivery worker started");
            tokio::spawn(w.run(shutdown.clone()))
        })
        .collect();
    if !settings.delivery.retention.is_zero() {
        tasks.push(tokio::spawn(retention::run(
            store.clone(),
            settings.delivery.retention,
            shutdown.clone(),
        )));
    }
    if !settings.destinations.is_empty() {
        tasks.push(tokio::spawn(sample_metrics(
            settings.clone(),
            store.clone(),
            shutdown.clone(),
        )));
    }
    tasks
}

/// Every few seconds: pending depth, oldest pending age and dead count per destination.
async fn sample_metrics(settings: Arc<Settings>, store: Arc<dyn Store>, stop: CancellationToken) {
    let names: Vec<String> = settings
        .destinations
        .iter()
        .map(|d| d.name.clone())
        .collect();
    loop {
        let store = store.clone();
        let list = names.clone();
        let sampled = tokio::task::spawn_blocking(move || {
            list.iter()
                .map(|n| store.delivery_stats(n))
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
        match sampled {
            Ok(Ok(stats)) => {
                let now = crate::clock::now_ms();
                for s in stats {
                    let age = s
                        .oldest_pending_at
                        .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
                    let name = s.destination;
                    metrics::gauge!("subgate_delivery_pending", "destination" => name.clone())
                        .set(s.pending as f64);
                    metrics::gauge!("subgate_delivery_oldest_pending_age_seconds", "destination" => name.clone())
                        .set(age);
                    metrics::gauge!("subgate_delivery_dead", "destination" => name)
                        .set(s.dead as f64);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "delivery metrics not sampled"),
            Err(e) => tracing::warn!(error = %e, "delivery metrics task failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// `--since` / `?since=`: RFC 3339 (`2024-05-01T10:00:00Z`), a date (`2024-05-01`, midnight UTC)
/// or a duration back from `now_ms` (`24h`, `30m`). Unix milliseconds.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, String> {
    let t = text.trim();
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(at.timestamp_millis());
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        if let Some(midnight) = day.and_hms_opt(0, 0, 0) {
            return Ok(midnight.and_utc().timestamp_millis());
        }
    }
    crate::config::parse_duration(t)
        .map(|d| now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
        .map_err(|_| {
            format!("{t:?} is not a time: use RFC 3339, YYYY-MM-DD or a duration back (24h)")
        })
}

/// An outbox row as the CLI and the admin API show it.
pub fn row_json(row: &crate::store::OutboxRow) -> serde_json::Value {
    use crate::clock::to_rfc3339;
    serde_json::json!({
        "id": row.id,
        "destination": row.destination,
        "state": row.state.as_str(),
        "source": row.source,
        "kind": row.kind,
        "entity": row.entity,
        "event_id": event::payload_event_id(&row.payload),
        "inbox_id": row.inbox_id,
        "attempts": row.attempts,
        "created_at": to_rfc3339(row.created_at),
        "next_attempt_at": (row.state == crate::store::DeliveryState::Pending)
            .then(|| to_rfc3339(row.next_attempt_at)),
        "last_status": row.last_status,
        "last_error": row.last_error,
        "last_response": row.last_response,
        "finished_at": row.finished_at.map(to_rfc3339),
        "superseded_by": row.superseded_by,
        "replays": row.replays,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_rfc3339_dates_and_durations_back() {
        assert_eq!(parse_since("1970-01-02", 0), Ok(86_400_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert_eq!(parse_since("2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert!(parse_since("yesterday", 0).is_err());
    }
}
