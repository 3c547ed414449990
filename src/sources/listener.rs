//! The ONAP/TMF service-order listener (`docs/contracts/onap-listener.md`): the hub (ONAP NBI) posts one
//! `Listener` notification per service-order event, once, asynchronously, with a fresh random
//! `eventId` every time; an item-state change carries only the changed item.
//!
//! - [`decode`] turns a request body into a [`Notification`], or says which field is wrong;
//! - a [`Notification`] projects itself ([`Change`]) into the order's record and its timeline
//!   through the state machine ([`decide`]): never backwards, item changes merge into the items;
//! - dedupe: the inbox key is the notification's *semantic* key (order id, eventType, order
//!   state, item ids and states), so a re-emission with a new `eventId` is a duplicate; the
//!   `eventId` itself is recorded as a marker record ([`EVENT_ID`]) so a replay is recognised
//!   and a reused `eventId` naming another notification is refused.
//!
//! The HTTP route and the error dialect live in `crate::http::listener`.

use std::cmp::Ordering;

use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{
    clock::to_rfc3339,
    envelope::{Applied, ApplyContext, ApplyError, Change, Envelope},
    projection::apply_snapshot,
    sources::erp::json_type,
    store::{content_hash, HistoryEntry, Record, StoreError, StoreTx},
};

pub const SOURCE: &str = "listener";
/// Record kind of a service order, and history kind of its timeline.
pub const SERVICE_ORDER: &str = "listener.service_order";
/// Record kind of the `eventId` markers: eventId → the notification (semantic key) it named.
pub const EVENT_ID: &str = "listener.event_id";

/// The three notifications of the document's `EventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Creation,
    StateChange,
    ItemStateChange,
}

impl EventType {
    pub const ALL: [EventType; 3] = [
        EventType::Creation,
        EventType::StateChange,
        EventType::ItemStateChange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Creation => "ServiceOrderCreationNotification",
            EventType::StateChange => "ServiceOrderStateChangeNotification",
            EventType::ItemStateChange => "ServiceOrderItemStateChangeNotification",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// The envelope kind of this notification.
    pub fn kind(self) -> &'static str {
        match self {
            EventType::Creation => "service_order.created",
            EventType::StateChange => "service_order.state_changed",
            EventType::ItemStateChange => "service_order.item_state_changed",
        }
    }
}

/// ONAP service-order (and order-item) states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OrderState {
    Acknowledged,
    Rejected,
    Pending,
    Held,
    InProgress,
    Cancelled,
    Completed,
    Failed,
    Partial,
}

