//! Network slices: S-NSSAIs, network slice instances (NSIs) realised by NS
//! instances, client associations, and the TS 29.531 (Nnssf_NSSelection) shapes
//! of the NSSF surface.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_name, Name, TenantId, ValidationError};

/// An S-NSSAI (TS 23.003 §28.4.2): slice/service type and optional slice
/// differentiator (6 hex digits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"sst": 1, "sd": "000001"}))]
pub struct Snssai {
    /// Slice/Service Type: 0..=127 standardized (1 eMBB, 2 URLLC, 3 MIoT, 4 V2X,
    /// 5 HMTC), 128..=255 operator-specific.
    pub sst: u8,
    /// Slice Differentiator, 6 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Fa-f0-9]{6}$")]
    pub sd: Option<String>,
}

impl Snssai {
    /// Checks the SD (6 hex digits) and lowercases it, so equal S-NSSAIs compare equal.
    pub fn validate(&self, field: &str) -> Result<Snssai, ValidationError> {
        let sd = match &self.sd {
            None => None,
            Some(sd) if sd.len() == 6 && sd.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(sd.to_ascii_lowercase())
            }
            Some(sd) => {
                return Err(ValidationError::new(
                    format!("{field}.sd"),
                    format!("must be 6 hex digits, got {sd:?}"),
                ))
            }
        };
        Ok(Snssai { sst: self.sst, sd })
    }

    /// Parses a slice type as used in paths: an SST (`1`) or a standard SST's name
    /// (`embb`, `urllc`, `miot`, `v2x`, `hmtc`), optionally with `-SD` (`1-000001`).
    pub fn parse_type(s: &str) -> Result<Snssai, ValidationError> {
        let (sst, sd) = match s.split_once('-') {
            Some((a, b)) => (a, Some(b.to_owned())),
            None => (s, None),
        };
        let sst = match sst {
            "embb" => 1,
            "urllc" => 2,
            "miot" => 3,
            "v2x" => 4,
            "hmtc" => 5,
            n => n.parse::<u8>().map_err(|_| {
                ValidationError::new(
                    "type",
                    format!("must be an SST (0..=255 or embb, urllc, miot, v2x, hmtc) with an optional -SD, got {s:?}"),
                )
            })?,
        };
        Snssai { sst, sd }.validate("type")
    }

    /// Whether an NSI serving `self` serves a request for `want`: same SST, and the
    /// same SD when the request names one.
    pub fn serves(&self, want: &Snssai) -> bool {
        self.sst == want.sst && (want.sd.is_none() || want.sd == self.sd)
    }
}

impl std::fmt::Display for Snssai {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sd {
            Some(sd) => write!(f, "{}-{sd}", self.sst),
            None => write!(f, "{}", self.sst),
        }
    }
}

/// `POST /v1/slices/nsis`: a network slice instance over an NS instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "embb-a", "snssai": {"sst": 1, "sd": "000001"}, "provider": "site-a", "capacity_mbps": 1000, "max_clients": 100}))]
pub struct CreateNsi {
    /// Name, unique within the tenant.
    pub name: String,
    /// The S-NSSAI it serves.
    pub snssai: Snssai,
    /// The network resource provider whose virtualized resources it uses.
    pub provider: String,
    /// Traffic it is sized for, Mbit/s (its utilization is measured load over this).
    pub capacity_mbps: u32,
    /// Most clients associated at once.
    pub max_clients: u32,
    /// The NS instance that realises it (same tenant): its VMs and their traffic are
    /// what the NSI uses. Optional: an NSI without one has no measured load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns_instance: Option<String>,
    /// Admin only: the owning tenant (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A [`CreateNsi`] that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidNsi {
    /// Name.
    pub name: Name,
    /// S-NSSAI.
    pub snssai: Snssai,
    /// Provider.
    pub provider: Name,
    /// Capacity, Mbit/s.
    pub capacity_mbps: u32,
    /// Most clients.
    pub max_clients: u32,
    /// NS instance name.
    pub ns_instance: Option<Name>,
    /// Tenant asked for.
    pub tenant: Option<Name>,
}

