//! The Debian guest's workload lines on the serial console (`scripts/build-guest-debian.sh`,
//! `/usr/local/sbin/vinfra-workload`), parsed for tests and `vinfra bench migrate-vm`.
//!
//! Console text is outside input (a guest writes it): every parser returns `None` on a line
//! it does not understand and never panics.

/// `PGBENCH progress: 12.0 s, 41.0 tps, lat 46.7 ms stddev 19.1, 0 failed` (pgbench `-P 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct PgbenchProgress {
    /// Seconds since pgbench started.
    pub t_s: f64,
    /// Transactions per second in that second.
    pub tps: f64,
    /// Mean latency in that second, ms.
    pub lat_ms: f64,
    /// Failed transactions so far.
    pub failed: u64,
}

/// `PGBENCH LAT sec=3 n=41 p50_ms=45.2 p99_ms=120.0`: latency percentiles of the
/// transactions that completed in one second of the run (from pgbench's `-l` log).
#[derive(Clone, Debug, PartialEq)]
pub struct PgbenchLatency {
    /// Second of the run, from the first transaction's completion.
    pub sec: u32,
    /// Transactions completed in it.
    pub n: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// `PGBENCH CHECK …`: the guest's consistency checks after pgbench ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgbenchCheck {
    /// pgbench's exit status.
    pub exit: i64,
    /// Transactions pgbench reports as processed.
    pub processed: u64,
    /// Transactions pgbench reports as failed.
    pub failed: u64,
    /// Rows added to `pgbench_history` during the run (one per committed transaction).
    pub history_new: u64,
    /// Rows in `pgbench_accounts`.
    pub accounts: u64,
    /// Rows `pgbench_accounts` must have at this scale (100,000 per unit).
    pub expected_accounts: u64,
    /// The sums of the account, branch and teller balances and of the history deltas are
    /// equal (each transaction adds the same delta to all four).
    pub balances_agree: bool,
    /// `amcheck`'s `bt_index_check` found the primary-key indexes consistent.
    pub amcheck_ok: bool,
}

impl PgbenchCheck {
    /// Everything a consistent database after a clean run shows.
    pub fn is_consistent(&self) -> bool {
        self.exit == 0
            && self.failed == 0
            && self.processed > 0
            && self.history_new == self.processed
            && self.accounts == self.expected_accounts
            && self.balances_agree
            && self.amcheck_ok
    }
}

/// Everything of one pgbench run found on a console.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PgbenchRun {
    /// `PGBENCH START scale=…`: the scale factor.
    pub scale: Option<u32>,
    /// Per-second progress lines, in order.
    pub progress: Vec<PgbenchProgress>,
    /// Per-second latency percentiles, in order.
    pub latency: Vec<PgbenchLatency>,
    /// `tps = …` of pgbench's summary.
    pub tps: Option<f64>,
    /// The consistency checks.
    pub check: Option<PgbenchCheck>,
    /// `PGBENCH RESULT ok` (`Ok(())`) or `PGBENCH RESULT FAIL why` (`Err(why)`).
    pub result: Option<Result<(), String>>,
}

/// The text after `PGBENCH ` on a console line (tolerating a `\r` and anything the
/// kernel printed before it on the same line).
fn pgbench_body(line: &str) -> Option<&str> {
    let i = line.find("PGBENCH ")?;
    Some(line[i + "PGBENCH ".len()..].trim_end_matches(['\r', '\n']))
}

/// `key=value` in a space-separated list.
fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Parses a `PGBENCH progress: …` line.
pub fn parse_progress(line: &str) -> Option<PgbenchProgress> {
    let body = pgbench_body(line)?.strip_prefix("progress: ")?;
    let mut t_s = None;
    let mut tps = None;
    let mut lat_ms = None;
    let mut failed = 0;
    for part in body.split(", ") {
        let w: Vec<&str> = part.split_whitespace().collect();
        match w.as_slice() {
            [t, "s"] => t_s = t.parse().ok(),
            [x, "tps"] => tps = x.parse().ok(),
            ["lat", x, "ms", ..] => lat_ms = x.parse().ok(),
            [n, "failed"] => failed = n.parse().ok()?,
            _ => {}
        }
    }
    Some(PgbenchProgress {
        t_s: t_s?,
        tps: tps?,
        lat_ms: lat_ms.unwrap_or(f64::NAN),
        failed,
    })
}

