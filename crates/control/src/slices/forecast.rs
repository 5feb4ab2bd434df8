//! Utilization inference: an online additive Holt-Winters model (level, trend,
//! seasonality) whose smoothing parameters are learned from the series by a grid
//! search on one-step errors, a seasonal-naive baseline, the error measures used
//! to compare them on held-out windows (MAPE, MASE), and the allocation of
//! resource subsets from the forecasts with costs of under- and over-provisioning.
//!
//! Pure: no clock, no I/O, deterministic, so that an auditor recomputes every
//! logged allocation bit for bit from its logged inputs.

use serde::{Deserialize, Serialize};

/// Holt-Winters smoothing parameters and season length (in samples).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HwParams {
    /// Level smoothing, 0..1.
    pub alpha: f64,
    /// Trend smoothing, 0..1.
    pub beta: f64,
    /// Seasonal smoothing, 0..1.
    pub gamma: f64,
    /// Samples per season (at least 2).
    pub season: usize,
}

/// An additive Holt-Winters model, updated one sample at a time.
#[derive(Clone, Debug)]
pub struct HoltWinters {
    p: HwParams,
    level: f64,
    trend: f64,
    seasonal: Vec<f64>,
    /// Samples seen.
    n: usize,
    /// The first season, kept until the model initializes from it.
    warmup: Vec<f64>,
}

impl HoltWinters {
    /// A model with `p`; it forecasts once it has seen one full season.
    pub fn new(p: HwParams) -> Self {
        let season = p.season.max(2);
        Self {
            p: HwParams { season, ..p },
            level: 0.0,
            trend: 0.0,
            seasonal: vec![0.0; season],
            n: 0,
            warmup: Vec::with_capacity(season),
        }
    }

    /// Takes the next sample.
    pub fn update(&mut self, y: f64) {
        let m = self.p.season;
        if self.n < m {
            self.warmup.push(y);
            self.n += 1;
            if self.n == m {
                self.level = self.warmup.iter().sum::<f64>() / m as f64;
                for (s, v) in self.seasonal.iter_mut().zip(&self.warmup) {
                    *s = v - self.level;
                }
            }
            return;
        }
        let i = self.n % m;
        let HwParams {
            alpha, beta, gamma, ..
        } = self.p;
        let prev = self.level;
        self.level = alpha * (y - self.seasonal[i]) + (1.0 - alpha) * (self.level + self.trend);
        self.trend = beta * (self.level - prev) + (1.0 - beta) * self.trend;
        self.seasonal[i] = gamma * (y - self.level) + (1.0 - gamma) * self.seasonal[i];
        self.n += 1;
    }

    /// The forecast `h >= 1` samples ahead, once a season was seen.
    pub fn forecast(&self, h: usize) -> Option<f64> {
        let m = self.p.season;
        if self.n < m || h == 0 {
            return None;
        }
        let i = (self.n + h - 1) % m;
        Some(self.level + h as f64 * self.trend + self.seasonal[i])
    }
}

/// The seasonal-naive forecast `h` samples after the end of `history`: the value
/// one season earlier.
pub fn seasonal_naive(history: &[f64], season: usize, h: usize) -> Option<f64> {
    let m = season.max(1);
    let back = m * h.div_ceil(m);
    let n = history.len();
    (n >= back && h > 0).then(|| history[n + h - 1 - back])
}

/// One-step-ahead forecasts of `series` from index `from` on, by a model fed
/// every earlier sample.
pub fn one_step_hw(series: &[f64], p: HwParams, from: usize) -> Vec<Option<f64>> {
    let mut hw = HoltWinters::new(p);
    let mut out = Vec::with_capacity(series.len().saturating_sub(from));
    for (t, &y) in series.iter().enumerate() {
        if t >= from {
            out.push(hw.forecast(1));
        }
        hw.update(y);
    }
    out
}

/// The grid the parameters are learned on.
const GRID: [f64; 5] = [0.05, 0.2, 0.4, 0.6, 0.8];

