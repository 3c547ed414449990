//! ERP push notifications (`docs/contracts/erp-rabbitmq.md`): customer and subscription snapshots on two
//! queues, decoded defensively (unknown properties kept, odd values flagged, never rejected for
//! what the document calls forward-compatible).

use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

use super::amqp::{AmqpMessage, Decoder, Rejection};
use std::collections::BTreeMap;

use crate::{
    consent::{record_consent, Channel, ConsentChange, ConsentState, Normaliser},
    delivery::event::{ContactView, Outbound},
    envelope::{Applied, ApplyContext, ApplyError, Change, Envelope},
    projection::{apply_snapshot_doc, SnapshotDoc},
    store::{StoreError, StoreTx},
};

pub const SOURCE: &str = "erp";
/// Record kinds in the store.
pub const CUSTOMER: &str = "erp.customer";
pub const SUBSCRIPTION: &str = "erp.subscription";
/// Link kind: subscription id → engaged-party (customer) id.
pub const SUBSCRIPTION_PARTY: &str = "erp.subscription.party";

/// The two ERP feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Customer,
    Subscription,
}

impl Feed {
    pub(crate) fn event_kind(self) -> &'static str {
        match self {
            Feed::Customer => "customer.changed",
            Feed::Subscription => "subscription.changed",
        }
    }
}

/// Decoder for one ERP queue.
pub struct ErpDecoder {
    pub feed: Feed,
    /// Reads the customers' phone numbers (`consent.default_region`: the ERP sends Turkish
    /// mobiles as `5xxxxxxxxx`) for the contact view.
    pub phones: Normaliser,
    /// `erp.consent_flags`: properties that carry a consent, by name.
    pub consent_flags: BTreeMap<String, Channel>,
}

impl Decoder for ErpDecoder {
    fn decode(&self, message: &AmqpMessage<'_>) -> Result<Envelope, Rejection> {
        let object = parse_object(message.body)?;
        let (entity, doc) = match self.feed {
            Feed::Customer => decode_customer(object)?,
            Feed::Subscription => decode_subscription(object)?,
        };
        let kind = self.feed.event_kind();
        // The upstream's message-id identifies one message: a redelivery is a plain duplicate.
        // Without it, the key is the content: redelivered bytes are recognised, but the same
        // bytes after a different snapshot (A → B → A) are applied again by change detection.
        let (dedupe_key, reapply) = match message.message_id() {
            Some(id) => (format!("erp:{kind}:msg:{id}"), false),
            None => (
                format!(
                    "erp:{kind}:{entity}:{}",
                    hex::encode(Sha256::digest(message.body))
                ),
                true,
            ),
        };
        // Serialised and hashed here, on the consumer's task, rather than on the writer thread.
        let prepared =
            SnapshotDoc::new(&doc).map_err(|e| Rejection::new("unserialisable", e.to_string()))?;
        let contact = match self.feed {
            Feed::Customer => Some(customer_contact(&doc, &self.phones)),
            Feed::Subscription => None,
        };
        let consents = consent_flags(self.feed, &doc, &self.consent_flags);
        let change = ErpSnapshot {
            feed: self.feed,
            contact,
            consents,
            phones: self.phones.clone(),
            entity: entity.clone(),
            doc,
            prepared,
            reapply,
        };
        Ok(Envelope {
            source: SOURCE,
            kind: kind.to_owned(),
            entity,
            dedupe_key,
            occurred_at: message.timestamp_ms(),
            received_at: crate::clock::now_ms(),
            raw: message.body.to_vec(),
            meta: message.meta(),
            change: Box::new(change),
        })
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Rejection> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Rejection::new("not_utf8", format!("body is not UTF-8: {e}")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Rejection::new(
            "not_an_object",
            format!("body is a JSON {}, expected an object", json_type(&other)),
        )),
        Err(e) => Err(Rejection::new("not_json", format!("body is not JSON: {e}"))),
    }
}

pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `id` as a string: a JSON string (trimmed, non-empty) or an integer kept as its decimal text.
fn usable_id(object: &Map<String, Value>) -> Result<String, Rejection> {
    match object.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Some(Value::Number(n)) if is_integer(n) => Ok(n.to_string()),
        Some(Value::String(_)) => Err(Rejection::new("missing_id", "`id` is an empty string")),
        Some(other) => Err(Rejection::new(
            "missing_id",
            format!(
                "`id` is a {}, expected a string or an integer",
                json_type(other)
            ),
        )),
        None => Err(Rejection::new("missing_id", "no `id` property")),
    }
}

