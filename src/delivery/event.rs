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

/// A new event id: a UUIDv7 (RFC 9562: 48 bits of Unix milliseconds, then 74 random bits
/// from the system's random source), unique across instances, stores and restores. It is
/// written into the event's stored payload once, when the outbox rows are written, so every
/// retry and replay carries the same id (`webhook-id`) and receivers can drop what they
/// already have.
pub fn new_event_id() -> String {
    uuid_v7(crate::clock::now_ms())
}

fn uuid_v7(unix_ms: i64) -> String {
    let mut bytes = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut bytes[6..]).is_err() {
        // Not expected; the ids stay unique in practice (fastrand is seeded per thread).
        fastrand::fill(&mut bytes[6..]);
    }
    let ms = u64::try_from(unix_ms).unwrap_or(0).to_be_bytes();
    bytes[..6].copy_from_slice(&ms[2..]);
    bytes[6] = 0x70 | (bytes[6] & 0x0f);
    bytes[8] = 0x80 | (bytes[8] & 0x3f);
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The id of a stored event payload: its `"id"` (a UUIDv7; `evt_<inbox id>` in payloads
/// written before ids were UUIDs). Read from the front of the payload when it is there, which is
/// where [`canonical_event_json`] puts it; else by parsing.
pub fn payload_event_id(payload: &str) -> Option<String> {
    if let Some(rest) = payload.strip_prefix("{\"id\":\"") {
        if let Some(end) = rest.find('"') {
            let id = &rest[..end];
            if !id.contains('\\') {
                return Some(id.to_owned());
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct Id {
        id: Option<String>,
    }
    serde_json::from_str::<Id>(payload).ok()?.id
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

/// The canonical event, serialised with `"id"` first (so a worker reads it without parsing).
pub fn canonical_event_json(id: &str, meta: &EventMeta<'_>, outbound: &Outbound) -> String {
    let mut event = canonical_event(id, meta, outbound);
    let body = match event.as_object_mut() {
        Some(map) => {
            map.remove("id");
            event.to_string()
        }
        None => return event.to_string(),
    };
    match body.strip_prefix('{') {
        Some("}") => format!("{{\"id\":{}}}", Value::from(id)),
        Some(rest) => format!("{{\"id\":{},{rest}", Value::from(id)),
        None => body,
    }
}

/// The canonical event JSON.
pub fn canonical_event(id: &str, meta: &EventMeta<'_>, outbound: &Outbound) -> Value {
    let mut event = json!({
        "id": id,
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
        let id = new_event_id();
        let text = canonical_event_json(&id, &meta, &outbound);
        assert!(text.starts_with(&format!("{{\"id\":\"{id}\",")), "{text}");
        assert_eq!(payload_event_id(&text).as_deref(), Some(id.as_str()));
        let e: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e, canonical_event(&id, &meta, &outbound));
        assert_eq!(e["id"], id.as_str());
        assert_eq!(e["inbox_id"], 42);
        assert_eq!(e["type"], "customer.changed");
        assert_eq!(e["occurred_at"], Value::Null);
        assert_eq!(e["received_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(e["data"]["id"], "134719");
        assert_eq!(e["record"], "erp:customer:134719");
        assert_eq!(e["contact"], json!({"email": "a@example.com"}));
        let without = canonical_event(
            &id,
            &meta,
            &Outbound {
                contact: None,
                ..outbound
            },
        );
        assert!(without.get("contact").is_none());
    }

    #[test]
    fn event_ids_are_uuid_v7_and_distinct() {
        let id = uuid_v7(1_717_200_000_000);
        assert_eq!(id.len(), 36);
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        // 48 bits of milliseconds, version 7, variant 10.
        assert_eq!(
            u64::from_str_radix(&format!("{}{}", parts[0], parts[1]), 16).unwrap(),
            1_717_200_000_000
        );
        assert!(parts[2].starts_with('7'), "{id}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{id}");
        let many: std::collections::HashSet<String> = (0..10_000).map(|_| new_event_id()).collect();
        assert_eq!(many.len(), 10_000);
    }

    #[test]
    fn the_id_of_older_and_reserialised_payloads_is_read_by_parsing() {
        assert_eq!(
            payload_event_id(r#"{"contact":{"id":"x"},"data":{"id":"d"},"id":"evt_7"}"#).as_deref(),
            Some("evt_7")
        );
        assert_eq!(
            payload_event_id(r#"{"id":"a\"b"}"#).as_deref(),
            Some("a\"b")
        );
        assert_eq!(payload_event_id("not json"), None);
    }
}
