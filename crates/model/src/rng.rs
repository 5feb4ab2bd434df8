//! A tiny seeded RNG (SplitMix64), the one every crate uses for deterministic plans,
//! samples, synthetic workloads and random test clusters, without a randomness crate.
//! Not for secrets: tokens and ids come from the OS (`getrandom`, `uuid`).

/// SplitMix64: passes BigCrush, one u64 of state, and is trivially reproducible.
///
/// ```
/// let mut a = model::SplitMix64::new(7);
/// let mut b = model::SplitMix64::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!((10..=20).contains(&a.range(10, 20)));
/// ```
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`; equal seeds give equal streams.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        // 53 random mantissa bits; the conversion is exact.
        #[allow(clippy::cast_precision_loss)]
        let v = (self.next_u64() >> 11) as f64;
        v / (1u64 << 53) as f64
    }

    /// A uniform integer in [0, n); `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift: unbiased enough for sampling and workloads.
        let wide = u128::from(self.next_u64()) * u128::from(n);
        u64::try_from(wide >> 64).expect("high half of a u128 fits in u64")
    }

    /// A uniform integer in `lo..=hi`; `lo <= hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// A uniform index in `0..n`; `n` must be non-zero.
    pub fn index(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).expect("a usize fits in u64");
        usize::try_from(self.below(n)).expect("below n, which is a usize")
    }

    /// True with probability `permille / 1000`.
    pub fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }
}
