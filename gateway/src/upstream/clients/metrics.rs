//! The idle HTTP/1.1 pool on `/metrics`: idle connections kept now, and idle connections
//! closed by reason. The gauge is read from the pool at scrape time (the request path pays
//! nothing for it).

use super::H1Pool;
use crate::observe::collector::encode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::Weak;

/// Idle connections the pool closed, by reason.
#[derive(Default)]
pub(super) struct IdleClosed {
    /// Beyond the kept count and unused for the surplus timeout.
    pub(super) surplus: Counter,
    /// Unused for the idle timeout.
    pub(super) expired: Counter,
    /// Returned while the backend already had its cap of idle connections.
    pub(super) over_cap: Counter,
    /// Closed by the backend (or broken) while idle.
    pub(super) backend_closed: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Reads the pool's idle connections and close counters; holds the pool weakly, so a
/// registry outliving it reports zero idle connections.
#[derive(Clone)]
pub(crate) struct IdleObserver {
    pool: Weak<H1Pool>,
}

impl std::fmt::Debug for IdleObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdleObserver")
    }
}

impl IdleObserver {
    pub(super) fn new(pool: Weak<H1Pool>) -> Self {
        IdleObserver { pool }
    }

    /// Idle connections in the pool now, over every backend.
    pub(crate) fn idle(&self) -> usize {
        self.pool.upgrade().map_or(0, |p| {
            p.lock().backends.values().map(|b| b.idle.len()).sum()
        })
    }
}

impl Collector for IdleObserver {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode(
            &mut encoder,
            "meshgate_upstream_idle_connections",
            "Idle keep-alive HTTP/1.1 connections to backends, kept for reuse",
            &ConstGauge::new(self.idle() as i64),
        )?;
        let closed = Family::<ReasonLabel, Counter>::default();
        if let Some(pool) = self.pool.upgrade() {
            let c = &pool.closed;
            for (reason, counter) in [
                ("surplus", &c.surplus),
                ("expired", &c.expired),
                ("over_cap", &c.over_cap),
                ("backend_closed", &c.backend_closed),
            ] {
                closed
                    .get_or_create(&ReasonLabel { reason })
                    .inc_by(counter.get());
            }
        }
        encode(
            &mut encoder,
            "meshgate_upstream_idle_closed",
            "Idle backend connections closed, by reason: surplus (beyond \
             upstream.idle_kept_per_backend, unused for upstream.surplus_idle_timeout_ms), \
             expired (upstream.idle_timeout_ms), over_cap (returned beyond \
             upstream.max_idle_per_backend), backend_closed",
            &closed,
        )
    }
}
