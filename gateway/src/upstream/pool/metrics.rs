//! Per-backend Prometheus metrics. The families are process-wide; each pool takes handles for
//! its own (route, backend) label sets and removes them when it is dropped, so a reload does not
//! leave stale series behind.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub route: String,
    pub backend: String,
    /// `connect`, `timeout`, `server_error`, `reset`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

type HistogramFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The metric families of every pool.
#[derive(Clone)]
pub struct PoolMetrics {
    pub requests: Family<BackendLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub latency: HistogramFamily,
    pub up: Family<BackendLabels, Gauge>,
    pub in_flight: Family<BackendLabels, Gauge>,
    pub ejections: Family<BackendLabels, Counter>,
    pub overloaded: Family<RouteLabels, Counter>,
    pub no_backend: Family<RouteLabels, Counter>,
}

static GLOBAL: LazyLock<PoolMetrics> = LazyLock::new(|| PoolMetrics {
    requests: Family::default(),
    errors: Family::default(),
    latency: Family::new_with_constructor(latency_histogram),
    up: Family::default(),
    in_flight: Family::default(),
    ejections: Family::default(),
    overloaded: Family::default(),
    no_backend: Family::default(),
});

impl PoolMetrics {
    pub fn global() -> &'static PoolMetrics {
        &GLOBAL
    }
}

/// How many live pools use each label set: on a reload the new pool of a route takes over the
/// old one's series (counters continue), and a series goes only when its last pool does.
static USERS: LazyLock<Mutex<HashMap<BackendLabels, usize>>> = LazyLock::new(Default::default);

fn acquire(labels: &BackendLabels) {
    if let Ok(mut users) = USERS.lock() {
        *users.entry(labels.clone()).or_insert(0) += 1;
    }
}

/// True when the caller was the last user.
fn release(labels: &BackendLabels) -> bool {
    let Ok(mut users) = USERS.lock() else {
        return false;
    };
    match users.get_mut(labels) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            users.remove(labels);
            true
        }
        None => false,
    }
}

/// Registers the pool metric families (shared by every pool in the process) in `registry`.
/// Call once when building the `/metrics` registry.
pub fn register_metrics(registry: &mut Registry) {
    let m = PoolMetrics::global().clone();
    registry.register(
        "meshgate_pool_requests",
        "Requests and streams sent to a backend",
        m.requests,
    );
    registry.register(
        "meshgate_pool_errors",
        "Failed attempts per backend by kind (connect, timeout, server_error, reset)",
        m.errors,
    );
    registry.register(
        "meshgate_pool_response_seconds",
        "Time from sending a request to the backend's response head",
        m.latency,
    );
    registry.register(
        "meshgate_pool_backend_up",
        "1 when the backend takes traffic, 0 when ejected or down",
        m.up,
    );
    registry.register(
        "meshgate_pool_in_flight",
        "Requests or streams in flight to the backend",
        m.in_flight,
    );
    registry.register(
        "meshgate_pool_ejections",
        "Passive ejections and active down transitions of the backend",
        m.ejections,
    );
    registry.register(
        "meshgate_pool_overloaded",
        "Requests refused with 503 because every backend was at its limit and the queue full",
        m.overloaded,
    );
    registry.register(
        "meshgate_pool_no_backend",
        "Requests refused with 503 because no backend was healthy or reachable",
        m.no_backend,
    );
}

/// One backend's metric handles.
#[derive(Clone)]
pub(super) struct BackendMetrics {
    labels: BackendLabels,
    pub requests: Counter,
    pub latency: Histogram,
    pub up: Gauge,
    pub in_flight: Gauge,
    pub ejections: Counter,
}

impl BackendMetrics {
    pub(super) fn new(route: &str, backend: &str) -> Self {
        let m = PoolMetrics::global();
        let labels = BackendLabels {
            route: route.to_string(),
            backend: backend.to_string(),
        };
        acquire(&labels);
        let up = m.up.get_or_create_owned(&labels);
        up.set(1);
        BackendMetrics {
            requests: m.requests.get_or_create_owned(&labels),
            latency: m.latency.get_or_create_owned(&labels),
            in_flight: m.in_flight.get_or_create_owned(&labels),
            ejections: m.ejections.get_or_create_owned(&labels),
            up,
            labels,
        }
    }

    pub(super) fn error(&self, kind: &str) {
        PoolMetrics::global()
            .errors
            .get_or_create(&ErrorLabels {
                route: self.labels.route.clone(),
                backend: self.labels.backend.clone(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Removes this backend's series (the pool is gone).
    pub(super) fn remove(&self) {
        if !release(&self.labels) {
            return;
        }
        let m = PoolMetrics::global();
        m.requests.remove(&self.labels);
        m.latency.remove(&self.labels);
        m.up.remove(&self.labels);
        m.in_flight.remove(&self.labels);
        m.ejections.remove(&self.labels);
        for kind in ["connect", "timeout", "server_error", "reset"] {
            m.errors.remove(&ErrorLabels {
                route: self.labels.route.clone(),
                backend: self.labels.backend.clone(),
                kind: kind.to_string(),
            });
        }
    }
}

pub(super) fn route_refused(route: &str, overloaded: bool) {
    let m = PoolMetrics::global();
    let labels = RouteLabels {
        route: route.to_string(),
    };
    if overloaded {
        m.overloaded.get_or_create(&labels).inc();
    } else {
        m.no_backend.get_or_create(&labels).inc();
    }
}

/// Removes a route's refusal counters, unless another pool still serves `route`.
pub(super) fn remove_route(route: &str, backends_released: bool) {
    if !backends_released {
        return;
    }
    let m = PoolMetrics::global();
    let labels = RouteLabels {
        route: route.to_string(),
    };
    m.overloaded.remove(&labels);
    m.no_backend.remove(&labels);
}