impl OrderState {
    pub const ALL: [OrderState; 9] = [
        OrderState::Acknowledged,
        OrderState::Rejected,
        OrderState::Pending,
        OrderState::Held,
        OrderState::InProgress,
        OrderState::Cancelled,
        OrderState::Completed,
        OrderState::Failed,
        OrderState::Partial,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Acknowledged => "acknowledged",
            OrderState::Rejected => "rejected",
            OrderState::Pending => "pending",
            OrderState::Held => "held",
            OrderState::InProgress => "inProgress",
            OrderState::Cancelled => "cancelled",
            OrderState::Completed => "completed",
            OrderState::Failed => "failed",
            OrderState::Partial => "partial",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Progress rank: `acknowledged` 0; `pending`, `held`, `inProgress` 1 (an order moves
    /// between these both ways, so among them the newer `eventDate` wins); the final states
    /// `rejected`, `cancelled`, `completed`, `failed`, `partial` 2.
    pub fn rank(self) -> u8 {
        match self {
            OrderState::Acknowledged => 0,
            OrderState::Pending | OrderState::Held | OrderState::InProgress => 1,
            OrderState::Rejected
            | OrderState::Cancelled
            | OrderState::Completed
            | OrderState::Failed
            | OrderState::Partial => 2,
        }
    }

    pub fn is_final(self) -> bool {
        self.rank() == 2
    }
}

fn state_list() -> String {
    OrderState::ALL.map(OrderState::as_str).join(", ")
}

/// What a notification's state does to the current state of an order or an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move to the notified state.
    Apply,
    /// Already in that state.
    Same,
    /// Recorded, not applied. `why` is `backwards`, `final` or `stale`.
    Ignore { why: &'static str, detail: String },
}

/// The state machine. `current`: the state and the eventDate (Unix ms) of the notification
/// that set it; `incoming`: the notified state, dated `at`.
/// - a higher rank always applies (even with an older eventDate: that is progress, not regress);
/// - a lower rank never does (`backwards`);
/// - within rank 1 the newer eventDate wins (`stale` otherwise); a final state never changes
///   into another final state (`final`).
pub fn decide(
    current: Option<(OrderState, Option<i64>)>,
    incoming: OrderState,
    at: i64,
) -> Decision {
    let Some((current, since)) = current else {
        return Decision::Apply;
    };
    if current == incoming {
        return Decision::Same;
    }
    match incoming.rank().cmp(&current.rank()) {
        Ordering::Greater => Decision::Apply,
        Ordering::Less => Decision::Ignore {
            why: "backwards",
            detail: format!(
                "{} → {} would move backwards",
                current.as_str(),
                incoming.as_str()
            ),
        },
        Ordering::Equal if current.is_final() => Decision::Ignore {
            why: "final",
            detail: format!("already {}, a final state", current.as_str()),
        },
        Ordering::Equal => match since {
            Some(since) if at <= since => Decision::Ignore {
                why: "stale",
                detail: format!(
                    "eventDate {} is not newer than {} of the current state {}",
                    to_rfc3339(at),
                    to_rfc3339(since),
                    current.as_str()
                ),
            },
            _ => Decision::Apply,
        },
    }
}

/// Why a request body is not a usable notification. The HTTP layer maps each to the document's
/// `ErrorRepresentation` codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the request has no body: a Listener JSON object is expected")]
    MissingBody,
    #[error("{0}")]
    InvalidBody(String),
    #[error("{}", missing_message(.0))]
    MissingFields(Vec<&'static str>),
    #[error("body field `{field}` {problem}")]
    InvalidField {
        field: &'static str,
        problem: String,
    },
    #[error(transparent)]
    Functional(#[from] Functional),
}

fn missing_message(fields: &[&str]) -> String {
    let names: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
    match names.as_slice() {
        [one] => format!("body field {one} is required"),
        _ => format!("body fields {} are required", names.join(", ")),
    }
}

/// Functional errors (HTTP 422): a well-formed notification that cannot be applied. The message
/// names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Functional {
    /// `event.id` is missing or unusable: the notification names no service order.
    #[error("{0}")]
    NoServiceOrder(String),
    /// `event.state` is missing where required, or not an ONAP state.
    #[error("{0}")]
    InvalidOrderState(String),
    /// An item-state change without an item.
    #[error("{0}")]
    NoOrderItem(String),
    /// An order item that is not an object, has no id, repeats an id, or has a missing (where
    /// required) or unknown state.
    #[error("{0}")]
    InvalidOrderItem(String),
    /// The `eventId` was already recorded for a different notification.
    #[error("{0}")]
    EventIdConflict(String),
}

/// Prefix of the ingest rejection reason that carries an [`Functional::EventIdConflict`] found
/// inside the ingest transaction back to the HTTP layer.
const EVENT_ID_CONFLICT: &str = "event_id_conflict: ";

impl Functional {
    /// The functional error an ingest rejection reason carries, if it is one of ours (anything
    /// else is an internal failure).
    pub fn from_rejection(reason: &str) -> Option<Self> {
        reason
            .strip_prefix(EVENT_ID_CONFLICT)
            .map(|m| Functional::EventIdConflict(m.to_owned()))
    }
}

/// One decoded notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub event_id: String,
    pub event_type: EventType,
    /// `eventDate` as sent, and as Unix ms.
    pub event_date: String,
    pub event_ms: i64,
    pub order: OrderUpdate,
    /// The inbox dedupe key: what makes two notifications "the same" whatever their eventId.
    pub semantic_key: String,
    /// The Listener object as received: the `data` of the event forwarded to destinations.
    pub body: Value,
}

/// What a notification says about its service order.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderUpdate {
    pub id: String,
    pub state: Option<OrderState>,
    /// Every other property of `event` (href, externalId, orderDate, completionDateTime, and
    /// unknown ones), except `orderItem`.
    pub fields: Map<String, Value>,
    pub items: Vec<ItemUpdate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemUpdate {
    pub id: String,
    pub state: Option<OrderState>,
    /// Every other property of the item (action, service, …).
    pub fields: Map<String, Value>,
}

const REQUIRED: [&str; 4] = ["eventId", "eventDate", "eventType", "event"];

/// Decode a `Listener` body. Unknown properties are kept (in the order's fields, and always in
/// the raw bytes the inbox stores).
pub fn decode(body: &[u8]) -> Result<Notification, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::MissingBody);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| DecodeError::InvalidBody("the body is not UTF-8 text".into()))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| DecodeError::InvalidBody(format!("the body is not JSON: {e}")))?;
    let Value::Object(mut listener) = value else {
        return Err(DecodeError::InvalidBody(format!(
            "the body is a JSON {}, expected a Listener object",
            json_type(&value)
        )));
    };
    let body = Value::Object(listener.clone());
    let missing: Vec<&'static str> = REQUIRED
        .into_iter()
        .filter(|k| listener.get(*k).is_none_or(Value::is_null))
        .collect();
    if !missing.is_empty() {
        return Err(DecodeError::MissingFields(missing));
    }
    let event_id = match &listener["eventId"] {
        Value::String(s) if !s.trim().is_empty() => s.clone(),
        other => {
            return Err(invalid_field(
                "eventId",
                "must be a non-empty string",
                other,
            ))
        }
    };
    let (event_date, event_ms) = match &listener["eventDate"] {
        Value::String(s) => match parse_date_time(s) {
            Some(ms) => (s.clone(), ms),
            None => {
                return Err(invalid_field(
                    "eventDate",
                    DATE_TIME,
                    &listener["eventDate"],
                ))
            }
        },
        other => return Err(invalid_field("eventDate", DATE_TIME, other)),
    };
    let event_type = match listener["eventType"].as_str().and_then(EventType::parse) {
        Some(t) => t,
        None => {
            let expected = format!(
                "must be one of {}",
                EventType::ALL.map(EventType::as_str).join(", ")
            );
            return Err(invalid_field(
                "eventType",
                &expected,
                &listener["eventType"],
            ));
        }
    };
    let event = match listener.remove("event") {
        Some(Value::Object(event)) => event,
        other => {
            let other = other.unwrap_or(Value::Null);
            return Err(invalid_field(
                "event",
                "must be an object (the service order)",
                &other,
            ));
        }
    };
    let order = decode_order(event, event_type)?;
    let semantic_key = semantic_key(&order, event_type);
    Ok(Notification {
        event_id,
        event_type,
        event_date,
        event_ms,
        order,
        semantic_key,
        body,
    })
}

