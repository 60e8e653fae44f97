//! Prometheus metrics served on the admin listener: the gateway's own families, the backend
//! pools' and whatever the assembly adds (overlay node, certificate manager) at construction.

use foldhash::fast::RandomState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::SystemTime;

use super::history::History;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabel {
    pub route: String,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `stream` for passthrough connections.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabel {
    pub route: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabel {
    /// `https`, `http`, `admin` (the operator's) or `api` (the deployers').
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusedLabel {
    pub listener: &'static str,
    /// `per_ip_limit`: the client already had its cap of connections open.
    pub reason: &'static str,
}

type HistogramFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

pub(crate) struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabel, Counter>,
    pub bytes_in: Family<RouteLabel, Counter>,
    pub bytes_out: Family<RouteLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub latency: HistogramFamily,
    pub connections: Gauge,
    pub handshakes: Counter,
    /// Open connections per listener kind.
    pub listener_connections: Family<ListenerLabel, Gauge>,
    /// Connections accepted and closed at once, per listener kind and reason.
    pub connections_refused: Family<RefusedLabel, Counter>,
    /// Times a listener had every slot taken (new connections waited in the accept queue).
    pub listener_full: Family<ListenerLabel, Counter>,
    /// Recent traffic per route and the latest errors, for the status pages.
    pub history: History,
    /// Each route's series, resolved once: a request then costs one lookup instead of a
    /// label allocation and a family lookup per series. At most `MAX_CACHED_ROUTES`.
    /// Keyed by route names from the configuration and reservations, never by request
    /// input: foldhash (seeded per process) instead of SipHash.
    routes: RwLock<HashMap<String, Arc<RouteMetrics>, RandomState>>,
}

/// Routes whose series [`Metrics::route`] keeps; further routes (a table reloaded with many
/// new names) get fresh handles per request, as correct and only slower.
const MAX_CACHED_ROUTES: usize = 4096;

/// One route's request series, each created in its family on first use (so a route shows
/// only the series it has had).
pub(crate) struct RouteMetrics {
    route: String,
    families: FamilyHandles,
    bytes_in: OnceLock<Counter>,
    bytes_out: OnceLock<Counter>,
    latency: OnceLock<Histogram>,
    /// Requests per status class, 1xx to 5xx, then passthrough streams.
    requests: [OnceLock<Counter>; 6],
}

/// The families a [`RouteMetrics`] creates its series in (clones share the series).
#[derive(Clone)]
struct FamilyHandles {
    requests: Family<RequestLabel, Counter>,
    bytes_in: Family<RouteLabel, Counter>,
    bytes_out: Family<RouteLabel, Counter>,
    latency: HistogramFamily,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "stream"];

impl RouteMetrics {
    fn label(&self) -> RouteLabel {
        RouteLabel {
            route: self.route.clone(),
        }
    }

    pub(crate) fn bytes_in(&self) -> &Counter {
        self.bytes_in
            .get_or_init(|| self.families.bytes_in.get_or_create(&self.label()).clone())
    }

    pub(crate) fn bytes_out(&self) -> &Counter {
        self.bytes_out
            .get_or_init(|| self.families.bytes_out.get_or_create(&self.label()).clone())
    }

    pub(crate) fn latency(&self) -> &Histogram {
        self.latency
            .get_or_init(|| self.families.latency.get_or_create(&self.label()).clone())
    }

    /// The request counter of an HTTP status (`None`: a passthrough stream).
    pub(crate) fn requests(&self, status: Option<u16>) -> &Counter {
        // 600-999 are not statuses hyper passes; they count as 5xx.
        let class = status.map_or(5, |s| usize::from(s / 100).clamp(1, 5) - 1);
        self.requests[class].get_or_init(|| {
            self.families
                .requests
                .get_or_create(&RequestLabel {
                    route: self.route.clone(),
                    status: CLASSES[class].to_string(),
                })
                .clone()
        })
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(|_| {})
    }
}

impl Metrics {
    /// The gateway's metrics; `extra` adds other components' to the same registry.
    pub(crate) fn new(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut root = Registry::default();
        // Backend-pool metrics carry their own `meshgate_pool_` names.
        crate::upstream::pool::register_metrics(&mut root);
        let registry = root.sub_registry_with_prefix("meshgate");
        let requests = Family::<RequestLabel, Counter>::default();
        let bytes_in = Family::<RouteLabel, Counter>::default();
        let bytes_out = Family::<RouteLabel, Counter>::default();
        let errors = Family::<ErrorLabel, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let connections = Gauge::default();
        let handshakes = Counter::default();
        registry.register(
            "requests",
            "HTTP requests (and passthrough streams) per route and status class",
            requests.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes received from clients per route",
            bytes_in.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes sent to clients per route",
            bytes_out.clone(),
        );
        registry.register("errors", "Errors per route and kind", errors.clone());
        registry.register(
            "request_duration_seconds",
            "Time to the backend's response head (HTTP) or stream length (passthrough)",
            latency.clone(),
        );
        registry.register(
            "client_connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed TLS handshakes",
            handshakes.clone(),
        );
        let listener_connections = Family::<ListenerLabel, Gauge>::default();
        let connections_refused = Family::<RefusedLabel, Counter>::default();
        let listener_full = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "listener_connections",
            "Open connections per listener (https, http, admin, api)",
            listener_connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed right after accept, per listener and reason",
            connections_refused.clone(),
        );
        registry.register(
            "listener_full",
            "Times every slot of a listener was taken, so new connections waited",
            listener_full.clone(),
        );
        extra(&mut root);
        Metrics {
            registry: root,
            requests,
            bytes_in,
            bytes_out,
            errors,
            latency,
            connections,
            handshakes,
            listener_connections,
            connections_refused,
            listener_full,
            history: History::default(),
            routes: RwLock::default(),
        }
    }

    /// The series of `route`.
    pub(crate) fn route(&self, route: &str) -> Arc<RouteMetrics> {
        // A poisoned lock only means another thread panicked mid-insert; the map is intact.
        if let Some(m) = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
        {
            return m.clone();
        }
        let fresh = Arc::new(RouteMetrics {
            route: route.to_string(),
            families: FamilyHandles {
                requests: self.requests.clone(),
                bytes_in: self.bytes_in.clone(),
                bytes_out: self.bytes_out.clone(),
                latency: self.latency.clone(),
            },
            bytes_in: OnceLock::new(),
            bytes_out: OnceLock::new(),
            latency: OnceLock::new(),
            requests: Default::default(),
        });
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = routes.get(route) {
            return m.clone();
        }
        if routes.len() < MAX_CACHED_ROUTES {
            routes.insert(route.to_string(), fresh.clone());
        }
        fresh
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn error(&self, route: &str, kind: &str) {
        self.history.error(route, kind, SystemTime::now());
        self.errors
            .get_or_create(&ErrorLabel {
                route: route.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }
}
