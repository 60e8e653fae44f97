//! Backend pools end to end on loopback: three real HTTP workloads behind one route.
//!
//! Most tests run the real gateway (`meshgate::app::gateway`, the code behind
//! `meshgate gateway`, in process so the test can read the route's pool status) with a plain
//! HTTP route on a loopback listener; one puts the three workloads behind their own overlay
//! nodes, reached through the gateway's embedded node. Per-route pool settings come from the
//! route's `[route.pool]` table.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::app::{self, GatewaySetup};
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::route::Backend;
use meshgate_gateway::Gateway;
use meshgate_gateway::upstream::dial::DirectDialer;
use meshgate_gateway::upstream::overlay::EmbeddedNode;
use meshgate_gateway::upstream::pool::{ClientInfo, Policy, Pool, PoolConfig, PoolError};
use meshgate_overlay::NodeConfig;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A workload: a real HTTP/1.1 server answering `backend-<id>` after `delay`.
struct Workload {
    addr: SocketAddr,
    id: usize,
    delay: Duration,
    served: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Workload {
    async fn start(id: usize, delay: Duration) -> Workload {
        let mut w = Workload {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            id,
            delay,
            served: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        w.restart().await;
        w
    }

    /// (Re)binds the same address and serves until killed.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind workload");
        self.addr = listener.local_addr().expect("addr");
        let (id, delay, served) = (self.id, self.delay, self.served.clone());
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: killing the accept task closes them all.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let served = served.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let served = served.clone();
                        async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            served.fetch_add(1, Ordering::Relaxed);
                            Response::builder()
                                .header("x-backend", id.to_string())
                                .body(Full::new(Bytes::from(format!("backend-{id}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Stops listening and drops every open connection, like a killed process.
    async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A load client: keep-alive connections from `local_ip` (any 127.0.0.0/8 address).
fn load_client(local_ip: IpAddr) -> Client<HttpConnector, Empty<Bytes>> {
    let mut c = HttpConnector::new();
    c.set_local_address(Some(local_ip));
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(c)
}

/// Sends `total` GETs with `concurrency` workers; returns (status, backend id) per request,
/// with id `usize::MAX` when the request failed at the client.
async fn load(
    client: &Client<HttpConnector, Empty<Bytes>>,
    proxy: SocketAddr,
    total: usize,
    concurrency: usize,
    extra_header: Option<(&'static str, String)>,
    progress: Option<Arc<AtomicUsize>>,
) -> Vec<(u16, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, extra, progress) = (
            client.clone(),
            next.clone(),
            extra_header.clone(),
            progress.clone(),
        );
        workers.spawn(async move {
            let mut results = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let mut req =
                    Request::get(format!("http://{proxy}/item")).header(http::header::HOST, HOST);
                if let Some((k, v)) = &extra {
                    req = req.header(*k, v.as_str());
                }
                let Ok(req) = req.body(Empty::new()) else {
                    results.push((0, usize::MAX));
                    continue;
                };
                let r = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
                let entry = match r {
                    Ok(Ok(resp)) => {
                        let status = resp.status().as_u16();
                        let backend = resp
                            .headers()
                            .get("x-backend")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(usize::MAX);
                        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                        let intact = body.is_ok_and(|b| b == format!("backend-{backend}"));
                        (if intact { status } else { 0 }, backend)
                    }
                    _ => (0, usize::MAX),
                };
                results.push(entry);
                if let Some(p) = &progress {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }
            results
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(r) = workers.join_next().await {
        all.extend(r.expect("load worker"));
    }
    all
}

async fn three_workloads(slow: Option<usize>) -> Vec<Workload> {
    let mut v = Vec::new();
    for id in 0..3 {
        let delay = if slow == Some(id) {
            Duration::from_millis(20)
        } else if slow.is_some() {
            Duration::from_millis(2)
        } else {
            Duration::ZERO
        };
        v.push(Workload::start(id, delay).await);
    }
    v
}

fn count_by_backend(results: &[(u16, usize)]) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for (_, b) in results {
        *m.entry(*b).or_insert(0) += 1;
    }
    m
}

/// The route's host name.
const HOST: &str = "pools.test";

/// The real gateway serving one plain-HTTP route over `workloads` on a loopback listener.
struct RealGateway {
    http: SocketAddr,
    gateway: Gateway,
    task: JoinHandle<()>,
    node: Option<EmbeddedNode>,
    _dir: tempfile::TempDir,
}

impl RealGateway {
    async fn start(workloads: &[Workload], extra: &str) -> RealGateway {
        let addrs: Vec<SocketAddr> = workloads.iter().map(|w| w.addr).collect();
        Self::start_with(&addrs, extra).await
    }

    /// As `meshgate gateway` does: an `[overlay]` section in `extra` starts the embedded node
    /// and overlay backends are dialed through it.
    async fn start_with(addrs: &[SocketAddr], extra: &str) -> RealGateway {
        Self::start_full(addrs, extra, "").await
    }

    /// `route_extra` follows the `[[route]]` table (e.g. a `[route.pool]` table).
    async fn start_full(addrs: &[SocketAddr], extra: &str, route_extra: &str) -> RealGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let backends: Vec<String> = addrs
            .iter()
            .map(|a| format!("{{ addr = \"{a}\" }}"))
            .collect();
        let text = format!(
            "data_dir = \"{d}\"\n\
             [listen]\nhttps = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [tls.dev_ca]\ndir = \"{d}/ca\"\n\
             [security]\nallow_private_backends = true\n\
             {extra}\n\
             [[route]]\nhost = \"{HOST}\"\nbackends = [{b}]\n\
             options = {{ allow_plain_http = true }}\n\
             {route_extra}\n",
            d = dir.path().display(),
            b = backends.join(", "),
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).expect("write config");
        let config = GatewayConfig::parse(&path, &text).expect("valid gateway.toml");
        let app = app::gateway(GatewaySetup {
            config_path: Some(path),
            ..GatewaySetup::new(config)
        })
        .await
        .expect("gateway");
        let gateway = app.gateway.clone();
        let node = app.node;
        let bound = gateway.bind().expect("bind");
        let http = bound.http[0].local_addr().expect("addr");
        let g = gateway.clone();
        let task = tokio::spawn(async move {
            let _ = g.serve(bound, std::future::pending()).await;
        });
        RealGateway {
            http,
            gateway,
            task,
            node,
            _dir: dir,
        }
    }

    /// The pool the gateway built for the route.
    fn pool(&self) -> Arc<Pool> {
        let entry = self.gateway.routes().lookup(HOST).expect("route");
        entry.pool.clone()
    }
}

impl Drop for RealGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_load_fails_no_request_and_a_restart_is_readmitted() {
    let mut workloads = three_workloads(None).await;
    let gw = RealGateway::start(&workloads, "").await;
    let pool = gw.pool();
    let client = load_client(IpAddr::from([127, 0, 0, 1]));

    // 20k GETs; backend 1 dies a quarter of the way through.
    let progress = Arc::new(AtomicUsize::new(0));
    let run = {
        let (client, progress) = (client.clone(), progress.clone());
        let addr = gw.http;
        tokio::spawn(async move { load(&client, addr, 20_000, 32, None, Some(progress)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::Relaxed) < 5000 {
        assert!(Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workloads[1].kill().await;
    let served_at_kill = workloads[1].served.load(Ordering::Relaxed);
    let results = run.await.expect("load");
    assert_eq!(results.len(), 20_000);
    let failed = results.iter().filter(|(s, _)| *s != 200).count();
    assert_eq!(failed, 0, "failed requests: {failed}");
    let by = count_by_backend(&results);
    eprintln!(
        "20k GETs, backend 1 killed after serving {served_at_kill}: responses by backend {by:?}"
    );
    assert!(
        served_at_kill > 500,
        "backend 1 took traffic before the kill"
    );
    assert!(by.get(&0).copied().unwrap_or(0) > 3000 && by.get(&2).copied().unwrap_or(0) > 3000);
    let status = pool.status();
    assert!(
        !status[1].available,
        "killed backend is out: {:?}",
        status[1]
    );

    // Restart on the same address: when its ejection ends it is tried on probation, confirmed
    // by its first success, and gets traffic again.
    workloads[1].restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pool.status()[1].available {
        assert!(
            Instant::now() < deadline,
            "restarted backend never re-admitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = workloads[1].served.load(Ordering::Relaxed);
    let results = load(&client, gw.http, 600, 8, None, None).await;
    assert!(results.iter().all(|(s, _)| *s == 200));
    let after = workloads[1].served.load(Ordering::Relaxed);
    eprintln!("restarted backend 1 served {} of 600", after - before);
    assert!(
        after - before > 60,
        "re-admitted backend served {} of 600",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_times_slower_backend_gets_clearly_less_traffic() {
    let workloads = three_workloads(Some(2)).await; // 2 ms, 2 ms, 20 ms
    let gw = RealGateway::start(&workloads, "").await;
    let client = load_client(IpAddr::from([127, 0, 0, 1]));
    let results = load(&client, gw.http, 1500, 8, None, None).await;
    assert!(results.iter().all(|(s, _)| *s == 200));
    let by = count_by_backend(&results);
    let (fast0, fast1, slow) = (
        by.get(&0).copied().unwrap_or(0),
        by.get(&1).copied().unwrap_or(0),
        by.get(&2).copied().unwrap_or(0),
    );
    eprintln!("least_loaded, 1500 GETs at concurrency 8: fast {fast0}, fast {fast1}, slow {slow}");
    assert!(
        slow * 3 < fast0.min(fast1),
        "slow backend got {slow}, fast ones {fast0} and {fast1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_hashing_keeps_each_client_on_one_backend() {
    let workloads = three_workloads(None).await;
    let addrs: Vec<SocketAddr> = workloads.iter().map(|w| w.addr).collect();
    // By client IP: four clients from different loopback addresses.
    let gw =
        RealGateway::start_full(&addrs, "", "[route.pool]\npolicy = \"hash_client_ip\"\n").await;
    assert_eq!(gw.pool().config().policy, Policy::HashClientIp);
    for last in 2..6u8 {
        let client = load_client(IpAddr::from([127, 0, 0, last]));
        let results = load(&client, gw.http, 100, 4, None, None).await;
        assert!(results.iter().all(|(s, _)| *s == 200));
        let by = count_by_backend(&results);
        assert_eq!(by.len(), 1, "client 127.0.0.{last} spread over {by:?}");
    }
    drop(gw);
    // By cookie: one client address, many sessions, each pinned; together they use every backend.
    let gw = RealGateway::start_full(
        &addrs,
        "",
        "[route.pool]\npolicy = \"hash_cookie\"\nsticky_cookie = \"sid\"\n",
    )
    .await;
    assert_eq!(gw.pool().config().policy, Policy::HashCookie);
    let client = load_client(IpAddr::from([127, 0, 0, 1]));
    let mut used = std::collections::HashSet::new();
    for session in 0..30 {
        let cookie = ("cookie", format!("other=1; sid=s{session}"));
        let results = load(&client, gw.http, 100, 4, Some(cookie), None).await;
        assert!(results.iter().all(|(s, _)| *s == 200));
        let by = count_by_backend(&results);
        assert_eq!(by.len(), 1, "session {session} spread over {by:?}");
        used.extend(by.keys().copied());
    }
    assert_eq!(used.len(), 3, "sessions use all backends");
}

/// A loopback address that accepts no connections: a listener with a backlog of one whose
/// accept queue is full, so the kernel drops further SYNs and connects hang (a black hole
/// that stays on this machine). Keep the returned values alive while it is used.
async fn black_hole() -> (SocketAddr, tokio::net::TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("filling the backlog of {addr}: {e}"),
            Err(_) => return (addr, listener, fillers),
        }
    }
    panic!("{addr} still accepts connections after filling its backlog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_backends_answer_503_within_the_connect_timeout() {
    let (a, _la, _fa) = black_hole().await;
    let (b, _lb, _fb) = black_hole().await;
    // Each attempt may take 400 ms, two backends: without a budget across retries the first
    // request would wait 800 ms (and 2 × [timeouts] connect_ms before attempts were capped).
    let gw = RealGateway::start_full(
        &[a, b],
        "[timeouts]\nconnect_ms = 5000\n",
        "[route.pool]\nconnect_timeout_ms = 600\nconnect_attempt_timeout_ms = 400\n",
    )
    .await;
    let client = load_client(IpAddr::from([127, 0, 0, 1]));
    for _ in 0..3 {
        let started = Instant::now();
        let resp = client
            .request(
                Request::get(format!("http://{}/item", gw.http))
                    .header(http::header::HOST, HOST)
                    .body(Empty::new())
                    .expect("request"),
            )
            .await
            .expect("the gateway answers");
        let took = started.elapsed();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The budget plus scheduling slack on a loaded 2-core machine.
        assert!(took < Duration::from_millis(750), "{took:?}");
    }
    let status = gw.pool().status();
    assert!(
        status.iter().all(|s| s.errors > 0),
        "both tried: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_answers_503_within_the_connect_timeout() {
    let mut workloads = three_workloads(None).await;
    let gw = RealGateway::start(&workloads, "[timeouts]\nconnect_ms = 800\n").await;
    let pool = gw.pool();
    assert_eq!(pool.config().connect_timeout_ms, Some(800));
    let client = load_client(IpAddr::from([127, 0, 0, 1]));
    let warm = load(&client, gw.http, 30, 3, None, None).await;
    assert!(warm.iter().all(|(s, _)| *s == 200));
    for w in &mut workloads {
        w.kill().await;
    }
    for _ in 0..10 {
        let started = Instant::now();
        let resp = client
            .request(
                Request::get(format!("http://{}/item", gw.http))
                    .header(http::header::HOST, HOST)
                    .body(Empty::new())
                    .expect("request"),
            )
            .await
            .expect("the gateway answers");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
    }
    // Streams too: `connect` gives up with NoHealthyBackend within the budget.
    let started = Instant::now();
    let err = pool
        .connect(&ClientInfo::from_ip(IpAddr::from([127, 0, 0, 1])))
        .await
        .err();
    assert_eq!(err, Some(PoolError::NoHealthyBackend));
    assert!(started.elapsed() < Duration::from_millis(800));
}

/// An HTTP workload answering each request with its body.
async fn body_echo_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_connect_failed_is_retried_with_its_body_intact() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let (live, _task) = body_echo_backend().await;
    // Round robin starts at the first backend: the dead one gets the first POST.
    let gw = RealGateway::start_full(
        &[dead, live],
        "",
        "[route.pool]\npolicy = \"round_robin\"\n",
    )
    .await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    for i in 0..4u8 {
        let body: Bytes = (0..100_000u32).map(|n| (n as u8).wrapping_add(i)).collect();
        let resp = client
            .request(
                Request::post(format!("http://{}/upload", gw.http))
                    .header(http::header::HOST, HOST)
                    .body(Full::new(body.clone()))
                    .expect("request"),
            )
            .await
            .expect("the gateway answers");
        assert_eq!(resp.status(), StatusCode::OK, "POST {i}");
        let back = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(
            back == body,
            "POST {i}: body changed ({} bytes back)",
            back.len()
        );
    }
    let status = gw.pool().status();
    assert_eq!(status[0].addr, dead);
    assert!(
        status[0].errors >= 1,
        "the dead backend was tried: {status:?}"
    );
    assert_eq!(status[1].requests, 4, "{status:?}");
}

/// A TCP echo workload for stream (passthrough-style) routes.
async fn echo_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_routes_splice_through_the_pool_past_a_dead_backend() {
    let (a, _ta) = echo_backend().await;
    let (b, tb) = echo_backend().await;
    tb.abort(); // b is dead from the start
    let _ = tb.await;
    let pool = Pool::for_route(
        "streams.e2e.test",
        &[
            Backend { addr: a, weight: 1 },
            Backend { addr: b, weight: 1 },
        ],
        PoolConfig::default(),
        Arc::new(DirectDialer),
    );
    // A splice proxy: accept, pool.connect, copy both ways.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front = listener.local_addr().expect("addr");
    let p = pool.clone();
    let splice = tokio::spawn(async move {
        while let Ok((mut client, peer)) = listener.accept().await {
            let p = p.clone();
            tokio::spawn(async move {
                let Ok((mut upstream, _lease)) = p.connect(&ClientInfo::from_ip(peer.ip())).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    for i in 0..200u32 {
        let mut s = TcpStream::connect(front).await.expect("connect");
        let msg = format!("stream {i} payload");
        s.write_all(msg.as_bytes()).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut back = String::new();
        s.read_to_string(&mut back).await.expect("read");
        assert_eq!(back, msg);
    }
    // The splice task drops its lease just after the client sees EOF.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool.status().iter().map(|s| s.in_flight).sum::<u32>() > 0 {
        assert!(Instant::now() < deadline, "leases never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = pool.status();
    assert_eq!(status[0].requests, 200, "every stream on the live backend");
    assert!(!status[1].available, "the dead one is ejected");
    splice.abort();
}

/// A workload behind its own overlay node: an HTTP service on loopback exposed on overlay
/// port 80 by the node's userspace stack. The node dials the gateway's node.
struct OverlayWorkload {
    service: Workload,
    key: std::path::PathBuf,
    gateway_link: SocketAddr,
    node: Option<EmbeddedNode>,
    exposed: Option<meshgate_sockets::Exposed>,
}

impl OverlayWorkload {
    async fn start(id: usize, dir: &std::path::Path, gateway_link: SocketAddr) -> Self {
        let mut w = OverlayWorkload {
            service: Workload::start(id, Duration::ZERO).await,
            key: dir.join(format!("workload-{id}.key")),
            gateway_link,
            node: None,
            exposed: None,
        };
        w.start_node().await;
        w
    }

    /// Starts the node from its key file (so with the same overlay address every time).
    async fn start_node(&mut self) {
        let node = EmbeddedNode::start_with(NodeConfig {
            key_path: self.key.clone(),
            peers: vec![self.gateway_link],
            ..NodeConfig::default()
        })
        .await
        .expect("workload node");
        self.exposed =
            Some(meshgate_sockets::expose(&node.stack, 80, self.service.addr).expect("expose"));
        self.node = Some(node);
    }

    /// The backend address: `[overlay address]:80`.
    fn backend(&self) -> SocketAddr {
        let node = self.node.as_ref().expect("node running");
        SocketAddr::from((node.node.address(), 80))
    }

    /// Kills the node like a killed process: its links close first, so nothing it still had
    /// to say (no FIN, no RST for the gateway's connections) reaches the overlay.
    async fn kill_node(&mut self) {
        self.exposed = None;
        if let Some(n) = self.node.take() {
            n.node.shutdown().await;
            n.stack.shutdown();
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `limit`.
async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three workload overlay nodes behind one route, reached only through the gateway's embedded
/// overlay node. 20 000 GETs (concurrency 32); a quarter of the way through, one workload
/// *node* is killed: its overlay links vanish, and the gateway's connections to it get no FIN
/// or RST, only "no route" from its own node. No request may fail; the dead backend is
/// ejected; a node restarted from the same key file is re-admitted and takes traffic again.
/// Then the *service* behind another node dies under load (resets through the overlay): again
/// no failed request, ejection, and re-admission once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_workload_node_killed_under_20k_gets_fails_no_request_and_comes_back() {
    let test_started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    // The gateway's node listens for links; the workload nodes dial it.
    let overlay = format!(
        "[overlay]\nkey_file = \"{}\"\nlisten = \"127.0.0.1:0\"\n",
        dir.path().join("gateway-node.key").display(),
    );
    // The workloads' overlay addresses come from their key files: create the keys first.
    let mut backends = Vec::new();
    for id in 0..3 {
        let key = meshgate_overlay::identity::Identity::load_or_create(
            &dir.path().join(format!("workload-{id}.key")),
        )
        .expect("workload key");
        backends.push(SocketAddr::from((key.address(), 80)));
    }
    // HTTP probes over the overlay notice a dead service behind a live node (a TCP probe
    // would still connect) and bring a recovered backend back without waiting out its
    // ejection backoff.
    let gw = RealGateway::start_full(
        &backends,
        &overlay,
        "[route.pool.active]\nkind = \"http\"\npath = \"/health\"\ninterval_ms = 200\n\
         timeout_ms = 500\n",
    )
    .await;
    let gateway_link = gw
        .node
        .as_ref()
        .and_then(|n| n.node.listen_addr())
        .expect("gateway link address");
    let mut workloads = Vec::new();
    for id in 0..3 {
        workloads.push(OverlayWorkload::start(id, dir.path(), gateway_link).await);
        assert_eq!(workloads[id].backend(), backends[id]);
    }
    let pool = gw.pool();
    let client = load_client(IpAddr::from([127, 0, 0, 1]));
    let served = |w: &OverlayWorkload| w.service.served.load(Ordering::Relaxed);

    // Links and routes come up in the background: wait until every workload has answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    while workloads.iter().any(|w| served(w) == 0) {
        assert!(
            Instant::now() < deadline,
            "overlay never carried traffic to every workload: {:?}",
            pool.status()
        );
        let _ = load(&client, gw.http, 30, 3, None, None).await;
    }
    wait_for(Duration::from_secs(20), "all backends available", || {
        pool.status().iter().all(|s| s.available)
    })
    .await;
    let ejections_before = pool.status()[1].ejections;
    let served_before_load = served(&workloads[1]);

    // 20 000 GETs at concurrency 32; workload node 1 dies a quarter of the way through.
    let total = 20_000;
    let progress = Arc::new(AtomicUsize::new(0));
    let load_started = Instant::now();
    let run = {
        let (client, progress, addr) = (client.clone(), progress.clone(), gw.http);
        tokio::spawn(async move { load(&client, addr, total, 32, None, Some(progress)).await })
    };
    wait_for(Duration::from_secs(30), "a quarter of the load", || {
        progress.load(Ordering::Relaxed) >= total / 4
    })
    .await;
    let served_at_kill = served(&workloads[1]) - served_before_load;
    let killed_at = progress.load(Ordering::Relaxed);
    workloads[1].kill_node().await;
    let results = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("load bounded in time")
        .expect("load");
    let load_took = load_started.elapsed();
    assert_eq!(results.len(), total);
    let failures =
        results
            .iter()
            .filter(|(s, _)| *s != 200)
            .fold(HashMap::new(), |mut m, (s, _)| {
                *m.entry(*s).or_insert(0usize) += 1;
                m
            });
    let by = count_by_backend(&results);
    let status = pool.status();
    eprintln!(
        "overlay: {total} GETs in {load_took:?}, node 1 killed after {killed_at} (it had served \
         {served_at_kill}): responses by backend {by:?}, failures by status {failures:?}; \
         node 1 then: {:?}",
        status[1]
    );
    assert!(
        failures.is_empty(),
        "failed requests (status 0: client error or timeout): {failures:?}"
    );
    assert!(served_at_kill > 300, "node 1 took traffic before the kill");
    assert!(by.get(&0).copied().unwrap_or(0) > 5000 && by.get(&2).copied().unwrap_or(0) > 5000);
    assert!(!status[1].available, "killed node is out: {:?}", status[1]);
    assert!(status[1].ejections > ejections_before, "{:?}", status[1]);

    // The node comes back with the same key (same overlay address) and its service.
    workloads[1].start_node().await;
    let restarted = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "restarted node re-admitted",
        || pool.status()[1].available,
    )
    .await;
    let readmitted_after = restarted.elapsed();
    let before = served(&workloads[1]);
    let results = load(&client, gw.http, 600, 8, None, None).await;
    assert!(results.iter().all(|(s, _)| *s == 200));
    let served_again = served(&workloads[1]) - before;
    eprintln!(
        "restarted node 1 re-admitted after {readmitted_after:?}, then served {served_again} of 600"
    );
    assert!(
        served_again > 60,
        "re-admitted workload served {served_again} of 600: {:?}",
        pool.status()
    );

    // The service behind node 0 dies under load; its node stays up and resets the streams.
    let ejections_before = pool.status()[0].ejections;
    let progress = Arc::new(AtomicUsize::new(0));
    let run = {
        let (client, progress, addr) = (client.clone(), progress.clone(), gw.http);
        tokio::spawn(async move { load(&client, addr, 4000, 16, None, Some(progress)).await })
    };
    wait_for(Duration::from_secs(30), "a quarter of the load", || {
        progress.load(Ordering::Relaxed) >= 1000
    })
    .await;
    workloads[0].service.kill().await;
    let results = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("load bounded in time")
        .expect("load");
    let failed = results.iter().filter(|(s, _)| *s != 200).count();
    eprintln!(
        "overlay: 4000 GETs, service behind node 0 killed: responses by backend {:?}, failed \
         {failed}",
        count_by_backend(&results)
    );
    assert_eq!(failed, 0, "failed requests over the overlay: {failed}");
    let status = pool.status();
    assert!(!status[0].available, "{:?}", status[0]);
    assert!(status[0].ejections > ejections_before, "{:?}", status[0]);
    workloads[0].service.restart().await;
    wait_for(
        Duration::from_secs(15),
        "restarted service re-admitted",
        || pool.status()[0].available,
    )
    .await;
    let before = served(&workloads[0]);
    let results = load(&client, gw.http, 600, 8, None, None).await;
    assert!(results.iter().all(|(s, _)| *s == 200));
    let served_again = served(&workloads[0]) - before;
    eprintln!(
        "restarted service 0 served {served_again} of 600; test took {:?}",
        test_started.elapsed()
    );
    assert!(
        served_again > 60,
        "re-admitted service served {served_again} of 600"
    );
    drop(gw);
    for mut w in workloads {
        w.kill_node().await;
    }
}
