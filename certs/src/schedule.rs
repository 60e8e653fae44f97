//! The order/renewal scheduler: a sans-IO state machine. It is told the desired certificates,
//! the certificates it has, ARI windows and order outcomes, each with `now`; [`Scheduler::poll`]
//! returns the orders to place and [`Scheduler::next_wakeup`] when to ask again.
//!
//! Invariants: at most one order in flight per certificate; a certificate that is valid and not
//! yet due is never re-ordered (a restart places no order); failures back off exponentially.

use crate::config::RenewPolicy;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    pub(crate) fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Place an order for the certificate `key`; report the outcome with
    /// [`Scheduler::order_succeeded`] or [`Scheduler::order_failed`].
    PlaceOrder { key: String },
}

#[derive(Debug, Clone, Default)]
struct Entry {
    desired: bool,
    validity: Option<Validity>,
    /// When renewal is due (2/3 of the lifetime minus jitter, or earlier per ARI).
    due: Option<SystemTime>,
    in_flight: bool,
    forced: bool,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<String>,
}

/// A read-only view of one certificate's schedule, for status reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryView {
    pub validity: Option<Validity>,
    pub due: Option<SystemTime>,
    pub in_flight: bool,
    pub failures: u32,
    pub retry_at: Option<SystemTime>,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Scheduler {
    policy: RenewPolicy,
    entries: BTreeMap<String, Entry>,
    rng: StdRng,
}

impl Scheduler {
    /// `seed` makes the jitter reproducible in tests; use a random seed in production.
    pub(crate) fn new(policy: RenewPolicy, seed: u64) -> Self {
        Scheduler {
            policy,
            entries: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Replaces the desired set. Certificates leaving it are forgotten (an order in flight
    /// finishes, its result is dropped); returns the keys that left.
    pub(crate) fn set_desired<I: IntoIterator<Item = String>>(&mut self, keys: I) -> Vec<String> {
        let wanted: std::collections::BTreeSet<String> = keys.into_iter().collect();
        let mut removed = Vec::new();
        self.entries.retain(|k, e| {
            if wanted.contains(k) {
                return true;
            }
            if e.desired {
                removed.push(k.clone());
            }
            e.desired = false;
            e.in_flight
        });
        for k in wanted {
            self.entries.entry(k).or_default().desired = true;
        }
        removed
    }

    pub(crate) fn is_desired(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|e| e.desired)
    }

    /// A certificate for `key` is in service (loaded from the store or just issued).
    pub(crate) fn cert_installed(&mut self, key: &str, validity: Validity) {
        let lifetime = validity.lifetime().as_secs_f64();
        let jitter = self.rng.random_range(0.0..=1.0) * self.policy.jitter_fraction * lifetime;
        let offset = (lifetime * self.policy.renew_at_fraction - jitter).max(0.0);
        let due = validity.not_before + Duration::from_secs_f64(offset);
        if let Some(e) = self.entries.get_mut(key) {
            e.validity = Some(validity);
            e.due = Some(due);
        }
    }

    /// The ACME server's renewal window (ARI) for `key`'s current certificate: renewal moves
    /// to a random point in the window when that is earlier than the planned time.
    pub(crate) fn renewal_window(&mut self, key: &str, start: SystemTime, end: SystemTime) {
        let span = end.duration_since(start).unwrap_or(Duration::ZERO);
        let pick = start + span.mul_f64(self.rng.random_range(0.0..=1.0));
        if let Some(e) = self.entries.get_mut(key) {
            e.due = Some(e.due.map_or(pick, |d| d.min(pick)));
        }
    }

    /// Renew `key` at the next poll, regardless of its validity (an admin request).
    pub(crate) fn force_renew(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            e.forced = true;
            e.retry_at = None;
        }
    }

    pub(crate) fn order_succeeded(&mut self, key: &str, validity: Validity) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.in_flight = false;
        e.failures = 0;
        e.retry_at = None;
        e.last_error = None;
        if !e.desired {
            self.entries.remove(key);
            return;
        }
        self.cert_installed(key, validity);
    }

