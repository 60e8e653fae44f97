//! HTTP backends: a server loop over an already-bound listener (HTTP/1.1 or h2c) for any
//! handler, and the stock backends the end-to-end tests proxy to.
//!
//! Every server lives as long as its [`Served`] handle: dropping or killing it stops the
//! accept loop and closes every open connection, like a killed process.

use crate::net;
use crate::pattern::{PatternCheck, pattern_chunk};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The status code of a raw HTTP/1.x response text (`HTTP/1.1 421 ...`), 0 if it has none.
pub fn status_of(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The response body type of the kit's handlers.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A complete response body.
pub fn full_body(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into())
        .map_err(|n: Infallible| match n {})
        .boxed()
}

/// A running server task on a bound address; aborted, with its connections, when dropped.
#[must_use = "the server stops when its handle is dropped"]
#[derive(Debug)]
pub struct Served {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl Served {
    /// Runs `task` (an accept loop on a listener bound to `addr`) until the handle goes.
    pub fn spawn(addr: SocketAddr, task: impl Future<Output = ()> + Send + 'static) -> Served {
        Served {
            addr,
            task: Some(tokio::spawn(task)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and drops every open connection, and waits until they are gone.
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Accepts on `listener` and runs `conn` for each connection. The connections live in the
/// accept task, so killing it closes them all.
pub fn serve_tcp<F, Fut>(listener: TcpListener, conn: F) -> Served
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().expect("listener address");
    Served::spawn(addr, async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, peer)) = listener.accept().await {
            conns.spawn(conn(stream, peer));
            while conns.try_join_next().is_some() {}
        }
    })
}

/// HTTP version a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 without TLS (prior knowledge).
    H2c,
}

/// Serves `handler` over `protocol` on `listener`.
pub fn serve_http<F, Fut, B>(listener: TcpListener, protocol: Protocol, handler: F) -> Served
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tcp(listener, move |stream, _| {
        let handler = handler.clone();
        async move {
            let svc = service_fn(move |req| {
                let h = handler.clone();
                async move { Ok::<_, Infallible>(h(req).await) }
            });
            let io = TokioIo::new(stream);
            match protocol {
                Protocol::Http1 => {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                }
                Protocol::H2c => {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                }
            }
        }
    })
}

/// An HTTP/1.1 backend answering every request with 200 and `body`.
pub async fn fixed_backend(body: &'static str) -> Served {
    let (l, _) = net::listener().await;
    serve_http(l, Protocol::Http1, move |_req| async move {
        Response::new(full_body(body))
    })
}

/// An HTTP/1.1 backend answering every request with 200 and `served <Host>`, so a client can
/// tell which reservation's route reached it; and its address.
pub async fn host_echo_backend() -> (Served, SocketAddr) {
    let (l, addr) = net::listener().await;
    let served = serve_http(l, Protocol::Http1, |req: Request<Incoming>| async move {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        Response::new(full_body(format!("served {host}")))
    });
    (served, addr)
}

/// HTTP/1.1 backend: `/upload` checks a pattern body (answers `ok <n>` or
/// `corrupt at <i> of <n>`), `/download?n=<bytes>` streams the pattern, any other path
/// answers the request headers as JSON (plus `_path`).
pub async fn http_backend() -> Served {
    let (l, _) = net::listener().await;
    serve_http(l, Protocol::Http1, echo_upload_download)
}

