//! Property-based fuzz targets (issue 19, point 6): every decoder (ERP, Akinon, Loymax,
//! listener) and the configuration loader, fed (a) arbitrary bytes and (b) structure-aware
//! inputs: JSON documents built from the contracts' field names with values of any type, and
//! mutations of the real sample payloads (`tests/fixtures/`, copied from the contracts in `docs/contracts/`).
//!
//! Each target asserts that the decoder does not panic and that it either accepts the input or
//! rejects it with a *clear* error: a code from the documented list, and a non-empty message that
//! names the field (or the key) at fault, or the problem with the body as a whole.
//!
//! No broker or database is needed. The number of cases per target is proptest's
//! `PROPTEST_CASES` (default 256 here); see `docs/fuzzing.md` for the longer run.

use std::{collections::BTreeSet, path::PathBuf, sync::LazyLock};

use proptest::{prelude::*, sample::Index, test_runner::Config};
use serde_json::{Map, Value};
use subgate::{
    config::{ConfigError, ConfigSource, Settings},
    consent::Normaliser,
    http::listener::ListenerError,
    sources::{
        akinon::{self, CallMeta, DecodeError as AkinonDecodeError, Endpoint},
        amqp::{AmqpMessage, Decoder, Rejection},
        erp::{ErpDecoder, Feed},
        listener,
        loymax::{self, LoymaxDecoder},
    },
};

/// proptest's own configuration: `PROPTEST_CASES` when set, else 256 cases per target.
fn config() -> Config {
    Config::default()
}

// ------------------------------------------------------------------------------------------
// Samples (the seeds' examples) and the contracts' vocabularies
// ------------------------------------------------------------------------------------------

const ERP_CUSTOMER: &str = include_str!("fixtures/erp/customer.json");
const ERP_SUBSCRIPTION: &str = include_str!("fixtures/erp/subscription.json");
const AKINON_EMAIL: &str = include_str!("fixtures/akinon/subscribe_email.json");
const AKINON_USER: &str = include_str!("fixtures/akinon/subscribe_user.json");
const AKINON_ORDER: &str = include_str!("fixtures/akinon/order_info.json");
const LISTENER_SAMPLES: &[&str] = &[
    include_str!("fixtures/listener/creation.json"),
    include_str!("fixtures/listener/state_change.json"),
    include_str!("fixtures/listener/item_state_change.json"),
];
/// Loymax samples with the routing key each is published with.
const LOYMAX_SAMPLES: &[(&str, &str)] = &[
    (
        "customer.registration.begin",
        include_str!("fixtures/loymax/registration_begin.json"),
    ),
    (
        "customer.registration.finish",
        include_str!("fixtures/loymax/registration_finish.json"),
    ),
    (
        "customer.card.link",
        include_str!("fixtures/loymax/card_link_replace.json"),
    ),
    (
        "customer.profile.merge",
        include_str!("fixtures/loymax/profile_merge.json"),
    ),
    (
        "customer.card.changeState",
        include_str!("fixtures/loymax/card_activation.json"),
    ),
    (
        "customer.card.changeBlockState",
        include_str!("fixtures/loymax/card_block.json"),
    ),
    (
        "customer.card.changeDeleteState",
        include_str!("fixtures/loymax/card_delete.json"),
    ),
    (
        "\u{0441}ustomer.card.changeCategory",
        include_str!("fixtures/loymax/card_category.json"),
    ),
    (
        "customer.attribute.update",
        include_str!("fixtures/loymax/attribute_update.json"),
    ),
    (
        "customer.subscription.update",
        include_str!("fixtures/loymax/subscription_update.json"),
    ),
    (
        "purchases.confirm.modelUpdate",
        include_str!("fixtures/loymax/purchase_confirm.json"),
    ),
    (
        "purchases.refundModelUpdate",
        include_str!("fixtures/loymax/purchase_refund.json"),
    ),
];

/// Samples parsed (the Loymax merge example has a trailing comma: parsed leniently).
fn parse_sample(text: &str) -> Value {
    loymax::json::parse_lenient(text.as_bytes())
        .expect("a sample parses")
        .0
}

/// Every object key that occurs in `samples`, plus `extra` spellings the contracts name.
fn vocabulary(samples: &[&str], extra: &[&str]) -> Vec<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    out.insert(k.clone());
                    walk(v, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for s in samples {
        walk(&parse_sample(s), &mut out);
    }
    out.extend(extra.iter().map(|s| (*s).to_owned()));
    out.into_iter().collect()
}

