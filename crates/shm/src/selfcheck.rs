//! A self-checking payload: words derived from a counter, the last one their
//! sum. Tests and `vinfra bench shm` write it from devices and check every
//! read with it, so a torn entry (half one version, half another) shows.

/// The payload for counter `n` in `words` 64-bit words.
pub fn payload(n: u64, words: usize) -> Vec<u8> {
    let mut w: Vec<u64> = (0..words.saturating_sub(1) as u64)
        .map(|i| n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i)
        .collect();
    let sum = w.iter().fold(0u64, |a, b| a.wrapping_add(*b));
    w.push(sum);
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Whether `bytes` is a whole payload (an all-zero entry, never written,
/// passes too).
pub fn verify(bytes: &[u8]) -> bool {
    let w: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect();
    match w.split_last() {
        Some((last, rest)) => rest.iter().fold(0u64, |a, b| a.wrapping_add(*b)) == *last,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_torn_payload_fails() {
        let a = super::payload(1, 16);
        let b = super::payload(2, 16);
        assert!(super::verify(&a) && super::verify(&b) && super::verify(&[0u8; 128]));
        let mut torn = a.clone();
        torn[64..].copy_from_slice(&b[64..]);
        assert!(!super::verify(&torn));
    }
}
