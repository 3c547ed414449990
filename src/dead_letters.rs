//! Inbound dead letters (issue 19): look into a source queue's dead-letter queue without taking
//! anything out of it, and move chosen messages back to the source queue.
//!
//! - [`list`] takes up to `limit` messages with `basic.get` (manual ack) and hands every one back
//!   with `basic.nack(requeue)`; closing the channel (or a crash) returns them too. The queue
//!   holds the same messages afterwards.
//! - [`replay`] reads the dead-letter queue once, at most as many messages as it held when the
//!   replay began (so a message rejected again while the replay runs is not replayed twice),
//!   and for each selected message publishes the same body with the same properties and headers
//!   (plus `x-subgate-replayed: <n>`) to the default exchange with the source queue as routing
//!   key, `mandatory`, with publisher confirms. Only once the broker confirmed the copy is the
//!   dead letter acked. Messages not selected are nacked back at the end. A crash between the
//!   confirm and the ack leaves the message in both queues: a duplicate, which the inbox
//!   dedupes (same `message-id`, or the same content), never a loss.
//!
//! The default exchange reaches exactly the source queue: republishing to the original exchange
//! would also reach every other queue bound to it. The routing key the message first came
//! with stays in `x-subgate-routing-key` (or, for the broker's own dead-lettering, in
//! `x-death`), and the consumer decodes a replayed message with it
//! ([`original_routing_key`]).

use std::{collections::BTreeSet, time::Duration};

use amqprs::{
    callbacks::DefaultConnectionCallback,
    channel::{
        BasicAckArguments, BasicGetArguments, BasicNackArguments, BasicPublishArguments, Channel,
        ConfirmSelectArguments, QueueDeclareArguments,
    },
    connection::{Connection, OpenConnectionArguments},
    BasicProperties, FieldName, FieldTable, FieldValue,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{
    config::Settings,
    confirms::{Confirm, Confirms},
    sources::amqp::BrokerAddress,
};

/// How long connecting, and each wait for a publisher confirm, may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The header a replay sets to how often the message has been replayed.
pub const REPLAYED_HEADER: &str = "x-subgate-replayed";

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The name is neither a queue this configuration consumes nor one's dead-letter queue.
    #[error("unknown queue {queue:?}: {known}")]
    UnknownQueue { queue: String, known: String },
    /// The broker has no such queue.
    #[error("queue {0:?} does not exist on the broker")]
    Missing(String),
    /// The broker cannot be reached, or it failed an operation (the message says which).
    #[error("broker: {0}")]
    Broker(String),
}

/// A source queue and its dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub queue: String,
    pub dead_letter_queue: String,
}

/// The queues this configuration consumes (the ERP queues, the Loymax queue when enabled).
pub fn consumed_queues(settings: &Settings) -> Vec<String> {
    let mut queues = Vec::new();
    if settings.erp.enabled {
        queues.push(settings.erp.customer_queue.clone());
        queues.push(settings.erp.subscription_queue.clone());
    }
    if settings.loymax.enabled {
        queues.push(settings.loymax.queue.clone());
    }
    queues
}

/// The source queue named by `name`: a consumed queue, or the dead-letter queue of one.
pub fn resolve(settings: &Settings, name: &str) -> Result<Target, DeadLetterError> {
    let queues = consumed_queues(settings);
    let found = queues.iter().find_map(|queue| {
        let dead = settings.dead_letter_queue_for(queue);
        (name == queue || name == dead).then(|| Target {
            queue: queue.clone(),
            dead_letter_queue: dead,
        })
    });
    match found {
        // AMQP queue names are short strings (at most 255 bytes).
        Some(t) if t.queue.len() <= 255 && t.dead_letter_queue.len() <= 255 => Ok(t),
        Some(t) => Err(DeadLetterError::UnknownQueue {
            queue: name.to_owned(),
            known: format!(
                "its dead-letter queue name {:?} is longer than AMQP's 255 bytes",
                t.dead_letter_queue
            ),
        }),
        None => Err(DeadLetterError::UnknownQueue {
            queue: name.to_owned(),
            known: if queues.is_empty() {
                "this configuration consumes no queue".to_owned()
            } else {
                format!(
                    "use one this configuration consumes ({}) or its dead-letter queue",
                    queues.join(", ")
                )
            },
        }),
    }
}