const DATE_TIME: &str = "must be an RFC 3339 date-time such as 2024-05-01T10:00:00.000Z";

/// RFC 3339, or the same with a `+hhmm` offset (as some Java serialisers write it). A date-time
/// without an offset is ambiguous and refused.
fn parse_date_time(text: &str) -> Option<i64> {
    let t = text.trim();
    DateTime::parse_from_rfc3339(t)
        .or_else(|_| DateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|d| d.timestamp_millis())
}

fn invalid_field(field: &'static str, expected: &str, got: &Value) -> DecodeError {
    DecodeError::InvalidField {
        field,
        problem: format!("{expected}; got {}", describe(got)),
    }
}

/// A value as an error message shows it: strings quoted (cut at 64 characters), others by type.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 64 => {
            format!("{:?}…", s.chars().take(64).collect::<String>())
        }
        Value::String(s) => format!("{s:?}"),
        other => format!("a JSON {}", json_type(other)),
    }
}

/// An id: a non-empty string, or an integer kept as its decimal text.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn decode_order(
    mut event: Map<String, Value>,
    event_type: EventType,
) -> Result<OrderUpdate, Functional> {
    let id = match event.remove("id") {
        None | Some(Value::Null) => {
            return Err(Functional::NoServiceOrder(
                "`event.id` is missing: the notification names no service order".into(),
            ))
        }
        Some(v) => id_text(&v).ok_or_else(|| {
            Functional::NoServiceOrder(format!(
                "`event.id` must be a non-empty string naming the service order; got {}",
                describe(&v)
            ))
        })?,
    };
    let state = match event.remove("state") {
        None | Some(Value::Null) if event_type == EventType::ItemStateChange => None,
        None | Some(Value::Null) => {
            return Err(Functional::InvalidOrderState(format!(
                "`event.state` is required in a {}",
                event_type.as_str()
            )))
        }
        Some(v) => Some(v.as_str().and_then(OrderState::parse).ok_or_else(|| {
            Functional::InvalidOrderState(format!(
                "`event.state` must be one of {}; got {}",
                state_list(),
                describe(&v)
            ))
        })?),
    };
    let items = match event.remove("orderItem") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            let mut items: Vec<ItemUpdate> = Vec::with_capacity(list.len());
            for (index, value) in list.into_iter().enumerate() {
                let item = decode_item(index, value, event_type)?;
                if items.iter().any(|i| i.id == item.id) {
                    return Err(Functional::InvalidOrderItem(format!(
                        "`event.orderItem[{index}].id` {} appears twice",
                        describe(&Value::String(item.id))
                    )));
                }
                items.push(item);
            }
            items
        }
        Some(other) => {
            return Err(Functional::InvalidOrderItem(format!(
                "`event.orderItem` must be an array; got {}",
                describe(&other)
            )))
        }
    };
    if event_type == EventType::ItemStateChange && items.is_empty() {
        return Err(Functional::NoOrderItem(format!(
            "a {} must carry the changed item in `event.orderItem`",
            event_type.as_str()
        )));
    }
    Ok(OrderUpdate {
        id,
        state,
        fields: event,
        items,
    })
}

