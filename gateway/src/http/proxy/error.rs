//! Phase 4, the responses the proxy writes itself: refusals before routing, the redirect to
//! HTTPS, misdirected and looped requests, and the error pages when no backend answered.

use super::request::HostError;
use crate::http::body::{Body, full};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

/// Why a routed request got no backend response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No backend could be picked or reached within the route's connect budget.
    NoBackend,
    /// A backend took the request but did not answer within `[timeouts] request_ms`.
    Timeout,
    /// The request failed and may not be retried.
    BadGateway,
    /// The request target cannot be sent on.
    BadTarget,
}

pub(crate) fn response(failure: Failure) -> Response<Body> {
    match failure {
        Failure::NoBackend => full(
            StatusCode::SERVICE_UNAVAILABLE,
            "The site is not available right now.",
        ),
        Failure::Timeout => full(
            StatusCode::GATEWAY_TIMEOUT,
            "The site did not answer in time.",
        ),
        Failure::BadGateway => full(StatusCode::BAD_GATEWAY, "The site could not be reached."),
        Failure::BadTarget => full(StatusCode::BAD_REQUEST, "The request target is not valid."),
    }
}

pub(crate) fn bad_host(e: HostError) -> Response<Body> {
    let why = match e {
        HostError::Missing => "The request names no host.",
        HostError::Duplicate => "The request has more than one Host header.",
        HostError::Mismatch => "The Host header names another host than the request target.",
    };
    full(StatusCode::BAD_REQUEST, why)
}

/// `421`: the connection's TLS name does not cover the request's host (or the host's route
/// takes TLS through to its backend). The client may retry on a connection of its own.
pub(crate) fn misdirected() -> Response<Body> {
    full(
        StatusCode::MISDIRECTED_REQUEST,
        "This connection cannot serve the requested host; connect to it by name.",
    )
}

/// `508`: the request came back to this gateway through a backend.
pub(crate) fn loop_detected() -> Response<Body> {
    full(
        StatusCode::LOOP_DETECTED,
        "The site's backend leads back to this gateway.",
    )
}

pub(crate) fn invalid_host() -> Response<Body> {
    full(StatusCode::BAD_REQUEST, "The request host is not valid.")
}

pub(crate) fn unknown_host() -> Response<Body> {
    full(StatusCode::NOT_FOUND, "No site is served under this name.")
}

/// `308` to the same host and path over HTTPS.
pub(crate) fn redirect_https<B>(host: &str, req: &Request<B>) -> Response<Body> {
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

/// The body the client sees after an upgrade: the bytes go through the tunnel instead.
pub(crate) fn unexpected_upgrade() -> Response<Body> {
    full(StatusCode::BAD_GATEWAY, "The site answered unexpectedly.")
}
