//! Pool tests on real loopback sockets through the real `DirectDialer`.

use super::*;
use crate::upstream::dial::DirectDialer;
use meshgate_config::route::BackendProtocol;
use tokio::net::TcpListener;

fn backend(addr: SocketAddr) -> Backend {
    Backend { addr, weight: 1 }
}

/// A listener that accepts and holds connections until the test ends.
async fn live_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// An address where nothing listens (connection refused).
async fn dead_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

fn client(last: u8) -> ClientInfo {
    ClientInfo::from_ip(IpAddr::from([192, 0, 2, last]))
}

fn pool(backends: &[SocketAddr], cfg: PoolConfig) -> Arc<Pool> {
    let b: Vec<Backend> = backends.iter().copied().map(backend).collect();
    Pool::new(&b, cfg, Arc::new(DirectDialer))
}

#[tokio::test]
async fn connect_skips_a_dead_backend_invisibly_and_ejects_it() {
    let (live, _t) = live_backend().await;
    let dead = dead_backend().await;
    let p = pool(&[dead, live], PoolConfig::default());
    for _ in 0..50 {
        let (_stream, lease) = p.connect(&client(1)).await.expect("a backend connects");
        assert_eq!(lease.backend(), live);
    }
    let status = p.status();
    assert_eq!(status[0].state, HealthState::Ejected);
    assert_eq!(status[0].ejections, 1);
    assert_eq!(status[1].state, HealthState::Healthy);
    assert_eq!(status[1].in_flight, 0, "dropped leases are released");
    assert!(status[0].errors >= 3);
}

#[tokio::test]
async fn all_backends_down_is_no_healthy_backend_within_the_connect_timeout() {
    let dead = [
        dead_backend().await,
        dead_backend().await,
        dead_backend().await,
    ];
    let cfg = PoolConfig {
        connect_timeout_ms: Some(500),
        ..PoolConfig::default()
    };
    let p = pool(&dead, cfg);
    for _ in 0..5 {
        let started = Instant::now();
        let err = p.connect(&client(1)).await.err();
        assert_eq!(err, Some(PoolError::NoHealthyBackend));
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(PoolError::NoHealthyBackend.status(), 503);
    }
    // By now every backend is ejected: refused without dialing.
    assert!(p.status().iter().all(|s| s.state == HealthState::Ejected));
}

#[tokio::test]
async fn a_black_holed_connect_is_cut_at_the_attempt_timeout_and_retried() {
    // A dialer that never answers for one address: a backend that drops SYNs.
    struct BlackHole(SocketAddr);
    impl Dialer for BlackHole {
        fn dial(&self, addr: SocketAddr) -> crate::upstream::dial::DialFuture<'_> {
            let hole = self.0;
            Box::pin(async move {
                if addr == hole {
                    std::future::pending::<()>().await;
                }
                DirectDialer.dial(addr).await
            })
        }
    }
    let (live, _t) = live_backend().await;
    let hole = dead_backend().await;
    let cfg = PoolConfig {
        policy: Policy::RoundRobin,
        connect_timeout_ms: Some(2000),
        connect_attempt_timeout_ms: Some(100),
        ..PoolConfig::default()
    };
    let p = Pool::new(
        &[backend(hole), backend(live)],
        cfg,
        Arc::new(BlackHole(hole)),
    );
    for _ in 0..4 {
        let (_s, lease) = p.connect(&client(1)).await.expect("connects");
        assert_eq!(lease.backend(), live);
    }
}

#[tokio::test]
async fn limits_queue_then_refuse_with_overloaded() {
    let (a, _t) = live_backend().await;
    let cfg = PoolConfig {
        max_connections: 1,
        queue_size: 1,
        queue_timeout_ms: 5000,
        ..PoolConfig::default()
    };
    let p = pool(&[a], cfg);
    let first = p.pick(&client(1), &[]).await.expect("free slot");
    // The second waits in the queue...
    let p2 = p.clone();
    let waiter = tokio::spawn(async move { p2.pick(&client(2), &[]).await.map(|l| l.backend()) });
    while p.shared.waiting.load(Ordering::Acquire) == 0 {
        tokio::task::yield_now().await;
    }
    // ...and the third finds the queue full.
    assert_eq!(
        p.pick(&client(3), &[]).await.err(),
        Some(PoolError::Overloaded)
    );
    drop(first);
    assert_eq!(waiter.await.expect("join"), Ok(a));
}

