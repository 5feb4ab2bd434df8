//! Runs the strategies on workload variants outside the standard suite, to check that
//! the method (not the benchmark) carries over. Prints one line per workload and strategy
//! (`vinfra bench migrate-cache` renders the standard suite as a full table).
use cache::bench::{run_bench, BenchOptions, WorkloadSpec};
use cache::trace::SynthSpec;

fn main() {
    let mut o = BenchOptions::standard(true, None);
    let spec = |seed, iops| SynthSpec {
        seed,
        requests: 200_000,
        span_bytes: 4 << 30,
        io_size: 4096,
        iops,
    };
    o.workloads = vec![
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
        WorkloadSpec::Mixed {
            spec: spec(8, 6000),
            theta: 1.3,
            read_pct: 50,
            seq_every: 2,
            tables: 4,
            table_bytes: 128 << 20,
        },
    ];
    let trace = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/cloudphysics.csv"
    ));
    if trace.exists() {
        // The same real trace replayed 10x faster than in the standard suite.
        o.workloads.push(WorkloadSpec::Trace {
            name: "cloudphys-1000x".into(),
            path: trace,
            format: cache::trace::TraceFormat::CloudPhysics,
            speedup: 1000.0,
        });
    }
    o.strategies = vec![
        cache::Strategy::None,
        cache::Strategy::Heat,
        cache::Strategy::Pattern,
        cache::Strategy::HeatPattern,
    ];
    println!("workload      strategy        warm_s  origin_MiB  peer_MiB");
    for r in run_bench(o) {
        let warm = r
            .time_to_warm_s
            .map_or_else(|| format!(">{:.1}", r.run_s), |t| format!("{t:.1}"));
        println!(
            "{:<13} {:<13} {:>8} {:>11.1} {:>9.1}",
            r.workload,
            r.strategy,
            warm,
            r.origin_bytes as f64 / 1048576.0,
            r.peer_bytes as f64 / 1048576.0
        );
    }
}
