//! IPFIX (RFC 7011) export of per-VM-pair flow records, and a strict decoder for the messages it
//! makes (used by tests; it checks every length field).
//!
//! Each message is self-contained for UDP: header, the template set, then a data set. RFC 7011
//! section 10.3.6 asks UDP exporters to resend templates periodically; sending it in every message
//! is the simplest schedule that satisfies it.

use crate::stats::FlowDelta;
use crate::types::{Counter, MacAddr, TrafficClass};

/// IPFIX version number in the message header.
pub const VERSION: u16 = 10;
/// Set id of a template set.
pub const TEMPLATE_SET_ID: u16 = 2;
/// Id of the one template this exporter uses.
pub const TEMPLATE_ID: u16 = 256;
/// Private Enterprise Number of the class field: 32473 is reserved for documentation (RFC 5612).
pub const ENTERPRISE: u32 = 32473;
/// Enterprise-specific element: traffic class (1 intra-server, 2 inter-server, 3 inter-domain).
pub const IE_TRAFFIC_CLASS: u16 = 1;

const HEADER_LEN: usize = 16;
/// Keep messages under a 1500-byte path MTU with room for IP/UDP headers.
const MAX_MESSAGE: usize = 1400;

/// One field of a template: (information element id, length, enterprise number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    /// Information element id (without the enterprise bit).
    pub ie: u16,
    /// Encoded length in bytes.
    pub len: u16,
    /// Enterprise number for enterprise-specific elements.
    pub enterprise: Option<u32>,
}

/// The exporter's template, in record order.
pub const FIELDS: [FieldSpec; 7] = [
    FieldSpec {
        ie: 56,
        len: 6,
        enterprise: None,
    }, // sourceMacAddress
    FieldSpec {
        ie: 80,
        len: 6,
        enterprise: None,
    }, // destinationMacAddress
    FieldSpec {
        ie: 1,
        len: 8,
        enterprise: None,
    }, // octetDeltaCount
    FieldSpec {
        ie: 2,
        len: 8,
        enterprise: None,
    }, // packetDeltaCount
    FieldSpec {
        ie: 152,
        len: 8,
        enterprise: None,
    }, // flowStartMilliseconds
    FieldSpec {
        ie: 153,
        len: 8,
        enterprise: None,
    }, // flowEndMilliseconds
    FieldSpec {
        ie: IE_TRAFFIC_CLASS,
        len: 1,
        enterprise: Some(ENTERPRISE),
    },
];

const RECORD_LEN: usize = 6 + 6 + 8 + 8 + 8 + 8 + 1;

/// Every length this module writes is bounded by `MAX_MESSAGE` (< 2^16) by construction.
fn len16(n: usize) -> u16 {
    u16::try_from(n).expect("ipfix lengths are bounded by MAX_MESSAGE")
}

/// Builds IPFIX messages; keeps the sequence number across calls as RFC 7011 requires.
#[derive(Debug)]
pub struct IpfixExporter {
    observation_domain: u32,
    /// Data records sent so far (mod 2^32).
    sequence: u32,
}

impl IpfixExporter {
    /// An exporter for one observation domain (one vinfra domain).
    pub fn new(observation_domain: u32) -> IpfixExporter {
        IpfixExporter {
            observation_domain,
            sequence: 0,
        }
    }

