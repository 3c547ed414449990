//! Lowercase hexadecimal text for digests and raw bytes (hot on the ingest path: every snapshot's
//! content hash), without a per-character iterator.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex, two digits per byte.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    // Only ASCII digits were pushed.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_every_byte_as_two_lowercase_digits() {
        assert_eq!(super::encode([0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::encode(b""), "");
    }
}
