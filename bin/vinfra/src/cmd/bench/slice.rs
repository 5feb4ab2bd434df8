//! `vinfra bench slice`: the slice capability's numbers, each beside its baseline in
//! the same run:
//! - selection latency p50/p99 at a fixed request rate, with the slice ledger idle
//!   and while it is being appended to as fast as it goes (redb);
//! - forecast error (MAPE, MASE) of the learned Holt-Winters model against the
//!   seasonal-naive forecast on held-out windows of synthetic seasonal loads;
//! - ledger appends/s and durable-acknowledgement p50/p99 on redb and on etcd,
//!   beside raw etcd puts of the same size with the same concurrency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use store::Store;

use super::control::procs::EtcdCluster;
use super::control::quantile;

/// `vinfra bench slice` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SliceArgs {
    /// Ledger appends (and raw puts) per store.
    #[arg(long, default_value_t = 5000)]
    pub appends: usize,
    /// Appends in flight at once (the writer batches what is waiting).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Selection requests per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds of selection requests per phase.
    #[arg(long, default_value_t = 3)]
    pub seconds: u32,
}

/// One latency/throughput row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Operations per second.
    pub ops_per_s: f64,
    /// p50 latency, ms.
    pub p50_ms: f64,
    /// p99 latency, ms.
    pub p99_ms: f64,
}

/// One forecast row.
#[derive(Debug, Clone, Serialize)]
pub struct ForecastRow {
    /// The series.
    pub series: String,
    /// Holt-Winters MAPE, %.
    pub hw_mape: f64,
    /// Holt-Winters MASE.
    pub hw_mase: f64,
    /// Seasonal-naive MAPE, %.
    pub naive_mape: f64,
    /// Seasonal-naive MASE.
    pub naive_mase: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct SliceReport {
    /// Selection latency.
    pub selection: Vec<Row>,
    /// Forecast errors.
    pub forecast: Vec<ForecastRow>,
    /// Ledger appends and raw puts.
    pub ledger: Vec<Row>,
    /// Bytes per entry (and per raw put).
    pub entry_bytes: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(what: &str, mut lat: Vec<f64>, n: usize, elapsed: Duration) -> Row {
    lat.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let ops = n as f64 / elapsed.as_secs_f64().max(1e-9);
    Row {
        what: what.to_owned(),
        ops_per_s: ops,
        p50_ms: quantile(&lat, 50).unwrap_or(0.0),
        p99_ms: quantile(&lat, 99).unwrap_or(0.0),
    }
}

/// A body the size of a three-candidate association entry.
fn body(i: usize) -> Vec<u8> {
    let mut b = format!("{{\"kind\":\"bench\",\"i\":{i},\"pad\":\"").into_bytes();
    b.resize(560, b'x');
    b.extend_from_slice(b"\"}");
    b
}

/// `n` appends, `concurrency` in flight; every latency is submit → durable ack.
async fn appends(
    store: Arc<dyn Store>,
    what: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let (signer, _) = translog::Signer::generate()?;
    let log = translog::TransLog::open(
        store,
        translog::LogConfig::new("/vinfra/translog/bench/", "vinfra/bench"),
        signer,
    )
    .await?;
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = log.append(body(i)).await;
            drop(permit);
            r.map(|_| ms(t.elapsed()))
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.push(t.await??);
    }
    Ok(row(what, lat, n, start.elapsed()))
}

/// `n` raw puts of an entry's size, `concurrency` in flight.
async fn raw_puts(store: Arc<dyn Store>, n: usize, concurrency: usize) -> anyhow::Result<Row> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let value = Bytes::from(body(0));
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (store, value) = (store.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = store.put(&format!("/bench/raw/{i:020}"), value).await;
            drop(permit);
            r.map(|_| ms(t.elapsed()))
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.push(t.await??);
    }
    Ok(row("raw etcd puts (same size)", lat, n, start.elapsed()))
}

