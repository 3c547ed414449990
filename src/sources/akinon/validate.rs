//! Field validation of the Akinon request bodies, following the document's field table and
//! TypeScript interfaces ("parse, don't validate"): what passes comes out typed, every problem
//! comes out as a [`FieldError`] naming the field (`orderItems[0].price`), all of them at once.
//! Unknown fields are accepted and kept in the stored document.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde_json::{Map, Value};

use crate::{
    consent::{Address, Channel, Normaliser},
    sources::erp::json_type,
};

/// One problem with one field: `code` is `missing_field` or `invalid_field` (request bodies) or
/// one of the query codes of `unsubscribed-users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: &'static str,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `POST /subscribe-email`.
#[derive(Debug, Clone)]
pub struct SubscribeEmail {
    pub email: Address,
    pub domain: String,
}

/// `POST /subscribe-user` (and the `user` of `order-info`).
#[derive(Debug, Clone)]
pub struct UserProfile {
    pub pk: String,
    pub email: Address,
    /// The phone as an SMS address (the same number serves `call` and `whatsapp`).
    pub phone: Option<Address>,
    /// `modifiedDate` in Unix ms: the snapshot's age.
    pub modified_at: i64,
    pub email_allowed: bool,
    pub sms_allowed: bool,
    pub call_allowed: bool,
    pub whatsapp_allowed: bool,
    /// The object as received (unknown fields included), keys sorted.
    pub doc: Value,
}

/// `POST /order-info`.
#[derive(Debug, Clone)]
pub struct OrderInfo {
    pub pk: String,
    pub user: UserProfile,
    /// The object as received without `user` (stored on its own), keys sorted.
    pub doc: Value,
}

/// Parse a JSON body into an object, or say why not (`invalid_json`).
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "the body is a JSON {}, expected an object",
            json_type(&other)
        )),
        Err(e) => Err(format!("the body is not valid JSON: {e}")),
    }
}

pub fn subscribe_email(
    object: &Map<String, Value>,
    normaliser: &Normaliser,
) -> Result<SubscribeEmail, Vec<FieldError>> {
    let mut f = Fields::new(object, "");
    let email = f.email("email", normaliser);
    let domain = f.string("domain");
    f.finish()?;
    match (email, domain) {
        (Some(email), Some(domain)) => Ok(SubscribeEmail { email, domain }),
        _ => Err(vec![FieldError::new(
            "invalid_field",
            "",
            "the body is not a subscribe-email request",
        )]),
    }
}

pub fn subscribe_user(
    object: &Map<String, Value>,
    normaliser: &Normaliser,
) -> Result<UserProfile, Vec<FieldError>> {
    let mut errors = Vec::new();
    let user = user_profile(object, "", normaliser, &mut errors);
    match user {
        Some(user) if errors.is_empty() => Ok(user),
        _ => Err(errors),
    }
}

pub fn order_info(
    object: &Map<String, Value>,
    normaliser: &Normaliser,
) -> Result<OrderInfo, Vec<FieldError>> {
    let mut f = Fields::new(object, "");
    let pk = f.integer("pk");
    f.string("number");
    f.string("status");
    f.currency("currency");
    for key in ["amount", "discountAmount", "shippingAmount"] {
        f.decimal(key);
    }
    f.datetime("createdDate");
    let user = f.object("user").and_then(|u| {
        let mut nested = Vec::new();
        let user = user_profile(u, "user.", normaliser, &mut nested);
        f.errors.extend(nested);
        user
    });
    match object.get("orderItems") {
        None => f.missing("orderItems"),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("orderItems[{i}]");
                let Some(item) = item.as_object() else {
                    f.invalid(&path, format!("must be an object, not {}", json_type(item)));
                    continue;
                };
                let mut it = Fields::new(item, &format!("{path}."));
                it.integer("pk");
                if let Some(product) = it.object("product") {
                    let mut p = Fields::new(product, &format!("{path}.product."));
                    p.integer("pk");
                    p.string("sku");
                    it.errors.append(&mut p.errors);
                }
                it.decimal("price");
                it.currency("priceCurrency");
                it.decimal("taxRate");
                it.string("status");
                f.errors.append(&mut it.errors);
            }
        }
        Some(other) => f.invalid(
            "orderItems",
            format!("must be an array, not {}", json_type(other)),
        ),
    }
    f.finish()?;
    let (Some(pk), Some(user)) = (pk, user) else {
        return Err(vec![FieldError::new(
            "invalid_field",
            "",
            "the body is not an order-info request",
        )]);
    };
    let mut doc = object.clone();
    doc.remove("user");
    let mut doc = Value::Object(doc);
    doc.sort_all_objects();
    Ok(OrderInfo { pk, user, doc })
}

