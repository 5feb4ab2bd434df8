//! The driver conformance suite: every [`SiteDriver`] must pass [`run_all`] against its real
//! software (or, for clouds we cannot run here, a fake that follows the published API).
//!
//! Adding a driver means passing this suite. Each check cleans up after itself and uses
//! names under the caller's prefix, so that checks can run against a shared site.

use std::net::Ipv4Addr;

use super::{apply, DriverError, SiteDriver};
use crate::descriptor::Ipv4Cidr;
use crate::plan::{CpSpec, GenericCommand, VduSpec};

/// A failed conformance check.
#[derive(Debug, thiserror::Error)]
#[error("{driver}: conformance check '{check}' failed: {detail}")]
pub struct ConformanceFailure {
    /// Driver kind.
    pub driver: &'static str,
    /// Check name.
    pub check: &'static str,
    /// What went wrong.
    pub detail: String,
}

struct Ctx<'a> {
    d: &'a dyn SiteDriver,
    prefix: &'a str,
    image: &'a str,
    check: &'static str,
}

impl Ctx<'_> {
    fn fail(&self, detail: impl Into<String>) -> ConformanceFailure {
        ConformanceFailure {
            driver: self.d.kind(),
            check: self.check,
            detail: detail.into(),
        }
    }

    fn call<T>(&self, what: &str, r: Result<T, DriverError>) -> Result<T, ConformanceFailure> {
        r.map_err(|e| self.fail(format!("{what}: {e}")))
    }

    fn vdu(&self, name: &str, net: &str, ip: Ipv4Addr) -> VduSpec {
        VduSpec {
            name: name.to_owned(),
            vcpus: 1,
            memory_mib: 256,
            storage_mib: 0,
            image: self.image.to_owned(),
            cps: vec![CpSpec {
                name: format!("{name}-cp0"),
                network: net.to_owned(),
                ip,
                prefix: 24,
            }],
        }
    }

    async fn leftovers(&self) -> Result<(), ConformanceFailure> {
        let inv = self
            .call("inventory", self.d.inventory().await)?
            .with_prefix(self.prefix);
        if !inv.is_empty() {
            return Err(self.fail(format!("left behind: {inv:?}")));
        }
        Ok(())
    }
}

fn cidr() -> Ipv4Cidr {
    "10.99.0.0/24".parse().expect("constant CIDR")
}

/// Networks: create (twice: idempotent), listed, delete (twice: absent is fine), gone.
async fn network_lifecycle(c: &Ctx<'_>) -> Result<(), ConformanceFailure> {
    let net = format!("{}-net", c.prefix);
    c.call("create_network", c.d.create_network(&net, cidr()).await)?;
    c.call(
        "create_network again",
        c.d.create_network(&net, cidr()).await,
    )?;
    let inv = c.call("inventory", c.d.inventory().await)?;
    if inv.networks.iter().filter(|n| **n == net).count() != 1 {
        return Err(c.fail(format!("network {net} listed {:?}", inv.networks)));
    }
    c.call("delete_network", c.d.delete_network(&net).await)?;
    c.call("delete_network again", c.d.delete_network(&net).await)?;
    c.leftovers().await
}

