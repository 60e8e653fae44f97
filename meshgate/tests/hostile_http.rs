//! Hostile HTTP clients against a gateway served in-process (issue 13, items 5, 6, 7, 9):
//! the backend sees exactly one, validated Host and no client-made address headers; a request
//! for a host the TLS connection does not cover is misdirected (421); only the upgrades a
//! route allows are tunnelled, never h2c; a backend that leads back to the gateway gets 508.
//! Malformed requests go over raw TLS; the rest through hyper and tungstenite.

mod common;

use bytes::Bytes;
use common::{InProcess, http_backend, ws_backend};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_config::gateway::GatewayConfig;
use meshgate_gateway::{Gateway, GatewayParts};
use meshgate_testkit::http::{BoxBody, Protocol, Served, full_body, serve_http, status_of};
use meshgate_testkit::tls::{roots_from_pem_file, tls_connect};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A gateway serving in this process, its listeners, and the backends behind its routes.
struct Fixture {
    gateway: Gateway,
    serving: Option<InProcess>,
    https: SocketAddr,
    http: SocketAddr,
    dir: tempfile::TempDir,
    _backends: Vec<Served>,
}

/// Routes: `a.test`, `b.test` and `*.wild.test` to the echo backend (answers the headers it
/// got as JSON), `pass.test` passthrough to the echo backend too (so plaintext reaching it
/// would be answered), `ws.test` to a WebSocket echo, `up.test` to a backend that accepts any
/// upgrade it is offered.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let echo = http_backend().await;
    let ws = ws_backend().await;
    let up = upgrading_backend().await;
    let body = routes(&echo.addr(), &ws.addr(), &up.addr(), "");
    let gateway = Gateway::new(GatewayParts::new(config(dir.path(), &body))).unwrap();
    let bound = gateway.bind().unwrap();
    let https = bound.https[0].local_addr().unwrap();
    let http = bound.http[0].local_addr().unwrap();
    let serving = Some(InProcess::serve(&gateway, bound));
    Fixture {
        gateway,
        serving,
        https,
        http,
        dir,
        _backends: vec![echo, ws, up],
    }
}

fn routes(echo: &SocketAddr, ws: &SocketAddr, up: &SocketAddr, more: &str) -> String {
    format!(
        "[[route]]\nhost = \"a.test\"\nbackends = [{{ addr = \"{echo}\" }}]\n\
         [[route]]\nhost = \"b.test\"\nbackends = [{{ addr = \"{echo}\" }}]\n\
         [[route]]\nhost = \"*.wild.test\"\nbackends = [{{ addr = \"{echo}\" }}]\n\
         [[route]]\nhost = \"pass.test\"\nmode = \"passthrough\"\nbackends = [{{ addr = \"{echo}\" }}]\n\
         [[route]]\nhost = \"ws.test\"\nbackends = [{{ addr = \"{ws}\" }}]\n\
         [[route]]\nhost = \"up.test\"\nbackends = [{{ addr = \"{up}\" }}]\n{more}"
    )
}

/// Loopback listeners on port 0, the dev CA in `dir`, loopback backends allowed.
fn config(dir: &Path, body: &str) -> GatewayConfig {
    let text = format!(
        "data_dir = \"{d}\"\n\
         [listen]\nhttps = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [tls.dev_ca]\ndir = \"{d}/ca\"\n\
         [security]\nallow_private_backends = true\n{body}",
        d = dir.display()
    );
    GatewayConfig::parse(&dir.join("gateway.toml"), &text).unwrap()
}

