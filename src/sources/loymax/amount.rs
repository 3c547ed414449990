//! Exact decimal amounts. Loymax sends money as JSON numbers with a fixed number of decimals
//! (`135.0000`, `-6.6700`); serde_json keeps their text (`arbitrary_precision`), and sums are
//! done here on integers with a scale, never through a float.

use std::{cmp::Ordering, fmt};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Number, Value};

/// Largest scale (digits after the point) accepted.
const MAX_SCALE: u32 = 18;

/// `units / 10^scale`, exactly.
#[derive(Debug, Clone, Copy, Default)]
pub struct Amount {
    units: i128,
    scale: u32,
}

impl Amount {
    /// A decimal number as JSON writes it: optional `-`, digits, optional fraction, optional
    /// exponent. `None` for anything else (and for values too large to hold exactly).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
            None => (text, 0),
        };
        let (negative, digits) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if (whole.is_empty() && fraction.is_empty())
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let mut units: i128 = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            units = units.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        let mut scale = i64::try_from(fraction.len()).ok()? - i64::from(exponent);
        if units == 0 {
            // `0e999999999` is zero; do not scale it digit by digit.
            scale = scale.clamp(0, i64::from(MAX_SCALE));
        }
        while scale < 0 {
            units = units.checked_mul(10)?;
            scale += 1;
        }
        let scale = u32::try_from(scale).ok().filter(|s| *s <= MAX_SCALE)?;
        Some(Self {
            units: if negative { -units } else { units },
            scale,
        })
    }

    /// A JSON number, or a string holding one.
    pub fn from_json(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => Self::parse(&n.to_string()),
            Value::String(s) => Self::parse(s),
            _ => None,
        }
    }

    fn rescaled(self, scale: u32) -> Option<i128> {
        self.units
            .checked_mul(10i128.checked_pow(scale - self.scale)?)
    }

    /// The exact sum, at the larger of the two scales; `None` on overflow.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        let scale = self.scale.max(other.scale);
        Some(Self {
            units: self.rescaled(scale)?.checked_add(other.rescaled(scale)?)?,
            scale,
        })
    }

    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.checked_add(Self {
            units: other.units.checked_neg()?,
            scale: other.scale,
        })
    }

    pub fn abs(self) -> Self {
        Self {
            units: self.units.saturating_abs(),
            scale: self.scale,
        }
    }

    /// As a JSON number with exactly this text (`35.0000` stays `35.0000`).
    pub fn to_number(self) -> Number {
        // The text is always a valid JSON number; the fallback is unreachable in practice.
        self.to_string().parse().unwrap_or_else(|_| Number::from(0))
    }
}

impl PartialEq for Amount {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Amount {}

impl PartialOrd for Amount {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Amount {
    /// Numeric order: `1.50` equals `1.5`.
    fn cmp(&self, other: &Self) -> Ordering {
        let scale = self.scale.max(other.scale);
        match (self.rescaled(scale), other.rescaled(scale)) {
            (Some(a), Some(b)) => a.cmp(&b),
            // Only reachable with huge values: compare signs, then give up on precision.
            _ => self.units.signum().cmp(&other.units.signum()),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.units.unsigned_abs().to_string();
        let sign = if self.units < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (whole, fraction) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{whole}.{fraction}")
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_number().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Self::from_json(&value)
            .ok_or_else(|| serde::de::Error::custom(format!("{value} is not a decimal amount")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    #[test]
    fn amounts_keep_their_decimal_text() {
        for text in ["135.0000", "-6.6700", "0", "6.67", "0.0001", "-0.5000"] {
            assert_eq!(a(text).to_string(), text);
        }
        assert_eq!(a("1e2").to_string(), "100");
        assert_eq!(a("1.5E-3").to_string(), "0.0015");
        assert_eq!(a("0e2000000000").to_string(), "0");
    }

    #[test]
    fn sums_are_exact_at_the_larger_scale() {
        let net = a("135.0000").checked_sub(a("100.0000")).unwrap();
        assert_eq!(net.to_string(), "35.0000");
        let sum = a("0.1").checked_add(a("0.2")).unwrap();
        assert_eq!(sum.to_string(), "0.3");
        assert_eq!(
            a("-6.6700").checked_add(a("-3.33")).unwrap().to_string(),
            "-10.0000"
        );
        assert_eq!(
            Amount::default().checked_add(a("41.67")).unwrap(),
            a("41.6700")
        );
    }

    #[test]
    fn anything_but_a_decimal_number_is_refused() {
        for bad in [
            "", "-", ".", "abc", "1.2.3", "1e", "NaN", "1e400", "1,5", "1e-400",
        ] {
            assert!(Amount::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn json_numbers_and_numeric_strings_are_read_without_floats() {
        let v: Value = serde_json::from_str(r#"[135.0000, "62.5100", true]"#).unwrap();
        assert_eq!(Amount::from_json(&v[0]).unwrap().to_string(), "135.0000");
        assert_eq!(Amount::from_json(&v[1]).unwrap().to_string(), "62.5100");
        assert!(Amount::from_json(&v[2]).is_none());
        let back = serde_json::to_string(&a("35.0000")).unwrap();
        assert_eq!(back, "35.0000");
    }
}
