//! The routing table: host → route, exact names first, then one-label `*.parent` wildcards.
//! Built from static routes and reserved routes; swapped whole on reload.

use meshgate_config::route::Route;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A route plus the small state the gateway keeps for it.
#[derive(Debug)]
pub struct RouteEntry {
    pub route: Route,
    /// Round-robin cursor for backend choice until backend pools take over.
    next: AtomicUsize,
}

impl RouteEntry {
    pub fn new(route: Route) -> Self {
        RouteEntry {
            route,
            next: AtomicUsize::new(0),
        }
    }

    /// Backend addresses in the order to try them for one request: rotated per call so load
    /// spreads, with the rest as failover for connect errors.
    pub fn backend_order(&self) -> Vec<std::net::SocketAddr> {
        let b = &self.route.backends;
        if b.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % b.len();
        (0..b.len())
            .map(|i| b[(start + i) % b.len()].addr)
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<RouteEntry>>,
    wildcard: HashMap<String, Arc<RouteEntry>>,
}

impl RouteTable {
    /// Static routes win over reserved routes for the same host.
    pub fn build(static_routes: &[Route], reserved: &[Route]) -> Self {
        let mut t = RouteTable::default();
        for r in reserved.iter().chain(static_routes) {
            let entry = Arc::new(RouteEntry::new(r.clone()));
            let host = r.host.to_ascii_lowercase();
            match host.strip_prefix("*.") {
                Some(parent) => t.wildcard.insert(parent.to_string(), entry),
                None => t.exact.insert(host, entry),
            };
        }
        t
    }

    /// Looks up a host name (any case, optional trailing dot or `:port`).
    pub fn lookup(&self, host: &str) -> Option<Arc<RouteEntry>> {
        let host = normalize_host(host);
        if let Some(e) = self.exact.get(&host) {
            return Some(e.clone());
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exact.keys().cloned().collect();
        v.extend(self.wildcard.keys().map(|p| format!("*.{p}")));
        v.sort();
        v
    }

    pub fn entries(&self) -> impl Iterator<Item = &Arc<RouteEntry>> {
        self.exact.values().chain(self.wildcard.values())
    }
}

/// Lowercase, without `:port` and trailing dot. IPv6 literals keep their brackets.
pub fn normalize_host(host: &str) -> String {
    let h = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_config::route::{Backend, Mode, RouteOptions};

    fn route(host: &str, port: u16) -> Route {
        Route {
            host: host.into(),
            backends: vec![Backend {
                addr: ([10, 0, 0, 1], port).into(),
                weight: 1,
            }],
            mode: Mode::Terminate,
            options: RouteOptions::default(),
        }
    }

    #[test]
    fn exact_beats_wildcard_and_static_beats_reserved() {
        let t = RouteTable::build(
            &[route("a.example", 1), route("*.example", 2)],
            &[route("a.example", 3), route("b.example", 4)],
        );
        let port = |h: &str| t.lookup(h).map(|e| e.route.backends[0].addr.port());
        assert_eq!(port("A.Example.:443"), Some(1));
        assert_eq!(port("b.example"), Some(4));
        assert_eq!(port("c.example"), Some(2));
        assert_eq!(port("x.c.example"), None);
        assert_eq!(port("example"), None);
    }

    #[test]
    fn backend_order_rotates() {
        let mut r = route("a.example", 1);
        r.backends.push(Backend {
            addr: ([10, 0, 0, 2], 1).into(),
            weight: 1,
        });
        let e = RouteEntry::new(r);
        let a = e.backend_order();
        let b = e.backend_order();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], b[1]);
    }
}
