//! The gateway side of ACME validations for tests that drive a certificate manager in the
//! test process: an HTTP-01 responder and a TLS listener that hands `acme-tls/1` handshakes
//! the TLS-ALPN-01 configuration. The kit depends on no meshgate crate, so the manager's
//! answers come in as closures and configurations.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Serves HTTP-01 on `listener` until the task is aborted: `GET
/// /.well-known/acme-challenge/<token>` answers `answer(token)`, anything else 404. Every
/// request is counted in `hits` (so a test can tell which gateway was asked).
pub fn serve_http01<F>(listener: TcpListener, answer: F, hits: Arc<AtomicU64>) -> JoinHandle<()>
where
    F: Fn(&str) -> Option<String> + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (answer, hits) = (answer.clone(), hits.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        let body = req
                            .uri()
                            .path()
                            .strip_prefix("/.well-known/acme-challenge/")
                            .and_then(&answer);
                        async move {
                            let status = match body {
                                Some(_) => hyper::StatusCode::OK,
                                None => hyper::StatusCode::NOT_FOUND,
                            };
                            let mut resp = hyper::Response::new(Full::new(
                                body.map(Bytes::from).unwrap_or_default(),
                            ));
                            *resp.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Serves TLS on `listener` until the task is aborted: a handshake offering `acme-tls/1`
/// gets `alpn01()` (the TLS-ALPN-01 configuration at that moment), others `normal`. An
/// established connection echoes what it reads, so a test can tell it is still alive.
pub fn serve_tls<A>(
    listener: TcpListener,
    normal: Arc<rustls::ServerConfig>,
    alpn01: A,
) -> JoinHandle<()>
where
    A: Fn() -> Arc<rustls::ServerConfig> + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (normal, alpn01) = (normal.clone(), alpn01.clone());
            tokio::spawn(async move {
                let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                    rustls::server::Acceptor::default(),
                    stream,
                );
                let Ok(start) = acceptor.await else { return };
                let offers_acme = start
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
                let config = if offers_acme { alpn01() } else { normal };
                let Ok(mut tls) = start.into_stream(config).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}
