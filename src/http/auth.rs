//! Credentials on HTTP requests: parsing `Authorization` and comparing secrets in constant time.
//! Secrets never reach logs: callers log only which credential (user name) matched.

use base64::Engine;

/// What an `Authorization` header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    Basic { user: String, password: String },
    Bearer(String),
}

/// Why a header could not be read as a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthHeaderError {
    Missing,
    Malformed,
}

/// Parse `Authorization: Basic base64(user:password)` or `Authorization: Bearer token`.
pub fn parse_authorization(value: Option<&str>) -> Result<Presented, AuthHeaderError> {
    let value = value.map(str::trim).filter(|v| !v.is_empty());
    let Some(value) = value else {
        return Err(AuthHeaderError::Missing);
    };
    let (scheme, rest) = value.split_once(' ').ok_or(AuthHeaderError::Malformed)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| AuthHeaderError::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| AuthHeaderError::Malformed)?;
        let (user, password) = text.split_once(':').ok_or(AuthHeaderError::Malformed)?;
        Ok(Presented::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Ok(Presented::Bearer(rest.to_owned()))
    } else {
        Err(AuthHeaderError::Malformed)
    }
}

/// Compare two secrets in constant time (`subtle`): no early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

/// A configured secret string that never prints: held in a `secrecy::SecretString` (zeroed when
/// dropped, `***` in `Debug`). It serialises as itself only for the redacted copy `config print`
/// renders (see [`Secret::redacted`]).
#[derive(Clone, Default)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(secrecy::SecretString::from(s.into()))
    }
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
    /// `***` when set, empty when not: for `config print`.
    pub fn redacted(&self) -> Secret {
        if self.expose().is_empty() {
            Secret::new("")
        } else {
            Secret::new("***")
        }
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Reads a secret; a value of the wrong type is refused without being quoted (serde's own
/// message would print it: "invalid type: integer `123…`").
struct SecretVisitor;

impl SecretVisitor {
    fn refuse<E: serde::de::Error>(kind: &str) -> Result<Secret, E> {
        Err(E::custom(format!(
            "expected a string, found {kind} (the value is a secret and is not shown)"
        )))
    }
}

impl<'de> serde::de::Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret::new(v))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret::new(v))
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
        Self::refuse("a boolean")
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
        Self::refuse("an integer")
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
        Self::refuse("an integer")
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
        Self::refuse("a number")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Self::refuse("an array")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Self::refuse("a table")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_of_the_wrong_type_is_refused_without_showing_it() {
        #[derive(serde::Deserialize)]
        struct Admin {
            #[allow(dead_code)]
            token: Secret,
        }
        // `message()`: what the configuration loader reports (without toml's source snippet).
        let err = toml::from_str::<Admin>("token = 987654321")
            .err()
            .expect("an integer is not a secret")
            .message()
            .to_owned();
        assert!(err.contains("expected a string, found an integer"), "{err}");
        assert!(!err.contains("987654321"), "the value is not shown: {err}");
        let ok: Admin = toml::from_str("token = \"s3cret\"").unwrap();
        assert_eq!(ok.token.expose(), "s3cret");
    }

    #[test]
    fn basic_and_bearer_headers_parse() {
        // "user:pa:ss" — the password may contain a colon.
        let b64 = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        assert_eq!(
            parse_authorization(Some(&format!("Basic {b64}"))),
            Ok(Presented::Basic {
                user: "user".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(
            parse_authorization(Some("Bearer abc")),
            Ok(Presented::Bearer("abc".into()))
        );
        assert_eq!(parse_authorization(None), Err(AuthHeaderError::Missing));
        assert_eq!(
            parse_authorization(Some("Basic !!!")),
            Err(AuthHeaderError::Malformed)
        );
        assert_eq!(
            parse_authorization(Some("Digest x")),
            Err(AuthHeaderError::Malformed)
        );
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.redacted().expose(), "***");
    }
}
