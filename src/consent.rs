//! The consent ledger, shared by every source: per (channel, address) the current state, and
//! every change with its time, source and the inbox event behind it.
//!
//! Addresses are normalised (email lower-cased and trimmed; phone to E.164 with a configurable
//! default region) so `05351234567`, `5351234567` and `+905351234567` are one address; the form
//! the upstream sent is kept, and answers use it.
//!
//! Storage: record kind [`CONSENT`] keyed `"<channel>:<normalised>"` holds the current state;
//! history kind [`CONSENT_CHANGE`] (same key) holds every real change, so "who opted out between
//! T1 and T2" is a range query on `history.at`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    envelope::{Applied, ApplyContext},
    store::{content_hash, HistoryEntry, Record, StoreError, StoreTx},
};

pub const CONSENT: &str = "consent";
pub const CONSENT_CHANGE: &str = "consent.change";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Sms,
    Call,
    Whatsapp,
    Push,
    Viber,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Call => "call",
            Channel::Whatsapp => "whatsapp",
            Channel::Push => "push",
            Channel::Viber => "viber",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "email" => Channel::Email,
            "sms" => Channel::Sms,
            "call" => Channel::Call,
            "whatsapp" => Channel::Whatsapp,
            "push" => Channel::Push,
            "viber" => Channel::Viber,
            _ => return None,
        })
    }

    /// Channels addressed by a phone number.
    pub fn is_phone(self) -> bool {
        matches!(
            self,
            Channel::Sms | Channel::Call | Channel::Whatsapp | Channel::Viber
        )
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentState {
    OptedIn,
    OptedOut,
}

impl ConsentState {
    pub fn from_allowed(allowed: bool) -> Self {
        if allowed {
            ConsentState::OptedIn
        } else {
            ConsentState::OptedOut
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConsentState::OptedIn => "opted_in",
            ConsentState::OptedOut => "opted_out",
        }
    }
}

/// A normalised address with the form the upstream sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub channel: Channel,
    pub normalised: String,
    pub as_sent: String,
}

impl Address {
    /// The ledger key: `"<channel>:<normalised>"`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.channel, self.normalised)
    }
}

/// Normalises addresses; built once from configuration (`consent.default_region`).
#[derive(Debug, Clone)]
pub struct Normaliser {
    /// The region whose numbering plan (trunk prefix, lengths) applies to national forms.
    region: phonenumber::country::Id,
}

impl Normaliser {
    pub fn new(default_region: &str) -> Result<Self, String> {
        let code = default_region.trim().to_ascii_uppercase();
        code.parse::<phonenumber::country::Id>()
            .map(|region| Normaliser { region })
            .map_err(|_| {
                format!(
                    "unknown region {default_region:?}: an ISO 3166 alpha-2 code (TR, RU, KZ, …)"
                )
            })
    }

    pub fn address(&self, channel: Channel, raw: &str) -> Result<Address, String> {
        let normalised = if channel.is_phone() {
            self.phone(raw)?
        } else if channel == Channel::Email {
            email(raw)?
        } else {
            let t = raw.trim();
            if t.is_empty() {
                return Err("empty address".into());
            }
            t.to_owned()
        };
        Ok(Address {
            channel,
            normalised,
            as_sent: raw.to_owned(),
        })
    }

    /// E.164 by the default region's numbering plan (libphonenumber's metadata): with TR,
    /// `05351234567`, `5351234567`, `905351234567`, `+90 535 123 45 67` and `00905351234567` are
    /// all `+905351234567`; with RU, `8 912 345-67-89` is `+79123456789`.
    pub fn phone(&self, raw: &str) -> Result<String, String> {
        let trimmed = raw.trim();
        if let Some(other) = trimmed
            .chars()
            .find(|c| !(c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')' | '.' | '/')))
        {
            return Err(format!("unexpected character {other:?} in phone number"));
        }
        // `00` is the international prefix of most regions; libphonenumber reads it only for the
        // default region's own prefix (Russia dials `810`), so it is made a `+` here.
        let text = match trimmed.strip_prefix("00") {
            Some(rest) => format!("+{rest}"),
            None => trimmed.to_owned(),
        };
        let number = phonenumber::parse(Some(self.region), &text)
            .map_err(|e| format!("not a phone number: {e}"))?;
        let e164 = number.format().mode(phonenumber::Mode::E164).to_string();
        let digits = e164.len().saturating_sub(1);
        if !(8..=15).contains(&digits) {
            return Err(format!(
                "{digits} digits is not a phone number (E.164 allows 8 to 15)"
            ));
        }
        Ok(e164)
    }
}

