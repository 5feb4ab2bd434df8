//! Validation rules. Every error names the field it is about, so that the API
//! can hand it to the user unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that breaks a rule; `Display` is `field: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field (JSON name, dotted for nesting: `drivers[2]`).
    pub field: String,
    /// What is wrong, with the offending value where it helps.
    pub message: String,
}

impl ValidationError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A validated name: `[a-z0-9][a-z0-9-]{0,62}`. Safe to embed in a store key
/// or a URL path segment without escaping.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
pub struct Name(String);

impl Name {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Name {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate_name("name", &s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The name rule as a regular expression, as the OpenAPI document states it.
pub const NAME_PATTERN: &str = "^[a-z0-9][a-z0-9-]{0,62}$";

/// Text without control characters (`char::is_control`: the Unicode category Cc,
/// U+0000..=U+001F and U+007F..=U+009F), as the OpenAPI document states the rule of
/// [`validate_cmdline`] and of the other free-text fields.
pub const NO_CONTROL_PATTERN: &str = "^[^\\x00-\\x1f\\x7f-\\x9f]*$";

/// [`validate_agent_url`]'s rule as a regular expression: `http://` or `https://`, then
/// at least one character, none of them whitespace or control characters.
pub const AGENT_URL_PATTERN: &str = "^https?://[^\\s\\x00-\\x1f\\x7f-\\x9f]+$";

/// Shortest and longest prefix of a network's subnet ([`parse_cidr`]).
pub const CIDR_PREFIXES: std::ops::RangeInclusive<u8> = 8..=30;

/// A regular expression matching exactly what [`parse_cidr`] accepts: a dotted IPv4
/// network address (no leading zeros) with a prefix in [`CIDR_PREFIXES`] and no host
/// bits set, one alternative per prefix.
pub fn cidr_pattern() -> String {
    const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    let mut alternatives = Vec::new();
    for prefix in CIDR_PREFIXES {
        let full = usize::from(prefix / 8);
        let partial_bits = prefix % 8;
        let mut octets: Vec<String> = vec![OCTET.to_owned(); full];
        if octets.len() < 4 {
            let step = 1u16 << (8 - partial_bits);
            let values: Vec<String> = (0..256u16)
                .step_by(usize::from(step))
                .map(|v| v.to_string())
                .collect();
            octets.push(if values.len() == 1 {
                values.concat()
            } else {
                format!("({})", values.join("|"))
            });
        }
        octets.resize(4, "0".to_owned());
        alternatives.push(format!("{}/{prefix}", octets.join("\\.")));
    }
    format!("^({})$", alternatives.join("|"))
}

/// Checks `value` against the name rule `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(field: &str, value: &str) -> Result<Name, ValidationError> {
    const RULE: &str = "must match [a-z0-9][a-z0-9-]{0,62}";
    let bytes = value.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(ValidationError::new(field, format!("{RULE}, got empty")));
    };
    let ok = bytes.len() <= 63
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(Name(value.to_owned()))
    } else {
        Err(ValidationError::new(
            field,
            format!("{RULE}, got {:?}", truncate(value, 80)),
        ))
    }
}

/// Checks `min <= value <= max`.
pub fn validate_range<T>(field: &str, value: T, min: T, max: T) -> Result<T, ValidationError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if value < min || value > max {
        Err(ValidationError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ))
    } else {
        Ok(value)
    }
}

/// Checks a host-local file path: absolute, at most 4096 bytes, no NUL.
pub fn validate_path(field: &str, value: &str) -> Result<(), ValidationError> {
    if !value.starts_with('/') {
        return Err(ValidationError::new(
            field,
            format!("must be an absolute path, got {:?}", truncate(value, 80)),
        ));
    }
    if value.len() > 4096 {
        return Err(ValidationError::new(field, "must be at most 4096 bytes"));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(field, "must not contain NUL"));
    }
    Ok(())
}

/// A content address in the image store: `sha256:` and 64 lowercase hex digits.
/// Kernels, initrds and disk templates of images are named only by these, never
/// by a path on a host, so a tenant cannot make a host hand it a file.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^sha256:[0-9a-f]{64}$")]
pub struct BlobDigest(String);

/// The prefix of every [`BlobDigest`].
pub const DIGEST_PREFIX: &str = "sha256:";

/// `bytes` as lowercase hex digits (digests, token secrets, MACs, sealed secrets).
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

impl BlobDigest {
    /// The digest of a finished SHA-256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        Self(format!("{DIGEST_PREFIX}{}", hex(&hash)))
    }

    /// The 64 hex digits, without the `sha256:` prefix: safe as a file name or key part.
    pub fn hex(&self) -> &str {
        &self.0[DIGEST_PREFIX.len()..]
    }

    /// The whole digest, `sha256:…`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for BlobDigest {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        parse_digest("digest", &s)
    }
}

