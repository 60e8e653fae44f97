//! Requests to backends over kept-alive connections: a pool of HTTP/1.1 connections per
//! backend address and one multiplexed h2c connection per backend. Every new connection is
//! dialled through the gateway's [`Dialer`], bounded by the attempt timeout its caller passes.
//! How many idle connections are kept, and how long, is `[upstream]` in `gateway.toml`.

use super::dial::{BoxStream, Dialer};
use bytes::Bytes;
use foldhash::fast::RandomState;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_config::route::BackendProtocol;
use meshgate_config::upstream::Upstream;
use metrics::IdleClosed;
pub(crate) use metrics::IdleObserver;
use std::collections::{HashMap, VecDeque};
use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A request body as the proxy hands it over.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

// The idle pool's bounds are `[upstream]` (meshgate_config::upstream, defaults there):
// `max_idle_per_backend` (4096) is above any steady concurrency one backend sees (h2 clients
// multiplex hundreds of requests), since a returned connection beyond it is closed and
// reopening costs a handshake and, over the overlay, socket buffers on both nodes (h2load,
// 500 streams: a cap of 256 closed one connection per ~11 requests). Only the
// `idle_kept_per_backend` (64) most recently returned stay the whole `idle_timeout_ms`; the
// rest close after `surplus_idle_timeout_ms` (5 s) unused, so a burst's connections serve the
// burst and then go (h2load with 500 streams left ~500 idle overlay connections a minute
// later, each with its stream, task and buffers).

/// How often expired idle connections are looked for (at most every `idle_timeout`).
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Caps a connect attempt whatever its caller asks: routes may allow more than
/// `[timeouts] connect_ms`, but nothing waits on a dial forever.
const CONNECT_CAP: Duration = Duration::from_secs(60);

/// Keep-alive connections to backends; one per gateway, shared by every request.
pub(crate) struct Clients {
    dialer: Arc<dyn Dialer>,
    h1: Arc<H1Pool>,
    h2c: H2cConnections,
}

/// A failed request to a backend.
#[derive(Debug)]
pub(crate) struct BackendError {
    /// The backend received nothing of the request: it may go to another backend whatever its
    /// method.
    pub(crate) connect: bool,
    pub(crate) error: Box<dyn Error + Send + Sync>,
}

impl BackendError {
    fn connect(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        BackendError {
            connect: true,
            error: error.into(),
        }
    }
}

impl Clients {
    /// Clients whose idle HTTP/1.1 pool keeps what `upstream` allows.
    pub(crate) fn new(dialer: Arc<dyn Dialer>, upstream: &Upstream) -> Self {
        Clients {
            dialer,
            h1: Arc::new(H1Pool {
                idle_timeout: upstream.idle_timeout(),
                kept: upstream.idle_kept_per_backend,
                surplus_timeout: upstream.surplus_idle_timeout(),
                max_idle: upstream.max_idle_per_backend,
                state: Mutex::default(),
                closed: IdleClosed::default(),
            }),
            h2c: H2cConnections::default(),
        }
    }

    /// The idle pool's gauge and counters, for `/metrics`.
    pub(crate) fn observer(&self) -> IdleObserver {
        IdleObserver::new(Arc::downgrade(&self.h1))
    }

    /// Sends `req` to `backend` over a kept-alive connection or a new one whose connect is
    /// bounded by `attempt`. For HTTP/1.1 the URI names the backend (`http://ip:port/path`);
    /// for h2c its authority is sent as `:authority`.
    pub(crate) async fn send(
        &self,
        protocol: BackendProtocol,
        backend: SocketAddr,
        req: Request<Body>,
        attempt: Duration,
    ) -> Result<Response<Incoming>, BackendError> {
        match protocol {
            BackendProtocol::Http1 => self.send_h1(backend, req, attempt).await,
            BackendProtocol::H2c => self.h2c.send(&self.dialer, backend, req, attempt).await,
        }
    }

