//! A table's contents in a file, so that an element that restarts (the agent) can put
//! them back: `VRT1`, format 1, entries, entry size (u32 LE each), then each written
//! entry as its index (u32 LE) and payload, then the CRC-32 of everything before. The
//! versions are not kept: restored entries get new ones.

use crate::Error;

const MAGIC: &[u8; 4] = b"VRT1";
const FORMAT: u32 = 1;
const HEADER: usize = 16;

/// Encodes the written entries of a table of `entries` × `entry_size` bytes; each
/// payload is `entry_size` bytes.
pub fn encode_snapshot(entries: u32, entry_size: u32, written: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + written.len() * (4 + entry_size as usize) + 4);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT.to_le_bytes());
    b.extend_from_slice(&entries.to_le_bytes());
    b.extend_from_slice(&entry_size.to_le_bytes());
    for (e, p) in written {
        b.extend_from_slice(&e.to_le_bytes());
        b.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a snapshot of a table of this shape (outside input: the file may hold
/// anything): each written entry and its payload.
pub fn decode_snapshot(
    b: &[u8],
    entries: u32,
    entry_size: u32,
) -> Result<Vec<(u32, &[u8])>, Error> {
    let bad = |why: String| Err(Error::Invalid(format!("table snapshot: {why}")));
    if b.len() < HEADER + 4 {
        return bad(format!("{} bytes, shorter than a header", b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != crc {
        return bad("checksum mismatch".into());
    }
    let word = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    if &body[..4] != MAGIC || word(4) != FORMAT {
        return bad("not a format-1 snapshot".into());
    }
    if (word(8), word(12)) != (entries, entry_size) {
        return bad(format!(
            "of a table of {} × {} bytes, not {entries} × {entry_size}",
            word(8),
            word(12)
        ));
    }
    let rec = 4 + entry_size as usize;
    let rest = &body[HEADER..];
    if entry_size == 0 || rest.len() % rec != 0 {
        return bad("truncated entry record".into());
    }
    let mut out = Vec::with_capacity(rest.len() / rec);
    for r in rest.chunks_exact(rec) {
        let e = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
        if e >= entries {
            return bad(format!("entry {e} outside a table of {entries}"));
        }
        out.push((e, &r[4..]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_damage_is_refused() {
        let written = vec![(0u32, vec![1u8; 16]), (3, vec![2u8; 16])];
        let b = encode_snapshot(4, 16, &written);
        let back = decode_snapshot(&b, 4, 16).unwrap();
        assert_eq!(back, vec![(0, &[1u8; 16][..]), (3, &[2u8; 16][..])]);
        let e = decode_snapshot(&b, 8, 16).unwrap_err().to_string();
        assert!(e.contains("not 8 × 16"), "{e}");
        let mut bad = b.clone();
        bad[20] ^= 1;
        let e = decode_snapshot(&bad, 4, 16).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(decode_snapshot(&b[..10], 4, 16).is_err());
        // An entry index out of range, with a valid checksum.
        let b = encode_snapshot(4, 16, &[(9, vec![0u8; 16])]);
        let e = decode_snapshot(&b, 4, 16).unwrap_err().to_string();
        assert!(e.contains("entry 9"), "{e}");
    }
}