fn user_profile(
    object: &Map<String, Value>,
    prefix: &str,
    normaliser: &Normaliser,
    errors: &mut Vec<FieldError>,
) -> Option<UserProfile> {
    let mut f = Fields::new(object, prefix);
    let pk = f.integer("pk");
    let email = f.email("email", normaliser);
    f.string("firstName");
    f.string("lastName");
    let phone = f.phone("phone", normaliser);
    f.nullable_string("gender");
    f.nullable_date("dateOfBirth");
    f.string("languageCode");
    let email_allowed = f.boolean("emailAllowed");
    let sms_allowed = f.boolean("smsAllowed");
    let call_allowed = f.boolean("callAllowed");
    let whatsapp_allowed = f.boolean("whatsappAllowed");
    f.boolean("isActive");
    f.boolean("isStaff");
    f.datetime("dateJoined");
    f.nullable_datetime("lastLogin");
    let modified_at = f.datetime("modifiedDate");
    f.string("userType");
    f.object("attributes");
    errors.append(&mut f.errors);
    let mut doc = Value::Object(object.clone());
    doc.sort_all_objects();
    Some(UserProfile {
        pk: pk?,
        email: email?,
        phone: phone?,
        modified_at: modified_at?,
        email_allowed: email_allowed?,
        sms_allowed: sms_allowed?,
        call_allowed: call_allowed?,
        whatsapp_allowed: whatsapp_allowed?,
        doc,
    })
}

/// Reads the fields of one object, collecting every problem.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: String,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    fn new(object: &'a Map<String, Value>, prefix: &str) -> Self {
        Self {
            object,
            prefix: prefix.to_owned(),
            errors: Vec::new(),
        }
    }

    fn finish(&mut self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(std::mem::take(&mut self.errors))
        }
    }

    fn missing(&mut self, key: &str) {
        let field = format!("{}{key}", self.prefix);
        self.errors.push(FieldError::new(
            "missing_field",
            field,
            "this field is required",
        ));
    }

    fn invalid(&mut self, key: &str, message: impl Into<String>) {
        let field = format!("{}{key}", self.prefix);
        self.errors
            .push(FieldError::new("invalid_field", field, message));
    }

    /// The value of a mandatory key (`null` counts as missing).
    fn required(&mut self, key: &str) -> Option<&'a Value> {
        match self.object.get(key) {
            None | Some(Value::Null) => {
                self.missing(key);
                None
            }
            Some(v) => Some(v),
        }
    }

    /// `Some(None)` for an explicit or implied `null`; `None` after an error.
    fn optional(&mut self, key: &str) -> Option<Option<&'a Value>> {
        match self.object.get(key) {
            None | Some(Value::Null) => Some(None),
            Some(v) => Some(Some(v)),
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.required(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.invalid(key, format!("must be a string, not {}", json_type(other)));
                None
            }
        }
    }

    fn nullable_string(&mut self, key: &str) -> Option<Option<String>> {
        match self.optional(key)? {
            None => Some(None),
            Some(Value::String(s)) => Some(Some(s.clone())),
            Some(other) => {
                self.invalid(
                    key,
                    format!("must be a string or null, not {}", json_type(other)),
                );
                None
            }
        }
    }

    fn integer(&mut self, key: &str) -> Option<String> {
        match self.required(key)? {
            Value::Number(n) if n.as_i64().is_some() || n.as_u64().is_some() => Some(n.to_string()),
            Value::Number(n) => {
                self.invalid(
                    key,
                    format!("must be an integer, not {}", cut(&n.to_string())),
                );
                None
            }
            other => {
                self.invalid(key, format!("must be a number, not {}", json_type(other)));
                None
            }
        }
    }

    fn boolean(&mut self, key: &str) -> Option<bool> {
        match self.required(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                self.invalid(key, format!("must be a boolean, not {}", json_type(other)));
                None
            }
        }
    }

    fn object(&mut self, key: &str) -> Option<&'a Map<String, Value>> {
        match self.required(key)? {
            Value::Object(o) => Some(o),
            other => {
                self.invalid(key, format!("must be an object, not {}", json_type(other)));
                None
            }
        }
    }

    /// ISO 8601 date-time → Unix ms.
    fn datetime(&mut self, key: &str) -> Option<i64> {
        let text = self.string(key)?;
        match parse_datetime(&text) {
            Some(ms) => Some(ms),
            None => {
                self.invalid(
                    key,
                    "must be an ISO 8601 date-time (e.g. 2024-06-01T00:00:00Z)",
                );
                None
            }
        }
    }

    fn nullable_datetime(&mut self, key: &str) -> Option<()> {
        let Some(text) = self.nullable_string(key)? else {
            return Some(());
        };
        if parse_datetime(&text).is_none() {
            self.invalid(
                key,
                "must be an ISO 8601 date-time (e.g. 2024-06-01T00:00:00Z) or null",
            );
            return None;
        }
        Some(())
    }

    fn nullable_date(&mut self, key: &str) -> Option<()> {
        let Some(text) = self.nullable_string(key)? else {
            return Some(());
        };
        if NaiveDate::parse_from_str(&text, "%Y-%m-%d").is_err() && parse_datetime(&text).is_none()
        {
            self.invalid(key, "must be an ISO 8601 date (e.g. 1990-01-01) or null");
            return None;
        }
        Some(())
    }

    /// A decimal as a string (`"199.99"`), kept exactly as sent.
    fn decimal(&mut self, key: &str) -> Option<String> {
        let text = self.string(key)?;
        if is_decimal(&text) {
            Some(text)
        } else {
            self.invalid(
                key,
                "must be a decimal number as a string (e.g. \"199.99\")",
            );
            None
        }
    }

    fn currency(&mut self, key: &str) -> Option<String> {
        let text = self.string(key)?;
        if is_currency(&text) {
            Some(text)
        } else {
            self.invalid(
                key,
                "must be an ISO 4217 currency code in lower case (e.g. \"try\")",
            );
            None
        }
    }

    fn email(&mut self, key: &str, normaliser: &Normaliser) -> Option<Address> {
        let text = self.string(key)?;
        match normaliser.address(Channel::Email, &text) {
            Ok(a) => Some(a),
            Err(m) => {
                self.invalid(key, m);
                None
            }
        }
    }

    /// An optional phone: `null` or an empty string is "no phone".
    fn phone(&mut self, key: &str, normaliser: &Normaliser) -> Option<Option<Address>> {
        match self.nullable_string(key)? {
            None => Some(None),
            Some(text) if text.trim().is_empty() => Some(None),
            Some(text) => match normaliser.address(Channel::Sms, &text) {
                Ok(a) => Some(Some(a)),
                Err(m) => {
                    self.invalid(key, m);
                    None
                }
            },
        }
    }
}