    async fn send_h1(
        &self,
        backend: SocketAddr,
        mut req: Request<Body>,
        attempt: Duration,
    ) -> Result<Response<Incoming>, BackendError> {
        to_origin_form(&mut req);
        loop {
            let (mut sender, reused) = self.h1_connection(backend, attempt).await?;
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.h1.release(backend, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // A kept connection the backend closed meanwhile: a request it did not take
                    // goes on another connection.
                    Some(unsent) if reused => req = unsent,
                    unsent => {
                        return Err(BackendError {
                            connect: unsent.is_some(),
                            error: e.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// An idle connection to `backend`, else whichever comes first: a new one, or one that
    /// another request returns meanwhile (a new connection that loses joins the pool).
    /// `true` with a kept connection.
    async fn h1_connection(
        &self,
        backend: SocketAddr,
        attempt: Duration,
    ) -> Result<(http1::SendRequest<Body>, bool), BackendError> {
        let mut waiter = {
            let mut state = self.h1.lock();
            if let Some(sender) = state.pop(backend, self.h1.idle_timeout, &self.h1.closed) {
                return Ok((sender, true));
            }
            let (tx, rx) = oneshot::channel();
            state
                .backends
                .entry(backend)
                .or_default()
                .waiters
                .push_back(tx);
            Waiter {
                rx,
                pool: &self.h1,
                backend,
            }
        };
        // Boxed so that, if a returned connection wins, the connect can finish in its own task.
        let mut connect = Box::pin(connect_h1(self.dialer.clone(), backend, attempt));
        let mut waiting = true;
        loop {
            tokio::select! {
                biased;
                returned = &mut waiter.rx, if waiting => match returned {
                    Ok(sender) if sender.is_ready() => {
                        let pool = self.h1.clone();
                        tokio::spawn(async move {
                            if let Ok(mut sender) = connect.await
                                && sender.ready().await.is_ok()
                            {
                                pool.put(backend, sender);
                            }
                        });
                        return Ok((sender, true));
                    }
                    _ => waiting = false,
                },
                connected = &mut connect => return connected.map(|sender| (sender, false)),
            }
        }
    }
}

/// Opens an HTTP/1.1 connection to `backend`; upgrades (`101 Switching Protocols`) reach the
/// response's `hyper::upgrade::on`.
async fn connect_h1(
    dialer: Arc<dyn Dialer>,
    backend: SocketAddr,
    attempt: Duration,
) -> Result<http1::SendRequest<Body>, BackendError> {
    let io = dial(&*dialer, backend, attempt)
        .await
        .map_err(BackendError::connect)?;
    let (sender, conn) = http1::handshake(io).await.map_err(BackendError::connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %backend, error = %e, "backend connection ended");
        }
    });
    Ok(sender)
}

/// Dials `backend`, giving up after `attempt` (at most [`CONNECT_CAP`]).
async fn dial(
    dialer: &dyn Dialer,
    backend: SocketAddr,
    attempt: Duration,
) -> io::Result<TokioIo<BoxStream>> {
    let (limit, what) = if attempt < CONNECT_CAP {
        (attempt, "backend connect attempt timed out")
    } else {
        (CONNECT_CAP, "backend connect timed out")
    };
    match tokio::time::timeout(limit, dialer.dial(backend)).await {
        Ok(stream) => Ok(TokioIo::new(stream?)),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, what)),
    }
}

/// HTTP/1.1 wants the request target in origin form (`/path?query`; authority form for
/// CONNECT) and a `Host` header, which defaults to the URI's authority.
fn to_origin_form(req: &mut Request<Body>) {
    let uri = req.uri();
    // The proxy's requests come in origin form with `Host` set: nothing to do.
    if uri.authority().is_none() && req.headers().contains_key(header::HOST) {
        return;
    }
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = uri.host()
    {
        let value = match uri.port_u16() {
            Some(port) if port != 80 => HeaderValue::from_str(&format!("{host}:{port}")),
            _ => HeaderValue::from_str(host),
        };
        if let Ok(value) = value {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    let mut parts = http::uri::Parts::default();
    if req.method() == Method::CONNECT {
        parts.authority = req.uri().authority().cloned();
    } else {
        parts.path_and_query = req.uri().path_and_query().filter(|pq| *pq != "/").cloned();
    }
    *req.uri_mut() = if parts.authority.is_none() && parts.path_and_query.is_none() {
        Uri::default() // `/`
    } else {
        Uri::from_parts(parts).unwrap_or_default()
    };
}

/// Idle HTTP/1.1 connections per backend address, and the requests waiting for one.
struct H1Pool {
    /// An idle connection unused this long closes.
    idle_timeout: Duration,
    /// Idle connections per backend kept for `idle_timeout` (the most recently returned).
    kept: usize,
    /// How long the idle connections beyond `kept` stay unused before they close.
    surplus_timeout: Duration,
    /// Idle connections per backend at most; one returned beyond it closes.
    max_idle: usize,
    state: Mutex<H1State>,
    closed: IdleClosed,
}

#[derive(Default)]
struct H1State {
    /// Backend addresses come from routes, never from request input: foldhash, not SipHash.
    backends: HashMap<SocketAddr, H1Backend, RandomState>,
    /// Whether the task closing expired idle connections runs.
    reaper: bool,
}

#[derive(Default)]
struct H1Backend {
    /// Most recently returned last: reused first, and the oldest expire first.
    idle: Vec<IdleConnection>,
    /// Requests connecting that take a connection another request returns first.
    waiters: VecDeque<oneshot::Sender<http1::SendRequest<Body>>>,
}

struct IdleConnection {
    since: Instant,
    sender: http1::SendRequest<Body>,
}

impl H1Pool {
    fn lock(&self) -> MutexGuard<'_, H1State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `sender` back once its response is read and it is ready for the next request.
    /// hyper-util waits the same way (a small task when the body is still streaming).
    fn release(self: &Arc<Self>, backend: SocketAddr, mut sender: http1::SendRequest<Body>) {
        if sender.is_ready() {
            self.put(backend, sender);
        } else if !sender.is_closed() {
            let pool = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(backend, sender);
                }
            });
        }
    }

