//! Logs (tracing; json or pretty) and metrics (Prometheus text via `/metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogFormat, LogSettings, Settings};

/// Install the global log subscriber (once per process; later calls are ignored).
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// The process-wide metrics recorder (installed on first use, shared by every app instance in
/// the process, which is what in-process integration tests need).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("subgate_batch_size".into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".into()),
                        &[
                            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                            2.5,
                        ],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding program);
            // then our handle renders an empty page rather than failing startup.
            if metrics::set_global_recorder(recorder).is_ok() {
                describe_metrics();
            }
            handle
        })
        .clone()
}

/// HELP text of every metric (README "Metrics", docs/delivery.md, docs/akinon.md,
/// docs/loymax.md, docs/listener.md).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "subgate_received_total",
        "AMQP deliveries received, per queue"
    );
    describe_counter!(
        "subgate_committed_total",
        "Events whose commit outcome is known, per source and status (applied, noop, stale, duplicate, rejected)"
    );
    describe_counter!(
        "subgate_dead_lettered_total",
        "AMQP deliveries published to the dead-letter exchange, per queue and reason"
    );
    describe_counter!(
        "subgate_requeued_total",
        "AMQP deliveries nacked with requeue, per queue"
    );
    describe_counter!(
        "subgate_commit_failures_total",
        "Failed commit attempts while the store cannot write, per reason"
    );
    describe_gauge!(
        "subgate_store_writable",
        "1 while the store takes writes, 0 during an outage"
    );
    describe_counter!(
        "subgate_commit_conflicts_total",
        "Batches written again after losing a race with another instance"
    );
    describe_histogram!("subgate_batch_size", Unit::Count, "Events per group commit");
    describe_histogram!(
        "subgate_commit_seconds",
        Unit::Seconds,
        "Time to write and commit one batch"
    );
    describe_histogram!(
        "subgate_ingest_wait_seconds",
        Unit::Seconds,
        "Per event: queued for the writer until its batch starts"
    );
    describe_histogram!(
        "subgate_amqp_settle_seconds",
        Unit::Seconds,
        "Per AMQP delivery: received until its commit's outcome is known, per queue"
    );
    describe_gauge!(
        "subgate_consumer_connected",
        "1 while the queue is being consumed, per queue"
    );
    describe_counter!(
        "subgate_amqp_reconnects_total",
        "AMQP reconnections after a lost session"
    );
    describe_counter!(
        "subgate_erp_unknown_status_total",
        "ERP snapshots with an unknown status"
    );
    describe_histogram!(
        "subgate_wal_rewind_checkpoint_seconds",
        Unit::Seconds,
        "SQLite: the writer finishing a checkpoint so the WAL rewinds"
    );
    describe_counter!(
        "subgate_akinon_requests_total",
        "Akinon calls answered, per endpoint and code (ok or the error code)"
    );
    describe_histogram!(
        "subgate_akinon_request_seconds",
        Unit::Seconds,
        "Akinon calls: time to answer, per endpoint"
    );
    describe_counter!(
        "subgate_consent_reports_total",
        "Consent reports taken in, per way in (admin API, one-click link)"
    );
    describe_counter!(
        "subgate_loymax_events_total",
        "Loymax events decoded, per kind"
    );
    describe_counter!(
        "subgate_loymax_unknown_events_total",
        "Loymax events of an unknown type (stored, not projected)"
    );
    describe_counter!(
        "subgate_listener_requests_total",
        "Listener requests answered, per HTTP status and error code"
    );
    describe_counter!(
        "subgate_listener_notifications_total",
        "Listener notifications committed, per event type and outcome"
    );
    describe_counter!(
        "subgate_delivery_attempts_total",
        "Delivery attempts, per destination and outcome (delivered, retry, dead)"
    );
    describe_histogram!(
        "subgate_delivery_seconds",
        Unit::Seconds,
        "Delivery attempts: time to the provider's answer, per destination"
    );
    describe_gauge!(
        "subgate_delivery_pending",
        "Outbox rows waiting to be delivered, per destination"
    );
    describe_gauge!(
        "subgate_delivery_oldest_pending_age_seconds",
        "Age of the oldest pending outbox row, per destination"
    );
    describe_gauge!(
        "subgate_delivery_dead",
        "Dead outbox rows (kept for replay), per destination"
    );
    describe_counter!(
        "subgate_outbox_purged_total",
        "Finished outbox rows purged by retention"
    );
}

/// Register the counters and gauges of every known label set at 0, so the first scrape after
/// start shows each series (rates and alerts need the zero). Counters are incremented by 0 and
/// gauges moved by 0: a series that already has a value keeps it.
pub fn register_series(settings: &Settings, queues: &[String]) {
    use metrics::{counter, gauge};
    for queue in queues {
        counter!("subgate_received_total", "queue" => queue.clone()).increment(0);
        counter!("subgate_requeued_total", "queue" => queue.clone()).increment(0);
        gauge!("subgate_consumer_connected", "queue" => queue.clone()).increment(0.0);
    }
    let mut sources = vec![
        crate::sources::akinon::SOURCE,
        crate::sources::consents::ADMIN_SOURCE,
        crate::sources::consents::LINK_SOURCE,
    ];
    if settings.erp.enabled {
        sources.push(crate::sources::erp::SOURCE);
        counter!("subgate_erp_unknown_status_total").increment(0);
    }
    if settings.loymax.enabled {
        sources.push(crate::sources::loymax::SOURCE);
        counter!("subgate_loymax_unknown_events_total").increment(0);
    }
    if settings.listener.enabled {
        sources.push(crate::sources::listener::SOURCE);
        for event_type in crate::sources::listener::EventType::ALL {
            for outcome in ["applied", "noop", "stale", "duplicate"] {
                counter!("subgate_listener_notifications_total", "event_type" => event_type.as_str(), "outcome" => outcome)
                    .increment(0);
            }
        }
    }
    for source in sources {
        for status in ["applied", "noop", "stale", "duplicate", "rejected"] {
            counter!("subgate_committed_total", "source" => source, "status" => status)
                .increment(0);
        }
    }
    for reason in crate::ingest::OUTAGE_REASONS {
        counter!("subgate_commit_failures_total", "reason" => *reason).increment(0);
    }
    gauge!("subgate_store_writable").increment(0.0);
    counter!("subgate_commit_conflicts_total").increment(0);
    if !queues.is_empty() {
        counter!("subgate_amqp_reconnects_total").increment(0);
    }
    for endpoint in [
        "subscribe-email",
        "subscribe-user",
        "order-info",
        "unsubscribed-users",
    ] {
        counter!("subgate_akinon_requests_total", "endpoint" => endpoint, "code" => "ok")
            .increment(0);
    }
    for via in ["admin", "link"] {
        counter!("subgate_consent_reports_total", "via" => via).increment(0);
    }
    for d in &settings.destinations {
        for outcome in ["delivered", "retry", "dead"] {
            counter!("subgate_delivery_attempts_total", "destination" => d.name.clone(), "outcome" => outcome)
                .increment(0);
        }
        for name in [
            "subgate_delivery_pending",
            "subgate_delivery_oldest_pending_age_seconds",
            "subgate_delivery_dead",
        ] {
            gauge!(name, "destination" => d.name.clone()).increment(0.0);
        }
    }
    if settings.delivery.enabled {
        counter!("subgate_outbox_purged_total").increment(0);
    }
}
