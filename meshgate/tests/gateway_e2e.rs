//! End to end: the real `meshgate gateway` binary → embedded overlay node → workload overlay
//! node (in the test) → loopback services, driven by real clients.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_testkit::eventually_blocking;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Routes of the main fixture: each service is reached through the overlay, except
/// `direct.test` (loopback, refused by the SSRF guard).
struct Fixture {
    gw: GatewayProcess,
    workload: Workload,
    _dir: tempfile::TempDir,
    _backends: Vec<Served>,
    backend_cert: Vec<u8>,
    tls_backend: TlsBackend,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backends = vec![
        http_backend().await,
        h2c_backend().await,
        ws_backend().await,
    ];
    let (http, h2c, ws) = (backends[0].addr(), backends[1].addr(), backends[2].addr());
    // The passthrough backend's own CA, unknown to the gateway (curl trusts it by file).
    let other_ca = TestCa::new("backend CA");
    other_ca.write_pem(&dir.path().join("backend-ca").join("ca.pem"));
    let leaf = other_ca.issue(&["pass.test"]);
    let backend_cert = leaf.chain[0].to_vec();
    let tls_backend = tls_backend(&leaf, true).await;
    let tls = tls_backend.addr();
    let mut workload = Workload::start(dir.path()).await;
    let o_http = workload.expose(80, http);
    let o_h2c = workload.expose(81, h2c);
    let o_ws = workload.expose(82, ws);
    let o_tls = workload.expose(443, tls);
    let body = format!(
        "{overlay}\
[timeouts]\nheader_ms = 1500\nhandshake_ms = 1500\n\
[[route]]\nhost = \"echo.test\"\nbackends = [{{ addr = \"{o_http}\" }}]\n\
[[route]]\nhost = \"plain.test\"\nbackends = [{{ addr = \"{o_http}\" }}]\noptions = {{ allow_plain_http = true }}\n\
[[route]]\nhost = \"grpc.test\"\nbackends = [{{ addr = \"{o_h2c}\" }}]\noptions = {{ backend_protocol = \"h2c\" }}\n\
[[route]]\nhost = \"ws.test\"\nbackends = [{{ addr = \"{o_ws}\" }}]\n\
[[route]]\nhost = \"pass.test\"\nmode = \"passthrough\"\nbackends = [{{ addr = \"{o_tls}\" }}]\noptions = {{ proxy_protocol = true }}\n\
[[route]]\nhost = \"direct.test\"\nbackends = [{{ addr = \"{http}\" }}]\n\
[[route]]\nhost = \"dead.test\"\nbackends = [{{ addr = \"[{dead}]:9\" }}]\n",
        overlay = workload.gateway_overlay_section(dir.path()),
        dead = workload.node.node.address(),
    );
    let gw = start_gateway(dir.path(), &body);
    // The overlay link comes up in the background: wait until a request gets through.
    let probe = &gw;
    eventually(
        Duration::from_secs(30),
        "the overlay to carry a request",
        || probe.curl("echo.test", "/echo", &[]).0 == 200,
    )
    .await;
    Fixture {
        gw,
        workload,
        _dir: dir,
        _backends: backends,
        backend_cert,
        tls_backend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_end_to_end() {
    let mut fx = fixture().await;
    let gw = &fx.gw;

    // curl over HTTP/1.1 and HTTP/2: body from the workload, forwarding headers set.
    for version in ["--http1.1", "--http2"] {
        let (status, body) = gw.curl(
            "echo.test",
            "/echo",
            &[
                version,
                "-H",
                "X-Forwarded-For: 6.6.6.6",
                "-H",
                "Connection: x-drop",
                "-H",
                "X-Drop: 1",
            ],
        );
        assert_eq!(status, 200, "{version}: {body}\n{}", gw.log());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["x-forwarded-for"], "127.0.0.1", "{version}: {v}");
        assert_eq!(v["x-forwarded-proto"], "https", "{version}: {v}");
        assert_eq!(v["x-forwarded-host"], "echo.test", "{version}: {v}");
        assert_eq!(
            v["forwarded"],
            "for=127.0.0.1;proto=https;host=\"echo.test\""
        );
        assert!(v["host"].as_str().unwrap().starts_with("echo.test"), "{v}");
        if version == "--http1.1" {
            // (h2 has no Connection header: curl drops it, so X-Drop is an ordinary header.)
            assert!(v.get("x-drop").is_none(), "hop-by-hop header leaked: {v}");
        }
    }

    big_upload_and_download(gw).await;
    socket_buffer_memory_is_shown(gw).await;
    grpc_style_h2_to_h2c(gw).await;
    websocket_echo(gw).await;
    passthrough_shows_backend_certificate(gw, &fx.backend_cert, &mut fx.tls_backend.proxy_headers)
        .await;

    // Unknown SNI: TLS alert, curl fails the handshake; unknown Host on a known SNI: 404.
    let (status, _) = gw.curl("nope.test", "/", &[]);
    assert_eq!(status, 0, "unknown SNI must not get an HTTP answer");
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", gw.https))
        .args(["-servername", "nope.test"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unrecognized name"), "{text}");
    let (status, body) = gw.curl("echo.test", "/", &["-H", "Host: other.test"]);
    assert_eq!(status, 404, "{body}");

    // SSRF guard: a loopback direct backend is refused, the page names no internals.
    // (With every backend refused, the pool answers 503.)
    let (status, body) = gw.curl("direct.test", "/echo", &[]);
    assert!(status == 502 || status == 503, "{status} {body}");
    assert!(
        !body.contains("127.0.0.1") && !body.contains("SSRF"),
        "{body}"
    );
    assert!(
        gw.log().contains("refused by the SSRF guard"),
        "{}",
        gw.log()
    );
    // A dead overlay backend: 502 or 504, naming nothing internal.
    let (status, body) = gw.curl("dead.test", "/", &[]);
    assert!(matches!(status, 502..=504), "{status} {body}");
    assert!(!body.contains(":9"), "{body}");

    // :80 redirects with 308 unless the route allows plain HTTP.
    let (status, head) = gw.curl_plain("echo.test", "/a?b=1");
    assert_eq!(status, 308, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("location: https://echo.test/a?b=1"),
        "{head}"
    );
    let (status, body) = gw.curl_plain("plain.test", "/echo");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"x-forwarded-proto\":\"http\""), "{body}");

    // Metrics and status on the admin listener.
    let metrics = gw.admin_get("/metrics");
    assert!(
        metrics.contains("meshgate_requests_total{route=\"echo.test\",status=\"2xx\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshgate_request_duration_seconds_bucket{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshgate_sent_bytes_total{route=\"echo.test\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshgate_errors_total{route=\"direct.test\",kind=\"backend_connect\"}"),
        "{metrics}"
    );
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/status")).unwrap();
    let routes = status["routes"].as_array().unwrap();
    assert!(routes.len() >= 6, "{status}");
    let echo = routes.iter().find(|r| r["host"] == "echo.test").unwrap();
    assert!(
        echo["pool"][0]["requests"].as_u64().unwrap_or(0) > 0,
        "{echo}"
    );
    assert!(gw.log().contains("access"), "access log lines expected");

    // The embedded overlay node on the admin listener: its link to the workload node, its
    // counters in /metrics.
    let workload = fx.workload.node.node.address().to_string();
    eventually(
        Duration::from_secs(10),
        "the overlay link in /status and /metrics",
        || {
            let status: serde_json::Value =
                serde_json::from_str(&gw.admin_get("/status")).unwrap_or_default();
            let overlay = &status["overlay"];
            let linked = overlay["peers"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p["address"] == workload && p["state"] == "up")
            });
            let metrics = gw.admin_get("/metrics");
            let value = |series: &str| {
                metrics
                    .lines()
                    .find(|l| l.starts_with(series))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            overlay["address"]
                .as_str()
                .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
                .is_some_and(|a| meshgate_overlay::is_overlay_v6(&a))
                && linked
                && value("meshgate_overlay_peers ") == 1.0
                && value("meshgate_overlay_events_total{event=\"packets_delivered\"}") > 0.0
                && value("meshgate_overlay_bytes_total{event=\"bytes_sent\"}") > 100_000_000.0
                && metrics.contains("meshgate_overlay_link_rtt_seconds{peer=\"")
                && metrics.contains("meshgate_overlay_tcp_sockets ")
        },
    )
    .await;
}

