//! The result document of `vinfra bench migrate-cache` (`--result FILE`) that the
//! dashboard's Migrations page takes and plots: per workload, one hit-ratio curve per
//! fetch strategy. A user uploads it through the page (it is theirs: a run on their
//! machine), so every figure is checked here before the server keeps it.

use serde::{Deserialize, Serialize};

/// The document's `kind`: what it is and which version of its shape.
pub const MIGRATE_CACHE_KIND: &str = "vinfra.bench.migrate-cache/v1";
/// Rows kept at most (workloads × strategies; the standard run has fewer).
pub const MAX_ROWS: usize = 64;
/// Points per curve at most (the bench thins its curves to this).
pub const MAX_POINTS: usize = 400;
/// Longest workload or strategy name.
pub const MAX_NAME: usize = 64;

/// A `vinfra bench migrate-cache` result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateCacheResult {
    /// [`MIGRATE_CACHE_KIND`].
    pub kind: String,
    /// When the bench ran, unix ms.
    pub created_at_ms: u64,
    /// `--quick` (a shorter run).
    #[serde(default)]
    pub quick: bool,
    /// One per workload and strategy.
    pub rows: Vec<MigrateCacheRow>,
}

/// One workload under one strategy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateCacheRow {
    /// The workload.
    pub workload: String,
    /// The fetch strategy (`no migration` for the twin that never moved).
    pub strategy: String,
    /// Seconds until the destination was warm; `None`: not within the run.
    #[serde(default)]
    pub time_to_warm_s: Option<f64>,
    /// Bytes read from the peer.
    #[serde(default)]
    pub peer_bytes: u64,
    /// Bytes read from the origin.
    #[serde(default)]
    pub origin_bytes: u64,
    /// Destination hit ratio over time: `[seconds since the migration started, ratio
    /// 0..=1]`, seconds not decreasing.
    pub curve: Vec<[f64; 2]>,
}

/// What is wrong with a result document; the message names the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BenchDocError(pub String);

impl MigrateCacheResult {
    /// Parses and checks a document.
    pub fn parse(text: &str) -> Result<Self, BenchDocError> {
        let doc: MigrateCacheResult = serde_json::from_str(text)
            .map_err(|e| BenchDocError(format!("doc: not a migrate-cache result: {e}")))?;
        doc.validate()?;
        Ok(doc)
    }

    /// Checks the figures: kind, counts, names, finite ratios in 0..=1, times not
    /// negative and not decreasing.
    pub fn validate(&self) -> Result<(), BenchDocError> {
        let bad = |m: String| Err(BenchDocError(format!("doc: {m}")));
        if self.kind != MIGRATE_CACHE_KIND {
            return bad(format!(
                "kind must be {MIGRATE_CACHE_KIND:?}, got {:?}",
                self.kind
            ));
        }
        if self.rows.is_empty() || self.rows.len() > MAX_ROWS {
            return bad(format!(
                "rows: must be 1 to {MAX_ROWS}, got {}",
                self.rows.len()
            ));
        }
        for (i, r) in self.rows.iter().enumerate() {
            for (what, v) in [("workload", &r.workload), ("strategy", &r.strategy)] {
                if v.is_empty() || v.chars().count() > MAX_NAME || v.chars().any(char::is_control) {
                    return bad(format!(
                        "rows[{i}].{what}: must be 1 to {MAX_NAME} printable characters"
                    ));
                }
            }
            if r.time_to_warm_s.is_some_and(|t| !t.is_finite() || t < 0.0) {
                return bad(format!(
                    "rows[{i}].time_to_warm_s: must be a number of seconds, not negative"
                ));
            }
            if r.curve.is_empty() || r.curve.len() > MAX_POINTS {
                return bad(format!(
                    "rows[{i}].curve: must have 1 to {MAX_POINTS} points, got {}",
                    r.curve.len()
                ));
            }
            let mut last = 0.0f64;
            for (j, [t, ratio]) in r.curve.iter().copied().enumerate() {
                if !t.is_finite() || t < last {
                    return bad(format!(
                        "rows[{i}].curve[{j}]: seconds must be finite and not decreasing, got {t}"
                    ));
                }
                if !ratio.is_finite() || !(0.0..=1.0).contains(&ratio) {
                    return bad(format!(
                        "rows[{i}].curve[{j}]: the hit ratio must be between 0 and 1, got {ratio}"
                    ));
                }
                last = t;
            }
        }
        Ok(())
    }

    /// The workloads, in the order of their first row.
    pub fn workloads(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !out.contains(&r.workload.as_str()) {
                out.push(&r.workload);
            }
        }
        out
    }
}

/// At most `max` points of `curve`, evenly spaced over it, the last one kept.
pub fn thin(curve: &[(f64, f64)], max: usize) -> Vec<[f64; 2]> {
    if curve.len() <= max || max < 2 {
        return curve.iter().take(max).map(|&(t, r)| [t, r]).collect();
    }
    let step = (curve.len() - 1) as f64 / (max - 1) as f64;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    (0..max)
        .map(|k| {
            let (t, r) = curve[((k as f64 * step).round() as usize).min(curve.len() - 1)];
            [t, r]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> MigrateCacheResult {
        MigrateCacheResult {
            kind: MIGRATE_CACHE_KIND.into(),
            created_at_ms: 1,
            quick: true,
            rows: vec![MigrateCacheRow {
                workload: "zipf".into(),
                strategy: "heat".into(),
                time_to_warm_s: Some(1.5),
                peer_bytes: 1,
                origin_bytes: 2,
                curve: vec![[0.0, 0.1], [1.0, 0.9]],
            }],
        }
    }

    #[test]
    fn good_documents_round_trip() {
        let text = serde_json::to_string(&doc()).unwrap();
        assert_eq!(MigrateCacheResult::parse(&text).unwrap(), doc());
    }

    #[test]
    fn bad_documents_name_what_is_wrong() {
        let err = |f: &dyn Fn(&mut MigrateCacheResult)| {
            let mut d = doc();
            f(&mut d);
            MigrateCacheResult::parse(&serde_json::to_string(&d).unwrap())
                .unwrap_err()
                .0
        };
        assert!(err(&|d| d.kind = "x".into()).starts_with("doc: kind must be"));
        assert!(err(&|d| d.rows.clear()).contains("rows: must be 1 to 64"));
        assert!(err(&|d| d.rows[0].curve[1][1] = 1.5).contains("rows[0].curve[1]: the hit ratio"));
        assert!(err(&|d| d.rows[0].curve[1][0] = -1.0).contains("not decreasing"));
        assert!(err(&|d| d.rows[0].workload = "a\u{7}".into()).contains("rows[0].workload"));
        assert!(err(&|d| d.rows[0].curve.clear()).contains("rows[0].curve: must have"));
        let e = MigrateCacheResult::parse("{\"kind\": 3}").unwrap_err().0;
        assert!(e.starts_with("doc: not a migrate-cache result"), "{e}");
        let e = MigrateCacheResult::parse("[1,2").unwrap_err().0;
        assert!(e.starts_with("doc: not a migrate-cache result"), "{e}");
    }

    #[test]
    fn thinning_keeps_both_ends() {
        let c: Vec<(f64, f64)> = (0..1000).map(|i| (f64::from(i), 0.5)).collect();
        let t = thin(&c, 100);
        assert_eq!(t.len(), 100);
        assert_eq!(t[0][0], 0.0);
        assert_eq!(t[99][0], 999.0);
        assert_eq!(thin(&c[..3], 100).len(), 3);
    }
}
