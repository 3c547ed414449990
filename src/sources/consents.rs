//! Opt-ins and opt-outs from outside Akinon, so the consent ledger (and `unsubscribed-users`)
//! hears about them: reports posted to the admin API (providers' unsubscribe reports,
//! operators), and RFC 8058 one-click unsubscribe links signed with `consent.link_secret`.
//! Routes: [`crate::http::consents`].

use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    consent::{record_consent, Address, Channel, ConsentChange, ConsentState},
    envelope::{Applied, ApplyContext, ApplyError, Change, Envelope},
    http::auth::constant_time_eq,
};

/// Inbox sources of the two ways in.
pub const ADMIN_SOURCE: &str = "admin";
pub const LINK_SOURCE: &str = "unsubscribe_link";

/// One consent change reported from outside, and how it projects.
pub struct ConsentReport {
    pub address: Address,
    pub state: ConsentState,
    /// Unix ms the change happened.
    pub at: i64,
    /// Who says so (`emarsys`, `operator`, `unsubscribe_link`, …): the ledger's `source`.
    pub reported_by: String,
}

impl Change for ConsentReport {
    /// The ledger change, with a contact view of the address (email, or phone for the phone
    /// channels) whose consents the pipeline fills in from the ledger: a provider's unsubscribe
    /// report reaches the other providers.
    fn outbound(
        &self,
        _tx: &mut dyn crate::store::StoreTx,
    ) -> Result<Option<crate::delivery::event::Outbound>, crate::store::StoreError> {
        let address = &self.address;
        let contact = if address.channel == Channel::Email {
            Some(crate::delivery::event::ContactView {
                email: Some(address.normalised.clone()),
                ..Default::default()
            })
        } else if address.channel.is_phone() {
            Some(crate::delivery::event::ContactView {
                phone: Some(address.as_sent.clone()),
                phone_e164: Some(address.normalised.clone()),
                ..Default::default()
            })
        } else {
            None
        };
        Ok(Some(crate::delivery::event::Outbound {
            record: "consent",
            data: serde_json::json!({
                "channel": self.address.channel,
                "address": self.address.as_sent,
                "state": self.state.as_str(),
                "at": crate::clock::to_rfc3339(self.at),
                "reported_by": self.reported_by,
            }),
            contact,
        }))
    }

    fn apply(
        &self,
        tx: &mut dyn crate::store::StoreTx,
        ctx: &ApplyContext,
    ) -> Result<Applied, ApplyError> {
        Ok(record_consent(
            tx,
            &ConsentChange {
                address: &self.address,
                state: self.state,
                at: self.at,
                source: &self.reported_by,
            },
            ctx,
        )?)
    }
}

impl ConsentReport {
    /// An admin-API report. Dedupe key: the report's content, so a retried POST is a duplicate.
    pub fn into_admin_envelope(self, raw: Vec<u8>) -> Envelope {
        let dedupe_key = format!(
            "admin:consent:{}",
            crate::hex::encode(Sha256::digest(format!(
                "{}|{}|{}|{}",
                self.address.key(),
                self.state.as_str(),
                self.reported_by,
                self.at
            )))
        );
        self.into_envelope(
            ADMIN_SOURCE,
            dedupe_key,
            raw,
            json!({ "transport": "http", "route": "/api/v1/consents" }),
        )
    }

    /// A one-click unsubscribe. Every click is its own event; a repeated click finds the
    /// address already opted out and changes nothing.
    pub fn into_link_envelope(self, raw: Vec<u8>) -> Envelope {
        let dedupe_key = format!(
            "link:{}:{}:{:08x}",
            self.address.key(),
            self.at,
            fastrand::u32(..)
        );
        self.into_envelope(
            LINK_SOURCE,
            dedupe_key,
            raw,
            json!({ "transport": "http", "route": "/u/{token}" }),
        )
    }

    fn into_envelope(
        self,
        source: &'static str,
        dedupe_key: String,
        raw: Vec<u8>,
        meta: serde_json::Value,
    ) -> Envelope {
        Envelope {
            source,
            kind: format!("consent.{}", self.state.as_str()),
            entity: self.address.key(),
            dedupe_key,
            occurred_at: Some(self.at),
            received_at: crate::clock::now_ms(),
            raw,
            meta,
            change: Box::new(self),
        }
    }
}

/// The token of a one-click unsubscribe link: `base64url(channel:address).base64url(hmac)`,
/// the HMAC-SHA256 over `v1:channel:address` with `consent.link_secret`.
pub fn sign_link(secret: &[u8], address: &Address) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = format!("{}:{}", address.channel, address.normalised);
    let mac = hmac_sha256(secret, format!("v1:{payload}").as_bytes());
    format!("{}.{}", b64.encode(payload), b64.encode(mac))
}

/// The `(channel, normalised address)` a token was signed for, or `None` when it was not
/// signed with this secret (tampered, truncated, another key).
pub fn verify_link(secret: &[u8], token: &str) -> Option<(Channel, String)> {
    if secret.is_empty() {
        return None;
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, mac) = token.split_once('.')?;
    let payload = String::from_utf8(b64.decode(payload).ok()?).ok()?;
    let mac = b64.decode(mac).ok()?;
    let expected = hmac_sha256(secret, format!("v1:{payload}").as_bytes());
    if !constant_time_eq(&mac, &expected) {
        return None;
    }
    let (channel, address) = payload.split_once(':')?;
    Some((Channel::parse(channel)?, address.to_owned()))
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::Normaliser;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        assert_eq!(
            crate::hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signed_links_verify_and_tampered_ones_do_not() {
        let n = Normaliser::new("TR").unwrap();
        let address = n.address(Channel::Email, "User@Example.com").unwrap();
        let token = sign_link(b"k", &address);
        assert_eq!(
            verify_link(b"k", &token),
            Some((Channel::Email, "user@example.com".into()))
        );
        assert_eq!(verify_link(b"other key", &token), None);
        assert_eq!(verify_link(b"", &token), None);
        let (payload, mac) = token.split_once('.').unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = format!("{}.{mac}", b64.encode("email:victim@example.com"));
        assert_eq!(verify_link(b"k", &forged), None);
        assert_eq!(verify_link(b"k", payload), None);
        assert_eq!(verify_link(b"k", &format!("{token}x")), None);
    }
}
