//! Per-route pool configuration, embedded in a route as `[routes.pool]`. Every field has a
//! default, so an empty (or absent) table gives a sensible pool; durations are milliseconds.

use serde::{Deserialize, Serialize};
use std::time::Duration;

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
    /// Whole budget for `Pool::connect` (queue wait plus every attempt); also the bound on
    /// answering 503 when every backend is down. Default 3000 ms.
    pub connect_timeout_ms: u64,
    /// Cap on one connect attempt, so a black-holed backend leaves time to try another.
    /// Default 1000 ms.
    pub connect_attempt_timeout_ms: u64,
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
            connect_timeout_ms: 3000,
            connect_attempt_timeout_ms: 1000,
            max_connections: 0,
            queue_size: 128,
            queue_timeout_ms: 1000,
            passive: PassiveHealthConfig::default(),
            active: ActiveHealthConfig::default(),
        }
    }
}

impl PoolConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn connect_attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_attempt_timeout_ms.min(self.connect_timeout_ms))
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
        positive(self.connect_timeout_ms, "pool.connect_timeout_ms")?;
        positive(
            self.connect_attempt_timeout_ms,
            "pool.connect_attempt_timeout_ms",
        )?;
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

/// Reads the `pool` table of every `[[route]]` in `gateway.toml`, in file order (index i is
/// `GatewayConfig::routes[i]`), validated, with errors naming file, line and field.
///
/// `meshgate-config` cannot name `PoolConfig` (it would depend on the gateway), and its
/// `Route` ignores unknown keys, so the gateway reads the pool tables beside the
/// `GatewayConfig` from the same text.
pub fn parse_route_pools(
    path: &std::path::Path,
    text: &str,
) -> Result<Vec<PoolConfig>, meshgate_config::file::ConfigError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        route: Vec<RouteTable>,
    }
    #[derive(Deserialize)]
    struct RouteTable {
        #[serde(default)]
        pool: PoolConfig,
    }
    let file: File = meshgate_config::file::parse(path, text)?;
    file.route
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.pool.validate().map_err(|(field, msg)| {
                meshgate_config::file::ConfigError::at_field(
                    path,
                    text,
                    &format!("route.{i}.{field}"),
                    msg,
                )
            })?;
            Ok(r.pool)
        })
        .collect()
}