fn decode_item(
    index: usize,
    value: Value,
    event_type: EventType,
) -> Result<ItemUpdate, Functional> {
    let at = format!("event.orderItem[{index}]");
    let Value::Object(mut fields) = value else {
        return Err(Functional::InvalidOrderItem(format!(
            "`{at}` must be an object; got {}",
            describe(&value)
        )));
    };
    let id = match fields.remove("id") {
        None | Some(Value::Null) => {
            return Err(Functional::InvalidOrderItem(format!(
                "`{at}.id` is missing"
            )))
        }
        Some(v) => id_text(&v).ok_or_else(|| {
            Functional::InvalidOrderItem(format!(
                "`{at}.id` must be a non-empty string; got {}",
                describe(&v)
            ))
        })?,
    };
    let state = match fields.remove("state") {
        None | Some(Value::Null) if event_type == EventType::ItemStateChange => {
            return Err(Functional::InvalidOrderItem(format!(
                "`{at}.state` is required in a {}",
                event_type.as_str()
            )))
        }
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_str().and_then(OrderState::parse).ok_or_else(|| {
            Functional::InvalidOrderItem(format!(
                "`{at}.state` must be one of {}; got {}",
                state_list(),
                describe(&v)
            ))
        })?),
    };
    Ok(ItemUpdate { id, state, fields })
}

/// `listener:` + JSON `[order id, eventType, order state, [[item id, item state], …]]`, items
/// sorted by id: readable, and unambiguous whatever the ids contain.
fn semantic_key(order: &OrderUpdate, event_type: EventType) -> String {
    let mut items: Vec<(&str, Option<&str>)> = order
        .items
        .iter()
        .map(|i| (i.id.as_str(), i.state.map(OrderState::as_str)))
        .collect();
    items.sort_unstable();
    let parts = json!([
        order.id,
        event_type.as_str(),
        order.state.map(OrderState::as_str),
        items
    ]);
    format!("{SOURCE}:{parts}")
}

impl Notification {
    /// The envelope of this notification. `transport` (credential label, scheme, …) is stored
    /// with the inbox row next to the eventId; `raw` is the body as received.
    pub fn into_envelope(self, raw: Vec<u8>, transport: Map<String, Value>) -> Envelope {
        let mut meta = Map::new();
        meta.insert("event_id".into(), Value::String(self.event_id.clone()));
        meta.insert("event_type".into(), self.event_type.as_str().into());
        meta.insert("event_date".into(), Value::String(self.event_date.clone()));
        meta.extend(transport);
        Envelope {
            source: SOURCE,
            kind: self.event_type.kind().to_owned(),
            entity: self.order.id.clone(),
            dedupe_key: self.semantic_key.clone(),
            occurred_at: Some(self.event_ms),
            received_at: crate::clock::now_ms(),
            raw,
            meta: Value::Object(meta),
            change: Box::new(self),
        }
    }

