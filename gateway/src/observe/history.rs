//! Recent traffic for the status pages: per route, requests and errors in 10-second buckets
//! over the last ten minutes plus totals since start, and a ring of the latest errors. Bounded:
//! at most [`MAX_ROUTES`] routes (the longest idle is forgotten first) and [`MAX_ERRORS`]
//! errors. Time is an argument, so the rings are tested without waiting.

use foldhash::fast::RandomState;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Width of one bucket.
pub(crate) const BUCKET: Duration = Duration::from_secs(10);
/// Buckets kept per route (60 × 10 s = the last ten minutes).
pub(crate) const BUCKETS: usize = 60;
/// Routes tracked at once; one more forgets the route idle the longest. Above any route
/// table this gateway builds in practice; it bounds memory (about 1 KiB per route) when
/// reservations churn.
pub(crate) const MAX_ROUTES: usize = 8192;
/// Errors kept in the recent-errors ring.
pub(crate) const MAX_ERRORS: usize = 100;

/// One route's counts.
#[derive(Debug, Clone)]
struct RouteRing {
    /// Per slot: the bucket number it holds and its (requests, errors).
    slots: [(u64, u32, u32); BUCKETS],
    last_bucket: u64,
    requests: u64,
    errors: u64,
}

impl RouteRing {
    fn new() -> Self {
        RouteRing {
            slots: [(u64::MAX, 0, 0); BUCKETS],
            last_bucket: 0,
            requests: 0,
            errors: 0,
        }
    }

    fn add(&mut self, bucket: u64, requests: u32, errors: u32) {
        let slot = &mut self.slots[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, 0, 0);
        }
        slot.1 = slot.1.saturating_add(requests);
        slot.2 = slot.2.saturating_add(errors);
        self.last_bucket = self.last_bucket.max(bucket);
        self.requests += u64::from(requests);
        self.errors += u64::from(errors);
    }

    /// The last [`BUCKETS`] buckets up to `now_bucket`, oldest first.
    fn series(&self, now_bucket: u64) -> (Vec<u32>, Vec<u32>) {
        let first = (now_bucket + 1).saturating_sub(BUCKETS as u64);
        (first..=now_bucket)
            .map(|b| {
                let s = self.slots[(b % BUCKETS as u64) as usize];
                if s.0 == b { (s.1, s.2) } else { (0, 0) }
            })
            .unzip()
    }
}

/// A route's recent traffic as shown on the pages.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct RouteTraffic {
    /// Seconds per bucket.
    pub interval_secs: u64,
    /// Requests (and passthrough streams) per bucket, oldest first; the last is the current.
    pub requests: Vec<u32>,
    /// Of those, 5xx answers and failures before an answer, per bucket.
    pub errors: Vec<u32>,
    pub requests_total: u64,
    pub errors_total: u64,
}

/// One recent error.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct RecentError {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The route's host, or `unknown` before a route was found.
    pub route: String,
    /// What went wrong (the `kind` label of `meshgate_errors_total`).
    pub kind: String,
}

#[derive(Debug)]
struct Inner {
    /// Route names from the configuration and reservations (never request input): foldhash.
    routes: HashMap<String, RouteRing, RandomState>,
    errors: VecDeque<RecentError>,
    /// Routes forgotten to stay within [`MAX_ROUTES`].
    evicted: u64,
}

/// Recent traffic per route and the latest errors.
#[derive(Debug)]
pub(crate) struct History {
    origin: Instant,
    inner: Mutex<Inner>,
}

impl Default for History {
    fn default() -> Self {
        History::new(Instant::now())
    }
}

impl History {
    /// Buckets count from `origin`.
    pub(crate) fn new(origin: Instant) -> Self {
        History {
            origin,
            inner: Mutex::new(Inner {
                routes: HashMap::default(),
                errors: VecDeque::with_capacity(MAX_ERRORS),
                evicted: 0,
            }),
        }
    }

    fn bucket(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_secs()) / BUCKET.as_secs()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one finished exchange on `route`; `error` when it ended in a 5xx.
    pub(crate) fn request(&self, route: &str, error: bool, now: Instant) {
        self.add(route, 1, u32::from(error), now);
    }