/// Learns Holt-Winters parameters on `train` (lowest sum of squared one-step
/// errors over the grid); `None` before two seasons of data.
pub fn fit(train: &[f64], season: usize) -> Option<HwParams> {
    if train.len() < 2 * season.max(2) {
        return None;
    }
    let mut best: Option<(f64, HwParams)> = None;
    for &alpha in &GRID {
        for &beta in &GRID[..3] {
            for &gamma in &GRID {
                let p = HwParams {
                    alpha,
                    beta,
                    gamma,
                    season,
                };
                let sse: f64 = one_step_hw(train, p, season)
                    .iter()
                    .zip(&train[season..])
                    .filter_map(|(f, y)| f.map(|f| (f - y) * (f - y)))
                    .sum();
                if best.is_none_or(|(b, _)| sse < b) {
                    best = Some((sse, p));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Forecast errors on a held-out window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Errors {
    /// Mean absolute percentage error (points with |y| below 1e-9 are skipped).
    pub mape: f64,
    /// Mean absolute scaled error: MAE over the in-sample MAE of the seasonal-naive
    /// forecast on the training window (Hyndman & Koehler 2006).
    pub mase: f64,
}

/// Errors of `forecasts` against `actual`, scaled by the seasonal-naive in-sample
/// MAE of `train`.
pub fn errors(actual: &[f64], forecasts: &[f64], train: &[f64], season: usize) -> Option<Errors> {
    let pairs: Vec<(f64, f64)> = actual
        .iter()
        .copied()
        .zip(forecasts.iter().copied())
        .collect();
    if pairs.is_empty() || train.len() <= season {
        return None;
    }
    let mae = pairs.iter().map(|(y, f)| (y - f).abs()).sum::<f64>() / pairs.len() as f64;
    let pct: Vec<f64> = pairs
        .iter()
        .filter(|(y, _)| y.abs() > 1e-9)
        .map(|(y, f)| ((y - f) / y).abs())
        .collect();
    let mape = if pct.is_empty() {
        0.0
    } else {
        100.0 * pct.iter().sum::<f64>() / pct.len() as f64
    };
    let scale = train
        .windows(season + 1)
        .map(|w| (w[season] - w[0]).abs())
        .sum::<f64>()
        / (train.len() - season) as f64;
    let mase = if scale > 0.0 {
        mae / scale
    } else {
        f64::INFINITY
    };
    Some(Errors { mape, mase })
}

/// A model's and the baseline's errors on the held-out tail of a series.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Holt-Winters with learned parameters.
    pub model: Errors,
    /// Seasonal naive.
    pub baseline: Errors,
    /// The learned parameters.
    pub params: HwParams,
}

/// Learns on `series[..split]` and compares one-step forecasts with the
/// seasonal-naive ones on `series[split..]`.
pub fn evaluate(series: &[f64], season: usize, split: usize) -> Option<Evaluation> {
    let train = series.get(..split)?;
    let test = series.get(split..)?;
    let params = fit(train, season)?;
    let hw: Vec<f64> = one_step_hw(series, params, split)
        .into_iter()
        .collect::<Option<Vec<f64>>>()?;
    let naive: Vec<f64> = (split..series.len())
        .map(|t| seasonal_naive(&series[..t], season, 1))
        .collect::<Option<Vec<f64>>>()?;
    Some(Evaluation {
        model: errors(test, &hw, train, season)?,
        baseline: errors(test, &naive, train, season)?,
        params,
    })
}

/// How allocations are made: the pool shared among NSIs, the model's season, how
/// far ahead it provisions, and the cost of one unit under- and over-provisioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocPolicy {
    /// The provider's pool, in the NSIs' load unit (Mbit/s).
    pub pool: f64,
    /// Samples per season.
    pub season: usize,
    /// Samples ahead the allocation covers (the highest forecast over them counts).
    pub horizon: usize,
    /// Cost of one unit of demand not provisioned (SLA violation).
    pub under_cost: f64,
    /// Cost of one unit provisioned and not used.
    pub over_cost: f64,
    /// The provider's CPU pool, cores, shared among the NSIs' VMs as Mbit/s are
    /// shared among their traffic (the same season, horizon and costs). Absent in
    /// allocations logged before CPU was allocated, which recompute without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pool: Option<f64>,
}

/// One NSI's CPU inputs to an allocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuInput {
    /// Capacity, cores: the vCPUs of the NSI's VMs (it never gets more).
    pub capacity: f64,
    /// CPU its VMs used per sampling period, cores, oldest first.
    pub window: Vec<f64>,
}

/// One NSI's inputs to an allocation: its recent measured loads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocInput {
    /// NSI id.
    pub nsi: String,
    /// Capacity, Mbit/s (an NSI never gets more).
    pub capacity: f64,
    /// Measured load per sampling period, oldest first.
    pub window: Vec<f64>,
    /// Its VMs' CPU, when the sampler measures them (an NSI realised by an NS
    /// instance); absent for loads reported through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuInput>,
}

/// One NSI's allocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocShare {
    /// NSI id.
    pub nsi: String,
    /// The model used: `holt-winters` or, before two seasons of data, `last-value`.
    pub model: String,
    /// The learned parameters, when Holt-Winters.
    pub params: Option<HwParams>,
    /// Highest forecast load over the horizon.
    pub forecast: f64,
    /// The safety margin added: the empirical quantile of one-step errors at the
    /// critical ratio under/(under+over) (the newsvendor solution).
    pub margin: f64,
    /// Resources allocated (after scaling to the pool).
    pub share: f64,
    /// Its CPU allocation, cores, when its inputs had CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuShare>,
}

