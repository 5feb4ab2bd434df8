//! The writer's Merkle tree: every complete subtree's hash, kept level by level so
//! that appends, roots and proofs cost O(log n) hashes (RFC 6962 §2.1 `MTH`, `PATH`,
//! `SUBPROOF`, computed recursively as the RFC defines them).

use crate::hash::{empty_root, node_hash, Hash};

/// An append-only Merkle tree over leaf hashes.
#[derive(Debug, Clone, Default)]
pub struct MerkleTree {
    /// `levels[k][i]`: the hash of the complete subtree over leaves
    /// `[i * 2^k, (i + 1) * 2^k)`. `levels[0]` holds the leaf hashes.
    levels: Vec<Vec<Hash>>,
}

/// A proof asked for sizes or an index the tree cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofRequestError {
    /// The index is not below the tree size, or the size is beyond the tree.
    #[error("no leaf {index} in a tree of size {size} (the log holds {len})")]
    Inclusion {
        /// The leaf asked for.
        index: u64,
        /// The tree size asked for.
        size: u64,
        /// The log's size.
        len: u64,
    },
    /// `from` is larger than `to`, or `to` is beyond the tree.
    #[error("no consistency proof from size {from} to size {to} (the log holds {len})")]
    Consistency {
        /// The older size.
        from: u64,
        /// The newer size.
        to: u64,
        /// The log's size.
        len: u64,
    },
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Whether the tree has no leaf.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hash of leaf `index`.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    /// Appends a leaf hash; completes every subtree the new leaf closes.
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut k = 0;
        let mut i = self.levels[0].len() - 1;
        while i % 2 == 1 {
            let h = node_hash(&self.levels[k][i - 1], &self.levels[k][i]);
            k += 1;
            if self.levels.len() == k {
                self.levels.push(Vec::new());
            }
            self.levels[k].push(h);
            i /= 2;
        }
    }

    /// Drops every leaf from `size` on (a batch whose commit failed).
    pub fn truncate(&mut self, size: u64) {
        for (k, level) in self.levels.iter_mut().enumerate() {
            let keep = usize::try_from(size >> k).unwrap_or(usize::MAX);
            level.truncate(keep);
        }
    }

    /// `MTH(D[start : start + n])`; the range must lie inside the tree.
    fn subtree(&self, start: u64, n: u64) -> Hash {
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && start.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            // In range: the caller's range lies inside the tree, and a complete
            // aligned subtree of it was stored when its last leaf was pushed.
            return self.levels[k][usize::try_from(start / n).expect("tree fits in memory")];
        }
        let k = split(n);
        node_hash(&self.subtree(start, k), &self.subtree(start + k, n - k))
    }

    /// The root of the tree's first `size` leaves (`size` at most [`Self::len`]).
    pub fn root_at(&self, size: u64) -> Option<Hash> {
        (size <= self.len()).then(|| self.subtree(0, size))
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        self.subtree(0, self.len())
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves
    /// (RFC 6962 §2.1.1 `PATH(m, D[n])`), nearest sibling first.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofRequestError> {
        if index >= size || size > self.len() {
            return Err(ProofRequestError::Inclusion {
                index,
                size,
                len: self.len(),
            });
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    fn path(&self, m: u64, start: u64, n: u64, out: &mut Vec<Hash>) {
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, start, k, out);
            out.push(self.subtree(start + k, n - k));
        } else {
            self.path(m - k, start + k, n - k, out);
            out.push(self.subtree(start, k));
        }
    }

    /// The proof that the tree of the first `from` leaves is a prefix of the tree
    /// of the first `to` (RFC 6962 §2.1.2 `PROOF(m, D[n])`). Empty when
    /// `from == 0` or `from == to`.
    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, ProofRequestError> {
        if from > to || to > self.len() {
            return Err(ProofRequestError::Consistency {
                from,
                to,
                len: self.len(),
            });
        }
        let mut proof = Vec::new();
        if from > 0 && from < to {
            self.subproof(from, 0, to, true, &mut proof);
        }
        Ok(proof)
    }

    fn subproof(&self, m: u64, start: u64, n: u64, whole: bool, out: &mut Vec<Hash>) {
        if m == n {
            if !whole {
                out.push(self.subtree(start, n));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, k, whole, out);
            out.push(self.subtree(start + k, n - k));
        } else {
            self.subproof(m - k, start + k, n - k, false, out);
            out.push(self.subtree(start, k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;

    /// `MTH` straight from the RFC's recursive definition, over the leaf hashes.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = usize::try_from(split(n as u64)).unwrap();
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn roots_match_the_recursive_definition_at_every_size() {
        let mut t = MerkleTree::new();
        let mut leaves = Vec::new();
        assert_eq!(t.root(), empty_root());
        for i in 0u32..70 {
            let h = leaf_hash(&i.to_be_bytes());
            t.push(h);
            leaves.push(h);
            for s in 0..=leaves.len() {
                assert_eq!(t.root_at(s as u64).unwrap(), mth(&leaves[..s]), "size {s}");
            }
        }
        t.truncate(33);
        assert_eq!(t.len(), 33);
        assert_eq!(t.root(), mth(&leaves[..33]));
        t.push(leaves[33]);
        assert_eq!(t.root(), mth(&leaves[..34]));
    }

    #[test]
    fn proof_requests_out_of_range_are_refused() {
        let mut t = MerkleTree::new();
        t.push(leaf_hash(b"a"));
        assert!(t.inclusion_proof(1, 1).is_err());
        assert!(t.inclusion_proof(0, 2).is_err());
        assert!(t.consistency_proof(2, 1).is_err());
        assert!(t.consistency_proof(0, 2).is_err());
        assert_eq!(t.consistency_proof(0, 1).unwrap(), Vec::<Hash>::new());
    }
}
