//! `[upstream]` in `gateway.toml`: how many idle keep-alive connections to each backend the
//! gateway keeps, and for how long. Defaults and bounds are in `docs/configuration.md`.
//!
//! ```toml
//! [upstream]
//! idle_timeout_ms = 60000          # an idle connection unused this long closes
//! idle_kept_per_backend = 64       # idle connections per backend kept for idle_timeout_ms
//! surplus_idle_timeout_ms = 5000   # idle connections beyond those close after this
//! max_idle_per_backend = 4096      # idle connections per backend, at most
//! ```

use serde::Deserialize;
use std::time::Duration;

/// Largest `max_idle_per_backend`: each idle connection holds a socket (and, to an overlay
/// backend, a userspace-stack socket on both nodes).
pub const MAX_IDLE_PER_BACKEND_LIMIT: usize = 65_536;

/// Longest `idle_timeout_ms`: one hour.
pub const IDLE_TIMEOUT_LIMIT_MS: u64 = 3_600_000;

/// The idle HTTP/1.1 connection pool's bounds (every key optional).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// An idle connection unused this long is closed.
    pub idle_timeout_ms: u64,
    /// Idle connections per backend kept for the whole `idle_timeout_ms` (the most recently
    /// used ones): the steady concurrency a backend sees, served without reconnecting.
    pub idle_kept_per_backend: usize,
    /// Idle connections beyond `idle_kept_per_backend` (the least recently used) close after
    /// this long unused: a burst's connections serve the burst, then go.
    pub surplus_idle_timeout_ms: u64,
    /// Hard cap of idle connections per backend: a connection returned beyond it is closed.
    pub max_idle_per_backend: usize,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            idle_timeout_ms: 60_000,
            idle_kept_per_backend: 64,
            surplus_idle_timeout_ms: 5_000,
            max_idle_per_backend: 4096,
        }
    }
}

impl Upstream {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn surplus_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.surplus_idle_timeout_ms)
    }

    /// The first key out of bounds, as `(key, message)`.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        if self.idle_timeout_ms == 0 || self.idle_timeout_ms > IDLE_TIMEOUT_LIMIT_MS {
            return Some((
                "idle_timeout_ms",
                format!("expected 1 to {IDLE_TIMEOUT_LIMIT_MS} milliseconds"),
            ));
        }
        if self.max_idle_per_backend == 0 || self.max_idle_per_backend > MAX_IDLE_PER_BACKEND_LIMIT
        {
            return Some((
                "max_idle_per_backend",
                format!("expected 1 to {MAX_IDLE_PER_BACKEND_LIMIT} connections"),
            ));
        }
        if self.idle_kept_per_backend > self.max_idle_per_backend {
            return Some((
                "idle_kept_per_backend",
                format!(
                    "expected at most max_idle_per_backend ({})",
                    self.max_idle_per_backend
                ),
            ));
        }
        if self.surplus_idle_timeout_ms > self.idle_timeout_ms {
            return Some((
                "surplus_idle_timeout_ms",
                format!(
                    "expected at most idle_timeout_ms ({})",
                    self.idle_timeout_ms
                ),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_are_checked() {
        assert_eq!(Upstream::default().invalid(), None);
        let bad = [
            (
                Upstream {
                    idle_timeout_ms: 0,
                    ..Upstream::default()
                },
                "idle_timeout_ms",
            ),
            (
                Upstream {
                    max_idle_per_backend: MAX_IDLE_PER_BACKEND_LIMIT + 1,
                    ..Upstream::default()
                },
                "max_idle_per_backend",
            ),
            (
                Upstream {
                    idle_kept_per_backend: 5000,
                    ..Upstream::default()
                },
                "idle_kept_per_backend",
            ),
            (
                Upstream {
                    surplus_idle_timeout_ms: 60_001,
                    ..Upstream::default()
                },
                "surplus_idle_timeout_ms",
            ),
        ];
        for (upstream, key) in bad {
            assert_eq!(
                upstream.invalid().map(|(k, _)| k),
                Some(key),
                "{upstream:?}"
            );
        }
        // Zero kept connections (every idle one is surplus) is allowed.
        let none_kept = Upstream {
            idle_kept_per_backend: 0,
            surplus_idle_timeout_ms: 0,
            ..Upstream::default()
        };
        assert_eq!(none_kept.invalid(), None);
    }
}
