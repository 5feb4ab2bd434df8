//! Runs the migration-cache benchmark and prints the table (and JSON with `--json`).
//!
//! `cargo run --release -p cache --example migrate_cache -- [--quick] [--json] [--plot FILE.svg]`

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().any(|a| a == "--json");
    let plot = args
        .iter()
        .position(|a| a == "--plot")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let trace = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/cloudphysics.csv"
    ));
    let opts = cache::bench::BenchOptions::standard(quick, trace.exists().then_some(trace));
    let rows = cache::bench::run_bench(opts);
    if json {
        println!("{}", cache::bench::to_json(&rows));
    } else {
        cache::bench::print_table(&rows);
    }
    if let Some(p) = plot {
        if let Err(e) = cache::bench::write_svg(&rows, &p) {
            eprintln!("cannot write {}: {e}", p.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
