//! Health probes of the fleet's members, as a sans-IO state machine: told the targets and
//! each probe's outcome with `now`, it says which probes to start and which targets look
//! healthy. A target never probed counts as healthy (no evidence against it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How members are probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePolicy {
    /// Time between two probes of a healthy target.
    pub interval: Duration,
    /// A probe not answered within this counts as failed.
    pub timeout: Duration,
    /// Consecutive failures that make a target unhealthy.
    pub fall: u32,
    /// Consecutive successes that make an unhealthy target healthy again.
    pub rise: u32,
}

impl Default for ProbePolicy {
    /// Every 5 s, 2 s timeout, unhealthy after 2 failures, healthy after 1 success.
    fn default() -> Self {
        ProbePolicy {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            fall: 2,
            rise: 1,
        }
    }
}

impl ProbePolicy {
    /// A target that just failed is probed again sooner, so that `fall` failures take about
    /// one interval.
    fn retry_after_failure(&self) -> Duration {
        (self.interval / self.fall.max(1)).min(self.interval)
    }
}

#[derive(Debug, Clone)]
struct Target {
    healthy: bool,
    successes: u32,
    failures: u32,
    in_flight: bool,
    next_at: Instant,
}

/// The probe schedule and each target's health.
#[derive(Debug)]
pub struct Probes {
    policy: ProbePolicy,
    targets: BTreeMap<SocketAddr, Target>,
}

impl Probes {
    pub fn new(policy: ProbePolicy) -> Self {
        Probes {
            policy,
            targets: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> ProbePolicy {
        self.policy
    }

    /// Replaces the targets: new ones are probed at once, gone ones forgotten, kept ones
    /// keep their health.
    pub fn set_targets<I: IntoIterator<Item = SocketAddr>>(&mut self, targets: I, now: Instant) {
        let wanted: std::collections::BTreeSet<SocketAddr> = targets.into_iter().collect();
        self.targets.retain(|a, _| wanted.contains(a));
        for a in wanted {
            self.targets.entry(a).or_insert(Target {
                healthy: true,
                successes: 0,
                failures: 0,
                in_flight: false,
                next_at: now,
            });
        }
    }

    /// The probes to start now; each is in flight until [`Self::probe_done`].
    pub fn poll(&mut self, now: Instant) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for (a, t) in self.targets.iter_mut() {
            if !t.in_flight && now >= t.next_at {
                t.in_flight = true;
                out.push(*a);
            }
        }
        out
    }

    /// A probe ended (`ok`: the member accepted a connection in time). Returns true when
    /// the target's health changed.
    pub fn probe_done(&mut self, target: SocketAddr, ok: bool, now: Instant) -> bool {
        let policy = self.policy;
        let Some(t) = self.targets.get_mut(&target) else {
            return false; // forgotten meanwhile
        };
        t.in_flight = false;
        let before = t.healthy;
        if ok {
            t.failures = 0;
            t.successes = t.successes.saturating_add(1);
            if t.successes >= policy.rise.max(1) {
                t.healthy = true;
            }
            t.next_at = now + policy.interval;
        } else {
            t.successes = 0;
            t.failures = t.failures.saturating_add(1);
            if t.failures >= policy.fall.max(1) {
                t.healthy = false;
            }
            t.next_at = now + policy.retry_after_failure();
        }
        before != t.healthy
    }

    /// When [`Self::poll`] next has something to start (`None`: no targets).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.targets
            .values()
            .filter(|t| !t.in_flight)
            .map(|t| t.next_at)
            .min()
    }

    /// Whether `target` looks healthy (unknown targets: false).
    pub fn is_healthy(&self, target: &SocketAddr) -> bool {
        self.targets.get(target).is_some_and(|t| t.healthy)
    }

    /// The targets that look healthy; when none does, all of them (fail open: answering
    /// with every member beats answering with none).
    pub fn answer(&self) -> Vec<SocketAddr> {
        let healthy: Vec<SocketAddr> = self
            .targets
            .iter()
            .filter(|(_, t)| t.healthy)
            .map(|(a, _)| *a)
            .collect();
        if healthy.is_empty() {
            self.targets.keys().copied().collect()
        } else {
            healthy
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n], 443))
    }

    fn policy() -> ProbePolicy {
        ProbePolicy {
            interval: Duration::from_secs(4),
            timeout: Duration::from_secs(1),
            fall: 2,
            rise: 1,
        }
    }

    #[test]
    fn new_targets_are_probed_at_once_and_count_as_healthy() {
        let t0 = Instant::now();
        let mut p = Probes::new(policy());
        p.set_targets([addr(1), addr(2)], t0);
        assert_eq!(p.answer(), vec![addr(1), addr(2)]);
        assert_eq!(p.poll(t0), vec![addr(1), addr(2)]);
        // In flight: not started twice.
        assert!(p.poll(t0).is_empty());
        assert_eq!(p.next_wakeup(), None);
    }

    #[test]
    fn a_target_drops_after_fall_failures_within_one_interval_and_returns_on_success() {
        let t0 = Instant::now();
        let mut p = Probes::new(policy());
        p.set_targets([addr(1), addr(2)], t0);
        p.poll(t0);
        assert!(!p.probe_done(addr(1), true, t0));
        assert!(!p.probe_done(addr(2), false, t0)); // one failure: still healthy
        assert_eq!(p.answer(), vec![addr(1), addr(2)]);
        // The failed target is retried after interval / fall.
        let retry = t0 + Duration::from_secs(2);
        assert_eq!(p.next_wakeup(), Some(retry));
        assert!(p.poll(retry - Duration::from_millis(1)).is_empty());
        assert_eq!(p.poll(retry), vec![addr(2)]);
        assert!(p.probe_done(addr(2), false, retry)); // second failure: unhealthy
        assert_eq!(p.answer(), vec![addr(1)]);
        assert!(!p.is_healthy(&addr(2)));
        let later = retry + Duration::from_secs(2);
        assert_eq!(
            p.poll(later),
            vec![addr(1), addr(2)],
            "both due at t0 + interval"
        );
        assert!(!p.probe_done(addr(1), true, later));
        assert!(p.probe_done(addr(2), true, later));
        assert_eq!(p.answer(), vec![addr(1), addr(2)]);
    }

    #[test]
    fn when_none_look_healthy_all_are_answered() {
        let t0 = Instant::now();
        let mut p = Probes::new(ProbePolicy {
            fall: 1,
            ..policy()
        });
        p.set_targets([addr(1), addr(2)], t0);
        p.poll(t0);
        p.probe_done(addr(1), false, t0);
        assert_eq!(p.answer(), vec![addr(2)]);
        p.probe_done(addr(2), false, t0);
        assert_eq!(p.answer(), vec![addr(1), addr(2)], "fail open");
    }

    #[test]
    fn removed_targets_are_forgotten_and_late_results_ignored() {
        let t0 = Instant::now();
        let mut p = Probes::new(policy());
        p.set_targets([addr(1), addr(2)], t0);
        p.poll(t0);
        p.set_targets([addr(1)], t0);
        assert!(!p.probe_done(addr(2), false, t0));
        assert_eq!(p.answer(), vec![addr(1)]);
        // A kept target keeps its state across a new target list.
        p.probe_done(addr(1), true, t0);
        p.set_targets([addr(1), addr(3)], t0);
        assert_eq!(p.poll(t0), vec![addr(3)]);
    }
}
