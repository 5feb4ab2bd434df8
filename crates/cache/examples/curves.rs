//! Debug helper: prints the first hit-ratio intervals of each strategy next to the twin's.
fn main() {
    let skip: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let quick = true;
    let trace = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/traces/cloudphysics.csv"
    ));
    let mut opts = cache::bench::BenchOptions::standard(quick, Some(trace));
    if let Some(w) = std::env::args().nth(1) {
        opts.workloads.retain(|x| x.name() == w);
    }
    let rows = cache::bench::run_bench(opts).expect("workloads");
    for r in &rows {
        let c: Vec<String> = r
            .curve
            .iter()
            .skip(skip)
            .take(24)
            .map(|p| format!("{:.2}", p.1))
            .collect();
        println!("{:<12} {:<13} {}", r.workload, r.strategy, c.join(" "));
    }
    for r in rows.iter().filter(|r| r.strategy == "none") {
        let avg = r.twin_curve.iter().map(|p| p.1).sum::<f64>() / r.twin_curve.len().max(1) as f64;
        println!(
            "{} twin mean interval hit ratio {avg:.3}, intervals {}",
            r.workload,
            r.twin_curve.len()
        );
    }
    if let Some(r) = rows.first() {
        let c: Vec<String> = r
            .twin_curve
            .iter()
            .skip(skip)
            .take(24)
            .map(|p| format!("{:.2}", p.1))
            .collect();
        println!("{:<12} {:<13} {}", r.workload, "TWIN", c.join(" "));
    }
}
