//! Phase 3, connect with retry: pick a backend from the route's pool, send the request with
//! this attempt's connect timeout (the route's per-attempt bound, cut to what is left of its
//! connect budget) passed down as an argument, and retry on another backend when the policy
//! allows. Every attempt's outcome feeds the pool's health and latency.

use super::RequestContext;
use super::body::LentBody;
use super::error::Failure;
use super::request::UpstreamHead;
use crate::routes::RouteEntry;
use crate::state::Shared;
use crate::upstream::clients::BackendError;
use crate::upstream::pool::{self, ClientInfo, Lease, MAX_REQUEST_RETRIES, Outcome, may_retry};
use hyper::Response;
use hyper::body::Incoming;
use meshgate_config::pool::Policy;
use std::net::SocketAddr;
use std::time::Instant;

/// Sends the request to a backend of `entry`; the lease is the backend's in-flight slot.
pub(crate) async fn send(
    shared: &Shared,
    entry: &RouteEntry,
    head: UpstreamHead,
    body: &LentBody,
    cx: &RequestContext,
) -> Result<(Response<Incoming>, Lease), Failure> {
    let conn = &cx.conn;
    let route = &entry.route;
    let protocol = route.options.backend_protocol;
    let pool_config = entry.pool.config();
    let client = ClientInfo {
        ip: conn.client.ip().to_canonical(),
        // Only a cookie-hashing pool reads it.
        sticky_cookie: (pool_config.policy == Policy::HashCookie)
            .then(|| head.cookie(&pool_config.sticky_cookie))
            .flatten(),
    };
    let backends = entry.pool.backend_count();
    let method = head.method.clone();
    // Taken by the last attempt there can be: with no other backend left to try, the head
    // moves into the request instead of being copied.
    let mut head = Some(head);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0;
    // Getting a connection (queue wait and every connect attempt across backends) shares one
    // budget, so black-holed backends cannot make a request wait n × the attempt timeout.
    let connect_deadline = Instant::now() + pool_config.connect_timeout();
    let no_backend = |why: &dyn std::fmt::Display| {
        shared.metrics.error(route.host.as_str(), "no_backend");
        tracing::warn!(error = %why, "no backend available");
        Failure::NoBackend
    };
    loop {
        let mut lease = match entry.pool.pick(&client, &tried).await {
            Ok(l) => l,
            Err(e) => return Err(no_backend(&e)),
        };
        let left = connect_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop(lease);
            return Err(no_backend(&"connect timeout spent"));
        }
        let attempt = pool_config.connect_attempt_timeout().min(left);
        let addr = lease.backend();
        cx.span.record("backend", tracing::field::display(addr));
        tried.push(addr);
        let last = tried.len() >= backends;
        let req = match (last, head.as_ref()) {
            (false, Some(h)) => h.to(body.lend()),
            _ => head.take().and_then(|h| h.into_request(body.lend())),
        };
        let Some(req) = req else {
            return Err(Failure::BadTarget);
        };
        let started = Instant::now();
        // Boxed: the request's future stays small, so it is not copied whole on every move.
        let sent = Box::pin(shared.clients.send(protocol, addr, req, attempt));
        let failure = match tokio::time::timeout(shared.timeouts.request(), sent).await {
            Err(_) => {
                lease.report(Outcome::Timeout);
                shared.metrics.error(route.host.as_str(), "backend_timeout");
                tracing::warn!("backend response timed out");
                return Err(Failure::Timeout);
            }
            Ok(Ok(resp)) => {
                lease.record(Outcome::from_status(
                    resp.status().as_u16(),
                    started.elapsed(),
                ));
                return Ok((resp, lease));
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
                shared.metrics.error(route.host.as_str(), "backend_connect");
                tracing::warn!(error = %error_chain(&*error), "backend connect failed");
                pool::Failure::ConnectFailed
            }
            Ok(Err(BackendError { error, .. })) => {
                lease.report(Outcome::Reset);
                shared.metrics.error(route.host.as_str(), "backend_io");
                tracing::warn!(error = %error_chain(&*error), "backend request failed");
                pool::Failure::ClosedBeforeResponse
            }
        };
        // A request whose body went (even partly) to a backend is never replayed.
        let again = may_retry(&method, body.started(), &failure)
            && (failure == pool::Failure::ConnectFailed || retries < MAX_REQUEST_RETRIES);
        if !again {
            return Err(Failure::BadGateway);
        }
        if head.is_none() {
            // Every backend was tried (the last attempt took the head): the answer the next
            // pick would give, 503, not a 502.
            return Err(no_backend(&"every backend tried"));
        }
        if failure != pool::Failure::ConnectFailed {
            retries += 1;
        }
    }
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
