//! Per-route backend pool configuration, embedded in a route as `[route.pool]`. Every field
//! has a default, so an empty (or absent) table gives a sensible pool; durations are
//! milliseconds. Pure data: the gateway's `pool` module builds pools from it.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Connect budget of a pool whose route and gateway set none.
const DEFAULT_CONNECT_MS: u64 = 3000;

/// How a backend is chosen for each request or stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Power of two random choices, comparing outstanding requests weighted by a decaying
    /// peak latency estimate: slow or busy backends get less traffic. The default.
    #[default]
    LeastLoaded,
    /// Smooth weighted round robin over the available backends (by `Backend::weight`).
    RoundRobin,
    /// Weighted rendezvous hashing on the client IP: a client stays on one backend while it
    /// is available; only the clients of a failed backend move.
    HashClientIp,
    /// Weighted rendezvous hashing on a cookie's value (`sticky_cookie`); clients without the
    /// cookie are hashed on their IP.
    HashCookie,
}

/// Which active probe the pool sends to each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// No active probes: health is passive only (connect failures, timeouts, 5xx bursts).
    #[default]
    None,
    /// Open a stream to the backend through the dialer; success when it connects.
    Tcp,
    /// `GET <path>` over HTTP/1.1; success when the status is in `expect_status_min..=max`.
    Http,
}

/// Active health checking: probes sent through the `Dialer` (over the overlay for overlay
/// backends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActiveHealthConfig {
    /// Probe kind; `none` (default) disables active checks.
    pub kind: ProbeKind,
    /// Path for `http` probes. Default `/`.
    pub path: String,
    /// `Host` header for `http` probes. Default: the backend address.
    pub host: Option<String>,
    /// Time between probes of one backend. Default 2000 ms.
    pub interval_ms: u64,
    /// A probe that has not succeeded after this long fails. Default 1000 ms.
    pub timeout_ms: u64,
    /// Consecutive failed probes that take a healthy backend down. Default 3.
    pub fall: u32,
    /// Consecutive successful probes that bring a down backend back. Default 2.
    pub rise: u32,
    /// Lowest accepted status for `http` probes. Default 200.
    pub expect_status_min: u16,
    /// Highest accepted status for `http` probes. Default 399.
    pub expect_status_max: u16,
}

impl Default for ActiveHealthConfig {
    fn default() -> Self {
        ActiveHealthConfig {
            kind: ProbeKind::None,
            path: "/".into(),
            host: None,
            interval_ms: 2000,
            timeout_ms: 1000,
            fall: 3,
            rise: 2,
            expect_status_min: 200,
            expect_status_max: 399,
        }
    }
}

/// Passive health (outlier ejection) from the traffic itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PassiveHealthConfig {
    /// Consecutive connect failures or timeouts that eject a backend. Default 3.
    pub consecutive_failures: u32,
    /// 5xx responses within `server_error_window_ms` that eject a backend. Default 5.
    pub server_errors: u32,
    /// Window for counting 5xx responses. Default 10000 ms.
    pub server_error_window_ms: u64,
    /// First ejection lasts this long; each further ejection doubles it. Default 1000 ms.
    pub base_ejection_ms: u64,
    /// Cap on one ejection's length; a backend that stays healthy this long after
    /// re-admission starts again from `base_ejection_ms`. Default 30000 ms.
    pub max_ejection_ms: u64,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            consecutive_failures: 3,
            server_errors: 5,
            server_error_window_ms: 10_000,
            base_ejection_ms: 1000,
            max_ejection_ms: 30_000,
        }
    }
}

/// Everything a route says about its backend pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Selection policy. Default `least_loaded`.
    pub policy: Policy,
    /// Cookie whose value keys `hash_cookie`. Default `"meshgate_affinity"`.
    pub sticky_cookie: String,
    /// Whole budget to get a connection (queue wait plus every attempt, across backends);
    /// also the bound on answering 503 when every backend is down. Unset: the gateway's
    /// `[timeouts] connect_ms` (3000 ms where there is none, see [`PoolConfig::with_connect_default`]).
    pub connect_timeout_ms: Option<u64>,
    /// Cap on one connect attempt, so a black-holed backend leaves time to try another.
    /// Unset: a third of the budget, at least `min(budget, 1000)`.
    pub connect_attempt_timeout_ms: Option<u64>,
    /// Concurrent leases (requests in flight, or open streams) per backend; 0 = unlimited.
    /// Default 0.
    pub max_connections: u32,
    /// Requests that may wait for a backend slot when every backend is at its limit; beyond
    /// this the pool answers `Overloaded` (503) at once. Default 128.
    pub queue_size: u32,
    /// Longest wait in the queue before `Overloaded`. Default 1000 ms.
    pub queue_timeout_ms: u64,
    pub passive: PassiveHealthConfig,
    pub active: ActiveHealthConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            policy: Policy::LeastLoaded,
            sticky_cookie: "meshgate_affinity".into(),
            connect_timeout_ms: None,
            connect_attempt_timeout_ms: None,
            max_connections: 0,
            queue_size: 128,
            queue_timeout_ms: 1000,
            passive: PassiveHealthConfig::default(),
            active: ActiveHealthConfig::default(),
        }
    }
}

