//! Startup wiring, in one place: store → migrations → ingest writer → sources → HTTP (and
//! HTTPS) → delivery workers. [`Application::build`] binds the listeners first, so tests can ask
//! for port 0 and read the real ports back before running.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    delivery::{self, routes::OutboxRoutes},
    health::Health,
    http::{self, tls::TlsListener, AppState},
    ingest::{self, Ingest, IngestWriter},
    sources::{
        amqp::{AmqpConsumer, QueueSpec},
        erp::{ErpDecoder, Feed},
        loymax::{self, LoymaxDecoder},
    },
    store::{self, Store},
    telemetry,
};

pub struct Application {
    settings: Arc<Settings>,
    listener: TcpListener,
    /// The HTTPS listener and its rustls configuration, when `listener.tls.enabled`.
    tls: Option<(TcpListener, Arc<ServerConfig>)>,
    state: AppState,
    /// One worker per destination (started by `run_until_stopped`); stopped by the shutdown
    /// token, each releases its leases.
    delivery: Vec<delivery::Worker>,
    /// The queues to consume; the consumer owns one connection for all of them.
    queues: Vec<QueueSpec>,
    /// The group-commit writer; joined last, after every ingest handle is dropped.
    writer: IngestWriter,
}

/// The AMQP queues every enabled source consumes.
pub fn queue_specs(settings: &Settings) -> anyhow::Result<Vec<QueueSpec>> {
    let mut specs = Vec::new();
    if settings.erp.enabled {
        let phones = crate::consent::Normaliser::new(&settings.consent.default_region)
            .map_err(|e| anyhow::anyhow!("consent.default_region: {e}"))?;
        let consent_flags: std::collections::BTreeMap<String, crate::consent::Channel> = settings
            .erp
            .consent_flags
            .iter()
            .filter_map(|(name, channel)| {
                crate::consent::Channel::parse(channel).map(|c| (name.clone(), c))
            })
            .collect();
        for (queue, feed) in [
            (&settings.erp.customer_queue, Feed::Customer),
            (&settings.erp.subscription_queue, Feed::Subscription),
        ] {
            specs.push(QueueSpec {
                queue: queue.clone(),
                declare: settings.erp.declare,
                exchange: None,
                decoder: Arc::new(ErpDecoder {
                    feed,
                    phones: phones.clone(),
                    consent_flags: consent_flags.clone(),
                }),
            });
        }
    }
    if settings.loymax.enabled {
        let phones = crate::consent::Normaliser::new(&settings.loymax.phone_region)
            .map_err(|e| anyhow::anyhow!("loymax.phone_region: {e}"))?;
        specs.push(QueueSpec {
            queue: settings.loymax.queue.clone(),
            declare: settings.loymax.declare,
            exchange: Some(loymax::exchange_spec(&settings.loymax)),
            decoder: Arc::new(LoymaxDecoder::new(phones)),
        });
    }
    Ok(specs)
}