async fn echo_upload_download(req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/upload" => {
            let mut body = req.into_body();
            let mut check = PatternCheck::default();
            let mut broken = false;
            while let Some(f) = body.frame().await {
                let Ok(f) = f else {
                    broken = true;
                    break;
                };
                if let Some(d) = f.data_ref() {
                    check.feed(d);
                }
            }
            let n = check.len;
            let text = match (broken, check.first_bad) {
                (false, None) => format!("ok {n}"),
                (true, _) => format!("corrupt at {} of {n}", u64::MAX),
                (false, Some(at)) => format!("corrupt at {at} of {n}"),
            };
            Response::new(full_body(text))
        }
        "/download" => {
            let total: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            const CHUNK: u64 = 256 * 1024;
            let stream = futures_util::stream::unfold(0u64, move |at| async move {
                if at >= total {
                    return None;
                }
                let len = CHUNK.min(total - at);
                let chunk = pattern_chunk(at, len as usize);
                Some((Ok::<_, std::io::Error>(Frame::data(chunk)), at + len))
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        _ => {
            let mut map = serde_json::Map::new();
            for (k, v) in req.headers() {
                map.insert(
                    k.as_str().to_string(),
                    serde_json::Value::String(v.to_str().unwrap_or("?").to_string()),
                );
            }
            map.insert("_path".into(), path.into());
            Response::new(full_body(serde_json::Value::Object(map).to_string()))
        }
    }
}

/// h2c backend in the style of gRPC: echoes the request body, ends with trailers
/// `grpc-status: 0` and `grpc-message: echoed-<n>`, and answers what it was sent as
/// `:authority` and `Host` in `x-seen-authority` and `x-seen-host`.
pub async fn h2c_backend() -> Served {
    let (l, _) = net::listener().await;
    serve_http(l, Protocol::H2c, grpc_style_echo)
}

async fn grpc_style_echo(req: Request<Incoming>) -> Response<BoxBody> {
    let authority = req.uri().authority().map(|a| a.to_string());
    let host = req.headers().get("host").cloned();
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let data = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers.insert(
        "grpc-message",
        http::HeaderValue::from_str(&format!("echoed-{}", data.len())).expect("header value"),
    );
    let frames = vec![
        Ok::<_, std::io::Error>(Frame::data(data)),
        Ok(Frame::trailers(trailers)),
    ];
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
        frames,
    ))));
    resp.headers_mut().insert(
        "content-type",
        ct.parse()
            .unwrap_or(http::HeaderValue::from_static("application/grpc")),
    );
    if let Some(v) = authority.and_then(|a| a.parse().ok()) {
        resp.headers_mut().insert("x-seen-authority", v);
    }
    if let Some(v) = host {
        resp.headers_mut().insert("x-seen-host", v);
    }
    resp
}

/// A TCP echo backend (for stream routes).
pub async fn tcp_echo_backend() -> Served {
    let (l, _) = net::listener().await;
    serve_tcp(l, |mut s, _| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::pattern;

    async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<BoxBody> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    #[tokio::test]
    async fn http_backend_echoes_uploads_and_downloads() {
        let b = http_backend().await;
        let mut send = h1(b.addr()).await;
        let req = Request::get("/x?y")
            .header("host", "a.test")
            .body(full_body(""))
            .unwrap();
        let body = send.send_request(req).await.unwrap().into_body();
        let v: serde_json::Value =
            serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(
            (v["host"].as_str(), v["_path"].as_str()),
            (Some("a.test"), Some("/x"))
        );

        let req = Request::post("/upload")
            .body(full_body(pattern_chunk(0, 100_000)))
            .unwrap();
        let body = send.send_request(req).await.unwrap().into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ok 100000");
        let mut bad = pattern_chunk(0, 1000).to_vec();
        bad[10] ^= 0xff;
        let req = Request::post("/upload").body(full_body(bad)).unwrap();
        let body = send.send_request(req).await.unwrap().into_body();
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            "corrupt at 10 of 1000"
        );

        let req = Request::get("/download?n=300000")
            .body(full_body(""))
            .unwrap();
        let body = send.send_request(req).await.unwrap().into_body();
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 300_000);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));
    }

    #[tokio::test]
    async fn h2c_backend_echoes_with_trailers() {
        let b = h2c_backend().await;
        let tcp = TcpStream::connect(b.addr()).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post("http://grpc.test/x")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.headers()["x-seen-authority"], "grpc.test");
        let c = resp.into_body().collect().await.unwrap();
        assert_eq!(c.trailers().unwrap()["grpc-message"], "echoed-3");
        assert_eq!(c.to_bytes(), "abc");
    }

    #[tokio::test]
    async fn killing_a_server_closes_its_connections() {
        let mut b = fixed_backend("hi").await;
        let mut send = h1(b.addr()).await;
        let req = Request::get("/").body(full_body("")).unwrap();
        let body = send.send_request(req).await.unwrap().into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hi");
        b.kill().await;
        let req = Request::get("/").body(full_body("")).unwrap();
        assert!(send.send_request(req).await.is_err());
    }
}
