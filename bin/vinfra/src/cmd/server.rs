//! `vinfra server`: the control plane.

use std::path::PathBuf;

use anyhow::Context;

use crate::store_spec;

/// Options of `vinfra server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// State store: `redb:PATH` (embedded) or `etcd:URL[,URL…]`.
    #[arg(long)]
    pub store: String,
    /// Address to listen on. Loopback unless you mean otherwise.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Where the admin token is written (mode 0600) on first start. Only
    /// this path is printed, never the token.
    /// Default: the redb file's directory, or the current directory for etcd.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A host is `down` after this many seconds without a heartbeat. This is also the
    /// host lease: an agent that could not renew it for this long pauses its redundant
    /// VMs (fencing).
    #[arg(long, default_value_t = 6)]
    pub heartbeat_timeout_s: u64,
    /// How long beyond a primary host's lease a standby takeover waits, ms, so that the
    /// cut-off primary has certainly paused its guest. Default: half the heartbeat
    /// timeout, at least 2000.
    #[arg(long)]
    pub takeover_margin_ms: Option<u64>,
    /// Run this domain's vSwitch controller: where switches report VM addresses and
    /// traffic counters (statistics are off without it).
    #[arg(long)]
    pub vswitch_listen: Option<String>,
    /// The controller's domain name.
    #[arg(long, default_value = "default")]
    pub domain: String,
    /// Export flow records as IPFIX (RFC 7011) over UDP to this collector.
    #[arg(long)]
    pub ipfix_collector: Option<String>,
    /// The one directory admins may import image files from (`vinfra image import`);
    /// none by default. Paths are confined to it after resolving symlinks.
    #[arg(long)]
    pub image_import_dir: Option<PathBuf>,
    /// Where the image store keeps its files (default: DATA_DIR/blobs). Several servers
    /// of one store must share it (an NFS mount, as Glance's file store needs): the
    /// store records which files exist, this directory holds them.
    #[arg(long)]
    pub blob_dir: Option<PathBuf>,
    /// The key that seals terminal secrets in the store (32 bytes, made with mode 0600
    /// on first start; default: DATA_DIR/secrets.key). Servers of one store must share
    /// it, as they share the blob dir.
    #[arg(long)]
    pub secrets_key_file: Option<PathBuf>,
    /// A MEC service (`vinfra mec serve`) the dashboard's V2X page may show, as
    /// `NAME=URL` (repeatable). The page asks the user for that MEC's operator token and
    /// keeps it in an HttpOnly cookie, never in the store; only the MECs named here are
    /// ever fetched.
    #[arg(long = "mec", value_name = "NAME=URL")]
    pub mecs: Vec<api::MecEndpoint>,
    /// Largest file the image store accepts (K, M, G or T suffix).
    #[arg(long, default_value = "8G")]
    pub max_blob_size: String,
    /// HTTPS with the cluster CA: `auto` serves it whenever --listen is not a
    /// loopback address (agents then join with `vinfra token join`), `on` always,
    /// `off` never (loopback only: a token in clear text beyond it is refused).
    #[arg(long, default_value = "auto")]
    pub tls: String,
    /// A name or address clients reach this server by, for its certificate (repeat).
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// Requests per second allowed per bearer token (per client address without one);
    /// over it, 429 with Retry-After. 0 turns rate limiting off.
    #[arg(long, default_value_t = 100)]
    pub rate_limit: u32,
    /// Requests a token may send at once after a quiet period.
    #[arg(long, default_value_t = 200)]
    pub rate_burst: u32,
    /// CPU-heavy requests (descriptor validation, NS planning) run at once; more get 429.
    #[arg(long, default_value_t = 2)]
    pub cpu_jobs: usize,
    /// This server's name among several servers on one store (shown in the logs when it
    /// leads the operation driver). Default: from its listen address and a random tag.
    #[arg(long)]
    pub server_id: Option<String>,
    /// Seconds of the operation driver's leader lease (1–60): with several servers on
    /// one etcd, a dead leader is replaced within about this time.
    #[arg(long, default_value_t = 4)]
    pub election_lease_s: u64,
    /// Seconds between two samples of the network slices' load (their VMs' traffic
    /// and CPU time), taken by the leading server; 0 turns the sampler off.
    #[arg(long, default_value_t = 60)]
    pub slice_sample_period_s: u64,
}

