//! The supervised AMQP consumer that every queue-based source plugs into.
//!
//! Supervision loop (lapin/amqprs recovery is not dependable, so we own it): connect → declare or
//! passively verify the topology (queue, dead-letter exchange and queue, optional exchange and
//! bindings) → `basic.qos(prefetch)` → consume. Any connection or channel error drops the session;
//! we reconnect with exponential backoff and full jitter and report not-ready meanwhile.
//!
//! Per queue, a *pump* decodes deliveries and hands envelopes to the ingest pipeline, and an
//! *acker* resolves them strictly in delivery order:
//! - committed → acked with `multiple=true` up to the last resolved tag, flushed whenever the
//!   acker would otherwise wait (so acks coalesce under load and go out at once when idle);
//! - undecodable or rejected by the pipeline → published to the dead-letter exchange with the
//!   reason in `x-subgate-error` (a transactional publish), then acked;
//! - store cannot write → nothing: the ingest writer holds the event and writes it again with
//!   backoff, the delivery stays unacked, prefetch stops the broker sending more, and no
//!   redelivery counts against quorum queues' `x-delivery-limit`;
//! - shutdown → what is not committed stays unacked; the broker delivers it again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use amqprs::{
    callbacks::{DefaultChannelCallback, DefaultConnectionCallback},
    channel::{
        BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicNackArguments,
        BasicPublishArguments, BasicQosArguments, Channel, ExchangeDeclareArguments,
        QueueBindArguments, QueueDeclareArguments,
    },
    connection::{Connection, OpenConnectionArguments},
    BasicProperties, FieldName, FieldTable, FieldValue,
};
use serde_json::{json, Value};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{QueueType, Settings},
    envelope::Envelope,
    health::Health,
    ingest::{Ingest, IngestError, Reply},
};

/// How long a connection attempt (TCP + AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A message as a decoder sees it.
pub struct AmqpMessage<'a> {
    pub queue: &'a str,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub redelivered: bool,
    pub properties: &'a BasicProperties,
    pub body: &'a [u8],
}

impl AmqpMessage<'_> {
    /// The AMQP `timestamp` property (seconds) as Unix milliseconds.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.properties
            .timestamp()
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| s.checked_mul(1000))
    }

    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Transport metadata stored with the inbox row.
    pub fn meta(&self) -> Value {
        json!({
            "transport": "amqp",
            "queue": self.queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "redelivered": self.redelivered,
            "message_id": self.message_id(),
            "timestamp": self.properties.timestamp(),
            "content_type": self.properties.content_type(),
        })
    }
}

/// Why a message cannot be accepted: it goes to the dead-letter queue with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable machine-readable code (`not_json`, `not_an_object`, `missing_id`, `too_large`, …).
    pub code: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }

    fn header(&self) -> String {
        format!("{}: {}", self.code, self.detail)
    }
}

/// Turns one queue's messages into envelopes.
pub trait Decoder: Send + Sync + 'static {
    fn decode(&self, message: &AmqpMessage<'_>) -> Result<Envelope, Rejection>;
}

/// An exchange a source's queue is bound to.
#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    pub name: String,
    /// direct | topic | fanout | headers
    pub kind: String,
    pub routing_keys: Vec<String>,
}

/// One queue to consume.
#[derive(Clone)]
pub struct QueueSpec {
    pub queue: String,
    /// Declare the topology (true) or only verify it exists (false).
    pub declare: bool,
    pub exchange: Option<ExchangeSpec>,
    pub decoder: Arc<dyn Decoder>,
}

impl QueueSpec {
    pub fn component(&self) -> String {
        format!("amqp:{}", self.queue)
    }
}

/// Host, port, vhost and credentials parsed from `amqp.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub vhost: String,
    pub user: String,
    pub password: String,
}