impl From<BlobDigest> for String {
    fn from(d: BlobDigest) -> String {
        d.0
    }
}

/// Parses a [`BlobDigest`]. The message says where digests come from, because the
/// likeliest wrong value is a host path from before the image store.
pub fn parse_digest(field: &str, value: &str) -> Result<BlobDigest, ValidationError> {
    let ok = value.strip_prefix(DIGEST_PREFIX).is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(BlobDigest(value.to_owned()))
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "must be an image-store digest sha256:<64 hex digits> (from POST /v1/blobs or \
                 POST /v1/blobs/import); host paths are not accepted, got {:?}",
                truncate(value, 80)
            ),
        ))
    }
}

/// Checks a kernel command line: at most 4096 bytes, no control characters.
pub fn validate_cmdline(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > 4096 {
        return Err(ValidationError::new(field, "must be at most 4096 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Parses an IPv4 subnet `a.b.c.d/p` for a network: prefix 8..=30 (room for at least two
/// hosts), no host bits set. Returns the network address and the prefix.
pub fn parse_cidr(field: &str, value: &str) -> Result<(std::net::Ipv4Addr, u8), ValidationError> {
    let bad = |why: &str| ValidationError::new(field, format!("bad CIDR '{value}': {why}"));
    let (ip, prefix) = value
        .split_once('/')
        .ok_or_else(|| bad("expected a.b.c.d/prefix"))?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad("not an IPv4 address"))?;
    let prefix: u8 = prefix.parse().map_err(|_| bad("prefix is not a number"))?;
    if !CIDR_PREFIXES.contains(&prefix) {
        return Err(bad("prefix must be 8..=30"));
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    if u32::from(ip) & !mask != 0 {
        return Err(bad("host bits are set"));
    }
    Ok((ip, prefix))
}

/// Checks an agent URL: `http://` or `https://`, at most 2048 bytes, no whitespace.
pub fn validate_agent_url(field: &str, value: &str) -> Result<(), ValidationError> {
    let scheme_ok = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty());
    if !scheme_ok {
        return Err(ValidationError::new(
            field,
            format!(
                "must be an http:// or https:// URL, got {:?}",
                truncate(value, 80)
            ),
        ));
    }
    if value.len() > 2048 {
        return Err(ValidationError::new(field, "must be at most 2048 bytes"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::new(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

/// At most `max` bytes of `s`, cut on a character boundary, for error messages.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "0", "web-1", "a-", &"a".repeat(63)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "web_1", "wéb", "a b", &"a".repeat(64), "a/b"] {
            let err = validate_name("name", bad).unwrap_err();
            assert_eq!(err.field, "name", "{bad}");
        }
        let err = validate_name("image", "Bad").unwrap_err();
        assert_eq!(
            err.to_string(),
            "image: must match [a-z0-9][a-z0-9-]{0,62}, got \"Bad\""
        );
    }

    #[test]
    fn name_deserialize_checks_rule() {
        assert!(serde_json::from_str::<Name>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<Name>("\"NO\"").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(
            validate_range("vcpus", 0u32, 1, 64)
                .unwrap_err()
                .to_string(),
            "vcpus: must be between 1 and 64, got 0"
        );
        assert_eq!(validate_range("vcpus", 64u32, 1, 64).unwrap(), 64);
    }

    #[test]
    fn paths_urls_cmdlines() {
        assert!(validate_path("kernel", "/boot/vmlinuz").is_ok());
        let d = parse_digest("kernel", &format!("sha256:{}", "ab".repeat(32))).unwrap();
        assert_eq!(d.hex(), "ab".repeat(32));
        assert_eq!(BlobDigest::from_sha256([0xab; 32]), d);
        for bad in [
            "/etc/shadow",
            "sha256:",
            "sha256:AB",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha512:{}", "ab".repeat(32)),
            &format!("sha256:{}0", "ab".repeat(32)),
        ] {
            let e = parse_digest("kernel", bad).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("kernel: must be an image-store digest"),
                "{e}"
            );
        }
        assert!(validate_path("kernel", "boot/vmlinuz").is_err());
        assert!(validate_path("kernel", "/a\0b").is_err());
        assert!(validate_agent_url("agent_url", "http://127.0.0.1:7071").is_ok());
        assert!(validate_agent_url("agent_url", "ftp://x").is_err());
        assert!(validate_agent_url("agent_url", "http://").is_err());
        assert!(validate_agent_url("agent_url", "http://a b").is_err());
        assert!(validate_cmdline("cmdline", "console=ttyS0 quiet").is_ok());
        assert!(validate_cmdline("cmdline", "a\nb").is_err());
        assert_eq!(truncate("ééé", 3), "é");
    }
}
