//! A terminal operation as a message body carries it: JSON decoded into
//! `model::terminal_ops::Operation`. None may panic; what decodes must be valid, expand
//! into a bounded number of input events, and come back equal from its own JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::terminal_ops::{Operation, MAX_COMBO_KEYS, MAX_TEXT_CHARS, MAX_WHEEL_NOTCHES};

fuzz_target!(|data: &[u8]| {
    let Ok(op) = serde_json::from_slice::<Operation>(data) else {
        return;
    };
    op.validate().expect("a decoded operation is valid");
    let events = op.input_events();
    let most = (MAX_TEXT_CHARS * 4)
        .max(MAX_COMBO_KEYS * 2)
        .max(usize::from(MAX_WHEEL_NOTCHES.unsigned_abs()) * 2);
    assert!(events.len() <= most, "{} events", events.len());
    assert_eq!(op.is_input(), !events.is_empty());
    let json = serde_json::to_vec(&op).expect("an operation serializes");
    let back: Operation = serde_json::from_slice(&json).expect("its own JSON decodes");
    assert_eq!(back, op);
});
