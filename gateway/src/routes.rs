//! The routing table: host → route, exact names first, then one-label `*.parent` wildcards.
//! Built from static routes and reserved routes; swapped whole on reload.

use crate::upstream::dial::{Dialer, DirectDialer};
use crate::upstream::pool::{Pool, PoolConfig};
use meshgate_config::route::Route;
use std::collections::HashMap;
use std::sync::Arc;

/// A route plus its backend pool (selection, health, limits).
pub struct RouteEntry {
    pub route: Route,
    pub pool: Arc<Pool>,
}

impl std::fmt::Debug for RouteEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteEntry")
            .field("route", &self.route)
            .finish()
    }
}

/// Builds pools for a new table from each route's `[route.pool]`. A route whose backends and
/// pool settings did not change keeps the previous table's pool (health state and probes
/// survive reloads); a rebuilt pool inherits ejections and latency estimates from the old one.
pub struct PoolFactory {
    pub dialer: Arc<dyn Dialer>,
    /// `[timeouts] connect_ms`: the connect budget of routes whose pool sets none.
    pub connect_ms: u64,
    pub previous: Option<Arc<RouteTable>>,
}

impl PoolFactory {
    /// The pool settings a route runs with: its own, connect timeouts filled from `[timeouts]`.
    pub fn config_for(&self, route: &Route) -> PoolConfig {
        route.pool.clone().with_connect_default(self.connect_ms)
    }

    fn pool_for(&self, route: &Route) -> Arc<Pool> {
        let config = self.config_for(route);
        let old = self
            .previous
            .as_ref()
            .and_then(|t| t.get_exact(route.host.as_str()));
        let protocol = route.options.backend_protocol;
        if let Some(old) = old
            && old.route.backends == route.backends
            && *old.pool.config() == config
            && old.pool.protocol() == protocol
        {
            return old.pool.clone();
        }
        // HTTP health probes speak the route's backend protocol.
        let pool = Pool::for_route_speaking(
            route.host.as_str(),
            &route.backends,
            config,
            self.dialer.clone(),
            protocol,
        );
        if let Some(old) = old {
            pool.inherit(&old.pool);
        }
        pool
    }
}

/// Connect budget of [`RouteTable::build`]'s pools when a route sets none.
const DEFAULT_CONNECT_MS: u64 = 3000;

#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<RouteEntry>>,
    wildcard: HashMap<String, Arc<RouteEntry>>,
}

impl RouteTable {
    /// A table with default pools dialing kernel sockets (tests, tools).
    pub fn build(static_routes: &[Route], reserved: &[Route]) -> Self {
        let pools = PoolFactory {
            dialer: Arc::new(DirectDialer),
            connect_ms: DEFAULT_CONNECT_MS,
            previous: None,
        };
        Self::build_with(static_routes, reserved, &pools)
    }

    /// Static routes win over reserved routes for the same host.
    pub fn build_with(static_routes: &[Route], reserved: &[Route], pools: &PoolFactory) -> Self {
        let mut t = RouteTable::default();
        for r in reserved.iter().chain(static_routes) {
            let entry = Arc::new(RouteEntry {
                route: r.clone(),
                pool: pools.pool_for(r),
            });
            match r.host.wildcard_parent() {
                Some(parent) => t.wildcard.insert(parent.to_string(), entry),
                None => t.exact.insert(r.host.to_string(), entry),
            };
        }
        t
    }

    /// Looks up a host name (any case, optional trailing dot or `:port`).
    pub fn lookup(&self, host: &str) -> Option<Arc<RouteEntry>> {
        self.lookup_normalized(&normalize_host(host))
    }

    /// [`RouteTable::lookup`] for a host already normalized ([`normalize_host`]): the proxy
    /// normalizes a connection's host once, not on every request.
    pub fn lookup_normalized(&self, host: &str) -> Option<Arc<RouteEntry>> {
        if let Some(e) = self.exact.get(host) {
            return Some(e.clone());
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }

    /// The entry stored under exactly `host` (wildcards as `*.parent`).
    fn get_exact(&self, host: &str) -> Option<&Arc<RouteEntry>> {
        match host.strip_prefix("*.") {
            Some(parent) => self.wildcard.get(parent),
            None => self.exact.get(host),
        }
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
            host: host.parse().unwrap(),
            backends: vec![Backend {
                addr: ([10, 0, 0, 1], port).into(),
                weight: 1,
            }],
            mode: Mode::Terminate,
            options: RouteOptions::default(),
            pool: PoolConfig::default(),
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
    fn pools_survive_rebuilds_when_backends_unchanged() {
        let first = Arc::new(RouteTable::build(
            &[route("a.example", 1), route("b.example", 1)],
            &[],
        ));
        let pools = PoolFactory {
            dialer: Arc::new(DirectDialer),
            connect_ms: DEFAULT_CONNECT_MS,
            previous: Some(first.clone()),
        };
        let second =
            RouteTable::build_with(&[route("a.example", 1), route("b.example", 2)], &[], &pools);
        let same = |h: &str| {
            Arc::ptr_eq(
                &first.lookup(h).unwrap().pool,
                &second.lookup(h).unwrap().pool,
            )
        };
        assert!(same("a.example"));
        assert!(!same("b.example"));
    }

    #[tokio::test]
    async fn rebuilt_pools_use_the_route_pool_and_keep_ejections() {
        use crate::upstream::pool::{ClientInfo, Outcome, Policy};
        let mut a = route("a.example", 1);
        a.pool.policy = Policy::RoundRobin;
        a.pool.connect_attempt_timeout_ms = Some(250);
        let first = Arc::new(RouteTable::build_with(
            std::slice::from_ref(&a),
            &[],
            &PoolFactory {
                dialer: Arc::new(DirectDialer),
                connect_ms: 900,
                previous: None,
            },
        ));
        let pool = first.lookup("a.example").unwrap().pool.clone();
        assert_eq!(pool.config().policy, Policy::RoundRobin);
        assert_eq!(
            pool.config().connect_timeout_ms,
            Some(900),
            "from [timeouts]"
        );
        assert_eq!(pool.config().connect_attempt_timeout_ms, Some(250));
        let client = ClientInfo::from_ip([127, 0, 0, 1].into());
        for _ in 0..pool.config().passive.consecutive_failures {
            let lease = pool.pick(&client, &[]).await.expect("pick");
            lease.report(Outcome::ConnectFailed);
        }
        assert!(!pool.status()[0].available, "ejected");

        // A reload that adds a backend builds a new pool; the ejection carries over.
        a.backends.push(Backend {
            addr: ([10, 0, 0, 2], 1).into(),
            weight: 1,
        });
        let second = RouteTable::build_with(
            &[a],
            &[],
            &PoolFactory {
                dialer: Arc::new(DirectDialer),
                connect_ms: 900,
                previous: Some(first.clone()),
            },
        );
        let new = second.lookup("a.example").unwrap().pool.clone();
        assert!(!Arc::ptr_eq(&pool, &new));
        let status = new.status();
        assert_eq!(status.len(), 2);
        assert!(!status[0].available, "the ejected backend stays out");
        assert!(status[1].available);
    }
}
