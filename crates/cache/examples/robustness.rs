//! Checks the method on the standard suite and on variants outside it (so that the method,
//! not the benchmark, is what gets tuned): per workload, the migration penalty (excess
//! misses over the never-moved twin) of `none`, `heat`, `heat+pattern` and the pre-copy
//! variants, and whether `heat+pattern` keeps to at most 1/3 of `none`'s penalty and
//! within 5% of `heat`'s. `cargo run --release -p cache --example robustness [WORKLOAD]
//! [TRACE.csv]...`: trace files (format detected) are added as workloads.
use cache::bench::{run_bench, BenchOptions, BenchRow, WorkloadSpec};
use cache::trace::SynthSpec;
use cache::Strategy;

fn variants() -> Vec<WorkloadSpec> {
    let spec = |seed, iops| SynthSpec {
        seed,
        requests: 200_000,
        span_bytes: 4 << 30,
        io_size: 4096,
        iops,
    };
    vec![
        WorkloadSpec::Sequential {
            spec: SynthSpec {
                span_bytes: 768 << 20,
                io_size: 65536,
                ..spec(5, 3000)
            },
        },
        WorkloadSpec::Zipf {
            spec: spec(6, 4000),
            theta: 0.9,
        },
        WorkloadSpec::Mixed {
            spec: spec(7, 4000),
            theta: 1.1,
            read_pct: 80,
            seq_every: 8,
            tables: 32,
            table_bytes: 16 << 20,
        },
        WorkloadSpec::ScanHot {
            spec: spec(9, 3000),
            theta: 0.9,
            hot_bytes: 256 << 20,
            scan_bytes: 3 << 30,
            scan_every: 12,
        },
        WorkloadSpec::BTree {
            spec: spec(10, 5000),
            fanout: 32,
            theta: 1.1,
        },
        WorkloadSpec::Pareto {
            spec: spec(11, 4000),
            alpha: 1.5,
        },
    ]
}

fn penalty(rows: &[&BenchRow], s: &str) -> i64 {
    rows.iter()
        .find(|r| r.strategy == s)
        .map_or(0, |r| r.penalty_misses)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (files, names): (Vec<&String>, Vec<&String>) = args
        .iter()
        .partition(|a| std::path::Path::new(a.as_str()).is_file());
    let only = names.first().map(|s| (*s).clone());
    let trace = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/cloudphysics.csv"
    ));
    let strategies = vec![Strategy::None, Strategy::Heat, Strategy::HeatPattern];
    let mut o = BenchOptions::standard(true, trace.exists().then_some(trace));
    for f in files {
        let path = std::path::PathBuf::from(f);
        let format = cache::trace::detect_format(&path).expect("a trace in a known format");
        o = o.with_trace(path, format, 1.0);
    }
    let mut v = o.clone();
    v.workloads = variants();
    for opts in [&mut o, &mut v] {
        opts.strategies.clone_from(&strategies);
        if let Some(w) = &only {
            opts.workloads.retain(|x| x.name() == *w);
        }
    }
    let mut rows = run_bench(o).expect("workloads");
    rows.extend(run_bench(v).expect("workloads").into_iter().map(|mut r| {
        r.workload.push_str("-v");
        r
    }));
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8} {:>8}  h+p/none h+p/heat",
        "workload", "none", "heat", "h+p", "heat+pc", "h+p+pc"
    );
    let mut names: Vec<&str> = Vec::new();
    for r in &rows {
        if !names.contains(&r.workload.as_str()) {
            names.push(&r.workload);
        }
    }
    for w in names {
        let mine: Vec<&BenchRow> = rows.iter().filter(|r| r.workload == w).collect();
        let (none, heat, hp) = (
            penalty(&mine, "none"),
            penalty(&mine, "heat"),
            penalty(&mine, "heat+pattern"),
        );
        #[allow(clippy::cast_precision_loss)]
        let ratio = |a: i64, b: i64| a as f64 / (b.max(1)) as f64;
        let ok_none = hp * 3 <= none.max(0);
        let ok_heat = hp <= heat.max(0) + heat.max(0) / 20 + 5;
        println!(
            "{w:<14} {none:>8} {heat:>8} {hp:>8} {:>8} {:>8}  {:>7.2}{} {:>7.2}{}",
            penalty(&mine, "heat+precopy"),
            penalty(&mine, "heat+pattern+precopy"),
            ratio(hp, none),
            if ok_none { " " } else { "!" },
            ratio(hp, heat),
            if ok_heat { " " } else { "!" },
        );
    }
}
