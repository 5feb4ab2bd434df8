//! What an agent reads from a server's host event stream (`GET /v1/hosts/{name}/events`):
//! the bytes in whatever pieces the connection delivers, cut into lines under a limit,
//! each line decoded as a `HostEvent`. None may panic, and no line over the limit may get
//! through.
#![no_main]

use client::events::{decode_event, LineFramer};
use libfuzzer_sys::fuzz_target;

/// A small line limit, so that the too-long path is reached too.
const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size, so lines also arrive split across reads.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut framer = LineFramer::new(MAX);
    let mut last = 0;
    for piece in stream.chunks(chunk) {
        framer.push(piece);
        while let Some((n, line)) = framer.next_line() {
            assert!(n > last, "line {n} after line {last}");
            last = n;
            if let Ok(line) = line {
                assert!(line.len() <= MAX, "framer let a {} byte line through", line.len());
                let _ = decode_event(&line).map(|ev| ev.map(|ev| serde_json::to_vec(&ev)));
            }
        }
    }
    if let Some((n, _)) = framer.finish() {
        assert!(n > last, "the unfinished line {n} after line {last}");
    }
    // The whole input as one line, as the decoder may also be handed.
    let _ = decode_event(stream);
});
