//! Site drivers: each translates generic commands into one cloud-management software's API.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::descriptor::Ipv4Cidr;
use crate::plan::{GenericCommand, VduSpec};

pub mod conformance;
pub mod kubernetes;
pub mod libvirt;
pub mod openstack;
pub mod process;
pub mod sim;
pub mod vinfra;

/// Run-time information about a CP, as SOL003's `cpProtocolInfo[].ipOverEthernet` has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpInfo {
    /// CP resource name.
    pub cp: String,
    /// Site-side id of the port/interface (Neutron port id, libvirt target dev, ...).
    pub port_id: Option<String>,
    /// MAC address, when the site knows it.
    pub mac: Option<String>,
    /// IPv4 addresses the site reports.
    pub ips: Vec<Ipv4Addr>,
}

/// What a site holds (resource names), for checks that nothing is left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInventory {
    /// Networks.
    pub networks: Vec<String>,
    /// VDUs (servers, domains, pods).
    pub vdus: Vec<String>,
}

impl SiteInventory {
    /// Only the resources whose name starts with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> SiteInventory {
        let keep = |v: &Vec<String>| {
            v.iter()
                .filter(|n| n.starts_with(prefix))
                .cloned()
                .collect()
        };
        SiteInventory {
            networks: keep(&self.networks),
            vdus: keep(&self.vdus),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.vdus.is_empty()
    }
}

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The site could not be reached.
    #[error("{site}: {op}: request failed")]
    Http {
        /// Site kind.
        site: &'static str,
        /// What we were doing.
        op: String,
        /// The cause.
        #[source]
        err: reqwest::Error,
    },
    /// The site answered with an unexpected status.
    #[error("{site}: {op}: HTTP {status}: {body}")]
    Status {
        /// Site kind.
        site: &'static str,
        /// What we were doing.
        op: String,
        /// Status code.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// The site's answer did not have the published shape.
    #[error("{site}: {op}: unexpected response: {what}")]
    Protocol {
        /// Site kind.
        site: &'static str,
        /// What we were doing.
        op: String,
        /// What was missing or wrong.
        what: String,
    },
    /// A referenced resource does not exist.
    #[error("{site}: {kind} '{name}' not found")]
    NotFound {
        /// Site kind.
        site: &'static str,
        /// Resource kind.
        kind: &'static str,
        /// Resource name.
        name: String,
    },
    /// The site reported a failure of the resource itself (Nova ERROR, Pod Failed, ...).
    #[error("{site}: {kind} '{name}' failed: {reason}")]
    Failed {
        /// Site kind.
        site: &'static str,
        /// Resource kind.
        kind: &'static str,
        /// Resource name.
        name: String,
        /// As the site reported it.
        reason: String,
    },
    /// The resource did not reach the wanted state in time.
    #[error("{site}: {kind} '{name}' not {state} after {secs:.1} s")]
    Timeout {
        /// Site kind.
        site: &'static str,
        /// Resource kind.
        kind: &'static str,
        /// Resource name.
        name: String,
        /// Wanted state.
        state: &'static str,
        /// How long we waited.
        secs: f64,
    },
    /// A local tool (virsh) could not be run or failed.
    #[error("{site}: {cmd}: {stderr}")]
    Tool {
        /// Site kind.
        site: &'static str,
        /// The command line.
        cmd: String,
        /// Its error output.
        stderr: String,
    },
    /// A vinfra control-plane call failed.
    #[error("vinfra: {op}")]
    Vinfra {
        /// What we were doing.
        op: String,
        /// The client's error.
        #[source]
        err: Box<client::ClientError>,
    },
    /// An in-process site (vinfra's own control layer, called without HTTP) refused or
    /// failed a call; the cause is that layer's typed error.
    #[error("{site}: {op}")]
    InProcess {
        /// Site kind.
        site: &'static str,
        /// What we were doing.
        op: String,
        /// The control layer's error.
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The command is not one a site driver executes (ConnectLink is the link module's).
    #[error("{0} is not a site command")]
    NotASiteCommand(&'static str),
}

/// A data center's cloud-management software, driven by generic commands.
///
/// Contract (checked by [`conformance`]): creations wait until the resource is usable;
/// deletions wait until it is gone and succeed when it is already absent, so that rollback
/// and terminate can be repeated; names are the planner's and are unique per site.
#[async_trait::async_trait]
pub trait SiteDriver: Send + Sync + fmt::Debug {
    /// Short name of the software: `openstack`, `libvirt`, ...
    fn kind(&self) -> &'static str;
    /// Creates an isolated network with an IPv4 subnet.
    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError>;
    /// Deletes a network; absent is fine.
    async fn delete_network(&self, name: &str) -> Result<(), DriverError>;
    /// Creates a VDU with its CPs and waits until it runs.
    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError>;
    /// Deletes a VDU (and its CPs); absent is fine; waits until it is gone.
    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError>;
    /// The run-time information of a VDU's CP.
    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError>;
    /// Everything on the site that a driver of this kind manages.
    async fn inventory(&self) -> Result<SiteInventory, DriverError>;
    /// Where the site itself takes link requests for the CPs of `vdu` (its
    /// software relays them into the guest), if it does; otherwise the NS needs an
    /// explicit endpoint (a link agent) for the VNF.
    async fn link_endpoint(&self, _vdu: &str) -> Result<Option<std::net::SocketAddr>, DriverError> {
        Ok(None)
    }
    /// The credential to send with link requests to the site's own endpoints.
    fn link_auth(&self) -> Option<String> {
        None
    }
    /// Waits until the guest of `vdu` can take part in a link: called before the links
    /// to and from its CPs are established, so that a link's deadline is not spent on
    /// the guest's boot. Default: at once (the VDU was usable when created).
    async fn wait_guest(&self, _vdu: &str) -> Result<(), DriverError> {
        Ok(())
    }
}

/// Polls `fetch` (the VM record of `name` on a vinfra site; `NotFound` when there is none)
/// every `poll` until the VM runs — or fails — or, with `gone`, until its record is gone;
/// `Timeout` after `timeout`. One loop for the in-process site and the HTTP driver.
pub async fn wait_vm<F, Fut>(
    site: &'static str,
    name: &str,
    gone: bool,
    timeout: std::time::Duration,
    poll: std::time::Duration,
    mut fetch: F,
) -> Result<(), DriverError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<model::Vm, DriverError>>,
{
    use model::ObservedState;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match fetch().await {
            Err(DriverError::NotFound { .. }) if gone => return Ok(()),
            Err(e) => return Err(e),
            Ok(vm) if !gone && vm.observed == ObservedState::Running => return Ok(()),
            Ok(vm) if !gone && vm.observed == ObservedState::Failed => {
                return Err(DriverError::Failed {
                    site,
                    kind: "vm",
                    name: name.into(),
                    reason: vm.error.unwrap_or_else(|| "observed failed".into()),
                })
            }
            Ok(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DriverError::Timeout {
                site,
                kind: "vm",
                name: name.into(),
                state: if gone { "deleted" } else { "running" },
                secs: timeout.as_secs_f64(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// Polls `console` (the VDU's console tail) every `poll` until [`vinfra::guest_ready`] says
/// the guest answers link requests; `Timeout` after `timeout`.
pub async fn wait_guest_console<F, Fut>(
    site: &'static str,
    vdu: &str,
    timeout: std::time::Duration,
    poll: std::time::Duration,
    mut console: F,
) -> Result<(), DriverError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, DriverError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if vinfra::guest_ready(&console().await?) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DriverError::Timeout {
                site,
                kind: "guest",
                name: vdu.into(),
                state: "ready",
                secs: timeout.as_secs_f64(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// Runs one generic command on a site; AttachCp returns the CP's information.
pub async fn apply(
    driver: &dyn SiteDriver,
    cmd: &GenericCommand,
) -> Result<Option<CpInfo>, DriverError> {
    match cmd {
        GenericCommand::CreateNetwork { name, cidr } => driver.create_network(name, *cidr).await?,
        GenericCommand::CreateVdu(spec) => driver.create_vdu(spec).await?,
        GenericCommand::AttachCp { vdu, cp } => return driver.cp_info(vdu, cp).await.map(Some),
        GenericCommand::DeleteVdu { name } => driver.delete_vdu(name).await?,
        GenericCommand::DeleteNetwork { name } => driver.delete_network(name).await?,
        GenericCommand::ConnectLink { .. } => {
            return Err(DriverError::NotASiteCommand("ConnectLink"))
        }
    }
    Ok(None)
}

/// Checks a response status, turning anything else into [`DriverError::Status`].
pub(crate) async fn expect_status(
    site: &'static str,
    op: &str,
    res: Result<reqwest::Response, reqwest::Error>,
    ok: &[u16],
) -> Result<reqwest::Response, DriverError> {
    let res = res.map_err(|err| DriverError::Http {
        site,
        op: op.to_owned(),
        err,
    })?;
    let status = res.status().as_u16();
    if ok.contains(&status) {
        return Ok(res);
    }
    let body = res.text().await.unwrap_or_default();
    Err(DriverError::Status {
        site,
        op: op.to_owned(),
        status,
        body: body.chars().take(300).collect(),
    })
}

/// Reads a JSON body.
pub(crate) async fn json_body(
    site: &'static str,
    op: &str,
    res: reqwest::Response,
) -> Result<serde_json::Value, DriverError> {
    res.json().await.map_err(|err| DriverError::Http {
        site,
        op: op.to_owned(),
        err,
    })
}

pub(crate) fn protocol(site: &'static str, op: &str, what: impl Into<String>) -> DriverError {
    DriverError::Protocol {
        site,
        op: op.to_owned(),
        what: what.into(),
    }
}