/// One NSI's CPU allocation: the same model, margin and capping as its traffic's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuShare {
    /// `holt-winters` or `last-value`.
    pub model: String,
    /// The learned parameters, when Holt-Winters.
    pub params: Option<HwParams>,
    /// Highest forecast over the horizon, cores.
    pub forecast: f64,
    /// The safety margin added, cores.
    pub margin: f64,
    /// Cores allocated (after scaling to the CPU pool).
    pub share: f64,
}

/// One resource's provisioning: (model, params, forecast, margin, share before
/// scaling to the pool) from its window, capacity and the newsvendor ratio.
fn provision(
    window: &[f64],
    capacity: f64,
    policy: &AllocPolicy,
    ratio: f64,
) -> (String, Option<HwParams>, f64, f64, f64) {
    let (model, params, forecast, residuals) = forecast_one(window, policy);
    let margin = quantile(&residuals, ratio).max(0.0);
    let share = (forecast + margin).min(capacity).max(0.0);
    (model, params, forecast, margin, share)
}

/// Scales `shares` down alike so that they sum to at most `pool`.
fn fit_pool(shares: Vec<&mut f64>, pool: f64) {
    let total: f64 = shares.iter().map(|s| **s).sum();
    if total > pool && total > 0.0 {
        let k = pool / total;
        for s in shares {
            *s *= k;
        }
    }
}

/// Forecasts one NSI's load: (model, params, highest forecast over the horizon,
/// one-step residuals on its window).
fn forecast_one(window: &[f64], policy: &AllocPolicy) -> (String, Option<HwParams>, f64, Vec<f64>) {
    let h = policy.horizon.max(1);
    if let Some(p) = fit(window, policy.season) {
        let mut hw = HoltWinters::new(p);
        let mut residuals = Vec::new();
        for &y in window {
            if let Some(f) = hw.forecast(1) {
                residuals.push(y - f);
            }
            hw.update(y);
        }
        let f = (1..=h)
            .filter_map(|k| hw.forecast(k))
            .fold(f64::MIN, f64::max);
        return ("holt-winters".into(), Some(p), f.max(0.0), residuals);
    }
    let last = window.last().copied().unwrap_or(0.0);
    let residuals = window.windows(2).map(|w| w[1] - w[0]).collect();
    ("last-value".into(), None, last.max(0.0), residuals)
}

/// The `q` quantile (0..1) of `v` (nearest rank); 0 for an empty slice.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * (s.len() - 1) as f64).round() as usize;
    s[rank.min(s.len() - 1)]
}