impl BrokerAddress {
    /// `amqp://user:password@host:port/vhost`, percent-escapes decoded (`%2f` is the vhost
    /// `/`); an IPv6 host is written in brackets (`amqp://[::1]:5672/%2f`).
    pub fn parse(text: &str) -> Result<Self, String> {
        const SHAPE: &str = "must look like amqp://user:password@host:port/vhost";
        let url = url::Url::parse(text).map_err(|e| format!("{SHAPE}: {e}"))?;
        match url.scheme() {
            "amqp" => {}
            "amqps" => return Err("amqps:// (TLS) is not supported yet".into()),
            _ => return Err(SHAPE.into()),
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err("no host".into()),
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
        };
        let (user, password) = if url.username().is_empty() && url.password().is_none() {
            ("guest".to_owned(), "guest".to_owned())
        } else {
            (
                decode(url.username())?,
                decode(url.password().unwrap_or(""))?,
            )
        };
        let vhost = match url.path().strip_prefix('/').unwrap_or(url.path()) {
            "" => "/".to_owned(),
            raw => decode(raw)?,
        };
        Ok(Self {
            host,
            port: url.port().unwrap_or(5672),
            vhost,
            user,
            password,
        })
    }
}

/// Exponential backoff with full jitter: a random delay in [initial, min(max, initial·2^n)].
pub fn backoff_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let ceiling = initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let span = ceiling.saturating_sub(initial).as_millis() as u64;
    initial + Duration::from_millis(fastrand::u64(0..=span))
}

/// Everything a consumer needs; one per process, covering every queue-based source.
pub struct AmqpConsumer {
    pub settings: Arc<Settings>,
    pub specs: Vec<QueueSpec>,
    pub ingest: Ingest,
    pub health: Health,
}

impl AmqpConsumer {
    /// Run until `shutdown` is cancelled; then stop consuming, let in-flight events commit, ack
    /// them, and close the connection.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.specs.is_empty() {
            return;
        }
        let initial = Duration::from_millis(self.settings.amqp.reconnect_initial_ms);
        let max = Duration::from_millis(self.settings.amqp.reconnect_max_ms);
        let mut attempt = 0u32;
        let mut sessions = 0u64;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if sessions > 0 {
                metrics::counter!("subgate_amqp_reconnects_total").increment(1);
            }
            sessions += 1;
            let started = std::time::Instant::now();
            let result = self.run_session(&shutdown).await;
            for spec in &self.specs {
                metrics::gauge!("subgate_consumer_connected", "queue" => spec.queue.clone())
                    .set(0.0);
            }
            match result {
                Ok(()) => break,
                Err(reason) => {
                    tracing::warn!(%reason, "AMQP session ended; reconnecting");
                    for spec in &self.specs {
                        self.health.set(
                            &spec.component(),
                            false,
                            format!("disconnected: {reason}"),
                        );
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                attempt = 0;
            }
            let delay = backoff_delay(attempt, initial, max);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        for spec in &self.specs {
            self.health.set(&spec.component(), false, "stopped");
        }
    }

    async fn run_session(&self, shutdown: &CancellationToken) -> Result<(), String> {
        let address = BrokerAddress::parse(&self.settings.amqp.url)?;
        let args = OpenConnectionArguments::new(
            &address.host,
            address.port,
            &address.user,
            &address.password,
        )
        .virtual_host(&address.vhost)
        .heartbeat(self.settings.amqp.heartbeat_secs)
        .connection_name(&self.settings.amqp.connection_name)
        .finish();
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::open(&args))
            .await
            .map_err(|_| format!("connecting to {}:{} timed out", address.host, address.port))?
            .map_err(|e| format!("cannot connect to {}:{}: {e}", address.host, address.port))?;
        connection
            .register_callback(DefaultConnectionCallback)
            .await
            .map_err(|e| e.to_string())?;

        let session = shutdown.child_token();
        let mut pumps = JoinSet::new();
        for spec in &self.specs {
            let (channel, dead_letters) = match self.open_queue(&connection, spec).await {
                Ok(pair) => pair,
                Err(e) => {
                    session.cancel();
                    while pumps.join_next().await.is_some() {}
                    let _ = connection.close().await;
                    return Err(e);
                }
            };
            let consume = BasicConsumeArguments::new(&spec.queue, "")
                .manual_ack(true)
                .finish();
            let (consumer_tag, deliveries) = channel
                .basic_consume_rx(consume)
                .await
                .map_err(|e| format!("basic.consume on {}: {e}", spec.queue))?;
            self.health.set(&spec.component(), true, "consuming");
            metrics::gauge!("subgate_consumer_connected", "queue" => spec.queue.clone()).set(1.0);
            tracing::info!(queue = %spec.queue, "consuming");
            let pump = Pump {
                spec: spec.clone(),
                channel,
                dead_letters,
                consumer_tag,
                ingest: self.ingest.clone(),
                settings: self.settings.clone(),
            };
            pumps.spawn(pump.run(deliveries, session.clone()));
        }

        let outcome = tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            Some(ended) = pumps.join_next() => Err(match ended {
                Ok(Err(e)) => e,
                Ok(Ok(())) => "consumer stopped".to_owned(),
                Err(e) => format!("consumer task failed: {e}"),
            }),
            _ = watch_connection(&connection) => Err("connection to the broker lost".to_owned()),
        };
        // Stop every pump: each stops taking deliveries, waits for its in-flight events to
        // commit, and acks them (on a live channel) before returning.
        session.cancel();
        while pumps.join_next().await.is_some() {}
        let _ = connection.close().await;
        outcome
    }

    /// Declare or verify one queue's topology, then return its consuming channel (with qos set)
    /// and its dead-letter publishing channel (transactional).
    async fn open_queue(
        &self,
        connection: &Connection,
        spec: &QueueSpec,
    ) -> Result<(Channel, Channel), String> {
        let channel = connection
            .open_channel(None)
            .await
            .map_err(|e| format!("open channel: {e}"))?;
        channel
            .register_callback(DefaultChannelCallback)
            .await
            .map_err(|e| e.to_string())?;
        declare_topology(&channel, spec, &self.settings).await?;
        channel
            .basic_qos(BasicQosArguments::new(
                0,
                self.settings.amqp.prefetch,
                false,
            ))
            .await
            .map_err(|e| format!("basic.qos: {e}"))?;
        let dead_letters = connection
            .open_channel(None)
            .await
            .map_err(|e| format!("open channel: {e}"))?;
        dead_letters
            .register_callback(DefaultChannelCallback)
            .await
            .map_err(|e| e.to_string())?;
        dead_letters
            .tx_select()
            .await
            .map_err(|e| format!("tx.select: {e}"))?;
        Ok((channel, dead_letters))
    }
}

