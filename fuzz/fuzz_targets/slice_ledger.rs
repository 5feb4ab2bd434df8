//! What the slice ledger's auditor and the slice API read from outside: stored
//! checkpoints and entries (a tampering store or a lying server), whole raw logs
//! handed to `audit`, proofs of any shape, slice types from paths and the NSSF's
//! JSON query parameters. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use translog::verify::{
    audit, verify_checkpoint, verify_consistency, verify_entry, verify_inclusion, TrustedKeys,
};

fuzz_target!(|data: &[u8]| {
    let mut keys = TrustedKeys::new();
    keys.add(&[7u8; 32]);
    let _ = verify_checkpoint(&keys, data);
    let _ = verify_entry(&keys, "vinfra/slices", data);
    // The data as a raw log: lines `key\tvalue`.
    let raw: Vec<(String, Vec<u8>)> = data
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            let mut p = l.splitn(2, |&b| b == b'\t');
            let k = std::str::from_utf8(p.next()?).ok()?;
            Some((format!("/l/{k}"), p.next().unwrap_or_default().to_vec()))
        })
        .collect();
    let _ = audit("/l/", "vinfra/slices", &keys, &raw, None);
    // Proofs of any length and sizes.
    if data.len() >= 16 {
        let a = u64::from_le_bytes(data[..8].try_into().unwrap());
        let b = u64::from_le_bytes(data[8..16].try_into().unwrap());
        let hashes: Vec<[u8; 32]> = data[16..]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let h = hashes.first().copied().unwrap_or([0; 32]);
        let _ = verify_inclusion(a, b, &h, &hashes, &h);
        let _ = verify_consistency(a, b, &h, &h, &hashes);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = model::slices::Snssai::parse_type(s);
        let _ = serde_json::from_str::<model::slices::SliceInfoForRegistration>(s);
        let _ = serde_json::from_str::<model::slices::SliceInfoForPduSession>(s);
    }
});
