//! HTTP clients to backends: hyper-util's keep-alive pool for HTTP/1.1 and one multiplexed
//! connection per backend for h2c, both dialing through the gateway's connector.

use super::connector::{DialConnector, DialedConn};
use crate::http::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use meshgate_config::route::BackendProtocol;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Pooled keep-alive connections to backends: hyper-util's pool for HTTP/1.1, one
/// multiplexed connection per backend for h2c.
pub(crate) struct Clients {
    h1: Client<AttemptConnector, Body>,
    h2c: H2cConnections,
}

/// h2c backends: one multiplexed connection per backend address. hyper-util keys its pool by
/// the URI authority, which h2 also sends as `:authority`; with this map the backend is the
/// pool's choice while `:authority` is the host the client asked for.
struct H2cConnections {
    connector: AttemptConnector,
    senders: std::sync::Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

/// A failed request to a backend; `connect` when the backend received nothing of it.
pub(crate) struct BackendError {
    pub(crate) connect: bool,
    pub(crate) error: Box<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    fn connect(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BackendError {
            connect: true,
            error: error.into(),
        }
    }
}

impl H2cConnections {
    async fn send(
        &self,
        backend: SocketAddr,
        req: Request<Body>,
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
        let mut sender = self.open(backend).await?;
        sender.try_send_request(req).await.map_err(|mut e| {
            self.forget(backend);
            BackendError {
                // Handed back unsent: the backend saw nothing of it.
                connect: e.take_message().is_some(),
                error: e.into_error().into(),
            }
        })
    }

    fn cached(&self, backend: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if senders.get(&backend).is_some_and(|s| s.is_closed()) {
            senders.remove(&backend);
        }
    }

    async fn open(&self, backend: SocketAddr) -> Result<http2::SendRequest<Body>, BackendError> {
        let uri = format!("http://{backend}/")
            .parse::<http::Uri>()
            .map_err(BackendError::connect)?;
        let io = tower_service::Service::call(&mut self.connector.clone(), uri)
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
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(backend, sender.clone());
        Ok(sender)
    }
}

tokio::task_local! {
    /// The current request's cap on one backend connect attempt: the route's
    /// `connect_attempt_timeout_ms`, cut to what is left of its `connect_timeout_ms` budget.
    /// hyper-util calls the connector from the request's own future when it opens a new
    /// connection, so the connector sees the value of the request that asked for it.
    static CONNECT_ATTEMPT: Duration;
}

/// The gateway's connector, with each connect attempt bounded by the requesting route's pool
/// settings (see [`CONNECT_ATTEMPT`]) on top of the connector's own cap.
#[derive(Clone)]
struct AttemptConnector(DialConnector);

impl tower_service::Service<http::Uri> for AttemptConnector {
    type Response = DialedConn;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<DialedConn>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let limit = CONNECT_ATTEMPT.try_with(|d| *d).ok();
        let connect = self.0.call(uri);
        Box::pin(async move {
            match limit {
                None => connect.await,
                Some(limit) => tokio::time::timeout(limit, connect).await.map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "backend connect attempt timed out",
                    )
                })?,
            }
        })
    }
}

/// Idle keep-alive connections kept per backend (each closes after 60 s unused).
const IDLE_CONNECTIONS_PER_BACKEND: usize = 4096;

impl Clients {
    pub(crate) fn new(connector: DialConnector) -> Self {
        let connector = AttemptConnector(connector);
        let mut b = Client::builder(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            // Above any steady concurrency one backend sees (h2 clients multiplex hundreds of
            // requests): a returned connection beyond this limit is closed, and reopening it
            // costs a handshake and, over the overlay, fresh socket buffers on both nodes.
            // Measured with h2load (500 streams): 256 closed one connection per ~11 requests.
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_BACKEND);
        let h1 = b.build(connector.clone());
        let h2c = H2cConnections {
            connector,
            senders: Default::default(),
        };
        Clients { h1, h2c }
    }

    /// Sends `req` to `backend`; a new connection's connect is bounded by `attempt`.
    pub(crate) async fn send(
        &self,
        protocol: BackendProtocol,
        backend: SocketAddr,
        req: Request<Body>,
        attempt: Duration,
    ) -> Result<Response<Incoming>, BackendError> {
        CONNECT_ATTEMPT
            .scope(attempt, self.send_now(protocol, backend, req))
            .await
    }

    async fn send_now(
        &self,
        protocol: BackendProtocol,
        backend: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BackendError> {
        match protocol {
            BackendProtocol::Http1 => self.h1.request(req).await.map_err(|e| BackendError {
                connect: e.is_connect(),
                error: e.into(),
            }),
            BackendProtocol::H2c => self.h2c.send(backend, req).await,
        }
    }
}
