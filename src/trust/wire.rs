//! Encoding helpers shared by the trust records: capped CBOR, the fixed byte layouts that
//! get signed or authenticated, and OS randomness.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::TrustError;

/// Encodes `value` as CBOR.
pub(crate) fn to_cbor<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, TrustError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| TrustError::Encode {
        what,
        detail: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes CBOR from outside the process.
///
/// The size cap is checked before anything is decoded. ciborium grows strings and byte
/// strings only as bytes actually arrive, so a hostile length header cannot make it
/// allocate more than the (capped) input. Trailing bytes are refused so that one record
/// has one encoding.
pub(crate) fn from_cbor<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, TrustError> {
    if bytes.len() > max {
        return Err(TrustError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let mut rest = bytes;
    let value = ciborium::from_reader(&mut rest).map_err(|e| TrustError::Malformed {
        what,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(TrustError::Malformed {
            what,
            detail: format!("{} unexpected bytes after the record", rest.len()),
        });
    }
    Ok(value)
}

/// Builds the exact bytes that a signature or MAC covers.
///
/// Signed bytes never go through serde: a fixed layout with length prefixes cannot be
/// re-encoded differently by another serializer version, and no field can bleed into the
/// next one.
pub(crate) struct Transcript {
    bytes: Vec<u8>,
}

impl Transcript {
    /// Starts with a domain tag, so bytes signed for one purpose never verify for another.
    pub(crate) fn new(domain: &[u8]) -> Self {
        let mut t = Self { bytes: Vec::new() };
        t.bytes_field(domain);
        t
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A variable-length field, prefixed with its length.
    pub(crate) fn bytes_field(&mut self, v: &[u8]) -> &mut Self {
        // Lengths of signed fields are capped far below 4 GiB by their records; a u64
        // prefix keeps the layout unambiguous even if a cap were ever lifted.
        self.u64(v.len() as u64);
        self.bytes.extend_from_slice(v);
        self
    }

    pub(crate) fn str_field(&mut self, v: &str) -> &mut Self {
        self.bytes_field(v.as_bytes())
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Random bytes from the operating system.
///
/// Keys and nonces come from here rather than from a caller-supplied generator: threading
/// an RNG through every seal would buy determinism only where it must never be used.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], TrustError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| TrustError::Random(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbor_refuses_oversized_input_before_decoding_and_trailing_bytes_after() {
        let bytes = to_cbor("test", &(1u8, "x")).unwrap();
        let back: (u8, String) = from_cbor("test", &bytes, 64).unwrap();
        assert_eq!(back, (1, "x".to_string()));

        let err = from_cbor::<(u8, String)>("test", &bytes, 2).unwrap_err();
        assert!(matches!(err, TrustError::TooLarge { max: 2, .. }), "{err}");

        let mut longer = bytes.clone();
        longer.push(0);
        let err = from_cbor::<(u8, String)>("test", &longer, 64).unwrap_err();
        assert!(err.to_string().contains("unexpected bytes"), "{err}");
    }

    #[test]
    fn a_hostile_length_header_does_not_allocate_its_claim() {
        // A byte string that claims 2^63 bytes but carries none.
        let bytes = [0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(from_cbor::<serde_bytes::ByteBuf>("test", &bytes, 64).is_err());
    }

    #[test]
    fn transcripts_separate_fields() {
        let mut a = Transcript::new(b"d");
        a.str_field("ab").str_field("c");
        let mut b = Transcript::new(b"d");
        b.str_field("a").str_field("bc");
        assert_ne!(a.finish(), b.finish());
    }
}