async fn big_upload_and_download(gw: &GatewayProcess) {
    const SIZE: u64 = 100 * 1024 * 1024;
    const CHUNK: u64 = 256 * 1024;
    let (mut send, _conn) = gw.h1("echo.test").await;
    let stream = futures_util::stream::unfold(0u64, |at| async move {
        if at >= SIZE {
            return None;
        }
        let len = CHUNK.min(SIZE - at);
        Some((
            Ok::<_, std::io::Error>(Frame::data(pattern_chunk(at, len as usize))),
            at + len,
        ))
    });
    let req = http::Request::post("/upload")
        .header("host", "echo.test")
        .body(StreamBody::new(stream))
        .unwrap();
    let started = Instant::now();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from(format!("ok {SIZE}")), "upload");
    eprintln!("100 MB upload in {:?}", started.elapsed());

    let req = http::Request::get(format!("/download?n={SIZE}"))
        .header("host", "echo.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let (mut send, _conn) = gw.h1("echo.test").await;
    let started = Instant::now();
    let mut body = send.send_request(req).await.unwrap().into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        let f = f.unwrap();
        if let Some(d) = f.data_ref() {
            for (k, b) in d.iter().enumerate() {
                assert_eq!(
                    *b,
                    pattern(n + k as u64),
                    "download corrupt at {}",
                    n + k as u64
                );
            }
            n += d.len() as u64;
        }
    }
    assert_eq!(n, SIZE, "download length");
    eprintln!("100 MB download in {:?}", started.elapsed());
}

