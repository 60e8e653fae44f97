//! `Clients` against real hyper backends on loopback, and in-memory streams where the order of
//! events must be exact.

use super::*;
use crate::upstream::dial::{DialFuture, DirectDialer};
use http::{StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

/// Generous: only a broken test waits this long.
const PATIENCE: Duration = Duration::from_secs(10);

impl Clients {
    /// Idle HTTP/1.1 connections to `backend` that are ready for a request.
    fn idle_ready(&self, backend: SocketAddr) -> usize {
        self.h1
            .lock()
            .backends
            .get(&backend)
            .map_or(0, |b| b.idle.iter().filter(|c| c.sender.is_ready()).count())
    }

    /// Waits (polling, each poll letting the connections' tasks run) until `backend` has
    /// `n` ready idle connections.
    async fn idle_becomes(&self, backend: SocketAddr, n: usize) {
        tokio::time::timeout(PATIENCE, async {
            while self.idle_ready(backend) != n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never {n} idle connections to {backend}"));
    }
}

fn direct() -> Clients {
    Clients::new(Arc::new(DirectDialer), &Upstream::default())
}

fn empty() -> Body {
    Empty::new().map_err(|n: Infallible| match n {}).boxed()
}

fn get(backend: SocketAddr, path: &str) -> Request<Body> {
    let mut req = Request::new(empty());
    *req.uri_mut() = format!("http://{backend}{path}").parse().expect("uri");
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("a.example"));
    req
}

fn h2c_get(path: &str) -> Request<Body> {
    let mut req = Request::new(empty());
    *req.uri_mut() = format!("http://a.example{path}").parse().expect("uri");
    *req.version_mut() = Version::HTTP_2;
    req
}

async fn text(resp: Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

const ATTEMPT: Duration = Duration::from_secs(5);

/// An HTTP/1.1 backend on loopback.
struct TestBackend {
    addr: SocketAddr,
    /// Connections it accepted.
    accepted: Arc<AtomicUsize>,
    /// Lets the body of a `/held` response finish.
    release: Arc<tokio::sync::Notify>,
}

/// Answers `path host` to each request (`/held`: after `release`), and echoes the bytes of an
/// upgraded (`Upgrade: echo`) stream.
async fn h1_backend() -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (count, held) = (accepted.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let held = held.clone();
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let held = held.clone();
                async move {
                    if req.headers().get(header::UPGRADE).is_some() {
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = upgrade.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp = Response::new(full(""));
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        resp.headers_mut()
                            .insert(header::UPGRADE, HeaderValue::from_static("echo"));
                        return Ok::<_, Infallible>(resp);
                    }
                    let host = req
                        .headers()
                        .get(header::HOST)
                        .map(|h| h.to_str().unwrap_or("?").to_string())
                        .unwrap_or_default();
                    let text = format!("{} {host}", req.uri());
                    if req.uri().path() == "/big" {
                        // Chunked, in pieces: more than the connection reads in one go.
                        let chunks = futures_util::stream::iter((0..BIG_CHUNKS).map(|i| {
                            Ok(hyper::body::Frame::data(Bytes::from(vec![
                                i as u8;
                                BIG_CHUNK
                            ])))
                        }));
                        return Ok(Response::new(
                            http_body_util::StreamBody::new(chunks).boxed(),
                        ));
                    }
                    if req.uri().path() != "/held" {
                        return Ok(Response::new(full(&text)));
                    }
                    let later = futures_util::stream::once(async move {
                        held.notified().await;
                        Ok(hyper::body::Frame::data(Bytes::from(text)))
                    });
                    Ok(Response::new(
                        http_body_util::StreamBody::new(later).boxed(),
                    ))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades(),
            );
        }
    });
    TestBackend {
        addr,
        accepted,
        release,
    }
}

/// `/big`: this many chunks of this many bytes, chunk `i` filled with byte `i`.
const BIG_CHUNKS: usize = 64;
const BIG_CHUNK: usize = 16 * 1024;

fn full(text: &str) -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::from(text.to_string())).boxed()
}

/// An h2c backend answering `:authority`; counts the connections it accepted.
async fn h2c_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let svc = service_fn(|req: Request<Incoming>| async move {
                let authority = req.uri().authority().map(|a| a.to_string());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                    authority.unwrap_or_default(),
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, accepted)
}