    fn event_id_marker(&self, ctx: &ApplyContext) -> Record {
        let doc = json!({
            "inbox_id": ctx.inbox_id,
            "order_id": self.order.id,
            "semantic_key": self.semantic_key,
        });
        Record {
            kind: EVENT_ID.into(),
            key: self.event_id.clone(),
            hash: content_hash(&doc),
            doc,
            occurred_at: Some(self.event_ms),
            changed_at: ctx.received_at,
            changed_by: ctx.inbox_id,
            seen_at: ctx.received_at,
            seen_by: ctx.inbox_id,
            version: 1,
        }
    }

    fn timeline_entry(&self, report: &Report, applied: Applied, ctx: &ApplyContext) -> Value {
        let outcome = match applied {
            Applied::Changed => "applied",
            Applied::Stale => "ignored",
            Applied::NoOp => "no_change",
        };
        json!({
            "event_id": self.event_id,
            "event_type": self.event_type.as_str(),
            "event_date": self.event_date,
            "received_at": to_rfc3339(ctx.received_at),
            "outcome": outcome,
            "changes": report.changes,
            "ignored": report.ignored,
        })
    }
}

impl Change for Notification {
    /// The notification as received; a service order is not about a person (no contact view).
    fn outbound(
        &self,
        _tx: &mut dyn StoreTx,
    ) -> Result<Option<crate::delivery::event::Outbound>, crate::store::StoreError> {
        Ok(Some(crate::delivery::event::Outbound {
            record: "service_order",
            data: self.body.clone(),
            contact: None,
        }))
    }

    fn apply(&self, tx: &mut dyn StoreTx, ctx: &ApplyContext) -> Result<Applied, ApplyError> {
        if let Some(marker) = tx.get_record(EVENT_ID, &self.event_id)? {
            if marker.doc["semantic_key"].as_str() == Some(self.semantic_key.as_str()) {
                // A replay of a notification already recorded.
                return Ok(Applied::NoOp);
            }
            // Found inside the transaction: it travels as the rejection reason, tagged so the
            // HTTP layer answers 422 ([`Functional::from_rejection`]) rather than 500.
            return Err(ApplyError::Invalid(format!(
                "{EVENT_ID_CONFLICT}`eventId` {:?} was already used by inbox event {} for a \
                 different notification",
                self.event_id, marker.doc["inbox_id"]
            )));
        }
        tx.put_record(&self.event_id_marker(ctx))?;

        let id = &self.order.id;
        let current = tx.get_record(SERVICE_ORDER, id)?;
        let (mut doc, seen_until) = match current {
            // Read from the document in place: no copy of it.
            Some(r) => (
                OrderDoc::deserialize(&r.doc).map_err(|e| {
                    StoreError::Failed(format!("stored service order {id:?} is unreadable: {e}"))
                })?,
                r.occurred_at,
            ),
            None => (OrderDoc::new(id), None),
        };
        let report = doc.merge(&self.order, self.event_ms);
        let doc = serde_json::to_value(&doc)
            .map_err(|e| StoreError::Failed(format!("cannot serialise service order: {e}")))?;
        // The merged document describes the order as of the newest eventDate seen: never stale
        // for the change detection (staleness was decided per state above).
        let as_of = ApplyContext {
            occurred_at: seen_until.max(Some(self.event_ms)),
            ..*ctx
        };
        let applied = match apply_snapshot(tx, SERVICE_ORDER, id, &doc, &as_of)? {
            Applied::NoOp if !report.ignored.is_empty() => Applied::Stale,
            other => other,
        };
        tx.append_history(&HistoryEntry {
            kind: SERVICE_ORDER.into(),
            key: id.clone(),
            at: self.event_ms,
            inbox_id: ctx.inbox_id,
            doc: self.timeline_entry(&report, applied, ctx),
        })?;
        Ok(applied)
    }

    /// A notification whose semantic key was seen before is applied again by change detection:
    /// the ingest pipeline keeps it only if it changes the order (inProgress → held →
    /// inProgress), and answers it as a duplicate otherwise.
    fn is_snapshot(&self) -> bool {
        true
    }
}

