//! Loymax loyalty events (`docs/contracts/loymax-smart-communications.md`): the member events the Loymax platform
//! routes to Smart Communications through a topic exchange into `smc.customerEvents`.
//!
//! - [`json`]: the lenient body reader (the document's merge example has a trailing comma);
//! - [`event`]: bodies → typed [`event::Event`]s, defensively (every spelling the document uses);
//! - [`project`]: how each event changes the member, card, purchase and refund records;
//! - [`model`]: the documents those records hold (shared with the read API);
//! - [`amount`]: exact decimal sums.
//!
//! User documentation: `docs/loymax.md`.

pub mod amount;
pub mod event;
pub mod json;
pub mod model;
pub mod project;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use self::event::{Decoded, Event};
use super::amqp::{AmqpMessage, Decoder, ExchangeSpec, Rejection};
use crate::{
    config::LoymaxSettings,
    consent::Normaliser,
    envelope::{Applied, ApplyContext, ApplyError, Change, Envelope},
    store::StoreTx,
};

pub const SOURCE: &str = "loymax";

/// Record kinds.
pub const MEMBER: &str = "loymax.member";
pub const CARD: &str = "loymax.card";
pub const PURCHASE: &str = "loymax.purchase";
pub const REFUND: &str = "loymax.refund";
/// Index records: member uid → `{customer_id}`, card number → `{card}`.
pub const MEMBER_UID: &str = "loymax.member.uid";
pub const CARD_NUMBER: &str = "loymax.card.number";
/// Link kinds: purchase → member, refund → member, refund → refunded purchase.
pub const PURCHASE_MEMBER: &str = "loymax.purchase.member";
pub const REFUND_MEMBER: &str = "loymax.refund.member";
pub const REFUND_PURCHASE: &str = "loymax.refund.purchase";
/// History kind: every real change of a card (state, block, delete, category, member, …).
pub const CARD_HISTORY: &str = "loymax.card.change";

/// The routing keys of the document's table. The card-category key is printed there with a
/// Cyrillic `с` (U+0441): both spellings are bound.
pub const ROUTING_KEYS: &[&str] = &[
    "customer.registration.begin",
    "customer.registration.finish",
    "customer.card.link",
    "customer.profile.merge",
    "customer.card.changeState",
    "customer.card.changeBlockState",
    "customer.card.changeDeleteState",
    "customer.card.changeCategory",
    "\u{0441}ustomer.card.changeCategory",
    "customer.attribute.update",
    "customer.subscription.update",
    "purchases.confirm.modelUpdate",
    "purchases.refundModelUpdate",
];

/// The topic exchange and bindings of the Loymax queue.
pub fn exchange_spec(settings: &LoymaxSettings) -> ExchangeSpec {
    let mut routing_keys: Vec<String> = ROUTING_KEYS.iter().map(|k| (*k).to_owned()).collect();
    for key in &settings.extra_routing_keys {
        if !routing_keys.contains(key) {
            routing_keys.push(key.clone());
        }
    }
    ExchangeSpec {
        name: settings.exchange.clone(),
        kind: "topic".into(),
        routing_keys,
    }
}

/// Decoder for `smc.customerEvents`.
pub struct LoymaxDecoder {
    normaliser: Normaliser,
}

impl LoymaxDecoder {
    /// `normaliser` reads the members' phone numbers (`loymax.phone_region`).
    pub fn new(normaliser: Normaliser) -> Self {
        Self { normaliser }
    }
}

impl Decoder for LoymaxDecoder {
    fn decode(&self, message: &AmqpMessage<'_>) -> Result<Envelope, Rejection> {
        let (value, lenient) = json::parse_lenient(message.body).map_err(|e| {
            Rejection::new("not_json", format!("body is not JSON, even leniently: {e}"))
        })?;
        let Value::Object(object) = value else {
            return Err(Rejection::new(
                "not_an_object",
                format!(
                    "body is a JSON {}, expected an object",
                    super::erp::json_type(&value)
                ),
            ));
        };
        let decoded = event::decode(&object, message.routing_key, &self.normaliser)?;
        let Decoded {
            event,
            event_code,
            occurred_at,
            mut flags,
        } = decoded;
        if lenient {
            flags.push("lenient_json");
        }
        let kind = event.kind();
        metrics::counter!("subgate_loymax_events_total", "kind" => kind).increment(1);
        if matches!(event, Event::Unknown { .. }) {
            metrics::counter!("subgate_loymax_unknown_events_total").increment(1);
            // The code is upstream text: logged at debug only, never as a metric label.
            tracing::debug!(event_code = ?event_code, routing_key = message.routing_key, "unknown Loymax event stored");
        }
        let (dedupe_key, by_content) = dedupe_key(message, &object, &event);
        let mut meta = message.meta();
        meta["loymax"] = json!({ "event_code": event_code, "flags": flags });
        Ok(Envelope {
            source: SOURCE,
            kind: kind.to_owned(),
            entity: event.entity(),
            dedupe_key,
            occurred_at: occurred_at.or_else(|| message.timestamp_ms()),
            received_at: crate::clock::now_ms(),
            raw: message.body.to_vec(),
            meta,
            change: Box::new(LoymaxChange {
                reapply: by_content && event.sets_state(),
                event,
                data: Value::Object(object),
            }),
        })
    }
}

/// The upstream's own id where there is one: AMQP `message-id`, else `externalId`, else
/// `activityUid`, else the purchase (or refund) id; else a hash of routing key and body.
/// Returns the key and whether it is the content hash.
fn dedupe_key(
    message: &AmqpMessage<'_>,
    object: &serde_json::Map<String, Value>,
    event: &Event,
) -> (String, bool) {
    let text = |key: &str| json::id_text(object.get(key));
    if let Some(id) = message.message_id() {
        return (format!("loymax:msg:{id}"), false);
    }
    if let Some(id) = text("externalId") {
        return (format!("loymax:ext:{id}"), false);
    }
    if let Some(id) = text("activityUid") {
        return (format!("loymax:activity:{id}"), false);
    }
    match event {
        Event::Purchase(p) => return (format!("loymax:purchase:{}", p.id), false),
        Event::Refund(p) => return (format!("loymax:refund:{}", p.id), false),
        _ => {}
    }
    let mut hash = Sha256::new();
    hash.update(message.routing_key.as_bytes());
    hash.update([0]);
    hash.update(message.body);
    (
        format!("loymax:sha256:{}", hex::encode(hash.finalize())),
        true,
    )
}

/// A decoded Loymax event and how it projects.
struct LoymaxChange {
    event: Event,
    /// The event body as decoded (leniently): the `data` forwarded to destinations.
    data: Value,
    /// Keyed by content and setting state: re-applied by change detection when seen again.
    reapply: bool,
}

impl Change for LoymaxChange {
    fn apply(&self, tx: &mut dyn StoreTx, ctx: &ApplyContext) -> Result<Applied, ApplyError> {
        project::apply(&self.event, tx, ctx)
    }

    fn is_snapshot(&self) -> bool {
        self.reapply
    }

    /// The event as received, and the contact view of its member as stored (addresses from
    /// the `Email`/`Phone` attributes; consents from the ledger), so an opt-out made in the
    /// loyalty programme reaches the providers.
    fn outbound(
        &self,
        tx: &mut dyn StoreTx,
    ) -> Result<Option<crate::delivery::event::Outbound>, crate::store::StoreError> {
        Ok(Some(crate::delivery::event::Outbound {
            record: self.event.record_kind(),
            data: self.data.clone(),
            contact: project::member_contact(tx, &self.event)?,
        }))
    }
}