/// Reads one request head (a request without body) from `s`.
async fn read_head(s: &mut (impl AsyncReadExt + Unpin)) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read request");
        assert_eq!(n, 1, "request head cut short");
        head.push(byte[0]);
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn a_kept_connection_serves_the_next_requests() {
    let TestBackend {
        addr: backend,
        accepted,
        ..
    } = h1_backend().await;
    let clients = direct();
    for i in 0..3 {
        let resp = clients
            .send(
                BackendProtocol::Http1,
                backend,
                get(backend, &format!("/{i}?q")),
                ATTEMPT,
            )
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        // Origin form on the wire; the caller's Host is kept.
        assert_eq!(text(resp).await, format!("/{i}?q a.example"));
        clients.idle_becomes(backend, 1).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A response longer than what the connection reads at once is relayed whole, and its
/// connection then serves the next request.
#[tokio::test]
async fn a_long_body_arrives_whole_and_its_connection_is_kept() {
    let TestBackend {
        addr: backend,
        accepted,
        ..
    } = h1_backend().await;
    let clients = direct();
    for _ in 0..2 {
        let resp = clients
            .send(
                BackendProtocol::Http1,
                backend,
                get(backend, "/big"),
                ATTEMPT,
            )
            .await
            .expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), BIG_CHUNKS * BIG_CHUNK);
        for (i, chunk) in body.chunks(BIG_CHUNK).enumerate() {
            assert!(chunk.iter().all(|b| *b == i as u8), "chunk {i} intact");
        }
        clients.idle_becomes(backend, 1).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A body the client stops reading half way: its connection does not go back to the pool
/// with a response still on it, and the next requests are answered.
#[tokio::test]
async fn a_body_dropped_half_read_leaves_no_broken_connection_behind() {
    let backend = h1_backend().await.addr;
    let clients = direct();
    let resp = clients
        .send(
            BackendProtocol::Http1,
            backend,
            get(backend, "/big"),
            ATTEMPT,
        )
        .await
        .expect("response");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert!(first.is_data());
    drop(body);
    for i in 0..3 {
        let resp = clients
            .send(
                BackendProtocol::Http1,
                backend,
                get(backend, &format!("/{i}")),
                ATTEMPT,
            )
            .await
            .expect("response");
        assert_eq!(text(resp).await, format!("/{i} a.example"));
    }
}

#[tokio::test]
async fn host_defaults_to_the_uri_authority() {
    let backend = h1_backend().await.addr;
    let clients = direct();
    let mut req = get(backend, "/");
    req.headers_mut().remove(header::HOST);
    let resp = clients
        .send(BackendProtocol::Http1, backend, req, ATTEMPT)
        .await
        .expect("response");
    assert_eq!(text(resp).await, format!("/ {backend}"));
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_is_replaced() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        // The first connection answers once and closes when told; later ones keep answering.
        let (mut first, _) = listener.accept().await.expect("accept");
        count.fetch_add(1, Ordering::SeqCst);
        read_head(&mut first).await;
        first.write_all(OK).await.expect("answer");
        close_rx.recv().await;
        drop(first);
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                loop {
                    read_head(&mut s).await;
                    s.write_all(OK).await.expect("answer");
                }
            });
        }
    });
    let clients = direct();
    let resp = clients
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect("first response");
    assert_eq!(text(resp).await, "ok");
    clients.idle_becomes(backend, 1).await;
    close_tx.send(()).expect("backend alive");
    // The pool notices the close on its own.
    clients.idle_becomes(backend, 0).await;
    let resp = clients
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect("second response");
    assert_eq!(text(resp).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// Dials in-memory streams and hands their backend ends to the test.
struct MemoryDialer {
    backends: mpsc::UnboundedSender<DuplexStream>,
}

impl Dialer for MemoryDialer {
    fn dial(&self, _: SocketAddr) -> DialFuture<'_> {
        let (client, backend) = tokio::io::duplex(1 << 16);
        let sent = self.backends.send(backend);
        Box::pin(async move {
            sent.map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
            Ok(Box::new(client) as BoxStream)
        })
    }
}