/// Resolves when the connection is no longer open.
async fn watch_connection(connection: &Connection) {
    tokio::select! {
        _ = connection.listen_network_io_failure() => {}
        _ = async {
            while connection.is_open() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        } => {}
    }
}

fn text(s: &str) -> FieldValue {
    FieldValue::from(s.to_owned())
}

fn field(name: &str) -> Result<FieldName, String> {
    name.try_into()
        .map_err(|_| format!("invalid AMQP field name {name:?}"))
}

async fn declare_topology(
    channel: &Channel,
    spec: &QueueSpec,
    settings: &Settings,
) -> Result<(), String> {
    let dlx = &settings.amqp.dead_letter_exchange;
    let dlq = settings.dead_letter_queue_for(&spec.queue);
    let explain = |what: String| {
        move |e: amqprs::error::Error| {
            format!("{what}: {e} (with declare = false the upstream must own this topology)")
        }
    };
    if !spec.declare {
        channel
            .queue_declare(
                QueueDeclareArguments::new(&spec.queue)
                    .passive(true)
                    .finish(),
            )
            .await
            .map_err(explain(format!("queue {} not found", spec.queue)))?;
        channel
            .exchange_declare(
                ExchangeDeclareArguments::new(dlx, "direct")
                    .passive(true)
                    .finish(),
            )
            .await
            .map_err(explain(format!("dead-letter exchange {dlx} not found")))?;
        if let Some(ex) = &spec.exchange {
            channel
                .exchange_declare(
                    ExchangeDeclareArguments::new(&ex.name, &ex.kind)
                        .passive(true)
                        .finish(),
                )
                .await
                .map_err(explain(format!("exchange {} not found", ex.name)))?;
        }
        return Ok(());
    }

    let quorum = settings.amqp.queue_type == QueueType::Quorum;
    let queue_type = if quorum { "quorum" } else { "classic" };
    let mismatch = |what: String| {
        move |e: amqprs::error::Error| {
            format!("declare {what}: {e} (if it exists with other arguments, delete it or set declare = false)")
        }
    };

    channel
        .exchange_declare(
            ExchangeDeclareArguments::new(dlx, "direct")
                .durable(true)
                .finish(),
        )
        .await
        .map_err(mismatch(format!("exchange {dlx}")))?;
    let mut dlq_args = FieldTable::new();
    dlq_args.insert(field("x-queue-type")?, text(queue_type));
    channel
        .queue_declare(
            QueueDeclareArguments::new(&dlq)
                .durable(true)
                .arguments(dlq_args)
                .finish(),
        )
        .await
        .map_err(mismatch(format!("queue {dlq}")))?;
    channel
        .queue_bind(QueueBindArguments::new(&dlq, dlx, &spec.queue))
        .await
        .map_err(|e| format!("bind {dlq} to {dlx}: {e}"))?;

    let mut args = FieldTable::new();
    args.insert(field("x-queue-type")?, text(queue_type));
    args.insert(field("x-dead-letter-exchange")?, text(dlx));
    args.insert(field("x-dead-letter-routing-key")?, text(&spec.queue));
    if settings.amqp.single_active_consumer {
        args.insert(field("x-single-active-consumer")?, FieldValue::t(true));
    }
    if quorum {
        args.insert(field("x-dead-letter-strategy")?, text("at-least-once"));
        args.insert(field("x-overflow")?, text("reject-publish"));
        args.insert(
            field("x-delivery-limit")?,
            FieldValue::l(i64::from(settings.amqp.delivery_limit)),
        );
    }
    channel
        .queue_declare(
            QueueDeclareArguments::new(&spec.queue)
                .durable(true)
                .arguments(args)
                .finish(),
        )
        .await
        .map_err(mismatch(format!("queue {}", spec.queue)))?;

    if let Some(ex) = &spec.exchange {
        channel
            .exchange_declare(
                ExchangeDeclareArguments::new(&ex.name, &ex.kind)
                    .durable(true)
                    .finish(),
            )
            .await
            .map_err(mismatch(format!("exchange {}", ex.name)))?;
        for key in &ex.routing_keys {
            channel
                .queue_bind(QueueBindArguments::new(&spec.queue, &ex.name, key))
                .await
                .map_err(|e| format!("bind {} to {} ({key}): {e}", spec.queue, ex.name))?;
        }
    }
    Ok(())
}

