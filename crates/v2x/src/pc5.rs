//! The PC5 unicast link protocol between two devices, after TS 23.287 §6.3.3.1 and
//! TS 24.587 §7.2.2/7.2.10: the initiator sends a DIRECT COMMUNICATION REQUEST naming the
//! V2X service and the link key (by id) with its nonce; the responder answers with a
//! SECURITY MODE COMMAND (its nonce, MAC under the link key); the initiator checks it and
//! answers SECURITY MODE COMPLETE (MAC); the responder checks that and sends DIRECT
//! COMMUNICATION ACCEPT. Both then hold a session key derived from the link key and both
//! nonces; every data message carries a sequence number and a truncated HMAC under it.
//!
//! Wire format (UDP on the PC5 medium): kind (1 byte), then fields in a fixed order;
//! strings are a 1-byte length then bytes.

use ring::hmac;

/// Direct communication request.
pub const DCR: u8 = 0x10;
/// Security mode command.
pub const SMC: u8 = 0x11;
/// Security mode complete.
pub const SMP: u8 = 0x12;
/// Direct communication accept.
pub const DCA: u8 = 0x13;
/// Direct communication release.
pub const REL: u8 = 0x14;
/// Data (a V2X message).
pub const DATA: u8 = 0x20;

/// Bytes of the MAC on data messages.
pub const TAG: usize = 16;

/// A decoded PC5 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// DIRECT COMMUNICATION REQUEST.
    Request {
        /// Initiator's device id.
        device: String,
        /// Initiator's PLMN (`MCC-MNC`).
        plmn: String,
        /// V2X service.
        service: u64,
        /// Link key id (4 bytes).
        key_id: [u8; 4],
        /// Initiator's nonce.
        nonce: [u8; 16],
    },
    /// SECURITY MODE COMMAND.
    SecurityModeCommand {
        /// Responder's device id.
        device: String,
        /// Responder's PLMN.
        plmn: String,
        /// Responder's nonce.
        nonce: [u8; 16],
        /// MAC under the link key.
        mac: [u8; 32],
    },
    /// SECURITY MODE COMPLETE.
    SecurityModeComplete {
        /// MAC under the link key.
        mac: [u8; 32],
    },
    /// DIRECT COMMUNICATION ACCEPT.
    Accept {
        /// MAC under the session key.
        mac: [u8; 32],
    },
    /// DIRECT COMMUNICATION RELEASE.
    Release,
    /// A V2X message.
    Data {
        /// Sequence number.
        seq: u64,
        /// Sender's clock when sent, ns (for one-way latency inside one process).
        sent_ns: u64,
        /// Payload.
        payload: Vec<u8>,
        /// Truncated HMAC under the session key over everything before it.
        tag: [u8; TAG],
    },
}

/// A message that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed PC5 message: {0}")]
pub struct Malformed(pub &'static str);

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn str(&mut self) -> Result<String, Malformed> {
        let n = self.take(1)?[0] as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Malformed("string is not UTF-8"))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    v.push(u8::try_from(b.len()).unwrap_or(255));
    v.extend_from_slice(b);
}

