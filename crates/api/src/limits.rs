//! Fairness between requests: a bounded pool for CPU-heavy work off the async workers,
//! and a token bucket per bearer token (or per client address without one).
//!
//! Both refuse rather than queue: a request that cannot run now gets 429 with
//! `Retry-After`, so that no client can make the others wait behind it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::{ApiError, AppState};

/// Request rate allowed per bearer token, or per client IP address for requests
/// without one: a token bucket refilled at `per_sec`, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_sec: u32,
    /// Requests that may arrive at once after a quiet period.
    pub burst: u32,
}

impl Default for RateLimit {
    /// 100 requests/s, burst 200: far above what an agent (a heartbeat and an
    /// assignment poll every 2 s) or the CLI sends, low enough that one client cannot
    /// take the server from the others.
    fn default() -> Self {
        Self {
            per_sec: 100,
            burst: 200,
        }
    }
}

/// How many buckets are kept. Beyond it, full (idle) buckets are dropped — a fresh
/// bucket is full too, so forgetting them changes nothing — and if none is idle, new
/// keys share one overflow bucket until some are: a flood of made-up tokens limits
/// itself, not the clients already known.
const MAX_BUCKETS: usize = 10_000;

/// How often the map may be swept for idle buckets when it is full: a sweep is a pass
/// over every bucket, so a flood of new keys must not trigger one per request.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A bucket's fill, in billionths of a request, so that refill is integer arithmetic.
const NANO: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// SHA-256 of the bearer token: the token itself is not kept.
    Token([u8; 32]),
    /// A client without a bearer token.
    Addr(IpAddr),
    /// New keys while the map is full.
    Overflow,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    nanos: u64,
    at: Instant,
}

/// The token buckets of every key seen recently.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: RateLimit,
    state: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    map: HashMap<Key, Bucket>,
    swept: Option<Instant>,
}

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            limit: RateLimit {
                per_sec: limit.per_sec.max(1),
                burst: limit.burst.max(1),
            },
            state: Mutex::new(Buckets {
                map: HashMap::new(),
                swept: None,
            }),
        }
    }

    fn capacity(&self) -> u64 {
        u64::from(self.limit.burst) * NANO
    }

    /// The bucket's fill at `now`.
    fn refilled(&self, b: Bucket, now: Instant) -> u64 {
        let elapsed =
            u64::try_from(now.saturating_duration_since(b.at).as_nanos()).unwrap_or(u64::MAX);
        b.nanos
            .saturating_add(elapsed.saturating_mul(u64::from(self.limit.per_sec)))
            .min(self.capacity())
    }

    /// Takes one request from `key`'s bucket, or says in how many whole seconds one
    /// will be there.
    fn take(&self, key: Key, now: Instant) -> Result<(), u64> {
        let mut st = crate::lock(&self.state);
        let key = if st.map.contains_key(&key) || st.map.len() < MAX_BUCKETS {
            key
        } else {
            if st
                .swept
                .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
            {
                st.swept = Some(now);
                let cap = self.capacity();
                st.map.retain(|_, b| self.refilled(*b, now) < cap);
            }
            if st.map.len() < MAX_BUCKETS {
                key
            } else {
                Key::Overflow
            }
        };
        let cap = self.capacity();
        let bucket = st.map.entry(key).or_insert(Bucket {
            nanos: cap,
            at: now,
        });
        let nanos = self.refilled(*bucket, now);
        bucket.at = now;
        if nanos >= NANO {
            bucket.nanos = nanos - NANO;
            Ok(())
        } else {
            bucket.nanos = nanos;
            let wait_nanos = (NANO - nanos).div_ceil(u64::from(self.limit.per_sec));
            Err(wait_nanos.div_ceil(NANO).max(1))
        }
    }
}

/// Middleware: refuses a request over its bucket with 429 and `Retry-After`, before
/// the handler (and before the token is even looked up: the bucket is keyed by the
/// token's hash). Requests without a token are limited per client address when the
/// server knows it (`serve`); in-process routers without a peer address skip that.
pub(crate) async fn rate_limit(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(limiter) = state.limiter() else {
        return next.run(req).await;
    };
    let key = match crate::extract::bearer(req.headers()) {
        Some(token) => Key::Token(Sha256::digest(token.as_bytes()).into()),
        None => match req.extensions().get::<ConnectInfo<crate::Peer>>() {
            Some(ConnectInfo(peer)) => Key::Addr(peer.addr.ip()),
            None => return next.run(req).await,
        },
    };
    match limiter.take(key, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(retry_after_secs) => {
            let who = match key {
                Key::Token(_) => "this token",
                Key::Addr(_) => "this client address",
                Key::Overflow => "new clients",
            };
            ApiError::TooManyRequests {
                reason: format!(
                    "rate limit: {who} is over {} requests/s (burst {})",
                    limiter.limit.per_sec, limiter.limit.burst
                ),
                retry_after_secs,
            }
            .into_response()
        }
    }
}