/// Parses a `PGBENCH LAT …` line.
pub fn parse_latency(line: &str) -> Option<PgbenchLatency> {
    let body = pgbench_body(line)?.strip_prefix("LAT ")?;
    Some(PgbenchLatency {
        sec: field(body, "sec")?.parse().ok()?,
        n: field(body, "n")?.parse().ok()?,
        p50_ms: field(body, "p50_ms")?.parse().ok()?,
        p99_ms: field(body, "p99_ms")?.parse().ok()?,
    })
}

/// Parses a `PGBENCH CHECK …` line.
pub fn parse_check(line: &str) -> Option<PgbenchCheck> {
    let body = pgbench_body(line)?.strip_prefix("CHECK ")?;
    let num = |k: &str| field(body, k).and_then(|v| v.parse::<u64>().ok());
    let sums: Vec<Option<&str>> = ["sum_a", "sum_b", "sum_t", "sum_h"]
        .iter()
        .map(|k| field(body, k))
        .collect();
    let balances_agree = sums.iter().all(|s| s.is_some_and(|v| !v.is_empty()))
        && sums.windows(2).all(|w| w[0] == w[1]);
    Some(PgbenchCheck {
        exit: field(body, "exit")?.parse().ok()?,
        processed: num("processed")?,
        failed: num("failed")?,
        history_new: num("history_new")?,
        accounts: num("accounts")?,
        expected_accounts: num("expected_accounts")?,
        balances_agree,
        amcheck_ok: field(body, "amcheck") == Some("ok"),
    })
}

/// Collects one pgbench run from console text (the last run if there are several).
pub fn parse_pgbench(console: &str) -> PgbenchRun {
    let mut run = PgbenchRun::default();
    for line in console.lines() {
        let Some(body) = pgbench_body(line) else {
            continue;
        };
        if let Some(rest) = body.strip_prefix("START ") {
            run = PgbenchRun {
                scale: field(rest, "scale").and_then(|s| s.parse().ok()),
                ..PgbenchRun::default()
            };
        } else if let Some(p) = parse_progress(line) {
            run.progress.push(p);
        } else if let Some(l) = parse_latency(line) {
            run.latency.push(l);
        } else if let Some(c) = parse_check(line) {
            run.check = Some(c);
        } else if let Some(r) = body.strip_prefix("RESULT ") {
            run.result = Some(match r.trim() {
                "ok" => Ok(()),
                other => Err(other
                    .strip_prefix("FAIL")
                    .unwrap_or(other)
                    .trim()
                    .to_owned()),
            });
        } else if let Some(t) = body.strip_prefix("tps = ") {
            run.tps = t.split_whitespace().next().and_then(|x| x.parse().ok());
        }
    }
    run
}

/// `FIO RESULT read_iops=… write_iops=… read_kib_s=… write_kib_s=… err=…`.
#[derive(Clone, Debug, PartialEq)]
pub struct FioResult {
    /// Read IOPS.
    pub read_iops: f64,
    /// Write IOPS.
    pub write_iops: f64,
    /// fio's error number plus its exit status (0: clean).
    pub err: u64,
}

