//! Reading Loymax bodies defensively: a lenient parse (the merge example of the document ends
//! its object with a trailing comma) and small accessors that accept the spellings and types
//! real senders use.

use serde_json::{Map, Value};

/// Parse a body as JSON. A strict parse first; if that fails, once more after removing trailing
/// commas (a `,` followed only by whitespace and `}` or `]`, outside strings) and a leading
/// byte-order mark. Returns the value and whether the lenient pass was needed.
pub fn parse_lenient(body: &[u8]) -> Result<(Value, bool), serde_json::Error> {
    match serde_json::from_slice(body) {
        Ok(value) => Ok((value, false)),
        Err(strict) => {
            let repaired = repair(body);
            if repaired == body {
                return Err(strict);
            }
            serde_json::from_slice(&repaired).map(|value| (value, true))
        }
    }
}

/// The body without a UTF-8 byte-order mark and without trailing commas.
fn repair(body: &[u8]) -> Vec<u8> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut out = Vec::with_capacity(body.len());
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b',' {
            let next = body[i + 1..]
                .iter()
                .find(|c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'));
            if matches!(next, Some(b'}' | b']')) {
                continue;
            }
        }
        out.push(b);
    }
    out
}

/// The first of `keys` present with a non-null value.
pub fn field<'a>(object: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .filter_map(|k| object.get(*k))
        .find(|v| !v.is_null())
}

/// An identifier as text: a non-empty (trimmed) string, or a number kept as its decimal text.
pub fn id_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.trim()).filter(|s| !s.is_empty()).map(str::to_owned),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A boolean, also when sent as `"true"`/`"false"` (any case) or `1`/`0`.
pub fn flag(value: Option<&Value>) -> Option<bool> {
    match value? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => match n.to_string().as_str() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A nested object, when it is one.
pub fn nested<'a>(parent: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a Map<String, Value>> {
    field(parent, keys).and_then(Value::as_object)
}

/// A value worth keeping: `None` for null, absent and empty strings.
pub fn present(value: Option<&Value>) -> Option<Value> {
    match value? {
        Value::Null => None,
        Value::String(s) if s.trim().is_empty() => None,
        v => Some(v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_commas_outside_strings_are_removed() {
        let body = br#"{"a": [1, 2, ], "b": {"c": "x,}", }, }"#;
        let (value, lenient) = parse_lenient(body).unwrap();
        assert!(lenient);
        assert_eq!(value["a"], serde_json::json!([1, 2]));
        assert_eq!(value["b"]["c"], "x,}");
    }

    #[test]
    fn valid_json_is_parsed_strictly_and_escapes_are_respected() {
        let (value, lenient) = parse_lenient(br#"{"q": "say \", }"}"#).unwrap();
        assert!(!lenient);
        assert_eq!(value["q"], "say \", }");
        let (value, lenient) = parse_lenient(b"\xEF\xBB\xBF{\"a\":1}").unwrap();
        assert!(lenient);
        assert_eq!(value["a"], 1);
    }

    #[test]
    fn what_is_not_json_even_leniently_stays_an_error() {
        for body in [
            &b"{nope"[..],
            b"",
            b"{\"a\":1,,}",
            b"\xff\xfe",
            b"{\"a\":1} x",
        ] {
            assert!(parse_lenient(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn accessors_accept_the_spellings_senders_use() {
        let v: Value = serde_json::from_str(
            r#"{"customerId": 121, "accountfroupId": "111", "s": " ", "t": "TRUE", "n": null}"#,
        )
        .unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(id_text(field(o, &["customerId"])).as_deref(), Some("121"));
        assert_eq!(
            id_text(field(o, &["accountgroupId", "accountfroupId"])).as_deref(),
            Some("111")
        );
        assert_eq!(id_text(field(o, &["s"])), None);
        assert_eq!(flag(field(o, &["t"])), Some(true));
        assert_eq!(field(o, &["n", "customerId"]).unwrap(), 121);
        assert_eq!(present(o.get("s")), None);
    }
}
