//! AMQP republish: each canonical event to a topic exchange (routing key = the event kind),
//! persistent, `mandatory`, `message-id` = the outbox row id, with publisher confirms. A row is
//! delivered when the broker confirmed it and did not return it as unroutable; a nack, a
//! return, a lost connection or no confirm within the timeout means retry.

use std::{collections::HashMap, time::Duration};

use amqprs::{
    callbacks::DefaultConnectionCallback,
    channel::{BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments},
    connection::{Connection, OpenConnectionArguments},
    BasicProperties, FieldTable, FieldValue,
};
use tokio::sync::mpsc;

use super::{event::payload_event_id, retry::Verdict, worker::SendResult, Budget};
use crate::{
    confirms::{Confirm, Confirms},
    sources::amqp::BrokerAddress,
    store::OutboxRow,
};

struct Session {
    connection: Connection,
    channel: Channel,
    confirms: mpsc::UnboundedReceiver<Confirm>,
    /// Delivery tag of the next publish (confirm mode numbers them from 1 per channel).
    next_tag: u64,
}

pub struct AmqpTransport {
    address: BrokerAddress,
    exchange: String,
    connection_name: String,
    timeout: Duration,
    session: Option<Session>,
}

impl AmqpTransport {
    pub fn new(url: &str, exchange: &str, name: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(AmqpTransport {
            address: BrokerAddress::parse(url).map_err(anyhow::Error::msg)?,
            exchange: exchange.to_owned(),
            connection_name: format!("subgate-delivery-{name}"),
            timeout,
            session: None,
        })
    }

    async fn connect(&self) -> Result<Session, String> {
        let a = &self.address;
        let args = OpenConnectionArguments::new(&a.host, a.port, &a.user, &a.password)
            .virtual_host(&a.vhost)
            .connection_name(&self.connection_name)
            .finish();
        let connection = tokio::time::timeout(self.timeout, Connection::open(&args))
            .await
            .map_err(|_| format!("connecting to {}:{} timed out", a.host, a.port))?
            .map_err(|e| format!("cannot connect to {}:{}: {e}", a.host, a.port))?;
        let opened = async {
            connection
                .register_callback(DefaultConnectionCallback)
                .await?;
            let channel = connection.open_channel(None).await?;
            let (tx, confirms) = mpsc::unbounded_channel();
            channel.register_callback(Confirms(tx)).await?;
            channel
                .exchange_declare(
                    ExchangeDeclareArguments::new(&self.exchange, "topic")
                        .durable(true)
                        .finish(),
                )
                .await?;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await?;
            Ok::<_, amqprs::error::Error>((channel, confirms))
        }
        .await;
        match opened {
            Ok((channel, confirms)) => Ok(Session {
                connection,
                channel,
                confirms,
                next_tag: 1,
            }),
            Err(e) => {
                let _ = connection.close().await;
                Err(format!("opening the publishing channel: {e}"))
            }
        }
    }

    pub async fn send(&mut self, rows: &[OutboxRow], budget: &Budget) -> Vec<SendResult> {
        let started = SendResult::start();
        let clock = std::time::Instant::now();
        let retry_all = |reason: String| {
            rows.iter()
                .map(|_| SendResult::retry(started, clock, reason.clone()))
                .collect::<Vec<_>>()
        };
        if self.session.is_none() {
            match self.connect().await {
                Ok(s) => self.session = Some(s),
                Err(e) => return retry_all(e),
            }
        }
        let Some(session) = self.session.as_mut() else {
            return retry_all("no session".into());
        };
        let mut pending: HashMap<u64, usize> = HashMap::new();
        let mut outcome: Vec<Option<Result<(), String>>> = rows.iter().map(|_| None).collect();
        let mut returned: HashMap<String, String> = HashMap::new();
        let mut broken: Option<String> = None;
        for (i, row) in rows.iter().enumerate() {
            budget.acquire().await;
            let mut headers = FieldTable::new();
            if let Ok(name) = "x-subgate-event-id".try_into() {
                headers.insert(
                    name,
                    FieldValue::from(
                        payload_event_id(&row.payload)
                            .unwrap_or_else(|| format!("evt_{}", row.inbox_id)),
                    ),
                );
            }
            let mut props = BasicProperties::default();
            props
                .with_message_id(&row.id.to_string())
                .with_content_type("application/json")
                .with_delivery_mode(2)
                .with_message_type(&row.kind)
                .with_app_id("subgate")
                .with_timestamp(u64::try_from(crate::clock::now_ms() / 1000).unwrap_or(0))
                .with_headers(headers);
            let args = BasicPublishArguments::new(&self.exchange, &row.kind)
                .mandatory(true)
                .finish();
            match session
                .channel
                .basic_publish(props, row.payload.clone().into_bytes(), args)
                .await
            {
                Ok(()) => {
                    pending.insert(session.next_tag, i);
                    session.next_tag += 1;
                }
                Err(e) => {
                    broken = Some(format!("publish failed: {e}"));
                    break;
                }
            }
        }

        let deadline = tokio::time::Instant::now() + self.timeout;
        while broken.is_none() && !pending.is_empty() {
            let confirm = tokio::time::timeout_at(deadline, session.confirms.recv()).await;
            let (tag, multiple, ok) = match confirm {
                Ok(Some(Confirm::Ack { tag, multiple })) => (tag, multiple, true),
                Ok(Some(Confirm::Nack { tag, multiple })) => (tag, multiple, false),
                Ok(Some(Confirm::Returned { message_id, reason })) => {
                    returned.insert(message_id, reason);
                    continue;
                }
                Ok(Some(Confirm::Closed(reason))) => {
                    broken = Some(format!("channel closed by the broker: {reason}"));
                    break;
                }
                Ok(None) => {
                    broken = Some("channel closed".into());
                    break;
                }
                Err(_) => {
                    broken = Some("no publisher confirm within the timeout".into());
                    break;
                }
            };
            let tags: Vec<u64> = pending
                .keys()
                .copied()
                .filter(|t| if multiple { *t <= tag } else { *t == tag })
                .collect();
            for t in tags {
                if let Some(i) = pending.remove(&t) {
                    let id = rows[i].id.to_string();
                    outcome[i] = Some(match (ok, returned.remove(&id)) {
                        (true, None) => Ok(()),
                        (true, Some(reason)) => Err(format!(
                            "unroutable: exchange {} has no queue bound for {} ({reason})",
                            self.exchange, rows[i].kind
                        )),
                        (false, _) => Err("nacked by the broker".to_owned()),
                    });
                }
            }
        }
        if let Some(reason) = &broken {
            tracing::warn!(exchange = %self.exchange, %reason, "AMQP destination session dropped");
            self.close().await;
        }
        let latency = clock.elapsed();
        outcome
            .into_iter()
            .map(|o| {
                let verdict = match o {
                    Some(Ok(())) => Verdict::Delivered,
                    _ => Verdict::Retry { retry_after: None },
                };
                let error = match o {
                    Some(Ok(())) => None,
                    Some(Err(e)) => Some(e),
                    None => Some(broken.clone().unwrap_or_else(|| "not confirmed".into())),
                };
                SendResult {
                    verdict,
                    started_at: started,
                    latency,
                    status: None,
                    error,
                    response: None,
                }
            })
            .collect()
    }

    pub async fn close(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.channel.close().await;
            let _ = s.connection.close().await;
        }
    }
}
