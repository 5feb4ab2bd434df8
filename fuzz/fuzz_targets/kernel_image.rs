//! What the QEMU driver reads from a tenant's kernel before it boots it: the bzImage setup
//! header (where the compressed payload is, which codec) and the decompressed ELF (program
//! headers, notes, the PVH entry). None may panic, and a payload found is inside the input.
#![no_main]

use compute::qemu::pvh::{bzimage_payload, has_pvh_entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((_, payload)) = bzimage_payload(data) {
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        let p = payload.as_ptr() as usize;
        assert!(p >= start && p + payload.len() <= end, "payload outside the kernel");
    }
    let _ = has_pvh_entry(data);
});
