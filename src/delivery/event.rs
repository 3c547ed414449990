//! The canonical event: what every destination receives for one real change (the body of a
//! webhook, the AMQP message, the source of an Emarsys contact). Sources fill in [`Outbound`]
//! through [`crate::envelope::Change::outbound`]; the ingest pipeline adds the envelope's
//! metadata. `docs/delivery.md` documents the shape for source authors and receivers.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::clock::to_rfc3339;

/// What a real change tells the providers.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    /// The kind of record the change is about, within its source (`customer`, `user`,
    /// `order`, `member`, …): with the source and the entity it names the record
    /// (`akinon:user:1` and `akinon:order:1` are two records), the outbox's ordering key.
    pub record: &'static str,
    /// The event's `data`: the entity's new state in the source's canonical form.
    pub data: Value,
    /// The person the change is about, for contact-keyed providers (Emarsys). `None`: the
    /// change is not about a person (a subscription, a service order). Sources fill in the
    /// profile from their *stored* record; the ingest pipeline then sets the consents from the
    /// ledger ([`super::contact::with_ledger`]), so no embedded copy ever speaks for consent.
    pub contact: Option<ContactView>,
}

/// `source:record:entity`, e.g. `akinon:user:1`: the outbox's ordering and coalescing key.
pub fn record_key(source: &str, record: &str, entity: &str) -> String {
    format!("{source}:{record}:{entity}")
}

/// A person, in one vocabulary for every source. Fields a source does not know stay `None`
/// (and are not sent to Emarsys, which keeps what it had).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContactView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// As the upstream sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The phone in E.164 (`consent.default_region` for national forms): the ledger's key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_e164: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// `YYYY-MM-DD`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub birth_date: Option<String>,
    /// `male` | `female` | anything else the upstream said (mapped by `gender_values`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    /// Marketing (email) consent, from the ledger: `None` when the ledger knows nothing of the
    /// email (Emarsys then keeps what it had).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opt_in: Option<bool>,
    /// The ledger's current state per channel (`email`, `sms`, `call`, `whatsapp`, `viber`)
    /// for this contact's email and phone.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, ConsentView>,
}

/// One channel's current consent, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentView {
    /// `opted_in` | `opted_out`.
    pub state: String,
    /// The normalised address (email lower-cased, phone in E.164).
    pub address: String,
    /// When the change happened (RFC 3339).
    pub at: String,
    /// Who reported it (`akinon`, `loymax`, `emarsys`, `unsubscribe_link`, …).
    pub source: String,
}

impl ContactView {
    /// A contact field by its name in the view (`email`, `phone`, …), as text.
    pub fn field(&self, name: &str) -> Option<String> {
        let text = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        match name {
            "email" => text(&self.email),
            "phone" => text(&self.phone_e164).or_else(|| text(&self.phone)),
            "first_name" => text(&self.first_name),
            "last_name" => text(&self.last_name),
            "birth_date" => text(&self.birth_date),
            "gender" => text(&self.gender),
            "opt_in" => self.opt_in.map(|b| b.to_string()),
            _ => None,
        }
    }
}

/// The event id: stable for one inbox event, so a retry or a replay carries the same id
/// (`webhook-id`) and receivers can drop what they already have.
pub fn event_id(inbox_id: i64) -> String {
    format!("evt_{inbox_id}")
}

/// Metadata of the envelope the event comes from.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta<'a> {
    pub inbox_id: i64,
    pub kind: &'a str,
    pub source: &'a str,
    pub entity: &'a str,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
}

/// The canonical event JSON.
pub fn canonical_event(meta: &EventMeta<'_>, outbound: &Outbound) -> Value {
    let mut event = json!({
        "id": event_id(meta.inbox_id),
        "type": meta.kind,
        "source": meta.source,
        "entity": meta.entity,
        "record": record_key(meta.source, outbound.record, meta.entity),
        "occurred_at": meta.occurred_at.map(to_rfc3339),
        "received_at": to_rfc3339(meta.received_at),
        "inbox_id": meta.inbox_id,
        "data": outbound.data,
    });
    if let (Some(contact), Some(map)) = (&outbound.contact, event.as_object_mut()) {
        map.insert(
            "contact".into(),
            serde_json::to_value(contact).unwrap_or(Value::Null),
        );
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_event_carries_metadata_data_and_the_contact_view() {
        let meta = EventMeta {
            inbox_id: 42,
            kind: "customer.changed",
            source: "erp",
            entity: "134719",
            occurred_at: None,
            received_at: 0,
        };
        let outbound = Outbound {
            record: "customer",
            data: json!({"id": "134719"}),
            contact: Some(ContactView {
                email: Some("a@example.com".into()),
                ..ContactView::default()
            }),
        };
        let e = canonical_event(&meta, &outbound);
        assert_eq!(e["id"], "evt_42");
        assert_eq!(e["type"], "customer.changed");
        assert_eq!(e["occurred_at"], Value::Null);
        assert_eq!(e["received_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(e["data"]["id"], "134719");
        assert_eq!(e["record"], "erp:customer:134719");
        assert_eq!(e["contact"], json!({"email": "a@example.com"}));
        let without = canonical_event(
            &meta,
            &Outbound {
                contact: None,
                ..outbound
            },
        );
        assert!(without.get("contact").is_none());
    }
}