impl Fixture {
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca").join("ca.pem")
    }

    async fn tls(&self, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        tls_connect(self.https, sni, &roots_from_pem_file(&self.ca()), alpn)
            .await
            .unwrap_or_else(|e| panic!("TLS to {sni}: {e}"))
    }

    /// Writes `head` as is on a TLS connection for `sni`; the status and the whole answer
    /// (the gateway closes after `Connection: close`; a tunnel is cut after 2 s).
    async fn raw(&self, sni: &str, head: &str) -> (u16, String) {
        let mut tls = self.tls(sni, &[b"http/1.1"]).await;
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tls.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).to_string();
        (status_of(&text), text)
    }

    /// An HTTP/1.1 request through hyper on a connection for `sni`.
    async fn h1(&self, sni: &str, req: Request<Empty<Bytes>>) -> (StatusCode, String) {
        let tls = self.tls(sni, &[b"http/1.1"]).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        answer(send.send_request(req)).await
    }

    /// An HTTP/2 request through hyper on a connection for `sni`.
    async fn h2(&self, sni: &str, req: Request<Empty<Bytes>>) -> (StatusCode, String) {
        let tls = self.tls(sni, &[b"h2"]).await;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        answer(send.send_request(req)).await
    }

    async fn stop(mut self) {
        if let Some(s) = self.serving.take() {
            s.stop().await;
        }
    }
}

