//! `vinfra vnfd validate`, `vinfra nsd validate` (ETSI SOL001-style descriptors).

use std::path::PathBuf;

use anyhow::{bail, Context};
use model::api::{
    CreateNsInstance, NsInstanceRecord, NsState, ScaleDirection, ScaleNsInstance, SiteSpec,
};

use crate::cmd::Ctx;
use crate::{output, progress};

/// Descriptor commands.
#[derive(Debug, clap::Subcommand)]
pub enum DescriptorCmd {
    /// Check a descriptor file and report every error with its path in the file.
    Validate {
        /// The YAML file.
        file: PathBuf,
    },
    /// Upload a descriptor to the control plane (refused with the same errors).
    Create {
        /// The YAML file.
        file: PathBuf,
    },
    /// List the descriptors stored in the control plane.
    List,
}

/// Uploads or lists descriptors of `kind` (`vnfd`, `nsd`); `Validate` runs locally.
async fn run_remote(ctx: &Ctx, kind: &str, cmd: DescriptorCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    let ds = match cmd {
        DescriptorCmd::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            vec![c.upload_descriptor(kind, &text).await?]
        }
        DescriptorCmd::List | DescriptorCmd::Validate { .. } => c.list_descriptors(kind).await?,
    };
    output::emit(ctx.format, &ds, &["id", "kind", "tenant"], || {
        ds.iter()
            .map(|d| vec![d.id.clone(), d.kind.clone(), d.tenant.to_string()])
            .collect()
    })
}

/// `vinfra vnfd …`
pub async fn run_vnfd(ctx: &Ctx, cmd: DescriptorCmd) -> anyhow::Result<()> {
    match cmd {
        DescriptorCmd::Validate { file } => {
            let v = nfv::descriptor::load_vnfd(&file)?;
            println!(
                "{}: valid VNFD {} ({} VDUs, {} CPs, {} virtual links)",
                file.display(),
                v.id,
                v.vdus.len(),
                v.cps.len(),
                v.virtual_links.len()
            );
            Ok(())
        }
        other => run_remote(ctx, "vnfd", other).await,
    }
}

/// `vinfra nsd …`
pub async fn run_nsd(ctx: &Ctx, cmd: DescriptorCmd) -> anyhow::Result<()> {
    match cmd {
        DescriptorCmd::Validate { file } => {
            let (_nsd, vnfds) = nfv::descriptor::load_nsd(&file)?;
            println!("{}: valid NSD over {} VNFDs", file.display(), vnfds.len());
            Ok(())
        }
        other => run_remote(ctx, "nsd", other).await,
    }
}

/// Network-service commands.
#[derive(Debug, clap::Subcommand)]
pub enum NsCmd {
    /// Print the generic commands an NS turns into, per site: the commands
    /// each site's driver translates into its own cloud-management API.
    Plan {
        /// The NSD file (its `imports` name the VNFDs, relative to it).
        nsd: PathBuf,
        /// NS instance name (prefix of every site resource).
        #[arg(long, default_value = "demo")]
        name: String,
        /// Sites available, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "site-a,site-b")]
        sites: Vec<String>,
    },
    /// Instantiate a stored NSD across sites, establish its links between
    /// VNF connection points, and follow the progress of every VNF and link.
    Instantiate {
        /// The stored NSD's descriptor id (`vinfra nsd create FILE` first).
        nsd: String,
        /// Instance name (prefix of every site resource; at most 20 bytes).
        #[arg(long)]
        name: String,
        /// Sites: NAME=vinfra, NAME=vinfra:HOST or NAME=libvirt:URI:WORK_DIR, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_site)]
        site_map: Vec<(String, SiteSpec)>,
        /// A site as JSON (for openstack and kubernetes): NAME={"driver":"openstack",…};
        /// repeatable.
        #[arg(long = "site", value_parser = parse_site_json)]
        site_json: Vec<(String, SiteSpec)>,
        /// A VNF's link agent: VNF=127.0.0.1:PORT; repeatable.
        #[arg(long = "endpoint", value_parser = parse_endpoint)]
        endpoints: Vec<(String, String)>,
        /// How long a link may take before it fails, ms.
        #[arg(long)]
        link_deadline_ms: Option<u64>,
        /// Return at once instead of following the instantiation.
        #[arg(long)]
        no_wait: bool,
    },
    /// List NS instances.
    List,
    /// Show one NS instance: its VNFs, links (with every state change) and SOL003 records.
    Show {
        /// Instance name or id.
        ns: String,
    },
    /// Scale one VNF of an instantiated NS out or in by one VDU, and wait for it.
    Scale {
        /// Instance name or id.
        ns: String,
        /// The VNF (its id in the NSD).
        #[arg(long)]
        vnf: String,
        /// One VDU more.
        #[arg(
            long,
            conflicts_with = "scale_in",
            required_unless_present = "scale_in"
        )]
        out: bool,
        /// One VDU less.
        #[arg(long = "in")]
        scale_in: bool,
    },
    /// Terminate an NS instance on every site and wait until nothing is left.
    Terminate {
        /// Instance name or id.
        ns: String,
        /// Only drop the record of a failed instance, without contacting its sites (when a
        /// site is gone for good; what it still holds is yours to clean).
        #[arg(long)]
        forget: bool,
    },
}