/// What the acker does with one delivery once it is its turn.
enum Disposition {
    /// Wait for the commit, then ack (or dead-letter / requeue on failure).
    Commit {
        reply: Reply,
        routing_key: String,
        properties: BasicProperties,
        /// When the delivery reached the pump (with its chunk).
        received: Instant,
    },
    /// Publish to the dead-letter exchange with the reason, then ack.
    DeadLetter {
        rejection: Rejection,
        body: Vec<u8>,
        routing_key: String,
        properties: BasicProperties,
    },
}

struct Pump {
    spec: QueueSpec,
    channel: Channel,
    dead_letters: Channel,
    consumer_tag: String,
    ingest: Ingest,
    settings: Arc<Settings>,
}

impl Pump {
    async fn run(
        self,
        mut deliveries: mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
        stop: CancellationToken,
    ) -> Result<(), String> {
        let (to_acker, acker_rx) = mpsc::unbounded_channel();
        let acker = Acker {
            channel: self.channel.clone(),
            dead_letters: self.dead_letters.clone(),
            queue: self.spec.queue.clone(),
            dead_letter_exchange: self.settings.amqp.dead_letter_exchange.clone(),
            store_retry: Duration::from_millis(self.settings.ingest.store_retry_ms),
            pending_ack: None,
            settle: metrics::histogram!("subgate_amqp_settle_seconds", "queue" => self.spec.queue.clone()),
        };
        let acker = tokio::spawn(acker.run(acker_rx, stop.clone(), self.ingest.clone()));
        let max_bytes = self.settings.ingest.max_message_bytes;
        let queue = self.spec.queue.as_str();
        let received = metrics::counter!("subgate_received_total", "queue" => queue.to_owned());

        let result = 'pump: loop {
            let message = tokio::select! {
                biased;
                _ = stop.cancelled() => break Ok(()),
                m = deliveries.recv() => m,
            };
            let Some(message) = message else {
                break Err(format!("channel of {queue} closed"));
            };
            let received_at = Instant::now();
            // What else has already arrived is decoded with it, in two halves at once.
            let mut chunk = Vec::with_capacity(DECODE_CHUNK);
            chunk.extend(Incoming::from_consumer(message));
            while chunk.len() < DECODE_CHUNK {
                match deliveries.try_recv() {
                    Ok(message) => chunk.extend(Incoming::from_consumer(message)),
                    Err(_) => break,
                }
            }
            received.increment(chunk.len() as u64);
            let decoded = match decode_chunk(&self.spec, max_bytes, chunk).await {
                Ok(decoded) => decoded,
                Err(e) => break Err(e),
            };
            for (incoming, decoded) in decoded {
                let Incoming {
                    tag,
                    routing_key,
                    properties,
                    body,
                    ..
                } = incoming;
                let disposition = match decoded {
                    Ok(envelope) => match self.ingest.enqueue_held(envelope).await {
                        Ok(reply) => Disposition::Commit {
                            reply,
                            routing_key,
                            properties,
                            received: received_at,
                        },
                        // Shutting down: leave it unacked; the broker redelivers it.
                        Err(_) => break 'pump Ok(()),
                    },
                    Err(rejection) => Disposition::DeadLetter {
                        rejection,
                        body,
                        routing_key,
                        properties,
                    },
                };
                if to_acker.send((tag, disposition)).is_err() {
                    break 'pump Err("acker stopped".to_owned());
                }
            }
        };

