//! Fail points for crash tests: `VINFRA_CACHE_FAILPOINT=NAME:N` makes the process abort
//! (as abruptly as `kill -9`) the N-th time it passes fail point NAME. Read once; when
//! unset, a fail point costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn armed() -> &'static Option<(String, u64)> {
    ARMED.get_or_init(|| {
        let v = std::env::var("VINFRA_CACHE_FAILPOINT").ok()?;
        let (name, n) = v.rsplit_once(':').unwrap_or((v.as_str(), "1"));
        Some((name.to_owned(), n.parse().unwrap_or(1)))
    })
}

/// Aborts the process if fail point `name` is armed and this is its N-th pass.
pub(crate) fn hit(name: &str) {
    if let Some((armed, n)) = armed() {
        if armed == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 >= *n {
            std::process::abort();
        }
    }
}
