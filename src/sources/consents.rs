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
            hex::encode(Sha256::digest(format!(
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

/// Version byte of the current token format.
const LINK_V2: u8 = 2;
const NONCE_LEN: usize = aws_lc_rs::aead::NONCE_LEN;
/// Associated data of every v2 token: binds the ciphertext to its use.
const LINK_AAD: &[u8] = b"subgate unsubscribe link v2";

/// The AES-256-GCM key of v2 tokens, derived from `consent.link_secret` (domain-separated, so
/// the secret itself is never the cipher key).
fn link_key(secret: &[u8]) -> Option<aws_lc_rs::aead::LessSafeKey> {
    let key = hmac_sha256(secret, b"subgate unsubscribe link v2 key");
    let key = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &key).ok()?;
    Some(aws_lc_rs::aead::LessSafeKey::new(key))
}

/// The token of a one-click unsubscribe link (v2): opaque and signed,
/// `base64url(0x02 ‖ nonce ‖ AES-256-GCM(channel:address) ‖ tag)` under a key derived from
/// `consent.link_secret`, with a fresh random 96-bit nonce per link. It does not reveal the
/// address; altering any byte fails the tag. `None` only if the system's random source fails.
pub fn sign_link(secret: &[u8], address: &Address) -> Option<String> {
    use aws_lc_rs::aead::{Aad, Nonce};
    let key = link_key(secret)?;
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).ok()?;
    let mut sealed = format!("{}:{}", address.channel, address.normalised).into_bytes();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(LINK_AAD),
        &mut sealed,
    )
    .ok()?;
    let mut token = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    token.push(LINK_V2);
    token.extend_from_slice(&nonce);
    token.extend_from_slice(&sealed);
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token))
}

/// The `(channel, normalised address)` a token was made for, or `None` when it was not made
/// with this secret (tampered, truncated, another key). Accepts the current opaque tokens
/// (v2, no `.`) and the signed-only v1 tokens (`base64url(channel:address).base64url(hmac)`)
/// of links already sent out.
pub fn verify_link(secret: &[u8], token: &str) -> Option<(Channel, String)> {
    if secret.is_empty() {
        return None;
    }
    let payload = if token.contains('.') {
        verify_link_v1(secret, token)?
    } else {
        open_link_v2(secret, token)?
    };
    let (channel, address) = payload.split_once(':')?;
    Some((Channel::parse(channel)?, address.to_owned()))
}

fn open_link_v2(secret: &[u8], token: &str) -> Option<String> {
    use aws_lc_rs::aead::{Aad, Nonce};
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let (&version, rest) = bytes.split_first()?;
    if version != LINK_V2 || rest.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let mut sealed = sealed.to_vec();
    let plain = link_key(secret)?
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).ok()?,
            Aad::from(LINK_AAD),
            &mut sealed,
        )
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

/// v1: the payload in the clear, HMAC-SHA256 over `v1:channel:address`.
fn verify_link_v1(secret: &[u8], token: &str) -> Option<String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, mac) = token.split_once('.')?;
    let payload = String::from_utf8(b64.decode(payload).ok()?).ok()?;
    let mac = b64.decode(mac).ok()?;
    let expected = hmac_sha256(secret, format!("v1:{payload}").as_bytes());
    constant_time_eq(&mac, &expected).then_some(payload)
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    // HMAC takes a key of any length, so `new_from_slice` never fails; the arm below only keeps
    // the function total without a panic (it cannot be reached).
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Sha256::digest([key, message].concat()).into();
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::Normaliser;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn links_are_opaque_verify_and_tampered_ones_do_not() {
        let n = Normaliser::new("TR").unwrap();
        let address = n.address(Channel::Email, "User@Example.com").unwrap();
        let token = sign_link(b"k", &address).unwrap();
        assert_eq!(
            verify_link(b"k", &token),
            Some((Channel::Email, "user@example.com".into()))
        );
        // Opaque: neither the address nor its base64 appears, and no two links are alike.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let raw = b64.decode(&token).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"user@example.com"));
        assert!(!token.contains(&b64.encode("email:user@example.com")[..12]));
        assert!(!token.contains('.'));
        assert_ne!(sign_link(b"k", &address).unwrap(), token);
        assert_eq!(verify_link(b"other key", &token), None);
        assert_eq!(verify_link(b"", &token), None);
        // Every byte is covered by the tag.
        for at in 0..raw.len() {
            let mut forged = raw.clone();
            forged[at] ^= 1;
            assert_eq!(verify_link(b"k", &b64.encode(&forged)), None, "byte {at}");
        }
        assert_eq!(verify_link(b"k", &b64.encode(&raw[..raw.len() - 1])), None);
        assert_eq!(verify_link(b"k", &format!("{token}x")), None);
        assert_eq!(verify_link(b"k", ""), None);
    }

    /// v1 tokens, signed but readable, were sent in messages before v2: they keep working
    /// (an unsubscribe link must work for as long as the message is read).
    #[test]
    fn v1_signed_links_still_verify_and_tampered_ones_do_not() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let v1 = |payload: &str| {
            let mac = hmac_sha256(b"k", format!("v1:{payload}").as_bytes());
            format!("{}.{}", b64.encode(payload), b64.encode(mac))
        };
        let token = v1("email:user@example.com");
        assert_eq!(
            verify_link(b"k", &token),
            Some((Channel::Email, "user@example.com".into()))
        );
        assert_eq!(verify_link(b"other key", &token), None);
        let (payload, mac) = token.split_once('.').unwrap();
        let forged = format!("{}.{mac}", b64.encode("email:victim@example.com"));
        assert_eq!(verify_link(b"k", &forged), None);
        assert_eq!(verify_link(b"k", payload), None);
        assert_eq!(verify_link(b"k", &format!("{token}x")), None);
    }
}