        // Stop the broker sending more; what it already sent stays unacked and is redelivered.
        let _ = self
            .channel
            .basic_cancel(BasicCancelArguments::new(&self.consumer_tag))
            .await;
        drop(to_acker);
        let acked = acker
            .await
            .unwrap_or_else(|e| Err(format!("acker failed: {e}")));
        let _ = self.dead_letters.close().await;
        let _ = self.channel.close().await;
        result.and(acked)
    }
}

/// After a stop, how often the acker looks whether a commit it waits for is held by a store
/// outage (then left unacked) rather than just slow.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Deliveries already waiting are decoded together, up to this many.
const DECODE_CHUNK: usize = 64;
/// From this many, a chunk is split in two halves decoded at once (one on another worker).
const SPLIT_FROM: usize = 8;

/// One delivery, owned, as the pump needs it.
struct Incoming {
    tag: u64,
    exchange: String,
    routing_key: String,
    redelivered: bool,
    properties: BasicProperties,
    body: Vec<u8>,
}

impl Incoming {
    fn from_consumer(message: amqprs::channel::ConsumerMessage) -> Option<Self> {
        let (Some(deliver), Some(properties), Some(body)) =
            (message.deliver, message.basic_properties, message.content)
        else {
            return None;
        };
        // A replayed dead letter comes through the default exchange with the queue's name as
        // its routing key: it is decoded (and deduplicated) with the key it first came with.
        let routing_key = crate::dead_letters::is_replayed(&properties)
            .then(|| crate::dead_letters::original_routing_key(&properties))
            .flatten()
            .unwrap_or_else(|| deliver.routing_key().clone());
        Some(Self {
            tag: deliver.delivery_tag(),
            exchange: deliver.exchange().clone(),
            routing_key,
            redelivered: deliver.redelivered(),
            properties,
            body,
        })
    }

    fn decode(&self, decoder: &dyn Decoder, queue: &str, max_bytes: usize) -> Decoded {
        if self.body.len() > max_bytes {
            return Err(Rejection::new(
                "too_large",
                format!(
                    "{} bytes; ingest.max_message_bytes is {max_bytes}",
                    self.body.len()
                ),
            ));
        }
        decoder.decode(&AmqpMessage {
            queue,
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            redelivered: self.redelivered,
            properties: &self.properties,
            body: &self.body,
        })
    }
}

type Decoded = Result<Envelope, Rejection>;