static ERP_KEYS: LazyLock<Vec<String>> = LazyLock::new(|| {
    vocabulary(
        &[ERP_CUSTOMER, ERP_SUBSCRIPTION],
        &[
            "properties",
            "emailAddress",
            "email",
            "emailPermission",
            "SMS_PERMISSION",
        ],
    )
});
static AKINON_KEYS: LazyLock<Vec<String>> =
    LazyLock::new(|| vocabulary(&[AKINON_EMAIL, AKINON_USER, AKINON_ORDER], &[]));
static LOYMAX_KEYS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let samples: Vec<&str> = LOYMAX_SAMPLES.iter().map(|(_, s)| *s).collect();
    vocabulary(
        &samples,
        &[
            "customerCode",
            "accountfroupId",
            "accountGroupId",
            "targetState",
            "newcardCategory",
            "newCardCategory",
            "linkCardType",
            "linkSource",
            "externalId",
            "activityUid",
            "mailingSubscriptionType",
            "currencyDeviceExternalId",
            "refundedPurchaseViewModel",
            "refundedPurchaseId",
        ],
    )
});
static LISTENER_KEYS: LazyLock<Vec<String>> = LazyLock::new(|| vocabulary(LISTENER_SAMPLES, &[]));

/// Strings that have broken parsers before, or that mean something to these decoders.
const INTERESTING: &[&str] = &[
    "",
    " ",
    "\t\n",
    "\u{0}",
    "null",
    "true",
    "false",
    "0",
    "-0",
    "1",
    "-1",
    "0.0",
    "199.99",
    "9,99",
    "1e3",
    "1e309",
    "-1e-400",
    "NaN",
    "inf",
    "+1",
    ".5",
    "99999999999999999999999999999999999999999",
    "İSTANBUL(Anadolu)",
    "ı",
    "İ",
    "ß",
    "🙂",
    "\u{202e}abc",
    "\u{feff}",
    "\u{0441}ustomer.card.changeCategory",
    "2024-06-01T00:00:00Z",
    "2024-06-01T03:00:00.000+03:00",
    "2024-06-01T03:00:00+0300",
    "2024-06-01T00:00:00",
    "2024-06-01T00:00",
    "2021-08-16",
    "2024-02-30",
    "2024-06-01T24:00:00Z",
    "2016-12-31T23:59:60Z",
    "9999-12-31T23:59:59.999999999Z",
    "0000-01-01T00:00:00Z",
    "+262143-12-31T23:59:59",
    "-262144-01-01T00:00:00",
    "2024-06-01T00:00:00+99:99",
    "05351234567",
    "5351234567",
    "+90 535 123 45 67",
    "00905351234567",
    "+",
    "00",
    "+0000000000000000000000",
    "user@example.com",
    "USER@EXAMPLE.COM ",
    "İ@example.com",
    "a@b",
    "@",
    "x@y..z",
    "String",
    "Date",
    "Float",
    "Integer",
    "Boolean",
    "Money",
    "Active",
    "Passive",
    "try",
    "TRY",
    "Enabled",
    "Disabled",
    "Email",
    "Phone",
    "ReplaceCard",
    "AttachCard",
    "OnPurchaseConfirm",
    "OnPurchaseRefund",
    "OnCardReplace",
    "OnBlockCard",
    "OnCustomerAttributeUpdate",
    "OnCustomerSubscriptionChange",
    "MergeCustomersProfiles",
    "ServiceOrderCreationNotification",
    "ServiceOrderStateChangeNotification",
    "ServiceOrderItemStateChangeNotification",
    "acknowledged",
    "inProgress",
    "completed",
    "evet",
    "hayır",
];

/// Number texts kept exactly by serde_json (`arbitrary_precision`): huge, tiny, negative, odd.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "0.0",
    "-1",
    "1.5",
    "135.0000",
    "-6.6700",
    "1E+2",
    "1e400",
    "-1e400",
    "1e-400",
    "0e999999999",
    "1e-999999999",
    "1e2147483648",
    "9223372036854775807",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "123456789012345678901234567890123456789012345678901234567890",
];

