//! Negotiation-phase parsers: option header + option data (server side), and
//! greeting / option replies / info replies (client side). None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::proto::{
    parse_handshake, ClientOption, InfoReply, OptionHeader, OptionReplyHeader, OPTION_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(hdr) = OptionHeader::parse(data) {
        let rest = &data[OPTION_HEADER_LEN..];
        // As the server does: the option's data is whatever follows, up to its length.
        let n = rest.len().min(hdr.length as usize);
        let _ = ClientOption::parse(hdr.option, &rest[..n]);
    }
    // Any option number with the raw bytes as data.
    if let Some((&first, rest)) = data.split_first() {
        let _ = ClientOption::parse(u32::from(first % 16), rest);
    }
    let _ = parse_handshake(data);
    let _ = OptionReplyHeader::parse(data);
    let _ = InfoReply::parse(data);
});
