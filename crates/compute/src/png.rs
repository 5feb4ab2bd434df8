//! Just enough PNG for screenshots: the size from a PNG's header (QEMU's `screendump`
//! writes the files, we only report their dimensions), and a minimal encoder for the
//! sim driver's screens (8-bit grayscale, zlib "stored" blocks: no compressor needed,
//! any PNG decoder reads it).
//!
//! ```
//! let png = compute::png::encode_gray(4, 2, &[0, 64, 128, 255, 255, 128, 64, 0]);
//! assert_eq!(compute::png::dimensions(&png).unwrap(), (4, 2));
//! ```

/// The 8 bytes every PNG starts with.
pub const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// The largest width or height the PNG format allows (2^31 - 1).
pub const MAX_DIMENSION: u32 = 0x7fff_ffff;

/// Why bytes are not a PNG whose size we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PngError {
    /// Fewer bytes than a signature and a header chunk.
    #[error("{len} bytes are too few for a png header")]
    TooShort {
        /// How many there were.
        len: usize,
    },
    /// The first 8 bytes are not the PNG signature.
    #[error("not a png (bad signature)")]
    BadSignature,
    /// The first chunk is not a 13-byte `IHDR`.
    #[error("the first png chunk is not a 13-byte IHDR")]
    NoHeader,
    /// The header chunk's CRC does not match its bytes.
    #[error("the png header's crc is wrong")]
    BadCrc,
    /// A width or height of 0 or above [`MAX_DIMENSION`].
    #[error("png dimensions {width}x{height} are out of range")]
    BadSize {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Width and height from a PNG's `IHDR`, after checking its signature and CRC.
pub fn dimensions(png: &[u8]) -> Result<(u32, u32), PngError> {
    // signature, IHDR length + type, 13 bytes of header, CRC
    const NEED: usize = 8 + 8 + 13 + 4;
    if png.len() < NEED {
        return Err(PngError::TooShort { len: png.len() });
    }
    if png[..8] != SIGNATURE {
        return Err(PngError::BadSignature);
    }
    if be32(&png[8..12]) != 13 || &png[12..16] != b"IHDR" {
        return Err(PngError::NoHeader);
    }
    if crc32fast::hash(&png[12..29]) != be32(&png[29..33]) {
        return Err(PngError::BadCrc);
    }
    let (width, height) = (be32(&png[16..20]), be32(&png[20..24]));
    if width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION {
        return Err(PngError::BadSize { width, height });
    }
    Ok((width, height))
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let len = u32::try_from(data.len()).expect("chunks here are far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before `b` could overflow a u32.
    for block in data.chunks(5552) {
        for &x in block {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// A zlib stream of `data` in deflate "stored" (uncompressed) blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 0xffff;
    let blocks = data.len().div_ceil(MAX_BLOCK).max(1);
    let mut out = Vec::with_capacity(data.len() + blocks * 5 + 6);
    // CMF: deflate, 32 KiB window; FLG: no dictionary, check bits making CMF*256+FLG % 31 == 0.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut pieces = data.chunks(MAX_BLOCK).peekable();
    if pieces.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        out.push(u8::from(last)); // BFINAL, BTYPE 00 (stored)
        let len = u16::try_from(piece.len()).expect("a stored block is at most 65535 bytes");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(piece);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// An 8-bit grayscale PNG of `width` x `height` pixels, row by row (`pixels.len()` must be
/// `width * height`).
///
/// # Panics
/// If the sizes disagree or a dimension is 0 or above [`MAX_DIMENSION`]: the sim driver
/// calls it with constants.
pub fn encode_gray(width: u32, height: u32, pixels: &[u8]) -> Vec<u8> {
    assert!(
        (1..=MAX_DIMENSION).contains(&width) && (1..=MAX_DIMENSION).contains(&height),
        "png size {width}x{height}"
    );
    let w = usize::try_from(width).expect("width fits in usize");
    let h = usize::try_from(height).expect("height fits in usize");
    assert_eq!(pixels.len(), w * h, "pixels for {width}x{height}");
    let mut raw = Vec::with_capacity((w + 1) * h);
    for row in pixels.chunks(w) {
        raw.push(0); // filter type None
        raw.extend_from_slice(row);
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // bit depth 8, color type 0 (grayscale), compression 0, filter 0, no interlace
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let idat = zlib_stored(&raw);
    let mut out = Vec::with_capacity(idat.len() + 64);
    out.extend_from_slice(&SIGNATURE);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the chunks, checking every CRC, and inflates the stored blocks: the pixels
    /// and the chunk names back.
    fn decode_stored(png: &[u8]) -> (Vec<String>, Vec<u8>) {
        assert_eq!(png[..8], SIGNATURE);
        let (mut at, mut names, mut idat) = (8, Vec::new(), Vec::new());
        while at < png.len() {
            let len = usize::try_from(be32(&png[at..])).unwrap();
            let body = &png[at + 4..at + 8 + len];
            assert_eq!(crc32fast::hash(body), be32(&png[at + 8 + len..]));
            names.push(String::from_utf8(body[..4].to_vec()).unwrap());
            if &body[..4] == b"IDAT" {
                idat.extend_from_slice(&body[4..]);
            }
            at += 12 + len;
        }
        assert_eq!(idat[..2], [0x78, 0x01]);
        assert_eq!((u16::from(idat[0]) << 8 | u16::from(idat[1])) % 31, 0);
        let (mut p, mut raw) = (2, Vec::new());
        loop {
            let last = idat[p] & 1 == 1;
            assert_eq!(idat[p] >> 1, 0, "stored block");
            let len = usize::from(u16::from_le_bytes([idat[p + 1], idat[p + 2]]));
            let nlen = u16::from_le_bytes([idat[p + 3], idat[p + 4]]);
            assert_eq!(usize::from(!nlen), len);
            raw.extend_from_slice(&idat[p + 5..p + 5 + len]);
            p += 5 + len;
            if last {
                break;
            }
        }
        assert_eq!(be32(&idat[p..]), adler32(&raw));
        assert_eq!(p + 4, idat.len());
        (names, raw)
    }

    #[test]
    fn encoded_images_decode_to_their_pixels() {
        // 400x200 spans several stored blocks (80,200 bytes of rows).
        for (w, h) in [(1u32, 1u32), (3, 2), (400, 200)] {
            let n = usize::try_from(w * h).unwrap();
            let pixels: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let png = encode_gray(w, h, &pixels);
            assert_eq!(dimensions(&png).unwrap(), (w, h));
            let (names, raw) = decode_stored(&png);
            assert_eq!(names, ["IHDR", "IDAT", "IEND"]);
            let wu = usize::try_from(w).unwrap();
            let rows: Vec<u8> = raw
                .chunks(wu + 1)
                .flat_map(|r| {
                    assert_eq!(r[0], 0);
                    r[1..].to_vec()
                })
                .collect();
            assert_eq!(rows, pixels);
        }
    }

    #[test]
    fn adler32_matches_known_values() {
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        // Long enough for the modulo to matter.
        let big = vec![0xffu8; 100_000];
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(u64::from(adler32(&big)), (b << 16) | a);
    }

    #[test]
    fn headers_that_are_not_png_are_refused() {
        let good = encode_gray(2, 2, &[0; 4]);
        assert_eq!(dimensions(&good[..20]), Err(PngError::TooShort { len: 20 }));
        let mut bad = good.clone();
        bad[1] = b'X';
        assert_eq!(dimensions(&bad), Err(PngError::BadSignature));
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(b"IDAT");
        assert_eq!(dimensions(&bad), Err(PngError::NoHeader));
        let mut bad = good.clone();
        bad[17] ^= 1;
        assert_eq!(dimensions(&bad), Err(PngError::BadCrc));
        let mut zero = good;
        zero[16..20].copy_from_slice(&0u32.to_be_bytes());
        let crc = crc32fast::hash(&zero[12..29]);
        zero[29..33].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            dimensions(&zero),
            Err(PngError::BadSize {
                width: 0,
                height: 2
            })
        );
    }

    /// The header of a screendump QEMU 10.0 wrote (std VGA, 640x480, see tests/all).
    #[test]
    fn reads_a_qemu_screendump_header() {
        let head: [u8; 33] = [
            0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48,
            0x44, 0x52, 0x00, 0x00, 0x02, 0x80, 0x00, 0x00, 0x01, 0xe0, 0x08, 0x02, 0x00, 0x00,
            0x00, 0xba, 0xb3, 0x4b, 0xb3,
        ];
        assert_eq!(dimensions(&head), Ok((640, 480)));
    }
}