// ------------------------------------------------------------------------------------------
// Generators
// ------------------------------------------------------------------------------------------

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(INTERESTING).prop_map(str::to_owned),
        3 => ".{0,24}",
        2 => "[ -~]{0,16}",
        1 => any::<String>(),
        // Very long strings (up to ~100 KB).
        1 => (prop::sample::select(INTERESTING), 1usize..20_000).prop_map(|(s, n)| s.repeat(n)),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(NUMBERS)
            .prop_map(|t| serde_json::from_str::<Value>(t).expect("a number text")),
        // Long numbers: serde_json keeps every digit.
        "-?[1-9][0-9]{0,3000}(\\.[0-9]{1,40})?([eE]-?[0-9]{1,3})?"
            .prop_map(|t| serde_json::from_str::<Value>(&t).expect("a number text")),
    ]
    .boxed()
}

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => number(),
        3 => text().prop_map(Value::String),
    ]
    .boxed()
}

/// An object key: mostly the contract's names (with their case changed now and then), else
/// any text.
fn key(vocabulary: &'static [String]) -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::sample::select(vocabulary),
        1 => prop::sample::select(vocabulary).prop_map(|k| k.to_uppercase()),
        2 => text(),
    ]
    .boxed()
}

/// Any JSON value, objects keyed by the vocabulary, nested up to 5 levels.
fn json(vocabulary: &'static [String]) -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(5, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(vocabulary), inner), 0..10)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
        .boxed()
}

/// A document shaped like the contract: an object of the contract's fields (any subset, in
/// any order, with values of any type), occasionally with unknown ones.
fn contract_doc(vocabulary: &'static [String]) -> BoxedStrategy<Value> {
    prop::collection::vec((key(vocabulary), json(vocabulary)), 0..24)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>()))
        .boxed()
}

/// One structural change to a document, at the node `at` (pre-order index) picks.
#[derive(Debug, Clone)]
enum Mutation {
    Replace(Value),
    Remove,
    Insert(String, Value),
    WrapInArray,
    WrapInObject(String),
    Duplicate,
    ToText,
}

fn mutation(vocabulary: &'static [String]) -> BoxedStrategy<(Index, Mutation)> {
    let m = prop_oneof![
        4 => json(vocabulary).prop_map(Mutation::Replace),
        2 => scalar().prop_map(Mutation::Replace),
        3 => Just(Mutation::Remove),
        2 => (key(vocabulary), json(vocabulary)).prop_map(|(k, v)| Mutation::Insert(k, v)),
        1 => Just(Mutation::WrapInArray),
        1 => key(vocabulary).prop_map(Mutation::WrapInObject),
        1 => Just(Mutation::Duplicate),
        1 => Just(Mutation::ToText),
    ];
    (any::<Index>(), m).boxed()
}

fn mutations(vocabulary: &'static [String]) -> BoxedStrategy<Vec<(Index, Mutation)>> {
    prop::collection::vec(mutation(vocabulary), 1..6).boxed()
}

/// JSON pointers of every node, root first.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let escaped = k.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{at}/{escaped}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn mutate(doc: &mut Value, changes: &[(Index, Mutation)]) {
    for (at, change) in changes {
        let mut all = Vec::new();
        pointers(doc, String::new(), &mut all);
        let pointer = &all[at.index(all.len())];
        if let Mutation::Remove = change {
            let Some((parent, last)) = pointer.rsplit_once('/') else {
                *doc = Value::Null;
                continue;
            };
            let last = last.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.remove(&last);
                }
                Some(Value::Array(items)) => {
                    if let Ok(i) = last.parse::<usize>() {
                        items.remove(i);
                    }
                }
                _ => {}
            }
            continue;
        }
        let Some(node) = doc.pointer_mut(pointer) else {
            continue;
        };
        match change {
            Mutation::Replace(v) => *node = v.clone(),
            Mutation::Remove => unreachable!("handled above"),
            Mutation::Insert(k, v) => match node {
                Value::Object(map) => {
                    map.insert(k.clone(), v.clone());
                }
                Value::Array(items) => items.push(v.clone()),
                other => *other = v.clone(),
            },
            Mutation::WrapInArray => *node = Value::Array(vec![node.take()]),
            Mutation::WrapInObject(k) => {
                *node = Value::Object(Map::from_iter([(k.clone(), node.take())]));
            }
            Mutation::Duplicate => {
                if let Value::Array(items) = node {
                    if let Some(first) = items.first().cloned() {
                        items.push(first);
                    }
                } else {
                    *node = Value::Array(vec![node.clone(), node.clone()]);
                }
            }
            Mutation::ToText => *node = Value::String(node.to_string()),
        }
    }
}

/// Byte strings inserted into samples: JSON punctuation, broken escapes and UTF-8, a BOM.
const INSERTS: &[&[u8]] = &[
    b",",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u",
    b"\\ud800",
    b":",
    b"null",
    b"-",
    b"e9999",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\xc3",
    b"\x00",
];

