//! What the QMP client reads from a QEMU monitor socket: the byte stream split into lines
//! (in the chunks the socket happens to deliver), each line decoded as a greeting, reply,
//! error or event, and successful replies decoded as the typed results the driver asks for
//! (`query-status`, `query-migrate`). None may panic.
#![no_main]

use compute::qmp::{decode, LineFramer, MigrationInfo, QmpMessage, RunStatus};
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
    for piece in stream.chunks(chunk) {
        framer.push(piece);
        loop {
            match framer.next_line() {
                Ok(Some(line)) => {
                    assert!(
                        line.len() <= MAX,
                        "framer let a {} byte line through",
                        line.len()
                    );
                    check_line(&line);
                }
                Ok(None) => break,
                // The client drops the connection: nothing more is read.
                Err(_) => return,
            }
        }
    }
    // The whole input as one line, as `decode` may also be handed.
    check_line(stream);
});

fn check_line(line: &[u8]) {
    match decode(line) {
        Ok(QmpMessage::Return { value, .. }) => {
            let _ = serde_json::from_value::<RunStatus>(value.clone());
            let _ = serde_json::from_value::<MigrationInfo>(value);
        }
        Ok(QmpMessage::Event(ev)) => {
            let _ = ev.timestamp.map(|t| t.as_micros());
            let _ = ev.data["reason"].as_str();
        }
        Ok(_) | Err(_) => {}
    }
}
