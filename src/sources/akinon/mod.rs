//! Akinon Commerce, "Extension Subscription Gateway" (`docs/contracts/akinon-extension-subscription-gateway.md`): the three POST
//! endpoints decoded into envelopes, and how each projects (user and order snapshots, the
//! consent ledger). The HTTP side (auth, headers, error dialect, `unsubscribed-users`) is
//! [`crate::http::akinon`].

pub mod validate;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use self::validate::{FieldError, OrderInfo, SubscribeEmail, UserProfile};
use crate::{
    consent::{record_consent, Address, Channel, ConsentChange, ConsentState, Normaliser},
    delivery::event::{ContactView, Outbound},
    envelope::{Applied, ApplyContext, ApplyError, Change, Envelope},
    projection::apply_snapshot,
    store::{StoreError, StoreTx},
};

pub const SOURCE: &str = "akinon";
/// Record kinds.
pub const USER: &str = "akinon.user";
pub const ORDER: &str = "akinon.order";
/// Email subscriptions from `subscribe-email`, keyed by normalised email (holds the domain).
pub const EMAIL_SUBSCRIPTION: &str = "akinon.email_subscription";
/// The form Commerce last sent an address in, keyed `email:<normalised>` / `phone:<E.164>`:
/// `unsubscribed-users` answers in that form.
pub const ADDRESS_FORM: &str = "akinon.address_form";
/// Link kind: order pk → user pk.
pub const ORDER_USER: &str = "akinon.order.user";

/// The three POST endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    SubscribeEmail,
    SubscribeUser,
    OrderInfo,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::SubscribeEmail => "/subscribe-email",
            Endpoint::SubscribeUser => "/subscribe-user",
            Endpoint::OrderInfo => "/order-info",
        }
    }

    pub fn name(self) -> &'static str {
        &self.path()[1..]
    }

    pub(crate) fn event_kind(self) -> &'static str {
        match self {
            Endpoint::SubscribeEmail => "email.subscribed",
            Endpoint::SubscribeUser => "user.changed",
            Endpoint::OrderInfo => "order.changed",
        }
    }
}

/// What the HTTP layer knows about a call, besides its body.
#[derive(Debug, Clone)]
pub struct CallMeta {
    pub request_id: String,
    /// The credential (user name) that authenticated the call.
    pub credential: String,
}

/// Validate a POST body and turn it into an envelope. The dedupe key is endpoint + request id +
/// body hash: a retried call is a duplicate, a new request id is a new event.
pub fn decode(
    endpoint: Endpoint,
    body: Vec<u8>,
    call: &CallMeta,
    normaliser: &Normaliser,
) -> Result<Envelope, DecodeError> {
    let object = validate::parse_object(&body).map_err(DecodeError::Json)?;
    let received_at = crate::clock::now_ms();
    let (entity, occurred_at, change) = match endpoint {
        Endpoint::SubscribeEmail => {
            let s = validate::subscribe_email(&object, normaliser).map_err(DecodeError::Fields)?;
            (s.email.normalised.clone(), None, Akinon::Email(s))
        }
        Endpoint::SubscribeUser => {
            let u = validate::subscribe_user(&object, normaliser).map_err(DecodeError::Fields)?;
            (u.pk.clone(), Some(u.modified_at), Akinon::User(u))
        }
        Endpoint::OrderInfo => {
            let o = validate::order_info(&object, normaliser).map_err(DecodeError::Fields)?;
            (
                o.pk.clone(),
                Some(o.user.modified_at),
                Akinon::Order(o, normaliser.clone()),
            )
        }
    };
    let dedupe_key = format!(
        "akinon:{}:{}:{}",
        endpoint.name(),
        call.request_id,
        hex::encode(Sha256::digest(&body))
    );
    Ok(Envelope {
        source: SOURCE,
        kind: endpoint.event_kind().to_owned(),
        entity,
        dedupe_key,
        occurred_at,
        received_at,
        raw: body,
        meta: json!({
            "transport": "http",
            "endpoint": endpoint.path(),
            "request_id": call.request_id,
            "credential": call.credential,
        }),
        change: Box::new(change),
    })
}