impl CreateNsi {
    /// Checks every field.
    pub fn validate(&self) -> Result<ValidNsi, ValidationError> {
        if !(1..=1_000_000).contains(&self.capacity_mbps) {
            return Err(ValidationError::new(
                "capacity_mbps",
                format!("must be between 1 and 1000000, got {}", self.capacity_mbps),
            ));
        }
        if !(1..=1_000_000).contains(&self.max_clients) {
            return Err(ValidationError::new(
                "max_clients",
                format!("must be between 1 and 1000000, got {}", self.max_clients),
            ));
        }
        Ok(ValidNsi {
            name: validate_name("name", &self.name)?,
            snssai: self.snssai.validate("snssai")?,
            provider: validate_name("provider", &self.provider)?,
            capacity_mbps: self.capacity_mbps,
            max_clients: self.max_clients,
            ns_instance: self
                .ns_instance
                .as_deref()
                .map(|n| validate_name("ns_instance", n))
                .transpose()?,
            tenant: self
                .tenant
                .as_deref()
                .map(|n| validate_name("tenant", n))
                .transpose()?,
        })
    }
}

/// A network slice instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Nsi {
    /// Id (a UUID): the `nsiId` of the NSSF answers.
    pub id: String,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: Name,
    /// The S-NSSAI it serves.
    pub snssai: Snssai,
    /// Its resource provider.
    pub provider: Name,
    /// Capacity, Mbit/s.
    pub capacity_mbps: u32,
    /// Most clients at once.
    pub max_clients: u32,
    /// The NS instance realising it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns_instance: Option<Name>,
    /// Clients associated now.
    pub clients: u32,
    /// Last measured load, Mbit/s, and when (unix ms).
    #[serde(default)]
    pub measured_mbps: Option<f64>,
    /// Forecast load for the next sampling periods, Mbit/s.
    #[serde(default)]
    pub forecast_mbps: Option<f64>,
    /// Resources allocated by the last allocation, Mbit/s.
    #[serde(default)]
    pub allocated_mbps: Option<f64>,
    /// CPU its VMs used in the last sampling period, in cores (CPU seconds per
    /// second), when the sampler measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_cores: Option<f64>,
    /// Its CPU capacity, cores: the vCPUs of its VMs at the last sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Forecast CPU for the next sampling periods, cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_cores: Option<f64>,
    /// CPU allocated by the last allocation, cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_cores: Option<f64>,
    /// Creation time, unix ms.
    pub created_at: u64,
}

/// `POST /v1/slices/{type}/associations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"client": "imsi-001010000000001"}))]
pub struct Associate {
    /// The client node (a UE's SUPI, or any name of the client).
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
    pub client: String,
}

impl Associate {
    /// Checks the client id: 1..=128 of `A-Za-z0-9._:-`, not starting with a punctuation.
    pub fn validate(&self) -> Result<String, ValidationError> {
        let c = &self.client;
        let ok = !c.is_empty()
            && c.len() <= 128
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if ok {
            Ok(c.clone())
        } else {
            Err(ValidationError::new(
                "client",
                format!(
                    "must be 1 to 128 of A-Za-z0-9._:- starting with a letter or digit, got {c:?}"
                ),
            ))
        }
    }
}

/// One NSI's standing when a selection was made (what the choice was based on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Candidate {
    /// NSI id.
    pub nsi: String,
    /// NSI name.
    pub name: String,
    /// Forecast utilization: the higher of forecast traffic over capacity and,
    /// when its CPU is measured, forecast cores over its vCPUs.
    pub utilization: f64,
    /// The CPU part of it (forecast cores over vCPUs), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_utilization: Option<f64>,
    /// Clients associated.
    pub clients: u32,
    /// Most clients.
    pub max_clients: u32,
}