/// Input text as an error message quotes it: at most 64 characters (a number of 100,000 digits
/// is not repeated back), `…` when cut.
fn cut(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// ISO 8601 date-time → Unix ms. With an offset (RFC 3339, `Z` or `±hh:mm`); without one the
/// time is taken as UTC.
pub fn parse_datetime(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Some(t.timestamp_millis());
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    None
}

fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Active ISO 4217 codes (lower case).
const ISO_4217: &str = "aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd \
    bob bov brl bsd btn bwp byn bzd cad cdf che chf chw clf clp cny cop cou crc cuc cup cve czk \
    djf dkk dop dzd egp ern etb eur fjd fkp gbp gel ghs gip gmd gnf gtq gyd hkd hnl htg huf idr \
    ils inr iqd irr isk jmd jod jpy kes kgs khr kmf kpw krw kwd kyd kzt lak lbp lkr lrd lsl lyd \
    mad mdl mga mkd mmk mnt mop mru mur mvr mwk mxn mxv myr mzn nad ngn nio nok npr nzd omr pab \
    pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr sdg sek sgd shp sle sll sos srd ssp \
    stn svc syp szl thb tjs tmt tnd top try ttd twd tzs uah ugx usd usn uyi uyu uyw uzs ved ves \
    vnd vuv wst xaf xag xau xba xbb xbc xbd xcd xcg xdr xof xpd xpf xpt xsu xts xua xxx yer zar \
    zmw zwg zwl";

fn is_currency(text: &str) -> bool {
    text.len() == 3 && ISO_4217.split_whitespace().any(|c| c == text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Normaliser {
        Normaliser::new("TR").unwrap()
    }

    fn obj(text: &str) -> Map<String, Value> {
        parse_object(text.as_bytes()).unwrap()
    }

    pub const USER: &str = r#"{"pk":1,"username":"username","firstName":"Test","lastName":"User",
        "email":"user@example.com","phone":"05351234567","gender":"M","dateOfBirth":"1990-01-01",
        "languageCode":"tr","emailAllowed":true,"smsAllowed":true,"callAllowed":true,
        "whatsappAllowed":false,"isActive":true,"isStaff":false,"userType":"registered",
        "attributes":{"logged_ip":"127.0.0.1"},"dateJoined":"2024-01-01T00:00:00Z",
        "lastLogin":"2024-06-01T00:00:00Z","modifiedDate":"2024-06-01T00:00:00Z"}"#;

    #[test]
    fn document_user_example_parses_with_unknown_fields_kept() {
        let u = subscribe_user(&obj(USER), &n()).unwrap();
        assert_eq!(u.pk, "1");
        assert_eq!(u.email.normalised, "user@example.com");
        assert_eq!(u.phone.unwrap().normalised, "+905351234567");
        assert_eq!(u.modified_at, 1_717_200_000_000);
        assert!(u.email_allowed && u.sms_allowed && u.call_allowed && !u.whatsapp_allowed);
        assert_eq!(u.doc["username"], "username");
    }

    #[test]
    fn every_field_error_is_reported_with_its_name() {
        let mut o = obj(USER);
        o.remove("email");
        o.insert("pk".into(), Value::String("1".into()));
        o.insert("emailAllowed".into(), Value::String("yes".into()));
        o.insert("lastLogin".into(), Value::String("yesterday".into()));
        o.insert("attributes".into(), Value::Null);
        let errors = subscribe_user(&o, &n()).unwrap_err();
        let got: Vec<(&str, &str)> = errors.iter().map(|e| (e.code, e.field.as_str())).collect();
        assert_eq!(
            got,
            [
                ("invalid_field", "pk"),
                ("missing_field", "email"),
                ("invalid_field", "emailAllowed"),
                ("invalid_field", "lastLogin"),
                ("missing_field", "attributes"),
            ]
        );
    }

    #[test]
    fn nullable_fields_accept_null_and_absent() {
        let mut o = obj(USER);
        for key in ["phone", "gender", "dateOfBirth", "lastLogin"] {
            o.insert(key.into(), Value::Null);
        }
        o.remove("gender");
        let u = subscribe_user(&o, &n()).unwrap();
        assert!(u.phone.is_none());
    }

    #[test]
    fn order_item_errors_name_the_item_path() {
        let body = format!(
            r#"{{"pk":1,"number":"ORD-0001","status":"approved","currency":"TRY","amount":"199.99",
            "discountAmount":"10.00","shippingAmount":0,"createdDate":"2024-01-01T00:00:00Z",
            "user":{USER},"orderItems":[{{"pk":1,"product":{{"pk":10}},"price":"9,99",
            "priceCurrency":"try","taxRate":"18.00","status":"approved"}}]}}"#
        );
        let errors = order_info(&obj(&body), &n()).unwrap_err();
        let got: Vec<(&str, &str)> = errors.iter().map(|e| (e.code, e.field.as_str())).collect();
        assert_eq!(
            got,
            [
                ("invalid_field", "currency"),
                ("invalid_field", "shippingAmount"),
                ("missing_field", "orderItems[0].product.sku"),
                ("invalid_field", "orderItems[0].price"),
            ]
        );
    }

    #[test]
    fn a_huge_non_integer_is_not_echoed_back_in_full() {
        let mut o = obj(USER);
        let huge = format!("1{}.5", "0".repeat(10_000));
        o.insert("pk".into(), serde_json::from_str(&huge).unwrap());
        let errors = subscribe_user(&o, &n()).unwrap_err();
        assert_eq!(
            (errors[0].code, errors[0].field.as_str()),
            ("invalid_field", "pk")
        );
        assert!(errors[0]
            .message
            .starts_with("must be an integer, not 1000"));
        assert!(
            errors[0].message.chars().count() < 100,
            "{}",
            errors[0].message
        );
        let small = subscribe_user(&obj(&USER.replace(r#""pk":1"#, r#""pk":1.5"#)), &n());
        assert_eq!(small.unwrap_err()[0].message, "must be an integer, not 1.5");
    }

    #[test]
    fn decimals_currencies_and_dates() {
        for ok in ["0", "199.99", "-1.5", "10.00"] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in ["", "1.", ".5", "1e3", "9,99", " 1", "+1", "NaN"] {
            assert!(!is_decimal(bad), "{bad}");
        }
        assert!(is_currency("try") && is_currency("eur") && is_currency("usd"));
        assert!(!is_currency("TRY") && !is_currency("abc") && !is_currency("tr"));
        assert_eq!(
            parse_datetime("2024-06-01T00:00:00Z"),
            Some(1_717_200_000_000)
        );
        assert_eq!(
            parse_datetime("2024-06-01T03:00:00.000+03:00"),
            Some(1_717_200_000_000)
        );
        assert_eq!(
            parse_datetime("2024-06-01T00:00:00"),
            Some(1_717_200_000_000)
        );
        assert_eq!(
            parse_datetime("2024-06-01T03:00:00+0300"),
            Some(1_717_200_000_000)
        );
        assert_eq!(parse_datetime("01/06/2024"), None);
    }
}