    /// Records a failure on `route` in the recent-errors ring (the route's error count comes
    /// from the 5xx answer that follows it); `wall` is the time shown.
    pub(crate) fn error(&self, route: &str, kind: &str, wall: SystemTime) {
        let at_ms = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut inner = self.lock();
        if inner.errors.len() == MAX_ERRORS {
            inner.errors.pop_front();
        }
        inner.errors.push_back(RecentError {
            at_ms,
            route: route.to_string(),
            kind: kind.to_string(),
        });
    }

    fn add(&self, route: &str, requests: u32, errors: u32, now: Instant) {
        let bucket = self.bucket(now);
        let mut inner = self.lock();
        if let Some(r) = inner.routes.get_mut(route) {
            r.add(bucket, requests, errors);
            return;
        }
        if inner.routes.len() >= MAX_ROUTES {
            let idle = inner
                .routes
                .iter()
                .min_by_key(|(_, r)| r.last_bucket)
                .map(|(k, _)| k.clone());
            if let Some(k) = idle {
                inner.routes.remove(&k);
                inner.evicted += 1;
            }
        }
        let mut r = RouteRing::new();
        r.add(bucket, requests, errors);
        inner.routes.insert(route.to_string(), r);
    }

    /// `route`'s recent traffic at `now` (zeros when it saw none).
    pub(crate) fn route(&self, route: &str, now: Instant) -> RouteTraffic {
        let bucket = self.bucket(now);
        let inner = self.lock();
        let ring = inner.routes.get(route);
        let (requests, errors) = ring.map_or_else(
            || (vec![0; BUCKETS], vec![0; BUCKETS]),
            |r| r.series(bucket),
        );
        // Early in the gateway's life the series is shorter than BUCKETS; pad with zeros.
        let pad = |mut v: Vec<u32>| {
            while v.len() < BUCKETS {
                v.insert(0, 0);
            }
            v
        };
        RouteTraffic {
            interval_secs: BUCKET.as_secs(),
            requests: pad(requests),
            errors: pad(errors),
            requests_total: ring.map_or(0, |r| r.requests),
            errors_total: ring.map_or(0, |r| r.errors),
        }
    }

    /// The latest errors, newest first.
    pub(crate) fn recent_errors(&self) -> Vec<RecentError> {
        self.lock().errors.iter().rev().cloned().collect()
    }

    /// Routes forgotten to stay within [`MAX_ROUTES`] since start.
    pub(crate) fn evicted(&self) -> u64 {
        self.lock().evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_roll_over_and_old_counts_age_out() {
        let t0 = Instant::now();
        let h = History::new(t0);
        h.request("a", false, t0);
        h.request("a", true, t0 + Duration::from_secs(1));
        h.request("a", false, t0 + Duration::from_secs(25));
        let now = t0 + Duration::from_secs(29);
        let r = h.route("a", now);
        assert_eq!(r.requests.len(), BUCKETS);
        assert_eq!(&r.requests[BUCKETS - 3..], &[2, 0, 1]);
        assert_eq!(&r.errors[BUCKETS - 3..], &[1, 0, 0]);
        assert_eq!((r.requests_total, r.errors_total), (3, 1));
        // Ten minutes later the early bucket has left the window; totals stay.
        let later = t0 + Duration::from_secs(10 * BUCKETS as u64 + 5);
        let r = h.route("a", later);
        assert_eq!(r.requests.iter().sum::<u32>(), 1, "{:?}", r.requests);
        assert_eq!(r.requests_total, 3);
        // A slot reused by a later bucket does not carry the old counts.
        h.request("a", false, later);
        assert_eq!(h.route("a", later).requests.iter().sum::<u32>(), 2);
    }

    #[test]
    fn routes_and_errors_stay_bounded() {
        let t0 = Instant::now();
        let h = History::new(t0);
        for i in 0..MAX_ROUTES + 3 {
            h.request(&format!("r{i}"), false, t0 + BUCKET * i as u32);
        }
        assert_eq!(h.evicted(), 3);
        // The idlest went first.
        assert_eq!(h.route("r0", t0).requests_total, 0);
        assert_eq!(
            h.route(&format!("r{}", MAX_ROUTES + 2), t0).requests_total,
            1
        );
        for i in 0..MAX_ERRORS + 5 {
            h.error("x", &format!("k{i}"), UNIX_EPOCH);
        }
        let errors = h.recent_errors();
        assert_eq!(errors.len(), MAX_ERRORS);
        assert_eq!(errors[0].kind, format!("k{}", MAX_ERRORS + 4));
    }
}
