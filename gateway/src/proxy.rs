//! The HTTP proxy for terminated TLS (and plain-HTTP routes on :80): route by Host, pick a
//! backend, forward the request with streamed bodies, pass upgrades (WebSocket) through.

use crate::backend::{DialConnector, DialedConn};
use crate::io::Activity;
use crate::metrics::{RequestLabel, RouteLabel};
use crate::pool::{ClientInfo, Failure, Lease, MAX_REQUEST_RETRIES, Outcome, may_retry};
use crate::routes::{RouteEntry, normalize_host};
use crate::server::Inner;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_config::route::BackendProtocol;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Pooled keep-alive connections to backends: hyper-util's pool for HTTP/1.1, one
/// multiplexed connection per backend for h2c.
pub struct Clients {
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
struct BackendError {
    connect: bool,
    error: Box<dyn std::error::Error + Send + Sync>,
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
pub struct AttemptConnector(DialConnector);

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
    pub fn new(connector: DialConnector) -> Self {
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

    async fn send(
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

/// Who is on the other side of a client connection.
#[derive(Clone)]
pub struct ConnInfo {
    pub client: SocketAddr,
    /// `https` or `http`: what the client used.
    pub proto: &'static str,
    pub activity: Activity,
}

pub fn full(status: StatusCode, text: &'static str) -> Response<Body> {
    let body = format!(
        "<!doctype html><title>{0} {1}</title><h1>{0} {1}</h1><p>{2}</p>\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        text
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn empty() -> Body {
    Empty::new().map_err(|n: Infallible| match n {}).boxed()
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
    if te_trailers {
        // gRPC needs `te: trailers` end to end; it is the one TE value h2 allows.
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (`Connection: upgrade`).
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    wants.then(|| req.headers().get(header::UPGRADE).cloned())?
}

/// The host a request is for: `:authority` (h2) or `Host`.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// A DNS name (any case, optional trailing dot) or an IP literal (`[v6]` for IPv6), with an
/// optional `:port`.
fn is_valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    let name_ok = name.is_none_or(|n| {
        n.parse::<std::net::Ipv4Addr>().is_ok() || meshgate_config::host::HostName::parse(n).is_ok()
    });
    port_ok && name_ok
}

fn set_forwarded(h: &mut HeaderMap, ci: &ConnInfo, host: &str) {
    // We are the edge: client-supplied forwarding headers are replaced, not trusted.
    let ip = ci.client.ip().to_canonical();
    let for_value = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let pairs = [
        ("x-forwarded-for", ip.to_string()),
        ("x-forwarded-proto", ci.proto.to_string()),
        ("x-forwarded-host", host.to_string()),
        (
            "forwarded",
            format!("for={for_value};proto={};host=\"{host}\"", ci.proto),
        ),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
}

/// Serves one request arriving on a client connection.
pub async fn handle(
    gw: Arc<Inner>,
    req: Request<Incoming>,
    ci: ConnInfo,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let Some(host) = request_host(&req) else {
        return Ok(full(StatusCode::BAD_REQUEST, "The request names no host."));
    };
    // The host is echoed into `Forwarded`, `X-Forwarded-Host` and `Location`: only names and
    // IP literals may pass, so a wildcard route cannot carry injected quotes or parameters.
    if !is_valid_host(&host) {
        return Ok(full(
            StatusCode::BAD_REQUEST,
            "The request host is not valid.",
        ));
    }
    let host = normalize_host(&host);
    let entry = gw.routes().lookup(&host);
    let (route_name, resp) = match entry {
        None => {
            gw.metrics.error("unknown", "unknown_host");
            (
                "unknown".to_string(),
                full(StatusCode::NOT_FOUND, "No site is served under this name."),
            )
        }
        Some(entry) if ci.proto == "http" && !entry.route.options.allow_plain_http => (
            entry.route.host.as_str().to_owned(),
            redirect_https(&host, &req),
        ),
        Some(entry) => (
            entry.route.host.as_str().to_owned(),
            forward(&gw, &entry, req, &ci, &host).await,
        ),
    };
    let elapsed = start.elapsed();
    let status = resp.status();
    gw.metrics
        .requests
        .get_or_create(&RequestLabel {
            route: route_name.clone(),
            status: format!("{}xx", status.as_u16() / 100),
        })
        .inc();
    gw.metrics
        .latency
        .get_or_create(&RouteLabel {
            route: route_name.clone(),
        })
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        target: "access",
        client = %ci.client,
        proto = ci.proto,
        route = %route_name,
        host = %host,
        method = %method,
        path = %path,
        status = status.as_u16(),
        ms = elapsed.as_millis() as u64,
        "request"
    );
    let label = RouteLabel { route: route_name };
    let out = gw.metrics.bytes_out.get_or_create(&label).clone();
    Ok(resp.map(|b| {
        b.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                out.inc_by(d.len() as u64);
            }
            f
        })
        .boxed()
    }))
}

fn redirect_https<B>(host: &str, req: &Request<B>) -> Response<Body> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = full(
        StatusCode::PERMANENT_REDIRECT,
        "This site is served over HTTPS.",
    );
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{pq}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

async fn forward(
    gw: &Arc<Inner>,
    entry: &RouteEntry,
    mut req: Request<Incoming>,
    ci: &ConnInfo,
    host: &str,
) -> Response<Body> {
    let route = &entry.route;
    let upgrade = upgrade_of(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if let Some(up) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, up.clone());
    }
    if !headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    set_forwarded(&mut headers, ci, host);
    let protocol = route.options.backend_protocol;
    // h1: the URI names the backend (hyper-util dials and pools by it) and Host is kept.
    // h2c: the URI's authority is sent as `:authority`, so it is the client's host (already
    // validated), which h2 carries instead of Host.
    let (version, h2c_authority) = match protocol {
        BackendProtocol::Http1 => (Version::HTTP_11, None),
        BackendProtocol::H2c => {
            // The same precedence as `request_host`: the value that was validated.
            let host_header = headers.remove(header::HOST);
            let authority = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| host_header.and_then(|v| v.to_str().ok().map(str::to_string)))
                .unwrap_or_else(|| host.to_string());
            (Version::HTTP_2, Some(authority))
        }
    };
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let label = RouteLabel {
        route: route.host.as_str().to_owned(),
    };
    let bytes_in = gw.metrics.bytes_in.get_or_create(&label).clone();
    let body = LentBody::new(
        body.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                bytes_in.inc_by(d.len() as u64);
            }
            f
        })
        .boxed(),
    );
    let client_info = ClientInfo {
        ip: ci.client.ip().to_canonical(),
        sticky_cookie: cookie(&headers, &entry.pool.config().sticky_cookie),
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0;
    // Getting a connection (queue wait and every connect attempt across backends) shares one
    // budget, so black-holed backends cannot make a request wait n × the attempt timeout.
    let pool_config = entry.pool.config();
    let connect_deadline = Instant::now() + pool_config.connect_timeout();
    let no_backend = |why: &dyn std::fmt::Display| {
        gw.metrics.error(route.host.as_str(), "no_backend");
        tracing::warn!(route = %route.host, error = %why, "no backend available");
        full(
            StatusCode::SERVICE_UNAVAILABLE,
            "The site is not available right now.",
        )
    };
    loop {
        let mut lease = match entry.pool.pick(&client_info, &tried).await {
            Ok(l) => l,
            Err(e) => return no_backend(&e),
        };
        let left = connect_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop(lease);
            return no_backend(&"connect timeout spent");
        }
        let attempt = pool_config.connect_attempt_timeout().min(left);
        let addr = lease.backend();
        tried.push(addr);
        let authority = h2c_authority.clone().unwrap_or_else(|| addr.to_string());
        let uri = match format!("http://{authority}{pq}").parse::<http::Uri>() {
            Ok(u) => u,
            Err(_) => return full(StatusCode::BAD_REQUEST, "The request target is not valid."),
        };
        let mut breq = Request::new(body.lend());
        *breq.method_mut() = parts.method.clone();
        *breq.uri_mut() = uri;
        *breq.version_mut() = version;
        *breq.headers_mut() = headers.clone();
        let started = Instant::now();
        let sent = CONNECT_ATTEMPT.scope(attempt, gw.clients.send(protocol, addr, breq));
        let failure = match tokio::time::timeout(gw.timeouts.request(), sent).await {
            Err(_) => {
                lease.report(Outcome::Timeout);
                gw.metrics.error(route.host.as_str(), "backend_timeout");
                tracing::warn!(route = %route.host, backend = %addr, "backend response timed out");
                return full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "The site did not answer in time.",
                );
            }
            Ok(Ok(resp)) => {
                lease.record(Outcome::from_status(
                    resp.status().as_u16(),
                    started.elapsed(),
                ));
                return response(gw, resp, client_upgrade, ci, route.host.as_str(), lease);
            }
            Ok(Err(BackendError {
                connect: true,
                error,
            })) => {
                let timed_out = is_timeout(&*error);
                lease.report(if timed_out {
                    Outcome::Timeout
                } else {
                    Outcome::ConnectFailed
                });
                gw.metrics.error(route.host.as_str(), "backend_connect");
                tracing::warn!(route = %route.host, backend = %addr, error = %error_chain(&*error), "backend connect failed");
                Failure::ConnectFailed
            }
            Ok(Err(BackendError { error, .. })) => {
                lease.report(Outcome::Reset);
                gw.metrics.error(route.host.as_str(), "backend_io");
                tracing::warn!(route = %route.host, backend = %addr, error = %error_chain(&*error), "backend request failed");
                Failure::ClosedBeforeResponse
            }
        };
        // A request whose body went (even partly) to a backend is never replayed.
        let again = may_retry(&parts.method, body.started(), &failure)
            && (failure == Failure::ConnectFailed || retries < MAX_REQUEST_RETRIES);
        if !again {
            return full(StatusCode::BAD_GATEWAY, "The site could not be reached.");
        }
        if failure != Failure::ConnectFailed {
            retries += 1;
        }
    }
}