impl PoolConfig {
    /// Fills the connect timeouts a route left unset from the gateway-wide
    /// `[timeouts] connect_ms`: the budget is `connect_ms`, one attempt a third of it but at
    /// least `min(connect_ms, 1000)`. Values the route set are kept.
    pub fn with_connect_default(mut self, connect_ms: u64) -> Self {
        let budget = *self.connect_timeout_ms.get_or_insert(connect_ms);
        self.connect_attempt_timeout_ms
            .get_or_insert(budget.min(1000).max(budget / 3));
        self
    }

    /// The whole connect budget (default 3000 ms when unset and not merged).
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_MS))
    }

    /// One connect attempt's cap, never above the whole budget.
    pub fn connect_attempt_timeout(&self) -> Duration {
        let budget = self.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_MS);
        let attempt = self
            .connect_attempt_timeout_ms
            .unwrap_or(budget.min(1000).max(budget / 3));
        Duration::from_millis(attempt.min(budget))
    }
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }

    /// Checks values serde cannot: returns the dotted field name and what is expected, for a
    /// `ConfigError::at_field` by the caller.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |v: u64, f: &'static str| {
            if v == 0 {
                Err((f, "must be greater than 0".to_string()))
            } else {
                Ok(())
            }
        };
        if let Some(v) = self.connect_timeout_ms {
            positive(v, "pool.connect_timeout_ms")?;
        }
        if let Some(v) = self.connect_attempt_timeout_ms {
            positive(v, "pool.connect_attempt_timeout_ms")?;
        }
        positive(
            self.passive.base_ejection_ms,
            "pool.passive.base_ejection_ms",
        )?;
        if self.passive.max_ejection_ms < self.passive.base_ejection_ms {
            return Err((
                "pool.passive.max_ejection_ms",
                "must be at least base_ejection_ms".into(),
            ));
        }
        if self.policy == Policy::HashCookie && self.sticky_cookie.is_empty() {
            return Err((
                "pool.sticky_cookie",
                "must name a cookie for hash_cookie".into(),
            ));
        }
        if self.active.kind != ProbeKind::None {
            positive(self.active.interval_ms, "pool.active.interval_ms")?;
            positive(self.active.timeout_ms, "pool.active.timeout_ms")?;
            if self.active.fall == 0 || self.active.rise == 0 {
                return Err((
                    "pool.active.fall",
                    "fall and rise must be at least 1".into(),
                ));
            }
            if self.active.kind == ProbeKind::Http && !self.active.path.starts_with('/') {
                return Err(("pool.active.path", "must start with '/'".into()));
            }
            if self.active.expect_status_min > self.active.expect_status_max {
                return Err((
                    "pool.active.expect_status_min",
                    "must not exceed expect_status_max".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::GatewayConfig;
    use std::path::Path;

    #[test]
    fn route_pools_parse_with_the_gateway_config_and_errors_are_located() {
        let text = r#"
domains = ["gw.example.org"]
[[route]]
host = "a.gw.example.org"
backends = [{ addr = "10.0.0.1:80" }]
[[route]]
host = "b.gw.example.org"
backends = [{ addr = "10.0.0.2:80" }, { addr = "10.0.0.3:80" }]
[route.pool]
policy = "hash_client_ip"
max_connections = 100
[route.pool.active]
kind = "http"
path = "/healthz"
"#;
        let path = Path::new("gateway.toml");
        let gw = GatewayConfig::parse(path, text).expect("parses");
        assert_eq!(gw.routes.len(), 2);
        assert_eq!(gw.routes[0].pool, PoolConfig::default());
        let pool = &gw.routes[1].pool;
        assert_eq!(pool.policy, Policy::HashClientIp);
        assert_eq!(pool.max_connections, 100);
        assert_eq!(pool.active.kind, ProbeKind::Http);
        assert_eq!(
            pool.connect_timeout_ms, None,
            "unset: falls back to [timeouts]"
        );

        let typo = text.replace("max_connections", "max_conections");
        let err = GatewayConfig::parse(path, &typo).expect_err("unknown field");
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.message.contains("max_conections"), "{err}");

        let bad = text.replace("\"/healthz\"", "\"healthz\"");
        let err = GatewayConfig::parse(path, &bad).expect_err("invalid path");
        assert_eq!(err.line, Some(14), "{err}");
        assert!(
            err.to_string().contains("route.1.pool.active.path"),
            "{err}"
        );

        let zero = text.replace("max_connections = 100", "connect_timeout_ms = 0");
        let err = GatewayConfig::parse(path, &zero).expect_err("zero budget");
        assert_eq!(err.line, Some(11), "{err}");
        assert!(
            err.to_string().contains("route.1.pool.connect_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn unset_connect_timeouts_fall_back_to_the_gateway_timeout() {
        let merged = PoolConfig::default().with_connect_default(800);
        assert_eq!(merged.connect_timeout_ms, Some(800));
        assert_eq!(merged.connect_attempt_timeout_ms, Some(800));
        let merged = PoolConfig::default().with_connect_default(6000);
        assert_eq!(merged.connect_attempt_timeout(), Duration::from_secs(2));
        let own = PoolConfig {
            connect_timeout_ms: Some(900),
            connect_attempt_timeout_ms: Some(300),
            ..PoolConfig::default()
        }
        .with_connect_default(5000);
        assert_eq!(own.connect_timeout(), Duration::from_millis(900));
        assert_eq!(own.connect_attempt_timeout(), Duration::from_millis(300));
        assert_eq!(
            PoolConfig::default().connect_timeout(),
            Duration::from_secs(3)
        );
    }
}
