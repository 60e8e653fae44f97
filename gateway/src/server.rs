//! The gateway process: shared state, listeners, and the accept → classify → route → dial →
//! splice path for each client connection.

use crate::backend::{DialConnector, GatewayDialer};
use crate::dial::Dialer;
use crate::hello::{self, HelloError, Parse};
use crate::io::{Activity, Rewind, Tracked};
use crate::metrics::{Metrics, RequestLabel, RouteLabel};
use crate::overlay_metrics::OverlayObserver;
use crate::proxy::{self, Body, Clients, ConnInfo};
use crate::routes::{RouteEntry, RouteTable};
use crate::tls::{CertMap, CertResolver, DevCa};
use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use meshgate_config::gateway::{GatewayConfig, Limits, Timeouts};
use meshgate_config::route::{Mode, Route};
use rustls::ServerConfig;
use rustls::sign::CertifiedKey;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// ACME challenge answers, provided by the certificate component.
pub trait Challenges: Send + Sync + 'static {
    /// The key authorization for an HTTP-01 token, if one is pending.
    fn http01(&self, token: &str) -> Option<String>;
    /// The TLS-ALPN-01 challenge certificate for `name`, if one is pending.
    fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>>;
}

/// Handler for `/v1/*` on the admin listener (the reservations API).
pub type ApiHandler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// State shared by every connection. Route table and certificates are swapped whole on
/// reload; connections already open keep what they had.
pub struct Inner {
    config_path: Option<PathBuf>,
    config: RwLock<Arc<GatewayConfig>>,
    reserved: RwLock<Arc<Vec<Route>>>,
    routes: RwLock<Arc<RouteTable>>,
    pub resolver: Arc<CertResolver>,
    dev_ca: Option<DevCa>,
    tls: Arc<ServerConfig>,
    pub clients: Clients,
    dialer: Arc<GatewayDialer>,
    pub metrics: Metrics,
    pub timeouts: Timeouts,
    pub limits: Limits,
    challenges: RwLock<Option<Arc<dyn Challenges>>>,
    api: RwLock<Option<ApiHandler>>,
    routes_hook: RwLock<Option<RoutesHook>>,
    started: Instant,
    /// `[admin] tls`: the admin listener's TLS (fixed until restart).
    pub(crate) admin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// The embedded overlay node, shown in `/status` and `/metrics`.
    overlay: std::sync::OnceLock<OverlayObserver>,
}

/// Called with each new route table (the certificate manager learns the names to serve).
pub type RoutesHook = Arc<dyn Fn(&RouteTable) + Send + Sync>;