impl Msg {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        match self {
            Msg::Request {
                device,
                plmn,
                service,
                key_id,
                nonce,
            } => {
                v.push(DCR);
                put_str(&mut v, device);
                put_str(&mut v, plmn);
                v.extend_from_slice(&service.to_be_bytes());
                v.extend_from_slice(key_id);
                v.extend_from_slice(nonce);
            }
            Msg::SecurityModeCommand {
                device,
                plmn,
                nonce,
                mac,
            } => {
                v.push(SMC);
                put_str(&mut v, device);
                put_str(&mut v, plmn);
                v.extend_from_slice(nonce);
                v.extend_from_slice(mac);
            }
            Msg::SecurityModeComplete { mac } => {
                v.push(SMP);
                v.extend_from_slice(mac);
            }
            Msg::Accept { mac } => {
                v.push(DCA);
                v.extend_from_slice(mac);
            }
            Msg::Release => v.push(REL),
            Msg::Data {
                seq,
                sent_ns,
                payload,
                tag,
            } => {
                v.extend_from_slice(&data_body(*seq, *sent_ns, payload));
                v.extend_from_slice(tag);
            }
        }
        v
    }

    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<Msg, Malformed> {
        let mut r = Rd(b);
        let kind = r.take(1)?[0];
        let m = match kind {
            DCR => Msg::Request {
                device: r.str()?,
                plmn: r.str()?,
                service: r.u64()?,
                key_id: r.arr()?,
                nonce: r.arr()?,
            },
            SMC => Msg::SecurityModeCommand {
                device: r.str()?,
                plmn: r.str()?,
                nonce: r.arr()?,
                mac: r.arr()?,
            },
            SMP => Msg::SecurityModeComplete { mac: r.arr()? },
            DCA => Msg::Accept { mac: r.arr()? },
            REL => Msg::Release,
            DATA => {
                let seq = r.u64()?;
                let sent_ns = r.u64()?;
                let rest = r.0;
                if rest.len() < TAG {
                    return Err(Malformed("data shorter than its tag"));
                }
                let (p, t) = rest.split_at(rest.len() - TAG);
                let mut tag = [0u8; TAG];
                tag.copy_from_slice(t);
                return Ok(Msg::Data {
                    seq,
                    sent_ns,
                    payload: p.to_vec(),
                    tag,
                });
            }
            _ => return Err(Malformed("unknown message kind")),
        };
        if !r.0.is_empty() {
            return Err(Malformed("trailing bytes"));
        }
        Ok(m)
    }
}

fn data_body(seq: u64, sent_ns: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + payload.len() + TAG);
    v.push(DATA);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&sent_ns.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut c = hmac::Context::with_key(&k);
    for p in parts {
        c.update(&(p.len() as u64).to_be_bytes());
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.sign().as_ref());
    out
}

/// MAC of the security mode command.
pub fn smc_mac(link_key: &[u8], n1: &[u8; 16], n2: &[u8; 16], init: &str, resp: &str) -> [u8; 32] {
    mac(
        link_key,
        &[b"smc", n1, n2, init.as_bytes(), resp.as_bytes()],
    )
}

/// MAC of the security mode complete.
pub fn smp_mac(link_key: &[u8], n1: &[u8; 16], n2: &[u8; 16]) -> [u8; 32] {
    mac(link_key, &[b"smp", n1, n2])
}

/// The session key of a link.
pub fn session_key(link_key: &[u8], n1: &[u8; 16], n2: &[u8; 16]) -> [u8; 32] {
    mac(link_key, &[b"session", n1, n2])
}

/// MAC of the accept.
pub fn accept_mac(session: &[u8; 32]) -> [u8; 32] {
    mac(session, &[b"accept"])
}

/// Equality that takes the same time wherever the first difference is (for MACs and
/// tokens).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A protected data message.
pub fn seal(session: &[u8; 32], seq: u64, sent_ns: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = data_body(seq, sent_ns, payload);
    let t = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, session), &v);
    v.extend_from_slice(&t.as_ref()[..TAG]);
    v
}

/// Checks a data message's tag; returns (seq, sent_ns, payload).
pub fn open(session: &[u8; 32], b: &[u8]) -> Option<(u64, u64, Vec<u8>)> {
    if b.len() < 17 + TAG || b[0] != DATA {
        return None;
    }
    let (body, tag) = b.split_at(b.len() - TAG);
    let t = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, session), body);
    if !same(&t.as_ref()[..TAG], tag) {
        return None;
    }
    match Msg::decode(b).ok()? {
        Msg::Data {
            seq,
            sent_ns,
            payload,
            ..
        } => Some((seq, sent_ns, payload)),
        _ => None,
    }
}

/// Parses a hex string into bytes.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_a_forged_tag() {
        let m = Msg::Request {
            device: "car-1".into(),
            plmn: "001-01".into(),
            service: 36,
            key_id: [1, 2, 3, 4],
            nonce: [7; 16],
        };
        assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        let k = [9u8; 32];
        let mut d = seal(&k, 5, 99, &[0xAB; 300]);
        assert_eq!(open(&k, &d).unwrap().0, 5);
        let last = d.len() - 1;
        d[last] ^= 1;
        assert!(open(&k, &d).is_none());
        assert!(open(&[8u8; 32], &seal(&k, 1, 1, b"x")).is_none());
        assert!(Msg::decode(&[DCR, 200]).is_err());
    }
}