/// A VDU with one CP: runs, is listed, reports its CP address, deletes, is gone.
async fn vdu_lifecycle(c: &Ctx<'_>) -> Result<(), ConformanceFailure> {
    let net = format!("{}-net", c.prefix);
    let vdu = format!("{}-vdu", c.prefix);
    let ip = Ipv4Addr::new(10, 99, 0, 7);
    c.call("create_network", c.d.create_network(&net, cidr()).await)?;
    let spec = c.vdu(&vdu, &net, ip);
    c.call("create_vdu", c.d.create_vdu(&spec).await)?;
    let inv = c.call("inventory", c.d.inventory().await)?;
    if !inv.vdus.contains(&vdu) {
        return Err(c.fail(format!("VDU {vdu} not listed: {:?}", inv.vdus)));
    }
    let info = c.call("cp_info", c.d.cp_info(&vdu, &spec.cps[0].name).await)?;
    if info.ips != [ip] {
        return Err(c.fail(format!("CP reports {:?}, planned {ip}", info.ips)));
    }
    match c.d.cp_info(&vdu, "no-such-cp").await {
        Err(DriverError::NotFound { .. }) => {}
        other => return Err(c.fail(format!("cp_info of an unknown CP gave {other:?}"))),
    }
    c.call("delete_vdu", c.d.delete_vdu(&vdu).await)?;
    c.call("delete_vdu again", c.d.delete_vdu(&vdu).await)?;
    match c.d.cp_info(&vdu, &spec.cps[0].name).await {
        Err(DriverError::NotFound { .. }) => {}
        other => return Err(c.fail(format!("cp_info of a deleted VDU gave {other:?}"))),
    }
    c.call("delete_network", c.d.delete_network(&net).await)?;
    c.leftovers().await
}

/// A VDU that cannot be created fails with a typed error and leaves nothing behind.
async fn failed_create_leaves_nothing(c: &Ctx<'_>) -> Result<(), ConformanceFailure> {
    let net = format!("{}-net", c.prefix);
    c.call("create_network", c.d.create_network(&net, cidr()).await)?;
    let mut spec = c.vdu(
        &format!("{}-bad", c.prefix),
        &net,
        Ipv4Addr::new(10, 99, 0, 8),
    );
    spec.image = "nfv-conformance-no-such-image".into();
    match c.d.create_vdu(&spec).await {
        Err(DriverError::NotFound { kind: "image", .. }) => {}
        other => return Err(c.fail(format!("unknown image gave {other:?}"))),
    }
    c.call("delete_network", c.d.delete_network(&net).await)?;
    c.leftovers().await
}

/// The same through generic commands, as the NS executor issues them.
async fn generic_commands(c: &Ctx<'_>) -> Result<(), ConformanceFailure> {
    let net = format!("{}-gnet", c.prefix);
    let spec = c.vdu(
        &format!("{}-gvdu", c.prefix),
        &net,
        Ipv4Addr::new(10, 99, 0, 9),
    );
    let cmds = [
        GenericCommand::CreateNetwork {
            name: net.clone(),
            cidr: cidr(),
        },
        GenericCommand::CreateVdu(spec.clone()),
        GenericCommand::AttachCp {
            vdu: spec.name.clone(),
            cp: spec.cps[0].name.clone(),
        },
        GenericCommand::DeleteVdu {
            name: spec.name.clone(),
        },
        GenericCommand::DeleteNetwork { name: net },
    ];
    for cmd in &cmds {
        let out = c.call(&format!("{cmd:?}"), apply(c.d, cmd).await)?;
        if matches!(cmd, GenericCommand::AttachCp { .. })
            && out.map(|i| i.ips) != Some(vec![spec.cps[0].ip])
        {
            return Err(c.fail("AttachCp did not report the planned address"));
        }
    }
    c.leftovers().await
}

/// Runs every check, in order, stopping at the first failure.
///
/// `prefix` must be unique to this run; `image` must be an image the site can boot.
pub async fn run_all(
    d: &dyn SiteDriver,
    prefix: &str,
    image: &str,
) -> Result<(), ConformanceFailure> {
    let mut c = Ctx {
        d,
        prefix,
        image,
        check: "",
    };
    c.check = "network_lifecycle";
    network_lifecycle(&c).await?;
    c.check = "vdu_lifecycle";
    vdu_lifecycle(&c).await?;
    c.check = "failed_create_leaves_nothing";
    failed_create_leaves_nothing(&c).await?;
    c.check = "generic_commands";
    generic_commands(&c).await?;
    tracing::info!(driver = d.kind(), "conformance suite passed");
    Ok(())
}
