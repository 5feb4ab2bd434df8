//! The verifier: checks proofs, signatures and whole logs without trusting the
//! writer. It shares nothing with the writer but [`crate::hash`] (the hash and
//! signed-message definitions): proofs are checked with RFC 9162's iterative
//! algorithms (§2.1.3.2, §2.1.4.2), roots recomputed with a stack fold, and the
//! stored formats parsed here on their own, so that a bug in the writer is not
//! silently mirrored by the code that is meant to catch it.

use std::collections::{BTreeMap, HashMap};

use ring::signature::{UnparsedPublicKey, ED25519};
use serde::Deserialize;

use crate::hash::{
    checkpoint_message, empty_root, entry_message, from_hex, hash_from_hex, key_id, leaf_hash,
    node_hash, Hash,
};

/// Why a proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf {index} is not in a tree of size {size}")]
    IndexBeyondSize {
        /// The leaf.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The newer size is smaller than the older one.
    #[error("tree size went back from {from} to {to}")]
    SizeWentBack {
        /// The older size.
        from: u64,
        /// The newer size.
        to: u64,
    },
    /// The proof has the wrong number of hashes for the sizes.
    #[error("proof has the wrong length")]
    WrongLength,
    /// The hashes recomputed from the proof are not the roots claimed.
    #[error("proof does not lead to the claimed root")]
    RootMismatch,
}