#[tokio::test]
async fn a_queue_wait_longer_than_the_queue_timeout_is_overloaded() {
    let (a, _t) = live_backend().await;
    let cfg = PoolConfig {
        max_connections: 1,
        queue_timeout_ms: 50,
        ..PoolConfig::default()
    };
    let p = pool(&[a], cfg);
    let _held = p.pick(&client(1), &[]).await.expect("free slot");
    assert_eq!(
        p.pick(&client(2), &[]).await.err(),
        Some(PoolError::Overloaded)
    );
}

#[tokio::test]
async fn exclusions_steer_a_retry_elsewhere() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let p = pool(&[a, b], PoolConfig::default());
    for _ in 0..20 {
        assert_eq!(p.pick(&client(1), &[a]).await.map(|l| l.backend()), Ok(b));
    }
    assert_eq!(
        p.pick(&client(1), &[a, b]).await.err(),
        Some(PoolError::NoHealthyBackend)
    );
}

#[tokio::test]
async fn ip_hashing_is_sticky_and_spreads_clients() {
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (a, t) = live_backend().await;
        addrs.push(a);
        tasks.push(t);
    }
    let cfg = PoolConfig {
        policy: Policy::HashClientIp,
        ..PoolConfig::default()
    };
    let p = pool(&addrs, cfg);
    let mut seen = std::collections::HashSet::new();
    for c in 0..60u8 {
        let first = p.pick(&client(c), &[]).await.expect("pick").backend();
        for _ in 0..10 {
            assert_eq!(
                p.pick(&client(c), &[]).await.expect("pick").backend(),
                first
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "60 clients land on all three backends");
}

#[tokio::test]
async fn cookie_hashing_follows_the_cookie_not_the_ip() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let cfg = PoolConfig {
        policy: Policy::HashCookie,
        ..PoolConfig::default()
    };
    let p = pool(&[a, b], cfg);
    for session in 0..20 {
        let info = |ip| ClientInfo {
            ip: IpAddr::from([198, 51, 100, ip]),
            sticky_cookie: Some(format!("session-{session}")),
        };
        let first = p.pick(&info(1), &[]).await.expect("pick").backend();
        for ip in 2..30 {
            assert_eq!(p.pick(&info(ip), &[]).await.expect("pick").backend(), first);
        }
    }
}

#[tokio::test]
async fn a_burst_of_5xx_ejects_and_traffic_moves_away() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let p = pool(&[a, b], PoolConfig::default());
    let mut picks = 0;
    while p.status()[0].state != HealthState::Ejected {
        picks += 1;
        assert!(picks < 1000, "never ejected");
        let lease = p.pick(&client(1), &[]).await.expect("pick");
        let outcome = if lease.backend() == a {
            Outcome::from_status(502, Duration::from_millis(1))
        } else {
            Outcome::from_status(200, Duration::from_millis(1))
        };
        lease.report(outcome);
    }
    for _ in 0..100 {
        assert_eq!(p.pick(&client(1), &[]).await.expect("pick").backend(), b);
    }
}

#[tokio::test]
async fn round_robin_is_even() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let cfg = PoolConfig {
        policy: Policy::RoundRobin,
        ..PoolConfig::default()
    };
    let p = pool(&[a, b], cfg);
    let mut on_a = 0;
    for _ in 0..100 {
        if p.pick(&client(1), &[]).await.expect("pick").backend() == a {
            on_a += 1;
        }
    }
    assert_eq!(on_a, 50);
}

#[tokio::test]
async fn least_loaded_sends_less_to_a_slow_backend() {
    let (fast, _tf) = live_backend().await;
    let (slow, _ts) = live_backend().await;
    let p = pool(&[fast, slow], PoolConfig::default());
    let mut on_slow = 0;
    for _ in 0..1000 {
        let lease = p.pick(&client(1), &[]).await.expect("pick");
        let ms = if lease.backend() == slow { 20 } else { 2 };
        if lease.backend() == slow {
            on_slow += 1;
        }
        lease.report(Outcome::from_status(200, Duration::from_millis(ms)));
    }
    assert!(on_slow < 100, "slow backend got {on_slow} of 1000");
}

