//! A route: which host goes to which backends, and how. Static routes come from
//! `gateway.toml`; reservations are turned into routes by the reservation store.

use crate::host::HostPattern;
use crate::pool::PoolConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// How the gateway treats TLS for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The gateway terminates TLS and proxies HTTP.
    #[default]
    Terminate,
    /// The gateway splices the raw TLS stream to the backend, chosen by SNI.
    Passthrough,
}

/// What a terminate route speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    #[default]
    Http1,
    /// HTTP/2 over cleartext (gRPC backends).
    H2c,
}

/// One backend of a route: an overlay address (dialed through the overlay) or a host address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Relative share for weighted selection.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Per-route switches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteOptions {
    /// Serve plain HTTP on :80 instead of redirecting to HTTPS.
    pub allow_plain_http: bool,
    /// Prepend a PROXY protocol v2 header to passthrough streams.
    pub proxy_protocol: bool,
    pub backend_protocol: BackendProtocol,
    /// HTTP/1.1 upgrade protocols (`Upgrade` tokens, any case) tunnelled to the backend;
    /// others are dropped from the request. Default `["websocket"]`; `h2c` is never tunnelled.
    pub upgrades: Vec<String>,
    /// `Strict-Transport-Security` on this route's HTTPS responses; absent (default) = none.
    pub hsts: Option<Hsts>,
}

/// `options.hsts`: the `Strict-Transport-Security` header (RFC 6797) the gateway puts on a
/// route's HTTPS responses (never on plain HTTP, where browsers ignore it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    /// `max-age`, in seconds (default 31536000, one year; 0 tells browsers to forget).
    #[serde(default = "one_year")]
    pub max_age: u64,
    /// `includeSubDomains`: every subdomain of the host is HTTPS-only too (default false).
    #[serde(default)]
    pub include_subdomains: bool,
    /// `preload`: asks to be on browsers' built-in lists; needs `include_subdomains` and a
    /// `max_age` of at least a year (default false).
    #[serde(default)]
    pub preload: bool,
}

fn one_year() -> u64 {
    31_536_000
}

impl Hsts {
    /// The header value, e.g. `max-age=31536000; includeSubDomains; preload`.
    pub fn header_value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age);
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }

    /// What is wrong with this combination, if anything: `(key, message)`.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        if self.preload && !self.include_subdomains {
            return Some((
                "preload",
                "needs `include_subdomains = true` (browsers' preload lists require it)".into(),
            ));
        }
        if self.preload && self.max_age < one_year() {
            return Some((
                "max_age",
                format!(
                    "{} is too short for `preload`; expected at least 31536000 (one year)",
                    self.max_age
                ),
            ));
        }
        None
    }
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            allow_plain_http: false,
            proxy_protocol: false,
            backend_protocol: BackendProtocol::default(),
            upgrades: vec!["websocket".to_string()],
            hsts: None,
        }
    }
}

impl RouteOptions {
    /// Whether an `Upgrade` protocol (`name` or `name/version`) may be tunnelled.
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        let name = protocol.split('/').next().unwrap_or("").trim();
        !name.eq_ignore_ascii_case("h2c")
            && self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(name))
    }
}

/// A host (exact name, or `*.suffix` wildcard) and where its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub host: HostPattern,
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub options: RouteOptions,
    /// Backend selection, health, retries and limits (`[route.pool]`).
    #[serde(default)]
    pub pool: PoolConfig,
}