/// The gateway's userspace-stack socket buffers on `/status` and `/metrics`: a download the
/// client stops reading fills its receive buffer (seen), and once it ends the pages go back
/// (seen falling).
async fn socket_buffer_memory_is_shown(gw: &GatewayProcess) {
    let shown = || -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&gw.admin_get("/status")).unwrap_or_default();
        status["overlay"]["stack"]["socket_buffer_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let req = http::Request::get("/download?n=268435456")
        .header("host", "echo.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let (mut send, conn) = gw.h1("echo.test").await;
    let mut body = send.send_request(req).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    // Not read further: the kernel's socket buffers fill, then the gateway's stack buffer.
    eventually(
        Duration::from_secs(20),
        "a stalled download's stack buffer in /status",
        || shown() >= 128 * 1024,
    )
    .await;
    let metrics = gw.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshgate_overlay_socket_buffer_bytes ")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)),
        "{metrics}"
    );
    drop(body);
    drop(send);
    conn.abort();
    eventually(
        Duration::from_secs(20),
        "the stack buffer given back after the download ends",
        || shown() < 64 * 1024,
    )
    .await;
}

async fn grpc_style_h2_to_h2c(gw: &GatewayProcess) {
    let tls = gw.tls("grpc.test", &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several concurrent calls on one h2 connection.
    let mut calls = Vec::new();
    for i in 0..8u8 {
        let msg = Bytes::from(vec![0, 0, 0, 0, 3, i, i, i]);
        let req = http::Request::post("https://grpc.test/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(msg.clone()))
            .unwrap();
        let fut = send.send_request(req);
        calls.push(async move {
            let resp = fut.await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["content-type"], "application/grpc");
            // `:authority` is the host the client asked for, not the backend's address.
            assert_eq!(resp.headers()["x-seen-authority"], "grpc.test");
            assert!(resp.headers().get("x-seen-host").is_none());
            let collected = resp.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["grpc-message"], "echoed-8");
            assert_eq!(collected.to_bytes(), msg);
        });
    }
    futures_util::future::join_all(calls).await;
}

async fn ws_connect(
    gw: &GatewayProcess,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = gw.tls("ws.test", &[b"http/1.1"]).await;
    let (ws, resp) = tokio_tungstenite::client_async("wss://ws.test/chat", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

async fn ws_roundtrip<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .expect("stream open")
        .expect("message");
    assert_eq!(got.into_text().unwrap().as_str(), text);
}

async fn websocket_echo(gw: &GatewayProcess) {
    let mut ws = ws_connect(gw).await;
    for i in 0..20 {
        ws_roundtrip(&mut ws, &format!("hello {i}")).await;
    }
    let big = "x".repeat(300_000);
    ws_roundtrip(&mut ws, &big).await;
    ws.close(None).await.unwrap();
}

async fn passthrough_shows_backend_certificate(
    gw: &GatewayProcess,
    backend_cert: &[u8],
    proxy_rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", gw.https))
        .args(["-servername", "pass.test", "-showcerts"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pem = text
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|s| s.split("-----END CERTIFICATE-----").next())
        .unwrap_or_else(|| panic!("no certificate from openssl: {text}\n{}", gw.log()));
    let b64: String = pem.split_whitespace().collect();
    let expected = rustls_pki_types::CertificateDer::from(backend_cert.to_vec());
    assert_eq!(
        pem_body(&pem_of(&expected)),
        b64,
        "the certificate seen must be the backend's"
    );
    assert!(
        text.contains("CN=pass.test") || text.contains("CN = pass.test"),
        "{text}"
    );
    // The backend got a PROXY v2 header naming the client (127.0.0.1).
    let header = tokio::time::timeout(Duration::from_secs(5), proxy_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&header[16..20], &[127, 0, 0, 1], "{header:?}");

    // A real request through passthrough with curl, trusting the backend's CA.
    let ca = gw.dir.join("backend-ca").join("ca.pem");
    let resolve = format!("pass.test:{}:127.0.0.1", gw.https);
    let (status, body) = run_curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &format!("https://pass.test:{}/", gw.https),
    ]);
    assert_eq!((status, body.as_str()), (200, "passthrough-ok"));
}