fn is_integer(n: &Number) -> bool {
    let text = n.to_string();
    let digits = text.strip_prefix('-').unwrap_or(&text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A scalar as text: strings as they are, numbers and booleans as their JSON text.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

const CUSTOMER_FIELDS: &[&str] = &["id", "status", "name", "contactMedium"];

fn decode_customer(mut object: Map<String, Value>) -> Result<(String, Value), Rejection> {
    let id = usable_id(&object)?;
    let mut flags = Vec::new();
    let status = object.get("status").cloned().unwrap_or(Value::Null);
    let status_known = matches!(status.as_str(), Some("Active" | "Passive"));
    if !status_known {
        flags.push("unknown_status");
        metrics::counter!("subgate_erp_unknown_status_total").increment(1);
    }
    let name = object.get("name").cloned().unwrap_or(Value::Null);
    let contact_medium = match object.remove("contactMedium") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.into_iter().map(contact_medium).collect(),
        Some(single @ Value::Object(_)) => {
            flags.push("contact_medium_not_an_array");
            vec![contact_medium(single)]
        }
        Some(other) => {
            flags.push("contact_medium_invalid");
            vec![serde_json::json!({ "invalid": other })]
        }
    };
    let extra: Map<String, Value> = object
        .into_iter()
        .filter(|(k, _)| !CUSTOMER_FIELDS.contains(&k.as_str()))
        .collect();
    let doc = serde_json::json!({
        "id": id,
        "status": status,
        "status_known": status_known,
        "name": name,
        "contact_medium": contact_medium,
        "extra": extra,
        "flags": flags,
    });
    Ok((id, doc))
}

/// One `contactMedium` entry: its `characteristic` (every key kept, scalars as sent) and any
/// other key of the entry.
fn contact_medium(entry: Value) -> Value {
    match entry {
        Value::Object(mut map) => {
            let characteristic = match map.remove("characteristic") {
                Some(Value::Object(c)) => Value::Object(c),
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(other) => serde_json::json!({ "invalid": other }),
            };
            let mut out = Map::new();
            out.insert("characteristic".into(), characteristic);
            if !map.is_empty() {
                out.insert("extra".into(), Value::Object(map));
            }
            Value::Object(out)
        }
        other => serde_json::json!({ "invalid": other }),
    }
}

const SUBSCRIPTION_FIELDS: &[&str] = &[
    "id",
    "agreementType",
    "documentNumber",
    "name",
    "status",
    "completionDate",
    "engagedParty",
    "characteristic",
    "properties",
];

fn decode_subscription(object: Map<String, Value>) -> Result<(String, Value), Rejection> {
    let id = usable_id(&object)?;
    let mut flags: Vec<String> = Vec::new();
    let text_field = |key: &str| object.get(key).cloned().unwrap_or(Value::Null);

    let completion = match object.get("completionDate") {
        Some(Value::Object(c)) => serde_json::json!({
            "start_date_time": c.get("startDateTime").cloned().unwrap_or(Value::Null),
            "end_date_time": c.get("endDateTime").cloned().unwrap_or(Value::Null),
        }),
        None | Some(Value::Null) => Value::Null,
        Some(_) => {
            flags.push("completion_date_invalid".into());
            Value::Null
        }
    };

    let mut parties: Vec<String> = Vec::new();
    match object.get("engagedParty") {
        Some(Value::Array(items)) => {
            for item in items {
                match item.get("id").and_then(scalar_text) {
                    Some(pid) if !pid.trim().is_empty() => {
                        let pid = pid.trim().to_owned();
                        if !parties.contains(&pid) {
                            parties.push(pid);
                        }
                    }
                    _ => flags.push("engaged_party_without_id".into()),
                }
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => flags.push("engaged_party_not_an_array".into()),
    }

    let bag = PropertyBag::read(&object, &mut flags);
    let extra: Map<String, Value> = object
        .iter()
        .filter(|(k, _)| !SUBSCRIPTION_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let doc = serde_json::json!({
        "id": id,
        "agreement_type": text_field("agreementType"),
        "document_number": text_field("documentNumber"),
        "name": text_field("name"),
        "status": text_field("status"),
        "completion_date": completion,
        "engaged_party": parties,
        "properties": bag.entries,
        "duplicate_properties": bag.duplicates,
        "extra": extra,
        "flags": flags,
    });
    Ok((id, doc))
}

/// The subscription's property bag, read from both `characteristic` (the example) and
/// `properties` (the warning), in that order; for a duplicate name the last entry wins.
struct PropertyBag {
    entries: Map<String, Value>,
    duplicates: Vec<Value>,
}

impl PropertyBag {
    fn read(object: &Map<String, Value>, flags: &mut Vec<String>) -> Self {
        let mut bag = PropertyBag {
            entries: Map::new(),
            duplicates: Vec::new(),
        };
        for list in ["characteristic", "properties"] {
            match object.get(list) {
                Some(Value::Array(items)) => {
                    for (index, item) in items.iter().enumerate() {
                        bag.add(list, index, item, flags);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => flags.push(format!("{list}_not_an_array")),
            }
        }
        bag
    }

    fn add(&mut self, list: &str, index: usize, item: &Value, flags: &mut Vec<String>) {
        let Some(name) = item
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            flags.push(format!("{list}[{index}]_without_name"));
            return;
        };
        let value_type = item.get("valueType").cloned().unwrap_or(Value::Null);
        let raw = item.get("value").cloned().unwrap_or(Value::Null);
        let (typed, flag) = typed_value(value_type.as_str(), &raw);
        let mut entry = Map::new();
        entry.insert("value_type".into(), value_type);
        entry.insert("value".into(), raw);
        entry.insert("typed".into(), typed);
        entry.insert("from".into(), Value::String(format!("{list}[{index}]")));
        if let Some(flag) = flag {
            entry.insert("flag".into(), Value::String(flag.into()));
            flags.push(format!("{name}:{flag}"));
        }
        if let Some(previous) = self.entries.remove(name) {
            self.duplicates
                .push(serde_json::json!({ "name": name, "replaced": previous }));
            flags.push(format!("{name}:duplicate_name"));
        }
        self.entries.insert(name.to_owned(), Value::Object(entry));
    }
}

/// The typed form of a bag value, or a flag saying why there is none. Numbers stay exact
/// (serde_json keeps their decimal text; no float round-trip).
fn typed_value(value_type: Option<&str>, raw: &Value) -> (Value, Option<&'static str>) {
    let Some(text) = scalar_text(raw) else {
        return if raw.is_null() {
            (Value::Null, None)
        } else {
            (Value::Null, Some("unparseable_value"))
        };
    };
    let text = text.trim();
    let parsed = match value_type {
        Some("String") => Some(Value::String(raw.as_str().map_or(text, |s| s).to_owned())),
        Some("Date") => parse_date(text).map(Value::String),
        Some("Float") => parse_decimal(text).map(Value::Number),
        Some("Integer") => parse_integer(text).map(Value::Number),
        Some("Boolean") => match text.to_ascii_lowercase().as_str() {
            "true" | "1" => Some(Value::Bool(true)),
            "false" | "0" => Some(Value::Bool(false)),
            _ => None,
        },
        _ => return (Value::Null, Some("unknown_value_type")),
    };
    match parsed {
        Some(v) => (v, None),
        None => (Value::Null, Some("unparseable_value")),
    }
}

/// ISO 8601 date or date-time → its normalised text (`2021-08-16`, or RFC 3339 for date-times).
fn parse_date(text: &str) -> Option<String> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Some(d.format("%Y-%m-%d").to_string());
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.to_rfc3339());
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.f").to_string())
}

/// A decimal number kept exactly as written (`0.0` stays `0.0`).
fn parse_decimal(text: &str) -> Option<Number> {
    let finite = text.parse::<f64>().is_ok_and(f64::is_finite);
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
    if !(finite && plain) {
        return None;
    }
    serde_json::from_str::<Number>(text.trim_start_matches('+')).ok()
}

fn parse_integer(text: &str) -> Option<Number> {
    text.parse::<i64>().ok().map(Number::from)
}

/// An ERP snapshot and how it projects.
struct ErpSnapshot {
    feed: Feed,
    /// Customers: the person, from the snapshot (which is the stored state once applied).
    contact: Option<ContactView>,
    /// What the snapshot's consent flags (`erp.consent_flags`) say, per channel.
    consents: Vec<(Channel, bool)>,
    /// Reads the engaged parties' phones (a subscription's flags apply to its customers).
    phones: Normaliser,
    entity: String,
    doc: Value,
    prepared: SnapshotDoc,
    reapply: bool,
}

impl Change for ErpSnapshot {
    fn apply(&self, tx: &mut dyn StoreTx, ctx: &ApplyContext) -> Result<Applied, ApplyError> {
        match self.feed {
            Feed::Customer => {
                let applied = apply_snapshot_doc(tx, CUSTOMER, &self.entity, &self.prepared, ctx)?;
                if applied == Applied::Stale {
                    return Ok(applied);
                }
                let consent = match &self.contact {
                    Some(contact) => self.record_consents(tx, contact, ctx)?,
                    None => Applied::NoOp,
                };
                Ok(combine(applied, consent))
            }
            Feed::Subscription => {
                let applied =
                    apply_snapshot_doc(tx, SUBSCRIPTION, &self.entity, &self.prepared, ctx)?;
                if applied == Applied::Changed {
                    tx.replace_links(SUBSCRIPTION_PARTY, &self.entity, &self.parties())?;
                }
                if applied == Applied::Stale || self.consents.is_empty() {
                    return Ok(applied);
                }
                let mut outcome = applied;
                for party in self.parties() {
                    if let Some(contact) = self.party_contact(tx, &party)? {
                        outcome = combine(outcome, self.record_consents(tx, &contact, ctx)?);
                    }
                }
                Ok(outcome)
            }
        }
    }

    fn is_snapshot(&self) -> bool {
        self.reapply
    }

    fn record_keys(&self) -> Vec<(&str, &str)> {
        let kind = match self.feed {
            Feed::Customer => CUSTOMER,
            Feed::Subscription => SUBSCRIPTION,
        };
        vec![(kind, self.entity.as_str())]
    }

    /// The new snapshot as the event's data; customers also carry a contact view. Asked only
    /// when the snapshot was applied, so it is the stored state.
    fn outbound(&self, tx: &mut dyn StoreTx) -> Result<Option<Outbound>, StoreError> {
        let record = match self.feed {
            Feed::Customer => "customer",
            Feed::Subscription => "subscription",
        };
        // A subscription whose flags speak for consent is about its (first known) customer.
        let contact = match self.feed {
            Feed::Customer => self.contact.clone(),
            Feed::Subscription if !self.consents.is_empty() => {
                let mut found = None;
                for party in self.parties() {
                    found = self.party_contact(tx, &party)?;
                    if found.is_some() {
                        break;
                    }
                }
                found
            }
            Feed::Subscription => None,
        };
        Ok(Some(Outbound {
            record,
            data: self.doc.clone(),
            contact,
        }))
    }
}

impl ErpSnapshot {
    fn parties(&self) -> Vec<String> {
        self.doc["engaged_party"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The stored customer `id` as a contact (`None`: not seen yet).
    fn party_contact(
        &self,
        tx: &mut dyn StoreTx,
        id: &str,
    ) -> Result<Option<ContactView>, StoreError> {
        Ok(tx
            .get_record(CUSTOMER, id)?
            .map(|r| customer_contact(&r.doc, &self.phones)))
    }

    /// The flags' consents, in the ledger, for the contact's email (email channel) or phone
    /// (the others), at the message's time.
    fn record_consents(
        &self,
        tx: &mut dyn StoreTx,
        contact: &ContactView,
        ctx: &ApplyContext,
    ) -> Result<Applied, StoreError> {
        let mut outcome = Applied::NoOp;
        for (channel, allowed) in &self.consents {
            let raw = if *channel == Channel::Email {
                contact.email.as_deref()
            } else {
                contact.phone.as_deref()
            };
            let Some(address) = raw.and_then(|r| self.phones.address(*channel, r).ok()) else {
                continue;
            };
            let change = ConsentChange {
                address: &address,
                state: ConsentState::from_allowed(*allowed),
                at: ctx.occurred_at.unwrap_or(ctx.received_at),
                source: SOURCE,
            };
            outcome = combine(outcome, record_consent(tx, &change, ctx)?);
        }
        Ok(outcome)
    }
}

/// `Changed` if either changed, else the first.
fn combine(a: Applied, b: Applied) -> Applied {
    if b == Applied::Changed {
        Applied::Changed
    } else {
        a
    }
}

/// What the configured consent flags say in a decoded snapshot: a customer's top-level
/// properties (kept under `extra`) and its contact media's characteristics; a subscription's
/// property bag. Values that are not yes or no are left out.
fn consent_flags(
    feed: Feed,
    doc: &Value,
    flags: &BTreeMap<String, Channel>,
) -> Vec<(Channel, bool)> {
    let mut out = Vec::new();
    for (name, channel) in flags {
        let value = match feed {
            Feed::Customer => doc["extra"].get(name).cloned().or_else(|| {
                doc["contact_medium"].as_array().and_then(|media| {
                    media
                        .iter()
                        .find_map(|m| m["characteristic"].get(name).cloned())
                })
            }),
            Feed::Subscription => doc["properties"].get(name).map(|p| {
                if p["typed"].is_boolean() {
                    p["typed"].clone()
                } else {
                    p["value"].clone()
                }
            }),
        };
        if let Some(allowed) = value.as_ref().and_then(flag_value) {
            out.push((*channel, allowed));
        }
    }
    out
}

fn flag_value(v: &Value) -> Option<bool> {
    let text = scalar_text(v)?;
    match text.trim().to_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "evet" | "e" => Some(true),
        "false" | "0" | "no" | "n" | "hayır" | "hayir" | "h" => Some(false),
        _ => None,
    }
}

/// The contact view of an ERP customer: `name` split at its last space (given names, family
/// name), the first `phoneNumber` and `emailAddress` (or `email`) among the contact media. The
/// ERP says nothing about consent (the ledger does), birth date or gender.
fn customer_contact(doc: &Value, phones: &Normaliser) -> ContactView {
    let name = doc["name"]
        .as_str()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let (first_name, last_name) = match name.map(|n| n.rsplit_once(char::is_whitespace)) {
        Some(Some((first, last))) => (Some(first.trim().to_owned()), Some(last.to_owned())),
        Some(None) => (name.map(str::to_owned), None),
        None => (None, None),
    };
    let media: Vec<&Value> = doc["contact_medium"]
        .as_array()
        .map(|m| m.iter().map(|e| &e["characteristic"]).collect())
        .unwrap_or_default();
    let first_of = |keys: &[&str]| {
        media.iter().find_map(|c| {
            keys.iter()
                .find_map(|k| c.get(*k).and_then(scalar_text))
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
        })
    };
    let email = first_of(&["emailAddress", "email"]);
    let phone = first_of(&["phoneNumber"]);
    ContactView {
        email: email.map(|e| crate::consent::email(&e).unwrap_or(e)),
        phone_e164: phone.as_deref().and_then(|p| phones.phone(p).ok()),
        phone,
        first_name,
        last_name,
        ..ContactView::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(text: &str) -> Map<String, Value> {
        parse_object(text.as_bytes()).unwrap()
    }

    #[test]
    fn numeric_customer_id_is_kept_as_its_decimal_text() {
        let (id, doc) = decode_customer(obj(r#"{"id": 134719, "status": "Active"}"#)).unwrap();
        assert_eq!(id, "134719");
        assert_eq!(doc["id"], "134719");
    }

    #[test]
    fn unusable_ids_are_rejected_with_missing_id() {
        for body in [
            r#"{"status":"Active"}"#,
            r#"{"id":""}"#,
            r#"{"id":1.5}"#,
            r#"{"id":{}}"#,
        ] {
            let err = decode_customer(obj(body)).unwrap_err();
            assert_eq!(err.code, "missing_id", "{body}");
        }
    }

    #[test]
    fn non_objects_and_non_json_are_rejected_with_their_reason() {
        assert_eq!(parse_object(b"[1,2]").unwrap_err().code, "not_an_object");
        assert_eq!(parse_object(b"{nope").unwrap_err().code, "not_json");
        assert_eq!(parse_object(b"\xff\xfe").unwrap_err().code, "not_utf8");
    }

    #[test]
    fn unknown_status_is_kept_and_flagged() {
        let (_, doc) = decode_customer(obj(r#"{"id":"1","status":"Frozen","x":1}"#)).unwrap();
        assert_eq!(doc["status"], "Frozen");
        assert_eq!(doc["status_known"], false);
        assert_eq!(doc["extra"]["x"], 1);
        assert_eq!(doc["flags"][0], "unknown_status");
    }

    #[test]
    fn typed_values_cover_every_value_type() {
        let cases = [
            ("String", r#""abc""#, r#""abc""#, None),
            ("Date", r#""2021-08-16""#, r#""2021-08-16""#, None),
            ("Float", r#""0.0""#, "0.0", None),
            ("Float", r#""12.50""#, "12.50", None),
            ("Float", r#""abc""#, "null", Some("unparseable_value")),
            ("Integer", r#""42""#, "42", None),
            ("Integer", r#""4.2""#, "null", Some("unparseable_value")),
            ("Boolean", r#""true""#, "true", None),
            ("Boolean", "false", "false", None),
            ("Money", r#""1""#, "null", Some("unknown_value_type")),
            ("Date", r#""16/08/2021""#, "null", Some("unparseable_value")),
        ];
        for (ty, raw, typed, flag) in cases {
            let raw: Value = serde_json::from_str(raw).unwrap();
            let (got, got_flag) = typed_value(Some(ty), &raw);
            assert_eq!(serde_json::to_string(&got).unwrap(), typed, "{ty} {raw}");
            assert_eq!(got_flag, flag, "{ty} {raw}");
        }
    }

    #[test]
    fn customer_contact_view_splits_the_name_and_finds_phone_and_email() {
        let (_, doc) =
            decode_customer(obj(r#"{"id":"1","name":"Ayşe Nur Yılmaz","contactMedium":[
                {"characteristic":{"city":"İSTANBUL"}},
                {"characteristic":{"phoneNumber":5351234567,"emailAddress":" a@example.com "}}]}"#))
            .unwrap();
        let phones = Normaliser::new("TR").unwrap();
        let c = customer_contact(&doc, &phones);
        assert_eq!(c.first_name.as_deref(), Some("Ayşe Nur"));
        assert_eq!(c.last_name.as_deref(), Some("Yılmaz"));
        assert_eq!(c.phone.as_deref(), Some("5351234567"));
        assert_eq!(c.phone_e164.as_deref(), Some("+905351234567"));
        assert_eq!(c.email.as_deref(), Some("a@example.com"));
        let (_, bare) = decode_customer(obj(r#"{"id":"2","name":"Cher"}"#)).unwrap();
        let c = customer_contact(&bare, &phones);
        assert_eq!((c.first_name.as_deref(), c.last_name), (Some("Cher"), None));
        assert_eq!(c.email, None);
    }

    #[test]
    fn consent_flags_are_read_from_customer_properties_media_and_the_property_bag() {
        let flags: BTreeMap<String, Channel> = [
            ("emailPermission".to_owned(), Channel::Email),
            ("SMS_PERMISSION".to_owned(), Channel::Sms),
        ]
        .into();
        let (_, customer) =
            decode_customer(obj(r#"{"id":"1","emailPermission":"Evet","contactMedium":[
                {"characteristic":{"phoneNumber":"5351234567","SMS_PERMISSION":false}}]}"#))
            .unwrap();
        assert_eq!(
            consent_flags(Feed::Customer, &customer, &flags),
            [(Channel::Sms, false), (Channel::Email, true)]
        );
        let (_, subscription) = decode_subscription(obj(
            r#"{"id":"9","characteristic":[{"name":"SMS_PERMISSION","valueType":"Boolean","value":"true"},
                {"name":"emailPermission","valueType":"String","value":"maybe"}]}"#,
        ))
        .unwrap();
        assert_eq!(
            consent_flags(Feed::Subscription, &subscription, &flags),
            [(Channel::Sms, true)],
            "a value that is neither yes nor no says nothing"
        );
    }

    #[test]
    fn property_bag_reads_both_lists_and_the_last_duplicate_wins() {
        let (_, doc) = decode_subscription(obj(
            r#"{"id":"9","characteristic":[{"name":"A","valueType":"String","value":"one"}],
                "properties":[{"name":"A","valueType":"String","value":"two"},
                              {"name":"B","valueType":"Integer","value":"7"}]}"#,
        ))
        .unwrap();
        assert_eq!(doc["properties"]["A"]["typed"], "two");
        assert_eq!(doc["properties"]["A"]["from"], "properties[0]");
        assert_eq!(doc["properties"]["B"]["typed"], 7);
        assert_eq!(doc["duplicate_properties"][0]["name"], "A");
        assert_eq!(doc["duplicate_properties"][0]["replaced"]["value"], "one");
    }
}