impl Inner {
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.read().map(|r| r.clone()).unwrap_or_default()
    }

    fn config(&self) -> Arc<GatewayConfig> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn challenges(&self) -> Option<Arc<dyn Challenges>> {
        self.challenges.read().ok()?.clone()
    }

    /// Rebuilds the route table and certificates from the current config and reservations.
    fn rebuild(&self) -> Result<()> {
        let config = self.config();
        let reserved = self.reserved.read().map(|r| r.clone()).unwrap_or_default();
        let pools = crate::routes::PoolFactory {
            dialer: self.dialer.clone() as Arc<dyn Dialer>,
            // Each route's `[route.pool]`; unset connect timeouts come from `[timeouts]`.
            connect_ms: self.timeouts.connect_ms,
            previous: Some(self.routes()),
        };
        let table = RouteTable::build_with(&config.routes, &reserved, &pools);
        let certs = self.build_certs(&config, &table)?;
        self.resolver.replace(certs);
        let table = Arc::new(table);
        if let Ok(mut r) = self.routes.write() {
            *r = table.clone();
        }
        let hook = self.routes_hook.read().ok().and_then(|h| h.clone());
        if let Some(hook) = hook {
            hook(&table);
        }
        Ok(())
    }

    fn build_certs(&self, config: &GatewayConfig, table: &RouteTable) -> Result<CertMap> {
        let old = self.resolver.snapshot();
        let mut map = CertMap::new();
        if let Some(ca) = &self.dev_ca {
            let mut names: Vec<String> = table
                .entries()
                .filter(|e| e.route.mode == Mode::Terminate)
                .map(|e| e.route.host.to_string())
                .collect();
            for d in &config.domains {
                names.push(d.to_string());
                names.push(format!("*.{d}"));
            }
            for n in names {
                let cert = match old.get(&n) {
                    Some(c) => c.clone(),
                    None => ca.issue(std::slice::from_ref(&n))?,
                };
                map.insert(n, cert);
            }
        }
        for files in &config.tls.certificates {
            let (names, cert) = crate::tls::load_pem_files(&files.cert, &files.key)?;
            for n in names {
                map.insert(n, cert.clone());
            }
        }
        // Names placed by the certificate manager (ACME) survive rebuilds.
        for (n, c) in old.iter() {
            map.entry(n.clone()).or_insert_with(|| c.clone());
        }
        Ok(map)
    }

    /// Re-reads the config file and applies routes, certificates and security switches.
    /// Listener, admin and overlay changes need a restart (logged).
    pub fn reload(&self) -> Result<usize> {
        let path = self
            .config_path
            .as_ref()
            .context("this gateway was started without a config file")?;
        let new = GatewayConfig::load(path)?;
        self.apply(new)
    }

    pub fn apply(&self, new: GatewayConfig) -> Result<usize> {
        let old = self.config();
        if new.listen != old.listen || new.admin != old.admin || new.overlay != old.overlay {
            tracing::warn!("listener, admin or overlay changes take effect after a restart");
        }
        if new.timeouts != old.timeouts || new.limits != old.limits {
            tracing::warn!("timeout and limit changes take effect after a restart");
        }
        if new.reservations != old.reservations {
            tracing::warn!("[reservations] changes take effect after a restart");
        }
        let allow_private = new.security.allow_private_backends;
        let previous = std::mem::replace(
            &mut *self.config.write().map_err(|_| anyhow::anyhow!("lock"))?,
            Arc::new(new),
        );
        if let Err(e) = self.rebuild() {
            if let Ok(mut c) = self.config.write() {
                *c = previous;
            }
            return Err(e);
        }
        // Only a config that applied may relax the SSRF guard.
        self.dialer
            .allow_private
            .store(allow_private, Ordering::Relaxed);
        let n = self.routes().len();
        tracing::info!(routes = n, "configuration applied");
        Ok(n)
    }
}

/// A configured gateway, ready to bind and serve.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// Bound listening sockets.
pub struct Bound {
    pub https: Vec<TcpListener>,
    pub http: Vec<TcpListener>,
    pub admin: TcpListener,
}