/// A service order as the store keeps it (the record document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderDoc {
    id: String,
    state: Option<OrderState>,
    /// eventDate (normalised to UTC) of the notification that set `state`.
    state_event_date: Option<String>,
    /// The order's other properties, merged from the notifications.
    order: Map<String, Value>,
    items: Vec<ItemDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ItemDoc {
    id: String,
    state: Option<OrderState>,
    state_event_date: Option<String>,
    item: Map<String, Value>,
}

/// What merging one notification did, for the timeline.
#[derive(Debug, Default)]
struct Report {
    changes: Vec<Value>,
    ignored: Vec<Value>,
}

/// The parts of an order or an item that notifications change.
struct Level<'a> {
    state: &'a mut Option<OrderState>,
    since: &'a mut Option<String>,
    fields: &'a mut Map<String, Value>,
}

impl OrderDoc {
    fn new(id: &str) -> Self {
        OrderDoc {
            id: id.to_owned(),
            state: None,
            state_event_date: None,
            order: Map::new(),
            items: Vec::new(),
        }
    }

    /// Merge a notification dated `at`: the order's state and fields, then each item it names
    /// (items it does not name are left as they are).
    fn merge(&mut self, update: &OrderUpdate, at: i64) -> Report {
        let mut report = Report::default();
        let order = Level {
            state: &mut self.state,
            since: &mut self.state_event_date,
            fields: &mut self.order,
        };
        order.merge(
            update.state,
            &update.fields,
            at,
            json!({ "target": "order" }),
            &mut report,
        );
        for incoming in &update.items {
            let target = json!({ "target": "item", "item_id": incoming.id });
            let index = match self.items.iter().position(|i| i.id == incoming.id) {
                Some(index) => index,
                None => {
                    self.items.push(ItemDoc {
                        id: incoming.id.clone(),
                        state: None,
                        state_event_date: None,
                        item: Map::new(),
                    });
                    report
                        .changes
                        .push(with(&target, "added", Value::Bool(true)));
                    self.items.len() - 1
                }
            };
            let item = &mut self.items[index];
            Level {
                state: &mut item.state,
                since: &mut item.state_event_date,
                fields: &mut item.item,
            }
            .merge(incoming.state, &incoming.fields, at, target, &mut report);
        }
        report
    }
}

impl Level<'_> {
    /// The state goes through [`decide`]. Fields from a notification at least as new as the
    /// current state, whose state was not ignored, overwrite; from any other, they only fill in
    /// properties not known yet.
    fn merge(
        self,
        incoming: Option<OrderState>,
        fields: &Map<String, Value>,
        at: i64,
        target: Value,
        report: &mut Report,
    ) {
        let since_ms = self.since.as_deref().and_then(parse_date_time);
        let mut overwrite = since_ms.is_none_or(|since| at >= since);
        if let Some(state) = incoming {
            match decide(self.state.map(|s| (s, since_ms)), state, at) {
                Decision::Apply => {
                    let mut change = with(&target, "from", json!(*self.state));
                    change["to"] = json!(state);
                    report.changes.push(change);
                    *self.state = Some(state);
                    *self.since = Some(to_rfc3339(at));
                    overwrite = true;
                }
                Decision::Same => {}
                Decision::Ignore { why, detail } => {
                    let mut ignored = with(&target, "state", json!(state));
                    ignored["current"] = json!(*self.state);
                    ignored["why"] = json!(why);
                    ignored["detail"] = json!(detail);
                    report.ignored.push(ignored);
                    overwrite = false;
                }
            }
        }
        let mut changed: Vec<&str> = Vec::new();
        for (key, value) in fields {
            let update = match self.fields.get(key) {
                None => true,
                Some(current) => overwrite && current != value,
            };
            if update {
                self.fields.insert(key.clone(), value.clone());
                changed.push(key);
            }
        }
        if !changed.is_empty() {
            report.changes.push(with(&target, "fields", json!(changed)));
        }
    }
}