fn lsb(x: u64) -> bool {
    x & 1 == 1
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves with root `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexBeyondSize { index, size });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if lsb(f) || f == s {
            r = node_hash(p, &r);
            if !lsb(f) {
                while !lsb(f) && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `size1` leaves with root `root1` is a prefix of the tree
/// of `size2` leaves with root `root2` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if size2 < size1 {
        return Err(ProofError::SizeWentBack {
            from: size1,
            to: size2,
        });
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if root1 == root2 {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if size1 == 0 {
        // Every tree extends the empty one; there is nothing to prove.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(*root1);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (size1 - 1, size2 - 1);
    while lsb(f) {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if lsb(f) || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if !lsb(f) {
                while !lsb(f) && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != *root1 || sr != *root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Computes tree roots by folding a stack of perfect subtrees, leaf by leaf: the
/// auditor's own way to a root, independent of the writer's tree.
#[derive(Debug, Default, Clone)]
pub struct RootFolder {
    /// Perfect subtrees, left to right: (hash, number of leaves).
    stack: Vec<(Hash, u64)>,
    len: u64,
}

impl RootFolder {
    /// Adds the next leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut cur = (leaf, 1u64);
        while let Some(&(h, n)) = self.stack.last() {
            if n != cur.1 {
                break;
            }
            self.stack.pop();
            cur = (node_hash(&h, &cur.0), n * 2);
        }
        self.stack.push(cur);
        self.len += 1;
    }

    /// Leaves so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no leaf was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The root of the leaves so far: the perfect subtrees folded right to left.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        let Some(&(mut r, _)) = it.next() else {
            return empty_root();
        };
        for (h, _) in it {
            r = node_hash(h, &r);
        }
        r
    }
}

/// A checkpoint as the verifier reads it: the tree size and root a key signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// The log's name.
    pub origin: String,
    /// Leaves in the tree.
    pub size: u64,
    /// The tree's root.
    pub root: Hash,
    /// Which trusted key signed it.
    pub key_id: String,
    /// The size of the checkpoint published before it (0 for the first).
    pub prev: u64,
}

/// The Ed25519 public keys whose signatures the verifier accepts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(HashMap<String, Vec<u8>>);

impl TrustedKeys {
    /// No key yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts a raw 32-byte Ed25519 public key; returns its id.
    pub fn add(&mut self, public_key: &[u8]) -> String {
        let id = key_id(public_key);
        self.0.insert(id.clone(), public_key.to_vec());
        id
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn check(&self, id: &str, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let key = self
            .0
            .get(id)
            .ok_or_else(|| SignatureError::UnknownKey(id.to_owned()))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(message, signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Signed by a key the verifier does not trust.
    #[error("signed by untrusted key {0}")]
    UnknownKey(String),
    /// The signature does not match the signed bytes.
    #[error("signature does not verify")]
    Invalid,
    /// The signed record is not in the expected shape.
    #[error("malformed signed record: {0}")]
    Malformed(&'static str),
}

/// The stored form of a signed checkpoint, as the verifier parses it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointWire {
    text: String,
    key_id: String,
    signature: String,
}

/// Parses and checks a stored signed checkpoint (JSON `{text, key_id, signature}`
/// whose text is `origin\nsize\nroot-hex\nprevious-size\n`).
pub fn verify_checkpoint(
    keys: &TrustedKeys,
    stored: &[u8],
) -> Result<VerifiedCheckpoint, SignatureError> {
    let wire: CheckpointWire =
        serde_json::from_slice(stored).map_err(|_| SignatureError::Malformed("not JSON"))?;
    let sig = from_hex(&wire.signature).ok_or(SignatureError::Malformed("signature not hex"))?;
    keys.check(&wire.key_id, &checkpoint_message(&wire.text), &sig)?;
    let mut lines = wire.text.split('\n');
    let (Some(origin), Some(size), Some(root), Some(prev), Some(""), None) = (
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
    ) else {
        return Err(SignatureError::Malformed(
            "checkpoint text is not four lines",
        ));
    };
    let number = |s: &str| {
        if s.is_empty()
            || s.len() > 1 && s.starts_with('0')
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(SignatureError::Malformed("size is not canonical decimal"));
        }
        s.parse::<u64>()
            .map_err(|_| SignatureError::Malformed("size is not a number"))
    };
    let (size, prev) = (number(size)?, number(prev)?);
    if prev >= size {
        return Err(SignatureError::Malformed(
            "previous size is not below the size",
        ));
    }
    let root = hash_from_hex(root).ok_or(SignatureError::Malformed("root is not a hash"))?;
    Ok(VerifiedCheckpoint {
        origin: origin.to_owned(),
        size,
        root,
        key_id: wire.key_id,
        prev,
    })
}

/// Parses and checks a stored entry (`key-id\nsignature-hex\nbody`) of log
/// `origin`; returns the body.
pub fn verify_entry<'a>(
    keys: &TrustedKeys,
    origin: &str,
    stored: &'a [u8],
) -> Result<&'a [u8], SignatureError> {
    let mut parts = stored.splitn(3, |&b| b == b'\n');
    let (Some(id), Some(sig), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SignatureError::Malformed(
            "entry is not key, signature, body",
        ));
    };
    let id = std::str::from_utf8(id).map_err(|_| SignatureError::Malformed("key id"))?;
    let sig = std::str::from_utf8(sig)
        .ok()
        .and_then(from_hex)
        .ok_or(SignatureError::Malformed("signature not hex"))?;
    keys.check(id, &entry_message(origin, body), &sig)?;
    Ok(body)
}

/// What an audit found wrong. Every variant is a reason not to trust the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The log has no head checkpoint.
    #[error("the log has no head checkpoint")]
    NoHead,
    /// A checkpoint (the head, or the one published at `size`) is not acceptable.
    #[error("checkpoint {key} is not acceptable")]
    BadCheckpoint {
        /// Its store key.
        key: String,
        /// Why.
        #[source]
        why: SignatureError,
    },
    /// A checkpoint names another log.
    #[error("checkpoint {key} belongs to log {origin:?}")]
    WrongOrigin {
        /// Its store key.
        key: String,
        /// The origin it names.
        origin: String,
    },
    /// An entry below the head's size is missing.
    #[error("entry {index} is missing")]
    Gap {
        /// The missing index.
        index: u64,
    },
    /// A key under the log's prefix that the log does not account for.
    #[error("unexpected key {key} in the log")]
    Unexpected {
        /// The key.
        key: String,
    },
    /// An entry's signature or shape is wrong.
    #[error("entry {index} is not acceptable")]
    BadEntry {
        /// Its index.
        index: u64,
        /// Why.
        #[source]
        why: SignatureError,
    },
    /// The entries do not hash to a checkpoint's root.
    #[error("the first {size} entries do not hash to the root of checkpoint {key}")]
    RootMismatch {
        /// The checkpoint's key.
        key: String,
        /// Its size.
        size: u64,
    },
    /// A checkpoint the chain of published checkpoints names is missing.
    #[error("checkpoint at size {size} is missing")]
    MissingCheckpoint {
        /// The size it was published at.
        size: u64,
    },
    /// A published checkpoint is larger than the head: the head was rolled back.
    #[error("checkpoint {key} (size {size}) is beyond the head (size {head})")]
    BeyondHead {
        /// The checkpoint's key.
        key: String,
        /// Its size.
        size: u64,
        /// The head's size.
        head: u64,
    },
    /// The log is smaller than a checkpoint this verifier saw before: rolled back.
    #[error("the log (size {size}) is smaller than the witnessed size {witnessed}")]
    RolledBack {
        /// The log's size now.
        size: u64,
        /// The size witnessed before.
        witnessed: u64,
    },
    /// The log's first `size` entries no longer hash to the witnessed root: a fork.
    #[error("the log forked: its first {size} entries no longer hash to the witnessed root")]
    Forked {
        /// The witnessed size.
        size: u64,
    },
}

/// Whether the chain of checkpoints from `head` down passes through `size`.
fn chain_has(by_size: &HashMap<u64, &VerifiedCheckpoint>, head: u64, size: u64) -> bool {
    let mut at = head;
    while at > size {
        match by_size.get(&at) {
            Some(c) => at = c.prev,
            None => return false,
        }
    }
    at == size
}

/// A log that passed [`audit`].
#[derive(Debug, Clone)]
pub struct Audited {
    /// The head checkpoint.
    pub head: VerifiedCheckpoint,
    /// Every entry's body, by index.
    pub entries: Vec<Vec<u8>>,
    /// How many published checkpoints were checked against the entries.
    pub checkpoints: usize,
}

/// Audits a whole log from the raw keys under its `prefix` (as listed from the
/// store, or served by a server): the head's signature, every entry's signature,
/// no gap and no stray key, the entries hashing to the head's root and to the root
/// of every published checkpoint, and — given the last checkpoint this verifier
/// accepted (`witness`) — no rollback and no fork since.
pub fn audit(
    prefix: &str,
    origin: &str,
    keys: &TrustedKeys,
    raw: &[(String, Vec<u8>)],
    witness: Option<&VerifiedCheckpoint>,
) -> Result<Audited, AuditError> {
    let head_key = format!("{prefix}head");
    let mut head = None;
    let mut entries: BTreeMap<u64, &[u8]> = BTreeMap::new();
    let mut published: BTreeMap<u64, (&str, &[u8])> = BTreeMap::new();
    for (key, value) in raw {
        let Some(rest) = key.strip_prefix(prefix) else {
            return Err(AuditError::Unexpected { key: key.clone() });
        };
        let index = |s: &str| (s.len() == 20).then(|| s.parse::<u64>().ok()).flatten();
        if rest == "head" {
            head = Some(value.as_slice());
        } else if let Some(i) = rest.strip_prefix("entries/").and_then(index) {
            entries.insert(i, value);
        } else if let Some(s) = rest.strip_prefix("checkpoints/").and_then(index) {
            published.insert(s, (key.as_str(), value));
        } else if rest.strip_prefix("keys/").is_some() {
            // Key announcements are for discovery; trust comes from `keys`.
        } else {
            return Err(AuditError::Unexpected { key: key.clone() });
        }
    }
    let checkpoint = |key: &str, v: &[u8]| {
        let c = verify_checkpoint(keys, v).map_err(|why| AuditError::BadCheckpoint {
            key: key.to_owned(),
            why,
        })?;
        if c.origin != origin {
            return Err(AuditError::WrongOrigin {
                key: key.to_owned(),
                origin: c.origin,
            });
        }
        Ok(c)
    };
    let head = checkpoint(&head_key, head.ok_or(AuditError::NoHead)?)?;
    if let Some((&last, _)) = entries.iter().next_back() {
        if last >= head.size {
            return Err(AuditError::Unexpected {
                key: format!("{prefix}entries/{last:020}"),
            });
        }
    }
    let mut checks = Vec::with_capacity(published.len());
    for (&size, &(key, value)) in &published {
        let c = checkpoint(key, value)?;
        if c.size != size {
            return Err(AuditError::Unexpected {
                key: key.to_owned(),
            });
        }
        if size > head.size {
            return Err(AuditError::BeyondHead {
                key: key.to_owned(),
                size,
                head: head.size,
            });
        }
        checks.push((key.to_owned(), c));
    }
    // The chain head -> prev -> ... -> 0 must name every published checkpoint,
    // and only those; the head itself is published at its size.
    let by_size: HashMap<u64, &VerifiedCheckpoint> =
        checks.iter().map(|(_, c)| (c.size, c)).collect();
    let mut at = head.size;
    let mut chained = 0;
    while at > 0 {
        let c = by_size
            .get(&at)
            .ok_or(AuditError::MissingCheckpoint { size: at })?;
        if at == head.size && **c != head {
            return Err(AuditError::MissingCheckpoint { size: at });
        }
        chained += 1;
        at = c.prev;
    }
    if chained != checks.len() {
        let stray = checks
            .iter()
            .find(|(_, c)| c.size > head.size || !chain_has(&by_size, head.size, c.size));
        return Err(match stray {
            Some((key, c)) if c.size > head.size => AuditError::BeyondHead {
                key: key.clone(),
                size: c.size,
                head: head.size,
            },
            Some((key, _)) => AuditError::Unexpected { key: key.clone() },
            None => AuditError::MissingCheckpoint { size: head.size },
        });
    }
    if let Some(w) = witness {
        if head.size < w.size {
            return Err(AuditError::RolledBack {
                size: head.size,
                witnessed: w.size,
            });
        }
    }
    let mut folder = RootFolder::default();
    let mut bodies = Vec::with_capacity(entries.len());
    let mut checks = checks.into_iter().peekable();
    let check_at =
        |folder: &RootFolder,
         checks: &mut std::iter::Peekable<std::vec::IntoIter<(String, VerifiedCheckpoint)>>|
         -> Result<(), AuditError> {
            let root = folder.root();
            while let Some((key, c)) = checks.next_if(|(_, c)| c.size == folder.len()) {
                if c.root != root {
                    return Err(AuditError::RootMismatch { key, size: c.size });
                }
            }
            if let Some(w) = witness {
                if w.size == folder.len() && w.root != root {
                    return Err(AuditError::Forked { size: w.size });
                }
            }
            Ok(())
        };
    check_at(&folder, &mut checks)?;
    for index in 0..head.size {
        let stored = entries.get(&index).ok_or(AuditError::Gap { index })?;
        let body = verify_entry(keys, origin, stored)
            .map_err(|why| AuditError::BadEntry { index, why })?;
        folder.push(leaf_hash(stored));
        bodies.push(body.to_vec());
        check_at(&folder, &mut checks)?;
    }
    if folder.root() != head.root {
        return Err(AuditError::RootMismatch {
            key: head_key,
            size: head.size,
        });
    }
    Ok(Audited {
        head,
        entries: bodies,
        checkpoints: published.len(),
    })
}

#[cfg(test)]
mod tests {
    /// The verifier's independence is structural: outside its tests it names no
    /// path of this crate but the hash definitions.
    #[test]
    fn the_verifier_uses_nothing_of_the_writer() {
        let src = include_str!("verify.rs");
        let body = &src[..src.find("#[cfg(test)]").expect("tests follow the code")];
        for (at, _) in body.match_indices("crate::") {
            assert!(body[at..].starts_with("crate::hash"), "at byte {at}");
        }
        assert!(!body.contains("super::"));
    }
}