fn parse_site(s: &str) -> Result<(String, SiteSpec), String> {
    let (name, spec) = s.split_once('=').ok_or_else(|| {
        format!("'{s}': expected NAME=vinfra[:HOST] or NAME=libvirt:URI:WORK_DIR")
    })?;
    let spec = match spec.split_once(':') {
        None if spec == "vinfra" => SiteSpec::Vinfra { host: None },
        Some(("vinfra", host)) => SiteSpec::Vinfra {
            host: Some(host.to_owned()),
        },
        Some(("libvirt", rest)) => {
            let (uri, work_dir) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("'{s}': libvirt needs URI:WORK_DIR"))?;
            SiteSpec::Libvirt {
                uri: uri.to_owned(),
                work_dir: work_dir.to_owned(),
            }
        }
        _ => {
            return Err(format!(
                "'{s}': unknown site driver (vinfra, libvirt here; openstack and kubernetes with --site NAME=JSON)"
            ))
        }
    };
    Ok((name.to_owned(), spec))
}

fn parse_site_json(s: &str) -> Result<(String, SiteSpec), String> {
    let (name, json) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=JSON"))?;
    let spec = serde_json::from_str(json).map_err(|e| format!("site {name}: {e}"))?;
    Ok((name.to_owned(), spec))
}

fn parse_endpoint(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(v, a)| (v.to_owned(), a.to_owned()))
        .ok_or_else(|| format!("'{s}': expected VNF=127.0.0.1:PORT"))
}

fn link_line(l: &serde_json::Value) -> String {
    let state = l["state"]["state"].as_str().unwrap_or("?");
    let reason = l["state"]["reason"]
        .as_str()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!(
        "link {} {}/{} -> {}/{}: {state}{reason}",
        l["link"].as_str().unwrap_or("?"),
        l["second_vnf"].as_str().unwrap_or("?"),
        l["second_cp"].as_str().unwrap_or("?"),
        l["first_vnf"].as_str().unwrap_or("?"),
        l["first_cp"].as_str().unwrap_or("?"),
    )
}

