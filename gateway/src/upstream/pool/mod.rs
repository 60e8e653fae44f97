//! Backend pools: several backends behind one route, chosen per request or stream by a policy,
//! with passive and active health, invisible connect retries, per-backend limits with a bounded
//! wait queue, and per-backend metrics.
//!
//! The gateway builds one [`Pool`] per route. Streams (passthrough, WebSocket tunnels) call
//! [`Pool::connect`]. The HTTP proxy calls [`Pool::pick`] per request (excluding backends it
//! already tried), reuses a keep-alive connection to [`Lease::backend`] or opens one with
//! [`Lease::dial`], and ends with [`Lease::report`]; [`may_retry`] says whether a failed
//! request may go to another backend.

mod health;
mod metrics;
mod probe;
mod retry;
mod select;

// The configuration is pure data in the config crate, so `Route` can carry it.
pub use health::{Health, HealthEvent, HealthState, Transition};
pub use meshgate_config::pool::{
    ActiveHealthConfig, PassiveHealthConfig, Policy, PoolConfig, ProbeKind,
};
pub use metrics::{PoolMetrics, register_metrics};
pub use retry::{Failure, MAX_REQUEST_RETRIES, is_idempotent, may_retry};

use crate::upstream::dial::{BoxStream, Dialer};
use meshgate_config::route::{Backend, BackendProtocol};
use metrics::BackendMetrics;
use select::{Candidate, PeakEwma, Rng};
use serde::Serialize;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Who is asking, for sticky policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip: IpAddr,
    /// Value of the route's `sticky_cookie`, when the request carries it.
    pub sticky_cookie: Option<String>,
}

impl ClientInfo {
    pub fn from_ip(ip: IpAddr) -> Self {
        ClientInfo {
            ip,
            sticky_cookie: None,
        }
    }
}

/// Why the pool could not hand out a backend. Both answer 503 to an HTTP client (see
/// [`PoolError::status`]); stream routes close the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every backend is ejected, down, already tried, or could not be connected to within the
    /// connect timeout.
    #[error("no healthy backend could be reached")]
    NoHealthyBackend,
    /// Every eligible backend is at its connection limit and the wait queue is full, or the
    /// wait timed out.
    #[error("every backend is at its connection limit")]
    Overloaded,
}

impl PoolError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> http::StatusCode {
        http::StatusCode::SERVICE_UNAVAILABLE
    }
}

/// How a request to a backend ended, reported through [`Lease::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head with a status below 500 arrived after `latency`.
    Success { status: u16, latency: Duration },
    /// A 5xx response head arrived after `latency`.
    ServerError { status: u16, latency: Duration },
    /// Connecting failed.
    ConnectFailed,
    /// Connecting or waiting for the response head timed out.
    Timeout,
    /// The connection failed (closed, reset, protocol error) before or while responding.
    Reset,
    /// The client went away; says nothing about the backend.
    Cancelled,
}

impl Outcome {
    /// `Success` or `ServerError` by status.
    pub fn from_status(status: u16, latency: Duration) -> Self {
        if status >= 500 {
            Outcome::ServerError { status, latency }
        } else {
            Outcome::Success { status, latency }
        }
    }
}

/// A backend that failed to connect, from [`Lease::dial`].
#[derive(Debug, thiserror::Error)]
#[error("connecting to backend {backend}: {error}")]
pub struct DialError {
    pub backend: SocketAddr,
    pub error: io::Error,
}

/// One backend's state, for the admin status.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: HealthState,
    /// Whether new traffic may go to it now.
    pub available: bool,
    /// Milliseconds left of the current ejection.
    pub ejected_for_ms: Option<u64>,
    pub in_flight: u32,
    pub requests: u64,
    pub errors: u64,
    pub ejections: u64,
    /// Peak-EWMA response latency in milliseconds.
    pub latency_ms: Option<f64>,
}

/// The backends of one route.
pub struct Pool {
    shared: Arc<Shared>,
    probes: Vec<JoinHandle<()>>,
}

struct Shared {
    route: String,
    cfg: PoolConfig,
    /// What the backends speak; HTTP health probes use it too.
    protocol: BackendProtocol,
    dialer: Arc<dyn Dialer>,
    backends: Vec<BackendInfo>,
    state: Mutex<State>,
    /// Woken when a lease is released, for requests waiting on a full backend.
    released: Notify,
    waiting: AtomicU32,
}

