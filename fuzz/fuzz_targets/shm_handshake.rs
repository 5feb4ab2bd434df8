//! The messages a resource-table device and element exchange while a device
//! attaches (table shape from the element, mapping from the device, the
//! element's verdict): each side decodes the other's bytes before trusting
//! them. None may panic; a decoded welcome re-encodes to its bytes. Also a table's
//! contents snapshot, which an agent reads back from its data dir at start: the first
//! byte picks the table shape it is read as.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = shm::fuzz_decode(data);
    if let Some((&shape, rest)) = data.split_first() {
        let entries = u32::from(shape & 0x0f) + 1;
        let entry_size = 8 * (u32::from(shape >> 4) + 1);
        if let Ok(written) = shm::decode_snapshot(rest, entries, entry_size) {
            for (e, p) in &written {
                assert!(*e < entries && p.len() == entry_size as usize);
            }
            let owned: Vec<(u32, Vec<u8>)> = written.iter().map(|(e, p)| (*e, p.to_vec())).collect();
            assert_eq!(shm::encode_snapshot(entries, entry_size, &owned), rest);
        }
    }
});