/// The race hyper-util's `retry_canceled_requests` covers: a kept connection looks ready, the
/// request is queued on it, and only then does its task see that the backend closed it. The
/// request comes back unsent and goes on a new connection. Exact on the current-thread
/// runtime: nothing runs between the close and the request's first poll.
#[tokio::test]
async fn a_request_handed_back_by_a_closed_kept_connection_goes_on_a_new_one() {
    let (tx, mut dialled) = mpsc::unbounded_channel();
    let clients = Clients::new(
        Arc::new(MemoryDialer { backends: tx }),
        &Upstream::default(),
    );
    let backend: SocketAddr = "192.0.2.1:80".parse().expect("addr");
    let serve_first = async {
        let mut s = dialled.recv().await.expect("first dial");
        read_head(&mut s).await;
        s.write_all(OK).await.expect("answer");
        s
    };
    let (resp, first) = tokio::join!(
        clients.send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT),
        serve_first
    );
    assert_eq!(text(resp.expect("first response")).await, "ok");
    clients.idle_becomes(backend, 1).await;
    // Closed; the connection's task is woken but has not run yet.
    drop(first);
    let serve_second = async {
        let mut s = dialled.recv().await.expect("second dial");
        read_head(&mut s).await;
        s.write_all(OK).await.expect("answer");
        s
    };
    let (resp, _second) = tokio::join!(
        clients.send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT),
        serve_second
    );
    assert_eq!(text(resp.expect("second response")).await, "ok");
}

/// Lets the first dial through at once and each later one only with a permit.
struct GatedDialer {
    dials: AtomicUsize,
    gate: Semaphore,
}

impl Dialer for GatedDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_> {
        Box::pin(async move {
            if self.dials.fetch_add(1, Ordering::SeqCst) > 0 {
                self.gate.acquire().await.expect("gate open").forget();
            }
            DirectDialer.dial(addr).await
        })
    }
}

#[tokio::test]
async fn a_connecting_request_takes_a_connection_returned_meanwhile() {
    let TestBackend {
        addr: backend,
        accepted,
        release,
    } = h1_backend().await;
    let dialer = Arc::new(GatedDialer {
        dials: AtomicUsize::new(0),
        gate: Semaphore::new(0),
    });
    let clients = Clients::new(dialer.clone(), &Upstream::default());
    // The first response's body is held: its connection is busy.
    let first = clients
        .send(
            BackendProtocol::Http1,
            backend,
            get(backend, "/held"),
            ATTEMPT,
        )
        .await
        .expect("first response");
    let second = clients.send(BackendProtocol::Http1, backend, get(backend, "/2"), ATTEMPT);
    let read_first = async {
        tokio::time::timeout(PATIENCE, async {
            while dialer.dials.load(Ordering::SeqCst) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the second request dials (held at the gate)");
        release.notify_one();
        text(first).await
    };
    let (second, first) = tokio::join!(second, read_first);
    assert_eq!(first, "/held a.example");
    assert_eq!(text(second.expect("second response")).await, "/2 a.example");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the kept connection served both"
    );
    // The connect it started finishes in the background and joins the pool.
    dialer.gate.add_permits(1);
    clients.idle_becomes(backend, 2).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connect_attempt_gives_up_after_the_timeout_passed() {
    struct BlackHole;
    impl Dialer for BlackHole {
        fn dial(&self, _: SocketAddr) -> DialFuture<'_> {
            Box::pin(std::future::pending())
        }
    }
    let clients = Clients::new(Arc::new(BlackHole), &Upstream::default());
    let backend: SocketAddr = "192.0.2.1:80".parse().expect("addr");
    for (protocol, req) in [
        (BackendProtocol::Http1, get(backend, "/")),
        (BackendProtocol::H2c, h2c_get("/")),
    ] {
        let attempt = Duration::from_millis(100);
        let started = std::time::Instant::now();
        let err = clients
            .send(protocol, backend, req, attempt)
            .await
            .expect_err("black hole");
        let waited = started.elapsed();
        assert!(err.connect);
        let io = err.error.downcast_ref::<io::Error>().expect("io error");
        assert_eq!(io.kind(), io::ErrorKind::TimedOut);
        assert!(waited >= attempt && waited < PATIENCE, "{waited:?}");
    }
}

#[tokio::test]
async fn a_refused_connect_is_a_connect_error() {
    // Bound but not listening: connects are refused, and the port stays ours.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let backend = socket.local_addr().expect("addr");
    let clients = direct();
    for (protocol, req) in [
        (BackendProtocol::Http1, get(backend, "/")),
        (BackendProtocol::H2c, h2c_get("/")),
    ] {
        let err = clients
            .send(protocol, backend, req, ATTEMPT)
            .await
            .expect_err("refused");
        assert!(err.connect, "{protocol:?}: {}", err.error);
        let io = err.error.downcast_ref::<io::Error>().expect("io error");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
    }
}

#[tokio::test]
async fn a_reset_after_the_backend_read_the_request_is_not_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            read_head(&mut s).await;
            // RST instead of FIN.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
            drop(s);
        }
    });
    let err = direct()
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect_err("reset");
    assert!(!err.connect, "{}", err.error);
}

