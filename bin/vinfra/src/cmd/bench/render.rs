//! Rendering of `vinfra bench migrate-cache`: the text tables and the SVG plot. The
//! measurements (the simulation and the real-stack run) are in `cache::bench` and
//! `cache::bench_nbd`; only their presentation lives here.

use std::fmt::Write as _;

use cache::bench::{BenchRow, SMOOTH};
use cache::bench_nbd::NbdBenchRow;
use cache::Strategy;

fn mib(b: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let m = b as f64 / (1024.0 * 1024.0);
    m
}

/// The simulation's rows as an aligned text table.
pub fn migrate_table(rows: &[BenchRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<13} {:<20} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "workload",
        "strategy",
        "pen_miss",
        "pen_10s",
        "pen_stl_s",
        "pen_warm",
        "warm_s",
        "switch_s",
        "miss_10s",
        "origin_MiB",
        "excess_MiB",
        "peer_MiB",
        "p50_us",
        "p99_us"
    );
    for r in rows {
        let warm = r
            .time_to_warm_s
            .map_or_else(|| format!(">{:.1}", r.run_s), |t| format!("{t:.1}"));
        let _ = writeln!(
            s,
            "{:<13} {:<20} {:>9} {:>8} {:>9.2} {:>9.1} {:>8} {:>9.2} {:>9} {:>11.1} {:>11.1} {:>9.1} {:>9.0} {:>9.0}",
            r.workload,
            r.strategy,
            r.penalty_misses,
            r.penalty_misses_10s,
            r.penalty_stall_s,
            r.penalty_warm_s,
            warm,
            r.switchover_s,
            r.misses_first_10s,
            mib(r.origin_bytes),
            mib(r.origin_bytes.saturating_sub(r.twin_origin_bytes)),
            mib(r.peer_bytes),
            r.read_p50_us,
            r.read_p99_us
        );
    }
    s
}

const COLORS: [&str; 8] = [
    "#888888", "#b07aa1", "#9c755f", "#edc948", "#4e79a7", "#59a14f", "#e15759", "#000000",
];

