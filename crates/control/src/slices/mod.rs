//! Network slices: network slice instances (NSIs) realised by NS instances, the
//! selection of an NSI for a client by slice type (lowest forecast utilization with
//! room), utilization inference from measured load ([`forecast`]), the allocation
//! of the provider's resources among NSIs, and the slice ledger: every association
//! and every allocation appended to a transparency log (`translog`) with enough
//! inputs that an auditor recomputes each one ([`recheck`]).
//!
//! Records: NSIs under [`keys::NSIS`] (name index [`keys::NSI_NAMES`]), each NSI's
//! load series under [`keys::SLICE_SERIES`], associations under
//! [`keys::SLICE_ASSOCIATIONS`], the ledger under [`keys::SLICE_LEDGER`].

pub mod forecast;
pub mod peers;
pub mod sampler;

use std::collections::BTreeMap;
use std::path::PathBuf;

use model::slices::{
    Association, Candidate, LedgerConsistency, LedgerHead, LedgerKey, LedgerProof, LedgerRawKey,
    Nsi, Snssai, ValidNsi,
};
use model::TenantId;
use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};
use store::{Compare, StoreError, TxnOp};
use translog::{LogConfig, LogError, Signer, TransLog};

use crate::records::{
    get_json, insert_named, keys, list_json, now_ms, remove_named, resolve_named, to_bytes,
    update_cas, CAS_ATTEMPTS,
};
use crate::{Control, ControlError, Scope};
use forecast::{allocate, AllocInput, AllocPolicy, AllocShare, CpuInput, HwParams};

/// The slice ledger's name, in every checkpoint and entry signature.
pub const LEDGER_ORIGIN: &str = "vinfra/slices";

/// The allocation policy used unless configured: a 10 Gbit/s and 64-core pool per
/// provider, seasons of 12 samples, provisioning two samples ahead, an unserved
/// unit four times as costly as an idle one.
pub fn default_policy() -> AllocPolicy {
    AllocPolicy {
        pool: 10_000.0,
        season: 12,
        horizon: 2,
        under_cost: 4.0,
        over_cost: 1.0,
        cpu_pool: Some(64.0),
    }
}

/// Samples of each NSI's series kept (the forecaster's window).
pub const WINDOW: usize = 96;

/// This server's slice state: the ledger's key file and, once opened, the ledger.
#[derive(Debug, Default)]
pub(crate) struct SliceState {
    key_file: std::sync::OnceLock<PathBuf>,
    ledger: tokio::sync::OnceCell<TransLog>,
}

/// Why a slice request is refused.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    /// No NSI of the caller's serves the slice type.
    #[error("type: no network slice instance serves S-NSSAI {snssai}")]
    NoInstance {
        /// The S-NSSAI asked for.
        snssai: Snssai,
    },
    /// Every NSI of the type is full.
    #[error("no network slice instance of S-NSSAI {snssai} has room: {reasons}")]
    NoRoom {
        /// The S-NSSAI asked for.
        snssai: Snssai,
        /// Per NSI, why it cannot take the client.
        reasons: String,
    },
    /// The NS instance named to realise an NSI does not exist in its tenant.
    #[error("ns_instance: no ns instance {0} in the tenant")]
    NoNsInstance(String),
    /// A proof asked for sizes or an index the ledger does not have.
    #[error("{0}")]
    Proof(String),
    /// The ledger could not be opened or appended to.
    #[error("the slice ledger failed")]
    Ledger(#[source] LogError),
    /// The store, a taken name, a lost race, no such NSI.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A ledger entry's body (JSON): what was decided and from what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LedgerEntry {
    /// A client associated with the NSI chosen among `candidates`.
    Association {
        /// Association id.
        association: String,
        /// Requesting tenant.
        tenant: TenantId,
        /// The client.
        client: String,
        /// The S-NSSAI asked for.
        snssai: Snssai,
        /// Chosen NSI id.
        nsi: String,
        /// Chosen NSI name.
        nsi_name: String,
        /// Every NSI of the type as it stood (the forecast snapshot).
        candidates: Vec<Candidate>,
        /// SHA-256 of the candidates' JSON.
        forecast_hash: String,
        /// Time, unix ms.
        at_ms: u64,
    },
    /// The resources of a provider allocated among its NSIs.
    Allocation {
        /// The provider.
        provider: String,
        /// Time, unix ms.
        at_ms: u64,
        /// The policy (pool, season, horizon, costs).
        policy: AllocPolicy,
        /// Each NSI's measured window.
        inputs: Vec<AllocInput>,
        /// SHA-256 of the inputs' JSON.
        input_hash: String,
        /// SHA-256 of the policy and the learned parameters' JSON.
        params_hash: String,
        /// The result.
        shares: Vec<AllocShare>,
    },
}

/// Hex SHA-256 of a value's JSON.
pub fn json_hash<T: Serialize>(v: &T) -> String {
    let bytes = serde_json::to_vec(v).expect("ledger values serialize");
    model::hex(digest(&SHA256, &bytes).as_ref())
}

