//! Transmission-phase parsers: request headers and the reply headers our client
//! parses. None may panic; a parsed request must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{Request, SimpleReply, StructuredReply, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::parse(data) {
        assert_eq!(&req.encode()[..], &data[..REQUEST_LEN]);
        let _ = req.end();
        let _ = req.has_payload();
    }
    let _ = SimpleReply::parse(data);
    let _ = StructuredReply::parse(data);
});
