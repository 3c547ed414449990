//! Loymax bodies → typed events. The event is named by `eventCode`; the routing key is used only
//! when the body has none. Identities are read under every spelling the document uses
//! (`customerUid`/`customerCode`, `accountgroupId`/`accountfroupId`, …); what an event cannot do
//! without (a member, a card, its target state) is a [`Rejection`] with a stable code.

use serde_json::{json, Map, Value};

use super::{
    amount::Amount,
    json::{field, flag, id_text, nested, present},
};
use crate::{
    consent::{Address, Channel, Normaliser},
    sources::amqp::Rejection,
};

/// The member an event is about, as `customerInfo` names it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberRef {
    pub customer_id: Option<String>,
    /// `customerUid`, or `customerCode` (the document uses both for the member's uid).
    pub uid: Option<String>,
    pub account_group_id: Option<String>,
    pub mobile_device_id: Option<Value>,
    pub identifier_id: Option<Value>,
    pub application_id: Option<Value>,
}

impl MemberRef {
    /// `None` when the object names no member (neither `customerId` nor a uid).
    pub fn read(info: &Map<String, Value>) -> Option<Self> {
        let customer_id = id_text(field(info, &["customerId"]));
        let uid = id_text(field(info, &["customerUid", "customerCode"]));
        if customer_id.is_none() && uid.is_none() {
            return None;
        }
        Some(Self {
            customer_id,
            uid,
            account_group_id: id_text(field(
                info,
                &["accountgroupId", "accountfroupId", "accountGroupId"],
            )),
            mobile_device_id: present(info.get("mobileDeviceId")),
            identifier_id: present(info.get("identifierId")),
            application_id: present(info.get("applicationId")),
        })
    }

    /// The identity used as the inbox entity: the customer id, else the uid.
    pub fn entity(&self) -> String {
        self.customer_id
            .clone()
            .or_else(|| self.uid.clone())
            .unwrap_or_default()
    }
}

/// A card as events name it: by `cardId`, `cardNumber`, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct CardRef {
    pub id: Option<String>,
    pub number: Option<String>,
}

impl CardRef {
    fn read(object: &Map<String, Value>) -> Option<Self> {
        let id = id_text(field(object, &["cardId"]));
        let number = id_text(field(object, &["cardNumber"]));
        (id.is_some() || number.is_some()).then_some(Self { id, number })
    }

    pub fn entity(&self) -> String {
        self.id
            .clone()
            .or_else(|| self.number.clone())
            .unwrap_or_default()
    }
}

/// What a card model (`newCard`, `oldCard`, `cardInfo`) says about the card.
#[derive(Debug, Clone, PartialEq)]
pub struct CardSnapshot {
    pub card: CardRef,
    pub state: Option<String>,
    pub activation_date: Option<String>,
    pub card_type: Option<String>,
    pub category: Option<String>,
    pub blocked: Option<bool>,
    pub deleted: Option<bool>,
}

impl CardSnapshot {
    fn read(object: &Map<String, Value>) -> Option<Self> {
        Some(Self {
            card: CardRef::read(object)?,
            state: id_text(field(object, &["cardState"])),
            activation_date: id_text(field(object, &["activationDate"])),
            card_type: id_text(field(object, &["cardType"])),
            category: id_text(field(object, &["cardCategory"])),
            blocked: flag(field(object, &["isBlocked"])),
            deleted: flag(field(object, &["isDeleted"])),
        })
    }
}

