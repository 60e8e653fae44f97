//! Backend health as a sans-IO state machine: fed `(event, now)`, it says whether the backend
//! may take traffic and reports transitions. Passive signals (connect failures, timeouts, 5xx
//! streaks) eject with exponential backoff; active probes take a backend down after `fall`
//! failures and bring it back after `rise` successes.

use super::{ActiveHealthConfig, PassiveHealthConfig, ProbeKind};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What the pool learned about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    /// A response that is not a 5xx.
    Success,
    /// A connection opened: the backend is reachable (says nothing about its responses).
    Connected,
    /// A 5xx response.
    ServerError,
    /// Connecting failed (refused, unreachable, reset during connect).
    ConnectFailed,
    /// Connecting or waiting for the response head timed out.
    Timeout,
    /// An active probe succeeded.
    ProbeOk,
    /// An active probe failed.
    ProbeFailed,
}

/// Where a backend stands, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Takes traffic.
    Healthy,
    /// Taking traffic again after an ejection; the next failure ejects it for longer.
    Probation,
    /// Ejected by passive health until the backoff ends (or `rise` probes succeed).
    Ejected,
    /// Taken down by active probes until `rise` probes succeed.
    Down,
}

/// A change worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Passively ejected for this long.
    Ejected(Duration),
    /// Active probes took the backend down.
    WentDown,
    /// Active probes brought the backend back (or ended an ejection early).
    CameUp,
}

/// Health of one backend.
#[derive(Debug, Clone)]
pub struct Health {
    passive: PassiveHealthConfig,
    active_enabled: bool,
    rise: u32,
    fall: u32,
    consecutive_failures: u32,
    /// 5xx streak: how many, and when the first of them arrived.
    server_errors: u32,
    server_error_streak_start: Option<Instant>,
    ejected_until: Option<Instant>,
    /// Re-admitted after an ejection and not yet confirmed by a success.
    probation: bool,
    /// Ejections in a row; decides the next ejection's length.
    level: u32,
    /// Since when the backend has been confirmed healthy after its last ejection.
    healthy_since: Option<Instant>,
    active_down: bool,
    probe_ok_streak: u32,
    probe_fail_streak: u32,
    ejections: u64,
}

impl Health {
    pub fn new(passive: &PassiveHealthConfig, active: &ActiveHealthConfig) -> Self {
        Health {
            passive: passive.clone(),
            active_enabled: active.kind != ProbeKind::None,
            rise: active.rise.max(1),
            fall: active.fall.max(1),
            consecutive_failures: 0,
            server_errors: 0,
            server_error_streak_start: None,
            ejected_until: None,
            probation: false,
            level: 0,
            healthy_since: None,
            active_down: false,
            probe_ok_streak: 0,
            probe_fail_streak: 0,
            ejections: 0,
        }
    }

    /// May the backend take new traffic at `now`?
    pub fn is_available(&self, now: Instant) -> bool {
        !self.active_down && self.ejected_until.is_none_or(|t| t <= now)
    }

    pub fn state(&self, now: Instant) -> HealthState {
        if self.active_down {
            HealthState::Down
        } else if self.ejected_until.is_some_and(|t| t > now) {
            HealthState::Ejected
        } else if self.probation {
            HealthState::Probation
        } else {
            HealthState::Healthy
        }
    }

    /// How much longer the current ejection lasts.
    pub fn ejected_for(&self, now: Instant) -> Option<Duration> {
        self.ejected_until
            .filter(|t| *t > now)
            .map(|t| t.saturating_duration_since(now))
    }

    /// Passive ejections so far.
    pub fn ejections(&self) -> u64 {
        self.ejections
    }