/// One NSI's learned parameters in [`params_hash`]: a share without CPU hashes as
/// it did before CPU was allocated, so that older entries still recompute.
#[derive(Serialize)]
#[serde(untagged)]
enum ParamsRow<'a> {
    Traffic((&'a str, &'a str, &'a Option<HwParams>)),
    WithCpu(
        (
            &'a str,
            &'a str,
            &'a Option<HwParams>,
            &'a str,
            &'a Option<HwParams>,
        ),
    ),
}

fn params_hash(policy: &AllocPolicy, shares: &[AllocShare]) -> String {
    let params: Vec<_> = shares
        .iter()
        .map(|s| match &s.cpu {
            None => ParamsRow::Traffic((&s.nsi, &s.model, &s.params)),
            Some(c) => ParamsRow::WithCpu((&s.nsi, &s.model, &s.params, &c.model, &c.params)),
        })
        .collect();
    json_hash(&(policy, params))
}

/// The NSI a selection picks: room left (clients below the maximum, forecast
/// utilization below 1), then the lowest forecast utilization, then the name.
pub fn choose(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates
        .iter()
        .filter(|c| c.clients < c.max_clients && c.utilization < 1.0)
        .min_by(|a, b| {
            a.utilization
                .total_cmp(&b.utilization)
                .then_with(|| a.name.cmp(&b.name))
        })
}

/// Why a ledger entry does not recompute.
#[derive(Debug, thiserror::Error)]
pub enum RecheckError {
    /// The body is not a ledger entry.
    #[error("not a slice ledger entry")]
    Decode(#[source] serde_json::Error),
    /// A logged hash does not match the logged values.
    #[error("{what} hash does not match the logged {what}")]
    Hash {
        /// `forecast`, `input` or `params`.
        what: &'static str,
    },
    /// The logged choice is not what the logged candidates give.
    #[error("association chose {logged}, the logged forecasts give {recomputed}")]
    Choice {
        /// Logged NSI.
        logged: String,
        /// Recomputed NSI (or `none`).
        recomputed: String,
    },
    /// The logged allocation is not what the logged inputs give.
    #[error("allocation of {provider} does not recompute from its logged inputs")]
    Allocation {
        /// The provider.
        provider: String,
    },
}

/// The logged text of the hashed and recomputed parts of an entry.
#[derive(Deserialize)]
struct RawParts<'a> {
    #[serde(borrow, default)]
    candidates: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    inputs: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    shares: Option<&'a serde_json::value::RawValue>,
}

/// Recomputes a ledger entry from its logged inputs: an association's choice from
/// its candidates, an allocation from its windows and policy (bit for bit), and
/// every hash. Returns the decoded entry.
pub fn recheck(body: &[u8]) -> Result<LedgerEntry, RecheckError> {
    let entry: LedgerEntry = serde_json::from_slice(body).map_err(RecheckError::Decode)?;
    // The hashes and the logged shares are checked against the logged *text*:
    // serde_json's float parsing is not always exact to the last bit, so a value
    // parsed and written again may differ from what was logged.
    let raw: RawParts<'_> = serde_json::from_slice(body).map_err(RecheckError::Decode)?;
    let text_hash = |v: Option<&serde_json::value::RawValue>| {
        v.map(|r| model::hex(digest(&SHA256, r.get().as_bytes()).as_ref()))
    };
    match &entry {
        LedgerEntry::Association {
            nsi,
            candidates,
            forecast_hash,
            ..
        } => {
            if text_hash(raw.candidates).as_deref() != Some(forecast_hash.as_str()) {
                return Err(RecheckError::Hash { what: "forecast" });
            }
            let chosen = choose(candidates).map(|c| c.nsi.clone());
            if chosen.as_deref() != Some(nsi.as_str()) {
                return Err(RecheckError::Choice {
                    logged: nsi.clone(),
                    recomputed: chosen.unwrap_or_else(|| "none".into()),
                });
            }
        }
        LedgerEntry::Allocation {
            provider,
            policy,
            inputs,
            input_hash,
            params_hash: logged_params,
            shares,
            ..
        } => {
            if text_hash(raw.inputs).as_deref() != Some(input_hash.as_str()) {
                return Err(RecheckError::Hash { what: "input" });
            }
            if params_hash(policy, shares) != *logged_params {
                return Err(RecheckError::Hash { what: "params" });
            }
            let recomputed =
                serde_json::to_string(&allocate(inputs, policy)).map_err(RecheckError::Decode)?;
            if raw.shares.map(serde_json::value::RawValue::get) != Some(recomputed.as_str()) {
                return Err(RecheckError::Allocation {
                    provider: provider.clone(),
                });
            }
        }
    }
    Ok(entry)
}

/// The ledger entry of an association record (what [`Control::associate`] appends).
fn association_entry(a: &Association) -> LedgerEntry {
    LedgerEntry::Association {
        association: a.id.clone(),
        tenant: a.tenant,
        client: a.client.clone(),
        snssai: a.snssai.clone(),
        nsi: a.nsi.clone(),
        nsi_name: a.nsi_name.clone(),
        candidates: a.candidates.clone(),
        forecast_hash: a.forecast_hash.clone(),
        at_ms: a.created_at,
    }
}

/// The body of a stored ledger entry (`key-id\nsignature-hex\nbody`).
pub fn entry_body(stored: &[u8]) -> Option<&[u8]> {
    let first = stored.iter().position(|&b| b == b'\n')?;
    let second = first + 1 + stored.get(first + 1..)?.iter().position(|&b| b == b'\n')?;
    stored.get(second + 1..)
}

/// One NSI's load series.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Series {
    /// Measured load per period, Mbit/s, oldest first (at most [`WINDOW`]).
    samples: Vec<f64>,
    /// Time of the last sample, unix ms.
    last_at_ms: u64,
    /// CPU its VMs used per sampled period, cores, oldest first (at most [`WINDOW`];
    /// only periods the sampler measured).
    #[serde(default)]
    cpu: Vec<f64>,
    /// The sampler's last reading of the NSI's counters: the next sample is the
    /// difference from it. Replaced in the same write as a sample is appended.
    #[serde(default)]
    cursor: Option<sampler::Cursor>,
    /// The vCPUs of the NSI's VMs at the last sample: its CPU capacity.
    #[serde(default)]
    vcpus: u32,
    /// Time of the last period whose CPU was measured, unix ms (0: none yet).
    #[serde(default)]
    last_cpu_at_ms: u64,
}