/// What an `Email`/`Phone` attribute update does to the member's known address.
#[derive(Debug, Clone, PartialEq)]
pub enum AddressUpdate {
    /// Not an address attribute.
    None,
    /// The address is now this one.
    Known(Address),
    /// The value is empty, or not a usable address: the member has no known address for this
    /// channel any more.
    Cleared(Channel),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttributeUpdate {
    pub member: MemberRef,
    pub code: String,
    pub value: Value,
    pub old_value: Value,
    pub attribute_id: Option<String>,
    pub attribute_type: Option<String>,
    pub from_batch: Option<bool>,
    pub address: AddressUpdate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionChange {
    pub member: MemberRef,
    /// The mailing type the channels belong to (`mailingSubscriptionType`, else the
    /// subscription type's code, else its id).
    pub mailing_type: String,
    pub type_id: Option<String>,
    pub type_code: Option<String>,
    pub type_name: Option<String>,
    /// `subscriptionInfo` as sent: channel → `Enabled` | `Disabled` (other values kept).
    pub channels: Vec<(String, Value)>,
}

/// A purchase or a refund.
#[derive(Debug, Clone, PartialEq)]
pub struct PurchaseOperation {
    pub member: MemberRef,
    /// `purchaseId`, else `external:` + `externalPurchaseId`.
    pub id: String,
    pub amount: Option<Amount>,
    /// Refunds: the purchase they refund, when named by id.
    pub refunded_purchase_id: Option<String>,
    /// The record stored for it (ids, cheque, amount as sent, items, rewards, withdraws, time).
    pub doc: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Registration {
        member: MemberRef,
        completed: bool,
    },
    CardLink {
        member: MemberRef,
        link_type: String,
        replace: bool,
        link_source: Option<String>,
        new_card: CardSnapshot,
        old_card: Option<CardSnapshot>,
    },
    Merge {
        from: MemberRef,
        to: MemberRef,
    },
    CardActivation {
        member: Option<MemberRef>,
        card: CardSnapshot,
    },
    CardBlock {
        member: Option<MemberRef>,
        card: CardRef,
        blocked: bool,
    },
    CardDelete {
        member: Option<MemberRef>,
        card: CardRef,
        deleted: bool,
    },
    CardCategory {
        member: Option<MemberRef>,
        card: CardRef,
        category: String,
    },
    Attribute(AttributeUpdate),
    Subscription(SubscriptionChange),
    Purchase(Box<PurchaseOperation>),
    Refund(Box<PurchaseOperation>),
    /// An event type this version does not know: stored, counted, never dead-lettered.
    Unknown {
        member: Option<MemberRef>,
    },
}

impl Event {
    /// The inbox `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Registration {
                completed: false, ..
            } => "registration.started",
            Event::Registration {
                completed: true, ..
            } => "registration.completed",
            Event::CardLink { replace: true, .. } => "card.replaced",
            Event::CardLink { .. } => "card.linked",
            Event::Merge { .. } => "member.merged",
            Event::CardActivation { .. } => "card.activated",
            Event::CardBlock { blocked: true, .. } => "card.blocked",
            Event::CardBlock { .. } => "card.unblocked",
            Event::CardDelete { deleted: true, .. } => "card.deleted",
            Event::CardDelete { .. } => "card.restored",
            Event::CardCategory { .. } => "card.category_changed",
            Event::Attribute(_) => "member.attribute_updated",
            Event::Subscription(_) => "member.subscription_changed",
            Event::Purchase(_) => "purchase.confirmed",
            Event::Refund(_) => "purchase.refunded",
            Event::Unknown { .. } => "unknown",
        }
    }

    /// The inbox `entity`: the member, else the card.
    pub fn entity(&self) -> String {
        match self {
            Event::Registration { member, .. } | Event::CardLink { member, .. } => member.entity(),
            Event::Merge { from, .. } => from.entity(),
            Event::CardActivation { member, card } => member
                .as_ref()
                .map_or_else(|| card.card.entity(), MemberRef::entity),
            Event::CardBlock { member, card, .. }
            | Event::CardDelete { member, card, .. }
            | Event::CardCategory { member, card, .. } => member
                .as_ref()
                .map_or_else(|| card.entity(), MemberRef::entity),
            Event::Attribute(a) => a.member.entity(),
            Event::Subscription(s) => s.member.entity(),
            Event::Purchase(p) | Event::Refund(p) => p.member.entity(),
            Event::Unknown { member } => member.as_ref().map(MemberRef::entity).unwrap_or_default(),
        }
    }

    /// The member the event is about, when it names one (a merge: the surviving profile).
    pub fn member(&self) -> Option<&MemberRef> {
        match self {
            Event::Registration { member, .. } | Event::CardLink { member, .. } => Some(member),
            Event::Merge { to, .. } => Some(to),
            Event::CardActivation { member, .. }
            | Event::CardBlock { member, .. }
            | Event::CardDelete { member, .. }
            | Event::CardCategory { member, .. }
            | Event::Unknown { member } => member.as_ref(),
            Event::Attribute(a) => Some(&a.member),
            Event::Subscription(s) => Some(&s.member),
            Event::Purchase(p) | Event::Refund(p) => Some(&p.member),
        }
    }

    /// The kind of record [`Event::entity`] names: `member`, or `card` for a card event that
    /// names no member.
    pub fn record_kind(&self) -> &'static str {
        match self {
            Event::CardActivation { member: None, .. }
            | Event::CardBlock { member: None, .. }
            | Event::CardDelete { member: None, .. }
            | Event::CardCategory { member: None, .. } => "card",
            _ => "member",
        }
    }

    /// Events that set state (rather than accumulate it): when their dedupe key is only the
    /// content, the same bytes seen again after a different event are applied again by change
    /// detection (block → unblock → block ends blocked).
    pub fn sets_state(&self) -> bool {
        !matches!(
            self,
            Event::Purchase(_) | Event::Refund(_) | Event::Unknown { .. }
        )
    }
}

