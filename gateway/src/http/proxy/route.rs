//! Phase 1, pick the route: the request's host, checked and normalized, looked up in the route
//! table; plain HTTP to a route that wants HTTPS is redirected.

use super::error;
use super::request::{is_valid_host, request_host};
use crate::http::ConnInfo;
use crate::http::body::Body;
use crate::routes::{RouteEntry, normalize_host};
use crate::state::Shared;
use http::{Request, Response};
use std::sync::Arc;

pub(crate) enum Picked {
    /// Refused before any route is known; not counted per route, not logged.
    Refused(Response<Body>),
    /// Answered here (no such site, redirect to HTTPS), counted under `route`.
    Answer {
        route: String,
        host: String,
        resp: Response<Body>,
    },
    /// To be forwarded to the route's backends; `host` is normalized.
    Forward(Arc<RouteEntry>, String),
}

pub(crate) fn pick<B>(shared: &Shared, req: &Request<B>, conn: &ConnInfo) -> Picked {
    let Some(host) = request_host(req) else {
        return Picked::Refused(error::no_host());
    };
    // The host is echoed into `Forwarded`, `X-Forwarded-Host` and `Location`: only names and
    // IP literals may pass, so a wildcard route cannot carry injected quotes or parameters.
    if !is_valid_host(&host) {
        return Picked::Refused(error::invalid_host());
    }
    let host = normalize_host(&host);
    match shared.routes().lookup(&host) {
        None => {
            shared.metrics.error("unknown", "unknown_host");
            tracing::Span::current().record("route", "unknown");
            Picked::Answer {
                route: "unknown".to_string(),
                resp: error::unknown_host(),
                host,
            }
        }
        Some(entry) if conn.proto == "http" && !entry.route.options.allow_plain_http => {
            tracing::Span::current().record("route", entry.route.host.as_str());
            Picked::Answer {
                route: entry.route.host.as_str().to_owned(),
                resp: error::redirect_https(&host, req),
                host,
            }
        }
        Some(entry) => Picked::Forward(entry, host),
    }
}