fn push_window(v: &mut Vec<f64>, x: f64) {
    v.push(x);
    if v.len() > WINDOW {
        let drop = v.len() - WINDOW;
        v.drain(..drop);
    }
}

/// What the slice sampler reads each period: the vSwitch controller's cumulative
/// bytes per VM pair (MACs as `02:…`, lower case) and the CPU time per VM (by id, ms)
/// the agents last reported.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// (source MAC, destination MAC, bytes).
    pub pairs: Vec<(String, String, u64)>,
    /// CPU time per VM id, ms.
    pub cpu_ms: BTreeMap<String, u64>,
}

/// What one sampling period did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SampleOutcome {
    /// Per NSI sampled (by name): Mbit/s and cores (`None`: no CPU reading moved), or
    /// `None` for a first reading (the baseline the next period is measured from).
    pub measured: BTreeMap<String, Option<(f64, Option<f64>)>>,
    /// Ledger indices of the allocations made.
    pub allocations: Vec<u64>,
}

fn nsi_key(id: uuid::Uuid) -> String {
    format!("{}{id}", keys::NSIS)
}

fn nsi_name_key(tenant: TenantId, name: &model::Name) -> String {
    format!("{}{tenant}/{name}", keys::NSI_NAMES)
}

/// An NSI's standing for a selection: its forecast (or, before any forecast, its
/// measured) traffic over its capacity, or its forecast CPU over its vCPUs when that
/// is higher — an NSI whose VMs are busy has no room however quiet its links are.
fn candidate(n: &Nsi) -> Candidate {
    let load = n.forecast_mbps.or(n.measured_mbps).unwrap_or(0.0);
    let traffic = load / f64::from(n.capacity_mbps.max(1));
    let cpu = match (n.forecast_cores.or(n.measured_cores), n.vcpus) {
        (Some(cores), Some(v)) if v > 0 => Some(cores / f64::from(v)),
        _ => None,
    };
    Candidate {
        nsi: n.id.clone(),
        name: n.name.to_string(),
        utilization: cpu.map_or(traffic, |c| traffic.max(c)),
        cpu_utilization: cpu,
        clients: n.clients,
        max_clients: n.max_clients,
    }
}

impl Control {
    /// Where the slice ledger's signing key lives (created on first use). Without
    /// one, the ledger signs with a key made for this process only.
    pub fn set_ledger_key_file(&self, path: PathBuf) {
        let _ = self.slices.key_file.set(path);
    }

    /// The slice ledger, opened on first use.
    pub async fn slice_ledger(&self) -> Result<&TransLog, SliceError> {
        self.slices
            .ledger
            .get_or_try_init(|| async {
                let signer = match self.slices.key_file.get() {
                    Some(path) => Signer::load_or_create(path),
                    None => {
                        tracing::warn!("no ledger key file: signing the slice ledger with a key of this process only");
                        Signer::generate().map(|(s, _)| s)
                    }
                }
                .map_err(|e| {
                    SliceError::Ledger(LogError::Corrupt {
                        prefix: keys::SLICE_LEDGER.into(),
                        why: model::error_chain(&e),
                    })
                })?;
                TransLog::open(
                    self.store_arc(),
                    LogConfig::new(keys::SLICE_LEDGER, LEDGER_ORIGIN),
                    signer,
                )
                .await
                .map_err(SliceError::Ledger)
            })
            .await
    }

    /// Records a new NSI; its NS instance, if named, must exist in `tenant`.
    pub async fn create_nsi(&self, tenant: TenantId, v: ValidNsi) -> Result<Nsi, SliceError> {
        if let Some(ns) = &v.ns_instance {
            self.ns_instance(Scope::Tenant(tenant), ns.as_str())
                .await
                .map_err(|e| match e {
                    ControlError::NotFound { .. } => SliceError::NoNsInstance(ns.to_string()),
                    e => e.into(),
                })?;
        }
        let id = uuid::Uuid::new_v4();
        let nsi = Nsi {
            id: id.to_string(),
            tenant,
            name: v.name,
            snssai: v.snssai,
            provider: v.provider,
            capacity_mbps: v.capacity_mbps,
            max_clients: v.max_clients,
            ns_instance: v.ns_instance,
            clients: 0,
            measured_mbps: None,
            forecast_mbps: None,
            allocated_mbps: None,
            measured_cores: None,
            vcpus: None,
            forecast_cores: None,
            allocated_cores: None,
            created_at: now_ms(),
        };
        insert_named(
            self.store(),
            nsi_key(id),
            nsi_name_key(tenant, &nsi.name),
            &nsi,
            &id,
            || format!("name: network slice instance {} already exists", nsi.name),
        )
        .await?;
        tracing::info!(nsi = %nsi.name, snssai = %nsi.snssai, "network slice instance created");
        Ok(nsi)
    }