    pub fn on_event(&mut self, event: HealthEvent, now: Instant) -> Option<Transition> {
        match event {
            HealthEvent::Success => {
                self.consecutive_failures = 0;
                self.server_errors = 0;
                self.server_error_streak_start = None;
                if self.probation && self.is_available(now) {
                    self.probation = false;
                    self.healthy_since = Some(now);
                }
                None
            }
            HealthEvent::Connected => {
                self.consecutive_failures = 0;
                if self.probation && self.is_available(now) {
                    self.probation = false;
                    self.healthy_since = Some(now);
                }
                None
            }
            HealthEvent::ServerError => {
                // The backend is reachable: connect failures are not accumulating.
                self.consecutive_failures = 0;
                let window = Duration::from_millis(self.passive.server_error_window_ms);
                match self.server_error_streak_start {
                    Some(start) if now.saturating_duration_since(start) <= window => {
                        self.server_errors += 1;
                    }
                    _ => {
                        self.server_errors = 1;
                        self.server_error_streak_start = Some(now);
                    }
                }
                let threshold = self.passive.server_errors;
                if threshold > 0 && (self.server_errors >= threshold || self.on_probation(now)) {
                    self.eject(now)
                } else {
                    None
                }
            }
            HealthEvent::ConnectFailed | HealthEvent::Timeout => {
                self.consecutive_failures += 1;
                let threshold = self.passive.consecutive_failures;
                if threshold > 0
                    && (self.consecutive_failures >= threshold || self.on_probation(now))
                {
                    self.eject(now)
                } else {
                    None
                }
            }
            HealthEvent::ProbeOk => {
                self.probe_fail_streak = 0;
                self.probe_ok_streak = self.probe_ok_streak.saturating_add(1);
                if self.probe_ok_streak < self.rise {
                    return None;
                }
                if self.active_down {
                    self.active_down = false;
                    // Coming back from down: start on probation, like after an ejection.
                    self.probation = true;
                    self.consecutive_failures = 0;
                    return Some(Transition::CameUp);
                }
                if self.ejected_until.is_some_and(|t| t > now) {
                    // The probes say it is back: end the ejection early, on probation.
                    self.ejected_until = Some(now);
                    self.consecutive_failures = 0;
                    return Some(Transition::CameUp);
                }
                None
            }
            HealthEvent::ProbeFailed => {
                self.probe_ok_streak = 0;
                self.probe_fail_streak = self.probe_fail_streak.saturating_add(1);
                if self.active_enabled && !self.active_down && self.probe_fail_streak >= self.fall {
                    self.active_down = true;
                    Some(Transition::WentDown)
                } else {
                    None
                }
            }
        }
    }

    /// Re-admitted after an ejection and not yet proven: one failure ejects again.
    fn on_probation(&self, now: Instant) -> bool {
        self.probation && self.is_available(now)
    }

    fn eject(&mut self, now: Instant) -> Option<Transition> {
        if self.ejected_until.is_some_and(|t| t > now) {
            return None; // already ejected; late results of earlier requests change nothing
        }
        let max = Duration::from_millis(self.passive.max_ejection_ms);
        if !self.probation
            && self
                .healthy_since
                .is_some_and(|t| now.saturating_duration_since(t) >= max)
        {
            self.level = 0; // healthy long enough: forgive earlier ejections
        }
        let base = Duration::from_millis(self.passive.base_ejection_ms);
        let length = base.saturating_mul(1u32 << self.level.min(16)).min(max);
        self.level = self.level.saturating_add(1);
        self.ejected_until = Some(now + length);
        self.probation = true;
        self.healthy_since = None;
        self.consecutive_failures = 0;
        self.server_errors = 0;
        self.server_error_streak_start = None;
        self.probe_ok_streak = 0;
        self.ejections += 1;
        Some(Transition::Ejected(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive() -> PassiveHealthConfig {
        PassiveHealthConfig::default() // 3 failures, 5 5xx in 10 s, 1 s doubling to 30 s
    }

    fn active() -> ActiveHealthConfig {
        ActiveHealthConfig {
            kind: ProbeKind::Tcp,
            ..ActiveHealthConfig::default() // fall 3, rise 2
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn consecutive_connect_failures_eject_and_backoff_expires() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        assert_eq!(h.on_event(HealthEvent::ConnectFailed, t0), None);
        assert_eq!(h.on_event(HealthEvent::Timeout, t0), None);
        assert!(h.is_available(t0));
        assert_eq!(
            h.on_event(HealthEvent::ConnectFailed, t0),
            Some(Transition::Ejected(1000 * MS))
        );
        assert!(!h.is_available(t0 + 999 * MS));
        assert_eq!(h.state(t0 + 999 * MS), HealthState::Ejected);
        assert!(h.is_available(t0 + 1000 * MS));
        assert_eq!(h.state(t0 + 1000 * MS), HealthState::Probation);
        assert_eq!(h.ejections(), 1);
    }

    #[test]
    fn a_success_in_between_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        for _ in 0..10 {
            h.on_event(HealthEvent::ConnectFailed, t0);
            h.on_event(HealthEvent::ConnectFailed, t0);
            h.on_event(HealthEvent::Success, t0);
        }
        assert!(h.is_available(t0));
        assert_eq!(h.ejections(), 0);
    }

    #[test]
    fn failing_on_probation_doubles_the_ejection_up_to_the_cap() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        for _ in 0..3 {
            h.on_event(HealthEvent::ConnectFailed, t0);
        }
        let mut now = t0;
        let mut expected = 1000u32;
        for _ in 0..8 {
            now += h.ejected_for(now).unwrap_or_default();
            assert!(h.is_available(now));
            // One failure on probation is enough.
            expected = (expected * 2).min(30_000);
            assert_eq!(
                h.on_event(HealthEvent::ConnectFailed, now),
                Some(Transition::Ejected(expected * MS))
            );
        }
        assert_eq!(h.ejected_for(now), Some(30_000 * MS));
    }

    #[test]
    fn staying_healthy_for_the_cap_forgives_earlier_ejections() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        for _ in 0..3 {
            h.on_event(HealthEvent::ConnectFailed, t0);
        }
        let back = t0 + 1000 * MS;
        h.on_event(HealthEvent::Success, back);
        assert_eq!(h.state(back), HealthState::Healthy);
        // Shortly after: the next ejection is longer.
        let soon = back + 5000 * MS;
        for _ in 0..3 {
            h.on_event(HealthEvent::ConnectFailed, soon);
        }
        assert_eq!(h.ejected_for(soon), Some(2000 * MS));
        let back = soon + 2000 * MS;
        h.on_event(HealthEvent::Success, back);
        // Long after: back to the base length.
        let later = back + 30_000 * MS;
        let mut last = None;
        for _ in 0..3 {
            last = h.on_event(HealthEvent::ConnectFailed, later).or(last);
        }
        assert_eq!(last, Some(Transition::Ejected(1000 * MS)));
    }

    #[test]
    fn a_burst_of_5xx_ejects_but_scattered_ones_do_not() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        // Five 5xx spread over more than the window never form a streak.
        for i in 0..20u32 {
            h.on_event(HealthEvent::ServerError, t0 + i * 3000 * MS);
            if i % 4 == 3 {
                h.on_event(HealthEvent::Success, t0 + i * 3000 * MS);
            }
        }
        assert_eq!(h.ejections(), 0);
        let t1 = t0 + 100_000 * MS;
        for i in 0..4u32 {
            assert_eq!(h.on_event(HealthEvent::ServerError, t1 + i * MS), None);
        }
        assert!(matches!(
            h.on_event(HealthEvent::ServerError, t1 + 4 * MS),
            Some(Transition::Ejected(_))
        ));
        assert!(!h.is_available(t1 + 5 * MS));
    }