/// Parses a `FIO RESULT …` line (not the `FIO RESULT FAIL …` one).
pub fn parse_fio(line: &str) -> Option<FioResult> {
    let i = line.find("FIO RESULT ")?;
    let body = &line[i + "FIO RESULT ".len()..];
    Some(FioResult {
        read_iops: field(body, "read_iops")?.parse().ok()?,
        write_iops: field(body, "write_iops")?.parse().ok()?,
        err: field(body, "err")?.trim_end_matches('\r').parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the guest printed them under TCG (console.log, with the tty's `\r`).
    const CONSOLE: &str = "GUEST: init started, uptime 2.08s\r
[    3.057274] systemd[1]: Failed to find module 'autofs4'\r
GUEST: READY vda=1024MiB uptime 13.41s workload=pgbench\r
PGBENCH START scale=4 clients=2 secs=20\r
PGBENCH pgbench (15.18 (Debian 15.18-0+deb12u1))\r
PGBENCH progress: 1.0 s, 30.9 tps, lat 56.175 ms stddev 37.701, 0 failed\r
PGBENCH progress: 2.0 s, 30.1 tps, lat 67.091 ms stddev 20.150, 0 failed\r
PGBENCH number of transactions actually processed: 704\r
PGBENCH number of failed transactions: 0 (0.000%)\r
PGBENCH tps = 35.374616 (without initial connection time)\r
PGBENCH LAT sec=0 n=31 p50_ms=47.4 p99_ms=181.0\r
PGBENCH LAT sec=1 n=30 p50_ms=60.2 p99_ms=99.9\r
PGBENCH CHECK exit=0 processed=704 failed=0 history_new=704 accounts=400000 expected_accounts=400000 sum_a=30792 sum_b=30792 sum_t=30792 sum_h=30792 amcheck=ok\r
PGBENCH RESULT ok\r
GUEST: WORKLOAD DONE pgbench\r
";

    #[test]
    fn a_clean_run_parses_and_is_consistent() {
        let run = parse_pgbench(CONSOLE);
        assert_eq!(run.scale, Some(4));
        assert_eq!(run.progress.len(), 2);
        assert_eq!(run.progress[1].t_s, 2.0);
        assert_eq!(run.progress[1].tps, 30.1);
        assert_eq!(run.progress[0].lat_ms, 56.175);
        assert_eq!(run.latency.len(), 2);
        assert_eq!(run.latency[0].p99_ms, 181.0);
        assert_eq!(run.tps, Some(35.374616));
        assert_eq!(run.result, Some(Ok(())));
        let c = run.check.unwrap();
        assert!(c.is_consistent(), "{c:?}");
    }

    #[test]
    fn a_lost_commit_or_a_torn_balance_is_not_consistent() {
        let lost = CONSOLE.replace("history_new=704", "history_new=703");
        assert!(!parse_pgbench(&lost).check.unwrap().is_consistent());
        let torn = CONSOLE.replace("sum_t=30792", "sum_t=30791");
        assert!(!parse_pgbench(&torn).check.unwrap().balances_agree);
        let empty = CONSOLE.replace("sum_h=30792", "sum_h=");
        assert!(!parse_pgbench(&empty).check.unwrap().balances_agree);
        let failed = CONSOLE.replace(
            "PGBENCH RESULT ok",
            "PGBENCH RESULT FAIL amcheck balance-sums",
        );
        assert_eq!(
            parse_pgbench(&failed).result,
            Some(Err("amcheck balance-sums".into()))
        );
    }

    #[test]
    fn garbage_is_ignored() {
        for l in [
            "",
            "PGBENCH ",
            "PGBENCH progress: ",
            "PGBENCH progress: x s, y tps",
            "PGBENCH LAT sec=-1 n=2 p50_ms=1 p99_ms=2",
            "PGBENCH CHECK exit=0",
            "FIO RESULT read_iops=1",
            "PGBENCH progress: 1.0 s, 2 tps, lat 3 ms stddev 1, many failed",
        ] {
            assert!(parse_progress(l).is_none(), "{l}");
            assert!(parse_latency(l).is_none(), "{l}");
            assert!(parse_check(l).is_none(), "{l}");
            assert!(parse_fio(l).is_none(), "{l}");
        }
        let r = parse_fio(
            "FIO RESULT read_iops=812.5 write_iops=350.1 read_kib_s=3250 write_kib_s=1400 err=0\r",
        )
        .unwrap();
        assert_eq!((r.read_iops, r.err), (812.5, 0));
    }
}