/// Allocates the pool among NSIs from their forecasts: each gets its forecast plus
/// the margin that minimizes expected under- plus over-provisioning cost, capped
/// at its capacity; when the sum exceeds the pool, every share is scaled down
/// alike. Deterministic (inputs in the given order).
pub fn allocate(inputs: &[AllocInput], policy: &AllocPolicy) -> Vec<AllocShare> {
    let ratio = policy.under_cost / (policy.under_cost + policy.over_cost).max(f64::MIN_POSITIVE);
    let mut shares: Vec<AllocShare> = inputs
        .iter()
        .map(|i| {
            let (model, params, forecast, margin, share) =
                provision(&i.window, i.capacity, policy, ratio);
            let cpu = i.cpu.as_ref().map(|c| {
                let (model, params, forecast, margin, share) =
                    provision(&c.window, c.capacity, policy, ratio);
                CpuShare {
                    model,
                    params,
                    forecast,
                    margin,
                    share,
                }
            });
            AllocShare {
                nsi: i.nsi.clone(),
                model,
                params,
                forecast,
                margin,
                share,
                cpu,
            }
        })
        .collect();
    fit_pool(
        shares.iter_mut().map(|s| &mut s.share).collect(),
        policy.pool,
    );
    if let Some(pool) = policy.cpu_pool {
        fit_pool(
            shares
                .iter_mut()
                .filter_map(|s| s.cpu.as_mut().map(|c| &mut c.share))
                .collect(),
            pool,
        );
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daily-like pattern: a season of 24 samples, a slow trend, seeded noise.
    fn series(n: usize, noise: f64) -> Vec<f64> {
        let mut rng = model::SplitMix64::new(3);
        (0..n)
            .map(|t| {
                let s = (t % 24) as f64 / 24.0 * std::f64::consts::TAU;
                100.0 + 0.2 * t as f64 + 40.0 * s.sin() + noise * (rng.next_f64() - 0.5)
            })
            .collect()
    }

    #[test]
    fn holt_winters_learns_a_seasonal_series_better_than_seasonal_naive() {
        let s = series(24 * 10, 10.0);
        let e = evaluate(&s, 24, 24 * 8).unwrap();
        assert!(e.model.mase < e.baseline.mase, "{e:?}");
        assert!(e.model.mape < 10.0, "{e:?}");
    }

    #[test]
    fn seasonal_naive_repeats_the_last_season() {
        let h: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(seasonal_naive(&h, 4, 1), Some(6.0));
        assert_eq!(seasonal_naive(&h, 4, 4), Some(9.0));
        assert_eq!(seasonal_naive(&h, 4, 5), Some(6.0));
        assert_eq!(seasonal_naive(&h[..3], 4, 1), None);
    }

    #[test]
    fn allocation_is_deterministic_capped_and_fits_the_pool() {
        let busy = AllocInput {
            nsi: "a".into(),
            capacity: 500.0,
            window: series(24 * 3, 5.0),
            cpu: None,
        };
        let idle = AllocInput {
            nsi: "b".into(),
            capacity: 500.0,
            window: vec![1.0; 10],
            cpu: None,
        };
        let mut policy = AllocPolicy {
            pool: 1000.0,
            season: 24,
            horizon: 2,
            under_cost: 4.0,
            over_cost: 1.0,
            cpu_pool: None,
        };
        let a = allocate(&[busy.clone(), idle.clone()], &policy);
        assert_eq!(a, allocate(&[busy.clone(), idle.clone()], &policy));
        assert_eq!(a[0].model, "holt-winters");
        assert_eq!(a[1].model, "last-value");
        assert!(a[0].share > a[1].share);
        assert!(a[0].share >= a[0].forecast);
        policy.pool = 50.0;
        let b = allocate(&[busy, idle], &policy);
        let total: f64 = b.iter().map(|s| s.share).sum();
        assert!((total - 50.0).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn cpu_is_forecast_capped_at_the_vcpus_and_fits_its_own_pool() {
        let input = |nsi: &str, cores: f64, vcpus: f64| AllocInput {
            nsi: nsi.into(),
            capacity: 100.0,
            window: vec![1.0; 6],
            cpu: Some(CpuInput {
                capacity: vcpus,
                window: vec![cores; 6],
            }),
        };
        let mut policy = AllocPolicy {
            pool: 1000.0,
            season: 24,
            horizon: 2,
            under_cost: 4.0,
            over_cost: 1.0,
            cpu_pool: Some(8.0),
        };
        let a = allocate(&[input("a", 1.5, 4.0), input("b", 6.0, 4.0)], &policy);
        let (ca, cb) = (a[0].cpu.clone().unwrap(), a[1].cpu.clone().unwrap());
        assert_eq!((ca.forecast, ca.share), (1.5, 1.5));
        // b wants 6 cores but has 4 vCPUs.
        assert_eq!((cb.forecast, cb.share), (6.0, 4.0));
        // Traffic is allocated as without CPU.
        assert_eq!(a[0].share, 1.0);
        // A CPU pool of 2.75 cores: both scaled by half.
        policy.cpu_pool = Some(2.75);
        let b = allocate(&[input("a", 1.5, 4.0), input("b", 6.0, 4.0)], &policy);
        let shares: Vec<f64> = b.iter().map(|s| s.cpu.as_ref().unwrap().share).collect();
        assert_eq!(shares, vec![0.75, 2.0]);
    }

    #[test]
    fn allocations_without_cpu_serialize_as_before_cpu_was_allocated() {
        // The shape of an allocation logged before CPU existed: it must parse and
        // recompute to the same text, or old ledger entries would fail the audit.
        let policy: AllocPolicy = serde_json::from_str(
            r#"{"pool":10000.0,"season":12,"horizon":2,"under_cost":4.0,"over_cost":1.0}"#,
        )
        .unwrap();
        let input: AllocInput =
            serde_json::from_str(r#"{"nsi":"x","capacity":100.0,"window":[1.5,2.5]}"#).unwrap();
        let out = serde_json::to_string(&allocate(&[input], &policy)).unwrap();
        assert_eq!(
            out,
            r#"[{"nsi":"x","model":"last-value","params":null,"forecast":2.5,"margin":1.0,"share":3.5}]"#
        );
        assert!(!serde_json::to_string(&policy).unwrap().contains("cpu"));
    }
}