    /// The NSIs `scope` sees, by tenant then name.
    pub async fn nsis(&self, scope: Scope) -> Result<Vec<Nsi>, ControlError> {
        let mut v: Vec<Nsi> = list_json::<Nsi>(self.store(), keys::NSIS)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| scope.sees(n.tenant))
            .collect();
        v.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
        Ok(v)
    }

    /// One NSI by id or name.
    pub async fn nsi(&self, scope: Scope, s: &str) -> Result<Nsi, ControlError> {
        Ok(resolve_named::<uuid::Uuid, Nsi>(
            self.store(),
            scope,
            s,
            "network slice instance",
            keys::NSI_NAMES,
            nsi_key,
            |n| n.tenant,
        )
        .await?
        .0)
    }

    /// Deletes an NSI (its associations stay in the ledger and in their records).
    pub async fn delete_nsi(&self, scope: Scope, s: &str) -> Result<(), ControlError> {
        let nsi = self.nsi(scope, s).await?;
        let id: uuid::Uuid = nsi
            .id
            .parse()
            .map_err(|e| ControlError::Invariant(format!("stored nsi id {}: {e}", nsi.id)))?;
        remove_named(
            self.store(),
            nsi_key(id),
            nsi_name_key(nsi.tenant, &nsi.name),
            None,
        )
        .await?;
        self.store()
            .delete(&format!("{}{id}", keys::SLICE_SERIES))
            .await?;
        Ok(())
    }

    /// The NSI a request for `snssai` gets now, and every candidate as it stands
    /// (read only: [`Control::associate`] commits the choice).
    pub async fn select_nsi(
        &self,
        scope: Scope,
        snssai: &Snssai,
    ) -> Result<(Candidate, Vec<Candidate>, Vec<Nsi>), SliceError> {
        let nsis: Vec<Nsi> = self
            .nsis(scope)
            .await?
            .into_iter()
            .filter(|n| n.snssai.serves(snssai))
            .collect();
        if nsis.is_empty() {
            return Err(SliceError::NoInstance {
                snssai: snssai.clone(),
            });
        }
        let candidates: Vec<Candidate> = nsis.iter().map(candidate).collect();
        match choose(&candidates) {
            Some(c) => Ok((c.clone(), candidates.clone(), nsis)),
            None => Err(SliceError::NoRoom {
                snssai: snssai.clone(),
                reasons: candidates
                    .iter()
                    .map(|c| {
                        if c.clients >= c.max_clients {
                            format!("{} has {} of {} clients", c.name, c.clients, c.max_clients)
                        } else {
                            format!(
                                "{} is forecast at {:.0}% utilization",
                                c.name,
                                c.utilization * 100.0
                            )
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
        }
    }

    /// Associates `client` with the NSI of `snssai` that has room and the lowest
    /// forecast utilization, among the NSIs of `tenant`; records the association
    /// and appends it to the ledger (durable before this returns).
    pub async fn associate(
        &self,
        tenant: TenantId,
        snssai: &Snssai,
        client: String,
    ) -> Result<Association, SliceError> {
        let ledger = self.slice_ledger().await?;
        for _ in 0..CAS_ATTEMPTS {
            let (chosen, candidates, nsis) = self.select_nsi(Scope::Tenant(tenant), snssai).await?;
            let id = uuid::Uuid::new_v4();
            let nsi_id: uuid::Uuid = chosen.nsi.parse().map_err(|e| {
                ControlError::Invariant(format!("stored nsi id {}: {e}", chosen.nsi))
            })?;
            let Some((mut nsi, rev)) = get_json::<Nsi>(self.store(), &nsi_key(nsi_id)).await?
            else {
                continue;
            };
            if nsis.iter().find(|n| n.id == nsi.id) != Some(&nsi) {
                continue; // changed since the selection read it
            }
            nsi.clients += 1;
            let at_ms = now_ms();
            let mut assoc = Association {
                id: id.to_string(),
                tenant,
                client: client.clone(),
                snssai: snssai.clone(),
                nsi: nsi.id.clone(),
                nsi_name: nsi.name.to_string(),
                forecast_hash: json_hash(&candidates),
                candidates,
                ledger_index: 0,
                logged: false,
                created_at: at_ms,
            };
            let key = format!("{}{id}", keys::SLICE_ASSOCIATIONS);
            let res = self
                .store()
                .txn(
                    vec![Compare::ModRevision {
                        key: nsi_key(nsi_id),
                        expect: Some(rev),
                    }],
                    vec![
                        TxnOp::Put {
                            key: nsi_key(nsi_id),
                            value: to_bytes(&nsi)?,
                        },
                        TxnOp::Put {
                            key: key.clone(),
                            value: to_bytes(&assoc)?,
                        },
                    ],
                )
                .await;
            match res {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
            let entry = association_entry(&assoc);
            let appended = ledger
                .append(serde_json::to_vec(&entry).map_err(ControlError::Encode)?)
                .await
                .map_err(SliceError::Ledger)?;
            assoc.ledger_index = appended.index;
            assoc.logged = true;
            // The index is a convenience for proofs; the entry itself is the record.
            self.store()
                .put(&key, to_bytes(&assoc)?)
                .await
                .map_err(ControlError::from)?;
            tracing::info!(client = %assoc.client, nsi = %assoc.nsi_name, index = appended.index, "client associated with a network slice instance");
            return Ok(assoc);
        }
        Err(ControlError::Contended {
            what: format!("the network slice instances of {snssai}"),
        }
        .into())
    }

    /// The associations `scope` sees, oldest first.
    pub async fn slice_associations(&self, scope: Scope) -> Result<Vec<Association>, ControlError> {
        let mut v: Vec<Association> =
            list_json::<Association>(self.store(), keys::SLICE_ASSOCIATIONS)
                .await?
                .into_iter()
                .map(|(a, _)| a)
                .filter(|a| scope.sees(a.tenant))
                .collect();
        v.sort_by_key(|a| (a.created_at, a.id.clone()));
        Ok(v)
    }

    /// Takes one sampling period's measured load per NSI (Mbit/s, by NSI id; NSIs
    /// not named measured nothing: 0), forecasts each NSI, allocates every
    /// provider's pool among its NSIs, appends each allocation to the ledger, and
    /// updates the NSIs' measured, forecast and allocated figures. Returns the
    /// ledger indices of the allocations.
    pub async fn record_slice_loads(
        &self,
        loads: &BTreeMap<String, f64>,
        policy: &AllocPolicy,
    ) -> Result<Vec<u64>, SliceError> {
        let at_ms = now_ms();
        let nsis = self.nsis(Scope::All).await?;
        let mut by_provider: BTreeMap<String, Vec<(Nsi, Series)>> = BTreeMap::new();
        for nsi in nsis {
            let load = loads.get(&nsi.id).copied().unwrap_or(0.0).max(0.0);
            let series = self
                .update_series(&nsi, |s| {
                    push_window(&mut s.samples, load);
                    s.last_at_ms = at_ms;
                })
                .await?;
            by_provider
                .entry(nsi.provider.to_string())
                .or_default()
                .push((nsi, series));
        }
        self.allocate_providers(by_provider, policy, at_ms).await
    }

    /// Reads, changes with `f` and writes back (compare-and-swap) an NSI's series,
    /// creating it empty first; `f` may run more than once (on a lost race).
    async fn update_series(
        &self,
        nsi: &Nsi,
        mut f: impl FnMut(&mut Series),
    ) -> Result<Series, SliceError> {
        let key = format!("{}{}", keys::SLICE_SERIES, nsi.id);
        if self
            .store()
            .get(&key)
            .await
            .map_err(ControlError::from)?
            .is_none()
        {
            let _ = self
                .store()
                .cas(&key, None, to_bytes(&Series::default())?)
                .await;
        }
        Ok(update_cas(
            self.store(),
            &key,
            || format!("the load series of {}", nsi.name),
            || ControlError::NotFound {
                kind: "network slice instance",
                id: nsi.id.clone(),
            },
            |s: &mut Series| {
                f(s);
                Ok::<(), ControlError>(())
            },
        )
        .await?)
    }

    /// Allocates each provider's pool among its NSIs from their windows, appends each
    /// allocation to the ledger and updates the NSIs' figures. Returns the ledger
    /// indices.
    async fn allocate_providers(
        &self,
        by_provider: BTreeMap<String, Vec<(Nsi, Series)>>,
        policy: &AllocPolicy,
        at_ms: u64,
    ) -> Result<Vec<u64>, SliceError> {
        let ledger = self.slice_ledger().await?;
        let mut indices = Vec::new();
        for (provider, members) in by_provider {
            let inputs: Vec<AllocInput> = members
                .iter()
                .map(|(n, s)| AllocInput {
                    nsi: n.id.clone(),
                    capacity: f64::from(n.capacity_mbps),
                    window: s.samples.clone(),
                    // CPU once the sampler has measured some of it on VMs it found.
                    cpu: (s.vcpus > 0 && !s.cpu.is_empty()).then(|| CpuInput {
                        capacity: f64::from(s.vcpus),
                        window: s.cpu.clone(),
                    }),
                })
                .collect();
            let shares = allocate(&inputs, policy);
            let entry = LedgerEntry::Allocation {
                provider: provider.clone(),
                at_ms,
                policy: policy.clone(),
                input_hash: json_hash(&inputs),
                params_hash: params_hash(policy, &shares),
                inputs,
                shares: shares.clone(),
            };
            let appended = ledger
                .append(serde_json::to_vec(&entry).map_err(ControlError::Encode)?)
                .await
                .map_err(SliceError::Ledger)?;
            indices.push(appended.index);
            for ((nsi, series), share) in members.iter().zip(&shares) {
                let Ok(id) = nsi.id.parse::<uuid::Uuid>() else {
                    continue;
                };
                let measured = series.samples.last().copied();
                // This period's CPU when it was measured; otherwise the NSI keeps showing
                // the last one that was (a period without fresh readings is not idle).
                let cores = (series.last_cpu_at_ms == series.last_at_ms)
                    .then(|| series.cpu.last().copied())
                    .flatten();
                let r = update_cas(
                    self.store(),
                    &nsi_key(id),
                    || format!("network slice instance {}", nsi.name),
                    || ControlError::NotFound {
                        kind: "network slice instance",
                        id: nsi.id.clone(),
                    },
                    |n: &mut Nsi| {
                        n.measured_mbps = measured;
                        if cores.is_some() {
                            n.measured_cores = cores;
                        }
                        n.forecast_mbps = Some(share.forecast);
                        n.allocated_mbps = Some(share.share);
                        n.vcpus = (series.vcpus > 0).then_some(series.vcpus);
                        n.forecast_cores = share.cpu.as_ref().map(|c| c.forecast);
                        n.allocated_cores = share.cpu.as_ref().map(|c| c.share);
                        Ok::<(), ControlError>(())
                    },
                )
                .await;
                match r {
                    Ok(_) | Err(ControlError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(indices)
    }

    /// The VMs that realise an NSI: those of its NS instance's plan (its VDUs, by the
    /// resource names the plan gave them) found in the NSI's tenant. VDUs on sites
    /// other than this control plane are not VMs here and are not counted.
    pub async fn nsi_vms(&self, nsi: &Nsi) -> Result<Vec<model::Vm>, ControlError> {
        let Some(ns) = &nsi.ns_instance else {
            return Ok(Vec::new());
        };
        let rec = match self
            .ns_instance(Scope::Tenant(nsi.tenant), ns.as_str())
            .await
        {
            Ok((r, _)) => r,
            Err(ControlError::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let Ok(plan) = serde_json::from_value::<nfv::plan::NsPlan>(rec.plan.clone()) else {
            return Ok(Vec::new());
        };
        let names: std::collections::BTreeSet<String> = plan
            .sites
            .iter()
            .flat_map(|s| s.vnfs.iter().flat_map(|v| &v.commands))
            .filter_map(|c| match c {
                nfv::plan::GenericCommand::CreateVdu(spec) => Some(spec.name.clone()),
                _ => None,
            })
            .collect();
        Ok(self
            .vms(Scope::Tenant(nsi.tenant))
            .await?
            .into_iter()
            .filter(|v| names.contains(v.name.as_str()))
            .collect())
    }

    /// One sampling period of the slice sampler: for every NSI realised by an NS
    /// instance, reads its VMs' counters out of `counters` (the traffic of every VM
    /// pair with one of its VMs at either end, its VMs' CPU time), appends the growth
    /// since the last period to its series (Mbit/s; cores beside it) in the same write
    /// as the new cursor, then forecasts and allocates every provider that has such
    /// an NSI, as [`Control::record_slice_loads`] does. An NSI's first period is its
    /// baseline (no sample). NSIs without an NS instance are left to
    /// `POST /v1/slice-loads`.
    pub async fn sample_slices(
        &self,
        counters: &Counters,
        policy: &AllocPolicy,
    ) -> Result<SampleOutcome, SliceError> {
        let at_ms = now_ms();
        let nsis = self.nsis(Scope::All).await?;
        let mut out = SampleOutcome::default();
        let mut providers = std::collections::BTreeSet::new();
        let mut sampled: BTreeMap<String, Series> = BTreeMap::new();
        for nsi in nsis.iter().filter(|n| n.ns_instance.is_some()) {
            let vms = self.nsi_vms(nsi).await?;
            let macs: std::collections::BTreeSet<String> = vms
                .iter()
                .flat_map(|v| v.nics.iter().map(|n| n.mac.to_ascii_lowercase()))
                .collect();
            let now = sampler::Cursor {
                at_ms,
                pairs: counters
                    .pairs
                    .iter()
                    .filter(|(s, d, _)| macs.contains(s) || macs.contains(d))
                    .map(|(s, d, b)| (sampler::pair_key(s, d), *b))
                    .collect(),
                cpu_ms: vms
                    .iter()
                    .filter_map(|v| {
                        let id = v.id.to_string();
                        counters.cpu_ms.get(&id).map(|ms| (id, *ms))
                    })
                    .collect(),
            };
            let vcpus = vms.iter().map(|v| v.vcpus).fold(0u32, u32::saturating_add);
            let mut got = None;
            let series = self
                .update_series(nsi, |s| {
                    s.vcpus = vcpus;
                    let (m, next) = sampler::measure(s.cursor.as_ref(), &now);
                    got = m;
                    if let Some(m) = m {
                        // To the bit/s (and micro-core): logged as short decimals,
                        // which JSON parses back exactly, so an auditor recomputes
                        // the allocation from exactly these values.
                        push_window(&mut s.samples, (m.mbps * 1e6).round() / 1e6);
                        if let Some(c) = m.cores {
                            push_window(&mut s.cpu, (c * 1e6).round() / 1e6);
                            s.last_cpu_at_ms = at_ms;
                        }
                        s.last_at_ms = at_ms;
                    }
                    s.cursor = Some(next);
                })
                .await?;
            out.measured
                .insert(nsi.name.to_string(), got.map(|m| (m.mbps, m.cores)));
            if got.is_some() {
                providers.insert(nsi.provider.to_string());
            }
            sampled.insert(nsi.id.clone(), series);
        }
        let mut by_provider: BTreeMap<String, Vec<(Nsi, Series)>> = BTreeMap::new();
        for nsi in nsis {
            if !providers.contains(nsi.provider.as_str()) {
                continue;
            }
            let series = match sampled.remove(&nsi.id) {
                Some(s) => s,
                None => {
                    get_json::<Series>(self.store(), &format!("{}{}", keys::SLICE_SERIES, nsi.id))
                        .await?
                        .map(|(s, _)| s)
                        .unwrap_or_default()
                }
            };
            by_provider
                .entry(nsi.provider.to_string())
                .or_default()
                .push((nsi, series));
        }
        out.allocations = self.allocate_providers(by_provider, policy, at_ms).await?;
        Ok(out)
    }
}

fn ledger_err(e: LogError) -> SliceError {
    match e {
        LogError::Proof(p) => SliceError::Proof(p.to_string()),
        e => SliceError::Ledger(e),
    }
}

impl Control {
    /// The ledger's latest checkpoint and the keys announced for it.
    pub async fn ledger_head(&self) -> Result<LedgerHead, SliceError> {
        let ledger = self.slice_ledger().await?;
        let head = ledger.head().await.map_err(ledger_err)?;
        let keys = self
            .store()
            .list(&translog::log::keys::key(keys::SLICE_LEDGER, ""))
            .await
            .map_err(ControlError::from)?
            .into_iter()
            .filter_map(|kv| {
                let id = kv.key.rsplit('/').next()?.to_owned();
                Some(LedgerKey {
                    id,
                    public_key: String::from_utf8(kv.value.to_vec()).ok()?,
                })
            })
            .collect();
        Ok(LedgerHead {
            origin: LEDGER_ORIGIN.into(),
            size: head.size,
            root: model::hex(&head.root),
            checkpoint: serde_json::to_string(&head.signed).map_err(ControlError::Encode)?,
            keys,
        })
    }

    /// Every raw key of the ledger (for an auditor).
    pub async fn ledger_raw(&self) -> Result<Vec<LedgerRawKey>, SliceError> {
        let raw = self.slice_ledger().await?.raw().await.map_err(ledger_err)?;
        Ok(raw
            .into_iter()
            .map(|(key, v)| LedgerRawKey {
                key,
                value: String::from_utf8_lossy(&v).into_owned(),
            })
            .collect())
    }

    /// Entry `index` with its inclusion proof in the tree of `size` entries (the
    /// latest when `None`).
    pub async fn ledger_proof(
        &self,
        index: u64,
        size: Option<u64>,
    ) -> Result<LedgerProof, SliceError> {
        let ledger = self.slice_ledger().await?;
        let size = match size {
            Some(s) => s,
            None => ledger.head().await.map_err(ledger_err)?.size,
        };
        let inclusion = ledger
            .inclusion_proof(index, size)
            .await
            .map_err(ledger_err)?;
        let root = ledger.root_at(size).await.map_err(ledger_err)?;
        let entry = ledger
            .entry(index)
            .await
            .map_err(ledger_err)?
            .ok_or_else(|| SliceError::Proof(format!("no entry {index}")))?;
        Ok(LedgerProof {
            index,
            size,
            root: model::hex(&root),
            entry: String::from_utf8_lossy(&entry).into_owned(),
            inclusion: inclusion.iter().map(|h| model::hex(h)).collect(),
        })
    }

    /// The proof that the ledger at `from` entries is a prefix of it at `to`.
    pub async fn ledger_consistency(
        &self,
        from: u64,
        to: Option<u64>,
    ) -> Result<LedgerConsistency, SliceError> {
        let ledger = self.slice_ledger().await?;
        let to = match to {
            Some(t) => t,
            None => ledger.head().await.map_err(ledger_err)?.size,
        };
        let proof = ledger
            .consistency_proof(from, to)
            .await
            .map_err(ledger_err)?;
        Ok(LedgerConsistency {
            from,
            to,
            proof: proof.iter().map(|h| model::hex(h)).collect(),
        })
    }

    /// Finds the associations committed without their ledger entry (the server died
    /// between the commit and the append: the record is not `logged`) that are
    /// older than `grace_ms` (younger ones may still be being appended by the server
    /// that made them), and for each either finds its entry in the ledger (the append
    /// landed, the record's update did not) or appends it now, rebuilt from the
    /// record (the record keeps everything the entry logs, time included), then
    /// records the index. Returns how many entries were appended and how many found.
    pub async fn reconcile_slice_ledger(
        &self,
        grace_ms: u64,
    ) -> Result<(usize, usize), SliceError> {
        let now = now_ms();
        let missing: Vec<(Association, store::Revision)> =
            list_json::<Association>(self.store(), keys::SLICE_ASSOCIATIONS)
                .await?
                .into_iter()
                .filter(|(a, _)| !a.logged && a.created_at.saturating_add(grace_ms) <= now)
                .collect();
        if missing.is_empty() {
            return Ok((0, 0));
        }
        let ledger = self.slice_ledger().await?;
        // Entries already logged, by association id.
        let entries_prefix = translog::log::keys::entry(keys::SLICE_LEDGER, 0);
        let entries_prefix = entries_prefix.trim_end_matches('0');
        let mut logged: BTreeMap<String, u64> = BTreeMap::new();
        for (key, value) in ledger.raw().await.map_err(ledger_err)? {
            let Some(index) = key
                .strip_prefix(entries_prefix)
                .and_then(|i| i.parse::<u64>().ok())
            else {
                continue;
            };
            if let Some(LedgerEntry::Association { association, .. }) =
                entry_body(&value).and_then(|b| serde_json::from_slice::<LedgerEntry>(b).ok())
            {
                logged.entry(association).or_insert(index);
            }
        }
        let (mut appended, mut found) = (0, 0);
        for (mut a, rev) in missing {
            let index = match logged.get(&a.id) {
                Some(i) => {
                    found += 1;
                    *i
                }
                None => {
                    let entry = association_entry(&a);
                    let r = ledger
                        .append(serde_json::to_vec(&entry).map_err(ControlError::Encode)?)
                        .await
                        .map_err(SliceError::Ledger)?;
                    appended += 1;
                    r.index
                }
            };
            a.ledger_index = index;
            a.logged = true;
            let key = format!("{}{}", keys::SLICE_ASSOCIATIONS, a.id);
            // Compared on the revision read: another sweep that got here first wrote
            // the same index; losing to it is fine.
            let _ = self.store().cas(&key, Some(rev), to_bytes(&a)?).await;
            tracing::warn!(association = %a.id, client = %a.client, index, "association without its ledger entry reconciled");
        }
        Ok((appended, found))
    }

    /// sees them, with the default policy.
    pub async fn record_slice_loads_named(
        &self,
        scope: Scope,
        loads: &BTreeMap<String, f64>,
    ) -> Result<Vec<u64>, SliceError> {
        let mut by_id = BTreeMap::new();
        for (name, v) in loads {
            let nsi = self.nsi(scope, name).await?;
            by_id.insert(nsi.id, *v);
        }
        self.record_slice_loads(&by_id, &default_policy()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, u: f64, clients: u32) -> Candidate {
        Candidate {
            nsi: format!("id-{name}"),
            name: name.into(),
            utilization: u,
            cpu_utilization: None,
            clients,
            max_clients: 10,
        }
    }

    #[test]
    fn the_least_utilized_nsi_with_room_is_chosen() {
        let v = vec![
            c("a", 0.5, 0),
            c("b", 0.2, 10),
            c("c", 0.3, 9),
            c("d", 1.2, 0),
        ];
        assert_eq!(choose(&v).unwrap().name, "c");
        assert!(choose(&[c("x", 0.1, 10), c("y", 1.0, 0)]).is_none());
    }

    #[test]
    fn recheck_catches_a_wrong_choice_and_a_wrong_allocation() {
        let candidates = vec![c("a", 0.5, 0), c("b", 0.2, 0)];
        let mut e = LedgerEntry::Association {
            association: "x".into(),
            tenant: TenantId::new_random(),
            client: "ue".into(),
            snssai: Snssai { sst: 1, sd: None },
            nsi: "id-b".into(),
            nsi_name: "b".into(),
            forecast_hash: json_hash(&candidates),
            candidates,
            at_ms: 1,
        };
        recheck(&serde_json::to_vec(&e).unwrap()).unwrap();
        if let LedgerEntry::Association { nsi, .. } = &mut e {
            *nsi = "id-a".into();
        }
        assert!(matches!(
            recheck(&serde_json::to_vec(&e).unwrap()),
            Err(RecheckError::Choice { .. })
        ));
        let policy = default_policy();
        let inputs = vec![AllocInput {
            nsi: "a".into(),
            capacity: 100.0,
            window: (0..30).map(|i| f64::from(i % 12)).collect(),
            cpu: Some(CpuInput {
                capacity: 2.0,
                window: (0..30).map(|i| f64::from(i % 12) / 10.0).collect(),
            }),
        }];
        let shares = allocate(&inputs, &policy);
        assert!(shares[0].cpu.is_some());
        let entry = |shares: Vec<AllocShare>| LedgerEntry::Allocation {
            provider: "p".into(),
            at_ms: 1,
            policy: policy.clone(),
            input_hash: json_hash(&inputs),
            params_hash: params_hash(&policy, &shares),
            inputs: inputs.clone(),
            shares,
        };
        recheck(&serde_json::to_vec(&entry(shares.clone())).unwrap()).unwrap();
        // A traffic share or a CPU share that is not what the inputs give.
        let mut more = shares.clone();
        more[0].share += 1.0;
        let mut more_cpu = shares.clone();
        if let Some(c) = more_cpu[0].cpu.as_mut() {
            c.share += 0.5;
        }
        for bad in [more, more_cpu] {
            assert!(matches!(
                recheck(&serde_json::to_vec(&entry(bad)).unwrap()),
                Err(RecheckError::Allocation { .. })
            ));
        }
        // The CPU model is part of the parameters hash.
        let before = params_hash(&policy, &shares);
        let mut other = shares;
        if let Some(c) = other[0].cpu.as_mut() {
            c.model = "seasonal-naive".into();
        }
        assert_ne!(params_hash(&policy, &other), before);
    }
}