/// Selection requests at `rate`/s for `seconds`, each timed on its own.
async fn selections(
    c: &control::Control,
    what: &str,
    rate: u32,
    seconds: u32,
) -> anyhow::Result<Row> {
    let snssai = model::slices::Snssai { sst: 1, sd: None };
    let total = usize::try_from(rate * seconds).unwrap_or(usize::MAX);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for _ in 0..total {
        tick.tick().await;
        let (c, s) = (c.clone(), snssai.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            c.select_nsi(control::Scope::All, &s)
                .await
                .map(|_| ms(t.elapsed()))
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.push(t.await??);
    }
    Ok(row(what, lat, total, start.elapsed()))
}

/// Synthetic per-NSI loads, 5-minute samples over 10 days (season: a day of 288): a
/// daily wave, a weekday/weekend level, a slow trend, seeded noise.
fn synthetic(seed: u64, noise: f64, amplitude: f64) -> Vec<f64> {
    let mut rng = model::SplitMix64::new(seed);
    (0..288 * 10)
        .map(|t| {
            let day = (t % 288) as f64 / 288.0 * std::f64::consts::TAU;
            let weekend = if (t / 288) % 7 >= 5 { -15.0 } else { 0.0 };
            let base = 200.0 + 0.01 * t as f64 + weekend;
            base + amplitude * day.sin()
                + 0.3 * amplitude * (2.0 * day).cos()
                + noise * (rng.next_f64() - 0.5)
        })
        .collect()
}

fn forecasts() -> Vec<ForecastRow> {
    use control::slices::forecast::evaluate;
    let mut rows = Vec::new();
    for (name, seed, noise, amp) in [
        ("embb: strong daily wave, light noise", 1u64, 10.0, 80.0),
        ("urllc: weak wave, heavy noise", 2, 40.0, 20.0),
        ("miot: strong wave, heavy noise", 3, 40.0, 100.0),
    ] {
        let s = synthetic(seed, noise, amp);
        // Learn on 8 days, evaluate one step ahead on the 2 held-out days.
        if let Some(e) = evaluate(&s, 288, 288 * 8) {
            rows.push(ForecastRow {
                series: name.to_owned(),
                hw_mape: e.model.mape,
                hw_mase: e.model.mase,
                naive_mape: e.baseline.mape,
                naive_mase: e.baseline.mase,
            });
        }
    }
    rows
}

/// Runs the benchmark.
pub async fn run(args: &SliceArgs) -> anyhow::Result<SliceReport> {
    let dir = tempfile::Builder::new()
        .prefix("vinfra-bench-slice")
        .tempdir()?;

    // Selection, with and without a ledger being appended to, on redb.
    eprintln!(
        "[selection] redb, 3 NSIs, {} req/s for {} s per phase",
        args.rate, args.seconds
    );
    let redb: Arc<dyn Store> = Arc::new(store_redb::RedbStore::open(&dir.path().join("sel.redb"))?);
    let c = control::Control::new(redb.clone(), 6000);
    let tenant = model::TenantId::new_random();
    for (i, name) in ["a1", "a2", "a3"].iter().enumerate() {
        let v = model::slices::CreateNsi {
            name: (*name).into(),
            snssai: model::slices::Snssai { sst: 1, sd: None },
            provider: "site-a".into(),
            capacity_mbps: 1000,
            max_clients: 1000,
            ns_instance: None,
            tenant: None,
        }
        .validate()?;
        let n = c.create_nsi(tenant, v).await?;
        let mut loads = BTreeMap::new();
        #[allow(clippy::cast_precision_loss)]
        loads.insert(n.id.clone(), 100.0 * (i + 1) as f64);
        c.record_slice_loads(&loads, &control::slices::default_policy())
            .await?;
    }
    let mut selection =
        vec![selections(&c, "selection, ledger idle", args.rate, args.seconds).await?];
    let ledger = c.slice_ledger().await?.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<_> = (0..32).map(|i| ledger.append(body(i))).collect();
                for b in batch {
                    b.await?;
                    n += 1;
                }
            }
            anyhow::Ok(n)
        })
    };
    let busy = selections(&c, "selection, ledger appending", args.rate, args.seconds).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let appended = appender.await??;
    eprintln!("[selection] {appended} ledger appends ran beside it");
    selection.push(busy);

    eprintln!("[forecast] 3 synthetic series, learned on 8 days, 2 days held out");
    let forecast = forecasts();

    eprintln!(
        "[ledger] {} appends, {} in flight, on redb",
        args.appends, args.concurrency
    );
    let mut rows = Vec::new();
    let r: Arc<dyn Store> = Arc::new(store_redb::RedbStore::open(&dir.path().join("log.redb"))?);
    rows.push(
        appends(
            r.clone(),
            "ledger appends, redb (batched)",
            args.appends,
            args.concurrency,
        )
        .await?,
    );
    rows.push(
        appends(
            r,
            "ledger appends, redb (1 in flight)",
            args.appends.min(500),
            1,
        )
        .await?,
    );

    eprintln!("[ledger] starting a one-member etcd");
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1).await?;
    let e: Arc<dyn Store> = Arc::new(
        store_etcd::EtcdStore::connect(cluster.endpoints(), None)
            .await
            .context("cannot connect to the bench etcd")?,
    );
    rows.push(raw_puts(e.clone(), args.appends, args.concurrency).await?);
    rows.push(
        appends(
            e.clone(),
            "ledger appends, etcd (batched)",
            args.appends,
            args.concurrency,
        )
        .await?,
    );
    rows.push(
        appends(
            e,
            "ledger appends, etcd (1 in flight)",
            args.appends.min(500),
            1,
        )
        .await?,
    );
    cluster.stop().await;

    Ok(SliceReport {
        selection,
        forecast,
        ledger: rows,
        entry_bytes: body(0).len(),
    })
}

/// The report as text tables.
pub fn table(r: &SliceReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<40} {:>10} {:>9} {:>9}",
        "selection", "req/s", "p50_ms", "p99_ms"
    );
    for x in &r.selection {
        let _ = writeln!(
            s,
            "{:<40} {:>10.0} {:>9.3} {:>9.3}",
            x.what, x.ops_per_s, x.p50_ms, x.p99_ms
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<40} {:>9} {:>9} {:>11} {:>11}",
        "forecast (1 step, 2 held-out days)", "HW_MAPE%", "HW_MASE", "naive_MAPE%", "naive_MASE"
    );
    for f in &r.forecast {
        let _ = writeln!(
            s,
            "{:<40} {:>9.2} {:>9.3} {:>11.2} {:>11.3}",
            f.series, f.hw_mape, f.hw_mase, f.naive_mape, f.naive_mase
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<40} {:>10} {:>9} {:>9}   ({} B each)",
        "ledger", "ops/s", "p50_ms", "p99_ms", r.entry_bytes
    );
    for x in &r.ledger {
        let _ = writeln!(
            s,
            "{:<40} {:>10.0} {:>9.2} {:>9.2}",
            x.what, x.ops_per_s, x.p50_ms, x.p99_ms
        );
    }
    s
}
