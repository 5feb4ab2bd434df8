//! What an operator provisions for a device and what the V2X application function answers
//! it: the subscription (V2X API) and the V2X configuration parameters, shaped after the
//! "V2X policy for PC5" of 3GPP TS 24.588 §5.2 (validity timer, PLMNs authorized per radio
//! technology, V2X service → destination layer-2 id, PC5 QoS mapping) plus what an
//! inter-operator link needs (the peer operators' V2X application servers, link keys).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PLMN identity (MCC + MNC), as MEC 030 writes it (`{"mcc": "001", "mnc": "01"}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Plmn {
    /// Mobile country code, 3 digits.
    pub mcc: String,
    /// Mobile network code, 2 or 3 digits.
    pub mnc: String,
}

/// A PLMN written as `MCC-MNC` that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a PLMN: expected MCC-MNC, 3 digits then 2 or 3 digits (e.g. 001-01)")]
pub struct BadPlmn(pub String);

impl Plmn {
    /// Checks the digit counts of a PLMN that came in as JSON.
    pub fn validate(&self) -> Result<(), BadPlmn> {
        let digits =
            |s: &str, n: &[usize]| n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        if digits(&self.mcc, &[3]) && digits(&self.mnc, &[2, 3]) {
            Ok(())
        } else {
            Err(BadPlmn(format!("{}-{}", self.mcc, self.mnc)))
        }
    }
}

impl FromStr for Plmn {
    type Err = BadPlmn;
    fn from_str(s: &str) -> Result<Plmn, BadPlmn> {
        let (mcc, mnc) = s.split_once('-').ok_or_else(|| BadPlmn(s.to_owned()))?;
        let p = Plmn {
            mcc: mcc.to_owned(),
            mnc: mnc.to_owned(),
        };
        p.validate().map_err(|_| BadPlmn(s.to_owned()))?;
        Ok(p)
    }
}

impl fmt::Display for Plmn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.mcc, self.mnc)
    }
}

/// Radio technology of the PC5 reference point (TS 24.588 lists authorized PLMNs per RAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rat {
    /// LTE sidelink.
    #[serde(rename = "E-UTRA")]
    Eutra,
    /// NR sidelink.
    #[serde(rename = "NR")]
    Nr,
}

/// A V2X service, by its identifier (PSID or ITS-AID, as TS 24.588 names services).
pub type ServiceId = u64;

/// Longest device id accepted.
pub const MAX_DEVICE_ID: usize = 64;

/// Checks a device id: 1–64 of `[A-Za-z0-9._-]`.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_DEVICE_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "device id {id:?} must be 1-{MAX_DEVICE_ID} characters of A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// V2X subscription data of one device, as the operator provisions it through the V2X API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct V2xSubscription {
    /// V2X services the device may use.
    pub services: Vec<ServiceId>,
    /// PLMNs whose devices it may talk to over PC5 (its own operator's is always allowed).
    pub plmns: Vec<Plmn>,
    /// Radio technologies it may use on PC5 (default: both).
    #[serde(default = "both_rats")]
    pub rats: Vec<Rat>,
    /// How long configuration parameters stay valid once handed out, seconds (the validity
    /// timer of TS 24.588).
    #[serde(default = "default_validity")]
    pub validity_s: u32,
}

fn both_rats() -> Vec<Rat> {
    vec![Rat::Nr, Rat::Eutra]
}

fn default_validity() -> u32 {
    3600
}

impl V2xSubscription {
    /// Rejects what the function could not act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.services.is_empty() || self.services.len() > 64 {
            return Err("services must list 1-64 V2X service ids".into());
        }
        if self.plmns.len() > 32 {
            return Err("plmns must list at most 32 PLMNs".into());
        }
        for p in &self.plmns {
            p.validate().map_err(|e| e.to_string())?;
        }
        if self.rats.is_empty() {
            return Err("rats must list at least one of NR, E-UTRA".into());
        }
        if !(1..=86_400 * 7).contains(&self.validity_s) {
            return Err("validityS must be 1-604800 seconds".into());
        }
        Ok(())
    }
}

/// What the operator gets back when it provisions a device: the subscription and the
/// device's credential (stands in for what the SIM proves on a real access network).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provisioned {
    /// Device id.
    pub device_id: String,
    /// The subscription as stored.
    pub subscription: V2xSubscription,
    /// Bearer token the device presents to the V2X application function.
    pub device_token: String,
}

/// A device's authorization request for V2X communication.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRequest {
    /// Device id.
    pub device_id: String,
    /// Services it wants (empty: all it is subscribed to).
    #[serde(default)]
    pub services: Vec<ServiceId>,
    /// Its address on the PC5 medium (the emulation's source layer-2 id).
    pub pc5_address: Ipv4Addr,
    /// UDP port on its access-network address where relayed messages reach it.
    #[serde(default)]
    pub relay_port: Option<u16>,
    /// Its home operator, when it asks a visited one: the visited MEC fetches its
    /// subscription from the home MEC over the inter-operator link (the device's token from
    /// home is the proof), instead of needing it provisioned by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_plmn: Option<Plmn>,
}

/// PLMNs a device may use PC5 in, per radio technology (TS 24.588 §5.2.2 items b/c).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pc5Authorization {
    /// Served by NR.
    pub nr: Vec<Plmn>,
    /// Served by E-UTRA.
    pub eutra: Vec<Plmn>,
}

/// V2X service id → destination layer-2 id (TS 24.588 §5.2.2 item d).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceToDestination {
    /// V2X service.
    pub v2x_service_id: ServiceId,
    /// Destination layer-2 id, 24 bits, hex (`0xFF0024`). Operators agree on it per
    /// service, so it is the same on every PLMN.
    pub dst_layer2_id: String,
}

