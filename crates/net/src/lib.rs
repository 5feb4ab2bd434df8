//! Virtual switching and traffic statistics for vinfra.
//!
//! One job: move Ethernet frames between a host's VM ports and its uplink, classify and count
//! them, and merge the counts of every switch of a domain at that domain's controller.
//!
//! - [`core`] (pure): MAC learning, the controller's address table, classification
//!   (intra-server / inter-server / inter-domain), per-class and per-VM-pair counters, flow aging.
//! - [`switch`] (I/O shell): one thread per switch polling AF_PACKET sockets ([`rawsock`]) and
//!   reporting to the controller over TCP with length-prefixed JSON ([`proto`]).
//! - [`controller`]: one per domain; aggregates and versions the address table, merges counters
//!   with reset epochs ([`stats`], pure), renders the traffic report and Prometheus text that the API server serves (`GET /v1/traffic`,
//!   `GET /metrics`), and
//!   exports IPFIX ([`ipfix`]).
//! - [`kernel`] + [`kswitch`]: the datapath VMs use. A BPF classifier (`bpf/classifier.c`,
//!   compiled by clang in `build.rs`) at tc ingress/egress of each VM NIC counts in the
//!   kernel and forwards between the host's VMs on one bridge, the Linux bridge the rest;
//!   [`kswitch::KernelSwitch`] reports its maps to
//!   the controller like a switch and installs the address table into them.
//! - [`mod@bench`]: `vinfra bench vswitch`.
//!
//! ```
//! use net::core::{CoreTimeouts, PortId, PortKind, SwitchCore};
//! use net::{MacAddr, PortAddress, TrafficClass};
//! let vm = |n: u8| PortKind::Vm(PortAddress { vm: format!("vm{n}"), mac: MacAddr([2, 0, 0, 0, 0, n]), ip: None });
//! let mut sw = SwitchCore::new("h1".into(), "dom-a".into(), vec![vm(1), vm(2)], CoreTimeouts::default());
//! let frame = net::frame::build("02:00:00:00:00:02".parse().unwrap(), MacAddr([2, 0, 0, 0, 0, 1]), 0x88b5, 64);
//! sw.process(PortId(0), &frame, 0);
//! assert_eq!(sw.counters().class(TrafficClass::IntraServer).packets, 1);
//! assert_eq!(sw.process(PortId(0), &frame[..10], 0), net::core::Verdict::Drop(net::core::DropReason::Malformed(net::frame::MalformedFrame::Runt { len: 10 })));
//! assert_eq!(sw.counters().errors, 1);
//! ```
//!
//! Depends on no other vinfra crate. `unsafe` is confined to one block in [`rawsock`].
#![warn(missing_docs)]

pub mod bench;
pub mod controller;
pub mod core;
pub mod frame;
pub mod ipfix;
pub mod kernel;
pub mod kswitch;
pub mod netns;
pub mod proto;
pub mod rawsock;
pub mod stats;
pub mod switch;
pub mod types;

pub use controller::{serve_switches, Controller, TrafficQuery, TrafficReport};
pub use kswitch::{KernelSwitch, KernelSwitchConfig, KernelSwitchError, KernelSwitchStatus};
pub use switch::{PortConfig, Switch, SwitchConfig, SwitchHandle, SwitchStatus};
pub use types::{
    AddressTable, ClassCounters, Counter, DomainId, MacAddr, PortAddress, SwitchId, TrafficClass,
};
