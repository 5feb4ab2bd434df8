//! Ethernet header parsing and sanity checks. Pure; never panics on any input.

use crate::types::MacAddr;

/// Shortest frame with a whole Ethernet header.
pub const ETH_HLEN: usize = 14;

/// What the switch needs from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHeader {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// EtherType after any 802.1Q/802.1ad tags (or the 802.3 length field).
    pub ethertype: u16,
}

/// Why a frame was rejected. Each is counted as an error and the frame dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedFrame {
    /// Shorter than an Ethernet header.
    #[error("runt frame of {len} bytes")]
    Runt {
        /// Frame length.
        len: usize,
    },
    /// A group address as the source is never valid.
    #[error("multicast source address")]
    MulticastSource,
    /// A VLAN tag cut short.
    #[error("truncated vlan tag")]
    TruncatedVlan,
    /// An EtherType in the undefined 1501..1536 range, or an 802.3 length beyond the frame.
    #[error("bad ethertype or length field {value:#06x}")]
    BadEthertype {
        /// The field's value.
        value: u16,
    },
    /// An IPv4 header that is short, not version 4, or whose lengths do not fit the frame.
    #[error("bad ipv4 header")]
    BadIpv4,
    /// An IPv6 header that is short, not version 6, or whose payload length exceeds the frame.
    #[error("bad ipv6 header")]
    BadIpv6,
    /// An ARP packet shorter than its fixed part.
    #[error("truncated arp packet")]
    BadArp,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// Parses and checks the Ethernet header and, for IPv4/IPv6/ARP, the network header's lengths.
pub fn parse(frame: &[u8]) -> Result<EthHeader, MalformedFrame> {
    let runt = MalformedFrame::Runt { len: frame.len() };
    let dst = MacAddr::from_slice(frame).ok_or(runt)?;
    let src = MacAddr::from_slice(frame.get(6..).ok_or(runt)?).ok_or(runt)?;
    let mut ethertype = be16(frame, 12).ok_or(runt)?;
    if src.is_multicast() {
        return Err(MalformedFrame::MulticastSource);
    }
    let mut off = ETH_HLEN;
    // At most two tags (802.1ad outer + 802.1Q inner); more is not a frame we forward.
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        ethertype = be16(frame, off + 2).ok_or(MalformedFrame::TruncatedVlan)?;
        off += 4;
    }
    let payload = frame.get(off..).unwrap_or(&[]);
    match ethertype {
        0..=1500 if usize::from(ethertype) > payload.len() => {
            return Err(MalformedFrame::BadEthertype { value: ethertype })
        }
        1501..=1535 => return Err(MalformedFrame::BadEthertype { value: ethertype }),
        ETHERTYPE_IPV4 => check_ipv4(payload)?,
        ETHERTYPE_IPV6 => check_ipv6(payload)?,
        ETHERTYPE_ARP if payload.len() < 28 => return Err(MalformedFrame::BadArp),
        _ => {}
    }
    Ok(EthHeader {
        dst,
        src,
        ethertype,
    })
}

fn check_ipv4(p: &[u8]) -> Result<(), MalformedFrame> {
    let bad = MalformedFrame::BadIpv4;
    let first = *p.first().ok_or(bad)?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || p.len() < ihl {
        return Err(bad);
    }
    let total = usize::from(be16(p, 2).ok_or(bad)?);
    // Ethernet pads short packets, so the frame may be longer than the packet, never shorter.
    if total < ihl || total > p.len() {
        return Err(bad);
    }
    Ok(())
}

fn check_ipv6(p: &[u8]) -> Result<(), MalformedFrame> {
    let bad = MalformedFrame::BadIpv6;
    if p.len() < 40 || p[0] >> 4 != 6 {
        return Err(bad);
    }
    let plen = usize::from(be16(p, 4).ok_or(bad)?);
    // A payload length of 0 means a jumbogram; it cannot be on a 1500-MTU port but is not malformed.
    if plen != 0 && 40 + plen > p.len() {
        return Err(bad);
    }
    Ok(())
}

/// Builds a test/bench frame: `dst`, `src`, `ethertype`, payload zero-filled to `len` bytes in total
/// (at least the header).
pub fn build(dst: MacAddr, src: MacAddr, ethertype: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(ETH_HLEN)];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn ipv4(total: u16, vhl: u8, len: usize) -> Vec<u8> {
        let mut f = build(B, A, ETHERTYPE_IPV4, len);
        f[14] = vhl;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f
    }

    #[test]
    fn every_prefix_of_a_frame_parses_or_errors_without_panic() {
        let f = ipv4(46, 0x45, 60);
        for n in 0..f.len() {
            let _ = parse(&f[..n]);
        }
        for n in 0..ETH_HLEN {
            assert_eq!(parse(&f[..n]), Err(MalformedFrame::Runt { len: n }));
        }
    }

    #[test]
    fn good_frames_parse() {
        let h = parse(&ipv4(46, 0x45, 60)).unwrap();
        assert_eq!((h.dst, h.src, h.ethertype), (B, A, ETHERTYPE_IPV4));
        assert!(parse(&build(B, A, 0x88b5, 14)).is_ok());
        let mut tagged = build(B, A, ETHERTYPE_VLAN, 18);
        tagged[16..18].copy_from_slice(&0x88b5u16.to_be_bytes());
        assert_eq!(parse(&tagged).unwrap().ethertype, 0x88b5);
    }

    #[test]
    fn bad_headers_are_rejected() {
        assert_eq!(parse(&ipv4(46, 0x65, 60)), Err(MalformedFrame::BadIpv4));
        assert_eq!(parse(&ipv4(46, 0x44, 60)), Err(MalformedFrame::BadIpv4));
        assert_eq!(parse(&ipv4(47, 0x45, 60)), Err(MalformedFrame::BadIpv4));
        assert_eq!(parse(&ipv4(46, 0x45, 30)), Err(MalformedFrame::BadIpv4));
        assert_eq!(
            parse(&build(B, A, ETHERTYPE_VLAN, 16)),
            Err(MalformedFrame::TruncatedVlan)
        );
        assert_eq!(
            parse(&build(B, A, ETHERTYPE_ARP, 20)),
            Err(MalformedFrame::BadArp)
        );
        assert_eq!(
            parse(&build(B, A, ETHERTYPE_IPV6, 40)),
            Err(MalformedFrame::BadIpv6)
        );
        assert_eq!(
            parse(&build(B, A, 1520, 60)),
            Err(MalformedFrame::BadEthertype { value: 1520 })
        );
        assert_eq!(
            parse(&build(B, A, 40, 60)),
            Ok(EthHeader {
                dst: B,
                src: A,
                ethertype: 40
            })
        );
        assert_eq!(
            parse(&build(B, A, 100, 60)),
            Err(MalformedFrame::BadEthertype { value: 100 })
        );
        assert_eq!(
            parse(&build(B, MacAddr::BROADCAST, 0x88b5, 60)),
            Err(MalformedFrame::MulticastSource)
        );
    }
}
