//! What a provider is told about a person: the contact view's consents come from the consent
//! ledger as it stands in the transaction that writes the outbox row (or, for a replayed row,
//! as it stands when the row is sent), never from the copy of a profile embedded in the event.

use serde_json::Value;

use super::event::{ConsentView, ContactView};
use crate::{
    clock::to_rfc3339,
    consent::{Channel, CONSENT},
    store::{Record, StoreError, StoreTx},
};

/// The channels a phone number carries consent for.
const PHONE_CHANNELS: [Channel; 4] = [
    Channel::Sms,
    Channel::Call,
    Channel::Whatsapp,
    Channel::Viber,
];

/// The ledger keys (`channel:address`) a contact's consents live under.
pub fn ledger_keys(contact: &ContactView) -> Vec<(Channel, String)> {
    let mut keys = Vec::new();
    if let Some(email) = contact.email.as_deref().filter(|e| !e.is_empty()) {
        keys.push((Channel::Email, format!("email:{email}")));
    }
    if let Some(phone) = contact.phone_e164.as_deref().filter(|p| !p.is_empty()) {
        for channel in PHONE_CHANNELS {
            keys.push((channel, format!("{channel}:{phone}")));
        }
    }
    keys
}

/// Set the contact's consents (and its email `opt_in`) to what the ledger holds now, inside the
/// ingest transaction: whatever the source said, the ledger decides.
pub fn with_ledger(tx: &mut dyn StoreTx, contact: &mut ContactView) -> Result<(), StoreError> {
    let mut records = Vec::new();
    for (channel, key) in ledger_keys(contact) {
        records.push((channel, tx.get_record(CONSENT, &key)?));
    }
    apply(contact, records);
    Ok(())
}

/// Set the contact's consents from ledger records (`None`: the ledger knows nothing of that
/// channel and address).
pub fn apply(contact: &mut ContactView, records: Vec<(Channel, Option<Record>)>) {
    contact.consent.clear();
    contact.opt_in = None;
    for (channel, record) in records {
        let Some(view) = record.as_ref().and_then(|r| consent_view(&r.doc)) else {
            continue;
        };
        if channel == Channel::Email {
            contact.opt_in = Some(view.state == "opted_in");
        }
        contact.consent.insert(channel.as_str().to_owned(), view);
    }
}

fn consent_view(doc: &Value) -> Option<ConsentView> {
    let text = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(ConsentView {
        state: text("state")?,
        address: text("address")?,
        at: doc.get("at").and_then(Value::as_i64).map(to_rfc3339)?,
        source: text("source").unwrap_or_default(),
    })
}

/// The key that orders a destination's rows about one contact: the value of the field the
/// provider identifies contacts by (Emarsys: its key field, normalised), else the email, else
/// the E.164 phone. Rows with the same key go out one at a time, in commit order.
pub fn contact_key(contact: &ContactView, key_field: Option<&str>) -> Option<String> {
    let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
    match key_field {
        Some("email") | None => nonempty(&contact.email)
            .map(|e| format!("email:{}", e.trim().to_lowercase()))
            .or_else(|| nonempty(&contact.phone_e164).map(|p| format!("phone:{p}"))),
        Some("phone") => nonempty(&contact.phone_e164)
            .map(|p| format!("phone:{p}"))
            .or_else(|| nonempty(&contact.phone).map(|p| format!("phone:{}", p.trim()))),
        Some(other) => contact.field(other).map(|v| format!("{other}:{v}")),
    }
}

/// Refresh the consents of a canonical event's contact from ledger records (a replayed row:
/// what it said when written may be out of date). Returns the new payload text, or `None` when
/// the event has no contact.
pub fn refresh_payload(
    payload: &str,
    lookup: &mut dyn FnMut(&str) -> Result<Option<Record>, StoreError>,
) -> Result<Option<String>, StoreError> {
    let Ok(mut event) = serde_json::from_str::<Value>(payload) else {
        return Ok(None);
    };
    let Some(contact_json) = event.get("contact").cloned() else {
        return Ok(None);
    };
    let mut contact = ContactView {
        email: contact_json["email"].as_str().map(str::to_owned),
        phone_e164: contact_json["phone_e164"].as_str().map(str::to_owned),
        ..ContactView::default()
    };
    let mut records = Vec::new();
    for (channel, key) in ledger_keys(&contact) {
        records.push((channel, lookup(&key)?));
    }
    apply(&mut contact, records);
    let Some(map) = event.get_mut("contact").and_then(Value::as_object_mut) else {
        return Ok(None);
    };
    map.remove("opt_in");
    map.remove("consent");
    if let Some(opt_in) = contact.opt_in {
        map.insert("opt_in".into(), Value::Bool(opt_in));
    }
    if !contact.consent.is_empty() {
        map.insert(
            "consent".into(),
            serde_json::to_value(&contact.consent).unwrap_or(Value::Null),
        );
    }
    Ok(Some(event.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ledger(state: &str, address: &str) -> Record {
        Record {
            kind: CONSENT.into(),
            key: format!("email:{address}"),
            doc: json!({"channel": "email", "address": address, "state": state, "at": 0,
                        "source": "admin"}),
            hash: String::new(),
            occurred_at: Some(0),
            changed_at: 0,
            changed_by: 1,
            seen_at: 0,
            seen_by: 1,
            version: 1,
        }
    }

    #[test]
    fn the_ledger_decides_the_opt_in_whatever_the_source_said() {
        let mut contact = ContactView {
            email: Some("a@example.com".into()),
            opt_in: Some(true),
            ..ContactView::default()
        };
        apply(
            &mut contact,
            vec![(Channel::Email, Some(ledger("opted_out", "a@example.com")))],
        );
        assert_eq!(contact.opt_in, Some(false));
        assert_eq!(contact.consent["email"].state, "opted_out");
        apply(&mut contact, vec![(Channel::Email, None)]);
        assert_eq!(contact.opt_in, None, "nothing known: nothing claimed");
    }

    #[test]
    fn contact_keys_follow_the_providers_key_field() {
        let c = ContactView {
            email: Some("A@Example.com".into()),
            phone: Some("0535 123 45 67".into()),
            phone_e164: Some("+905351234567".into()),
            ..ContactView::default()
        };
        assert_eq!(
            contact_key(&c, None).as_deref(),
            Some("email:a@example.com")
        );
        assert_eq!(
            contact_key(&c, Some("phone")).as_deref(),
            Some("phone:+905351234567")
        );
        let phone_only = ContactView {
            phone_e164: Some("+905351234567".into()),
            ..ContactView::default()
        };
        assert_eq!(
            contact_key(&phone_only, None).as_deref(),
            Some("phone:+905351234567")
        );
        assert_eq!(contact_key(&ContactView::default(), None), None);
    }

    #[test]
    fn a_replayed_payload_gets_the_ledgers_current_consent() {
        let payload = json!({"id": "evt_1", "contact": {"email": "a@example.com", "opt_in": true}})
            .to_string();
        let fresh = refresh_payload(&payload, &mut |key| {
            Ok((key == "email:a@example.com").then(|| ledger("opted_out", "a@example.com")))
        })
        .unwrap()
        .unwrap();
        let v: Value = serde_json::from_str(&fresh).unwrap();
        assert_eq!(v["contact"]["opt_in"], false);
        assert_eq!(v["contact"]["consent"]["email"]["state"], "opted_out");
        assert_eq!(
            refresh_payload(r#"{"id":"evt_2"}"#, &mut |_| Ok(None)).unwrap(),
            None
        );
    }
}