/// A client's association with an NSI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Association {
    /// Id (a UUID).
    pub id: String,
    /// Owning tenant (the requester's).
    pub tenant: TenantId,
    /// The client.
    pub client: String,
    /// The S-NSSAI asked for.
    pub snssai: Snssai,
    /// The chosen NSI's id.
    pub nsi: String,
    /// The chosen NSI's name.
    pub nsi_name: String,
    /// Every candidate as it stood (the choice is the lowest utilization with room).
    pub candidates: Vec<Candidate>,
    /// SHA-256 (hex) of the candidates' canonical JSON: the forecast snapshot.
    pub forecast_hash: String,
    /// Index of its entry in the ledger (meaningful once `logged`).
    pub ledger_index: u64,
    /// Whether its ledger entry is known to be appended: false between the commit
    /// of the association and the append (a server that dies there leaves it false
    /// until the sampler's reconciliation finds or appends the entry).
    #[serde(default)]
    pub logged: bool,
    /// Time, unix ms.
    pub created_at: u64,
}

/// TS 29.531 `Snssai` (TS 29.571): `sst` and `sd`, as the NSSF speaks them.
pub type NssfSnssai = Snssai;

/// TS 29.531 `SliceInfoForRegistration` (the fields vinfra reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceInfoForRegistration {
    /// The UE's subscribed S-NSSAIs.
    #[serde(default)]
    pub subscribed_nssai: Vec<SubscribedSnssai>,
    /// The S-NSSAIs the UE asks for.
    #[serde(default)]
    pub requested_nssai: Vec<Snssai>,
}

/// TS 29.531 `SubscribedSnssai`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscribedSnssai {
    /// The S-NSSAI.
    pub subscribed_snssai: Snssai,
    /// Whether it is a default S-NSSAI.
    #[serde(default)]
    pub default_indication: Option<bool>,
}

/// TS 29.531 `SliceInfoForPDUSession`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceInfoForPduSession {
    /// The S-NSSAI of the PDU session.
    pub s_nssai: Snssai,
    /// `NON_ROAMING`, `LOCAL_BREAKOUT` or `HOME_ROUTED_ROAMING`.
    pub roaming_indication: String,
}

/// TS 29.531 `SliceInfoForUEConfigurationUpdate` (the fields vinfra reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceInfoForUeConfigurationUpdate {
    /// The UE's subscribed S-NSSAIs.
    #[serde(default)]
    pub subscribed_nssai: Vec<SubscribedSnssai>,
    /// The S-NSSAIs the UE asks for.
    #[serde(default)]
    pub requested_nssai: Vec<Snssai>,
}

/// TS 29.531 `NsiInformation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NsiInformation {
    /// The NRF to use for the NSI (this control plane's URL).
    pub nrf_id: String,
    /// The NSI's id.
    pub nsi_id: String,
}

/// TS 29.531 `AllowedSnssai`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedSnssai {
    /// The allowed S-NSSAI.
    pub allowed_snssai: Snssai,
    /// The NSI selected for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nsi_information_list: Vec<NsiInformation>,
}

/// TS 29.531 `AllowedNssai`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNssai {
    /// The allowed S-NSSAIs.
    pub allowed_snssai_list: Vec<AllowedSnssai>,
    /// `3GPP_ACCESS` or `NON_3GPP_ACCESS`.
    pub access_type: String,
}

/// TS 29.531 `ConfiguredSnssai`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfiguredSnssai {
    /// The configured S-NSSAI.
    pub configured_snssai: Snssai,
}

/// TS 29.531 `AuthorizedNetworkSliceInfo` (the fields vinfra fills).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizedNetworkSliceInfo {
    /// Registration / UE configuration update: the allowed S-NSSAIs with their NSIs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_nssai_list: Vec<AllowedNssai>,
    /// Registration / UE configuration update: the S-NSSAIs served at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configured_nssai: Vec<ConfiguredSnssai>,
    /// Requested S-NSSAIs no NSI can serve now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_nssai_in_plmn: Vec<Snssai>,
    /// PDU session: the NSI selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsi_information: Option<NsiInformation>,
}