/// Why a body cannot become an envelope.
#[derive(Debug)]
pub enum DecodeError {
    Json(String),
    Fields(Vec<FieldError>),
}

/// A decoded Akinon call and how it projects.
enum Akinon {
    Email(SubscribeEmail),
    User(UserProfile),
    /// With the normaliser that reads the stored user back for the contact view.
    Order(OrderInfo, Normaliser),
}

impl Change for Akinon {
    /// The call's canonical data, and the contact view of the person it is about. An order's
    /// contact is the *stored* user (its embedded copy may be older than what is stored and
    /// then changes nothing); the consents come from the ledger (the pipeline sets them).
    fn outbound(&self, tx: &mut dyn StoreTx) -> Result<Option<Outbound>, StoreError> {
        Ok(Some(match self {
            Akinon::Email(s) => Outbound {
                record: "email",
                data: json!({ "email": s.email.as_sent, "domain": s.domain }),
                contact: Some(ContactView {
                    email: Some(s.email.normalised.clone()),
                    ..Default::default()
                }),
            },
            Akinon::User(u) => Outbound {
                record: "user",
                data: u.doc.clone(),
                contact: Some(user_contact(u)),
            },
            Akinon::Order(o, normaliser) => {
                let mut data = o.doc.clone();
                data["user"] = o.user.doc.clone();
                let stored = tx.get_record(USER, &o.user.pk)?;
                let user = stored
                    .as_ref()
                    .filter(|r| r.doc != o.user.doc)
                    .and_then(|r| r.doc.as_object())
                    .and_then(|doc| validate::subscribe_user(doc, normaliser).ok());
                Outbound {
                    record: "order",
                    data,
                    contact: Some(user_contact(user.as_ref().unwrap_or(&o.user))),
                }
            }
        }))
    }

    fn apply(&self, tx: &mut dyn StoreTx, ctx: &ApplyContext) -> Result<Applied, ApplyError> {
        match self {
            Akinon::Email(s) => apply_subscribe_email(tx, s, ctx),
            Akinon::User(u) => apply_user(tx, u, ctx),
            Akinon::Order(o, _) => {
                // Orders carry no modification time: change detection only, last call wins.
                let order_ctx = ApplyContext {
                    occurred_at: None,
                    ..*ctx
                };
                let order = apply_snapshot(tx, ORDER, &o.pk, &o.doc, &order_ctx)?;
                if order == Applied::Changed {
                    tx.replace_links(ORDER_USER, &o.pk, std::slice::from_ref(&o.user.pk))?;
                }
                let user = apply_user(tx, &o.user, ctx)?;
                Ok(combine(order, user))
            }
        }
    }
}

/// An Akinon user as a contact: names, email, phone as sent (and in E.164), birth date, gender
/// (`M`/`F` → `male`/`female`, anything else as sent). No consent: the ledger has the last word.
fn user_contact(u: &UserProfile) -> ContactView {
    let text = |key: &str| {
        u.doc[key]
            .as_str()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
    };
    ContactView {
        email: Some(u.email.normalised.clone()),
        phone: u.phone.as_ref().map(|p| p.as_sent.clone()),
        phone_e164: u.phone.as_ref().map(|p| p.normalised.clone()),
        first_name: text("firstName"),
        last_name: text("lastName"),
        birth_date: text("dateOfBirth").map(|d| d.chars().take(10).collect()),
        gender: text("gender").map(|g| match g.to_ascii_uppercase().as_str() {
            "M" | "MALE" => "male".to_owned(),
            "F" | "FEMALE" => "female".to_owned(),
            _ => g,
        }),
        ..ContactView::default()
    }
}

/// `Changed` if either changed, else `NoOp` (a stale embedded user does not make the order
/// stale).
fn combine(a: Applied, b: Applied) -> Applied {
    if a == Applied::Changed || b == Applied::Changed {
        Applied::Changed
    } else {
        Applied::NoOp
    }
}

