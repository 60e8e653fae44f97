//! The admin listener (loopback by default): `/metrics`, `/status`, `POST /reload`, and the
//! reservations API under `/v1/`.

use crate::proxy::{Body, full};
use crate::server::{Inner, api_handler, status_json};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpStream;

pub(crate) async fn serve(inner: &Arc<Inner>, stream: TcpStream) {
    let inner = inner.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(route(&inner, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10))
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

async fn route(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            inner.metrics.encode(),
        ),
        (&Method::GET, "/status") => json(StatusCode::OK, status_json(inner)),
        (&Method::POST, "/reload") => {
            let inner2 = inner.clone();
            match tokio::task::spawn_blocking(move || inner2.reload()).await {
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
        (_, p) if p.starts_with("/v1/") || p == "/v1" => match api_handler(inner) {
            Some(api) => api(req).await,
            None => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "the reservations API is not enabled" }),
            ),
        },
        _ => full(StatusCode::NOT_FOUND, "No such admin endpoint."),
    }
}
