//! What the kernel datapath's reporter reads from `bpftool -j map dump` of the classifier's
//! `counters` and `pairs` maps (`net::kernel::counts_from_bpftool`): any text is either an
//! error naming what is wrong or counts, never a panic.
//!
//! The input up to the first NUL byte is the `counters` dump, the rest the `pairs` dump.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let counters = String::from_utf8_lossy(&data[..cut]);
    let pairs = String::from_utf8_lossy(data.get(cut + 1..).unwrap_or_default());
    if let Ok(c) = net::kernel::counts_from_bpftool(&counters, &pairs) {
        for f in &c.flows {
            assert!(
                f.counter.packets > 0 || f.counter.bytes > 0,
                "a pair with no count"
            );
        }
    }
});