/// An HTTP backend answering every request with `status`.
async fn http_backend(status: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn http_probes_check_the_status() {
    let (ok, _t1) = http_backend(204).await;
    let (bad, _t2) = http_backend(503).await;
    let dead = dead_backend().await;
    let cfg = ActiveHealthConfig {
        kind: ProbeKind::Http,
        path: "/healthz".into(),
        ..ActiveHealthConfig::default()
    };
    assert!(probe::probe_once(&DirectDialer, ok, &cfg, BackendProtocol::Http1).await);
    assert!(!probe::probe_once(&DirectDialer, bad, &cfg, BackendProtocol::Http1).await);
    assert!(!probe::probe_once(&DirectDialer, dead, &cfg, BackendProtocol::Http1).await);
    let tcp = ActiveHealthConfig {
        kind: ProbeKind::Tcp,
        ..cfg
    };
    assert!(probe::probe_once(&DirectDialer, bad, &tcp, BackendProtocol::Http1).await);
    assert!(!probe::probe_once(&DirectDialer, dead, &tcp, BackendProtocol::Http1).await);
}

#[tokio::test]
async fn http_probes_speak_h2c_to_h2c_backends() {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let h2c = listener.local_addr().expect("addr");
    let _task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let status = if req.uri().path() == "/healthz" {
                        200
                    } else {
                        404
                    };
                    http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    let cfg = ActiveHealthConfig {
        kind: ProbeKind::Http,
        path: "/healthz".into(),
        ..ActiveHealthConfig::default()
    };
    assert!(probe::probe_once(&DirectDialer, h2c, &cfg, BackendProtocol::H2c).await);
    // HTTP/1.1 is what marked h2c-only backends down.
    assert!(!probe::probe_once(&DirectDialer, h2c, &cfg, BackendProtocol::Http1).await);
    let missing = ActiveHealthConfig {
        path: "/missing".into(),
        ..cfg.clone()
    };
    assert!(!probe::probe_once(&DirectDialer, h2c, &missing, BackendProtocol::H2c).await);
    // A pool built for an h2c route probes with h2c and keeps the backend up.
    let active = PoolConfig {
        active: ActiveHealthConfig {
            interval_ms: 20,
            fall: 1,
            ..cfg
        },
        ..PoolConfig::default()
    };
    let p = Pool::for_route_speaking(
        "h2c.test",
        &[backend(h2c)],
        active,
        Arc::new(DirectDialer),
        BackendProtocol::H2c,
    );
    assert_eq!(p.protocol(), BackendProtocol::H2c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(p.status()[0].available, "{:?}", p.status());
    // The gateway's route table builds h2c routes' pools that way.
    let route = meshgate_config::route::Route {
        host: "h2c.test".parse().unwrap(),
        backends: vec![backend(h2c)],
        mode: meshgate_config::route::Mode::Terminate,
        options: meshgate_config::route::RouteOptions {
            backend_protocol: BackendProtocol::H2c,
            ..Default::default()
        },
        pool: PoolConfig::default(),
    };
    let table = crate::routes::RouteTable::build(&[route], &[]);
    let entry = table.lookup("h2c.test").expect("route");
    assert_eq!(entry.pool.protocol(), BackendProtocol::H2c);
}

#[tokio::test]
async fn active_probes_take_a_failing_backend_out_and_bring_it_back() {
    let (good, _t1) = live_backend().await;
    // Reserve a port, leave it closed, later start a backend on it.
    let flaky = dead_backend().await;
    let cfg = PoolConfig {
        active: ActiveHealthConfig {
            kind: ProbeKind::Tcp,
            interval_ms: 20,
            timeout_ms: 200,
            fall: 2,
            rise: 2,
            ..ActiveHealthConfig::default()
        },
        ..PoolConfig::default()
    };
    let p = pool(&[good, flaky], cfg);
    meshgate_testkit::eventually(Duration::from_secs(5), "flaky marked down", || {
        p.status()[1].state == HealthState::Down
    })
    .await;
    for _ in 0..50 {
        assert_eq!(p.pick(&client(1), &[]).await.expect("pick").backend(), good);
    }
    let listener = TcpListener::bind(flaky).await.expect("rebind the port");
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    meshgate_testkit::eventually(Duration::from_secs(5), "flaky re-admitted", || {
        p.status()[1].available
    })
    .await;
    let mut on_flaky = 0;
    for _ in 0..100 {
        if p.pick(&client(1), &[]).await.expect("pick").backend() == flaky {
            on_flaky += 1;
        }
    }
    assert!(on_flaky > 20, "re-admitted backend got {on_flaky} of 100");
}

#[tokio::test]
async fn status_serialises_and_metrics_carry_route_and_backend() {
    let (a, _t) = live_backend().await;
    let route = "metrics-test.example";
    let p = Pool::for_route(
        route,
        &[backend(a)],
        PoolConfig::default(),
        Arc::new(DirectDialer),
    );
    let lease = p.pick(&client(1), &[]).await.expect("pick");
    lease.report(Outcome::from_status(500, Duration::from_millis(3)));
    let json = serde_json::to_value(p.status()).expect("serialise");
    assert_eq!(json[0]["addr"], a.to_string());
    assert_eq!(json[0]["state"], "healthy");
    assert_eq!(json[0]["requests"], 1);
    assert_eq!(json[0]["errors"], 1);

    let mut registry = prometheus_client::registry::Registry::default();
    register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let series = format!("route=\"{route}\",backend=\"{a}\"");
    for name in [
        "meshgate_pool_requests_total{",
        "meshgate_pool_response_seconds_bucket{",
        "meshgate_pool_backend_up{",
        "meshgate_pool_ejections_total{",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains(&series)),
            "{name} for {series} missing in\n{text}"
        );
    }
    assert!(text.contains(&format!(
        "meshgate_pool_errors_total{{route=\"{route}\",backend=\"{a}\",kind=\"server_error\"}} 1"
    )));
    drop(p);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(!text.contains(route), "a dropped pool's series are removed");
}