/// Decode a chunk in delivery order. A large enough chunk is cut in two: the second half is
/// decoded by a spawned task (another runtime worker when one is free) while this task decodes
/// the first, so decoding is not one task's serial work.
async fn decode_chunk(
    spec: &QueueSpec,
    max_bytes: usize,
    mut chunk: Vec<Incoming>,
) -> Result<Vec<(Incoming, Decoded)>, String> {
    let decode_all = move |decoder: &dyn Decoder, queue: &str, items: Vec<Incoming>| {
        items
            .into_iter()
            .map(|m| {
                let decoded = m.decode(decoder, queue, max_bytes);
                (m, decoded)
            })
            .collect::<Vec<_>>()
    };
    if chunk.len() < SPLIT_FROM {
        return Ok(decode_all(spec.decoder.as_ref(), &spec.queue, chunk));
    }
    let tail = chunk.split_off(chunk.len() / 2);
    let decoder = spec.decoder.clone();
    let queue = spec.queue.clone();
    let second = tokio::spawn(async move { decode_all(decoder.as_ref(), &queue, tail) });
    let mut out = decode_all(spec.decoder.as_ref(), &spec.queue, chunk);
    // A decoder panic (a bug) stops this consumer as it did before decoding was split: nothing
    // of the chunk is acked, the broker redelivers it, the supervisor restarts the consumer.
    let rest = second
        .await
        .map_err(|e| format!("decoding half a chunk of {} failed: {e}", spec.queue))?;
    out.extend(rest);
    Ok(out)
}

struct Acker {
    channel: Channel,
    dead_letters: Channel,
    queue: String,
    dead_letter_exchange: String,
    store_retry: Duration,
    /// Highest delivery tag resolved (committed or dead-lettered) and not yet acked.
    pending_ack: Option<u64>,
    /// Delivery received → its commit's outcome known (`subgate_amqp_settle_seconds`).
    settle: metrics::Histogram,
}

