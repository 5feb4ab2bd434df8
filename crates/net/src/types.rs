//! Plain data shared by the switch, the controller and the wire: addresses, ids, classes, counters.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The all-ones broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group (multicast or broadcast) addresses have the low bit of the first octet set.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Reads the first six bytes of `b`; `None` if it is shorter.
    pub fn from_slice(b: &[u8]) -> Option<MacAddr> {
        let a: [u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(MacAddr(a))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address string that is not six `:`-separated hex octets.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {input:?}")]
pub struct ParseMacError {
    input: String,
}

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError {
            input: s.to_owned(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

::model::name_type!(
    /// A controller's domain: the set of switches (hosts) one controller owns.
    DomainId
);
::model::name_type!(
    /// One virtual switch, i.e. one host.
    SwitchId
);

/// Where a frame's two ends are, seen from the switch that counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficClass {
    /// Both ends are VMs on this host.
    IntraServer,
    /// The other end is a VM on another host of the same domain.
    InterServer,
    /// The other end is not in this domain's address table.
    InterDomain,
}

impl TrafficClass {
    /// Every class, in a fixed order (the index used by [`ClassCounters`]).
    pub const ALL: [TrafficClass; 3] = [
        TrafficClass::IntraServer,
        TrafficClass::InterServer,
        TrafficClass::InterDomain,
    ];

    /// Stable lowercase name (metrics labels, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficClass::IntraServer => "intra_server",
            TrafficClass::InterServer => "inter_server",
            TrafficClass::InterDomain => "inter_domain",
        }
    }

    /// The one-byte code exported in IPFIX (1, 2, 3).
    pub fn code(self) -> u8 {
        match self {
            TrafficClass::IntraServer => 1,
            TrafficClass::InterServer => 2,
            TrafficClass::InterDomain => 3,
        }
    }

    /// Inverse of [`TrafficClass::code`].
    pub fn from_code(c: u8) -> Option<TrafficClass> {
        TrafficClass::ALL.into_iter().find(|k| k.code() == c)
    }

    fn index(self) -> usize {
        match self {
            TrafficClass::IntraServer => 0,
            TrafficClass::InterServer => 1,
            TrafficClass::InterDomain => 2,
        }
    }
}

impl fmt::Display for TrafficClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A packet and byte count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Frames.
    pub packets: u64,
    /// Bytes of whole Ethernet frames (no FCS).
    pub bytes: u64,
}

impl Counter {
    /// Counts one frame of `len` bytes.
    pub fn add_frame(&mut self, len: usize) {
        self.packets = self.packets.saturating_add(1);
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
    }

    /// Adds another count.
    pub fn add(&mut self, o: Counter) {
        self.packets = self.packets.saturating_add(o.packets);
        self.bytes = self.bytes.saturating_add(o.bytes);
    }

    /// `self - earlier`, never negative: a smaller reading (reordered report) adds nothing.
    pub fn since(self, earlier: Counter) -> Counter {
        Counter {
            packets: self.packets.saturating_sub(earlier.packets),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }

    /// Field-wise maximum: the newest reading of a monotonic counter.
    pub fn max(self, o: Counter) -> Counter {
        Counter {
            packets: self.packets.max(o.packets),
            bytes: self.bytes.max(o.bytes),
        }
    }

    /// No frames.
    pub fn is_zero(self) -> bool {
        self.packets == 0 && self.bytes == 0
    }
}

/// Per-class counters, plus the frames no class fits (group destinations) and malformed ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounters {
    /// Indexed by the order of [`TrafficClass::ALL`].
    pub classes: [Counter; 3],
    /// Broadcast and multicast frames sent by local VMs (flooded, not classified).
    pub flood: Counter,
    /// ARP and IPv6 neighbour discovery sent by local VMs (unicast or not), counted apart
    /// from the classes so address resolution never blurs a VM pair's counts. Only the
    /// kernel datapath separates them; the user-space switch counts them as their class/flood.
    #[serde(default)]
    pub neighbor: Counter,
    /// Malformed frames (runts, bad headers): dropped and counted here.
    pub errors: u64,
}

impl ClassCounters {
    /// The counter of one class.
    pub fn class(&self, c: TrafficClass) -> Counter {
        self.classes[c.index()]
    }

    /// The counter of one class, mutable.
    pub fn class_mut(&mut self, c: TrafficClass) -> &mut Counter {
        &mut self.classes[c.index()]
    }

    /// Adds another set of counters.
    pub fn add(&mut self, o: &ClassCounters) {
        for (a, b) in self.classes.iter_mut().zip(o.classes) {
            a.add(b);
        }
        self.flood.add(o.flood);
        self.neighbor.add(o.neighbor);
        self.errors = self.errors.saturating_add(o.errors);
    }

    /// Field-wise `self - earlier`, never negative.
    pub fn since(&self, earlier: &ClassCounters) -> ClassCounters {
        let mut d = ClassCounters::default();
        for i in 0..3 {
            d.classes[i] = self.classes[i].since(earlier.classes[i]);
        }
        d.flood = self.flood.since(earlier.flood);
        d.neighbor = self.neighbor.since(earlier.neighbor);
        d.errors = self.errors.saturating_sub(earlier.errors);
        d
    }

    /// Field-wise maximum.
    pub fn max(&self, o: &ClassCounters) -> ClassCounters {
        let mut m = ClassCounters::default();
        for i in 0..3 {
            m.classes[i] = self.classes[i].max(o.classes[i]);
        }
        m.flood = self.flood.max(o.flood);
        m.neighbor = self.neighbor.max(o.neighbor);
        m.errors = self.errors.max(o.errors);
        m
    }
}

/// A VM's address on one switch port, as the switch reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortAddress {
    /// VM name.
    pub vm: String,
    /// The VM's MAC address.
    pub mac: MacAddr,
    /// The VM's IP address, when known.
    pub ip: Option<IpAddr>,
}

/// One VM in a domain's aggregate address table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressEntry {
    /// The switch (host) the VM is on.
    pub switch: SwitchId,
    /// VM name.
    pub vm: String,
    /// The VM's MAC address.
    pub mac: MacAddr,
    /// The VM's IP address, when known.
    pub ip: Option<IpAddr>,
}

/// The aggregate of every switch's VM addresses in one domain, versioned so a switch
/// applies only a table newer than the one it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressTable {
    /// The domain.
    pub domain: DomainId,
    /// Bumped by the controller on every change; 0 is the empty initial table.
    pub version: u64,
    /// Sorted by switch, then VM.
    pub entries: Vec<AddressEntry>,
}

impl AddressTable {
    /// The empty version-0 table of `domain`.
    pub fn empty(domain: DomainId) -> AddressTable {
        AddressTable {
            domain,
            version: 0,
            entries: Vec::new(),
        }
    }
}
