//! `vinfra`: one binary for the control plane, node agents, the CLI and benchmarks.
//!
//! This crate is the only one that uses `anyhow`: library crates return typed
//! errors, and here they are printed as a chain for the user.

mod cmd;
mod lifeline;
mod locate;
mod output;
mod progress;
mod store_spec;

use clap::{Parser, Subcommand};

use crate::output::Format;

/// vinfra: virtual infrastructure and network functions, with warm live migration.
#[derive(Debug, Parser)]
#[command(name = "vinfra", version, propagate_version = true)]
struct Cli {
    /// API base URL (default: the one `vinfra up` wrote to .vinfra/url). Several servers
    /// of one store may be given, comma-separated: the next is used when one is down.
    #[arg(long, global = true, env = "VINFRA_URL")]
    server: Option<String>,
    /// API token (default: .vinfra/admin-token).
    #[arg(long, global = true, env = "VINFRA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster CA (PEM) to trust for an `https://` server
    /// (`curl -k https://HOST:7070/v1/ca.pem`, then check its fingerprint).
    #[arg(long, global = true, env = "VINFRA_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Exit when stdin closes (used by `vinfra up` for its children).
    #[arg(long, global = true, hide = true)]
    exit_with_stdin: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane and three local hosts on this machine (the main job).
    Up(cmd::up::UpArgs),
    /// Run the control plane (REST API + state store).
    Server(cmd::server::ServerArgs),
    /// Run a node agent on this host.
    Agent(cmd::agent::AgentArgs),
    /// Hosts (nodes running an agent).
    #[command(subcommand)]
    Host(cmd::host::HostCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(cmd::vm::VmCmd),
    /// Live migrations.
    #[command(subcommand)]
    Migration(cmd::migration::MigrationCmd),
    /// Long work of every kind (migrations, drains, network-service jobs): list,
    /// follow, cancel.
    #[command(subcommand)]
    Operation(cmd::operation::OperationCmd),
    /// Traffic statistics of the virtual switches.
    #[command(subcommand)]
    Traffic(cmd::traffic::TrafficCmd),
    /// Storage resources and which hosts reach them (redundant placement).
    #[command(subcommand)]
    Storage(cmd::storage::StorageCmd),
    /// Redundant placement decisions.
    #[command(subcommand)]
    Placement(cmd::storage::PlacementCmd),
    /// VNF descriptors (ETSI SOL001 style).
    #[command(subcommand)]
    Vnfd(cmd::nfv::DescriptorCmd),
    /// Network-service descriptors.
    #[command(subcommand)]
    Nsd(cmd::nfv::DescriptorCmd),
    /// Network services across sites.
    #[command(subcommand)]
    Ns(cmd::nfv::NsCmd),
    /// Network slice instances and client associations by slice type.
    #[command(subcommand)]
    Slice(cmd::slice::SliceCmd),
    /// The slice ledger: head, inclusion proofs, full audit.
    #[command(subcommand)]
    Ledger(cmd::slice::LedgerCmd),
    /// Guest images.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Virtual networks for VM NICs (vinfra's IPAM).
    #[command(subcommand)]
    Network(cmd::network::NetworkCmd),
    /// Shared resource tables of a host: entries every device reads, one device at a
    /// time writes.
    #[command(subcommand)]
    ResourceTable(cmd::resource_table::ResourceTableCmd),
    /// API tokens: mint (with a lifetime and scope), list, revoke.
    #[command(subcommand)]
    Token(cmd::token::TokenCmd),
    /// Terminals: clients that operate one VM by signed operation messages.
    #[command(subcommand)]
    Terminal(cmd::terminal::TerminalCmd),
    /// Serve a disk through a block cache over NBD (like qemu-nbd).
    #[command(subcommand)]
    Nbd(cmd::nbd::NbdCmd),
    /// One operator's MEC V2X service (multi-operator C-V2X).
    #[command(subcommand)]
    Mec(cmd::v2x::MecCmd),
    /// A MEC's V2X API: device subscriptions, links, the PC5 gate; a device's authorization.
    V2x(cmd::v2x::V2xArgs),
    /// Benchmarks, each printed side by side with its baseline.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
    /// Print the OpenAPI document of the REST API.
    Openapi,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.command);
    // The resource-table bench's device child runs on this thread alone: its kill -9
    // row would otherwise also time the exit of the async runtime's worker threads.
    if let Command::Bench(cmd::bench::BenchCmd::Shm(args)) = &cli.command {
        if args.device_child.is_some() {
            return match cmd::bench::shm::run(args) {
                Ok(_) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        if cli.exit_with_stdin {
            tokio::select! {
                r = dispatch(cli) => r,
                _ = lifeline::parent_gone() => {
                    tracing::warn!("parent process went away; exiting");
                    Ok(())
                }
            }
        } else {
            dispatch(cli).await
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(command: &Command) {
    // Daemons log at info; CLI commands stay quiet unless RUST_LOG says otherwise.
    let default = match command {
        Command::Server(_)
        | Command::Agent(_)
        | Command::Up(_)
        | Command::Nbd(_)
        | Command::Mec(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let ctx = cmd::Ctx {
        server: cli.server,
        token: cli.token,
        ca_file: cli.ca_file,
        format: cli.output,
    };
    match cli.command {
        Command::Up(a) => cmd::up::run(a).await,
        Command::Server(a) => cmd::server::run(a).await,
        Command::Agent(a) => cmd::agent::run(a, ctx.server.clone(), ctx.token.clone()).await,
        Command::Host(c) => cmd::host::run(&ctx, c).await,
        Command::Vm(c) => cmd::vm::run(&ctx, c).await,
        Command::Image(c) => cmd::image::run(&ctx, c).await,
        Command::Network(c) => cmd::network::run(&ctx, c).await,
        Command::ResourceTable(c) => cmd::resource_table::run(&ctx, c).await,
        Command::Token(c) => cmd::token::run(&ctx, c).await,
        Command::Terminal(c) => cmd::terminal::run(&ctx, c).await,
        Command::Migration(c) => cmd::migration::run(&ctx, c).await,
        Command::Operation(c) => cmd::operation::run(&ctx, c).await,
        Command::Traffic(c) => cmd::traffic::run(&ctx, c).await,
        Command::Storage(c) => cmd::storage::run(&ctx, c).await,
        Command::Placement(c) => cmd::storage::run_placement(&ctx, c).await,
        Command::Nbd(c) => cmd::nbd::run(c).await,
        Command::Vnfd(c) => cmd::nfv::run_vnfd(&ctx, c).await,
        Command::Nsd(c) => cmd::nfv::run_nsd(&ctx, c).await,
        Command::Ns(c) => cmd::nfv::run_ns(&ctx, c).await,
        Command::Slice(c) => cmd::slice::run(&ctx, c).await,
        Command::Ledger(c) => cmd::slice::run_ledger(&ctx, c).await,
        Command::Mec(c) => cmd::v2x::run_mec(c).await,
        Command::V2x(a) => cmd::v2x::run(a, ctx.format).await,
        Command::Bench(c) => cmd::bench::run(c, ctx.format).await,
        Command::Openapi => {
            println!("{}", api::openapi_json());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    /// The API contract is committed (`openapi/vinfra.json`) so that a change to it shows
    /// in review; this fails when the code and the file drift apart.
    #[test]
    fn committed_openapi_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/vinfra.json");
        let committed = std::fs::read_to_string(path).expect("openapi/vinfra.json exists");
        assert!(
            committed.trim_end() == api::openapi_json().trim_end(),
            "the API changed: run `cargo run -- openapi > openapi/vinfra.json` and commit it"
        );
    }

    /// Clap checks the whole command tree: a subcommand flag that collides with a global
    /// one (`-o`) would otherwise only panic when that subcommand is run.
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
