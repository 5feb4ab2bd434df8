//! The messages a resource-table device and element exchange while a device
//! attaches (table shape from the element, mapping from the device, the
//! element's verdict): each side decodes the other's bytes before trusting
//! them. None may panic; a decoded welcome re-encodes to its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = shm::fuzz_decode(data);
});