/// Whether a server listening on `listen` serves TLS, by `--tls`.
fn tls_on(mode: &str, listen: std::net::SocketAddr) -> anyhow::Result<bool> {
    match mode {
        "auto" => Ok(!listen.ip().is_loopback()),
        "on" => Ok(true),
        "off" if listen.ip().is_loopback() => Ok(false),
        "off" => anyhow::bail!(
            "--tls off needs a loopback --listen: bearer tokens and agents' traffic would \
             cross the network in clear text (got {listen})"
        ),
        other => anyhow::bail!("--tls {other:?}: expected auto, on or off"),
    }
}

fn addr(flag: &str, v: &Option<String>) -> anyhow::Result<Option<std::net::SocketAddr>> {
    v.as_deref()
        .map(|s| {
            s.parse()
                .with_context(|| format!("--{flag} {s:?} is not an address such as 127.0.0.1:7071"))
        })
        .transpose()
}

/// Runs the control plane until SIGINT/SIGTERM.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let spec = store_spec::parse_store_spec(&args.store)?;
    let data_dir = match (&args.data_dir, &spec) {
        (Some(d), _) => d.clone(),
        (None, store_spec::StoreSpec::Redb { path: p }) => p
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".")),
        (None, _) => PathBuf::from("."),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let store = store_spec::open_store(&spec).await?;
    // Only the file's path is printed, never the token: stdout of a server ends
    // up in logs (systemd journal, `vinfra up`'s server.log, CI output), and
    // whoever reads them must not become admin. The file is 0600.
    let token_path = data_dir.join(api::ADMIN_TOKEN_FILE);
    if api::bootstrap_admin(store.as_ref(), &data_dir)
        .await?
        .is_some()
    {
        println!("admin token created in {}", token_path.display());
    } else {
        println!("admin token in {}", token_path.display());
    }
    let listen = args.listen.parse().with_context(|| {
        format!(
            "--listen {:?} is not an address such as 127.0.0.1:7070",
            args.listen
        )
    })?;
    let config = api::ServerConfig {
        listen,
        heartbeat_timeout: std::time::Duration::from_secs(args.heartbeat_timeout_s),
        takeover_margin: args
            .takeover_margin_ms
            .map(std::time::Duration::from_millis),
        vswitch_listen: addr("vswitch-listen", &args.vswitch_listen)?,
        domain: args.domain.clone(),
        ipfix_collector: addr("ipfix-collector", &args.ipfix_collector)?,
        blobs: Some(api::BlobConfig {
            dir: args
                .blob_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("blobs")),
            import_dir: args.image_import_dir.clone(),
            max_bytes: crate::cmd::nbd::parse_size(&args.max_blob_size)
                .context("--max-blob-size")?,
        }),
        tls: tls_on(&args.tls, listen)?.then(|| api::TlsConfig {
            names: args.tls_names.clone(),
        }),
        rate_limit: (args.rate_limit > 0).then_some(api::RateLimit {
            per_sec: args.rate_limit,
            burst: args.rate_burst.max(1),
        }),
        cpu_jobs: args.cpu_jobs.max(1),
        server_id: args.server_id.clone(),
        election_lease: std::time::Duration::from_secs(args.election_lease_s.clamp(1, 60)),
        secrets_key_file: Some(
            args.secrets_key_file
                .clone()
                .unwrap_or_else(|| data_dir.join("secrets.key")),
        ),
        ledger_key_file: Some(data_dir.join("ledger.key")),
        slice_sample_period: (args.slice_sample_period_s > 0)
            .then(|| std::time::Duration::from_secs(args.slice_sample_period_s)),
        // The web dashboard at /ui (docs/UI.md).
        ui: Some(ui::router),
        mecs: args.mecs.clone(),
        ..api::ServerConfig::default()
    };
    let handle = api::serve(config, store).await?;
    tracing::info!(addr = %handle.addr(), "vinfra server listening");
    if let Some(pem) = handle.ca_pem() {
        // Public: clients trust it (`--ca-file`); joining agents check its fingerprint.
        let path = data_dir.join("ca.pem");
        crate::locate::write_private(&path, pem, 0o644)?;
        println!(
            "serving HTTPS; cluster CA in {} (sha256 {})",
            path.display(),
            tls::fingerprint(pem)?
        );
    }
    wait_for_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown().await?;
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
