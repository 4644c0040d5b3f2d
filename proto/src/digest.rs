//! Content digests: SHA-256 and BLAKE3, both 32 bytes.
//!
//! A [`Digest`] is always valid once constructed: a supported function, a
//! 32-byte hash and a non-negative size. Parsing untrusted input is the only
//! way in from the wire, so every service gets the same checks and messages.

use std::fmt;

use sha2::Digest as _;

use crate::error::{Error, Result};
use crate::reapi;

/// Length of every supported hash, in bytes.
pub const HASH_SIZE_BYTES: usize = 32;

/// The digest functions Kiln accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The REAPI enum value.
    pub fn to_proto(self) -> reapi::digest_function::Value {
        match self {
            DigestFunction::Sha256 => reapi::digest_function::Value::Sha256,
            DigestFunction::Blake3 => reapi::digest_function::Value::Blake3,
        }
    }

    /// Interprets a request's `digest_function` field. `Ok(None)` means the
    /// field was unset and the function must be inferred from the hash.
    pub fn from_proto(value: i32) -> Result<Option<DigestFunction>> {
        use reapi::digest_function::Value;
        match Value::try_from(value) {
            Ok(Value::Unknown) => Ok(None),
            Ok(Value::Sha256) => Ok(Some(DigestFunction::Sha256)),
            Ok(Value::Blake3) => Ok(Some(DigestFunction::Blake3)),
            Ok(other) => Err(Error::invalid_argument(format!(
                "digest function {} is not supported; this server supports sha256 and blake3",
                other.as_str_name().to_ascii_lowercase()
            ))),
            Err(_) => Err(Error::invalid_argument(format!(
                "unknown digest function value {value}; this server supports sha256 (1) and blake3 (9)"
            ))),
        }
    }

    /// The lowercase name used in ByteStream resource names.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// Parses the lowercase name used in ByteStream resource names.
    pub fn from_name(name: &str) -> Option<DigestFunction> {
        match name {
            "sha256" => Some(DigestFunction::Sha256),
            "blake3" => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The digest of `data` under this function.
    pub fn compute(self, data: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(data);
        // A slice is at most isize::MAX bytes long, so its length fits the wire's int64.
        Digest::from_valid(self, hasher.finalize(), data.len() as u64)
    }

    /// The digest of the empty blob, which every CAS holds implicitly.
    pub fn empty(self) -> Digest {
        self.compute(&[])
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An incremental hasher for one of the supported functions.
#[derive(Debug, Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn function(&self) -> DigestFunction {
        match self {
            Hasher::Sha256(_) => DigestFunction::Sha256,
            Hasher::Blake3(_) => DigestFunction::Blake3,
        }
    }

    /// The hash of everything passed to [`Hasher::update`], with the byte count
    /// supplied by the caller (hashers do not track it).
    pub fn finalize(self) -> [u8; HASH_SIZE_BYTES] {
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }

    /// Finalizes into a digest of `size_bytes` bytes; fails for sizes the
    /// wire's `int64` cannot carry.
    pub fn into_digest(self, size_bytes: u64) -> Result<Digest> {
        let function = self.function();
        Digest::new(function, self.finalize(), size_bytes)
    }
}

/// Decodes 64 lowercase hex digits in one pass; `None` for anything else.
/// Each byte's value as a lowercase hex digit, or 0xff.
const NIBBLES: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut c: u8 = 0;
    while c < 10 {
        table[(b'0' + c) as usize] = c;
        c += 1;
    }
    let mut c: u8 = 0;
    while c < 6 {
        table[(b'a' + c) as usize] = 10 + c;
        c += 1;
    }
    table
};

fn decode_lowercase_hex(hex: &[u8]) -> Option<[u8; HASH_SIZE_BYTES]> {
    if hex.len() != HASH_SIZE_BYTES * 2 {
        return None;
    }
    // Branch-free: every digit is looked up, and any invalid one (0xff)
    // shows in the union of all of them. FindMissingBlobs decodes one hash
    // per digest, up to tens of thousands a call.
    let mut out = [0u8; HASH_SIZE_BYTES];
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (NIBBLES[usize::from(pair[0])], NIBBLES[usize::from(pair[1])]);
        invalid |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    (invalid & 0xf0 == 0).then_some(out)
}

/// A validated content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    function: DigestFunction,
    hash: [u8; HASH_SIZE_BYTES],
    size_bytes: u64,
}

use crate::limits::DIGEST_SIZE_BYTES_MAX as SIZE_BYTES_MAX;

impl Digest {
    /// A digest of `size_bytes` bytes whose hash is `hash`; fails for sizes
    /// above `i64::MAX`, which the wire cannot carry.
    pub fn new(function: DigestFunction, hash: [u8; HASH_SIZE_BYTES], size_bytes: u64) -> Result<Self> {
        if size_bytes > SIZE_BYTES_MAX {
            return Err(Error::invalid_argument(format!(
                "digest size {size_bytes} is larger than the largest int64"
            )));
        }
        Ok(Self::from_valid(function, hash, size_bytes))
    }

