//! Phase 1, pick the route: the request's host, checked (one `Host`, agreeing with the
//! target's authority, a name or IP literal) and normalized, looked up in the route table.
//! On TLS the host must be one the connection's SNI or certificate covers and may not be a
//! passthrough route's (421); a request carrying this gateway's own `Via` entry has looped
//! (508); plain HTTP to a route that wants HTTPS is redirected.

use super::error;
use super::request::{is_valid_host, request_host};
use crate::http::ConnInfo;
use crate::http::body::Body;
use crate::http::client::HostNames;
use crate::routes::{RouteEntry, normalize_host};
use crate::state::Shared;
use http::{Request, Response};
use meshgate_config::route::Mode;
use std::sync::Arc;

pub(crate) enum Picked {
    /// Refused before any route is known; counted under route `unknown`, not logged.
    Refused(Response<Body>),
    /// Answered here (no such site, misdirected, loop, redirect to HTTPS), counted under
    /// `route`.
    Answer {
        route: String,
        host: String,
        resp: Response<Body>,
    },
    /// To be forwarded to the route's backends.
    Forward {
        entry: Arc<RouteEntry>,
        /// The validated host, normalized, and the header values made from it.
        names: Arc<HostNames>,
    },
}

pub(crate) fn pick<B>(
    shared: &Shared,
    req: &Request<B>,
    conn: &ConnInfo,
    span: &tracing::Span,
) -> Picked {
    let authority = match request_host(req) {
        Ok(h) => h,
        Err(e) => {
            shared.metrics.error("unknown", e.kind());
            return Picked::Refused(error::bad_host(e));
        }
    };
    // The host is echoed into `Host`, `Forwarded`, `X-Forwarded-Host` and `Location`: only
    // names and IP literals may pass, so a wildcard route cannot carry injected quotes or
    // parameters. Checked (and its header values made) once per connection and host.
    let names = match conn.hosts.get(authority) {
        Some(names) => names,
        None => {
            let names = is_valid_host(authority)
                .then(|| {
                    HostNames::new(
                        authority,
                        normalize_host(authority),
                        &conn.client_ip,
                        conn.proto,
                    )
                })
                .flatten();
            let Some(names) = names else {
                shared.metrics.error("unknown", "invalid_host");
                return Picked::Refused(error::invalid_host());
            };
            let names = Arc::new(names);
            conn.hosts.set(&names);
            names
        }
    };
    let host = names.host.as_str();
    let Some(entry) = shared.routes().lookup_normalized(host) else {
        shared.metrics.error("unknown", "unknown_host");
        span.record("route", "unknown");
        return Picked::Answer {
            route: "unknown".to_string(),
            resp: error::unknown_host(),
            host: host.to_owned(),
        };
    };
    let route = entry.route.host.as_str();
    span.record("route", route);
    // Only the refusals below allocate: a forwarded request copies no names here.
    let answer = |kind: Option<&str>, resp: Response<Body>| {
        if let Some(kind) = kind {
            shared.metrics.error(route, kind);
        }
        Picked::Answer {
            route: route.to_owned(),
            host: host.to_owned(),
            resp,
        }
    };
    let passthrough = entry.route.mode == Mode::Passthrough;
    if conn.proto == "https" {
        // TLS for one name must not reach another route's backend: a passthrough route's
        // backend would get plaintext, and a site the certificate does not cover is not one
        // the client authenticated (RFC 9110 §15.5.20).
        let covered = conn.tls.as_ref().is_some_and(|t| t.covers(host));
        if passthrough || !covered {
            tracing::info!(host = %host, "misdirected request");
            return answer(Some("misdirected"), error::misdirected());
        }
    } else if passthrough || !entry.route.options.allow_plain_http {
        return answer(None, error::redirect_https(host, req));
    }
    if shared.via.looped(req.headers()) {
        tracing::warn!(host = %host, "request looped back to this gateway");
        return answer(Some("loop_detected"), error::loop_detected());
    }
    Picked::Forward { entry, names }
}
