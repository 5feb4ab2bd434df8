//! Descriptor text as the API and `vinfra vnfd|nsd validate` get it: the limits
//! pre-scan, then (only if it passes) the YAML parser and validation. None may panic;
//! text the pre-scan refuses must be refused by validation with the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfv::descriptor::{check_limits, validate_nsd, validate_vnfd};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = check_limits(text);
    let vnfd = validate_vnfd(text);
    if let Err(e) = &limits {
        let errors = vnfd.expect_err("over the limits yet validated");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].message, e.to_string());
        return;
    }
    // A VNFD that validates is a usable import for an NSD over the same text.
    let vnfds: Vec<_> = vnfd.into_iter().collect();
    let _ = validate_nsd(text, &vnfds);
});