/// Lower-cased, trimmed, and shaped like `local@domain.tld`.
pub fn email(raw: &str) -> Result<String, String> {
    let e = raw.trim().to_lowercase();
    let valid = e.len() <= 254
        && !e.chars().any(char::is_whitespace)
        && matches!(e.split_once('@'), Some((local, domain))
            if !local.is_empty() && local.len() <= 64 && !domain.contains('@')
            && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
            && !domain.contains(".."));
    if valid {
        Ok(e)
    } else {
        Err("not a valid email address".into())
    }
}

/// One consent change as a source reports it.
#[derive(Debug, Clone)]
pub struct ConsentChange<'a> {
    pub address: &'a Address,
    pub state: ConsentState,
    /// Unix ms the upstream says the change happened (or when it was received).
    pub at: i64,
    /// erp | akinon | loymax | …
    pub source: &'a str,
}

/// Apply a consent change to the ledger:
/// - older than the current state (`at`) → `Stale`, nothing written;
/// - same state → `NoOp`;
/// - otherwise the current state moves and the change is appended to the history.
pub fn record_consent(
    tx: &mut dyn StoreTx,
    change: &ConsentChange<'_>,
    ctx: &ApplyContext,
) -> Result<Applied, StoreError> {
    let key = change.address.key();
    let current = tx.get_record(CONSENT, &key)?;
    let previous_state = current.as_ref().and_then(|r| {
        r.doc
            .get("state")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    if let Some(record) = &current {
        if record.occurred_at.is_some_and(|at| change.at < at) {
            return Ok(Applied::Stale);
        }
        if previous_state.as_deref() == Some(change.state.as_str()) {
            return Ok(Applied::NoOp);
        }
    }
    let doc = json!({
        "channel": change.address.channel,
        "address": change.address.normalised,
        "as_sent": change.address.as_sent,
        "state": change.state.as_str(),
        "at": change.at,
        "source": change.source,
        "inbox_id": ctx.inbox_id,
    });
    tx.put_record(&Record {
        kind: CONSENT.into(),
        key: key.clone(),
        hash: content_hash(&doc),
        occurred_at: Some(change.at),
        changed_at: ctx.received_at,
        changed_by: ctx.inbox_id,
        seen_at: ctx.received_at,
        seen_by: ctx.inbox_id,
        version: current.as_ref().map_or(1, |r| r.version + 1),
        doc: doc.clone(),
    })?;
    let mut entry = doc;
    entry["previous"] = previous_state.map_or(Value::Null, Value::String);
    tx.append_history(&HistoryEntry {
        kind: CONSENT_CHANGE.into(),
        key,
        at: change.at,
        inbox_id: ctx.inbox_id,
        doc: entry,
    })?;
    Ok(Applied::Changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turkish_phone_forms_are_one_address() {
        let n = Normaliser::new("TR").unwrap();
        for raw in [
            "05351234567",
            "5351234567",
            "+905351234567",
            "905351234567",
            "0090 535 123 45 67",
            "+90 (535) 123-45-67",
        ] {
            assert_eq!(n.phone(raw).unwrap(), "+905351234567", "{raw}");
        }
        assert!(n.phone("12").is_err());
        assert!(n.phone("0535abc").is_err());
    }

    #[test]
    fn russian_and_kazakh_trunk_prefix_8_is_read_by_the_numbering_plan() {
        let ru = Normaliser::new("RU").unwrap();
        for raw in [
            "8 912 345-67-89",
            "89123456789",
            "+7 912 345 67 89",
            "9123456789",
        ] {
            assert_eq!(ru.phone(raw).unwrap(), "+79123456789", "{raw}");
        }
        let kz = Normaliser::new("KZ").unwrap();
        for raw in ["8 701 123 4567", "87011234567", "+77011234567"] {
            assert_eq!(kz.phone(raw).unwrap(), "+77011234567", "{raw}");
        }
        // An international number keeps its own country whatever the default region.
        assert_eq!(ru.phone("+90 535 123 45 67").unwrap(), "+905351234567");
    }

    #[test]
    fn email_is_lower_cased_and_validated() {
        assert_eq!(email(" Ayse@Example.COM ").unwrap(), "ayse@example.com");
        for bad in ["", "no-at", "a@b", "a@@b.com", "a b@c.com", "@c.com"] {
            assert!(email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_region_is_refused() {
        assert!(Normaliser::new("XX").is_err());
        assert!(Normaliser::new("tr").is_ok());
    }
}
