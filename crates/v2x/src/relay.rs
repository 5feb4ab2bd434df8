//! The relay path for devices without a direct path: device → its MEC → (inter-operator
//! link) → the peer's MEC → peer device, over UDP. Both MECs check the link: the sender's
//! operator that it opened `src → dst`, the receiver's that it opened `dst → src`.
//!
//! Datagram: kind (1 byte) · source PC5 address (4) · destination PC5 address (4) · payload.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;

use crate::mec::Mec;

/// Device → its MEC.
pub const FROM_DEVICE: u8 = 1;
/// MEC → peer MEC.
pub const BETWEEN_MECS: u8 = 2;
/// MEC → device.
pub const TO_DEVICE: u8 = 3;

/// Header length.
pub const HEADER: usize = 9;

/// Builds a relay datagram.
pub fn encode(kind: u8, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.push(kind);
    v.extend_from_slice(&src.octets());
    v.extend_from_slice(&dst.octets());
    v.extend_from_slice(payload);
    v
}

/// Splits a relay datagram (None: too short).
pub fn decode(b: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, &[u8])> {
    if b.len() < HEADER {
        return None;
    }
    let a = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
    Some((b[0], a(1), a(5), &b[HEADER..]))
}

/// Runs the relay on `sock` until the task is dropped.
pub async fn run(sock: UdpSocket, mec: Arc<Mec>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some((to, out)) = route(&mec, &buf[..n], from) {
            let _ = sock.send_to(&out, to).await;
        }
    }
}

/// Where a datagram goes next, if anywhere.
pub fn route(mec: &Mec, b: &[u8], from: SocketAddr) -> Option<(SocketAddr, Vec<u8>)> {
    let (kind, src, dst, payload) = decode(b)?;
    let f = &mec.function;
    match kind {
        FROM_DEVICE => {
            // The sender must be the authorized device holding `src`, sending from its
            // access-network address.
            let me = f.relay_target(src)?;
            if me.ip() != from.ip() {
                return None;
            }
            match f.relay_route(src, dst)? {
                None => Some((f.relay_target(dst)?, encode(TO_DEVICE, src, dst, payload))),
                Some(peer) => Some((peer, encode(BETWEEN_MECS, src, dst, payload))),
            }
        }
        BETWEEN_MECS => {
            if !f.config().peers.iter().any(|p| p.relay.ip() == from.ip()) {
                return None;
            }
            // Our device must hold the link back to the sender.
            f.relay_route(dst, src)?;
            Some((f.relay_target(dst)?, encode(TO_DEVICE, src, dst, payload)))
        }
        _ => None,
    }
}