impl Acker {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<(u64, Disposition)>,
        stop: CancellationToken,
        ingest: Ingest,
    ) -> Result<(), String> {
        // After a stop, commits in flight finish and are acked, however slow the machine; only a
        // commit held by a store outage is left unacked (after a grace), for the broker to
        // deliver again.
        let abandon = async {
            stop.cancelled().await;
            loop {
                tokio::time::sleep(STOP_GRACE).await;
                if ingest.store_down() {
                    break;
                }
            }
        };
        tokio::pin!(abandon);
        loop {
            let next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.flush().await?;
                    rx.recv().await
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some((tag, disposition)) = next else {
                break;
            };
            match disposition {
                Disposition::Commit {
                    mut reply,
                    routing_key,
                    properties,
                    received,
                } => {
                    let result = match reply.try_recv() {
                        Ok(result) => result,
                        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                            self.flush().await?;
                            tokio::select! {
                                r = reply => r.unwrap_or(Err(IngestError::Closed)),
                                _ = &mut abandon => Err(IngestError::Closed),
                            }
                        }
                        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                            Err(IngestError::Closed)
                        }
                    };
                    self.settle.record(received.elapsed().as_secs_f64());
                    match result {
                        Ok(_) => self.pending_ack = Some(tag),
                        Err(IngestError::Rejected { reason, raw }) => {
                            let rejection = Rejection::new("rejected", reason);
                            self.dead_letter(tag, &rejection, raw, &routing_key, properties)
                                .await?;
                        }
                        // Shutting down: this and every later delivery stay unacked.
                        Err(IngestError::Closed) => break,
                        // Not from a held event; kept so nothing is ever left unresolved.
                        Err(e @ IngestError::Unavailable(_)) => {
                            self.requeue(tag, &e.to_string()).await?;
                        }
                    }
                }
                Disposition::DeadLetter {
                    rejection,
                    body,
                    routing_key,
                    properties,
                } => {
                    self.dead_letter(tag, &rejection, body, &routing_key, properties)
                        .await?;
                }
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), String> {
        if let Some(tag) = self.pending_ack.take() {
            self.channel
                .basic_ack(BasicAckArguments::new(tag, true))
                .await
                .map_err(|e| format!("basic.ack on {}: {e}", self.queue))?;
        }
        Ok(())
    }

    async fn requeue(&mut self, tag: u64, reason: &str) -> Result<(), String> {
        self.flush().await?;
        tracing::warn!(queue = %self.queue, %reason, "commit failed; requeueing after a pause");
        tokio::time::sleep(self.store_retry).await;
        metrics::counter!("subgate_requeued_total", "queue" => self.queue.clone()).increment(1);
        self.channel
            .basic_nack(BasicNackArguments::new(tag, false, true))
            .await
            .map_err(|e| format!("basic.nack on {}: {e}", self.queue))
    }

    async fn dead_letter(
        &mut self,
        tag: u64,
        rejection: &Rejection,
        body: Vec<u8>,
        routing_key: &str,
        original: BasicProperties,
    ) -> Result<(), String> {
        // A replayed message already carries these headers: replace them (`set_header`; a
        // plain insert over a key would corrupt the table's encoded length).
        let mut headers = original.headers().cloned().unwrap_or_default();
        for (name, value) in [
            ("x-subgate-error", rejection.header()),
            ("x-subgate-error-code", rejection.code.to_owned()),
            ("x-subgate-queue", self.queue.clone()),
            ("x-subgate-routing-key", routing_key.to_owned()),
        ] {
            crate::dead_letters::set_header(&mut headers, name, text(&value))?;
        }
        let mut properties = original;
        properties.with_headers(headers).with_persistence(true);
        self.dead_letters
            .basic_publish(
                properties,
                body,
                BasicPublishArguments::new(&self.dead_letter_exchange, &self.queue),
            )
            .await
            .map_err(|e| format!("dead-letter publish: {e}"))?;
        self.dead_letters
            .tx_commit()
            .await
            .map_err(|e| format!("dead-letter tx.commit: {e}"))?;
        tracing::warn!(queue = %self.queue, code = rejection.code, detail = %rejection.detail, "message dead-lettered");
        metrics::counter!("subgate_dead_lettered_total", "queue" => self.queue.clone(), "reason" => rejection.code)
            .increment(1);
        self.pending_ack = Some(tag);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(tag: u64, body: &str) -> Incoming {
        Incoming {
            tag,
            exchange: String::new(),
            routing_key: "q".into(),
            redelivered: false,
            properties: BasicProperties::default(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_split_chunk_comes_back_in_delivery_order_with_its_rejections_in_place() {
        let spec = QueueSpec {
            queue: "q".into(),
            declare: false,
            exchange: None,
            decoder: Arc::new(crate::sources::erp::ErpDecoder {
                feed: crate::sources::erp::Feed::Customer,
                phones: crate::consent::Normaliser::new("TR").unwrap(),
                consent_flags: Default::default(),
            }),
        };
        let chunk: Vec<Incoming> = (0..DECODE_CHUNK as u64)
            .map(|tag| match tag % 7 {
                3 => incoming(tag, "{not json"),
                5 => incoming(
                    tag,
                    &format!(r#"{{"id":"{tag}","name":"{}"}}"#, "x".repeat(200)),
                ),
                _ => incoming(tag, &format!(r#"{{"id":"{tag}","status":"Active"}}"#)),
            })
            .collect();
        let decoded = decode_chunk(&spec, 100, chunk).await.unwrap();
        let tags: Vec<u64> = decoded.iter().map(|(m, _)| m.tag).collect();
        assert_eq!(tags, (0..DECODE_CHUNK as u64).collect::<Vec<_>>());
        for (m, d) in &decoded {
            match (m.tag % 7, d) {
                (3, Err(r)) => assert_eq!(r.code, "not_json"),
                (5, Err(r)) => assert_eq!(r.code, "too_large"),
                (_, Ok(envelope)) => assert_eq!(envelope.entity, m.tag.to_string()),
                (_, other) => panic!("tag {}: {other:?}", m.tag),
            }
        }
    }

    #[test]
    fn broker_url_parses_vhost_and_credentials() {
        let a = BrokerAddress::parse("amqp://guest:p%40ss@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(a.host, "127.0.0.1");
        assert_eq!(a.port, 5672);
        assert_eq!(a.vhost, "/");
        assert_eq!(a.password, "p@ss");
        let b = BrokerAddress::parse("amqp://rabbit/prod").unwrap();
        assert_eq!((b.port, b.vhost.as_str()), (5672, "prod"));
        assert!(BrokerAddress::parse("amqps://h").is_err());
        assert!(BrokerAddress::parse("amqp://h:notaport").is_err());
        let v6 = BrokerAddress::parse("amqp://u:p@[::1]:5673/%2f").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 5673));
    }

    #[test]
    fn backoff_grows_exponentially_within_bounds() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..30 {
            let d = backoff_delay(attempt, initial, max);
            assert!(d >= initial && d <= max, "attempt {attempt}: {d:?}");
        }
        // The ceiling grows: with attempt 10 some draws exceed the attempt-0 ceiling.
        assert!((0..200).any(|_| backoff_delay(10, initial, max) > Duration::from_millis(200)));
    }
}
