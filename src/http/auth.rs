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
        secrecy::SecretString::deserialize(deserializer).map(Secret)
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