fn show_instances(ctx: &Ctx, recs: &[NsInstanceRecord]) -> anyhow::Result<()> {
    output::emit(
        ctx.format,
        &recs,
        &["name", "nsd", "state", "vnfs", "links", "ms", "error"],
        || {
            recs.iter()
                .map(|r| {
                    let up = r
                        .links
                        .iter()
                        .filter(|l| l["state"]["state"] == "up")
                        .count();
                    vec![
                        r.name.to_string(),
                        r.nsd.clone(),
                        serde_json::to_value(r.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        r.vnfs
                            .iter()
                            .map(|v| format!("{}@{}:{}", v.vnf, v.site, v.state))
                            .collect::<Vec<_>>()
                            .join(" "),
                        format!("{up}/{} up", r.links.len()),
                        r.elapsed_ms.map(|m| m.to_string()).unwrap_or_default(),
                        r.error.clone().unwrap_or_default(),
                    ]
                })
                .collect()
        },
    )
}

/// Polls an instantiation, one progress line per VNF and link, until it settles.
async fn follow(c: &client::Client, name: &str) -> anyhow::Result<NsInstanceRecord> {
    let multi = indicatif::MultiProgress::new();
    let mut bars: std::collections::BTreeMap<String, indicatif::ProgressBar> = Default::default();
    loop {
        let r = c.get_ns_instance(name).await?;
        let mut lines: Vec<(String, String)> = r
            .vnfs
            .iter()
            .map(|v| {
                let ms = v
                    .ready_ms
                    .map(|m| format!(" in {m} ms"))
                    .unwrap_or_default();
                (
                    format!("vnf {}", v.vnf),
                    format!("vnf {} on {}: {}{ms}", v.vnf, v.site, v.state),
                )
            })
            .collect();
        lines.extend(r.links.iter().map(|l| {
            (
                format!("link {}", l["link"].as_str().unwrap_or("?")),
                link_line(l),
            )
        }));
        for (key, line) in lines {
            let bar = bars
                .entry(key)
                .or_insert_with(|| multi.add(progress::spinner("")));
            bar.set_message(line);
        }
        if r.state != NsState::Instantiating {
            for b in bars.values() {
                b.finish();
            }
            return Ok(r);
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// `vinfra ns …`
pub async fn run_ns(ctx: &Ctx, cmd: NsCmd) -> anyhow::Result<()> {
    match cmd {
        NsCmd::Instantiate {
            nsd,
            name,
            site_map,
            site_json,
            endpoints,
            link_deadline_ms,
            no_wait,
        } => {
            let c = ctx.client()?;
            let r = c
                .create_ns_instance(&CreateNsInstance {
                    name: name.clone(),
                    nsd,
                    sites: site_map.into_iter().chain(site_json).collect(),
                    endpoints: endpoints.into_iter().collect(),
                    link_deadline_ms,
                })
                .await?;
            let r = if no_wait { r } else { follow(&c, &name).await? };
            show_instances(ctx, std::slice::from_ref(&r))?;
            match (r.state, &r.error) {
                (NsState::Failed, Some(e)) => bail!("ns {name} failed: {e}"),
                _ => Ok(()),
            }
        }
        NsCmd::List => show_instances(ctx, &ctx.client()?.list_ns_instances().await?),
        NsCmd::Show { ns } => {
            let r = ctx.client()?.get_ns_instance(&ns).await?;
            if ctx.format == output::Format::Json {
                return output::emit(ctx.format, &r, &[], Vec::new);
            }
            show_instances(ctx, std::slice::from_ref(&r))?;
            for l in &r.links {
                println!("{}", link_line(l));
            }
            Ok(())
        }
        NsCmd::Scale {
            ns,
            vnf,
            out,
            scale_in: _,
        } => {
            let c = ctx.client()?;
            let direction = if out {
                ScaleDirection::Out
            } else {
                ScaleDirection::In
            };
            c.scale_ns_instance(
                &ns,
                &ScaleNsInstance {
                    vnf: vnf.clone(),
                    direction,
                },
            )
            .await?;
            let bar = progress::spinner(format!("scaling {vnf} of {ns}"));
            let r = loop {
                let r = c.get_ns_instance(&ns).await?;
                if r.state != NsState::Scaling {
                    break r;
                }
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            };
            if let Some(e) = &r.error {
                bar.abandon();
                bail!("{e}");
            }
            let vdus = r
                .vnf_instances
                .iter()
                .find(|v| v["vnfInstanceName"] == vnf.as_str())
                .and_then(|v| v["instantiatedVnfInfo"]["vnfcResourceInfo"].as_array())
                .map_or(0, Vec::len);
            bar.finish_and_clear();
            println!("{vnf} of {ns} now has {vdus} VDU(s)");
            Ok(())
        }
        NsCmd::Terminate { ns, forget: true } => {
            ctx.client()?.forget_ns_instance(&ns).await?;
            eprintln!("ns {ns} forgotten; its sites were not contacted");
            Ok(())
        }
        NsCmd::Terminate { ns, forget: false } => {
            let c = ctx.client()?;
            c.delete_ns_instance(&ns).await?;
            let bar = progress::spinner(format!("terminating {ns} on every site"));
            loop {
                match c.get_ns_instance(&ns).await {
                    Err(e) if e.status() == Some(404) => break,
                    Err(e) => return Err(e.into()),
                    Ok(r) if r.state == NsState::Failed => {
                        bar.abandon();
                        bail!("terminate {ns} failed: {}", r.error.unwrap_or_default());
                    }
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
                }
            }
            bar.finish_with_message(format!("{ns} terminated; nothing left on its sites"));
            Ok(())
        }
        NsCmd::Plan { nsd, name, sites } => {
            let (nsd, vnfds) = nfv::descriptor::load_nsd(&nsd)?;
            let plan = nfv::plan::plan_ns(&name, &nsd, &vnfds, &sites)?;
            if ctx.format == output::Format::Json {
                return output::emit(ctx.format, &plan, &[], Vec::new);
            }
            for sp in &plan.sites {
                println!("site {}:", sp.site);
                for c in sp.commands() {
                    println!("  {}", serde_json::to_string(&c)?);
                }
            }
            Ok(())
        }
    }
}