/// One message of a dead-letter queue, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The `message-id` property, else `sha256:` and the first 16 hex digits of the body's
    /// SHA-256 (identical bodies share it).
    pub id: String,
    /// Why it is here: `x-subgate-error` (subgate rejected it), else the broker's reason
    /// (`x-first-death-reason` / `x-death`, e.g. `delivery_limit`).
    pub reason: Option<String>,
    /// `x-subgate-error-code`, else the broker's reason.
    pub code: Option<String>,
    /// The routing key it first came with.
    pub routing_key: String,
    pub size: usize,
    /// The AMQP `timestamp` property, RFC 3339.
    pub timestamp: Option<String>,
    /// How often it was replayed before (`x-subgate-replayed`).
    pub replayed: i64,
}

/// A dead-letter queue's first messages and its depth.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub queue: String,
    pub dead_letter_queue: String,
    /// Messages ready in the dead-letter queue when the listing began.
    pub count: u32,
    pub messages: Vec<DeadLetter>,
}

/// Which dead letters a replay moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    /// Every message whose [`DeadLetter::id`] is one of these.
    Ids(BTreeSet<String>),
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    pub queue: String,
    pub dead_letter_queue: String,
    /// Messages published to the source queue (confirmed) and acked in the dead-letter queue.
    pub moved: u64,
    /// Messages read from the dead-letter queue.
    pub scanned: u64,
    /// Requested ids no message had (an `--id` replay).
    pub not_found: Vec<String>,
}

/// The id of a message: its `message-id`, else a content id.
pub fn message_id(properties: &BasicProperties, body: &[u8]) -> String {
    match properties.message_id().filter(|s| !s.is_empty()) {
        Some(id) => id.clone(),
        None => content_id(body),
    }
}

/// `sha256:` and the first 16 hex digits of the body's SHA-256.
pub fn content_id(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("sha256:{}", hex::encode(&digest[..8]))
}

fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a FieldValue> {
    let key: FieldName = name.try_into().ok()?;
    headers?.get(&key)
}

fn as_text(value: &FieldValue) -> Option<String> {
    match value {
        FieldValue::S(s) => Some(s.as_ref().clone()),
        FieldValue::x(bytes) => {
            let bytes: Vec<u8> = bytes.clone().into();
            String::from_utf8(bytes).ok()
        }
        _ => None,
    }
}

fn as_int(value: &FieldValue) -> Option<i64> {
    Some(match value {
        FieldValue::b(v) => i64::from(*v),
        FieldValue::B(v) => i64::from(*v),
        FieldValue::s(v) => i64::from(*v),
        FieldValue::u(v) => i64::from(*v),
        FieldValue::I(v) => i64::from(*v),
        FieldValue::i(v) => i64::from(*v),
        FieldValue::l(v) => *v,
        FieldValue::S(s) => s.as_ref().trim().parse().ok()?,
        _ => return None,
    })
}

fn text_header(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    header(headers, name).and_then(as_text)
}

/// The first (most recent) entry of the broker's `x-death` header.
fn first_death(headers: Option<&FieldTable>) -> Option<FieldTable> {
    let FieldValue::A(deaths) = header(headers, "x-death")? else {
        return None;
    };
    let deaths: Vec<FieldValue> = deaths.clone().into();
    deaths.into_iter().find_map(|d| match d {
        FieldValue::F(table) => Some(table),
        _ => None,
    })
}

/// The broker's reason for dead-lettering (`delivery_limit`, `rejected`, `expired`, `maxlen`).
fn broker_reason(headers: Option<&FieldTable>) -> Option<String> {
    text_header(headers, "x-first-death-reason")
        .or_else(|| first_death(headers).and_then(|d| text_header(Some(&d), "reason")))
}

/// The routing key a dead letter first came with: `x-subgate-routing-key` (subgate dead-lettered
/// it), else the first of the broker's `x-death` routing keys.
pub fn original_routing_key(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers();
    text_header(headers, "x-subgate-routing-key").or_else(|| {
        let death = first_death(headers)?;
        let FieldValue::A(keys) = header(Some(&death), "routing-keys")? else {
            return None;
        };
        let keys: Vec<FieldValue> = keys.clone().into();
        keys.iter().find_map(as_text)
    })
}

/// Whether a message was put back by a replay.
pub fn is_replayed(properties: &BasicProperties) -> bool {
    header(properties.headers(), REPLAYED_HEADER).is_some()
}