#[test]
fn config_defaults_and_toml() {
    let parse = |text: &str| {
        meshgate_config::file::parse::<PoolConfig>(std::path::Path::new("pool.toml"), text)
    };
    let cfg = parse("").expect("empty table");
    assert_eq!(cfg, PoolConfig::default());
    assert_eq!(cfg.validate(), Ok(()));
    let cfg = parse(
        "policy = \"hash_cookie\"\nsticky_cookie = \"sid\"\nmax_connections = 64\n\
         [active]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 500\n",
    )
    .expect("parses");
    assert_eq!(cfg.policy, Policy::HashCookie);
    assert_eq!(cfg.active.kind, ProbeKind::Http);
    assert_eq!(cfg.active.rise, 2);
    let err = parse("max_connections = 4\npolcy = \"round_robin\"").err();
    assert_eq!(err.and_then(|e| e.line), Some(2), "unknown field located");
    let bad = PoolConfig {
        active: ActiveHealthConfig {
            kind: ProbeKind::Http,
            path: "healthz".into(),
            ..ActiveHealthConfig::default()
        },
        ..PoolConfig::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.0), Err("pool.active.path"));
}

#[tokio::test]
async fn weight_zero_drains_a_backend() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let backends = [Backend { addr: a, weight: 0 }, backend(b)];
    let p = Pool::new(&backends, PoolConfig::default(), Arc::new(DirectDialer));
    for _ in 0..50 {
        assert_eq!(p.pick(&client(1), &[]).await.map(|l| l.backend()), Ok(b));
    }
}

#[tokio::test]
async fn a_reloaded_pool_inherits_ejections_and_latency() {
    let (live, _t) = live_backend().await;
    let dead = dead_backend().await;
    let old = pool(&[dead, live], PoolConfig::default());
    let mut tries = 0;
    while old.status()[0].state != HealthState::Ejected {
        tries += 1;
        assert!(tries < 1000, "dead backend never ejected");
        let _ = old.connect(&client(1)).await.expect("connects");
    }
    let lease = old.pick(&client(1), &[]).await.expect("pick");
    lease.report(Outcome::from_status(200, Duration::from_millis(7)));
    // The new pool lists the backends in another order and adds one.
    let (extra, _t2) = live_backend().await;
    let new = pool(&[extra, live, dead], PoolConfig::default());
    new.inherit(&old);
    let s = new.status();
    assert_eq!(s[2].state, HealthState::Ejected, "ejection carried over");
    assert!(
        s[1].latency_ms.is_some_and(|ms| ms > 5.0),
        "latency carried over"
    );
    assert_eq!(s[0].state, HealthState::Healthy);
    assert!(s[0].latency_ms.is_none());
}