/// `target` (an object) with one more property.
fn with(target: &Value, key: &str, value: Value) -> Value {
    let mut v = target.clone();
    v[key] = value;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: i64 = 1_714_557_600_000; // 2024-05-01T10:00:00Z
    const T2: i64 = T1 + 60_000;

    fn body(event_type: &str, event: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "eventId": "e-1",
            "eventDate": "2024-05-01T10:00:00.000Z",
            "eventType": event_type,
            "event": event,
        }))
        .unwrap()
    }

    #[test]
    fn higher_rank_applies_and_lower_rank_is_backwards() {
        use OrderState::*;
        assert_eq!(decide(None, Completed, T1), Decision::Apply);
        assert_eq!(
            decide(Some((Acknowledged, Some(T2))), InProgress, T1),
            Decision::Apply
        );
        assert_eq!(
            decide(Some((InProgress, Some(T1))), Completed, T2),
            Decision::Apply
        );
        let Decision::Ignore { why, .. } = decide(Some((Completed, Some(T1))), InProgress, T2)
        else {
            panic!("completed → inProgress must be ignored");
        };
        assert_eq!(why, "backwards");
        assert_eq!(decide(Some((Held, Some(T1))), Held, T2), Decision::Same);
    }

    #[test]
    fn within_the_active_states_the_newer_event_date_wins() {
        use OrderState::*;
        assert_eq!(
            decide(Some((Held, Some(T1))), InProgress, T2),
            Decision::Apply
        );
        let Decision::Ignore { why, .. } = decide(Some((Held, Some(T2))), InProgress, T1) else {
            panic!("an older inProgress must not undo held");
        };
        assert_eq!(why, "stale");
        let Decision::Ignore { why, .. } = decide(Some((Held, Some(T1))), Pending, T1) else {
            panic!("an equal eventDate is not newer");
        };
        assert_eq!(why, "stale");
    }

    #[test]
    fn a_final_state_never_changes() {
        use OrderState::*;
        let Decision::Ignore { why, .. } = decide(Some((Failed, Some(T1))), Completed, T2) else {
            panic!("failed → completed must be ignored");
        };
        assert_eq!(why, "final");
    }

    #[test]
    fn body_errors_name_the_field() {
        assert_eq!(decode(b"  \n"), Err(DecodeError::MissingBody));
        assert!(matches!(decode(b"{nope"), Err(DecodeError::InvalidBody(_))));
        assert!(matches!(decode(b"[1]"), Err(DecodeError::InvalidBody(_))));
        assert!(matches!(
            decode(b"\xff\xfe"),
            Err(DecodeError::InvalidBody(_))
        ));
        assert_eq!(
            decode(br#"{"eventId":"e","eventDate":null,"eventType":"x"}"#),
            Err(DecodeError::MissingFields(vec!["eventDate", "event"]))
        );
        let err = decode(&body("ServiceOrderShippedNotification", json!({"id": "1"})));
        assert!(
            matches!(
                err,
                Err(DecodeError::InvalidField {
                    field: "eventType",
                    ..
                })
            ),
            "{err:?}"
        );
        let mut bad_date: Value = serde_json::from_slice(&body(
            "ServiceOrderStateChangeNotification",
            json!({"id": "1", "state": "held"}),
        ))
        .unwrap();
        bad_date["eventDate"] = json!("2024-05-01 10:00");
        let err = decode(&serde_json::to_vec(&bad_date).unwrap());
        assert!(
            matches!(
                err,
                Err(DecodeError::InvalidField {
                    field: "eventDate",
                    ..
                })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn functional_errors_say_what_is_missing() {
        let err = decode(&body(
            "ServiceOrderStateChangeNotification",
            json!({"state": "held"}),
        ));
        assert!(matches!(
            err,
            Err(DecodeError::Functional(Functional::NoServiceOrder(_)))
        ));
        let err = decode(&body(
            "ServiceOrderStateChangeNotification",
            json!({"id": "1"}),
        ));
        assert!(matches!(
            err,
            Err(DecodeError::Functional(Functional::InvalidOrderState(_)))
        ));
        let err = decode(&body(
            "ServiceOrderStateChangeNotification",
            json!({"id": "1", "state": "shipped"}),
        ));
        assert!(matches!(
            err,
            Err(DecodeError::Functional(Functional::InvalidOrderState(_)))
        ));
        let err = decode(&body(
            "ServiceOrderItemStateChangeNotification",
            json!({"id": "1"}),
        ));
        assert!(matches!(
            err,
            Err(DecodeError::Functional(Functional::NoOrderItem(_)))
        ));
        let err = decode(&body(
            "ServiceOrderItemStateChangeNotification",
            json!({"id": "1", "orderItem": [{"id": "a"}]}),
        ));
        assert!(matches!(
            err,
            Err(DecodeError::Functional(Functional::InvalidOrderItem(_)))
        ));
        let err = decode(&body(
            "ServiceOrderCreationNotification",
            json!({"id": "1", "state": "acknowledged", "orderItem": [{"id": "a"}, {"id": "a"}]}),
        ));
        assert!(matches!(
            err,
            Err(DecodeError::Functional(Functional::InvalidOrderItem(_)))
        ));
    }

    #[test]
    fn a_repeated_long_item_id_is_quoted_cut_short() {
        let id = "x".repeat(100_000);
        let err = decode(&body(
            "ServiceOrderCreationNotification",
            json!({"id": "1", "state": "acknowledged", "orderItem": [{"id": id}, {"id": id}]}),
        ))
        .unwrap_err();
        let message = err.to_string();
        assert!(matches!(
            err,
            DecodeError::Functional(Functional::InvalidOrderItem(_))
        ));
        assert!(
            message.starts_with("`event.orderItem[1].id` \"xxx"),
            "{message}"
        );
        assert!(message.ends_with("… appears twice"), "{message}");
        assert!(message.chars().count() < 120, "{message}");
    }

    #[test]
    fn semantic_key_ignores_event_id_date_and_item_order() {
        let a = decode(&body(
            "ServiceOrderStateChangeNotification",
            json!({"id": "SO-1", "state": "inProgress", "href": "x",
                   "orderItem": [{"id": "2", "state": "held"}, {"id": "1", "state": "inProgress"}]}),
        ))
        .unwrap();
        let mut other: Value = serde_json::from_slice(&body(
            "ServiceOrderStateChangeNotification",
            json!({"id": "SO-1", "state": "inProgress",
                   "orderItem": [{"id": "1", "state": "inProgress"}, {"id": "2", "state": "held"}]}),
        ))
        .unwrap();
        other["eventId"] = json!("e-2");
        other["eventDate"] = json!("2024-05-02T10:00:00+02:00");
        let b = decode(&serde_json::to_vec(&other).unwrap()).unwrap();
        assert_eq!(a.semantic_key, b.semantic_key);
        assert_eq!(
            a.semantic_key,
            r#"listener:["SO-1","ServiceOrderStateChangeNotification","inProgress",[["1","inProgress"],["2","held"]]]"#
        );
    }

    #[test]
    fn item_changes_merge_into_the_items_and_older_fields_only_fill_gaps() {
        let mut doc = OrderDoc::new("SO-1");
        let created = decode(&body(
            "ServiceOrderCreationNotification",
            json!({"id": "SO-1", "state": "acknowledged", "externalId": "X",
                   "orderItem": [{"id": "1", "state": "acknowledged", "action": "add"},
                                 {"id": "2", "state": "acknowledged", "action": "add"}]}),
        ))
        .unwrap();
        doc.merge(&created.order, T1);
        let item = decode(&body(
            "ServiceOrderItemStateChangeNotification",
            json!({"id": "SO-1", "orderItem": [{"id": "2", "state": "completed"}]}),
        ))
        .unwrap();
        let report = doc.merge(&item.order, T2);
        assert!(report.ignored.is_empty());
        assert_eq!(doc.items.len(), 2);
        assert_eq!(doc.items[0].state, Some(OrderState::Acknowledged));
        assert_eq!(doc.items[1].state, Some(OrderState::Completed));
        assert_eq!(doc.items[1].item["action"], "add");
        assert_eq!(doc.state, Some(OrderState::Acknowledged));

        // An older notification with a new property fills it in, never overwrites.
        let older = decode(&body(
            "ServiceOrderStateChangeNotification",
            json!({"id": "SO-1", "state": "acknowledged", "externalId": "old", "orderDate": "d"}),
        ))
        .unwrap();
        doc.merge(&older.order, T1 - 1);
        assert_eq!(doc.order["externalId"], "X");
        assert_eq!(doc.order["orderDate"], "d");
    }
}
