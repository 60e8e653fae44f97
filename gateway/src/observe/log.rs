//! The last phase of every proxied request and passthrough stream: count it in the metrics and
//! write its access-log line. Client, route and backend come from the enclosing tracing spans
//! (one per client connection, one per request), so the line carries only what is its own.

use super::metrics::{Metrics, RequestLabel, RouteLabel};
use http::{Method, StatusCode};
use std::time::Duration;

/// How an exchange ended.
pub(crate) enum Outcome<'a> {
    /// An HTTP response (the proxy's or the backend's) was sent.
    Response {
        status: StatusCode,
        host: &'a str,
        method: &'a Method,
        path: &'a str,
    },
    /// A passthrough stream closed after moving these bytes.
    Stream { up: u64, down: u64 },
}

/// Counts a finished exchange on `route` and logs it; `elapsed` is the time to the response
/// head, or the stream's life.
pub(crate) fn finished(metrics: &Metrics, route: &str, elapsed: Duration, outcome: Outcome<'_>) {
    let label = RouteLabel {
        route: route.to_string(),
    };
    let server_error =
        matches!(&outcome, Outcome::Response { status, .. } if status.is_server_error());
    metrics
        .history
        .request(route, server_error, std::time::Instant::now());
    let status = match &outcome {
        Outcome::Response { status, .. } => format!("{}xx", status.as_u16() / 100),
        Outcome::Stream { up, down } => {
            metrics.bytes_in.get_or_create(&label).inc_by(*up);
            metrics.bytes_out.get_or_create(&label).inc_by(*down);
            "stream".to_string()
        }
    };
    metrics
        .requests
        .get_or_create(&RequestLabel {
            route: route.to_string(),
            status,
        })
        .inc();
    metrics
        .latency
        .get_or_create(&label)
        .observe(elapsed.as_secs_f64());
    let ms = elapsed.as_millis() as u64;
    match outcome {
        Outcome::Response {
            status,
            host,
            method,
            path,
        } => tracing::info!(
            target: "access",
            host = %host,
            method = %method,
            path = %path,
            status = status.as_u16(),
            ms,
            "request"
        ),
        Outcome::Stream { up, down } => {
            tracing::info!(target: "access", up, down, ms, "stream")
        }
    }
}