#[tokio::test]
async fn a_cancelled_wait_leaves_the_queue() {
    let (a, _t) = live_backend().await;
    let cfg = PoolConfig {
        max_connections: 1,
        queue_size: 1,
        queue_timeout_ms: 5000,
        ..PoolConfig::default()
    };
    let p = pool(&[a], cfg);
    let held = p.pick(&client(1), &[]).await.expect("free slot");
    for _ in 0..3 {
        // The client goes away while waiting: its place in the queue is given back.
        let waited = tokio::time::timeout(Duration::from_millis(10), p.pick(&client(2), &[])).await;
        assert!(waited.is_err());
        assert_eq!(p.shared.waiting.load(Ordering::Acquire), 0);
    }
    let p2 = p.clone();
    let waiter = tokio::spawn(async move { p2.pick(&client(3), &[]).await.map(|l| l.backend()) });
    while p.shared.waiting.load(Ordering::Acquire) == 0 {
        tokio::task::yield_now().await;
    }
    drop(held);
    assert_eq!(waiter.await.expect("join"), Ok(a));
}

#[tokio::test]
async fn a_backend_on_probation_takes_one_request_at_a_time() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let cfg = PoolConfig {
        passive: PassiveHealthConfig {
            base_ejection_ms: 1,
            max_ejection_ms: 1,
            ..PassiveHealthConfig::default()
        },
        ..PoolConfig::default()
    };
    let p = pool(&[a, b], cfg);
    while p.status()[0].ejections == 0 {
        let lease = p.pick(&client(1), &[a, b][1..]).await.expect("pick a");
        lease.report(Outcome::ConnectFailed);
    }
    tokio::time::sleep(Duration::from_millis(5)).await; // the 1 ms ejection ends
    assert_eq!(p.status()[0].state, HealthState::Probation);
    // One request goes to it; while that one is out, everything else goes to b.
    let first = p.pick(&client(1), &[b]).await.expect("probation backend");
    assert_eq!(first.backend(), a);
    for _ in 0..20 {
        assert_eq!(p.pick(&client(1), &[]).await.expect("pick").backend(), b);
    }
    first.report(Outcome::from_status(200, Duration::from_millis(1)));
    assert_eq!(p.status()[0].state, HealthState::Healthy);
    let mut on_a = 0;
    let mut held = Vec::new();
    for _ in 0..20 {
        let l = p.pick(&client(1), &[]).await.expect("pick");
        on_a += usize::from(l.backend() == a);
        held.push(l);
    }
    assert!(
        on_a >= 5,
        "confirmed backend takes concurrent requests again: {on_a}"
    );
}

#[tokio::test]
async fn a_streak_of_broken_connections_ejects() {
    let (a, _ta) = live_backend().await;
    let (b, _tb) = live_backend().await;
    let p = pool(&[a, b], PoolConfig::default());
    // Single resets between successes (keep-alive races) never eject.
    for _ in 0..50 {
        p.pick(&client(1), &[b])
            .await
            .expect("pick")
            .report(Outcome::Reset);
        let ok = Outcome::from_status(200, Duration::from_millis(1));
        p.pick(&client(1), &[b]).await.expect("pick").report(ok);
    }
    assert_eq!(p.status()[0].ejections, 0);
    for _ in 0..5 {
        p.pick(&client(1), &[b])
            .await
            .expect("pick")
            .report(Outcome::Reset);
    }
    assert_eq!(p.status()[0].state, HealthState::Ejected);
}

#[tokio::test]
async fn a_lone_backend_on_probation_queues_requests_instead_of_refusing_them() {
    let (a, _ta) = live_backend().await;
    let cfg = PoolConfig {
        passive: PassiveHealthConfig {
            base_ejection_ms: 1,
            max_ejection_ms: 1,
            ..PassiveHealthConfig::default()
        },
        ..PoolConfig::default()
    };
    let p = pool(&[a], cfg);
    while p.status()[0].ejections == 0 {
        p.pick(&client(1), &[])
            .await
            .expect("pick")
            .report(Outcome::ConnectFailed);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(p.status()[0].state, HealthState::Probation);
    let mut first = p.pick(&client(1), &[]).await.expect("the probe request");
    let p2 = p.clone();
    let second = tokio::spawn(async move { p2.pick(&client(2), &[]).await.map(|l| l.backend()) });
    while p.shared.waiting.load(Ordering::Acquire) == 0 {
        tokio::task::yield_now().await;
    }
    // The first answer confirms the backend; the queued request goes through.
    first.record(Outcome::from_status(200, Duration::from_millis(1)));
    assert_eq!(second.await.expect("join"), Ok(a));
    drop(first);
}
