//! The documents Loymax projections keep in the store (`records`), shared by the projection
//! and the read API. Times are RFC 3339 (UTC); each field that events may set out of order has
//! its time in `times`, so an older event never overwrites a newer one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::amount::Amount;
use crate::consent::ConsentState;

/// A loyalty-programme member (record kind [`super::MEMBER`], keyed by `customerId`).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberDoc {
    pub customer_id: String,
    pub uid: Option<String>,
    pub account_group_id: Option<String>,
    pub mobile_device_id: Option<Value>,
    pub identifier_id: Option<Value>,
    pub application_id: Option<Value>,
    pub registration: Registration,
    /// `attributeCode` → its latest value.
    pub attributes: BTreeMap<String, AttributeEntry>,
    /// From the `Email` and `Phone` attributes.
    pub addresses: Addresses,
    /// Mailing type → channel states.
    pub subscriptions: BTreeMap<String, SubscriptionEntry>,
    /// `email` / `sms` → the member's latest mail / sms consent; `pending` until the address is
    /// known, then applied to the consent ledger.
    pub consent: BTreeMap<String, ConsentEntry>,
    /// Card ids (keys of card records) linked to this member, in linking order.
    pub cards: Vec<String>,
    /// Set once this profile was merged into another: lookups lead there.
    pub merged_into: Option<String>,
    pub merged_at: Option<String>,
    /// Profiles merged into this one (directly or through them).
    pub merged_from: Vec<String>,
    pub purchases: Totals,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Registration {
    /// `started` | `completed`.
    pub status: Option<String>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttributeEntry {
    pub value: Value,
    pub old_value: Value,
    /// `changeDateTime` (else the AMQP timestamp, else when received).
    pub at: String,
    pub attribute_id: Option<String>,
    pub attribute_type: Option<String>,
    pub from_batch: Option<bool>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Addresses {
    pub email: Option<KnownAddress>,
    pub phone: Option<KnownAddress>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KnownAddress {
    pub as_sent: String,
    pub normalised: String,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscriptionEntry {
    pub type_id: Option<String>,
    pub type_code: Option<String>,
    pub type_name: Option<String>,
    /// `mail`, `push`, `sms`, `viber`, `chatBot`, `socialNetworks` → `Enabled` | `Disabled`.
    pub channels: BTreeMap<String, Value>,
    pub times: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentEntry {
    pub state: ConsentState,
    pub at: String,
    /// No address known yet: applied to the ledger when it becomes known.
    pub pending: bool,
}

/// Purchase totals; the net amount is `amount - refunded_amount`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub count: u64,
    pub amount: Amount,
    pub refunds: u64,
    pub refunded_amount: Amount,
}

impl Totals {
    pub fn net_amount(&self) -> Option<Amount> {
        self.amount.checked_sub(self.refunded_amount)
    }

    pub fn checked_add(&self, other: &Totals) -> Option<Totals> {
        Some(Totals {
            count: self.count.checked_add(other.count)?,
            amount: self.amount.checked_add(other.amount)?,
            refunds: self.refunds.checked_add(other.refunds)?,
            refunded_amount: self.refunded_amount.checked_add(other.refunded_amount)?,
        })
    }
}

/// A loyalty card (record kind [`super::CARD`], keyed by `cardId`, else `number:` + number).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CardDoc {
    pub card_id: Option<String>,
    pub number: Option<String>,
    /// The member (customer id) the card is linked to.
    pub member: Option<String>,
    pub state: Option<String>,
    pub activation_date: Option<String>,
    pub card_type: Option<String>,
    pub category: Option<String>,
    pub blocked: Option<bool>,
    pub deleted: Option<bool>,
    /// Replacement chain: the card that replaced this one, and the one this one replaced.
    pub replaced_by: Option<String>,
    pub replaces: Option<String>,
    pub link_type: Option<String>,
    pub link_source: Option<String>,
    /// Field → time of the event that set it.
    pub times: BTreeMap<String, String>,
}
