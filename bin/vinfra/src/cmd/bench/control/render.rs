//! Rendering of `vinfra bench control`: one column per setup, a row per metric; then
//! the failover times. The measurement is in the parent module.

use std::fmt::Write as _;

use super::{ApiOp, ApiRow, ControlReport, Failover, Setup, Spread};

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn secs(ms: f64) -> String {
    format!("{:.2} s", ms / 1e3)
}

fn load(l: Option<[f64; 3]>) -> String {
    l.map_or_else(
        || "unknown".to_owned(),
        |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
    )
}

/// Rows of cells as aligned text: the first `left` columns left-aligned (headings), the
/// others right-aligned (numbers).
fn grid(rows: &[Vec<String>], left: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[0]);
            } else if c < left {
                let _ = write!(line, "  {cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The report as text.
pub fn control_table(r: &ControlReport) -> String {
    let e = &r.environment;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "vinfra bench control: {} concurrent clients, {} operations per cell; rate limiting off \
         on every server (--rate-limit 0: the default 100/s per token would cap the numbers)",
        r.clients, r.ops
    );
    let _ = writeln!(
        s,
        "environment: {} cores, load {} before and {} after (1/5/15 min); etcd {} \
         (3 members, default timing); data on {}; vinfra {} build",
        e.cores,
        load(e.load_before),
        load(e.load_after),
        e.etcd,
        e.data_fs,
        e.build
    );
    let _ = writeln!(
        s,
        "every process (etcd members, servers, clients) runs on this machine over loopback; \
         hosts are registered through the API and no agent runs, so VMs stay pending"
    );
    s.push('\n');
    s.push_str(&api_grid(&r.api));
    for a in r.api.iter().filter(|a| a.errors > 0) {
        let _ = writeln!(
            s,
            "{} on {}: {} failed, the first with: {}",
            a.op.label(),
            a.setup.label(),
            a.errors,
            a.first_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(f) = &r.failover {
        s.push('\n');
        s.push_str(&failover_table(f));
    }
    s
}

/// A row heading and how a cell of that row is printed.
type Metric = (&'static str, fn(&ApiRow) -> String);

fn api_grid(rows: &[ApiRow]) -> String {
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|st| rows.iter().any(|r| r.setup == *st))
        .collect();
    let mut cells = vec![std::iter::once(String::new())
        .chain(std::iter::once(String::new()))
        .chain(setups.iter().map(|st| st.label().to_owned()))
        .collect::<Vec<_>>()];
    for op in [ApiOp::VmCreate, ApiOp::VmList] {
        let find = |st: Setup| rows.iter().find(|r| r.setup == st && r.op == op);
        let mut metrics: Vec<Metric> = vec![
            ("ops/s", |r| format!("{:.0}", r.ops_per_s)),
            ("p50 ms", |r| ms(r.p50_ms)),
            ("p99 ms", |r| ms(r.p99_ms)),
            ("ok / failed", |r| format!("{} / {}", r.ok, r.errors)),
        ];
        if op == ApiOp::VmList {
            metrics.push(("VMs per list", |r| {
                r.vms_per_list
                    .map_or_else(|| "-".to_owned(), |n| n.to_string())
            }));
        }
        for (i, (name, f)) in metrics.iter().enumerate() {
            let mut row = vec![
                if i == 0 { op.label() } else { "" }.to_owned(),
                (*name).to_owned(),
            ];
            row.extend(
                setups
                    .iter()
                    .map(|st| find(*st).map_or_else(|| "-".to_owned(), f)),
            );
            cells.push(row);
        }
    }
    grid(&cells, 2)
}

/// The failover part.
pub fn failover_table(f: &Failover) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "leader failover: {} servers on etcd x3, election lease {} s, {} x SIGKILL of the \
         leading server",
        f.servers,
        f.lease_s,
        f.rounds.len()
    );
    let mut cells = vec![vec![
        String::new(),
        "min".to_owned(),
        "median".to_owned(),
        "max".to_owned(),
    ]];
    for (name, sp) in [
        ("kill -> another server leads", f.leads_ms),
        ("kill -> first drain step", f.first_step_ms),
        ("kill -> drained host empty", f.drained_ms),
    ] {
        let mut row = vec![name.to_owned()];
        match sp {
            Some(Spread { min, median, max }) => {
                row.extend([secs(min), secs(median), secs(max)]);
            }
            None => row.extend(["-", "-", "-"].map(str::to_owned)),
        }
        cells.push(row);
    }
    s.push_str(&grid(&cells, 1));
    let _ = writeln!(
        s,
        "first drain step: the new leader's first write to a drain session that was entered \
         on a surviving server right after the kill (the killed leader never saw it): the \
         session leaves `entering`; its host holds one stopped VM, which moves cold"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Environment, FailoverRound};
    use super::*;

    fn row(setup: Setup, op: ApiOp, ops_per_s: f64) -> ApiRow {
        ApiRow {
            setup,
            op,
            servers: 1,
            clients: 8,
            ok: 300,
            errors: 0,
            first_error: None,
            secs: 1.0,
            ops_per_s,
            p50_ms: Some(4.0),
            p99_ms: Some(19.0),
            vms_per_list: (op == ApiOp::VmList).then_some(300),
        }
    }

    fn report(failover: Option<Failover>) -> ControlReport {
        let mut api = Vec::new();
        for st in Setup::ALL {
            api.push(row(st, ApiOp::VmCreate, 120.0));
            api.push(row(st, ApiOp::VmList, 95.4));
        }
        api[1].errors = 2;
        api[1].first_error = Some("503 no leader".into());
        ControlReport {
            environment: Environment {
                cores: 2,
                load_before: Some([1.0, 2.0, 3.0]),
                load_after: None,
                etcd: "3.4.23".into(),
                data_fs: "ext4 (/)".into(),
                build: "release",
            },
            clients: 8,
            ops: 300,
            rate_limit: "off",
            api,
            failover,
        }
    }

    #[test]
    fn every_setup_is_a_column_and_every_metric_a_row() {
        let t = control_table(&report(None));
        let head = t
            .lines()
            .find(|l| l.contains("1 server, redb"))
            .expect("a heading line");
        let (a, b) = (
            head.find("1 server, etcd x3").unwrap(),
            head.find("3 servers, etcd x3").unwrap(),
        );
        assert!(head.find("1 server, redb").unwrap() < a && a < b, "{head}");
        let create = t.lines().find(|l| l.starts_with("VM create")).unwrap();
        assert!(
            create.contains("ops/s") && create.matches("120").count() == 3,
            "{create}"
        );
        assert!(t.contains("p99 ms") && t.contains("19.0") && t.contains("4.0"));
        assert!(t.contains("300 / 2"), "{t}");
        let listed = t.lines().find(|l| l.contains("VMs per list")).unwrap();
        assert_eq!(listed.matches("300").count(), 3, "{listed}");
        assert!(t.contains("VM list on 1 server, redb: 2 failed, the first with: 503 no leader"));
        assert!(t.contains("rate limiting off") && t.contains("2 cores"));
        assert!(!t.contains("leader failover"));
    }

    #[test]
    fn failover_shows_min_median_max() {
        let rounds = vec![FailoverRound {
            killed: "bench-s0".into(),
            new_leader: "bench-s1".into(),
            leads_ms: 1620.0,
            first_step_ms: 1700.0,
            drained_ms: 2010.0,
        }];
        let f = Failover {
            servers: 3,
            lease_s: 2,
            leads_ms: Spread::of(&[1620.0]),
            first_step_ms: Spread::of(&[1700.0]),
            drained_ms: None,
            rounds,
        };
        let t = control_table(&report(Some(f)));
        let line = t
            .lines()
            .find(|l| l.starts_with("kill -> first drain step"))
            .unwrap();
        assert_eq!(line.matches("1.70 s").count(), 3, "{line}");
        assert!(t.contains("lease 2 s, 1 x SIGKILL"));
        let drained = t
            .lines()
            .find(|l| l.starts_with("kill -> drained"))
            .unwrap();
        assert!(drained.ends_with('-'), "{drained}");
    }
}