/// A change to a sample's bytes.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
}

fn byte_edits() -> BoxedStrategy<Vec<ByteEdit>> {
    let interesting = prop::sample::select(INSERTS);
    let edit = prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        2 => (any::<Index>(), interesting.prop_map(<[u8]>::to_vec))
            .prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| ByteEdit::Delete(i, n)),
        1 => any::<Index>().prop_map(ByteEdit::Truncate),
    ];
    prop::collection::vec(edit, 1..8).boxed()
}

fn edit_bytes(sample: &str, edits: &[ByteEdit]) -> Vec<u8> {
    let mut bytes = sample.as_bytes().to_vec();
    for edit in edits {
        let len = bytes.len().max(1);
        match edit {
            ByteEdit::Flip(i, b) if !bytes.is_empty() => {
                let i = i.index(len);
                bytes[i] ^= b | 1;
            }
            ByteEdit::Flip(..) => {}
            ByteEdit::Insert(i, b) => {
                let at = i.index(len + 1).min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
            ByteEdit::Delete(i, n) if !bytes.is_empty() => {
                let at = i.index(len);
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            ByteEdit::Delete(..) => {}
            ByteEdit::Truncate(i) => bytes.truncate(i.index(len + 1)),
        }
    }
    bytes
}

/// Arbitrary bytes, and text that is nearly JSON.
fn any_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..512),
        2 => "[ -~\\n]{0,256}".prop_map(String::into_bytes),
        1 => "[{}\\[\\]\",:0-9a-z\\\\ ]{0,256}".prop_map(String::into_bytes),
        // Deep nesting, past serde_json's recursion limit.
        1 => (1usize..5_000, prop::sample::select(&["[", "{\"a\":", "[{\"id\":"][..]))
            .prop_map(|(n, open)| open.repeat(n).into_bytes()),
    ]
    .boxed()
}

/// Serialise compactly or pretty-printed.
fn to_bytes(v: &Value, pretty: bool) -> Vec<u8> {
    if pretty {
        serde_json::to_vec_pretty(v).expect("serialisable")
    } else {
        serde_json::to_vec(v).expect("serialisable")
    }
}

// ------------------------------------------------------------------------------------------
// What "a clear error" means, per decoder
// ------------------------------------------------------------------------------------------

/// Non-empty, and more than punctuation.
fn readable(message: &str) -> bool {
    message.chars().filter(|c| c.is_alphabetic()).count() >= 3
}

/// Longest error message a decoder may answer with: it says what is wrong, it does not echo
/// the input back (an input value is quoted cut short, as the listener's `describe` does).
const MESSAGE_MAX: usize = 512;

/// [`readable`] and at most [`MESSAGE_MAX`] characters.
fn clear(message: &str) -> bool {
    readable(message) && message.chars().count() <= MESSAGE_MAX
}

/// Runs an AMQP decoder on `body`.
fn amqp_decode(
    decoder: &dyn Decoder,
    queue: &str,
    routing_key: &str,
    body: &[u8],
) -> Result<subgate::envelope::Envelope, Rejection> {
    let properties = amqprs::BasicProperties::default();
    decoder.decode(&AmqpMessage {
        queue,
        exchange: "",
        routing_key,
        redelivered: false,
        properties: &properties,
        body,
    })
}

/// ERP: accepted with a usable entity, or a documented code (README, "Rejected") whose detail
/// says what is wrong.
fn check_erp(body: &[u8]) -> Result<(), TestCaseError> {
    for feed in [Feed::Customer, Feed::Subscription] {
        let decoder = ErpDecoder {
            feed,
            phones: Normaliser::new("TR").unwrap(),
            consent_flags: [
                (
                    "emailPermission".to_owned(),
                    subgate::consent::Channel::Email,
                ),
                ("SMS_PERMISSION".to_owned(), subgate::consent::Channel::Sms),
            ]
            .into(),
        };
        match amqp_decode(&decoder, "secom-customer-queue", "", body) {
            Ok(envelope) => {
                prop_assert!(!envelope.entity.is_empty(), "accepted without an entity");
                prop_assert_eq!(envelope.entity.trim(), envelope.entity.as_str());
                prop_assert_eq!(&envelope.raw[..], body);
            }
            Err(r) => {
                prop_assert!(
                    ["not_utf8", "not_json", "not_an_object", "missing_id"].contains(&r.code),
                    "undocumented ERP rejection code {:?}: {}",
                    r.code,
                    r.detail
                );
                prop_assert!(clear(&r.detail), "unclear ERP detail {:?}", r.detail);
                if r.code == "missing_id" {
                    prop_assert!(r.detail.contains("`id`"), "{}", r.detail);
                }
            }
        }
    }
    Ok(())
}