/// `POST /v1/slice-loads`: one sampling period's measured load per NSI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"loads": {"embb-a": 120.5}}))]
pub struct SliceLoads {
    /// Measured load, Mbit/s, by NSI name or id (NSIs not named measured 0).
    pub loads: std::collections::BTreeMap<String, f64>,
}

impl SliceLoads {
    /// Checks that every load is a finite number in 0..=1e9.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (k, v) in &self.loads {
            if !v.is_finite() || *v < 0.0 || *v > 1e9 {
                return Err(ValidationError::new(
                    format!("loads.{k}"),
                    format!("must be a number between 0 and 1e9, got {v}"),
                ));
            }
        }
        if self.loads.len() > 10_000 {
            return Err(ValidationError::new("loads", "at most 10000 NSIs"));
        }
        Ok(())
    }
}

/// The ledger indices of the allocations one sampling period made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SliceLoadsRecorded {
    /// One allocation entry per provider.
    pub allocations: Vec<u64>,
}

/// A public key that signs the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerKey {
    /// Key id (hex of the first 8 bytes of the key's SHA-256).
    pub id: String,
    /// Raw Ed25519 public key, hex.
    pub public_key: String,
}

/// `GET /v1/ledger`: the latest signed checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerHead {
    /// The log's name.
    pub origin: String,
    /// Entries.
    pub size: u64,
    /// Merkle root, hex.
    pub root: String,
    /// The signed checkpoint as stored (JSON `{text, key_id, signature}`).
    pub checkpoint: String,
    /// The keys that signed entries or checkpoints of this log, as announced in the
    /// store (a verifier pins them; it does not learn trust from here).
    pub keys: Vec<LedgerKey>,
}

/// One raw key of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerRawKey {
    /// Store key.
    pub key: String,
    /// Stored value (UTF-8: entries are `key-id\nsignature\nJSON`, checkpoints JSON).
    pub value: String,
}

/// `GET /v1/ledger/proof`: an entry and its inclusion proof.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerProof {
    /// Entry index.
    pub index: u64,
    /// Tree size the proof is for.
    pub size: u64,
    /// Root at that size, hex.
    pub root: String,
    /// The stored entry (its leaf hash is over these bytes).
    pub entry: String,
    /// Audit path, nearest sibling first, hex.
    pub inclusion: Vec<String>,
}

/// `GET /v1/ledger/consistency`: a consistency proof.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LedgerConsistency {
    /// Older size.
    pub from: u64,
    /// Newer size.
    pub to: u64,
    /// Proof hashes, hex.
    pub proof: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_types_parse_and_bad_ones_name_the_field() {
        assert_eq!(
            Snssai::parse_type("1").unwrap(),
            Snssai { sst: 1, sd: None }
        );
        assert_eq!(
            Snssai::parse_type("embb-00000A").unwrap(),
            Snssai {
                sst: 1,
                sd: Some("00000a".into())
            }
        );
        assert!(Snssai::parse_type("256").is_err());
        assert!(Snssai::parse_type("1-xyz")
            .unwrap_err()
            .to_string()
            .starts_with("type.sd"));
        let s = Snssai {
            sst: 1,
            sd: Some("000001".into()),
        };
        assert!(s.serves(&Snssai { sst: 1, sd: None }));
        assert!(!s.serves(&Snssai {
            sst: 1,
            sd: Some("000002".into())
        }));
        assert!(!s.serves(&Snssai { sst: 2, sd: None }));
    }

    #[test]
    fn clients_are_checked() {
        assert!(Associate {
            client: "imsi-001010000000001".into()
        }
        .validate()
        .is_ok());
        assert!(Associate {
            client: "-x".into()
        }
        .validate()
        .is_err());
        assert!(Associate {
            client: "a/b".into()
        }
        .validate()
        .is_err());
        assert!(Associate {
            client: String::new()
        }
        .validate()
        .is_err());
    }
}