/// How a listed message looks.
pub fn describe(
    properties: &BasicProperties,
    delivery_routing_key: &str,
    body: &[u8],
) -> DeadLetter {
    let headers = properties.headers();
    let death = broker_reason(headers);
    DeadLetter {
        id: message_id(properties, body),
        reason: text_header(headers, "x-subgate-error").or_else(|| death.clone()),
        code: text_header(headers, "x-subgate-error-code").or(death),
        routing_key: original_routing_key(properties)
            .unwrap_or_else(|| delivery_routing_key.to_owned()),
        size: body.len(),
        timestamp: properties
            .timestamp()
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| s.checked_mul(1000))
            .map(crate::clock::to_rfc3339),
        replayed: header(headers, REPLAYED_HEADER)
            .and_then(as_int)
            .unwrap_or(0),
    }
}

/// Set a header, replacing any value it had. (amqprs' `FieldTable::insert` over an existing key
/// keeps the old value's size in the table's encoded length, which corrupts the frame: remove
/// first.)
pub fn set_header(table: &mut FieldTable, name: &str, value: FieldValue) -> Result<(), String> {
    let key: FieldName = name
        .try_into()
        .map_err(|_| format!("invalid AMQP field name {name:?}"))?;
    table.remove(&key);
    table.insert(key, value);
    Ok(())
}

/// The properties of the replayed copy: the same, with `x-subgate-replayed` counted up.
fn replay_properties(
    original: &BasicProperties,
    replayed_before: i64,
) -> Result<BasicProperties, String> {
    let mut headers = original.headers().cloned().unwrap_or_default();
    set_header(
        &mut headers,
        REPLAYED_HEADER,
        FieldValue::l(replayed_before.saturating_add(1)),
    )?;
    let mut properties = original.clone();
    properties.with_headers(headers);
    Ok(properties)
}

/// List up to `limit` messages of the dead-letter queue of `queue`, leaving every one in it.
pub async fn list(
    settings: &Settings,
    queue: &str,
    limit: usize,
) -> Result<Listing, DeadLetterError> {
    let target = resolve(settings, queue)?;
    let session = Session::open(settings).await?;
    let result = session.list(&target, limit).await;
    session.close().await;
    result
}

/// Move the selected messages of the dead-letter queue of `queue` back to `queue`.
pub async fn replay(
    settings: &Settings,
    queue: &str,
    selection: &Selection,
) -> Result<ReplayOutcome, DeadLetterError> {
    let target = resolve(settings, queue)?;
    let session = Session::open(settings).await?;
    let result = session.replay(&target, selection).await;
    session.close().await;
    result
}

fn broker(what: &str) -> impl Fn(amqprs::error::Error) -> DeadLetterError + '_ {
    move |e| DeadLetterError::Broker(format!("{what}: {e}"))
}

struct Session {
    connection: Connection,
}

impl Session {
    async fn open(settings: &Settings) -> Result<Self, DeadLetterError> {
        let a = BrokerAddress::parse(&settings.amqp.url)
            .map_err(|e| DeadLetterError::Broker(format!("amqp.url: {e}")))?;
        let name = format!("{}-dead-letters", settings.amqp.connection_name);
        let args = OpenConnectionArguments::new(&a.host, a.port, &a.user, &a.password)
            .virtual_host(&a.vhost)
            .connection_name(&name)
            .finish();
        let connection = tokio::time::timeout(TIMEOUT, Connection::open(&args))
            .await
            .map_err(|_| {
                DeadLetterError::Broker(format!("connecting to {}:{} timed out", a.host, a.port))
            })?
            .map_err(|e| {
                DeadLetterError::Broker(format!("cannot connect to {}:{}: {e}", a.host, a.port))
            })?;
        if let Err(e) = connection
            .register_callback(DefaultConnectionCallback)
            .await
        {
            let _ = connection.close().await;
            return Err(DeadLetterError::Broker(e.to_string()));
        }
        Ok(Self { connection })
    }

    async fn close(self) {
        let _ = self.connection.close().await;
    }