fn apply_subscribe_email(
    tx: &mut dyn StoreTx,
    s: &SubscribeEmail,
    ctx: &ApplyContext,
) -> Result<Applied, ApplyError> {
    let doc = json!({ "email": s.email.as_sent, "domain": s.domain });
    let mut applied = apply_snapshot(
        tx,
        EMAIL_SUBSCRIPTION,
        &s.email.normalised,
        &doc,
        &ApplyContext {
            occurred_at: None,
            ..*ctx
        },
    )?;
    // The call carries no time of its own: the opt-in happened when it arrived.
    let consent = record_consent(
        tx,
        &ConsentChange {
            address: &s.email,
            state: ConsentState::OptedIn,
            at: ctx.received_at,
            source: SOURCE,
        },
        ctx,
    )?;
    applied = combine(applied, consent);
    Ok(combine(applied, remember_form(tx, &s.email, ctx)?))
}

/// The user snapshot (by `modifiedDate`: an older one never overwrites a newer one), then its
/// consents at `modifiedDate`: email for the email, sms/call/whatsapp for the phone.
fn apply_user(
    tx: &mut dyn StoreTx,
    u: &UserProfile,
    ctx: &ApplyContext,
) -> Result<Applied, ApplyError> {
    let user_ctx = ApplyContext {
        occurred_at: Some(u.modified_at),
        ..*ctx
    };
    let mut applied = apply_snapshot(tx, USER, &u.pk, &u.doc, &user_ctx)?;
    if applied == Applied::Stale {
        return Ok(Applied::Stale);
    }
    let mut consents: Vec<(Address, bool)> = vec![(u.email.clone(), u.email_allowed)];
    if let Some(phone) = &u.phone {
        for (channel, allowed) in [
            (Channel::Sms, u.sms_allowed),
            (Channel::Call, u.call_allowed),
            (Channel::Whatsapp, u.whatsapp_allowed),
        ] {
            consents.push((
                Address {
                    channel,
                    ..phone.clone()
                },
                allowed,
            ));
        }
    }
    for (address, allowed) in &consents {
        let consent = record_consent(
            tx,
            &ConsentChange {
                address,
                state: ConsentState::from_allowed(*allowed),
                at: u.modified_at,
                source: SOURCE,
            },
            ctx,
        )?;
        applied = combine(applied, consent);
    }
    applied = combine(applied, remember_form(tx, &u.email, ctx)?);
    if let Some(phone) = &u.phone {
        applied = combine(applied, remember_form(tx, phone, ctx)?);
    }
    Ok(applied)
}

/// The key of an address in [`ADDRESS_FORM`]: one per email and one per phone number (whatever
/// the channel).
pub fn form_key(address: &Address) -> String {
    if address.channel.is_phone() {
        format!("phone:{}", address.normalised)
    } else {
        address.key()
    }
}

fn remember_form(
    tx: &mut dyn StoreTx,
    address: &Address,
    ctx: &ApplyContext,
) -> Result<Applied, ApplyError> {
    Ok(apply_snapshot(
        tx,
        ADDRESS_FORM,
        &form_key(address),
        &Value::String(address.as_sent.clone()),
        &ApplyContext {
            occurred_at: None,
            ..*ctx
        },
    )?)
}

/// The channels a user's consents live on, for the read API.
pub fn user_consent_keys(doc: &Value, normaliser: &Normaliser) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(Ok(email)) = doc["email"]
        .as_str()
        .map(|e| normaliser.address(Channel::Email, e))
    {
        keys.push(email.key());
    }
    if let Some(Ok(phone)) = doc["phone"]
        .as_str()
        .filter(|p| !p.trim().is_empty())
        .map(|p| normaliser.address(Channel::Sms, p))
    {
        for channel in [Channel::Sms, Channel::Call, Channel::Whatsapp] {
            keys.push(
                Address {
                    channel,
                    ..phone.clone()
                }
                .key(),
            );
        }
    }
    keys
}
