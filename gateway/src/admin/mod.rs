//! The admin listener (loopback by default): `/metrics`, `/status`, `POST /reload`, and the
//! reservations API under `/v1/`. Plain HTTP, or TLS when `[admin] tls` is set.

pub mod api;
pub mod overlay;
mod status;
pub(crate) mod tls;

use crate::http::body::{Body, full};
use crate::state::Shared;
use anyhow::Result;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// What the admin listener asks of the gateway it belongs to.
pub trait Control: Send + Sync + 'static {
    /// Re-reads the configuration file and applies it; the number of routes.
    fn reload(&self) -> Result<usize>;
}

/// Time for an admin client to finish the TLS handshake or send a request head.
const ADMIN_HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves one admin connection (after its TLS handshake when `[admin] tls` is set).
pub(crate) async fn serve(shared: &Arc<Shared>, control: &Arc<dyn Control>, stream: TcpStream) {
    match shared.admin_tls.clone() {
        None => serve_conn(shared, control, stream).await,
        Some(acceptor) => {
            match tokio::time::timeout(ADMIN_HANDSHAKE, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_conn(shared, control, tls).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                Err(_) => tracing::debug!("admin TLS handshake timed out"),
            }
        }
    }
}

async fn serve_conn<S>(shared: &Arc<Shared>, control: &Arc<dyn Control>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = shared.clone();
    let control = control.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let control = control.clone();
        async move { Ok::<_, Infallible>(route(&shared, control, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HANDSHAKE)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
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

async fn route(
    shared: &Shared,
    control: Arc<dyn Control>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        (&Method::GET, "/status") => json(StatusCode::OK, status::json(shared)),
        (&Method::POST, "/reload") => {
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
        (_, p) if p.starts_with("/v1/") || p == "/v1" => match &shared.api {
            Some(api) => api
                .handle(req)
                .await
                .map(|body| body.map_err(|never| match never {}).boxed()),
            None => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "the reservations API is not enabled" }),
            ),
        },
        _ => full(StatusCode::NOT_FOUND, "No such admin endpoint."),
    }
}
