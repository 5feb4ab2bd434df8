//! `vinfra mec serve`: one operator's MEC V2X service. `vinfra v2x …`: its V2X API
//! (subscriptions of devices, links, the PC5 gate's counters) and a device's authorization,
//! over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

use crate::output::{table, Format};

/// `vinfra mec …`.
#[derive(Debug, clap::Subcommand)]
pub enum MecCmd {
    /// Run one operator's MEC V2X service: V2X API, V2X application function, ETSI MEC 030
    /// VIS (`/vis/v2`), WebSocket notifications and the message relay.
    Serve(ServeArgs),
}

/// `vinfra mec serve` arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The operator's PLMN, MCC-MNC (e.g. 001-01).
    #[arg(long)]
    operator: v2x::types::Plmn,
    /// HTTP listen address (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:8780")]
    listen: SocketAddr,
    /// UDP port of the relay on the listen address (0: any).
    #[arg(long, default_value_t = 0)]
    relay_port: u16,
    /// File holding the operator / MEC-application token (or VINFRA_MEC_TOKEN).
    #[arg(long, env = "VINFRA_MEC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// File holding the roaming agreement's secret, the same at every operator (link keys
    /// and the token MECs present to each other derive from it).
    #[arg(long)]
    roaming_secret_file: Option<PathBuf>,
    /// A peer operator: PLMN=URL,RELAY (e.g. 002-02=http://10.70.0.2:7802,10.70.0.2:4702).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Network namespace of the PC5 medium whose nftables gate this MEC opens links on.
    #[arg(long)]
    pc5_netns: Option<String>,
    /// Create the gate's table (the first MEC on a medium does; later ones only add rules).
    #[arg(long)]
    install_gate: bool,
    /// Directory of the MEC's durable state (subscriptions, authorizations, links, VIS
    /// subscriptions): a restart, even after kill -9, continues from it. Without it the
    /// state lives in memory only.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn read_secret(path: Option<&PathBuf>, env: &str, what: &str) -> anyhow::Result<String> {
    if let Some(p) = path {
        let s =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        return Ok(s.trim().to_owned());
    }
    std::env::var(env).map_err(|_| anyhow::anyhow!("give --{what} or set {env}"))
}

fn parse_peer(s: &str) -> anyhow::Result<v2x::function::PeerOperator> {
    let (plmn, rest) = s
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--peer {s:?}: expected PLMN=URL,RELAY"))?;
    let (uri, relay) = rest
        .rsplit_once(',')
        .ok_or_else(|| anyhow::anyhow!("--peer {s:?}: expected PLMN=URL,RELAY"))?;
    Ok(v2x::function::PeerOperator {
        plmn: plmn.parse()?,
        uri: uri.to_owned(),
        relay: relay
            .parse()
            .with_context(|| format!("--peer {s:?}: relay must be IP:PORT"))?,
    })
}