/// Open the store named by the settings and apply migrations if asked to.
pub fn open_store(settings: &Settings, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::open(settings).context("cannot open the store")?;
    if migrate {
        let applied = store.migrate().context("migrations failed")?;
        if applied > 0 {
            tracing::info!(applied, "migrations applied");
        }
    }
    Ok(store)
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Opening and migrating block (file I/O, network for PostgreSQL): off the async workers.
        let opening = settings.clone();
        let store = tokio::task::spawn_blocking(move || {
            open_store(&opening, opening.store.migrate_on_start)
        })
        .await
        .context("store task failed")??;
        Self::build_with_store(settings, store).await
    }

    /// Build around an already opened (and migrated) store.
    pub async fn build_with_store(
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        let keep = store.clone();
        let built = Self::assemble(settings, store).await;
        if built.is_err() {
            // The last handle of a PostgreSQL store must not be dropped on a runtime thread
            // (its client blocks on a runtime of its own): startup errors exit 1, not a panic.
            let _ = tokio::task::spawn_blocking(move || drop(keep)).await;
        }
        built
    }

    async fn assemble(settings: Settings, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        // Normally done first thing in `main`; here too for embedders and tests (idempotent).
        http::tls::install_crypto_provider();
        let settings = Arc::new(settings);
        let listener = TcpListener::bind(settings.http.addr)
            .await
            .with_context(|| format!("cannot listen on http.addr {}", settings.http.addr))?;
        let tls = if settings.listener.tls.enabled {
            let tls = &settings.listener.tls;
            let config = http::tls::server_config(&tls.cert_path, &tls.key_path)?;
            let listener = TcpListener::bind(tls.addr)
                .await
                .with_context(|| format!("cannot listen on listener.tls.addr {}", tls.addr))?;
            Some((listener, config))
        } else {
            None
        };
        // The recorder first: workers register their metric handles when they are built.
        let metrics = telemetry::metrics_handle();
        let delivery = delivery::workers(&settings, &store)?;
        let health = Health::default();
        let (ingest, writer) = ingest::start_with_routes(
            store.clone(),
            &settings.ingest,
            Arc::new(OutboxRoutes::from_settings(&settings)),
            health.clone(),
            tokio::runtime::Handle::current(),
        );
        let queues = queue_specs(&settings)?;
        telemetry::register_series(
            &settings,
            &queues.iter().map(|q| q.queue.clone()).collect::<Vec<_>>(),
        );
        for q in &queues {
            health.set(&q.component(), false, "connecting");
        }
        let state = AppState {
            settings: settings.clone(),
            store,
            ingest,
            health,
            metrics,
            normaliser: crate::consent::Normaliser::new(&settings.consent.default_region)
                .map_err(|m| anyhow::anyhow!("consent.default_region: {m}"))?,
            listener: Arc::new(http::listener::Access::new(&settings.listener)),
        };
        Ok(Self {
            settings,
            listener,
            tls,
            state,
            delivery,
            queues,
            writer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.http.addr)
    }

    /// The HTTPS address, when `listener.tls.enabled`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    pub fn ingest(&self) -> Ingest {
        self.state.ingest.clone()
    }

    /// Serve until `shutdown` is cancelled, then drain: stop consuming, let in-flight events
    /// commit and be acked or answered, stop the writer. Gives up after `shutdown.timeout`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            settings,
            listener,
            tls,
            state,
            delivery,
            queues,
            writer,
        } = self;
        let health = state.health.clone();
        tracing::info!(addr = %listener.local_addr()?, store = %crate::config::redact_url(&settings.store.url), "subgate serving");
        if settings.admin.read_token.expose().is_empty()
            && !listener.local_addr()?.ip().is_loopback()
        {
            tracing::warn!(
                "the read API (GET /api/v1/...) is open beyond loopback: set admin.read_token \
                 (SUBGATE__ADMIN__READ_TOKEN) unless a proxy authenticates in front of subgate"
            );
        }

        let upkeep = {
            let handle = state.metrics.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                    }
                }
            })
        };

        let consumer = AmqpConsumer {
            settings: settings.clone(),
            specs: queues,
            ingest: state.ingest.clone(),
            health: health.clone(),
        };
        let consumer = tokio::spawn(consumer.run(shutdown.clone()));

        let tls_server = match tls {
            Some((listener, config)) => {
                let addr = listener.local_addr()?;
                tracing::info!(%addr, "subgate serving HTTPS");
                let app = http::tls_router(state.clone());
                let listener = TlsListener::spawn(listener, config, shutdown.clone())?;
                let stop = shutdown.clone();
                Some(tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                }))
            }
            None => None,
        };
        // Delivery reads the outbox on its own schedule: nothing in the ingest path waits for it.
        let delivery = delivery::spawn(delivery, &settings, &state.store, &shutdown);

        let app = http::router(state);
        let server_stop = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { server_stop.cancelled().await })
                .await
        });

        shutdown.cancelled().await;
        health.start_draining();
        tracing::info!("shutting down: draining in-flight events");
        let drain = async {
            let _ = consumer.await;
            let mut served = server.await;
            if let Some(tls_server) = tls_server {
                let tls_served = tls_server.await;
                if matches!(served, Ok(Ok(()))) {
                    served = tls_served;
                }
            }
            let _ = upkeep.await;
            for worker in delivery {
                let _ = worker.await;
            }
            // Every ingest handle is gone now; the writer commits what is queued and stops.
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .ok();
            served
        };
        match tokio::time::timeout(settings.shutdown.timeout, drain).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!("shutdown complete");
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(anyhow::anyhow!("HTTP server failed: {e}")),
            Ok(Err(e)) => Err(anyhow::anyhow!("HTTP server task failed: {e}")),
            Err(_) => Err(anyhow::anyhow!(
                "shutdown.timeout ({}) elapsed before in-flight events were drained",
                crate::config::format_duration(&settings.shutdown.timeout)
            )),
        }
    }
}