/// Akinon: accepted, or `invalid_json` with a message, or a list of field errors, each
/// `missing_field`/`invalid_field` naming a field of the contract (`orderItems[0].price`).
fn check_akinon(body: &[u8]) -> Result<(), TestCaseError> {
    let call = CallMeta {
        request_id: "fuzz".into(),
        credential: "fuzz".into(),
    };
    let normaliser = Normaliser::new("TR").unwrap();
    for endpoint in [
        Endpoint::SubscribeEmail,
        Endpoint::SubscribeUser,
        Endpoint::OrderInfo,
    ] {
        match akinon::decode(endpoint, body.to_vec(), &call, &normaliser) {
            Ok(envelope) => prop_assert!(!envelope.entity.is_empty()),
            Err(AkinonDecodeError::Json(message)) => {
                prop_assert!(clear(&message), "unclear invalid_json {:?}", message)
            }
            Err(AkinonDecodeError::Fields(errors)) => {
                prop_assert!(!errors.is_empty(), "a field rejection without fields");
                for e in &errors {
                    prop_assert!(
                        ["missing_field", "invalid_field"].contains(&e.code),
                        "undocumented Akinon code {:?}",
                        e.code
                    );
                    prop_assert!(clear(&e.message), "unclear message {:?}", e.message);
                    let root = e.field.split(['.', '[']).next().unwrap_or_default();
                    prop_assert!(
                        AKINON_KEYS.iter().any(|k| k == root),
                        "{:?} names no field of the contract: {:?}",
                        e.field,
                        e.message
                    );
                }
            }
        }
    }
    Ok(())
}

/// Loymax: accepted, or a code of `docs/loymax.md` whose detail names the field.
fn check_loymax(routing_key: &str, body: &[u8]) -> Result<(), TestCaseError> {
    let decoder = LoymaxDecoder::new(Normaliser::new("RU").unwrap());
    match amqp_decode(&decoder, "smc.customerEvents", routing_key, body) {
        Ok(envelope) => {
            prop_assert!(!envelope.dedupe_key.is_empty());
            prop_assert_eq!(&envelope.raw[..], body);
        }
        Err(r) => {
            prop_assert!(
                [
                    "not_json",
                    "not_an_object",
                    "missing_member",
                    "missing_card",
                    "missing_field"
                ]
                .contains(&r.code),
                "undocumented Loymax rejection code {:?}: {}",
                r.code,
                r.detail
            );
            prop_assert!(clear(&r.detail), "unclear Loymax detail {:?}", r.detail);
            if r.code.starts_with("missing_") {
                prop_assert!(
                    r.detail.contains('`') || r.detail.contains("cardId"),
                    "the detail names no field: {}",
                    r.detail
                );
            }
        }
    }
    Ok(())
}