async fn answer(
    resp: impl std::future::Future<Output = hyper::Result<Response<Incoming>>>,
) -> (StatusCode, String) {
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer within 10 s")
        .expect("a response");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut b = Request::get(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new()).unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A backend that accepts whatever `Upgrade` it is offered (`/switch-to-h2c`: always
/// switches to h2c) and then echoes bytes; without an offer it answers `no upgrade`.
async fn upgrading_backend() -> Served {
    let (l, _) = meshgate_testkit::listener().await;
    serve_http(
        l,
        Protocol::Http1,
        |mut req: Request<Incoming>| async move {
            let offered = req.headers().get("upgrade").cloned();
            let Some(offered) = offered else {
                return Response::new(full_body("no upgrade"));
            };
            let protocol = if req.uri().path() == "/switch-to-h2c" {
                http::HeaderValue::from_static("h2c")
            } else {
                offered
            };
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut resp: Response<BoxBody> = Response::new(full_body(""));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert("connection", http::HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert("upgrade", protocol);
            resp
        },
    )
}

/// Item 5: the backend receives exactly one Host, the validated routed one; a Host that
/// disagrees with the target or `:authority`, or a second Host, gets 400; `Connection`
/// cannot remove Host; client-sent client-address headers never reach the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_one_honest_host() {
    let fx = fixture().await;

    // Absolute-form target naming b.test with another Host: 400 (RFC 9112 §3.2.2).
    let (status, text) = fx
        .raw(
            "b.test",
            "GET http://b.test/echo HTTP/1.1\r\nHost: evil.example\"><x\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 400, "{text}");
    // Two Host fields: 400, even when one of them is right.
    let (status, text) = fx
        .raw(
            "b.test",
            "GET /echo HTTP/1.1\r\nHost: b.test\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 400, "{text}");
    // HTTP/2 `:authority: b.test` with `host: evil.example`: 400 (RFC 9113 §8.3.1).
    let (status, body) = fx
        .h2(
            "b.test",
            get("https://b.test/echo", &[("host", "evil.example")]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The same Host as the target is fine, and the backend gets it once.
    let (status, text) = fx
        .raw(
            "b.test",
            "GET http://b.test/echo HTTP/1.1\r\nHost: B.test\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    assert_eq!(json(body)["host"], "b.test", "{text}");

    // `Connection: host` and the client-address headers apps trust.
    let (status, body) = fx
        .h1(
            "b.test",
            get(
                "/echo",
                &[
                    ("host", "b.test"),
                    ("connection", "host, x-forwarded-for"),
                    ("x-real-ip", "6.6.6.6"),
                    ("true-client-ip", "6.6.6.6"),
                    ("x-forwarded-port", "1"),
                    ("x-client-ip", "6.6.6.6"),
                    ("cf-connecting-ip", "6.6.6.6"),
                    ("x_real_ip", "6.6.6.6"),
                    ("x-forwarded-for", "6.6.6.6"),
                    ("forwarded", "for=6.6.6.6"),
                ],
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json(&body);
    assert_eq!(v["host"], "b.test", "{v}");
    assert_eq!(v["x-real-ip"], "127.0.0.1", "{v}");
    assert_eq!(v["x-forwarded-for"], "127.0.0.1", "{v}");
    assert_eq!(v["forwarded"], "for=127.0.0.1;proto=https;host=\"b.test\"");
    for gone in [
        "true-client-ip",
        "x-forwarded-port",
        "x-client-ip",
        "cf-connecting-ip",
        "x_real_ip",
    ] {
        assert!(v.get(gone).is_none(), "{gone} reached the backend: {v}");
    }
    fx.stop().await;
}

/// Item 6: on TLS for `a.test`, a request for `b.test` (not covered by a.test's certificate)
/// or for the passthrough route `pass.test` gets 421 and reaches no backend; a host the
/// certificate covers (a wildcard sibling) is served, as browsers coalesce connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_outside_the_tls_names_is_misdirected() {
    let fx = fixture().await;
    let (status, body) = fx.h1("a.test", get("/echo", &[("host", "b.test")])).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    let (status, body) = fx.h2("a.test", get("https://b.test/echo", &[])).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    // The passthrough route's backend would have got a plaintext request.
    let (status, text) = fx
        .raw(
            "a.test",
            "GET /secret HTTP/1.1\r\nHost: pass.test\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status, 421, "{text}");
    assert!(!text.contains("\"_path\":\"/secret\""), "{text}");

    // Served: the SNI itself (any case, with port), and a name the certificate covers.
    let (status, body) = fx
        .h1("a.test", get("/echo", &[("host", "A.test:443")]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = fx
        .h2("x.wild.test", get("https://y.wild.test/echo", &[]))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Plain HTTP has no TLS names: a plain-HTTP request is redirected as before.
    let (status, text) = raw_plain(fx.http, "a.test").await;
    assert_eq!(status, 308, "{text}");
    fx.stop().await;
}

async fn raw_plain(addr: SocketAddr, host: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    (status_of(&text), text)
}

/// Item 7: `Upgrade: h2c` never opens a tunnel (the backend sees no offer and answers as
/// usual); a backend switching to a protocol that was not offered gets 502; WebSocket still
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_upgrades_are_tunnelled() {
    let fx = fixture().await;
    let (status, text) = fx
        .raw(
            "up.test",
            "GET / HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await;
    assert_eq!(status, 200, "h2c must not be tunnelled: {text}");
    assert!(text.ends_with("no upgrade"), "{text}");
    // Offered websocket, the backend switches to h2c: no tunnel.
    let (status, text) = fx
        .raw(
            "up.test",
            "GET /switch-to-h2c HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\n\r\n",
        )
        .await;
    assert_eq!(status, 502, "{text}");
    // An offer the route allows is tunnelled.
    let (status, text) = fx
        .raw(
            "up.test",
            "GET / HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await;
    assert_eq!(status, 101, "{text}");

    let tls = fx.tls("ws.test", &[b"http/1.1"]).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://ws.test/chat", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), "hi");
    fx.stop().await;
}

/// Item 9: a route whose backend is the gateway itself answers 508 on the second lap instead
/// of filling every slot; ordinary requests carry this gateway's `Via` entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_leading_back_here_is_a_loop() {
    let fx = fixture().await;
    let (status, body) = fx.h1("a.test", get("/echo", &[("host", "a.test")])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let via = json(&body)["via"].as_str().unwrap_or_default().to_string();
    assert!(via.starts_with("1.1 meshgate-"), "{body}");

    // The loop route sends to the gateway's own plain-HTTP listener, which serves it.
    let echo = fx._backends[0].addr();
    let ws = fx._backends[1].addr();
    let up = fx._backends[2].addr();
    let more = format!(
        "[[route]]\nhost = \"loop.test\"\nbackends = [{{ addr = \"{}\" }}]\n\
         options = {{ allow_plain_http = true }}\n",
        fx.http
    );
    fx.gateway
        .apply(config(fx.dir.path(), &routes(&echo, &ws, &up, &more)))
        .unwrap();
    let (status, body) = fx.h1("loop.test", get("/", &[("host", "loop.test")])).await;
    assert_eq!(status, StatusCode::LOOP_DETECTED, "{body}");
    // A client cannot make its own request look looped to a gateway it does not know.
    let (status, body) = fx
        .h1(
            "a.test",
            get("/echo", &[("host", "a.test"), ("via", "1.1 meshgate-0")]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    fx.stop().await;
}