/// The event types of the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    BeginRegistration,
    EndRegistration,
    CardLink,
    Merge,
    CardActivation,
    CardBlock,
    CardDelete,
    CardCategory,
    Attribute,
    Subscription,
    Purchase,
    Refund,
    Unknown,
}

fn type_of_code(code: &str) -> EventType {
    match code.trim().to_ascii_lowercase().as_str() {
        "onbeginregistration" => EventType::BeginRegistration,
        "onendregistration" => EventType::EndRegistration,
        // The issue names the linking events by their `linkCardType` too.
        "oncardreplace" | "attachcard" | "setcard" | "replacecard" | "onattachcard"
        | "onsetcard" => EventType::CardLink,
        "mergecustomersprofiles" => EventType::Merge,
        "oncardactivation" => EventType::CardActivation,
        "onblockcard" => EventType::CardBlock,
        "ondeletecard" => EventType::CardDelete,
        "onchangecategorycard" => EventType::CardCategory,
        "oncustomerattributeupdate" => EventType::Attribute,
        "oncustomersubscriptionchange" => EventType::Subscription,
        "onpurchaseconfirm" => EventType::Purchase,
        "onpurchaserefund" => EventType::Refund,
        _ => EventType::Unknown,
    }
}

/// The document prints the card-category key with a Cyrillic `с` (U+0441); read both.
pub fn normalise_routing_key(key: &str) -> String {
    key.replace('\u{0441}', "c")
}

fn type_of_routing_key(key: &str) -> EventType {
    match normalise_routing_key(key).as_str() {
        "customer.registration.begin" => EventType::BeginRegistration,
        "customer.registration.finish" => EventType::EndRegistration,
        "customer.card.link" => EventType::CardLink,
        "customer.profile.merge" => EventType::Merge,
        "customer.card.changeState" => EventType::CardActivation,
        "customer.card.changeBlockState" => EventType::CardBlock,
        "customer.card.changeDeleteState" => EventType::CardDelete,
        "customer.card.changeCategory" => EventType::CardCategory,
        "customer.attribute.update" => EventType::Attribute,
        "customer.subscription.update" => EventType::Subscription,
        "purchases.confirm.modelUpdate" => EventType::Purchase,
        "purchases.refundModelUpdate" => EventType::Refund,
        _ => EventType::Unknown,
    }
}

/// A decoded body.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub event: Event,
    /// `eventCode` as sent (`None` when missing: the routing key named the event).
    pub event_code: Option<String>,
    /// Unix ms the payload says the event happened, when it does.
    pub occurred_at: Option<i64>,
    /// What was odd but tolerated.
    pub flags: Vec<&'static str>,
}

fn missing(code: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection::new(code, detail)
}

fn required_member(object: &Map<String, Value>, key: &str) -> Result<MemberRef, Rejection> {
    nested(object, &[key])
        .and_then(MemberRef::read)
        .ok_or_else(|| {
            missing(
                "missing_member",
                format!("`{key}` names no member (no customerId, customerUid or customerCode)"),
            )
        })
}

