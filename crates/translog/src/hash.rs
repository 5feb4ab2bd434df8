//! The hash definitions of the log, shared by the writer and the verifier (and
//! nothing else is shared between them): RFC 6962 §2.1 / RFC 9162 §2.1.1.
//!
//! A leaf hashes as `SHA-256(0x00 || data)`, an interior node as
//! `SHA-256(0x01 || left || right)`, and the empty tree as `SHA-256("")`. The
//! prefixes keep a leaf from ever being passed off as a node (second-preimage).

use sha2::{Digest, Sha256};

/// A SHA-256 tree hash.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of no bytes.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node over its two children.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Lowercase hex of `bytes` (hashes, keys and signatures travel as hex).
pub fn to_hex(bytes: &[u8]) -> String {
    model::hex(bytes)
}

/// Bytes from lowercase hex; `None` for an odd length or any other character
/// (uppercase too: one spelling per value, so no two stored forms mean the same).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// A hash from its 64 hex digits.
pub fn hash_from_hex(s: &str) -> Option<Hash> {
    from_hex(s)?.try_into().ok()
}

/// The short id of an Ed25519 public key: hex of the first 8 bytes of its SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    to_hex(&Sha256::digest(public_key)[..8])
}

/// What an entry's signature covers: a domain tag, the log's origin, the body.
pub fn entry_message(origin: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + origin.len() + body.len());
    m.extend_from_slice(b"vinfra-translog entry v1\n");
    m.extend_from_slice(origin.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(body);
    m
}

/// What a checkpoint's signature covers: a domain tag and the checkpoint text.
pub fn checkpoint_message(text: &str) -> Vec<u8> {
    let mut m = b"vinfra-translog checkpoint v1\n".to_vec();
    m.extend_from_slice(text.as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert!(from_hex("ABff").is_none());
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
        assert!(hash_from_hex("00").is_none());
    }
}
