//! The block-trace readers (`vinfra bench migrate --trace`): CloudPhysics, MSR Cambridge and
//! Alibaba CSV. The first byte picks the format. A malformed line must be an error naming
//! the line, never a panic; every request read has a non-zero length.
#![no_main]

use std::path::Path;

use cache::trace::{parse_trace, TraceError, TraceFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let format = match pick % 3 {
        0 => TraceFormat::CloudPhysics,
        1 => TraceFormat::Msr,
        _ => TraceFormat::Alibaba,
    };
    // Format detection (`--trace` without `--trace-format`) reads the first line.
    if let Some(first) = std::str::from_utf8(text).ok().and_then(|t| t.lines().next()) {
        if let Some(f) = TraceFormat::detect(first) {
            // A detected format names itself back.
            assert_eq!(f.name().parse::<TraceFormat>().ok(), Some(f));
        }
    }
    match parse_trace(text, Path::new("trace.csv"), format) {
        Ok(reqs) => assert!(reqs.iter().all(|r| r.len > 0)),
        Err(TraceError::Parse { line, .. }) => assert!(line >= 1),
        Err(TraceError::Io { .. }) => {} // not UTF-8
    }
});
