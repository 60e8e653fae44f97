//! The lean upstream path behind hyper's server (HTTP/1.1 and h2 by ALPN, configured as the
//! gateway's): what hyper's client-facing side costs on its own.

use crate::Pool;
use crate::http2::{answer, exchange};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Serves one client connection with hyper until it closes.
pub async fn serve(tls: TlsStream<TcpStream>, peer: String, pool: Arc<Pool>) {
    let peer: Arc<str> = peer.into();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (peer, pool) = (peer.clone(), pool.clone());
        async move {
            let (parts, body) = req.into_parts();
            let exchanged = exchange(&parts, body.is_end_stream(), &peer, &pool).await;
            let (status, headers, body) = answer(exchanged);
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
}