    /// A ready connection: to the first request waiting for one, else idle.
    fn put(self: &Arc<Self>, backend: SocketAddr, mut sender: http1::SendRequest<Body>) {
        let mut state = self.lock();
        let entry = state.backends.entry(backend).or_default();
        while let Some(waiter) = entry.waiters.pop_front() {
            match waiter.send(sender) {
                Ok(()) => return,
                Err(back) => sender = back,
            }
        }
        if entry.idle.len() >= self.max_idle {
            self.closed.over_cap.inc();
            return;
        }
        entry.idle.push(IdleConnection {
            since: Instant::now(),
            sender,
        });
        if !state.reaper {
            state.reaper = true;
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

impl H1State {
    fn pop(
        &mut self,
        backend: SocketAddr,
        idle_timeout: Duration,
        closed: &IdleClosed,
    ) -> Option<http1::SendRequest<Body>> {
        let idle = &mut self.backends.get_mut(&backend)?.idle;
        while let Some(c) = idle.pop() {
            if c.since.elapsed() > idle_timeout {
                // The rest were returned earlier: expired too.
                closed.expired.inc_by(idle.len() as u64 + 1);
                idle.clear();
                return None;
            }
            if c.sender.is_ready() {
                return Some(c.sender);
            }
            closed.backend_closed.inc();
        }
        None
    }
}

/// Every [`REAP_EVERY`] (or `idle_timeout` if shorter), closes the idle connections that
/// expired or that the backend closed, as long as the pool lives.
async fn reap(pool: Weak<H1Pool>, idle_timeout: Duration) {
    let every = idle_timeout.min(REAP_EVERY);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.reap_once();
    }
}

impl H1Pool {
    /// Closes idle connections that expired: unused for `idle_timeout`, or beyond the `kept`
    /// most recently returned and unused for `surplus_timeout`; and those the backend closed.
    fn reap_once(&self) {
        let (idle_timeout, surplus_timeout) = (self.idle_timeout, self.surplus_timeout);
        let closed = &self.closed;
        let mut state = self.lock();
        state.backends.retain(|_, b| {
            // Oldest first: the first `surplus` are beyond the kept count.
            let surplus = b.idle.len().saturating_sub(self.kept);
            let mut position = 0;
            b.idle.retain(|c| {
                let unused = c.since.elapsed();
                let beyond_kept = position < surplus;
                position += 1;
                if unused > idle_timeout {
                    closed.expired.inc();
                } else if beyond_kept && unused > surplus_timeout {
                    closed.surplus.inc();
                } else if !c.sender.is_ready() {
                    closed.backend_closed.inc();
                } else {
                    return true;
                }
                false
            });
            b.waiters.retain(|w| !w.is_closed());
            !b.idle.is_empty() || !b.waiters.is_empty()
        });
    }
}

/// A request's place in its backend's waiters; leaves it when dropped.
struct Waiter<'a> {
    rx: oneshot::Receiver<http1::SendRequest<Body>>,
    pool: &'a Arc<H1Pool>,
    backend: SocketAddr,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.rx.close();
        // Handed over while the request went with another connection: back to the pool.
        let returned = self.rx.try_recv().ok();
        {
            let mut state = self.pool.lock();
            if let Some(b) = state.backends.get_mut(&self.backend) {
                b.waiters.retain(|w| !w.is_closed());
            }
        }
        if let Some(sender) = returned.filter(|s| s.is_ready()) {
            self.pool.put(self.backend, sender);
        }
    }
}