    fn template_set() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&TEMPLATE_SET_ID.to_be_bytes());
        s.extend_from_slice(&[0, 0]); // length, patched below
        s.extend_from_slice(&TEMPLATE_ID.to_be_bytes());
        s.extend_from_slice(&len16(FIELDS.len()).to_be_bytes());
        for f in FIELDS {
            let ie = if f.enterprise.is_some() {
                f.ie | 0x8000
            } else {
                f.ie
            };
            s.extend_from_slice(&ie.to_be_bytes());
            s.extend_from_slice(&f.len.to_be_bytes());
            if let Some(e) = f.enterprise {
                s.extend_from_slice(&e.to_be_bytes());
            }
        }
        let len = len16(s.len());
        s[2..4].copy_from_slice(&len.to_be_bytes());
        s
    }

    /// Encodes `flows` into as many messages as needed (none for no flows).
    pub fn encode(&mut self, flows: &[FlowDelta], export_time_s: u64) -> Vec<Vec<u8>> {
        let template = Self::template_set();
        let per_msg = (MAX_MESSAGE - HEADER_LEN - template.len() - 4) / RECORD_LEN;
        let export_time = u32::try_from(export_time_s).unwrap_or(u32::MAX);
        let mut out = Vec::new();
        for chunk in flows.chunks(per_msg) {
            let mut m = Vec::with_capacity(MAX_MESSAGE);
            m.extend_from_slice(&VERSION.to_be_bytes());
            m.extend_from_slice(&[0, 0]);
            m.extend_from_slice(&export_time.to_be_bytes());
            m.extend_from_slice(&self.sequence.to_be_bytes());
            m.extend_from_slice(&self.observation_domain.to_be_bytes());
            m.extend_from_slice(&template);
            let set_len = 4 + chunk.len() * RECORD_LEN;
            m.extend_from_slice(&TEMPLATE_ID.to_be_bytes());
            m.extend_from_slice(&len16(set_len).to_be_bytes());
            for f in chunk {
                m.extend_from_slice(&f.src.0);
                m.extend_from_slice(&f.dst.0);
                m.extend_from_slice(&f.counter.bytes.to_be_bytes());
                m.extend_from_slice(&f.counter.packets.to_be_bytes());
                m.extend_from_slice(&f.start_ms.to_be_bytes());
                m.extend_from_slice(&f.end_ms.to_be_bytes());
                m.push(f.class.code());
            }
            let len = len16(m.len());
            m[2..4].copy_from_slice(&len.to_be_bytes());
            // A chunk holds at most ~30 records.
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            self.sequence = self.sequence.wrapping_add(n);
            out.push(m);
        }
        out
    }
}

/// A message this decoder rejects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpfixParseError {
    /// Shorter than what a length field announces.
    #[error("ipfix message truncated at byte {at}")]
    Truncated {
        /// Offset where data ran out.
        at: usize,
    },
    /// Not version 10.
    #[error("ipfix version {0} is not 10")]
    Version(u16),
    /// The header length differs from the datagram length.
    #[error("ipfix header length {header} but datagram of {actual} bytes")]
    Length {
        /// Header's length field.
        header: usize,
        /// Bytes received.
        actual: usize,
    },
    /// A data set whose template was not defined earlier in the message.
    #[error("data set {0} before its template")]
    UnknownTemplate(u16),
    /// A data record that does not match the template this module exports.
    #[error("unexpected template layout")]
    Layout,
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpfixMessage {
    /// Export time (unix seconds).
    pub export_time: u32,
    /// Sequence number.
    pub sequence: u32,
    /// Observation domain id.
    pub observation_domain: u32,
    /// Set ids in message order (2 = template, >= 256 data).
    pub set_ids: Vec<u16>,
    /// The records of data sets, decoded with the template defined before them.
    pub records: Vec<FlowDelta>,
}