impl Gateway {
    /// `overlay` dials overlay addresses (as decided by `is_overlay`); `None` sends every
    /// backend through the host network.
    pub fn new(
        config: GatewayConfig,
        config_path: Option<PathBuf>,
        overlay: Option<Arc<dyn Dialer>>,
        is_overlay: fn(&IpAddr) -> bool,
    ) -> Result<Self> {
        let dev_ca = match &config.tls.dev_ca {
            Some(d) => Some(DevCa::open(&d.dir)?),
            None => None,
        };
        let admin_tls = crate::admin::tls_acceptor(&config, dev_ca.as_ref())?;
        let resolver = Arc::new(CertResolver::default());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Stateless session tickets (keys rotated every 6 h, never written anywhere): returning
        // clients resume without a certificate signature, as with nginx's and Caddy's
        // defaults. Routing is unaffected: it reads the SNI before the handshake.
        tls.ticketer = rustls::crypto::ring::Ticketer::new()?;
        let mut own: Vec<IpAddr> = crate::ssrf::interface_addresses();
        own.extend(
            config
                .listen
                .https
                .iter()
                .chain(&config.listen.http)
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified()),
        );
        let dialer = Arc::new(GatewayDialer {
            overlay,
            is_overlay,
            allow_private: config.security.allow_private_backends.into(),
            own_addresses: own,
        });
        let connector = DialConnector {
            dialer: dialer.clone() as Arc<dyn Dialer>,
            // Each request bounds its connect attempts by its route's pool settings
            // (`proxy::AttemptConnector`), which may exceed `[timeouts] connect_ms`; this only
            // caps a connect that nothing else bounds.
            connect_timeout: std::time::Duration::from_secs(60),
        };
        let inner = Arc::new(Inner {
            config_path,
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            config: RwLock::new(Arc::new(config)),
            reserved: RwLock::default(),
            routes: RwLock::default(),
            resolver,
            dev_ca,
            tls: Arc::new(tls),
            clients: Clients::new(connector),
            dialer,
            metrics: Metrics::default(),
            challenges: RwLock::default(),
            api: RwLock::default(),
            routes_hook: RwLock::default(),
            started: Instant::now(),
            admin_tls,
            overlay: std::sync::OnceLock::new(),
        });
        inner.rebuild()?;
        Ok(Gateway { inner })
    }

    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The live certificate resolver (the certificate manager inserts into it).
    pub fn resolver(&self) -> Arc<CertResolver> {
        self.inner.resolver.clone()
    }

    pub fn reload(&self) -> Result<usize> {
        self.inner.reload()
    }

    pub fn set_challenges(&self, c: Arc<dyn Challenges>) {
        if let Ok(mut g) = self.inner.challenges.write() {
            *g = Some(c);
        }
    }

    /// Shows the embedded overlay node in `/status` (`overlay`) and `/metrics`
    /// (`meshgate_overlay_*`). Set once; later calls are ignored.
    pub fn observe_overlay(&self, observer: OverlayObserver) {
        if self.inner.overlay.set(observer.clone()).is_ok() {
            self.inner
                .metrics
                .register(|r| r.register_collector(Box::new(observer)));
        }
    }

    pub fn set_api(&self, api: ApiHandler) {
        if let Ok(mut g) = self.inner.api.write() {
            *g = Some(api);
        }
    }

    /// Calls `hook` now and with every new route table.
    pub fn on_routes_changed(&self, hook: RoutesHook) {
        if let Ok(mut g) = self.inner.routes_hook.write() {
            *g = Some(hook.clone());
        }
        hook(&self.inner.routes());
    }

    /// Follows the reservations' route set: each change is merged with the static routes.
    pub fn follow_reserved_routes(&self, mut rx: watch::Receiver<Arc<Vec<Route>>>) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                let routes = rx.borrow_and_update().clone();
                if let Ok(mut r) = inner.reserved.write() {
                    *r = routes;
                }
                if let Err(e) = inner.rebuild() {
                    tracing::error!(error = %format!("{e:#}"), "cannot apply reserved routes");
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Binds every configured listener (dual-stack on `[::]`).
    pub fn bind(&self) -> Result<Bound> {
        let c = self.inner.config();
        let https = c
            .listen
            .https
            .iter()
            .map(|a| bind(*a))
            .collect::<Result<_>>()?;
        let http = c
            .listen
            .http
            .iter()
            .map(|a| bind(*a))
            .collect::<Result<_>>()?;
        let admin = bind(c.admin.listen)?;
        Ok(Bound { https, http, admin })
    }

    /// Binds the given HTTPS listeners and the configured admin listener (no plain HTTP).
    pub fn bind_listeners(&self, https: &[SocketAddr]) -> Result<Bound> {
        let c = self.inner.config();
        let https = https.iter().map(|a| bind(*a)).collect::<Result<_>>()?;
        let admin = bind(c.admin.listen)?;
        Ok(Bound {
            https,
            http: Vec::new(),
            admin,
        })
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(&self, bound: Bound, shutdown: impl Future<Output = ()>) -> Result<()> {
        let slots = Arc::new(Semaphore::new(self.inner.limits.max_connections));
        let mut tasks = tokio::task::JoinSet::new();
        for l in bound.https {
            tasks.spawn(accept_loop(self.inner.clone(), l, slots.clone(), Kind::Tls));
        }
        for l in bound.http {
            tasks.spawn(accept_loop(
                self.inner.clone(),
                l,
                slots.clone(),
                Kind::Plain,
            ));
        }
        tasks.spawn(accept_loop(
            self.inner.clone(),
            bound.admin,
            Arc::new(Semaphore::new(64)),
            Kind::Admin,
        ));
        shutdown.await;
        tasks.abort_all();
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

#[derive(Clone, Copy)]
enum Kind {
    Tls,
    Plain,
    Admin,
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, slots: Arc<Semaphore>, kind: Kind) {
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            inner.metrics.connections.inc();
            match kind {
                Kind::Tls => serve_tls(&inner, stream, peer).await,
                Kind::Plain => {
                    let activity = Activity::default();
                    let ci = ConnInfo {
                        client: peer,
                        proto: "http",
                        activity: activity.clone(),
                    };
                    serve_http(&inner, Tracked::new(stream, activity), ci, false).await
                }
                Kind::Admin => crate::admin::serve(&inner, stream).await,
            }
            inner.metrics.connections.dec();
            drop(permit);
        });
    }
}

