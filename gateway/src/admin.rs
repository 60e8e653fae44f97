//! The admin listener (loopback by default): `/metrics`, `/status`, `POST /reload`, and the
//! reservations API under `/v1/`. Plain HTTP, or TLS when `[admin] tls` is set.

use crate::proxy::{Body, full};
use crate::server::{Inner, api_handler, status_json};
use crate::tls::{Always, load_pem_files};
use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshgate_certs::DevCa;
use meshgate_config::gateway::GatewayConfig;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// Time for an admin client to finish the TLS handshake or send a request head.
const ADMIN_HANDSHAKE: Duration = Duration::from_secs(10);

/// The admin listener's TLS acceptor from `[admin] tls`, or `None` for plain HTTP.
pub(crate) fn tls_acceptor(
    config: &GatewayConfig,
    dev_ca: Option<&DevCa>,
) -> Result<Option<TlsAcceptor>> {
    let Some(t) = &config.admin.tls else {
        return Ok(None);
    };
    let cert = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            warn_if_readable_by_others(key);
            load_pem_files(cert, key)
                .context("admin.tls: cannot load the admin certificate")?
                .1
        }
        _ => {
            let ca = dev_ca.context("admin.tls.dev_ca needs a [tls.dev_ca] table")?;
            ca.certified_key(&dev_ca_names(config))
                .context("admin.tls: cannot issue the admin certificate from the dev CA")?
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Always(cert)));
    // The admin server speaks HTTP/1.1 only.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

/// Private keys are secrets (mode 0600); say so when the file is open to group or others.
fn warn_if_readable_by_others(key: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %key.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "admin TLS key is readable by group or others; chmod 600 it"
        );
    }
}

/// Names on a dev-CA admin certificate: the configured ones, else the listen address (both
/// loopbacks when it is a wildcard) and `localhost`.
fn dev_ca_names(config: &GatewayConfig) -> Vec<String> {
    let names = config
        .admin
        .tls
        .as_ref()
        .map(|t| t.names.clone())
        .unwrap_or_default();
    if !names.is_empty() {
        return names;
    }
    let ip = config.admin.listen.ip();
    let mut names = if ip.is_unspecified() {
        vec!["127.0.0.1".to_string(), "::1".to_string()]
    } else {
        vec![ip.to_string()]
    };
    names.push("localhost".into());
    names
}

pub(crate) async fn serve(inner: &Arc<Inner>, stream: TcpStream) {
    match inner.admin_tls.clone() {
        None => serve_conn(inner, stream).await,
        Some(acceptor) => {
            match tokio::time::timeout(ADMIN_HANDSHAKE, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_conn(inner, tls).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "admin TLS handshake failed"),
                Err(_) => tracing::debug!("admin TLS handshake timed out"),
            }
        }
    }
}

async fn serve_conn<S>(inner: &Arc<Inner>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let inner = inner.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(route(&inner, req).await) }
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