fn rd16(b: &[u8], at: usize) -> Result<u16, IpfixParseError> {
    let s = b.get(at..at + 2).ok_or(IpfixParseError::Truncated { at })?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn rd32(b: &[u8], at: usize) -> Result<u32, IpfixParseError> {
    let s = b.get(at..at + 4).ok_or(IpfixParseError::Truncated { at })?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn rd64(b: &[u8], at: usize) -> Result<u64, IpfixParseError> {
    Ok((u64::from(rd32(b, at)?) << 32) | u64::from(rd32(b, at + 4)?))
}

/// Decodes one datagram, checking version, every length, and that templates precede their data.
pub fn parse_message(b: &[u8]) -> Result<IpfixMessage, IpfixParseError> {
    let version = rd16(b, 0)?;
    if version != VERSION {
        return Err(IpfixParseError::Version(version));
    }
    let len = usize::from(rd16(b, 2)?);
    if len != b.len() {
        return Err(IpfixParseError::Length {
            header: len,
            actual: b.len(),
        });
    }
    let mut msg = IpfixMessage {
        export_time: rd32(b, 4)?,
        sequence: rd32(b, 8)?,
        observation_domain: rd32(b, 12)?,
        set_ids: Vec::new(),
        records: Vec::new(),
    };
    let mut templates: Vec<(u16, Vec<FieldSpec>)> = Vec::new();
    let mut at = HEADER_LEN;
    while at < len {
        let id = rd16(b, at)?;
        let set_len = usize::from(rd16(b, at + 2)?);
        if set_len < 4 || at + set_len > len {
            return Err(IpfixParseError::Truncated { at });
        }
        let end = at + set_len;
        msg.set_ids.push(id);
        let mut p = at + 4;
        if id == TEMPLATE_SET_ID {
            // Records until fewer bytes than a template header remain (padding).
            while p + 4 <= end {
                let tid = rd16(b, p)?;
                let count = rd16(b, p + 2)?;
                p += 4;
                let mut fields = Vec::new();
                for _ in 0..count {
                    let ie = rd16(b, p)?;
                    let flen = rd16(b, p + 2)?;
                    p += 4;
                    let enterprise = if ie & 0x8000 != 0 {
                        p += 4;
                        Some(rd32(b, p - 4)?)
                    } else {
                        None
                    };
                    fields.push(FieldSpec {
                        ie: ie & 0x7fff,
                        len: flen,
                        enterprise,
                    });
                }
                if p > end {
                    return Err(IpfixParseError::Truncated { at: p });
                }
                templates.push((tid, fields));
            }
        } else if id >= 256 {
            let fields = &templates
                .iter()
                .find(|(t, _)| *t == id)
                .ok_or(IpfixParseError::UnknownTemplate(id))?
                .1;
            if fields.as_slice() != FIELDS {
                return Err(IpfixParseError::Layout);
            }
            while p + RECORD_LEN <= end {
                let mac = |o: usize| {
                    MacAddr::from_slice(&b[o..o + 6]).ok_or(IpfixParseError::Truncated { at: o })
                };
                msg.records.push(FlowDelta {
                    src: mac(p)?,
                    dst: mac(p + 6)?,
                    counter: Counter {
                        bytes: rd64(b, p + 12)?,
                        packets: rd64(b, p + 20)?,
                    },
                    start_ms: rd64(b, p + 28)?,
                    end_ms: rd64(b, p + 36)?,
                    class: TrafficClass::from_code(b[p + 44]).ok_or(IpfixParseError::Layout)?,
                });
                p += RECORD_LEN;
            }
        }
        at = end;
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u8) -> FlowDelta {
        FlowDelta {
            src: MacAddr([2, 0, 0, 0, 0, n]),
            dst: MacAddr([2, 0, 0, 0, 1, n]),
            class: TrafficClass::InterServer,
            counter: Counter {
                packets: u64::from(n),
                bytes: 100 * u64::from(n),
            },
            start_ms: 1,
            end_ms: 2,
        }
    }

    #[test]
    fn round_trip_splits_messages_and_counts_sequence() {
        let flows: Vec<_> = (1..=40).map(flow).collect();
        let mut e = IpfixExporter::new(7);
        let msgs = e.encode(&flows, 1234);
        assert_eq!(msgs.len(), 2);
        let a = parse_message(&msgs[0]).unwrap();
        let b = parse_message(&msgs[1]).unwrap();
        assert_eq!(a.set_ids, vec![2, 256]);
        assert_eq!(
            (a.sequence, a.observation_domain, a.export_time),
            (0, 7, 1234)
        );
        assert_eq!(b.sequence as usize, a.records.len());
        let back: Vec<_> = a.records.into_iter().chain(b.records).collect();
        assert_eq!(back, flows);
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE));
    }

    #[test]
    fn decoder_rejects_bad_lengths_without_panicking() {
        let m = IpfixExporter::new(1).encode(&[flow(1)], 0).remove(0);
        for n in 0..m.len() {
            assert!(parse_message(&m[..n]).is_err());
        }
        let mut bad = m.clone();
        bad[1] = 9;
        assert_eq!(parse_message(&bad), Err(IpfixParseError::Version(9)));
        // Data set before the template.
        let mut swapped = m[..16].to_vec();
        let tlen = usize::from(u16::from_be_bytes([m[18], m[19]]));
        swapped.extend_from_slice(&m[16 + tlen..]);
        swapped.extend_from_slice(&m[16..16 + tlen]);
        assert_eq!(
            parse_message(&swapped),
            Err(IpfixParseError::UnknownTemplate(256))
        );
    }
}
