//! The HTTP proxy for terminated TLS (and plain-HTTP routes on :80). A request goes through
//! named phases over its [`RequestContext`], each in its own module:
//!
//! 1. [`route`]: pick the route by host (or answer 400, 404, 421, 508 ([`loops`]), or a
//!    redirect to HTTPS);
//! 2. [`request`]: build the upstream request (pure: hop-by-hop removal, one Host,
//!    forwarding headers, `Via`, allowed upgrades only);
//! 3. [`connect`]: pick a backend and send, with retries, each attempt's timeout an argument;
//! 4. [`error`]: the response when no backend answered;
//! 5. [`response`]: the backend's response to the client (upgrades become tunnels);
//! 6. [`crate::observe::log`]: metrics and the access log, shared with passthrough streams.

mod body;
mod connect;
mod error;
pub(crate) mod loops;
mod request;
mod response;
mod route;

use super::ConnInfo;
use super::body::Body;
use crate::observe::log::{self, Outcome};
use crate::observe::metrics::RouteMetrics;
use crate::state::Shared;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use route::Picked;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// What the phases share about one request.
pub(crate) struct RequestContext {
    pub(crate) start: Instant,
    pub(crate) method: Method,
    pub(crate) version: http::Version,
    /// The client's target, for the access log's path (a clone shares the parsed bytes).
    pub(crate) uri: http::Uri,
    pub(crate) conn: ConnInfo,
    /// The request's span, filled in by the phases (recording on it directly is cheaper than
    /// looking up the current span).
    pub(crate) span: tracing::Span,
}

/// Serves one request arriving on a client connection, in a span of its own that the phases
/// fill with route and backend.
///
/// The future is the phases' own, instrumented, with no `async` layer around it: every layer
/// holds its own copy of what it passes down, and the whole future is copied when it is
/// boxed and on every move.
pub(crate) fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> tracing::instrument::Instrumented<
    impl Future<Output = Result<Response<Body>, Infallible>> + Send + use<>,
> {
    let span = tracing::info_span!(
        parent: &conn.span,
        "request",
        route = tracing::field::Empty,
        backend = tracing::field::Empty
    );
    phases(shared, req, conn, span.clone()).instrument(span)
}

async fn phases(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    conn: ConnInfo,
    span: tracing::Span,
) -> Result<Response<Body>, Infallible> {
    let shared = &*shared;
    let cx = RequestContext {
        start: Instant::now(),
        method: req.method().clone(),
        version: req.version(),
        uri: req.uri().clone(),
        conn,
        span,
    };
    Ok(match route::pick(shared, &req, &cx.conn, &cx.span) {
        Picked::Refused(resp) => resp,
        Picked::Answer { route, host, resp } => {
            let series = shared.metrics.route(&route);
            let resp = resp.map(count_out(&series));
            finish(shared, &cx, &series, &route, &host, None, resp)
        }
        Picked::Forward { entry, names } => {
            let series = shared.metrics.route(entry.route.host.as_str());
            // Boxed: the forwarding phases are most of the request's state machine, and
            // this future is copied whole when hyper's service boxes it and on every move.
            let (resp, backend) =
                Box::pin(forward(shared, &entry, &series, req, &cx, &names)).await;
            let route = entry.route.host.as_str();
            finish(shared, &cx, &series, route, &names.host, backend, resp)
        }
    })
}

/// Counts a request that got a route and writes its access record; returns its response.
fn finish(
    shared: &Shared,
    cx: &RequestContext,
    series: &RouteMetrics,
    route: &str,
    host: &str,
    backend: Option<std::net::SocketAddr>,
    resp: Response<Body>,
) -> Response<Body> {
    log::finished_on(
        &shared.metrics,
        series,
        shared.access_log,
        route,
        &log::Parties {
            client: cx.conn.client,
            backend,
        },
        cx.start.elapsed(),
        Outcome::Response {
            status: resp.status(),
            host,
            method: &cx.method,
            path: cx.uri.path(),
            proto: cx.conn.proto,
            version: cx.version,
        },
    );
    resp
}

/// Counts a response body the gateway made itself in the route's bytes out (a backend's
/// body is counted by `response::relay`, in the same wrapper that holds its lease).
fn count_out(series: &RouteMetrics) -> impl FnOnce(Body) -> Body + use<> {
    let out = series.bytes_out().clone();
    move |b| {
        b.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                out.inc_by(d.len() as u64);
            }
            f
        })
        .boxed()
    }
}

/// Phases 2–5 for a request that has a route: the response and the backend that gave it.
async fn forward(
    shared: &Shared,
    entry: &crate::routes::RouteEntry,
    series: &RouteMetrics,
    req: Request<Incoming>,
    cx: &RequestContext,
    names: &crate::http::client::HostNames,
) -> (Response<Body>, Option<std::net::SocketAddr>) {
    let route = &entry.route;
    let hop = request::Hop {
        client: &cx.conn.client_ip,
        proto: cx.conn.proto,
        names,
        via: &shared.via,
    };
    let upstream = request::build(req, &hop, &route.options);
    if let Some(offer) = &upstream.refused_upgrade {
        shared.metrics.error(route.host.as_str(), "upgrade_refused");
        tracing::info!(upgrade = ?offer, "upgrade not allowed on this route, dropped");
    }
    let client_upgrade = upstream.client_upgrade;
    // A request without a body (most) needs no counting wrapper and no shared slot.
    let body = if hyper::body::Body::is_end_stream(&upstream.body) {
        body::LentBody::empty()
    } else {
        let bytes_in = series.bytes_in().clone();
        body::LentBody::new(
            upstream
                .body
                .map_frame(move |f| {
                    if let Some(d) = f.data_ref() {
                        bytes_in.inc_by(d.len() as u64);
                    }
                    f
                })
                .boxed(),
        )
    };
    let (mut resp, backend) = match connect::send(shared, entry, upstream.head, &body, cx).await {
        Ok((resp, lease)) => {
            let backend = lease.backend();
            let resp = response::relay(
                resp,
                client_upgrade,
                &cx.conn,
                shared.timeouts.idle(),
                lease,
                series.bytes_out().clone(),
            );
            (resp, Some(backend))
        }
        Err(failure) => (error::response(failure).map(count_out(series)), None),
    };
    response::add_hsts(&mut resp, &route.options, &cx.conn);
    (resp, backend)
}