async fn send_alert(stream: &mut TcpStream, description: u8) {
    let _ = stream.write_all(&hello::alert(description)).await;
    let _ = stream.shutdown().await;
}

/// :443: classify by ClientHello, then passthrough, terminate, or answer a TLS-ALPN-01 check.
async fn serve_tls(inner: &Arc<Inner>, mut stream: TcpStream, peer: SocketAddr) {
    let deadline = tokio::time::Instant::now() + inner.timeouts.handshake();
    let max = inner.limits.max_client_hello_bytes;
    let mut buf = BytesMut::with_capacity(2048);
    let hello = loop {
        match hello::parse(&buf, max) {
            Ok(Parse::NeedMore) => {}
            Ok(Parse::Done(h)) => break h,
            Err(HelloError::NotTls) => {
                inner.metrics.error("unknown", "not_tls");
                tracing::debug!(client = %peer, "not a TLS client, closing");
                return;
            }
            Err(e) => {
                inner.metrics.error("unknown", "bad_client_hello");
                tracing::info!(client = %peer, error = %e, "bad ClientHello, closing");
                send_alert(&mut stream, hello::ALERT_DECODE_ERROR).await;
                return;
            }
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                inner.metrics.error("unknown", "handshake_timeout");
                tracing::info!(client = %peer, "ClientHello not received in time, closing");
                return;
            }
        }
    };
    let prefix = buf.freeze();
    let Some(sni) = hello.sni else {
        inner.metrics.error("unknown", "no_sni");
        send_alert(&mut stream, hello::ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    if hello.alpn.iter().any(|p| p == b"acme-tls/1") {
        answer_tls_alpn01(inner, stream, prefix, &sni, deadline).await;
        return;
    }
    let Some(entry) = inner.routes().lookup(&sni) else {
        inner.metrics.error("unknown", "unknown_sni");
        tracing::info!(client = %peer, sni = %sni, "unknown server name");
        send_alert(&mut stream, hello::ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    match entry.route.mode {
        Mode::Passthrough => passthrough(inner, &entry, stream, prefix, peer).await,
        Mode::Terminate => {
            let activity = Activity::default();
            let io = Tracked::new(Rewind::new(prefix, stream), activity.clone());
            let acceptor = tokio_rustls::TlsAcceptor::from(inner.tls.clone());
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    inner
                        .metrics
                        .error(entry.route.host.as_str(), "tls_handshake");
                    tracing::info!(client = %peer, sni = %sni, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    inner
                        .metrics
                        .error(entry.route.host.as_str(), "handshake_timeout");
                    return;
                }
            };
            inner.metrics.handshakes.inc();
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let ci = ConnInfo {
                client: peer,
                proto: "https",
                activity,
            };
            serve_http(inner, tls, ci, h2).await;
        }
    }
}

async fn answer_tls_alpn01(
    inner: &Arc<Inner>,
    mut stream: TcpStream,
    prefix: Bytes,
    sni: &str,
    deadline: tokio::time::Instant,
) {
    let Some(cert) = inner.challenges().and_then(|c| c.tls_alpn01(sni)) else {
        send_alert(&mut stream, hello::ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    else {
        return;
    };
    let mut config = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(crate::tls::Always(cert)));
    config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    if let Ok(Ok(mut tls)) =
        tokio::time::timeout_at(deadline, acceptor.accept(Rewind::new(prefix, stream))).await
    {
        let _ = tls.shutdown().await;
    }
}

async fn passthrough(
    inner: &Arc<Inner>,
    entry: &RouteEntry,
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
) {
    let start = Instant::now();
    let route = &entry.route;
    let mut stream = stream;
    let client = crate::pool::ClientInfo::from_ip(peer.ip().to_canonical());
    let (mut b, lease) = match entry.pool.connect(&client).await {
        Ok(x) => x,
        Err(e) => {
            inner.metrics.error(route.host.as_str(), "backend_connect");
            tracing::warn!(route = %route.host, error = %e, "no backend for passthrough stream");
            send_alert(&mut stream, hello::ALERT_INTERNAL_ERROR).await;
            return;
        }
    };
    let addr = lease.backend();
    let local = stream.local_addr().unwrap_or(peer);
    if route.options.proxy_protocol {
        let header = crate::proxy_protocol::header_v2(peer, local);
        if b.write_all(&header).await.is_err() {
            return;
        }
    }
    if b.write_all(&prefix).await.is_err() {
        return;
    }
    let activity = Activity::default();
    let mut c = Tracked::new(stream, activity.clone());
    let moved = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut b) => r.ok(),
        _ = activity.idle(inner.timeouts.idle()) => None,
    };
    drop(lease);
    let (up, down) = moved.unwrap_or((0, 0));
    let label = RouteLabel {
        route: route.host.as_str().to_owned(),
    };
    let m = &inner.metrics;
    m.bytes_in
        .get_or_create(&label)
        .inc_by(up + prefix.len() as u64);
    m.bytes_out.get_or_create(&label).inc_by(down);
    m.requests
        .get_or_create(&RequestLabel {
            route: route.host.as_str().to_owned(),
            status: "stream".into(),
        })
        .inc();
    m.latency
        .get_or_create(&label)
        .observe(start.elapsed().as_secs_f64());
    tracing::info!(
        target: "access",
        client = %peer,
        proto = "tls-passthrough",
        route = %route.host,
        backend = %addr,
        up = up + prefix.len() as u64,
        down,
        ms = start.elapsed().as_millis() as u64,
        "stream"
    );
}

/// Serves HTTP/1.1 (and h2 when negotiated) on a client connection until it closes or idles.
async fn serve_http<S>(inner: &Arc<Inner>, io: S, ci: ConnInfo, h2: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(inner.timeouts.header())
        .max_buf_size(inner.limits.max_header_bytes.max(8192))
        .max_headers(inner.limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(inner.limits.max_header_bytes).unwrap_or(u32::MAX))
        // No extended CONNECT (RFC 8441): browsers then open WebSockets over HTTP/1.1,
        // which the proxy tunnels.
        .max_concurrent_streams(256);
    let builder = if h2 { builder.http2_only() } else { builder };
    let activity = ci.activity.clone();
    let svc_inner = inner.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let inner = svc_inner.clone();
        let ci = ci.clone();
        async move {
            if ci.proto == "http"
                && let Some(resp) = acme_http01(&inner, &req)
            {
                return Ok(resp);
            }
            proxy::handle(inner, req, ci).await
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        _ = activity.idle(inner.timeouts.idle()) => {
            tracing::debug!("client connection idle, closing");
        }
    }
}

fn acme_http01(inner: &Inner, req: &Request<Incoming>) -> Option<Response<Body>> {
    let token = req
        .uri()
        .path()
        .strip_prefix("/.well-known/acme-challenge/")?;
    let answer = inner.challenges().and_then(|c| c.http01(token));
    Some(match answer {
        Some(a) => {
            use http_body_util::BodyExt;
            let mut r = Response::new(
                http_body_util::Full::new(Bytes::from(a))
                    .map_err(|n: std::convert::Infallible| match n {})
                    .boxed(),
            );
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        None => proxy::full(StatusCode::NOT_FOUND, "No such challenge."),
    })
}

/// Status JSON for `/status`.
pub fn status_json(inner: &Inner) -> serde_json::Value {
    let routes: Vec<serde_json::Value> = inner
        .routes()
        .entries()
        .map(|e| {
            serde_json::json!({
                "host": e.route.host,
                "mode": e.route.mode,
                "backends": e.route.backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
                "options": e.route.options,
                "pool": e.pool.status(),
            })
        })
        .collect();
    // `names`: every name a certificate is served for; `managed`: the certificate manager's
    // state per certificate (expiry, next renewal, last ACME problem).
    let managed = crate::api::certificate_status(inner);
    let mut names = inner.resolver.names();
    for c in managed.iter().flatten().filter(|c| c.not_after.is_some()) {
        names.extend(c.names.iter().cloned());
    }
    names.sort();
    names.dedup();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": inner.started.elapsed().as_secs(),
        "connections": inner.metrics.connections.get(),
        "routes": routes,
        "certificates": {"names": names, "managed": managed},
        "overlay": inner.overlay.get().map(OverlayObserver::status_json),
    })
}

pub(crate) fn api_handler(inner: &Inner) -> Option<ApiHandler> {
    inner.api.read().ok()?.clone()
}