/// An SVG of destination hit ratio over time, one curve per strategy (the twin dashed),
/// one panel per workload.
pub fn migrate_svg(rows: &[BenchRow]) -> String {
    let mut workloads: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    let (pw, ph, ml, mt) = (720.0, 260.0, 60.0, 40.0);
    #[allow(clippy::cast_precision_loss)]
    let height = mt + workloads.len() as f64 * (ph + 70.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = ml + pw + 170.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="20" font-size="15">Destination cache hit ratio after migration</text>"#
    );
    for (wi, wl) in workloads.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let top = mt + wi as f64 * (ph + 70.0);
        let mine: Vec<&BenchRow> = rows.iter().filter(|r| r.workload == *wl).collect();
        let run = mine
            .iter()
            .flat_map(|r| r.curve.iter().chain(&r.twin_curve))
            .map(|p| p.0)
            .fold(1.0f64, f64::max);
        // Zoom on the warm-up: twice the slowest strategy that got warm, at least 5 s.
        let slowest = mine
            .iter()
            .filter_map(|r| r.time_to_warm_s)
            .fold(0.0f64, f64::max);
        // A bursty trace may pack its first intervals into a moment: show at least 60.
        let sixty = mine
            .first()
            .and_then(|r| r.twin_curve.get(59))
            .map_or(run, |p| p.0);
        let tmax = (2.0 * slowest).max(5.0).max(sixty).min(run);
        let x = |t: f64| ml + t / tmax * pw;
        let y = |v: f64| top + ph - v.clamp(0.0, 1.0) * ph;
        let _ = writeln!(
            s,
            r#"<text x="{ml}" y="{}" font-weight="bold">{wl}</text>"#,
            top - 6.0
        );
        let _ = writeln!(
            s,
            r##"<rect x="{ml}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        for k in 0..=4 {
            let v = f64::from(k) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{ml}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.2}</text>"##,
                ml + pw,
                ml - 6.0,
                y(v) + 4.0,
                yy = y(v)
            );
            let tv = tmax * v;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{tv:.1}s</text>"#,
                x(tv),
                top + ph + 16.0
            );
        }
        // Mean over SMOOTH intervals, the same smoothing the warm metric uses.
        let poly = |pts: &[(f64, f64)]| {
            pts.windows(SMOOTH.min(pts.len()).max(1))
                .map(|w| {
                    #[allow(clippy::cast_precision_loss)]
                    let mean = w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64;
                    (w[w.len() - 1].0, mean)
                })
                .take_while(|(t, _)| *t <= tmax)
                .map(|(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (i, r) in mine.iter().enumerate() {
            // Pre-copy rows (`STRATEGY+precopy`) get colours of their own.
            let c = match r.strategy.as_str() {
                "heat+precopy" => "#f28e2b",
                "heat+pattern+precopy" => "#17becf",
                name => {
                    COLORS[Strategy::ALL
                        .iter()
                        .position(|st| st.name() == name)
                        .unwrap_or(7)
                        % COLORS.len()]
                }
            };
            let wdt = if r.strategy == Strategy::HeatPattern.name() {
                2.5
            } else {
                1.5
            };
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="{wdt}"/>"#,
                poly(&r.curve)
            );
            #[allow(clippy::cast_precision_loss)]
            let ly = top + 32.0 + i as f64 * 18.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="{wdt}"/><text x="{}" y="{}">{}</text>"#,
                ml + pw + 12.0,
                ml + pw + 32.0,
                ml + pw + 38.0,
                ly + 4.0,
                r.strategy
            );
        }
        if let Some(r) = mine.first() {
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#000" stroke-dasharray="5,4" stroke-width="1"/>"##,
                poly(&r.twin_curve)
            );
            let _ = writeln!(
                s,
                r##"<line x1="{}" x2="{}" y1="{ty}" y2="{ty}" stroke="#000" stroke-dasharray="5,4"/><text x="{}" y="{}">twin (never moved)</text>"##,
                ml + pw + 12.0,
                ml + pw + 32.0,
                ml + pw + 38.0,
                top + 14.0,
                ty = top + 10.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The real-stack rows (`--real`) as an aligned text table.
pub fn real_table(rows: &[NbdBenchRow]) -> String {
    let mut out = format!(
        "{:<10} {:<13} {:>8} {:>9} {:>9} {:>11} {:>9} {:>8} {:>8} {:>9}\n",
        "workload",
        "strategy",
        "warm_s",
        "switch_s",
        "miss_10s",
        "origin_MiB",
        "peer_MiB",
        "p50_us",
        "p99_us",
        "replay_s"
    );
    for r in rows {
        let warm = r
            .time_to_warm_s
            .map_or(">run".to_owned(), |w| format!("{w:.2}"));
        out.push_str(&format!(
            "{:<10} {:<13} {:>8} {:>9.2} {:>9} {:>11.1} {:>9.1} {:>8} {:>8} {:>9.2}\n",
            r.workload,
            r.strategy,
            warm,
            r.switchover_s,
            r.misses_first_10s,
            mib(r.origin_bytes),
            mib(r.peer_bytes),
            r.read_p50_us,
            r.read_p99_us,
            r.replay_s
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use cache::bench::{run_bench, BenchOptions, WorkloadSpec};
    use cache::trace::SynthSpec;

    use super::*;

    #[test]
    fn table_and_plot_cover_every_strategy() {
        let mut o = BenchOptions::standard(true, None);
        o.workloads = vec![WorkloadSpec::Mixed {
            spec: SynthSpec {
                seed: 3,
                requests: 10_000,
                span_bytes: 512 << 20,
                io_size: 4096,
                iops: 4000,
            },
            theta: 1.0,
            read_pct: 70,
            seq_every: 4,
            tables: 4,
            table_bytes: 16 << 20,
        }];
        o.cache_blocks = 1024;
        o.memory_copy_s = 0.25;
        let precopy = o.precopy.len();
        let rows = run_bench(o).unwrap();
        let table = migrate_table(&rows);
        assert_eq!(table.lines().count(), 1 + Strategy::ALL.len() + precopy);
        assert!(table.contains("heat+pattern+precopy") && table.contains("pen_miss"));
        let svg = migrate_svg(&rows);
        assert!(
            svg.starts_with("<svg")
                && svg.contains("heat+pattern")
                && svg.trim_end().ends_with("</svg>")
        );
    }
}