    /// A channel whose confirms, returns and closing reach the receiver.
    async fn channel(
        &self,
    ) -> Result<(Channel, mpsc::UnboundedReceiver<Confirm>), DeadLetterError> {
        let channel = self
            .connection
            .open_channel(None)
            .await
            .map_err(broker("open channel"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        channel
            .register_callback(Confirms(tx))
            .await
            .map_err(broker("channel callback"))?;
        Ok((channel, rx))
    }

    /// Ready messages in `queue` (passive declare on a channel of its own: a missing queue
    /// closes the channel).
    async fn depth(&self, queue: &str) -> Result<u32, DeadLetterError> {
        let (channel, mut events) = self.channel().await?;
        let declared = channel
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await;
        match declared {
            Ok(Some((_, count, _))) => {
                let _ = channel.close().await;
                Ok(count)
            }
            Ok(None) => Err(DeadLetterError::Broker(format!(
                "no answer to the passive declare of {queue}"
            ))),
            Err(e) => {
                // The broker's reason arrives on the channel's callback.
                let reason = tokio::time::timeout(Duration::from_secs(2), events.recv()).await;
                match reason {
                    Ok(Some(Confirm::Closed(reason)))
                        if reason.contains("404") || reason.contains("NOT_FOUND") =>
                    {
                        Err(DeadLetterError::Missing(queue.to_owned()))
                    }
                    Ok(Some(Confirm::Closed(reason))) => Err(DeadLetterError::Broker(format!(
                        "declare {queue}: {reason}"
                    ))),
                    _ => Err(DeadLetterError::Broker(format!("declare {queue}: {e}"))),
                }
            }
        }
    }

    async fn list(&self, target: &Target, limit: usize) -> Result<Listing, DeadLetterError> {
        let dlq = &target.dead_letter_queue;
        let count = self.depth(dlq).await?;
        let (channel, _events) = self.channel().await?;
        let mut messages = Vec::new();
        let mut last_tag = None;
        let mut failure = None;
        while messages.len() < limit.min(count as usize) {
            match channel.basic_get(BasicGetArguments::new(dlq)).await {
                Ok(Some((get, properties, body))) => {
                    last_tag = Some(get.delivery_tag());
                    messages.push(describe(&properties, get.routing_key(), &body));
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(DeadLetterError::Broker(format!("basic.get on {dlq}: {e}")));
                    break;
                }
            }
        }
        // Every message goes back (closing the channel would return them as well).
        if let Some(tag) = last_tag {
            let _ = channel
                .basic_nack(BasicNackArguments::new(tag, true, true))
                .await;
        }
        let _ = channel.close().await;
        match failure {
            Some(e) => Err(e),
            None => Ok(Listing {
                queue: target.queue.clone(),
                dead_letter_queue: dlq.clone(),
                count,
                messages,
            }),
        }
    }

    async fn replay(
        &self,
        target: &Target,
        selection: &Selection,
    ) -> Result<ReplayOutcome, DeadLetterError> {
        let dlq = &target.dead_letter_queue;
        // The source queue must exist: a publish to the default exchange for a missing queue
        // would be returned (and nothing moved), but say so up front.
        self.depth(&target.queue).await?;
        let count = self.depth(dlq).await?;
        let (reader, _reader_events) = self.channel().await?;
        let (publisher, mut confirms) = self.channel().await?;
        publisher
            .confirm_select(ConfirmSelectArguments::default())
            .await
            .map_err(broker("confirm.select"))?;

        let mut moved = 0u64;
        let mut scanned = 0u64;
        let mut next_publish_tag = 1u64;
        let mut kept: Option<u64> = None;
        let mut found: BTreeSet<String> = BTreeSet::new();
        let mut failure = None;
        // At most the messages there at the start: one rejected again meanwhile stays.
        while scanned < u64::from(count) {
            let (get, properties, body) = match reader.basic_get(BasicGetArguments::new(dlq)).await
            {
                Ok(Some(got)) => got,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(DeadLetterError::Broker(format!("basic.get on {dlq}: {e}")));
                    break;
                }
            };
            scanned += 1;
            let tag = get.delivery_tag();
            let letter = describe(&properties, get.routing_key(), &body);
            let selected = match selection {
                Selection::All => true,
                Selection::Ids(ids) => ids.contains(&letter.id),
            };
            if !selected {
                kept = Some(tag);
                continue;
            }
            let published = async {
                let properties = replay_properties(&properties, letter.replayed)
                    .map_err(DeadLetterError::Broker)?;
                publisher
                    .basic_publish(
                        properties,
                        body,
                        BasicPublishArguments::new("", &target.queue)
                            .mandatory(true)
                            .finish(),
                    )
                    .await
                    .map_err(broker("publish"))?;
                let publish_tag = next_publish_tag;
                next_publish_tag += 1;
                wait_for_confirm(&mut confirms, publish_tag).await
            }
            .await;
            match published {
                Ok(()) => {
                    // Confirmed: the copy is in the source queue; now the dead letter can go.
                    if let Err(e) = reader.basic_ack(BasicAckArguments::new(tag, false)).await {
                        failure = Some(DeadLetterError::Broker(format!(
                            "basic.ack on {dlq} (the message was published again: it may now be in both queues): {e}"
                        )));
                        break;
                    }
                    moved += 1;
                    found.insert(letter.id);
                }
                Err(e) => {
                    kept = Some(tag);
                    failure = Some(e);
                    break;
                }
            }
        }
        // The messages not moved go back to the dead-letter queue, in their order.
        if let Some(tag) = kept {
            let _ = reader
                .basic_nack(BasicNackArguments::new(tag, true, true))
                .await;
        }
        let _ = reader.close().await;
        let _ = publisher.close().await;
        if moved > 0 {
            tracing::info!(queue = %target.queue, dead_letter_queue = %dlq, moved, scanned, "dead letters replayed");
        }
        if let Some(e) = failure {
            return Err(match e {
                DeadLetterError::Broker(m) => DeadLetterError::Broker(format!(
                    "{m} (replay stopped after moving {moved} message(s); the others stay in {dlq})"
                )),
                other => other,
            });
        }
        let not_found = match selection {
            Selection::All => Vec::new(),
            Selection::Ids(ids) => ids.difference(&found).cloned().collect(),
        };
        Ok(ReplayOutcome {
            queue: target.queue.clone(),
            dead_letter_queue: dlq.clone(),
            moved,
            scanned,
            not_found,
        })
    }
}

/// Wait until the broker confirms publish `tag`: acked and not returned as unroutable.
async fn wait_for_confirm(
    confirms: &mut mpsc::UnboundedReceiver<Confirm>,
    tag: u64,
) -> Result<(), DeadLetterError> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut returned = None;
    loop {
        let next = tokio::time::timeout_at(deadline, confirms.recv()).await;
        let covers = |t: u64, multiple: bool| t == tag || (multiple && t >= tag);
        match next {
            Err(_) => {
                return Err(DeadLetterError::Broker(
                    "no publisher confirm within 10 s".into(),
                ))
            }
            Ok(None) => return Err(DeadLetterError::Broker("publishing channel closed".into())),
            Ok(Some(Confirm::Closed(reason))) => {
                return Err(DeadLetterError::Broker(format!(
                    "publishing channel closed by the broker: {reason}"
                )))
            }
            Ok(Some(Confirm::Returned { reason, .. })) => returned = Some(reason),
            Ok(Some(Confirm::Nack { tag: t, multiple })) if covers(t, multiple) => {
                return Err(DeadLetterError::Broker(
                    "the broker nacked the publish".into(),
                ))
            }
            Ok(Some(Confirm::Ack { tag: t, multiple })) if covers(t, multiple) => {
                return match returned {
                    None => Ok(()),
                    Some(reason) => Err(DeadLetterError::Broker(format!(
                        "the source queue did not take the message ({reason})"
                    ))),
                }
            }
            Ok(Some(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: Vec<(&str, FieldValue)>) -> FieldTable {
        let mut t = FieldTable::new();
        for (k, v) in entries {
            set_header(&mut t, k, v).unwrap();
        }
        t
    }

    fn text(s: &str) -> FieldValue {
        FieldValue::from(s.to_owned())
    }

    fn array(values: Vec<FieldValue>) -> FieldValue {
        FieldValue::A(values.try_into().unwrap())
    }

    #[test]
    fn the_id_is_the_message_id_else_a_content_id() {
        let body = b"{not json";
        let mut props = BasicProperties::default();
        let id = message_id(&props, body);
        assert!(id.starts_with("sha256:"), "{id}");
        assert_eq!(id.len(), "sha256:".len() + 16);
        assert_eq!(id, message_id(&props, body), "stable");
        assert_ne!(id, message_id(&props, b"other"));
        props.with_message_id("m-1");
        assert_eq!(message_id(&props, body), "m-1");
        props.with_message_id("");
        assert_eq!(message_id(&props, body), id, "an empty message-id is no id");
    }

    #[test]
    fn subgate_rejections_show_their_reason_and_original_routing_key() {
        let mut props = BasicProperties::default();
        props.with_timestamp(1_700_000_000).with_headers(table(vec![
            ("x-subgate-error", text("not_json: expected value")),
            ("x-subgate-error-code", text("not_json")),
            ("x-subgate-routing-key", text("Purchase.Confirm")),
            (REPLAYED_HEADER, FieldValue::l(2)),
        ]));
        let d = describe(&props, "q", b"abc");
        assert_eq!(d.reason.as_deref(), Some("not_json: expected value"));
        assert_eq!(d.code.as_deref(), Some("not_json"));
        assert_eq!(d.routing_key, "Purchase.Confirm");
        assert_eq!(d.size, 3);
        assert_eq!(d.timestamp.as_deref(), Some("2023-11-14T22:13:20.000Z"));
        assert_eq!(d.replayed, 2);
    }

    #[test]
    fn broker_dead_letters_show_the_death_reason_and_first_routing_key() {
        let death = table(vec![
            ("reason", text("delivery_limit")),
            ("queue", text("q")),
            ("routing-keys", array(vec![text("rk.first")])),
        ]);
        let mut props = BasicProperties::default();
        props.with_headers(table(vec![("x-death", array(vec![FieldValue::F(death)]))]));
        let d = describe(&props, "q", b"");
        assert_eq!(d.reason.as_deref(), Some("delivery_limit"));
        assert_eq!(d.code.as_deref(), Some("delivery_limit"));
        assert_eq!(d.routing_key, "rk.first");
        assert_eq!(d.replayed, 0);
        assert_eq!(d.timestamp, None);

        let mut props = BasicProperties::default();
        props.with_headers(table(vec![("x-first-death-reason", text("expired"))]));
        assert_eq!(
            describe(&props, "q", b"").reason.as_deref(),
            Some("expired")
        );
        assert_eq!(
            describe(&props, "q", b"").routing_key,
            "q",
            "the delivery's key otherwise"
        );
    }

    #[test]
    fn a_replayed_copy_keeps_every_header_and_counts_its_replays() {
        let mut props = BasicProperties::default();
        props
            .with_message_id("m")
            .with_content_type("application/json")
            .with_headers(table(vec![
                ("x-subgate-error", text("not_json: x")),
                ("custom", text("kept")),
            ]));
        let once = replay_properties(&props, 0).unwrap();
        assert!(is_replayed(&once));
        assert_eq!(describe(&once, "q", b"").replayed, 1);
        let twice = replay_properties(&once, 1).unwrap();
        assert_eq!(describe(&twice, "q", b"").replayed, 2);
        let headers = twice.headers().unwrap();
        assert_eq!(headers.as_ref().len(), 3);
        assert_eq!(
            text_header(Some(headers), "custom").as_deref(),
            Some("kept")
        );
        assert_eq!(twice.message_id().map(String::as_str), Some("m"));
        assert_eq!(
            twice.content_type().map(String::as_str),
            Some("application/json")
        );
        assert!(!is_replayed(&props));
    }

    #[test]
    fn replacing_a_header_keeps_the_encoded_length_right() {
        let mut a = table(vec![("k", text("a much longer first value"))]);
        set_header(&mut a, "k", text("v")).unwrap();
        let b = table(vec![("k", text("v"))]);
        assert_eq!(
            a, b,
            "same encoded length as a table built with the value directly"
        );
    }

    fn settings(env: &[(&str, &str)]) -> Settings {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load(&crate::config::ConfigSource { file: None, env }).unwrap()
    }

    #[test]
    fn a_queue_or_its_dead_letter_queue_names_the_source_queue() {
        let s = settings(&[]);
        let t = resolve(&s, "secom-customer-queue").unwrap();
        assert_eq!(t.dead_letter_queue, "secom-customer-queue.dead");
        assert_eq!(resolve(&s, "secom-customer-queue.dead").unwrap(), t);
        assert_eq!(
            resolve(&s, "secom-subscriptions-queue.dead").unwrap().queue,
            "secom-subscriptions-queue"
        );
        let e = resolve(&s, "nope").unwrap_err().to_string();
        assert!(
            e.contains("\"nope\"") && e.contains("secom-customer-queue"),
            "{e}"
        );
        // The Loymax queue only when Loymax is consumed.
        assert!(resolve(&s, "smc.customerEvents").is_err());
        let s = settings(&[
            ("SUBGATE__LOYMAX__ENABLED", "true"),
            ("SUBGATE__AMQP__DEAD_LETTER_QUEUE", "dlq.{queue}"),
        ]);
        assert_eq!(
            resolve(&s, "dlq.smc.customerEvents").unwrap().queue,
            "smc.customerEvents"
        );
        let s = settings(&[("SUBGATE__ERP__ENABLED", "false")]);
        let e = resolve(&s, "secom-customer-queue").unwrap_err().to_string();
        assert!(e.contains("consumes no queue"), "{e}");
    }
}
