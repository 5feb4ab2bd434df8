//! What `vinfra bench migrate-vm` and the tests read from the Debian guest's serial console
//! (a guest writes it: outside input): pgbench's progress, latency, check and result lines
//! and fio's result, as whole console text and line by line. None may panic.
#![no_main]

use compute::workload::{parse_check, parse_fio, parse_latency, parse_pgbench, parse_progress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let run = parse_pgbench(&text);
    if let Some(c) = &run.check {
        let _ = c.is_consistent();
    }
    for line in text.lines() {
        let _ = parse_progress(line);
        let _ = parse_latency(line);
        let _ = parse_check(line);
        let _ = parse_fio(line);
    }
});