/// A fixed number of threads' worth of CPU-heavy request work (parsing and validating
/// descriptors, planning an NS), run with `spawn_blocking` so that the async workers
/// keep serving everything else. When all permits are taken the request is refused
/// (429, retry after 1 s) instead of queued: a queue would only move the starvation.
#[derive(Debug, Clone)]
pub(crate) struct CpuPool {
    permits: Arc<Semaphore>,
    size: usize,
}

impl CpuPool {
    pub(crate) fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Runs `f` on the blocking pool if a permit is free; `what` names the work in a
    /// refusal.
    pub(crate) async fn run<T, F>(&self, what: &str, f: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Err(ApiError::TooManyRequests {
                reason: format!(
                    "{what}: the server is already running {} such jobs",
                    self.size
                ),
                retry_after_secs: 1,
            });
        };
        tokio::task::spawn_blocking(move || {
            // Held until the work is done, even if the request is dropped meanwhile:
            // the thread keeps running, so it keeps its permit.
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| ApiError::internal(format!("{what} task failed"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let l = Limiter::new(RateLimit {
            per_sec: 2,
            burst: 3,
        });
        let t0 = Instant::now();
        let k = Key::Token([1; 32]);
        for _ in 0..3 {
            assert_eq!(l.take(k, t0), Ok(()));
        }
        // Empty: one request refills in 0.5 s, rounded up to 1 s.
        assert_eq!(l.take(k, t0), Err(1));
        // Another key has its own bucket.
        assert_eq!(l.take(Key::Token([2; 32]), t0), Ok(()));
        assert_eq!(l.take(k, t0 + Duration::from_millis(500)), Ok(()));
        assert_eq!(l.take(k, t0 + Duration::from_millis(600)), Err(1));
        // Refill stops at the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.take(k, later), Ok(()));
        }
        assert!(l.take(k, later).is_err());

        let slow = Limiter::new(RateLimit {
            per_sec: 1,
            burst: 1,
        });
        assert_eq!(slow.take(k, t0), Ok(()));
        assert_eq!(slow.take(k, t0 + Duration::from_millis(10)), Err(1));
    }

    #[test]
    fn map_is_bounded() {
        let l = Limiter::new(RateLimit {
            per_sec: 1,
            burst: 1,
        });
        let t0 = Instant::now();
        for i in 0..MAX_BUCKETS {
            let [a, b] = u16::try_from(i).unwrap().to_be_bytes();
            let ip = IpAddr::from([10, 0, a, b]);
            assert_eq!(l.take(Key::Addr(ip), t0), Ok(()));
        }
        // Full, none idle: newcomers share the overflow bucket.
        let newcomer = Key::Token([9; 32]);
        assert_eq!(l.take(newcomer, t0), Ok(()));
        assert_eq!(l.take(Key::Token([8; 32]), t0), Err(1));
        assert_eq!(crate::lock(&l.state).map.len(), MAX_BUCKETS + 1);
        // Once the old buckets are full again they are swept and newcomers get theirs.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(l.take(newcomer, later), Ok(()));
        assert!(crate::lock(&l.state).map.len() <= 2);
    }

    #[tokio::test]
    async fn cpu_pool_refuses_when_full() {
        let pool = CpuPool::new(1);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let p = pool.clone();
        let busy = tokio::spawn(async move { p.run("parsing", move || rx.recv().is_ok()).await });
        // Wait until the first job holds the permit.
        while pool.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let e = pool.run("parsing", || ()).await.unwrap_err();
        assert!(matches!(
            e,
            ApiError::TooManyRequests {
                retry_after_secs: 1,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "parsing: the server is already running 1 such jobs, retry after 1 s"
        );
        tx.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        assert_eq!(pool.run("parsing", || 7).await.unwrap(), 7);
    }
}
