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
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            allow_plain_http: false,
            proxy_protocol: false,
            backend_protocol: BackendProtocol::default(),
            upgrades: vec!["websocket".to_string()],
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