    /// The one place a `Digest` is assembled; callers have checked the size.
    fn from_valid(function: DigestFunction, hash: [u8; HASH_SIZE_BYTES], size_bytes: u64) -> Self {
        assert!(size_bytes <= SIZE_BYTES_MAX, "digest sizes fit in int64");
        Self { function, hash, size_bytes }
    }

    /// Parses a hash given as lowercase hex and a size, as found on the wire.
    /// `function` is the request's explicit choice, if any; without one, the
    /// function is inferred from the hash length (64 hex digits: SHA-256).
    pub fn parse(function: Option<DigestFunction>, hash_hex: &str, size_bytes: i64) -> Result<Self> {
        if size_bytes < 0 {
            return Err(Error::invalid_argument(format!(
                "digest {hash_hex}/{size_bytes}: size_bytes must not be negative"
            )));
        }
        let expected_hex_len = HASH_SIZE_BYTES * 2;
        if hash_hex.len() != expected_hex_len {
            let what = match function {
                Some(f) => format!("{f} hashes are {expected_hex_len} hex digits"),
                None => format!(
                    "without a digest_function only sha256 hashes ({expected_hex_len} hex digits) are accepted; this server supports sha256 and blake3"
                ),
            };
            return Err(Error::invalid_argument(format!(
                "digest {}/{size_bytes}: hash has {} characters; {what}",
                crate::text::quoted(hash_hex),
                hash_hex.len()
            )));
        }
        let Some(hash) = decode_lowercase_hex(hash_hex.as_bytes()) else {
            return Err(Error::invalid_argument(format!(
                "digest {}/{size_bytes}: hash must be lowercase hexadecimal",
                crate::text::quoted(hash_hex)
            )));
        };
        Ok(Self::from_valid(function.unwrap_or(DigestFunction::Sha256), hash, size_bytes.unsigned_abs()))
    }

    /// Parses a REAPI `Digest` message under the request's `digest_function`.
    pub fn from_proto(function: Option<DigestFunction>, digest: &reapi::Digest) -> Result<Self> {
        Self::parse(function, &digest.hash, digest.size_bytes)
    }