fn pem_of(cert: &rustls_pki_types::CertificateDer<'_>) -> String {
    use base64_lite::encode;
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        encode(cert.as_ref())
    )
}

fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
}

/// Standard base64 (for comparing certificates printed by openssl).
mod base64_lite {
    pub fn encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// Malformed ClientHellos, oversized headers and slowloris clients get closed or 4xx while a
/// normal client keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_do_not_starve_others() {
    let dir = tempfile::tempdir().unwrap();
    let backend = http_backend().await;
    let http = backend.addr();
    let body = format!(
        "[security]\nallow_private_backends = true\n\
         [timeouts]\nheader_ms = 1000\nhandshake_ms = 1000\n\
         [limits]\nmax_header_bytes = 16384\nmax_headers = 50\n\
         [[route]]\nhost = \"echo.test\"\nbackends = [{{ addr = \"{http}\" }}]\n\
         [[route]]\nhost = \"*.wild.test\"\nbackends = [{{ addr = \"{http}\" }}]\n"
    );
    let gw = start_gateway(dir.path(), &body);
    let ok = |gw: &GatewayProcess| gw.curl("echo.test", "/echo", &[]).0 == 200;
    assert!(ok(&gw), "{}", gw.log());

    // A Host that a wildcard route would match but that is no DNS name: 400, never echoed
    // into `Forwarded` or `Location`.
    let injected = "a\";for=\"1.wild.test";
    let (status, body) = gw.curl(
        "x.wild.test",
        "/echo",
        &["--http1.1", "-H", &format!("Host: {injected}")],
    );
    assert_eq!(status, 400, "{body}");
    let (status, head) = gw.curl_plain(injected, "/");
    assert_eq!(status, 400, "{head}");
    assert!(!head.to_ascii_lowercase().contains("location:"), "{head}");
    let (status, body) = gw.curl("x.wild.test", "/echo", &[]);
    assert_eq!(status, 200, "{body}");