    /// The order could not start because another gateway holds the lock: try again at
    /// `retry_at` (no failure is counted; the other gateway's certificate usually comes first).
    pub(crate) fn order_deferred(&mut self, key: &str, retry_at: SystemTime) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.in_flight = false;
        e.retry_at = Some(retry_at);
        if !e.desired {
            self.entries.remove(key);
        }
    }

    /// Records a failed order; returns when the next attempt is allowed.
    pub(crate) fn order_failed(&mut self, key: &str, now: SystemTime, error: String) -> SystemTime {
        let initial = self.policy.backoff_initial();
        let max = self.policy.backoff_max();
        let spread = self.rng.random_range(0.9..=1.1);
        let Some(e) = self.entries.get_mut(key) else {
            return now;
        };
        e.in_flight = false;
        e.failures = e.failures.saturating_add(1);
        e.last_error = Some(error);
        let exp = initial.saturating_mul(1u32 << (e.failures - 1).min(20));
        let delay = exp.min(max).mul_f64(spread);
        let at = now + delay;
        e.retry_at = Some(at);
        if !e.desired {
            self.entries.remove(key);
        }
        at
    }

    fn wants_order(e: &Entry, now: SystemTime) -> bool {
        if !e.desired || e.in_flight {
            return false;
        }
        if e.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        e.forced || e.validity.is_none() || e.due.is_none_or(|d| now >= d)
    }

    /// The orders to place now. Each returned key is marked in flight.
    pub(crate) fn poll(&mut self, now: SystemTime) -> Vec<Action> {
        let mut out = Vec::new();
        for (k, e) in self.entries.iter_mut() {
            if Self::wants_order(e, now) {
                e.in_flight = true;
                e.forced = false;
                out.push(Action::PlaceOrder { key: k.clone() });
            }
        }
        out
    }

    /// The earliest time a poll could return an action (`None`: nothing scheduled).
    pub(crate) fn next_wakeup(&self) -> Option<SystemTime> {
        self.entries
            .values()
            .filter(|e| e.desired && !e.in_flight)
            .map(|e| {
                let ready = if e.forced || e.validity.is_none() {
                    None
                } else {
                    e.due
                };
                match (ready, e.retry_at) {
                    (Some(d), Some(r)) => d.max(r),
                    (Some(d), None) => d,
                    (None, Some(r)) => r,
                    // Wants an order right away.
                    (None, None) => SystemTime::UNIX_EPOCH,
                }
            })
            .min()
    }

    pub(crate) fn view(&self, key: &str) -> Option<EntryView> {
        self.entries.get(key).map(|e| EntryView {
            validity: e.validity,
            due: e.due,
            in_flight: e.in_flight,
            failures: e.failures,
            retry_at: e.retry_at,
            last_error: e.last_error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    fn policy() -> RenewPolicy {
        RenewPolicy {
            backoff_initial_secs: 10.0,
            backoff_max_secs: 100.0,
            ..RenewPolicy::default()
        }
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn new_name_is_ordered_once_until_outcome() {
        let mut s = Scheduler::new(policy(), 1);
        s.set_desired(["a.test".to_string()]);
        assert_eq!(
            s.poll(t0()),
            vec![Action::PlaceOrder {
                key: "a.test".into()
            }]
        );
        // In flight: no second order, whatever the time.
        assert!(s.poll(t0() + DAY).is_empty());
        assert_eq!(s.next_wakeup(), None);
    }

    #[test]
    fn valid_cert_is_not_reordered_until_two_thirds_minus_jitter() {
        let mut s = Scheduler::new(policy(), 2);
        s.set_desired(["a.test".to_string()]);
        let v = Validity {
            not_before: t0(),
            not_after: t0() + 90 * DAY,
        };
        s.cert_installed("a.test", v);
        assert!(
            s.poll(t0() + DAY).is_empty(),
            "restart with a fresh cert orders nothing"
        );
        let due = s.view("a.test").unwrap().due.unwrap();
        let two_thirds = t0() + 60 * DAY;
        assert!(due <= two_thirds, "renewal never later than 2/3");
        assert!(
            due >= two_thirds - (90 * DAY).mul_f64(0.05),
            "jitter bounded"
        );
        assert_eq!(s.next_wakeup(), Some(due));
        assert!(s.poll(due - Duration::from_secs(1)).is_empty());
        assert_eq!(s.poll(due).len(), 1);
    }

    #[test]
    fn ari_window_pulls_renewal_earlier_only() {
        let mut s = Scheduler::new(policy(), 3);
        s.set_desired(["a.test".to_string()]);
        let v = Validity {
            not_before: t0(),
            not_after: t0() + 90 * DAY,
        };
        s.cert_installed("a.test", v);
        let planned = s.view("a.test").unwrap().due.unwrap();
        // A window after the planned time changes nothing.
        s.renewal_window("a.test", t0() + 80 * DAY, t0() + 81 * DAY);
        assert_eq!(s.view("a.test").unwrap().due, Some(planned));
        // A window in the past (e.g. revocation announced) makes it due now.
        s.renewal_window("a.test", t0(), t0() + DAY);
        let due = s.view("a.test").unwrap().due.unwrap();
        assert!(due <= t0() + DAY);
        assert_eq!(s.poll(t0() + DAY).len(), 1);
    }

    #[test]
    fn failures_back_off_exponentially_with_cap() {
        let mut s = Scheduler::new(policy(), 4);
        s.set_desired(["a.test".to_string()]);
        let mut now = t0();
        let mut delays = Vec::new();
        for _ in 0..6 {
            assert_eq!(s.poll(now).len(), 1);
            let at = s.order_failed("a.test", now, "boom".into());
            let d = at.duration_since(now).unwrap().as_secs_f64();
            delays.push(d);
            assert!(
                s.poll(at - Duration::from_millis(1)).is_empty(),
                "no retry before backoff"
            );
            now = at;
        }
        for (i, d) in delays.iter().enumerate() {
            let nominal = (10.0 * 2f64.powi(i as i32)).min(100.0);
            assert!(
                *d >= nominal * 0.9 - 1e-6 && *d <= nominal * 1.1 + 1e-6,
                "{i}: {d}"
            );
        }
        let v = s.view("a.test").unwrap();
        assert_eq!(v.failures, 6);
        assert_eq!(v.last_error.as_deref(), Some("boom"));
    }

    #[test]
    fn success_resets_failures_and_force_renews() {
        let mut s = Scheduler::new(policy(), 5);
        s.set_desired(["a.test".to_string()]);
        s.poll(t0());
        s.order_failed("a.test", t0(), "x".into());
        s.poll(t0() + DAY);
        s.order_succeeded(
            "a.test",
            Validity {
                not_before: t0(),
                not_after: t0() + 90 * DAY,
            },
        );
        assert_eq!(s.view("a.test").unwrap().failures, 0);
        assert!(s.poll(t0() + 2 * DAY).is_empty());
        s.force_renew("a.test");
        assert_eq!(s.poll(t0() + 2 * DAY).len(), 1);
    }

    #[test]
    fn undesired_names_are_never_ordered() {
        let mut s = Scheduler::new(policy(), 6);
        s.set_desired(["a.test".to_string()]);
        let removed = s.set_desired(Vec::<String>::new());
        assert_eq!(removed, vec!["a.test".to_string()]);
        assert!(s.poll(t0()).is_empty());
        s.force_renew("other.test");
        assert!(s.poll(t0()).is_empty());
        assert_eq!(s.next_wakeup(), None);
    }
}
