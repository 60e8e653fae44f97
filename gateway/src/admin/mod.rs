//! The operator's listener (loopback by default): the status page at `/`, `/metrics`,
//! `/status` and `POST /reload` (admin token), and the deployers' listener of its own
//! (`[api]`) serving their page at `/` and the reservations API under `/v1/`. Each plain
//! HTTP, or TLS when its `tls` is set.

mod activity;
pub mod api;
pub mod overlay;
mod pages;
pub mod section;
mod status;
pub(crate) mod tls;

use crate::http::body::{Body, full};
use crate::io::FirstRequest;
use crate::state::Shared;
use anyhow::Result;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// What the operator's listener asks of the gateway it belongs to.
pub trait Control: Send + Sync + 'static {
    /// Re-reads the configuration file and applies it; the number of routes.
    fn reload(&self) -> Result<usize>;
}

/// Time for a client of the operator's or the deployers' listener to finish its TLS
/// handshake and send its first request head, from accept; then for each later head.
const ADMIN_HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves one connection to the operator's listener: `/metrics`, `/status`, `POST /reload`.
pub(crate) async fn serve_operator(
    shared: &Arc<Shared>,
    control: &Arc<dyn Control>,
    stream: TcpStream,
    accepted: Instant,
) {
    let (svc_shared, control) = (shared.clone(), control.clone());
    let handler = move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        let control = control.clone();
        async move { operator(&shared, control, req).await }
    };
    serve_h1(shared.admin_tls.clone(), stream, accepted, handler).await
}

/// Serves one connection to the deployers' listener: the reservations API under `/v1/`.
pub(crate) async fn serve_api(shared: &Arc<Shared>, stream: TcpStream, accepted: Instant) {
    let svc_shared = shared.clone();
    let handler = move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        async move { deployers(&shared, req).await }
    };
    serve_h1(shared.api_tls.clone(), stream, accepted, handler).await
}

/// HTTP/1.1 (after a TLS handshake when `tls` is set) with `handler`; the handshake and the
/// first request head are due within [`ADMIN_HANDSHAKE`] of accept.
async fn serve_h1<H, F>(tls: Option<TlsAcceptor>, stream: TcpStream, accepted: Instant, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let first = FirstRequest::by(accepted + ADMIN_HANDSHAKE);
    match tls {
        None => serve_conn(stream, first, handler).await,
        Some(acceptor) => {
            match tokio::time::timeout_at(accepted + ADMIN_HANDSHAKE, acceptor.accept(stream)).await
            {
                Ok(Ok(tls)) => serve_conn(tls, first, handler).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn serve_conn<S, H, F>(stream: S, first: FirstRequest, handler: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let svc_first = first.clone();
    let handler = Arc::new(handler);
    let svc = service_fn(move |req: Request<Incoming>| {
        svc_first.seen();
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HANDSHAKE)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = first.missed() => tracing::debug!("no request head in time, closing"),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    text(status, "application/json", v.to_string())
}

/// The answer refusing `req` unless it carries `Authorization: Bearer <admin token>`.
fn admin_token_refusal(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Body>> {
    let Some(admin) = &shared.admin_token else {
        return Some(json(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "this gateway has no admin token (admin.token_file), so POST /reload is off; SIGHUP reloads" }),
        ));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if admin.matches(token) => None,
        Some(_) => Some(unauthorized("the token is not the admin token")),
        None => Some(unauthorized(
            "POST /reload needs `Authorization: Bearer <admin token>` (admin.token_file)",
        )),
    }
}

fn unauthorized(why: &str) -> Response<Body> {
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({ "error": why }),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// The operator's endpoints.
async fn operator(
    shared: &Shared,
    control: Arc<dyn Control>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/") => pages::operator(),
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        (&Method::GET, "/status") => json(StatusCode::OK, status::json(shared)),
        (&Method::POST, "/reload") => {
            if let Some(refused) = admin_token_refusal(shared, &req) {
                return refused;
            }
            match tokio::task::spawn_blocking(move || control.reload()).await {
                Ok(Ok(routes)) => json(
                    StatusCode::OK,
                    serde_json::json!({ "reloaded": true, "routes": routes }),
                ),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "reload refused; previous configuration kept");
                    json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "reloaded": false, "error": format!("{e:#}") }),
                    )
                }
                Err(_) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({ "reloaded": false, "error": "reload task failed" }),
                ),
            }
        }
        (_, p) if p.starts_with("/v1/") || p == "/v1" => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "the reservations API is served on its own listener (`[api] listen`), not on the operator's" }),
        ),
        (m, "/" | "/metrics" | "/status") => method_not_allowed(m, "GET"),
        (m, "/reload") => method_not_allowed(m, "POST"),
        _ => full(StatusCode::NOT_FOUND, "No such admin endpoint."),
    }
}

/// A 405 with the `Allow` header RFC 9110 asks for.
fn method_not_allowed(method: &Method, allow: &'static str) -> Response<Body> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        serde_json::json!({ "error": format!("{method} is not allowed here; use {allow}") }),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// The deployers' endpoints: the reservations API, nothing else.
async fn deployers(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match &shared.api {
        Some(_) if path == "/" && req.method() == Method::GET => pages::deployer(),
        Some(_) if path == "/" => method_not_allowed(req.method(), "GET"),
        Some(api) if path.starts_with("/v1/") || path == "/v1" => api
            .handle_with(req, Some(&activity::GatewayActivity(shared)))
            .await
            .map(|body| body.map_err(|never| match never {}).boxed()),
        Some(_) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no API at {path}; see docs/admin-api.yaml") }),
        ),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "the reservations API is not enabled" }),
        ),
    }
}