struct BackendInfo {
    addr: SocketAddr,
    weight: u32,
    metrics: BackendMetrics,
}

struct State {
    backends: Vec<BackendState>,
    rng: Rng,
    rr_current: Vec<i64>,
    /// Scratch for [`Shared::try_pick`], kept between picks so a pick allocates nothing:
    /// the eligible backends, and whether each backend has room for one more request.
    eligible: Vec<Candidate>,
    room: Vec<bool>,
}

struct BackendState {
    health: Health,
    in_flight: u32,
    latency: PeakEwma,
    requests: u64,
    errors: u64,
}

impl Pool {
    /// A pool without a route name in its metrics; see [`Pool::for_route`].
    pub fn new(backends: &[Backend], cfg: PoolConfig, dialer: Arc<dyn Dialer>) -> Arc<Pool> {
        Pool::for_route("", backends, cfg, dialer)
    }

    /// A pool of HTTP/1.1 backends whose metrics carry `route` (the route's host); see
    /// [`Pool::for_route_speaking`].
    pub fn for_route(
        route: &str,
        backends: &[Backend],
        cfg: PoolConfig,
        dialer: Arc<dyn Dialer>,
    ) -> Arc<Pool> {
        Pool::for_route_speaking(route, backends, cfg, dialer, BackendProtocol::Http1)
    }

    /// A pool whose metrics carry `route` (the route's host) and whose backends speak
    /// `protocol` (HTTP probes use it). Starts the active probe tasks when the config asks for
    /// them (needs a tokio runtime); they stop when the pool is dropped.
    pub fn for_route_speaking(
        route: &str,
        backends: &[Backend],
        cfg: PoolConfig,
        dialer: Arc<dyn Dialer>,
        protocol: BackendProtocol,
    ) -> Arc<Pool> {
        let infos: Vec<BackendInfo> = backends
            .iter()
            .map(|b| BackendInfo {
                addr: b.addr,
                weight: b.weight,
                metrics: BackendMetrics::new(route, &b.addr.to_string()),
            })
            .collect();
        let states = backends
            .iter()
            .map(|_| BackendState {
                health: Health::new(&cfg.passive, &cfg.active),
                in_flight: 0,
                latency: PeakEwma::default(),
                requests: 0,
                errors: 0,
            })
            .collect();
        let seed = seed_from(route, &infos);
        let shared = Arc::new(Shared {
            route: route.to_string(),
            protocol,
            dialer,
            state: Mutex::new(State {
                backends: states,
                rng: Rng::new(seed),
                rr_current: vec![0; infos.len()],
                eligible: Vec::with_capacity(infos.len()),
                room: Vec::with_capacity(infos.len()),
            }),
            backends: infos,
            released: Notify::new(),
            waiting: AtomicU32::new(0),
            cfg,
        });
        let probes = probe::spawn_all(&shared);
        Arc::new(Pool { shared, probes })
    }