/// PC5 QoS parameters for a service (TS 23.287 §5.4.2: PQI, bit rates, range).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pc5QosParameters {
    /// V2X service.
    pub v2x_service_id: ServiceId,
    /// PC5 5QI (TS 23.287 Table 5.4.4-1).
    pub pqi: u8,
    /// Guaranteed flow bit rate, bit/s (0 for non-GBR PQIs).
    pub gfbr: u64,
    /// Maximum flow bit rate, bit/s.
    pub mfbr: u64,
    /// Minimum communication range, metres.
    pub range: u32,
}

/// A peer operator's V2X application server (reached over the inter-operator link).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerServer {
    /// The peer's PLMN.
    pub plmn: Plmn,
    /// Its V2X application function, base URL.
    pub uri: String,
    /// Its message relay, `IP:port`.
    pub relay: String,
}

/// A link key for a service: operators derive it from their roaming agreement's secret, so
/// devices on different PLMNs hold the same key without ever meeting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkKey {
    /// V2X service.
    pub v2x_service_id: ServiceId,
    /// Names the key (8 hex digits), sent in the direct communication request.
    pub key_id: String,
    /// 32 bytes, hex.
    pub key: String,
}

/// V2X configuration parameters handed to an authorized device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationParameters {
    /// Device id.
    pub device_id: String,
    /// The operator that authorized it.
    pub serving_plmn: Plmn,
    /// Seconds the parameters stay valid; the device asks again before this runs out.
    pub validity_timer: u32,
    /// Unix time (ms) when they expire.
    pub expires_at_ms: u64,
    /// Authorized PLMN list per radio technology.
    pub pc5_authorization: Pc5Authorization,
    /// Destination layer-2 id per V2X service.
    pub service_to_destination: Vec<ServiceToDestination>,
    /// PC5 QoS parameters per V2X service.
    pub pc5_qos: Vec<Pc5QosParameters>,
    /// V2X application servers of the authorized peer PLMNs.
    pub peer_servers: Vec<PeerServer>,
    /// Link keys per service.
    pub link_keys: Vec<LinkKey>,
    /// The serving MEC's message relay (`IP:port`) for devices without a direct path.
    pub relay: String,
}

/// A device asks its operator to open the PC5 path towards a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkRequest {
    /// Device id.
    pub device_id: String,
    /// Peer's PC5 address.
    pub peer_address: Ipv4Addr,
    /// Peer's PLMN.
    pub peer_plmn: Plmn,
    /// Service the link is for.
    pub v2x_service_id: ServiceId,
    /// Radio technology used.
    #[serde(default = "nr")]
    pub rat: Rat,
}

fn nr() -> Rat {
    Rat::Nr
}

/// An authorized link (one direction: this operator's device → the peer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    /// Link id.
    pub id: String,
    /// Device id.
    pub device_id: String,
    /// Device's PC5 address.
    pub address: Ipv4Addr,
    /// Peer's PC5 address.
    pub peer_address: Ipv4Addr,
    /// Peer's PLMN.
    pub peer_plmn: Plmn,
    /// Service.
    pub v2x_service_id: ServiceId,
}

/// Destination layer-2 id of a service: operators coordinate it, here by a fixed rule
/// (`0xFF` then the service id's low 16 bits).
pub fn dst_layer2_id(service: ServiceId) -> String {
    format!("0xFF{:04X}", service & 0xFFFF)
}

/// PC5 QoS of a service: PQI 21-23 for the V2X message families of TS 23.287 Table 5.4.4-1
/// (CAM-like broadcast 23, platooning 21, cooperative driving 22), non-GBR 55 otherwise.
pub fn pc5_qos(service: ServiceId) -> Pc5QosParameters {
    let (pqi, gfbr, mfbr, range) = match service {
        // ITS-AID 36: CA basic service (CAM).
        36 => (23, 64_000, 128_000, 300),
        // ITS-AID 37: DEN basic service (DENM).
        37 => (21, 64_000, 256_000, 500),
        // Platooning / cooperative driving (PSIDs 0x20-0x2F here).
        0x20..=0x2F => (22, 1_000_000, 4_000_000, 200),
        _ => (55, 0, 1_000_000, 300),
    };
    Pc5QosParameters {
        v2x_service_id: service,
        pqi,
        gfbr,
        mfbr,
        range,
    }
}

/// One device as the operator's console shows it (`GET /v2x/v1/status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceStatus {
    /// Device id.
    pub device_id: String,
    /// Its subscription here.
    pub subscription: V2xSubscription,
    /// The home operator this subscription is a roaming copy from (`None`: ours).
    pub roaming_from: Option<Plmn>,
    /// Its PC5 address while it holds configuration parameters.
    pub pc5_address: Option<Ipv4Addr>,
    /// Seconds until those parameters expire (0 once expired, `None` when none).
    pub expires_in_s: Option<u64>,
}

/// An open pair of the PC5 gate with the packets it let through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatePair {
    /// Source PC5 address.
    pub src: Ipv4Addr,
    /// Destination PC5 address.
    pub dst: Ipv4Addr,
    /// Packets that crossed.
    pub packets: u64,
}

/// The PC5 gate's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GateStatus {
    /// Packets the closed direct path dropped.
    pub dropped_packets: u64,
    /// Pairs open for an authorized link.
    pub open: Vec<GatePair>,
}

/// Everything an operator's console shows of one MEC, in one answer: its devices, links and
/// gate (`GET /v2x/v1/status`, operator token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MecStatus {
    /// This operator's PLMN.
    pub operator: Plmn,
    /// Subscribed devices, by id.
    pub devices: Vec<DeviceStatus>,
    /// Authorized links.
    pub links: Vec<Link>,
    /// The gate, when this MEC runs one.
    pub gate: Option<GateStatus>,
}
