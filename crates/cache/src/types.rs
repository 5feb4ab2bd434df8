//! Units of the cache: block index, block size, generation, and a set of blocks.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Index of a fixed-size block of a disk (byte offset / block size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockIdx(pub u64);

impl fmt::Display for BlockIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// Size of a cache block in bytes. Always a non-zero multiple of 512.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockSize(u32);

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl BlockSize {
    /// 64 KiB: large enough that the per-block metadata stays small, small enough that
    /// a 4 KiB guest read does not drag a megabyte across the network.
    pub const DEFAULT: BlockSize = BlockSize(64 * 1024);

    /// A block size of `bytes`, which must be a non-zero multiple of 512.
    pub fn new(bytes: u32) -> Option<Self> {
        (bytes != 0 && bytes.is_multiple_of(512)).then_some(Self(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes, as a `usize` for buffers.
    pub fn as_usize(self) -> usize {
        // u32 always fits in usize on the 64-bit targets we support.
        usize::try_from(self.0).expect("u32 fits in usize")
    }

    /// Byte offset of the first byte of block `b`, or `None` on overflow.
    pub fn offset_of(self, b: BlockIdx) -> Option<u64> {
        b.0.checked_mul(u64::from(self.0))
    }

    /// The block that holds byte `offset`.
    pub fn block_of(self, offset: u64) -> BlockIdx {
        BlockIdx(offset / u64::from(self.0))
    }

    /// Number of blocks needed to hold `bytes` bytes (the last may be partial).
    pub fn blocks_for(self, bytes: u64) -> u64 {
        bytes.div_ceil(u64::from(self.0))
    }
}

/// Per-block write generation. Bumped on every write to the block, so that a fetch that
/// started before a write can be recognised and discarded instead of installed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation after one more write.
    pub fn next(self) -> Self {
        Self(self.0.wrapping_add(1))
    }
}

/// A set of blocks, ordered so that iteration (and therefore every plan) is deterministic.
pub type BlockSet = BTreeSet<BlockIdx>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_math() {
        let bs = BlockSize::DEFAULT;
        assert_eq!(bs.offset_of(BlockIdx(2)), Some(128 * 1024));
        assert_eq!(bs.block_of(128 * 1024 - 1), BlockIdx(1));
        assert_eq!(bs.blocks_for(1), 1);
        assert_eq!(bs.blocks_for(64 * 1024), 1);
        assert_eq!(bs.blocks_for(64 * 1024 + 1), 2);
        assert_eq!(bs.offset_of(BlockIdx(u64::MAX)), None);
        assert!(BlockSize::new(0).is_none());
        assert!(BlockSize::new(1000).is_none());
        assert_eq!(BlockSize::new(4096).map(BlockSize::bytes), Some(4096));
    }
}