#[tokio::test]
async fn an_upgraded_connection_carries_the_stream_and_leaves_the_pool() {
    let TestBackend {
        addr: backend,
        accepted,
        ..
    } = h1_backend().await;
    let clients = direct();
    let mut req = get(backend, "/ws");
    req.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    req.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("echo"));
    let mut resp = clients
        .send(BackendProtocol::Http1, backend, req, ATTEMPT)
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(&mut resp).await.expect("upgraded");
    let mut stream = TokioIo::new(upgraded);
    stream.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.expect("read");
    assert_eq!(&echoed, b"ping");
    // The next request needs a connection of its own.
    let resp = clients
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect("response");
    assert_eq!(text(resp).await, "/ a.example");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn h2c_requests_share_one_connection() {
    let (backend, accepted) = h2c_backend().await;
    let clients = direct();
    let resp = clients
        .send(BackendProtocol::H2c, backend, h2c_get("/"), ATTEMPT)
        .await
        .expect("response");
    assert_eq!(text(resp).await, "a.example");
    let concurrent =
        (0..8).map(|_| clients.send(BackendProtocol::H2c, backend, h2c_get("/"), ATTEMPT));
    for resp in futures_util::future::join_all(concurrent).await {
        assert_eq!(text(resp.expect("response")).await, "a.example");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idle_connections_expire() {
    let TestBackend {
        addr: backend,
        accepted,
        ..
    } = h1_backend().await;
    let clients = direct();
    let resp = clients
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect("response");
    text(resp).await;
    clients.idle_becomes(backend, 1).await;
    // Age the idle connection past the timeout.
    for c in &mut clients
        .h1
        .lock()
        .backends
        .get_mut(&backend)
        .expect("slot")
        .idle
    {
        c.since = Instant::now() - clients.h1.idle_timeout - Duration::from_secs(1);
    }
    let resp = clients
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect("response");
    text(resp).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_per_backend_are_bounded() {
    let backend = h1_backend().await.addr;
    let clients = direct();
    let resp = clients
        .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
        .await
        .expect("response");
    text(resp).await;
    clients.idle_becomes(backend, 1).await;
    let sender = clients
        .h1
        .lock()
        .pop(backend, clients.h1.idle_timeout, &clients.h1.closed)
        .expect("idle");
    // Fill the idle list with stand-ins (connections that were never driven).
    let mut standins = Vec::new();
    for _ in 0..clients.h1.max_idle {
        let (io, _) = tokio::io::duplex(1);
        let (standin, _conn) = http1::handshake::<_, Body>(TokioIo::new(io))
            .await
            .expect("handshake");
        standins.push(IdleConnection {
            since: Instant::now(),
            sender: standin,
        });
    }
    clients
        .h1
        .lock()
        .backends
        .get_mut(&backend)
        .expect("slot")
        .idle
        .extend(standins);
    // The ready connection coming back finds no room and is closed.
    clients.h1.put(backend, sender);
    let state = clients.h1.lock();
    let idle = &state.backends[&backend].idle;
    assert_eq!(idle.len(), clients.h1.max_idle);
    assert!(idle.iter().all(|c| !c.sender.is_ready()));
}

/// Ready idle stand-ins for `backend` (HTTP/1.1 connections over in-memory pipes whose other
/// ends are returned: they stay open), put in the pool one after the other.
async fn put_idle(clients: &Clients, backend: SocketAddr, n: usize) -> Vec<DuplexStream> {
    let mut peers = Vec::new();
    for _ in 0..n {
        let (io, peer) = tokio::io::duplex(64);
        peers.push(peer);
        let (mut sender, conn) = http1::handshake::<_, Body>(TokioIo::new(io))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender.ready().await.expect("ready");
        clients.h1.put(backend, sender);
    }
    peers
}

#[tokio::test]
async fn surplus_idle_connections_close_after_a_few_seconds() {
    let backend: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let clients = direct();
    let total = clients.h1.kept + 10;
    let _peers = put_idle(&clients, backend, total).await;
    // Fresh surplus stays: a burst may come back.
    clients.h1.reap_once();
    assert_eq!(clients.idle_ready(backend), total);
    // The 20 oldest were returned longer ago than the surplus timeout (well within the idle
    // timeout): the 10 of them beyond the kept count close, the other 10 stay.
    for c in clients
        .h1
        .lock()
        .backends
        .get_mut(&backend)
        .expect("slot")
        .idle
        .iter_mut()
        .take(20)
    {
        c.since = Instant::now() - clients.h1.surplus_timeout - Duration::from_secs(1);
    }
    clients.h1.reap_once();
    assert_eq!(clients.idle_ready(backend), clients.h1.kept);
    let state = clients.h1.lock();
    let aged = state.backends[&backend]
        .idle
        .iter()
        .filter(|c| c.since.elapsed() > clients.h1.surplus_timeout)
        .count();
    assert_eq!(aged, 10, "aged connections within the kept count stay");
}

/// Clients whose `[upstream]` is `toml`, as `gateway.toml` would set it.
fn with_upstream(toml: &str) -> Clients {
    let config = meshgate_config::gateway::GatewayConfig::parse(
        std::path::Path::new("gateway.toml"),
        &format!("[upstream]\n{toml}"),
    )
    .expect("config");
    Clients::new(Arc::new(DirectDialer), &config.upstream)
}

/// `n` real connections to `backend`, each returned to the pool idle.
async fn open_idle(clients: &Clients, backend: SocketAddr, n: usize) {
    for _ in 0..n {
        let mut sender = connect_h1(Arc::new(DirectDialer), backend, ATTEMPT)
            .await
            .expect("connect");
        sender.ready().await.expect("ready");
        clients.h1.put(backend, sender);
    }
    clients.idle_becomes(backend, n).await;
}

/// The `/metrics` text of the pool's observer.
fn metrics_text(clients: &Clients) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(clients.observer()));
    let mut shown = String::new();
    prometheus_client::encoding::text::encode(&mut shown, &registry).expect("encode");
    shown
}

#[tokio::test]
async fn upstream_keys_set_how_many_idle_connections_stay() {
    let TestBackend {
        addr: backend,
        accepted,
        ..
    } = h1_backend().await;
    // Two kept; the other six close once unused for 200 ms, by the pool's own reaper.
    let clients = with_upstream("idle_kept_per_backend = 2\nsurplus_idle_timeout_ms = 200\n");
    open_idle(&clients, backend, 8).await;
    assert!(
        metrics_text(&clients).contains("meshgate_upstream_idle_connections 8\n"),
        "{}",
        metrics_text(&clients)
    );
    clients.idle_becomes(backend, 2).await;
    let shown = metrics_text(&clients);
    assert!(
        shown.contains("meshgate_upstream_idle_connections 2\n"),
        "{shown}"
    );
    assert!(
        shown.contains("meshgate_upstream_idle_closed_total{reason=\"surplus\"} 6\n"),
        "{shown}"
    );
    // The kept connections are live: the next requests reuse them, no new dial.
    for _ in 0..2 {
        let resp = clients
            .send(BackendProtocol::Http1, backend, get(backend, "/"), ATTEMPT)
            .await
            .expect("response");
        assert_eq!(text(resp).await, "/ a.example");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 8);

    // Eight kept: the same connections, as old, all stay past the reaper's rounds.
    let keeping = with_upstream("idle_kept_per_backend = 8\nsurplus_idle_timeout_ms = 200\n");
    open_idle(&keeping, backend, 8).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(keeping.idle_ready(backend), 8);
    assert!(
        metrics_text(&keeping)
            .contains("meshgate_upstream_idle_closed_total{reason=\"surplus\"} 0\n")
    );
}

#[tokio::test]
async fn connections_returned_beyond_the_cap_are_closed_and_counted() {
    let backend = h1_backend().await.addr;
    let clients = with_upstream("max_idle_per_backend = 3\nidle_kept_per_backend = 3\n");
    open_idle(&clients, backend, 3).await;
    let mut extra = connect_h1(Arc::new(DirectDialer), backend, ATTEMPT)
        .await
        .expect("connect");
    extra.ready().await.expect("ready");
    clients.h1.put(backend, extra);
    assert_eq!(clients.idle_ready(backend), 3);
    let shown = metrics_text(&clients);
    assert!(
        shown.contains("meshgate_upstream_idle_closed_total{reason=\"over_cap\"} 1\n"),
        "{shown}"
    );
}