/// Runs `vinfra mec …`.
pub async fn run_mec(c: MecCmd) -> anyhow::Result<()> {
    let MecCmd::Serve(a) = c;
    let token = read_secret(a.token_file.as_ref(), "VINFRA_MEC_TOKEN", "token-file")?;
    let secret = read_secret(
        a.roaming_secret_file.as_ref(),
        "VINFRA_ROAMING_SECRET",
        "roaming-secret-file",
    )?;
    let mut o = v2x::serve::ServeOptions::local(a.operator.clone(), &token, secret.as_bytes());
    o.listen = a.listen;
    o.relay_port = a.relay_port;
    o.peers = a
        .peers
        .iter()
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<_>>()?;
    o.gate = a
        .pc5_netns
        .as_deref()
        .map(|n| v2x::gate::Pc5Gate::new(Some(n)));
    o.install_gate = a.install_gate;
    o.state_dir = a.state_dir.clone();
    let h = v2x::serve::start(o)
        .await
        .context("cannot start the MEC service")?;
    tracing::info!(operator = %a.operator, http = %h.http, websocket = %h.ws, relay = %h.relay, "MEC V2X service up");
    println!(
        "MEC {} on {} (VIS {}/vis/v2, relay {})",
        a.operator,
        h.url(),
        h.url(),
        h.relay
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// `vinfra v2x …` (talks to one MEC: `--mec URL`, `--mec-token` or VINFRA_MEC_TOKEN).
#[derive(Debug, clap::Args)]
pub struct V2xArgs {
    /// The MEC's base URL.
    #[arg(long, env = "VINFRA_MEC_URL", default_value = "http://127.0.0.1:8780")]
    mec: String,
    /// Operator token.
    #[arg(long, env = "VINFRA_MEC_TOKEN", hide_env_values = true)]
    mec_token: Option<String>,
    #[command(subcommand)]
    cmd: V2xCmd,
}

/// `vinfra v2x` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum V2xCmd {
    /// Provision (or replace) a device's V2X subscription; prints its device token.
    Provision {
        /// Device id.
        device: String,
        /// V2X services (PSID / ITS-AID), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        services: Vec<u64>,
        /// PLMNs it may talk to besides its own, comma-separated MCC-MNC.
        #[arg(long, value_delimiter = ',')]
        plmns: Vec<v2x::types::Plmn>,
        /// Validity of the configuration parameters, seconds.
        #[arg(long, default_value_t = 3600)]
        validity: u32,
    },
    /// Revoke a device's subscription (its links go down at once).
    Revoke {
        /// Device id.
        device: String,
    },
    /// Provisioned devices.
    Devices,
    /// A device: subscription, current parameters, links.
    Show {
        /// Device id.
        device: String,
    },
    /// Links this MEC opened.
    Links {
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
    },
    /// The PC5 gate's counters (dropped by the closed path, per open pair).
    Gate,
    /// Authorize as a device (what a vehicle sends): prints the configuration parameters.
    Authorize {
        /// Device id.
        device: String,
        /// The device token `provision` printed.
        #[arg(long)]
        device_token: String,
        /// The device's PC5 address.
        #[arg(long)]
        pc5_address: std::net::Ipv4Addr,
        /// The device's home operator, when this MEC is a visited one: the MEC fetches the
        /// subscription from the home MEC (a `--peer`), the device token being the proof.
        #[arg(long)]
        home_plmn: Option<v2x::types::Plmn>,
    },
}

async fn call(
    a: &V2xArgs,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let c = reqwest::Client::new();
    let mut r = c.request(method, format!("{}{path}", a.mec.trim_end_matches('/')));
    let t = token.or(a.mec_token.as_deref()).ok_or_else(|| {
        anyhow::anyhow!("give --mec-token or set VINFRA_MEC_TOKEN (the MEC's operator token)")
    })?;
    r = r.bearer_auth(t);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r
        .send()
        .await
        .with_context(|| format!("cannot reach the MEC at {}", a.mec))?;
    let status = resp.status();
    let text = resp.text().await?;
    let v: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if !status.is_success() {
        anyhow::bail!(
            "the MEC answered {status}: {}",
            v["detail"].as_str().unwrap_or(&v.to_string())
        );
    }
    Ok(v)
}

/// Runs `vinfra v2x …`.
pub async fn run(a: V2xArgs, format: Format) -> anyhow::Result<()> {
    use reqwest::Method;
    let v = match &a.cmd {
        V2xCmd::Provision {
            device,
            services,
            plmns,
            validity,
        } => {
            let body = json!({"services": services, "plmns": plmns, "validityS": validity});
            call(
                &a,
                Method::PUT,
                &format!("/v2x/v1/subscriptions/{device}"),
                None,
                Some(body),
            )
            .await?
        }
        V2xCmd::Revoke { device } => {
            call(
                &a,
                Method::DELETE,
                &format!("/v2x/v1/subscriptions/{device}"),
                None,
                None,
            )
            .await?;
            println!("revoked {device}");
            return Ok(());
        }
        V2xCmd::Devices => call(&a, Method::GET, "/v2x/v1/subscriptions", None, None).await?,
        V2xCmd::Show { device } => {
            call(
                &a,
                Method::GET,
                &format!("/v2x/v1/subscriptions/{device}"),
                None,
                None,
            )
            .await?
        }
        V2xCmd::Links { device } => {
            let q = device
                .as_ref()
                .map(|d| format!("?device={d}"))
                .unwrap_or_default();
            let v = call(&a, Method::GET, &format!("/v2x/v1/links{q}"), None, None).await?;
            if format == Format::Table {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| {
                        ["id", "deviceId", "address", "peerAddress", "v2xServiceId"]
                            .iter()
                            .map(|k| {
                                l[*k]
                                    .as_str()
                                    .map_or_else(|| l[*k].to_string(), str::to_owned)
                            })
                            .chain([format!(
                                "{}-{}",
                                l["peerPlmn"]["mcc"].as_str().unwrap_or(""),
                                l["peerPlmn"]["mnc"].as_str().unwrap_or("")
                            )])
                            .collect()
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["id", "device", "address", "peer", "service", "peer plmn"],
                        &rows
                    )
                );
                return Ok(());
            }
            v
        }
        V2xCmd::Gate => call(&a, Method::GET, "/v2x/v1/gate", None, None).await?,
        V2xCmd::Authorize {
            device,
            device_token,
            pc5_address,
            home_plmn,
        } => {
            let mut body = json!({"deviceId": device, "pc5Address": pc5_address});
            if let Some(h) = home_plmn {
                body["homePlmn"] = json!(h);
            }
            call(
                &a,
                Method::POST,
                "/v2x/v1/authorizations",
                Some(device_token),
                Some(body),
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// The bench's table.
pub fn bench_table(r: &v2x::bench::Report) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.metric.clone(),
                x.n.to_string(),
                format!("{:.3}", x.p50_ms),
                format!("{:.3}", x.p99_ms),
                format!("{:.3}", x.p999_ms),
                format!("{:.3}", x.max_ms),
                x.target.clone(),
            ]
        })
        .collect();
    let mut s = format!(
        "{} vehicles, two operators in network namespaces, MEC state {} (ms)\n",
        r.vehicles, r.state
    );
    s.push_str(&table(
        &["metric", "n", "p50", "p99", "p99.9", "max", "target"],
        &rows,
    ));
    s.push_str(&format!(
        "messages: direct {} sent, {} lost; through the MECs {} sent, {} lost (target 0)\n",
        r.direct_sent, r.direct_lost, r.relay_sent, r.relay_lost
    ));
    s.push_str(&format!(
        "after revocation of {} vehicles: {} of their messages delivered, {} dropped at the gate; {} vehicles changed operator\n",
        r.revoked, r.after_revocation_delivered, r.after_revocation_dropped, r.moved
    ));
    s
}