/// Listener: accepted, or an `ErrorRepresentation` code of the document (400/21–24) or of
/// `docs/listener.md` (422/100–103) whose message names the field.
fn check_listener(body: &[u8]) -> Result<(), TestCaseError> {
    match listener::decode(body) {
        Ok(notification) => {
            prop_assert!(!notification.order.id.is_empty());
            prop_assert!(!notification.event_id.trim().is_empty());
            let envelope = notification.into_envelope(body.to_vec(), Map::new());
            prop_assert!(envelope.dedupe_key.starts_with("listener:"));
        }
        Err(e) => {
            let message = e.to_string();
            let error = ListenerError::from(e);
            let (status, code, reason) = error.wire();
            prop_assert!(
                [21, 22, 23, 24, 100, 101, 102, 103].contains(&code),
                "unexpected listener code {} ({}) {}: {}",
                code,
                status,
                reason,
                message
            );
            prop_assert!(clear(&message), "unclear listener message {:?}", message);
            if code != 21 && code != 22 {
                prop_assert!(message.contains('`'), "names no field: {}", message);
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Targets: decoders
// ------------------------------------------------------------------------------------------

fn erp_samples() -> BoxedStrategy<Value> {
    prop::sample::select(vec![ERP_CUSTOMER, ERP_SUBSCRIPTION])
        .prop_map(parse_sample)
        .boxed()
}

fn akinon_samples() -> BoxedStrategy<Value> {
    prop::sample::select(vec![AKINON_EMAIL, AKINON_USER, AKINON_ORDER])
        .prop_map(parse_sample)
        .boxed()
}

fn listener_samples() -> BoxedStrategy<Value> {
    prop::sample::select(LISTENER_SAMPLES)
        .prop_map(parse_sample)
        .boxed()
}

/// A routing key: the bound ones, or anything.
fn routing_key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(loymax::ROUTING_KEYS).prop_map(str::to_owned),
        1 => text(),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn erp_arbitrary_bytes(body in any_bytes()) {
        check_erp(&body)?;
    }

    #[test]
    fn erp_contract_json(doc in contract_doc(&ERP_KEYS), pretty in any::<bool>()) {
        check_erp(&to_bytes(&doc, pretty))?;
    }

    #[test]
    fn erp_sample_mutations(
        mut doc in erp_samples(),
        changes in mutations(&ERP_KEYS),
        sample in prop::sample::select(vec![ERP_CUSTOMER, ERP_SUBSCRIPTION]),
        edits in byte_edits(),
    ) {
        mutate(&mut doc, &changes);
        check_erp(&to_bytes(&doc, false))?;
        check_erp(&edit_bytes(sample, &edits))?;
    }

    #[test]
    fn akinon_arbitrary_bytes(body in any_bytes()) {
        check_akinon(&body)?;
    }

    #[test]
    fn akinon_contract_json(doc in contract_doc(&AKINON_KEYS), pretty in any::<bool>()) {
        check_akinon(&to_bytes(&doc, pretty))?;
    }

    #[test]
    fn akinon_sample_mutations(
        mut doc in akinon_samples(),
        changes in mutations(&AKINON_KEYS),
        sample in prop::sample::select(vec![AKINON_EMAIL, AKINON_USER, AKINON_ORDER]),
        edits in byte_edits(),
    ) {
        mutate(&mut doc, &changes);
        check_akinon(&to_bytes(&doc, false))?;
        check_akinon(&edit_bytes(sample, &edits))?;
    }

    #[test]
    fn loymax_arbitrary_bytes(key in routing_key(), body in any_bytes()) {
        check_loymax(&key, &body)?;
    }

    #[test]
    fn loymax_contract_json(
        key in routing_key(),
        doc in contract_doc(&LOYMAX_KEYS),
        pretty in any::<bool>(),
    ) {
        check_loymax(&key, &to_bytes(&doc, pretty))?;
    }

    #[test]
    fn loymax_sample_mutations(
        sample in prop::sample::select(LOYMAX_SAMPLES),
        other_key in routing_key(),
        use_other_key in prop::bool::weighted(0.2),
        changes in mutations(&LOYMAX_KEYS),
        edits in byte_edits(),
    ) {
        let (bound, sample_text) = sample;
        let key = if use_other_key { other_key.as_str() } else { bound };
        let mut doc = parse_sample(sample_text);
        mutate(&mut doc, &changes);
        check_loymax(key, &to_bytes(&doc, false))?;
        check_loymax(key, &edit_bytes(sample_text, &edits))?;
    }

    #[test]
    fn listener_arbitrary_bytes(body in any_bytes()) {
        check_listener(&body)?;
    }

    #[test]
    fn listener_contract_json(doc in contract_doc(&LISTENER_KEYS), pretty in any::<bool>()) {
        check_listener(&to_bytes(&doc, pretty))?;
    }

    #[test]
    fn listener_sample_mutations(
        mut doc in listener_samples(),
        changes in mutations(&LISTENER_KEYS),
        sample in prop::sample::select(LISTENER_SAMPLES),
        edits in byte_edits(),
    ) {
        mutate(&mut doc, &changes);
        check_listener(&to_bytes(&doc, false))?;
        check_listener(&edit_bytes(sample, &edits))?;
    }
}

// ------------------------------------------------------------------------------------------
// Targets: the configuration loader (`Settings::load`: defaults → --config file → env)
// ------------------------------------------------------------------------------------------

/// The defaults' `section → keys`, as dotted paths (`amqp.prefetch`, `listener.tls.addr`).
static CONFIG_KEYS: LazyLock<Vec<String>> = LazyLock::new(|| {
    fn walk(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            let path = format!("{prefix}{k}");
            out.push(path.clone());
            if let toml::Value::Table(inner) = v {
                walk(inner, &format!("{path}."), out);
            }
        }
    }
    let table: toml::Table = subgate::config::DEFAULT_TOML.parse().unwrap();
    let mut out = Vec::new();
    walk(&table, "", &mut out);
    for k in [
        "destinations",
        "destinations.name",
        "destinations.kind",
        "destinations.url",
        "destinations.secret",
        "destinations.secret_env",
        "destinations.concurrency",
        "destinations.batch_size",
        "destinations.timeout",
        "destinations.exchange",
        "listener.bearer_tokens.token",
        "listener.basic_users.user",
        "listener.basic_users.password",
        "listener.basic_users.expires_at",
    ] {
        out.push(k.to_owned());
    }
    out
});

/// A TOML value of any type.
fn toml_value() -> BoxedStrategy<toml::Value> {
    let leaf = prop_oneof![
        3 => text().prop_map(toml::Value::String),
        2 => any::<i64>().prop_map(toml::Value::Integer),
        1 => prop::sample::select(&[0i64, 1, -1, 65535, 65536, i64::MAX, i64::MIN, 255, 256, 100_001][..])
            .prop_map(toml::Value::Integer),
        1 => any::<f64>().prop_map(toml::Value::Float),
        1 => any::<bool>().prop_map(toml::Value::Boolean),
        1 => prop::sample::select(&[
            "0.0.0.0:0", "127.0.0.1:65536", "[::1]:8080", "localhost:80",
            "sqlite://", "sqlite:///tmp/x.db", "postgres://u:p@h/db", "mysql://x",
            "amqp://guest:guest@127.0.0.1:5672/%2f", "amqps://h", "amqp://:0", "amqp://h:99999",
            "500ms", "0s", "20s", "2m", "1h", "7d", "18446744073709551615d", "1x", "-1s", "",
            "quorum", "classic", "full", "normal", "json", "pretty", "camel", "snake",
            "info", "debug,hyper=warn", "[", "{queue}.dead", "{queue", "webhook", "emarsys",
            "amqp", "https://example.com/hook", "http://", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "TR", "RU", "XX", "tr", "/akinon", "/", "akinon/", "/a{b}",
            "2024-06-01T00:00:00Z", "email", "sms", "fax",
        ][..]).prop_map(|s| toml::Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(toml::Value::Array),
            prop::collection::vec((text(), inner), 0..5)
                .prop_map(|kv| toml::Value::Table(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A config key path: known (`amqp.prefetch`), a near miss, or anything.
fn config_key() -> BoxedStrategy<String> {
    prop_oneof![
        8 => prop::sample::select(CONFIG_KEYS.as_slice()),
        1 => prop::sample::select(CONFIG_KEYS.as_slice()).prop_map(|k| format!("{k}x")),
        1 => prop::sample::select(CONFIG_KEYS.as_slice()).prop_map(|k| format!("{k}.deeper")),
        1 => "[a-z_]{1,8}(\\.[a-z_]{1,8}){0,2}",
    ]
    .boxed()
}

/// `a.b.c = value`, creating the tables on the way (a non-table on the way: nothing).
fn insert_path(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry((*first).to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// A TOML document that sets some keys of the contract to values of any type.
fn config_doc() -> BoxedStrategy<String> {
    prop::collection::vec((config_key(), toml_value()), 0..8)
        .prop_map(|entries| {
            let mut table = toml::Table::new();
            for (path, value) in entries {
                let parts: Vec<&str> = path.split('.').collect();
                insert_path(&mut table, &parts, value);
            }
            toml::to_string(&table).unwrap_or_default()
        })
        .boxed()
}

/// Text that is nearly TOML.
fn toml_ish() -> BoxedStrategy<String> {
    let line = prop_oneof![
        2 => (config_key(), "[ -~]{0,24}").prop_map(|(k, v)| {
            let (section, key) = k.rsplit_once('.').unwrap_or(("", &k));
            format!("[{section}]\n{key} = {v}")
        }),
        1 => "[ -~]{0,40}",
        1 => ".{0,40}",
        1 => Just("[[destinations]]".to_owned()),
        1 => prop::sample::select(&["[", "]]", "=", "\"", "'''", "a.b.c = 1", "[a.b]", "x = {", "y = [1,", "\u{feff}"][..])
            .prop_map(str::to_owned),
    ];
    prop::collection::vec(line, 0..12)
        .prop_map(|lines| lines.join("\n"))
        .boxed()
}

/// An env var name for a key: `SUBGATE__AMQP__PREFETCH`, in any case, sometimes malformed.
fn env_name() -> BoxedStrategy<String> {
    prop_oneof![
        6 => config_key().prop_map(|k| format!("SUBGATE__{}", k.replace('.', "__").to_uppercase())),
        1 => config_key().prop_map(|k| format!("SUBGATE__{}", k.replace('.', "__"))),
        1 => prop::sample::select(&["SUBGATE__", "SUBGATE____X", "SUBGATE__AMQP__", "SUBGATE__AMQP____PREFETCH", "SUBGATE_AMQP__PREFETCH"][..])
            .prop_map(str::to_owned),
        1 => "SUBGATE__[A-Za-z_0-9]{0,20}",
    ]
    .boxed()
}

/// An env value: TOML literals, inline tables and arrays (well-formed or not), or any text.
fn env_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => text(),
        2 => toml_value().prop_map(|v| match v {
            toml::Value::String(s) => s,
            other => other.to_string(),
        }),
        1 => prop::sample::select(&[
            "[", "{", "[1,", "{ a = ", "[1]\n[amqp]\nprefetch = 0", "{ emailPermission = \"email\" }",
            "{ x = \"fax\" }", "1.5", "1e999", "inf", "nan", "-0", "0x10", "1_000", "true ",
            " 512", "9223372036854775808", "\"quoted\"", "'single'",
        ][..]).prop_map(str::to_owned),
    ]
    .boxed()
}

/// A scratch config file for one target, removed when the target ends (panics included).
struct ScratchFile(PathBuf);

impl ScratchFile {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("subgate-fuzz-{}-{name}.toml", std::process::id())))
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `Settings::load` answers `Ok` or an error that names the key (or the variable, or the
/// file and the TOML problem).
fn check_config(
    file: Option<(&ScratchFile, &[u8])>,
    env: Vec<(String, String)>,
) -> Result<(), TestCaseError> {
    if let Some((scratch, text)) = file {
        std::fs::write(&scratch.0, text).expect("scratch file");
    }
    let source = ConfigSource {
        file: file.map(|(s, _)| s.0.clone()),
        env: env.clone(),
    };
    match Settings::load(&source) {
        Ok(settings) => {
            // What loaded prints, redacted.
            prop_assert!(!settings.redacted_toml().is_empty());
        }
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(readable(&shown), "unclear config error {:?}", shown);
            match &e {
                ConfigError::Invalid { key, message } => {
                    prop_assert!(readable(message), "{}", shown);
                    prop_assert!(
                        !key.is_empty() && key != "." && key != "?",
                        "the error names no key: {}",
                        shown
                    );
                    let root = key.split(['.', '[']).next().unwrap_or_default();
                    let env_roots: Vec<String> = env
                        .iter()
                        .filter_map(|(n, _)| n.strip_prefix("SUBGATE__"))
                        .map(|p| {
                            p.split("__")
                                .next()
                                .unwrap_or_default()
                                .to_ascii_lowercase()
                        })
                        .collect();
                    let in_file =
                        file.is_some_and(|(_, text)| String::from_utf8_lossy(text).contains(root));
                    let named = CONFIG_KEYS.iter().any(|k| k == root)
                        || env_roots.iter().any(|r| r == root)
                        || in_file;
                    prop_assert!(named, "the error names an unknown key: {}", shown);
                }
                ConfigError::Env { var, message } => {
                    prop_assert!(var.starts_with("SUBGATE__"), "{}", shown);
                    prop_assert!(readable(message), "{}", shown);
                }
                ConfigError::Syntax { path, message } => {
                    prop_assert!(file.is_some(), "syntax error without a file: {}", shown);
                    prop_assert!(!path.is_empty() && readable(message), "{}", shown);
                }
                ConfigError::Read { path, .. } => {
                    prop_assert!(file.is_some() && !path.is_empty(), "{}", shown);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_file_arbitrary_text(
        text in prop_oneof![
            toml_ish().prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..256),
        ],
    ) {
        let scratch = ScratchFile::new("text");
        check_config(Some((&scratch, &text)), Vec::new())?;
    }

    #[test]
    fn config_file_contract_toml(doc in config_doc()) {
        let scratch = ScratchFile::new("contract");
        check_config(Some((&scratch, doc.as_bytes())), Vec::new())?;
    }

    #[test]
    fn config_env_values(
        vars in prop::collection::vec((env_name(), env_value()), 1..4),
        unrelated in "[A-Z_]{1,12}",
    ) {
        let mut env = vars;
        env.push((unrelated, "ignored".to_owned()));
        check_config(None, env)?;
    }
}