    /// Carries health and latency knowledge over from the route's previous pool (a reload), for
    /// backends present in both, so a reload neither re-admits an ejected backend nor forgets
    /// which one is slow. Health is carried only when the health settings are unchanged.
    /// In-flight counts stay with the old pool's leases.
    pub fn inherit(&self, previous: &Pool) {
        if Arc::ptr_eq(&self.shared, &previous.shared) {
            return;
        }
        let same_health = self.shared.cfg.passive == previous.shared.cfg.passive
            && self.shared.cfg.active == previous.shared.cfg.active;
        let old = previous.shared.lock();
        let carried: Vec<(usize, Health, PeakEwma)> = self
            .shared
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let j = previous
                    .shared
                    .backends
                    .iter()
                    .position(|o| o.addr == b.addr)?;
                let s = old.backends.get(j)?;
                Some((i, s.health.clone(), s.latency.clone()))
            })
            .collect();
        drop(old);
        let mut state = self.shared.lock();
        for (i, health, latency) in carried {
            if let Some(s) = state.backends.get_mut(i) {
                if same_health {
                    s.health = health;
                }
                s.latency = latency;
            }
        }
    }

    /// What the backends speak.
    pub fn protocol(&self) -> BackendProtocol {
        self.shared.protocol
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// How many backends the pool has (healthy or not).
    pub fn backend_count(&self) -> usize {
        self.shared.backends.len()
    }

    pub fn backends(&self) -> Vec<SocketAddr> {
        self.shared.backends.iter().map(|b| b.addr).collect()
    }

    /// Chooses a backend by the policy among the available ones not in `exclude` (backends
    /// already tried for this request). When every eligible backend is at `max_connections`,
    /// waits in a bounded queue for a slot (`Overloaded` when the queue is full or the wait
    /// exceeds `queue_timeout_ms`). The lease counts as in flight until dropped or reported.
    pub async fn pick(
        &self,
        client: &ClientInfo,
        exclude: &[SocketAddr],
    ) -> Result<Lease, PoolError> {
        // A backend with a free slot (the usual case) needs no wake-up registration.
        if let Ok(Some(index)) = self.shared.try_pick(client, exclude) {
            return Ok(Lease {
                shared: self.shared.clone(),
                index,
                reported: false,
            });
        }
        let deadline = tokio::time::Instant::now() + self.shared.cfg.queue_timeout();
        // Leaves the queue however this future ends, cancellation included.
        let mut queued: Option<QueueSlot<'_>> = None;
        let result = loop {
            let released = self.shared.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.shared.try_pick(client, exclude) {
                Ok(Some(index)) => {
                    break Ok(Lease {
                        shared: self.shared.clone(),
                        index,
                        reported: false,
                    });
                }
                Ok(None) => {} // all at their limit
                Err(e) => break Err(e),
            }
            if queued.is_none() {
                let slot = QueueSlot::join(&self.shared.waiting);
                let full = slot.ahead >= self.shared.cfg.queue_size;
                queued = Some(slot);
                if full {
                    break Err(PoolError::Overloaded);
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                break Err(PoolError::Overloaded);
            }
        };
        drop(queued);
        if let Err(e) = result {
            metrics::route_refused(&self.shared.route, e == PoolError::Overloaded);
        }
        result
    }

    /// Picks a backend and opens a stream to it. A failed or timed-out connect is retried on
    /// the other backends, invisibly to the client, until one connects or the whole
    /// `connect_timeout_ms` budget is spent (each attempt capped at
    /// `connect_attempt_timeout_ms`); then `NoHealthyBackend`.
    pub async fn connect(&self, client: &ClientInfo) -> Result<(BoxStream, Lease), PoolError> {
        let deadline = tokio::time::Instant::now() + self.shared.cfg.connect_timeout();
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let lease = match tokio::time::timeout_at(deadline, self.pick(client, &tried)).await {
                Ok(Ok(lease)) => lease,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    metrics::route_refused(&self.shared.route, false);
                    return Err(PoolError::NoHealthyBackend);
                }
            };
            tried.push(lease.backend());
            let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
            match lease.dial_within(budget).await {
                Ok(ok) => return Ok(ok),
                Err(e) => {
                    tracing::debug!(route = %self.shared.route, "{e}; trying another backend");
                }
            }
        }
    }

    /// Every backend's health, load and counters.
    pub fn status(&self) -> Vec<BackendStatus> {
        let now = Instant::now();
        let state = self.shared.lock();
        self.shared
            .backends
            .iter()
            .zip(state.backends.iter())
            .map(|(info, s)| {
                let available = s.health.is_available(now);
                info.metrics.up.set(i64::from(available));
                BackendStatus {
                    addr: info.addr,
                    weight: info.weight,
                    state: s.health.state(now),
                    available,
                    ejected_for_ms: s.health.ejected_for(now).map(|d| d.as_millis() as u64),
                    in_flight: s.in_flight,
                    requests: s.requests,
                    errors: s.errors,
                    ejections: s.health.ejections(),
                    latency_ms: s.latency.value().map(|v| v * 1000.0),
                }
            })
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for p in &self.probes {
            p.abort();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let mut last = self.backends.is_empty();
        for b in &self.backends {
            b.metrics.remove();
            last = true;
        }
        metrics::remove_route(&self.route, last);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than losing the pool, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok(Some(i))`: leased backend `i`. `Ok(None)`: eligible backends exist but all are full.
    fn try_pick(
        &self,
        client: &ClientInfo,
        exclude: &[SocketAddr],
    ) -> Result<Option<usize>, PoolError> {
        let now = Instant::now();
        let limit = self.cfg.max_connections;
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut eligible = std::mem::take(&mut state.eligible);
        let mut room = std::mem::take(&mut state.room);
        eligible.clear();
        room.clear();
        for (info, s) in self.backends.iter().zip(state.backends.iter()) {
            let available = s.health.is_available(now);
            info.metrics.up.set(i64::from(available));
            // A backend on probation takes one request at a time until a success confirms it,
            // so a still broken backend fails one request, not a burst; others wait or go
            // elsewhere.
            let probing = s.health.state(now) == HealthState::Probation && s.in_flight > 0;
            room.push(!probing && (limit == 0 || s.in_flight < limit));
            // Weight 0 drains a backend: no new traffic, existing leases finish.
            if available && info.weight > 0 && !exclude.contains(&info.addr) {
                eligible.push(Candidate {
                    index: room.len() - 1,
                    addr: info.addr,
                    weight: info.weight,
                    in_flight: s.in_flight,
                    latency: s.latency.value(),
                    idle: s.latency.idle(now).as_secs_f64(),
                });
            }
        }
        let chosen = if eligible.is_empty() {
            Err(PoolError::NoHealthyBackend)
        } else {
            let has_room = |c: &Candidate| room.get(c.index).copied().unwrap_or(false);
            Ok(match self.cfg.policy {
                Policy::HashClientIp | Policy::HashCookie => {
                    // Sticky: wait for the client's own backend rather than move it elsewhere.
                    let key = self.hash_key(client);
                    let c =
                        select::rendezvous(&key, &eligible).and_then(|i| eligible.get(i).copied());
                    c.filter(has_room)
                }
                Policy::LeastLoaded => {
                    eligible.retain(has_room);
                    select::least_loaded(&mut state.rng, &eligible)
                        .and_then(|i| eligible.get(i).copied())
                }
                Policy::RoundRobin => {
                    eligible.retain(has_room);
                    select::round_robin(&mut state.rr_current, &eligible)
                        .and_then(|i| eligible.get(i).copied())
                }
            })
        };
        state.eligible = eligible;
        state.room = room;
        let chosen = chosen?;
        let Some(c) = chosen else {
            return Ok(None);
        };
        let Some(s) = state.backends.get_mut(c.index) else {
            return Ok(None);
        };
        s.in_flight += 1;
        s.requests += 1;
        if let Some(info) = self.backends.get(c.index) {
            info.metrics.in_flight.inc();
            info.metrics.requests.inc();
        }
        Ok(Some(c.index))
    }

    fn hash_key(&self, client: &ClientInfo) -> Vec<u8> {
        match (&self.cfg.policy, &client.sticky_cookie) {
            (Policy::HashCookie, Some(cookie)) if !cookie.is_empty() => {
                let mut k = b"cookie:".to_vec();
                k.extend_from_slice(cookie.as_bytes());
                k
            }
            _ => match client.ip {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
        }
    }

    /// Feeds an outcome into the backend's health, latency and counters.
    fn record(&self, index: usize, outcome: Outcome) {
        let now = Instant::now();
        let Some(info) = self.backends.get(index) else {
            return;
        };
        let (event, error_kind) = match outcome {
            Outcome::Success { latency, .. } => {
                info.metrics.latency.observe(latency.as_secs_f64());
                (Some(HealthEvent::Success), None)
            }
            Outcome::ServerError { latency, .. } => {
                info.metrics.latency.observe(latency.as_secs_f64());
                (Some(HealthEvent::ServerError), Some("server_error"))
            }
            Outcome::ConnectFailed => (Some(HealthEvent::ConnectFailed), Some("connect")),
            Outcome::Timeout => (Some(HealthEvent::Timeout), Some("timeout")),
            // A broken connection alone (a keep-alive race) must not eject, but a streak of
            // them — a backend that accepts and then drops every request — counts like 5xx.
            Outcome::Reset => (Some(HealthEvent::ServerError), Some("reset")),
            Outcome::Cancelled => (None, None),
        };
        if let Some(kind) = error_kind {
            info.metrics.error(kind);
        }
        let transition = {
            let mut state = self.lock();
            let Some(s) = state.backends.get_mut(index) else {
                return;
            };
            if let Outcome::Success { latency, .. } | Outcome::ServerError { latency, .. } = outcome
            {
                s.latency.observe(latency, now);
            }
            if error_kind.is_some() {
                s.errors += 1;
            }
            let t = event.and_then(|e| s.health.on_event(e, now));
            info.metrics.up.set(i64::from(s.health.is_available(now)));
            t
        };
        self.log_transition(index, transition);
        self.wake_waiters();
    }

    fn log_transition(&self, index: usize, transition: Option<Transition>) {
        let (Some(t), Some(info)) = (transition, self.backends.get(index)) else {
            return;
        };
        match t {
            Transition::Ejected(d) => {
                info.metrics.ejections.inc();
                tracing::warn!(route = %self.route, backend = %info.addr, "backend ejected for {d:?}");
            }
            Transition::WentDown => {
                info.metrics.ejections.inc();
                tracing::warn!(route = %self.route, backend = %info.addr, "backend down (health probes failing)");
            }
            Transition::CameUp => {
                tracing::info!(route = %self.route, backend = %info.addr, "backend back up (health probes passing)");
            }
        }
    }

    fn release(&self, index: usize) {
        {
            let mut state = self.lock();
            if let Some(s) = state.backends.get_mut(index) {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
        }
        if let Some(info) = self.backends.get(index) {
            info.metrics.in_flight.dec();
        }
        self.wake_waiters();
    }

    /// Lets queued requests look again (a slot was released or a backend confirmed).
    fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.released.notify_waiters();
        }
    }
}

/// A place in a pool's wait queue, given back on drop.
struct QueueSlot<'a> {
    waiting: &'a AtomicU32,
    /// Requests that were waiting already.
    ahead: u32,
}

impl<'a> QueueSlot<'a> {
    fn join(waiting: &'a AtomicU32) -> Self {
        let ahead = waiting.fetch_add(1, Ordering::AcqRel);
        QueueSlot { waiting, ahead }
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

fn seed_from(route: &str, backends: &[BackendInfo]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    // RandomState is randomly keyed per process: different gateways make different choices.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    route.hash(&mut h);
    backends.len().hash(&mut h);
    h.finish()
}

/// The right to send one request or hold one stream to a backend. Dropping it releases the
/// backend's in-flight slot; [`Lease::report`] also feeds the outcome to health and metrics.
pub struct Lease {
    shared: Arc<Shared>,
    index: usize,
    reported: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("backend", &self.backend())
            .finish()
    }
}

impl Lease {
    pub fn backend(&self) -> SocketAddr {
        self.shared
            .backends
            .get(self.index)
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |b| b.addr)
    }

    /// Records how the request ended (health, latency, counters) and releases the lease.
    pub fn report(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    /// Records the outcome but keeps the lease (and its in-flight slot) until it is dropped:
    /// for the proxy to report at the response head and drop the lease when the streamed
    /// response body ends. Only the first outcome of a lease counts.
    pub fn record(&mut self, outcome: Outcome) {
        if !self.reported {
            self.reported = true;
            self.shared.record(self.index, outcome);
        }
    }

    /// Opens a new stream to the leased backend through the pool's dialer, within
    /// `connect_attempt_timeout_ms`. On failure the failure is recorded (connect failure or
    /// timeout) and the lease released: pick again excluding [`DialError::backend`].
    pub async fn dial(self) -> Result<(BoxStream, Lease), DialError> {
        let budget = self.shared.cfg.connect_attempt_timeout();
        self.dial_within(budget).await
    }

    async fn dial_within(self, budget: Duration) -> Result<(BoxStream, Lease), DialError> {
        let backend = self.backend();
        let budget = budget.min(self.shared.cfg.connect_attempt_timeout());
        let result = tokio::time::timeout(budget, self.shared.dialer.dial(backend)).await;
        match result {
            Ok(Ok(stream)) => {
                self.shared.record_connected(self.index);
                Ok((stream, self))
            }
            Ok(Err(error)) => {
                self.report(Outcome::ConnectFailed);
                Err(DialError { backend, error })
            }
            Err(_) => {
                self.report(Outcome::Timeout);
                Err(DialError {
                    backend,
                    error: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {budget:?}"),
                    ),
                })
            }
        }
    }
}

impl Shared {
    /// A connect succeeded: the backend is reachable (resets the connect-failure streak and
    /// confirms a backend on probation). No latency sample: connect time is not response time.
    fn record_connected(&self, index: usize) {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(s) = state.backends.get_mut(index) {
            let t = s.health.on_event(HealthEvent::Connected, now);
            drop(state);
            self.log_transition(index, t);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(self.index);
    }
}

#[cfg(test)]
mod tests;