    #[test]
    fn slow_5xx_outside_the_window_start_a_new_streak() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        for i in 0..10u32 {
            h.on_event(HealthEvent::ServerError, t0 + i * 4000 * MS);
        }
        // Every third one starts a new 10 s streak: never 5 within a window.
        assert_eq!(h.ejections(), 0);
    }

    #[test]
    fn active_probes_take_down_after_fall_and_back_after_rise() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &active());
        assert_eq!(h.on_event(HealthEvent::ProbeFailed, t0), None);
        assert_eq!(h.on_event(HealthEvent::ProbeFailed, t0), None);
        assert!(h.is_available(t0));
        assert_eq!(
            h.on_event(HealthEvent::ProbeFailed, t0),
            Some(Transition::WentDown)
        );
        assert_eq!(h.state(t0), HealthState::Down);
        // Passive backoff does not bring an actively-down backend back.
        assert!(!h.is_available(t0 + 3_600_000 * MS));
        assert_eq!(h.on_event(HealthEvent::ProbeOk, t0), None);
        assert_eq!(h.on_event(HealthEvent::ProbeFailed, t0), None);
        assert_eq!(h.on_event(HealthEvent::ProbeOk, t0), None);
        assert_eq!(
            h.on_event(HealthEvent::ProbeOk, t0),
            Some(Transition::CameUp)
        );
        assert!(h.is_available(t0));
    }

    #[test]
    fn probes_end_a_passive_ejection_early() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &active());
        for _ in 0..3 {
            h.on_event(HealthEvent::ConnectFailed, t0);
        }
        assert!(!h.is_available(t0 + 10 * MS));
        h.on_event(HealthEvent::ProbeOk, t0 + 10 * MS);
        assert_eq!(
            h.on_event(HealthEvent::ProbeOk, t0 + 20 * MS),
            Some(Transition::CameUp)
        );
        assert!(h.is_available(t0 + 20 * MS));
        assert_eq!(h.state(t0 + 20 * MS), HealthState::Probation);
    }

    #[test]
    fn probe_failures_without_active_checks_change_nothing() {
        let t0 = Instant::now();
        let mut h = Health::new(&passive(), &ActiveHealthConfig::default());
        for _ in 0..10 {
            assert_eq!(h.on_event(HealthEvent::ProbeFailed, t0), None);
        }
        assert!(h.is_available(t0));
    }

    #[test]
    fn zero_thresholds_disable_passive_ejection() {
        let t0 = Instant::now();
        let cfg = PassiveHealthConfig {
            consecutive_failures: 0,
            server_errors: 0,
            ..passive()
        };
        let mut h = Health::new(&cfg, &ActiveHealthConfig::default());
        for _ in 0..100 {
            h.on_event(HealthEvent::ConnectFailed, t0);
            h.on_event(HealthEvent::ServerError, t0);
        }
        assert!(h.is_available(t0));
    }
}
