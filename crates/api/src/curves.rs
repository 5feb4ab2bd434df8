//! The progress curves of recent migrations: one sample per report of the destination
//! agent, kept in memory for the dashboard's plots (the migration record holds only
//! the latest figures).

use std::collections::{HashMap, VecDeque};

use model::{Migration, MigrationId};

/// Curves kept: the most recent migrations'.
const MAX_CURVES: usize = 64;
/// Samples kept per curve (an agent reports a few times a second: minutes of warming).
const MAX_SAMPLES: usize = 4096;

/// One report's figures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProgressSample {
    /// When the server received it, unix ms.
    pub at_ms: u64,
    /// Guest reads served by the destination cache since switch-over, over all reads.
    pub hit_ratio: f64,
    /// Bytes read from the source host's cache so far.
    pub peer_bytes: u64,
    /// Bytes read from the origin so far.
    pub origin_bytes: u64,
    /// Plan entries left.
    pub left: u64,
}

/// Per migration, its samples; the oldest curve goes when a new one would exceed
/// [`MAX_CURVES`].
#[derive(Debug, Default)]
pub(crate) struct Curves {
    by_id: HashMap<MigrationId, Vec<ProgressSample>>,
    order: VecDeque<MigrationId>,
}

impl Curves {
    /// Records `m`'s progress (nothing when it has none yet) at `now`.
    pub(crate) fn record(&mut self, m: &Migration, now: u64) {
        let Some(p) = &m.progress else { return };
        if !self.by_id.contains_key(&m.id) {
            if self.order.len() >= MAX_CURVES {
                if let Some(old) = self.order.pop_front() {
                    self.by_id.remove(&old);
                }
            }
            self.order.push_back(m.id);
        }
        let samples = self.by_id.entry(m.id).or_default();
        if samples.len() >= MAX_SAMPLES {
            // Thin out rather than cut the start: the curve keeps its whole span.
            let mut i = 0;
            samples.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
        samples.push(ProgressSample {
            at_ms: now,
            hit_ratio: p.hit_ratio,
            peer_bytes: p.peer_bytes,
            origin_bytes: p.origin_bytes,
            left: p.left,
        });
    }

    pub(crate) fn get(&self, m: MigrationId) -> Vec<ProgressSample> {
        self.by_id.get(&m).cloned().unwrap_or_default()
    }
}