fn optional_member(object: &Map<String, Value>) -> Option<MemberRef> {
    nested(object, &["customerInfo"]).and_then(MemberRef::read)
}

/// The card of a card-state event: under `cardInfo` (activation, block) or at the top level
/// (delete, category).
fn card_ref(object: &Map<String, Value>) -> Result<CardRef, Rejection> {
    nested(object, &["cardInfo"])
        .and_then(CardRef::read)
        .or_else(|| CardRef::read(object))
        .ok_or_else(|| missing("missing_card", "no cardId or cardNumber"))
}

/// A payload time: RFC 3339, or an ISO date-time without offset read as UTC.
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// Decode a body (already known to be a JSON object) received with `routing_key`.
pub fn decode(
    object: &Map<String, Value>,
    routing_key: &str,
    normaliser: &Normaliser,
) -> Result<Decoded, Rejection> {
    let event_code = id_text(field(object, &["eventCode"]));
    let event_type = match &event_code {
        Some(code) => type_of_code(code),
        None => type_of_routing_key(routing_key),
    };
    let mut flags = Vec::new();
    if event_code.is_none() {
        flags.push("event_code_missing");
    }
    let mut occurred_at = None;
    let mut time_of = |text: Option<String>, flags: &mut Vec<&'static str>| {
        if let Some(text) = text {
            match parse_time(&text) {
                Some(ms) => occurred_at = Some(ms),
                None => flags.push("time_unparseable"),
            }
        }
    };
    let event = match event_type {
        EventType::BeginRegistration | EventType::EndRegistration => Event::Registration {
            member: required_member(object, "customerInfo")?,
            completed: event_type == EventType::EndRegistration,
        },
        EventType::CardLink => {
            let new_card = nested(object, &["newCard"])
                .and_then(CardSnapshot::read)
                .ok_or_else(|| missing("missing_card", "`newCard` has no cardId or cardNumber"))?;
            let mut old_card = nested(object, &["oldCard"]).and_then(CardSnapshot::read);
            let link_type = id_text(field(object, &["linkCardType"]))
                .or_else(|| {
                    event_code
                        .as_deref()
                        .map(|c| match c.to_ascii_lowercase().as_str() {
                            "oncardreplace" | "replacecard" => "ReplaceCard".to_owned(),
                            "attachcard" | "onattachcard" => "AttachCard".to_owned(),
                            _ => "SetCard".to_owned(),
                        })
                })
                .unwrap_or_else(|| {
                    if old_card.is_some() {
                        "ReplaceCard"
                    } else {
                        "SetCard"
                    }
                    .to_owned()
                });
            let replace = link_type.eq_ignore_ascii_case("ReplaceCard");
            match &mut old_card {
                // A replaced card is `Replaced`, whatever state its model was captured in.
                Some(old) if replace => old.state = Some("Replaced".to_owned()),
                None if replace => flags.push("replace_without_old_card"),
                _ => {}
            }
            Event::CardLink {
                member: required_member(object, "customerInfo")?,
                replace,
                link_source: id_text(field(object, &["linkSource"])),
                link_type,
                new_card,
                old_card,
            }
        }
        EventType::Merge => Event::Merge {
            from: required_member(object, "fromCustomerInfo")?,
            to: required_member(object, "toCustomerInfo")?,
        },
        EventType::CardActivation => {
            let info = nested(object, &["cardInfo"]);
            let mut card = info
                .and_then(CardSnapshot::read)
                .or_else(|| CardSnapshot::read(object))
                .ok_or_else(|| missing("missing_card", "no cardId or cardNumber"))?;
            // The event's target state wins over the card model's; an activation without
            // either still means "Activated".
            card.state = id_text(field(object, &["targetState"]))
                .or(card.state)
                .or_else(|| Some("Activated".to_owned()));
            time_of(card.activation_date.clone(), &mut flags);
            Event::CardActivation {
                member: optional_member(object),
                card,
            }
        }
        EventType::CardBlock => Event::CardBlock {
            card: card_ref(object)?,
            blocked: flag(field(object, &["targetBlockState"])).ok_or_else(|| {
                missing("missing_field", "`targetBlockState` is not true or false")
            })?,
            member: optional_member(object),
        },
        EventType::CardDelete => Event::CardDelete {
            card: card_ref(object)?,
            deleted: flag(field(object, &["targetDeleteState"])).ok_or_else(|| {
                missing("missing_field", "`targetDeleteState` is not true or false")
            })?,
            member: optional_member(object),
        },
        EventType::CardCategory => Event::CardCategory {
            card: card_ref(object)?,
            category: id_text(field(
                object,
                &["newcardCategory", "newCardCategory", "cardCategory"],
            ))
            .ok_or_else(|| missing("missing_field", "no `newcardCategory`"))?,
            member: optional_member(object),
        },
        EventType::Attribute => {
            let member = required_member(object, "customerInfo")?;
            let code = id_text(field(object, &["attributeCode"]))
                .ok_or_else(|| missing("missing_field", "no `attributeCode`"))?;
            let value = object.get("newValue").cloned().unwrap_or(Value::Null);
            let address = address_update(&code, &value, normaliser, &mut flags);
            time_of(id_text(field(object, &["changeDateTime"])), &mut flags);
            Event::Attribute(AttributeUpdate {
                member,
                code,
                value,
                old_value: object.get("oldValue").cloned().unwrap_or(Value::Null),
                attribute_id: id_text(field(object, &["attributeId"])),
                attribute_type: id_text(field(object, &["userAttributeType"])),
                from_batch: flag(field(object, &["fromBatchOperation"])),
                address,
            })
        }
        EventType::Subscription => {
            let member = required_member(object, "customerInfo")?;
            let info = nested(object, &["subscriptionInfo"])
                .ok_or_else(|| missing("missing_field", "no `subscriptionInfo` object"))?;
            let type_id = id_text(field(object, &["subscriptionTypeId"]));
            let type_code = id_text(field(object, &["subscriptionTypeCode"]));
            let mailing_type = id_text(field(object, &["mailingSubscriptionType"]))
                .or_else(|| type_code.clone())
                .or_else(|| type_id.clone())
                .unwrap_or_else(|| "default".to_owned());
            Event::Subscription(SubscriptionChange {
                member,
                mailing_type,
                type_id,
                type_code,
                type_name: id_text(field(object, &["subscriptionTypeName"])),
                channels: info
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        }
        EventType::Purchase | EventType::Refund => {
            let refund = event_type == EventType::Refund;
            let operation = purchase(object, refund, &mut flags)?;
            time_of(
                operation.doc["date_time"].as_str().map(str::to_owned),
                &mut flags,
            );
            if refund {
                Event::Refund(Box::new(operation))
            } else {
                Event::Purchase(Box::new(operation))
            }
        }
        EventType::Unknown => Event::Unknown {
            member: optional_member(object),
        },
    };
    Ok(Decoded {
        event,
        event_code,
        occurred_at,
        flags,
    })
}

fn address_update(
    code: &str,
    value: &Value,
    normaliser: &Normaliser,
    flags: &mut Vec<&'static str>,
) -> AddressUpdate {
    let channel = if code.eq_ignore_ascii_case("Email") {
        Channel::Email
    } else if code.eq_ignore_ascii_case("Phone") {
        Channel::Sms
    } else {
        return AddressUpdate::None;
    };
    let Some(text) = id_text(Some(value)) else {
        return AddressUpdate::Cleared(channel);
    };
    match normaliser.address(channel, &text) {
        Ok(address) => AddressUpdate::Known(address),
        Err(_) => {
            flags.push("address_unusable");
            AddressUpdate::Cleared(channel)
        }
    }
}

/// Keys of `purchaseData` read into named fields; anything else is kept under `extra`.
const PURCHASE_DATA_FIELDS: &[&str] = &[
    "purchaseId",
    "externalPurchaseId",
    "chequeNumber",
    "amount",
    "currencyExternalId",
    "currencyDeviceExternalId",
    "chequeItems",
    "withdraws",
    "rewards",
    "isRefund",
    "purchaseAttributes",
];

fn purchase(
    object: &Map<String, Value>,
    refund: bool,
    flags: &mut Vec<&'static str>,
) -> Result<PurchaseOperation, Rejection> {
    let member = required_member(object, "customerInfo")?;
    let info_key = if refund {
        "refundOperationInfo"
    } else {
        "purchaseOperationInfo"
    };
    let info = nested(object, &[info_key])
        .ok_or_else(|| missing("missing_field", format!("no `{info_key}` object")))?;
    let empty = Map::new();
    let data = nested(info, &["purchaseData"]).unwrap_or(&empty);
    let purchase_id = id_text(field(data, &["purchaseId"]));
    let external_id = id_text(field(data, &["externalPurchaseId"]));
    let id = purchase_id
        .clone()
        .or_else(|| external_id.as_ref().map(|e| format!("external:{e}")))
        .ok_or_else(|| missing("missing_field", "no `purchaseId` or `externalPurchaseId`"))?;
    let amount_sent = field(data, &["amount"]).cloned();
    let amount = amount_sent.as_ref().and_then(Amount::from_json);
    match (&amount_sent, amount) {
        (None, _) => flags.push("amount_missing"),
        (Some(_), None) => flags.push("amount_unparseable"),
        _ => {}
    }
    let list = |key: &str| match data.get(key) {
        Some(Value::Array(items)) => Value::Array(items.clone()),
        _ => Value::Array(Vec::new()),
    };
    let operation: Map<String, Value> = info
        .iter()
        .filter(|(k, _)| k.as_str() != "purchaseData")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let extra: Map<String, Value> = data
        .iter()
        .filter(|(k, _)| !PURCHASE_DATA_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let refunded = nested(object, &["refundedPurchaseViewModel"]).unwrap_or(&empty);
    let refunded_purchase_id = id_text(field(refunded, &["refundedPurchaseId"]));
    let mut doc = json!({
        "purchase_id": purchase_id,
        "external_purchase_id": external_id,
        "cheque_number": id_text(field(data, &["chequeNumber"])),
        "amount": amount_sent,
        // Refunds name it `currencyDeviceExternalId`.
        "currency": id_text(field(data, &["currencyExternalId", "currencyDeviceExternalId"])),
        "date_time": id_text(field(info, &["dateTime"])),
        "is_refund": flag(field(data, &["isRefund"])),
        // The identifier presented at the till (a card number, a phone, …).
        "identity": id_text(field(info, &["identity"])),
        "items": list("chequeItems"),
        "withdraws": list("withdraws"),
        "rewards": list("rewards"),
        "attributes": list("purchaseAttributes"),
        "operation": operation,
        "extra": extra,
        "customer_id": member.entity(),
    });
    if refund {
        doc["refunded_purchase"] = json!({
            "purchase_id": refunded_purchase_id,
            "external_purchase_id": id_text(field(refunded, &["refundedPurchaseExternalId"])),
        });
        if refunded_purchase_id.is_none() {
            flags.push("refunded_purchase_id_missing");
        }
    }
    Ok(PurchaseOperation {
        member,
        id,
        amount,
        refunded_purchase_id,
        doc,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sources::loymax::json::parse_lenient;

    /// The document's example models (verbatim, line numbers stripped) and their routing keys.
    pub const SEEDS: &[(&str, &str)] = &[
        (
            "customer.registration.begin",
            include_str!("../../../tests/fixtures/loymax/registration_begin.json"),
        ),
        (
            "customer.registration.finish",
            include_str!("../../../tests/fixtures/loymax/registration_finish.json"),
        ),
        (
            "customer.card.link",
            include_str!("../../../tests/fixtures/loymax/card_link_replace.json"),
        ),
        (
            "customer.profile.merge",
            include_str!("../../../tests/fixtures/loymax/profile_merge.json"),
        ),
        (
            "customer.card.changeState",
            include_str!("../../../tests/fixtures/loymax/card_activation.json"),
        ),
        (
            "customer.card.changeBlockState",
            include_str!("../../../tests/fixtures/loymax/card_block.json"),
        ),
        (
            "customer.card.changeDeleteState",
            include_str!("../../../tests/fixtures/loymax/card_delete.json"),
        ),
        (
            "\u{0441}ustomer.card.changeCategory",
            include_str!("../../../tests/fixtures/loymax/card_category.json"),
        ),
        (
            "customer.attribute.update",
            include_str!("../../../tests/fixtures/loymax/attribute_update.json"),
        ),
        (
            "customer.subscription.update",
            include_str!("../../../tests/fixtures/loymax/subscription_update.json"),
        ),
        (
            "purchases.confirm.modelUpdate",
            include_str!("../../../tests/fixtures/loymax/purchase_confirm.json"),
        ),
        (
            "purchases.refundModelUpdate",
            include_str!("../../../tests/fixtures/loymax/purchase_refund.json"),
        ),
    ];

    pub fn normaliser() -> Normaliser {
        Normaliser::new("RU").unwrap()
    }

    pub fn decode_text(routing_key: &str, body: &str) -> Result<Decoded, Rejection> {
        let (value, _) = parse_lenient(body.as_bytes()).unwrap();
        decode(value.as_object().unwrap(), routing_key, &normaliser())
    }

    #[test]
    fn every_seed_example_decodes_to_its_event() {
        let kinds: Vec<&str> = SEEDS
            .iter()
            .map(|(key, body)| decode_text(key, body).unwrap().event.kind())
            .collect();
        assert_eq!(
            kinds,
            [
                "registration.started",
                "registration.completed",
                "card.replaced",
                "member.merged",
                "card.activated",
                "card.blocked",
                "card.deleted",
                "card.category_changed",
                "member.attribute_updated",
                "member.subscription_changed",
                "purchase.confirmed",
                "purchase.refunded",
            ]
        );
    }

    #[test]
    fn customer_code_and_uid_are_both_the_member_uid_and_accountfroup_is_accountgroup() {
        let begin = decode_text(SEEDS[0].0, SEEDS[0].1).unwrap();
        let Event::Registration { member, .. } = begin.event else {
            panic!("not a registration")
        };
        assert_eq!(member.customer_id.as_deref(), Some("121"));
        assert_eq!(
            member.uid.as_deref(),
            Some("aca52e1b-f08b-44a7-a77b-69ae0442ce7b")
        );
        assert_eq!(member.identifier_id, Some(serde_json::json!(826)));
        let purchase = decode_text(SEEDS[10].0, SEEDS[10].1).unwrap();
        let Event::Purchase(p) = purchase.event else {
            panic!("not a purchase")
        };
        assert_eq!(p.member.account_group_id.as_deref(), Some("111"));
        assert_eq!(
            p.member.uid.as_deref(),
            Some("6c0b4b64-ebd8-4397-a6f5-d6f3eb32cd2c")
        );
    }

    #[test]
    fn purchase_and_refund_keep_amounts_exact_and_texts_intact() {
        let purchase = decode_text(SEEDS[10].0, SEEDS[10].1).unwrap();
        assert_eq!(purchase.occurred_at, parse_time("2020-08-13T16:53:47Z"));
        let Event::Purchase(p) = purchase.event else {
            panic!("not a purchase")
        };
        assert_eq!(p.id, "512");
        assert_eq!(p.amount.unwrap().to_string(), "135.0000");
        let doc = serde_json::to_string(&p.doc).unwrap();
        assert!(doc.contains(r#""amount":135.0000"#), "{doc}");
        assert!(doc.contains(r#""1":-6.6700"#), "{doc}");
        assert!(doc.contains("Вода"), "{doc}");
        assert_eq!(p.doc["currency"], "718ae69b-76be-413f-ad19-7b7e02e4a438");
        assert_eq!(p.doc["cheque_number"], "123");

        let refund = decode_text(SEEDS[11].0, SEEDS[11].1).unwrap();
        let Event::Refund(r) = refund.event else {
            panic!("not a refund")
        };
        assert_eq!(
            (r.id.as_str(), r.refunded_purchase_id.as_deref()),
            ("513", Some("512"))
        );
        assert_eq!(r.amount.unwrap().to_string(), "100.0000");
        // `currencyDeviceExternalId` is read like `currencyExternalId`.
        assert_eq!(r.doc["currency"], "718ae69b-76be-413f-ad19-7b7e02e4a438");
    }

    #[test]
    fn the_routing_key_names_the_event_only_when_event_code_is_missing() {
        let body =
            r#"{"cardId": 39, "newcardCategory": "Gold", "customerInfo": {"customerId": 42}}"#;
        for key in [
            "customer.card.changeCategory",
            "\u{0441}ustomer.card.changeCategory",
        ] {
            let d = decode_text(key, body).unwrap();
            assert_eq!(d.event.kind(), "card.category_changed", "{key}");
            assert_eq!(d.flags, ["event_code_missing"]);
        }
        // eventCode wins: a block event published with the category key is a block.
        let block = r#"{"eventCode": "OnBlockCard", "targetBlockState": "false", "cardInfo": {"cardNumber": "7"}}"#;
        let d = decode_text("customer.card.changeCategory", block).unwrap();
        assert_eq!(d.event.kind(), "card.unblocked");
        let d = decode_text(
            "customer.card.changeCategory",
            r#"{"eventCode": "OnSomethingNew"}"#,
        )
        .unwrap();
        assert_eq!(d.event.kind(), "unknown");
        assert_eq!(d.event_code.as_deref(), Some("OnSomethingNew"));
    }

    #[test]
    fn events_missing_what_they_need_are_rejected_with_a_code() {
        let cases = [
            (
                "customer.registration.begin",
                r#"{"eventCode":"OnBeginRegistration"}"#,
                "missing_member",
            ),
            (
                "x",
                r#"{"eventCode":"OnEndRegistration","customerInfo":{"customerId":null,"customerCode":""}}"#,
                "missing_member",
            ),
            (
                "x",
                r#"{"eventCode":"MergeCustomersProfiles","fromCustomerInfo":{"customerId":1}}"#,
                "missing_member",
            ),
            (
                "x",
                r#"{"eventCode":"OnBlockCard","targetBlockState":true,"cardInfo":{}}"#,
                "missing_card",
            ),
            (
                "x",
                r#"{"eventCode":"OnBlockCard","cardInfo":{"cardId":1}}"#,
                "missing_field",
            ),
            (
                "x",
                r#"{"eventCode":"OnCardReplace","customerInfo":{"customerId":1}}"#,
                "missing_card",
            ),
            (
                "x",
                r#"{"eventCode":"OnPurchaseConfirm","customerInfo":{"customerId":1},"purchaseOperationInfo":{"purchaseData":{}}}"#,
                "missing_field",
            ),
            (
                "x",
                r#"{"eventCode":"OnCustomerAttributeUpdate","customerInfo":{"customerId":1}}"#,
                "missing_field",
            ),
        ];
        for (key, body, code) in cases {
            assert_eq!(decode_text(key, body).unwrap_err().code, code, "{body}");
        }
        // Unknown events need nothing.
        assert_eq!(
            decode_text("x", r#"{"eventCode":"OnNew"}"#)
                .unwrap()
                .event
                .kind(),
            "unknown"
        );
    }

    #[test]
    fn email_and_phone_attributes_give_normalised_addresses() {
        let phone = decode_text(SEEDS[8].0, SEEDS[8].1).unwrap();
        assert_eq!(phone.occurred_at, parse_time("2021-06-15T09:17:07Z"));
        let Event::Attribute(a) = phone.event else {
            panic!("not an attribute")
        };
        let AddressUpdate::Known(address) = a.address else {
            panic!("no address")
        };
        assert_eq!(
            (address.channel, address.normalised.as_str()),
            (Channel::Sms, "+79540286267")
        );
        let email = r#"{"eventCode":"OnCustomerAttributeUpdate","attributeCode":"Email","newValue":" A@B.ru ","customerInfo":{"customerId":1}}"#;
        let Event::Attribute(a) = decode_text("x", email).unwrap().event else {
            panic!("not an attribute")
        };
        assert!(matches!(a.address, AddressUpdate::Known(ref x) if x.normalised == "a@b.ru"));
        let bad = email.replace(" A@B.ru ", "nope");
        let d = decode_text("x", &bad).unwrap();
        assert_eq!(d.flags, ["address_unusable"]);
        let Event::Attribute(a) = d.event else {
            panic!("not an attribute")
        };
        assert_eq!(a.address, AddressUpdate::Cleared(Channel::Email));
    }
}