/// The client's request body, lent to one backend attempt at a time. It stays in the shared
/// slot until hyper first polls it, so after a failed connect (nothing polled) the next
/// backend gets it whole; once polled it counts as started and is never offered again.
struct LentBody {
    slot: Arc<std::sync::Mutex<Option<Body>>>,
    started: Arc<std::sync::atomic::AtomicBool>,
}

impl LentBody {
    fn new(body: Body) -> Self {
        LentBody {
            slot: Arc::new(std::sync::Mutex::new(Some(body))),
            started: Arc::default(),
        }
    }

    /// A request body reading from the shared slot.
    fn lend(&self) -> Body {
        LentBody {
            slot: self.slot.clone(),
            started: self.started.clone(),
        }
        .boxed()
    }

    /// Whether any attempt has polled the body (some of it may have been sent).
    fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
    }

    fn with_body<T>(&self, f: impl FnOnce(Option<&mut Body>) -> T) -> T {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        f(slot.as_mut())
    }
}

impl hyper::body::Body for LentBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
        self.with_body(|b| match b {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.with_body(|b| b.is_none_or(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.with_body(|b| {
            b.map_or_else(|| hyper::body::SizeHint::with_exact(0), |b| b.size_hint())
        })
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        cur = c.source();
    }
    false
}

fn response(
    gw: &Arc<Inner>,
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ci: &ConnInfo,
    route: &str,
    lease: Lease,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return full(StatusCode::BAD_GATEWAY, "The site answered unexpectedly.");
        };
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        let idle = gw.timeouts.idle();
        let activity = ci.activity.clone();
        let route = route.to_string();
        tokio::spawn(async move {
            // The lease (the backend's in-flight slot) lives as long as the tunnel.
            let _lease = lease;
            let (c, b) = match tokio::join!(client_upgrade, backend_upgrade) {
                (Ok(c), Ok(b)) => (c, b),
                _ => return,
            };
            let mut c = TokioIo::new(c);
            let mut b = TokioIo::new(b);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut c, &mut b) => {
                    if let Ok((up, down)) = r {
                        tracing::debug!(route = %route, up, down, "upgraded stream closed");
                    }
                }
                _ = activity.idle(idle) => {
                    tracing::debug!(route = %route, "upgraded stream idle, closing");
                }
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, empty());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::TE);
    // The lease is released when the response body ends (or the client goes away).
    let body = body.map_frame(move |f| {
        let _ = &lease;
        f
    });
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    fn gateway_config(text: &str) -> meshgate_config::gateway::GatewayConfig {
        meshgate_config::gateway::GatewayConfig::parse(std::path::Path::new("g.toml"), text)
            .expect("test config parses")
    }

    #[tokio::test]
    async fn failed_reload_keeps_ssrf_guard_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        let listen = "listen = { https = [\"127.0.0.1:0\"], http = [] }\n";
        let route = format!(
            "[[route]]\nhost = \"a.example.org\"\nbackends = [{{ addr = \"{backend}\" }}]\n"
        );
        let gw = crate::server::Gateway::new(
            gateway_config(&format!("{listen}{route}")),
            None,
            None,
            |_| false,
        )
        .expect("gateway starts");
        // Relaxes the guard but cannot apply: its certificate files do not exist.
        let broken = gateway_config(&format!(
            "{listen}[security]\nallow_private_backends = true\n\
             [[tls.certificates]]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n{route}"
        ));
        assert!(gw.inner().apply(broken).is_err());
        let entry = gw.inner().routes().lookup("a.example.org").expect("route");
        let lease = entry
            .pool
            .pick(&ClientInfo::from_ip("192.0.2.1".parse().unwrap()), &[])
            .await
            .expect("lease");
        let dialed = lease.dial().await.map(|_| ()).map_err(|e| e.error.kind());
        assert_eq!(dialed, Err(std::io::ErrorKind::PermissionDenied));
    }

    #[test]
    fn hosts_must_be_names_or_ip_literals() {
        for good in [
            "a.example.org",
            "A.Example.org.",
            "a.example.org:8443",
            "localhost",
            "192.0.2.1",
            "192.0.2.1:80",
            "[2001:db8::1]",
            "[2001:db8::1]:443",
        ] {
            assert!(is_valid_host(good), "{good}");
        }
        for bad in [
            "a\";for=\"1.example.org",
            "a example.org",
            "a.example.org:",
            "a.example.org:99999",
            "a.example.org:8x",
            "a..example.org",
            "user@a.example.org",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "[not-v6]:443",
            "2001:db8::1",
            "",
        ] {
            assert!(!is_valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn forwarded_headers_replace_client_supplied() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let ci = ConnInfo {
            client: "[::ffff:192.0.2.1]:5000".parse().unwrap(),
            proto: "https",
            activity: Activity::default(),
        };
        set_forwarded(&mut h, &ci, "a.example");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.1;proto=https;host=\"a.example\""
        );
    }
}
