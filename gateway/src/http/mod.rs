//! HTTP on a client connection: the hyper server (HTTP/1.1 and h2, header and size limits,
//! idle watchdog), ACME HTTP-01 answers on plain HTTP ([`acme`]), and the proxy ([`proxy`]).

pub(crate) mod acme;
pub(crate) mod body;
pub(crate) mod client;
pub(crate) mod proxy;
mod tls_names;

pub(crate) use tls_names::TlsNames;

use crate::io::{Activity, FirstRequest};
use crate::state::Shared;
use futures_util::StreamExt;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// hyper's HTTP/1.1 header count limit when none is set (`limits.max_headers` defaults to
/// the same).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Who is on the other side of a client connection.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub client: SocketAddr,
    /// `https` or `http`: what the client used.
    pub proto: &'static str,
    pub activity: Activity,
    /// The connection's span: h2 streams run on tasks of their own, so each request's span
    /// names it as parent explicitly.
    pub span: tracing::Span,
    /// What a terminated TLS connection presented (SNI, certificate); `None` on plain HTTP.
    pub tls: Option<Arc<TlsNames>>,
    /// Cancelled when a stopping gateway's drain ends: tunnels close with it.
    pub closing: tokio_util::sync::CancellationToken,
    /// `client`'s address as the forwarding headers carry it.
    pub client_ip: client::ClientIp,
    /// The last host validated on this connection.
    pub hosts: Arc<client::HostMemo>,
}

/// Serves HTTP/1.1 (and h2 when negotiated) on a client connection until it closes or idles,
/// or sends no complete request head by `first`'s deadline. When the gateway stops, the
/// connection finishes its in-flight requests and closes (h2: GOAWAY first), or is closed
/// when the drain ends.
pub(crate) async fn serve<S>(
    shared: &Arc<Shared>,
    io: S,
    ci: ConnInfo,
    h2: bool,
    first: FirstRequest,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.timeouts.header())
        .max_buf_size(shared.limits.max_header_bytes.max(8192));
    // hyper parses up to its default of 100 headers in arrays on the stack; any explicit
    // limit (even 100) makes it allocate and fill two vectors of that size per request.
    if shared.limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        builder.http1().max_headers(shared.limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.limits.max_header_bytes).unwrap_or(u32::MAX))
        // No extended CONNECT (RFC 8441): browsers then open WebSockets over HTTP/1.1,
        // which the proxy tunnels.
        .max_concurrent_streams(256);
    let builder = if h2 { builder.http2_only() } else { builder };
    let activity = ci.activity.clone();
    let svc_shared = shared.clone();
    let svc_first = first.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        svc_first.seen();
        if ci.proto == "http"
            && let Some(resp) = acme::http01(&svc_shared, &req)
        {
            return Either::Left(std::future::ready(Ok(resp)));
        }
        // Boxed: hyper moves the service's future (h2: into a task of its own per stream);
        // kept small, that is a pointer instead of the whole proxy state machine.
        Either::Right(Box::pin(proxy::handle(svc_shared.clone(), req, ci.clone())))
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let drain = &shared.drain;
    // The watchdogs sit in a `FuturesUnordered`, which polls only the ones whose wake-up
    // fired: the connection's task wakes a few times per request, and polling every watchdog
    // each time (two cancellation tokens, a timer, the first-request deadline) cost more
    // than the rest of the loop.
    let mut watch: FuturesUnordered<Pin<Box<dyn Future<Output = Stop> + Send + '_>>> =
        FuturesUnordered::new();
    watch.push(Box::pin(async {
        drain.stopping.cancelled().await;
        Stop::Draining
    }));
    watch.push(Box::pin(async {
        drain.closing.cancelled().await;
        Stop::Closing
    }));
    watch.push(Box::pin(async {
        activity.idle(shared.timeouts.idle()).await;
        Stop::Idle
    }));
    watch.push(Box::pin(async {
        first.missed().await;
        Stop::NoFirstRequest
    }));
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            Some(stop) = watch.next() => match stop {
                Stop::Draining => conn.as_mut().graceful_shutdown(),
                Stop::Closing => {
                    tracing::debug!("drain deadline passed with requests in flight, closing");
                    return;
                }
                Stop::Idle => {
                    tracing::debug!("client connection idle, closing");
                    return;
                }
                Stop::NoFirstRequest => {
                    shared.metrics.error("unknown", "header_timeout");
                    tracing::debug!("no complete request head within header_ms of accept, closing");
                    return;
                }
            },
        }
    }
}

/// Why a client connection's watchdog fired.
enum Stop {
    /// The gateway is stopping: finish in-flight requests, then close.
    Draining,
    /// The drain ended: close now.
    Closing,
    /// No byte moved for `timeouts.idle_ms`.
    Idle,
    /// No complete request head by `timeouts.header_ms` after accept.
    NoFirstRequest,
}