    /// Like [`Digest::from_proto`] for a field that must be set.
    pub fn from_required(
        function: Option<DigestFunction>,
        digest: Option<&reapi::Digest>,
        field: &str,
    ) -> Result<Self> {
        match digest {
            Some(d) => Self::from_proto(function, d).map_err(|e| e.context(field)),
            None => Err(Error::invalid_argument(format!("{field} is required"))),
        }
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size_bytes_i64() }
    }

    pub fn function(&self) -> DigestFunction {
        self.function
    }

    pub fn hash(&self) -> &[u8; HASH_SIZE_BYTES] {
        &self.hash
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The size as the wire's `int64`; every `Digest` fits (see [`Digest::new`]).
    pub fn size_bytes_i64(&self) -> i64 {
        i64::try_from(self.size_bytes).unwrap_or(i64::MAX)
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size_bytes == 0 && *self == self.function.empty()
    }

    /// Checks that `data` is exactly the blob this digest names.
    pub fn verify(&self, data: &[u8]) -> Result<()> {
        if data.len() as u64 != self.size_bytes {
            return Err(Error::invalid_argument(format!(
                "blob {self}: received {} bytes, but the digest says {}",
                data.len(),
                self.size_bytes
            )));
        }
        let actual = self.function.compute(data);
        self.check_hash(actual.hash)
    }

    /// Checks a hash computed incrementally against this digest.
    pub fn check_hash(&self, actual: [u8; HASH_SIZE_BYTES]) -> Result<()> {
        if actual != self.hash {
            return Err(Error::invalid_argument(format!(
                "blob {self}: the data's {} hash is {}; the upload does not match its digest",
                self.function,
                hex::encode(actual)
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.function != DigestFunction::Sha256 {
            write!(f, "{}:", self.function)?;
        }
        write!(f, "{}/{}", hex::encode(self.hash), self.size_bytes)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_BLAKE3: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    /// Every byte value, in every position: accepted exactly when it is a
    /// lowercase hex digit, and decoded to its value.
    #[test]
    fn hex_decoding_accepts_exactly_lowercase_digits() {
        for position in [0, 1, 37, 63] {
            for b in 0..=255u8 {
                let mut hex = [b'0'; 64];
                hex[position] = b;
                let valid = b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
                let decoded = decode_lowercase_hex(&hex);
                assert_eq!(decoded.is_some(), valid, "byte {b} at {position}");
                if let Some(bytes) = decoded {
                    let value = u8::from_str_radix(std::str::from_utf8(&[b]).unwrap(), 16).unwrap();
                    let expected = if position % 2 == 0 { value << 4 } else { value };
                    assert_eq!(bytes[position / 2], expected);
                }
            }
        }
    }

    #[test]
    fn empty_digests_match_known_values() {
        assert_eq!(DigestFunction::Sha256.empty().hash_hex(), EMPTY_SHA256);
        assert_eq!(DigestFunction::Blake3.empty().hash_hex(), EMPTY_BLAKE3);
        assert!(DigestFunction::Blake3.empty().is_empty_blob());
    }

    #[test]
    fn parse_infers_sha256_from_length() {
        let d = Digest::parse(None, EMPTY_SHA256, 0).unwrap();
        assert_eq!(d.function(), DigestFunction::Sha256);
        assert_eq!(d.to_proto().hash, EMPTY_SHA256);
        assert_eq!(d.to_string(), format!("{EMPTY_SHA256}/0"));
    }

    #[test]
    fn parse_honours_explicit_function() {
        let d = Digest::parse(Some(DigestFunction::Blake3), EMPTY_BLAKE3, 0).unwrap();
        assert_eq!(d.function(), DigestFunction::Blake3);
        assert_eq!(d.to_string(), format!("blake3:{EMPTY_BLAKE3}/0"));
        d.verify(b"").unwrap();
    }

    #[test]
    fn parse_rejects_bad_input() {
        let cases: &[(&str, i64, &str)] = &[
            (EMPTY_SHA256, -1, "negative"),
            ("abc", 3, "3 characters"),
            (&EMPTY_SHA256[..40], 3, "40 characters"),
            (&EMPTY_SHA256.to_uppercase(), 0, "lowercase hexadecimal"),
            (&format!("{}zz", &EMPTY_SHA256[..62]), 0, "lowercase hexadecimal"),
            ("", 0, "0 characters"),
        ];
        for (hash, size, needle) in cases {
            let err = Digest::parse(None, hash, *size).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{hash}");
            assert!(err.message().contains(needle), "{}: wanted {needle}", err.message());
        }
    }

    #[test]
    fn from_proto_digest_function_values() {
        assert_eq!(DigestFunction::from_proto(0).unwrap(), None);
        assert_eq!(DigestFunction::from_proto(1).unwrap(), Some(DigestFunction::Sha256));
        assert_eq!(DigestFunction::from_proto(9).unwrap(), Some(DigestFunction::Blake3));
        let md5 = DigestFunction::from_proto(3).unwrap_err();
        assert!(md5.message().contains("md5"), "{}", md5.message());
        assert_eq!(DigestFunction::from_proto(999).unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn verify_detects_size_and_hash_mismatch() {
        let d = DigestFunction::Sha256.compute(b"hello");
        d.verify(b"hello").unwrap();
        assert!(d.verify(b"hell").unwrap_err().message().contains("received 4 bytes"));
        assert!(d.verify(b"jello").unwrap_err().message().contains("does not match"));
    }

    #[test]
    fn incremental_hash_equals_one_shot() {
        for f in DigestFunction::ALL {
            let mut h = f.hasher();
            h.update(b"hel");
            h.update(b"lo");
            assert_eq!(h.into_digest(5).unwrap(), f.compute(b"hello"));
        }
    }

    #[test]
    fn sizes_beyond_int64_are_unrepresentable() {
        let hash = *DigestFunction::Sha256.empty().hash();
        let err = Digest::new(DigestFunction::Sha256, hash, u64::MAX).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(DigestFunction::Sha256.hasher().into_digest(1 << 63).is_err());
        let max = Digest::new(DigestFunction::Sha256, hash, i64::MAX as u64).unwrap();
        assert_eq!(max.size_bytes_i64(), i64::MAX);
    }

    #[test]
    fn names_round_trip() {
        for f in DigestFunction::ALL {
            assert_eq!(DigestFunction::from_name(f.name()), Some(f));
            assert_eq!(DigestFunction::from_proto(f.to_proto() as i32).unwrap(), Some(f));
        }
        assert_eq!(DigestFunction::from_name("SHA256"), None);
    }
}

impl std::str::FromStr for Digest {
    type Err = Error;

    /// Parses the [`Display`](fmt::Display) form: `[blake3:]HASH/SIZE`.
    fn from_str(s: &str) -> Result<Self> {
        let (function, rest) = match s.split_once(':') {
            Some((name, rest)) => match DigestFunction::from_name(name) {
                Some(f) => (Some(f), rest),
                None => {
                    return Err(Error::invalid_argument(format!(
                        "unknown digest function {} in {}",
                        crate::text::quoted(name),
                        crate::text::quoted(s)
                    )));
                }
            },
            None => (None, s),
        };
        let Some((hash, size)) = rest.split_once('/') else {
            return Err(Error::invalid_argument(format!(
                "digest {} is not of the form [blake3:]HASH/SIZE",
                crate::text::quoted(s)
            )));
        };
        let size: i64 = size.parse().map_err(|_| {
            Error::invalid_argument(format!("digest {}: size is not a number", crate::text::quoted(s)))
        })?;
        Self::parse(function, hash, size)
    }
}

#[cfg(test)]
mod from_str_tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        for f in DigestFunction::ALL {
            let d = f.compute(b"kiln");
            assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
        assert!("nohash".parse::<Digest>().is_err());
        assert!("md5:abc/1".parse::<Digest>().is_err());
    }
}