    // Malformed ClientHellos: a broken handshake record, and a non-TLS request.
    for junk in [
        &b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff"[..],
        &b"\x16\x03\x01\x40\x00\x01\xff\xff\xff"[..],
        &b"GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n"[..],
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.https))
            .await
            .unwrap();
        s.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "connection must be closed for {junk:?}");
        assert!(
            buf.is_empty() || buf[0] == 21,
            "only an alert may come back: {buf:?}"
        );
    }

    // Slowloris: 40 connections dribbling a request head on :80 and 40 dribbling a
    // ClientHello on :443. All are cut off after the configured timeouts, while a normal
    // client keeps getting answers.
    let mut slow = Vec::new();
    for i in 0..80 {
        let tls = i % 2 == 1;
        let port = if tls { gw.https } else { gw.http };
        slow.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let start = Instant::now();
            // A request head that never ends, or a plausible ClientHello: one 512-byte
            // handshake record holding a 508-byte ClientHello (well under the size limit, so
            // only the handshake timeout can end it).
            let head: Vec<u8> = if tls {
                vec![
                    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
                ]
            } else {
                b"GET / HTTP/1.1\r\nHost: echo.test\r\nX-A: ".to_vec()
            };
            let mut answered = false;
            for b in head.iter().chain(std::iter::repeat(&b'a')) {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(8),
                    "slow client not cut off"
                );
                let mut probe = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(100), s.read(&mut probe)).await {
                    Err(_) => {}
                    Ok(n) => {
                        answered = n.is_ok_and(|n| n > 0);
                        break;
                    }
                }
            }
            (tls, start.elapsed(), answered)
        }));
    }
    // A normal client is served all the while the slow ones are connected (at least five
    // requests, one after another).
    let mut probes = 0;
    while probes < 5 || !slow.iter().all(|s| s.is_finished()) {
        assert!(ok(&gw), "normal client starved: {}", gw.log());
        probes += 1;
    }
    for s in slow {
        let (tls, took, answered) = s.await.unwrap();
        assert!(took < Duration::from_secs(5), "cut off after {took:?}");
        if tls {
            // The handshake timeout (1000 ms) ends it, silently: the size check would have
            // answered at once with an alert.
            assert!(
                took >= Duration::from_millis(900),
                "TLS cut off after {took:?}"
            );
            assert!(!answered, "a timed-out ClientHello gets no alert");
        }
    }
    let metrics = gw.admin_get("/metrics");
    let timeouts = metrics
        .lines()
        .find(|l| l.contains("kind=\"handshake_timeout\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(timeouts, Some(40.0), "{metrics}");

    // Oversized header and too many headers: 431, and the next client is fine.
    let big = format!("X-Big: {}", "a".repeat(20_000));
    let (status, _) = gw.curl("echo.test", "/echo", &["--http1.1", "-H", &big]);
    assert_eq!(status, 431);
    let many: Vec<String> = (0..80).map(|i| format!("X-H{i}: v")).collect();
    let mut args = vec!["--http1.1"];
    for h in &many {
        args.extend(["-H", h.as_str()]);
    }
    let (status, _) = gw.curl("echo.test", "/echo", &args);
    assert_eq!(status, 431);
    let (status, _) = gw.curl("echo.test", "/echo", &["--http2", "-H", &big]);
    assert!(
        status == 431 || status == 0 || status >= 400,
        "h2 oversized header: {status}"
    );
    assert!(ok(&gw));
}

/// A reload (admin `POST /reload` and SIGHUP) changes routes while an open WebSocket keeps
/// working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_keeps_websocket_open() {
    let dir = tempfile::tempdir().unwrap();
    let (http_backend, ws_backend) = (http_backend().await, ws_backend().await);
    let (http, ws) = (http_backend.addr(), ws_backend.addr());
    let routes = format!(
        "[security]\nallow_private_backends = true\n\
         [[route]]\nhost = \"ws.test\"\nbackends = [{{ addr = \"{ws}\" }}]\n"
    );
    let gw = start_gateway(dir.path(), &routes);
    let mut socket = ws_connect(&gw).await;
    ws_roundtrip(&mut socket, "before").await;
    assert_eq!(
        gw.curl("new.test", "/echo", &[]).0,
        0,
        "new.test not routed yet"
    );

    gw.rewrite(&format!(
        "{routes}[[route]]\nhost = \"new.test\"\nbackends = [{{ addr = \"{http}\" }}]\n"
    ));
    let answer = gw.admin_post("/reload");
    assert!(answer.contains("\"reloaded\":true"), "{answer}");
    assert_eq!(gw.curl("new.test", "/echo", &[]).0, 200, "{}", gw.log());
    ws_roundtrip(&mut socket, "after admin reload").await;

    // A broken config is refused with its location; the old routes stay.
    std::fs::write(&gw.config_path, "[listen]\nhttps = 5\n").unwrap();
    let answer = gw.admin_post("/reload");
    assert!(answer.contains("gateway.toml:2"), "{answer}");
    assert_eq!(gw.curl("new.test", "/echo", &[]).0, 200);

    // SIGHUP: remove new.test again.
    gw.rewrite(&routes);
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let g = &gw;
    eventually(Duration::from_secs(10), "SIGHUP reload", || {
        g.curl("new.test", "/echo", &[]).0 == 0
    })
    .await;
    ws_roundtrip(&mut socket, "after SIGHUP").await;
    socket.close(None).await.unwrap();
}

/// Config errors name the file, line and field.
#[test]
fn bad_config_is_reported_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[[route]]\nhost = \"ok.test\"\nbackends = [{ addr = \"10.0.0.1\" }]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["gateway", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gateway.toml:3"), "{err}");
    assert!(err.contains("socket address"), "{err}");
}

/// `meshgate demo` prints a curl command that works as printed; Ctrl-C stops it cleanly.
#[test]
fn demo_prints_a_working_curl_command() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["demo", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut curl = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.starts_with("curl ") {
            curl = Some(line);
            break;
        }
    }
    let curl = curl.expect("demo printed a curl command");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{curl} -sS -m 20"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("Hello from a meshgate workload"),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = eventually_blocking(Duration::from_secs(10), "demo to stop on Ctrl-C", || {
        child.try_wait().unwrap().ok_or("running")
    });
    assert!(status.success(), "demo exit status {status}");
    let ca_dir = curl.split_whitespace().nth(2).unwrap().to_string();
    assert!(
        !std::path::Path::new(&ca_dir).exists(),
        "demo files removed"
    );
}