/// h2c backends: one multiplexed connection per backend address, so the backend is the
/// pool's choice while `:authority` is the host the client asked for.
#[derive(Default)]
struct H2cConnections {
    senders: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>, RandomState>>,
}

impl H2cConnections {
    async fn send(
        &self,
        dialer: &Arc<dyn Dialer>,
        backend: SocketAddr,
        req: Request<Body>,
        attempt: Duration,
    ) -> Result<Response<Incoming>, BackendError> {
        let req = match self.cached(backend) {
            None => req,
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => {
                    self.forget(backend);
                    // A kept connection the backend closed meanwhile: a request it did not
                    // take goes on a new connection.
                    match e.take_message() {
                        Some(req) => req,
                        None => {
                            return Err(BackendError {
                                connect: false,
                                error: e.into_error().into(),
                            });
                        }
                    }
                }
            },
        };
        let mut sender = self.open(dialer, backend, attempt).await?;
        sender.try_send_request(req).await.map_err(|mut e| {
            self.forget(backend);
            BackendError {
                // Handed back unsent: the backend saw nothing of it.
                connect: e.take_message().is_some(),
                error: e.into_error().into(),
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, http2::SendRequest<Body>, RandomState>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, backend: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let mut senders = self.lock();
        match senders.get(&backend) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                senders.remove(&backend);
                None
            }
            None => None,
        }
    }

    fn forget(&self, backend: SocketAddr) {
        let mut senders = self.lock();
        if senders.get(&backend).is_some_and(|s| s.is_closed()) {
            senders.remove(&backend);
        }
    }

    async fn open(
        &self,
        dialer: &Arc<dyn Dialer>,
        backend: SocketAddr,
        attempt: Duration,
    ) -> Result<http2::SendRequest<Body>, BackendError> {
        let io = dial(&**dialer, backend, attempt)
            .await
            .map_err(BackendError::connect)?;
        let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(BackendError::connect)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %backend, error = %e, "h2c backend connection ended");
            }
        });
        sender.ready().await.map_err(BackendError::connect)?;
        self.lock().insert(backend, sender.clone());
        Ok(sender)
    }
}

mod metrics;
#[cfg(test)]
mod tests;
