//! The listeners against hostile clients, on the real `meshgate gateway` binary: the
//! operator's endpoints and the deployers' API apart, `/reload` behind the admin token, the
//! first request head due `header_ms` after accept (HTTP/2 preface included), each listener's
//! own slots, and the per-client connection cap.

mod common;

use common::{GatewayProcess, start_gateway};
use meshgate_testkit::curl::curl;
use meshgate_testkit::http::fixed_backend;
use meshgate_testkit::net::silent_udp;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// A client connection from `source` (any address in 127.0.0.0/8) to `to`. A connection the
/// gateway resets at once may fail here already (the reset arrived before `connect` looked).
async fn try_connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind a loopback source address");
    socket.connect(to).await
}

async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    try_connect_from(source, to)
        .await
        .unwrap_or_else(|e| panic!("connect {source:?} → {to}: {e}"))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits up to `limit` for the gateway to close `stream` (EOF or reset), reading and
/// discarding whatever it sends; the time it took, or `None` if it stayed open.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(start + limit, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// `curl` with `args`, `-m 3`: (status, body); status 0 when nothing answered in time.
fn curl3(args: &[&str]) -> (u16, String) {
    let c = curl(&[&["-m", "3"], args].concat());
    (c.status, c.body)
}

/// `metric{labels}` from an OpenMetrics text, 0 when absent.
fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Operator's endpoints on `[admin]`, deployers' API on `[api]`, each serving only its own,
/// and `POST /reload` only with the admin token.
#[test]
fn operator_endpoints_and_deployer_api_are_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (_dns_socket, dns) = silent_udp();
    let gw =
        GatewayProcess::start_with(Path::new(env!("CARGO_BIN_EXE_meshgate")), dir.path(), |p| {
            let reservations = format!("[reservations]\nnameservers = [\"{dns}\"]\n");
            // `domains` is a top-level key: it goes before the first table.
            format!(
                "domains = [\"gw.test\"]\n{}",
                GatewayProcess::config_text(dir.path(), p, &reservations)
            )
        });
    let admin = gw.admin_token();
    let operator = format!("http://127.0.0.1:{}", gw.admin);
    let api = gw.api_url();
    let bearer = |t: &str| format!("Authorization: Bearer {t}");

    // A deployer, through the API listener.
    let c = curl(&[
        "-m",
        "5",
        "-X",
        "POST",
        "-H",
        &bearer(&admin),
        "-d",
        "{\"owner\":\"alice\"}",
        &format!("{api}/v1/tokens"),
    ]);
    assert_eq!(c.status, 201, "{}\n{}", c.body, gw.log());
    let v: serde_json::Value = serde_json::from_str(&c.body).unwrap();
    let alice = v["token"].as_str().unwrap().to_string();
    let (s, body) = curl3(&["-H", &bearer(&alice), &format!("{api}/v1/whoami")]);
    assert_eq!(s, 200, "{body}");

    // The API listener serves nothing of the operator's, with any token.
    for (method, path) in [("GET", "/status"), ("GET", "/metrics"), ("POST", "/reload")] {
        for token in [&admin, &alice] {
            let (s, body) = curl3(&["-X", method, "-H", &bearer(token), &format!("{api}{path}")]);
            assert_eq!(s, 404, "{method} {path} on the API listener: {body}");
        }
    }
    // The operator's listener serves no API.
    let (s, body) = curl3(&["-H", &bearer(&admin), &format!("{operator}/v1/whoami")]);
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("[api] listen"), "{body}");

    // `/reload` needs the admin token: none, a deployer's and a wrong one are refused.
    let (s, body) = curl3(&["-X", "POST", &format!("{operator}/reload")]);
    assert_eq!(s, 401, "{body}");
    let (s, body) = curl3(&[
        "-X",
        "POST",
        "-H",
        &bearer(&alice),
        &format!("{operator}/reload"),
    ]);
    assert_eq!(s, 401, "{body}");
    let (s, body) = curl3(&[
        "-X",
        "POST",
        "-H",
        "Authorization: Bearer mg_nope",
        &format!("{operator}/reload"),
    ]);
    assert_eq!(s, 401, "{body}");
    assert!(!gw.log().contains("configuration applied"), "{}", gw.log());
    let (s, body) = curl3(&[
        "-X",
        "POST",
        "-H",
        &bearer(&admin),
        &format!("{operator}/reload"),
    ]);
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("\"reloaded\":true"), "{body}");
    let (s, body) = curl3(&[&format!("{operator}/status")]);
    assert_eq!(s, 200, "{body}");
}

/// Silence, or the HTTP/2 preface a byte at a time, is closed `header_ms` after accept on
/// :80 and, after the TLS handshake, on :443 — not when `idle_ms` finally runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_ms_covers_protocol_detection_and_the_h2_preface() {
    let dir = tempfile::tempdir().unwrap();
    let backend = fixed_backend("ok").await;
    let gw = start_gateway(
        dir.path(),
        &format!(
            "[timeouts]\nheader_ms = 400\nidle_ms = 30000\n\
             [security]\nallow_private_backends = true\n\
             [[route]]\nhost = \"a.test\"\nbackends = [{{ addr = \"{}\" }}]\n",
            backend.addr()
        ),
    );
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // An empty SETTINGS frame, to dribble on once the preface is through.
    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    let limit = Duration::from_millis(2500);

    // :80, silent.
    let mut silent = TcpStream::connect(local(gw.http)).await.unwrap();
    let took = closed_within(&mut silent, limit).await;
    assert!(
        took.is_some(),
        "a silent :80 connection stayed open past {limit:?}"
    );

    // :80, the preface then SETTINGS one byte every 50 ms (bytes keep moving, so `idle_ms`
    // never fires).
    let mut dribbler = TcpStream::connect(local(gw.http)).await.unwrap();
    let start = Instant::now();
    let mut closed = None;
    let mut buf = [0u8; 1024];
    for byte in PREFACE.iter().chain(SETTINGS.iter().cycle()).copied() {
        if start.elapsed() > limit {
            break;
        }
        if dribbler.write_all(&[byte]).await.is_err() {
            closed = Some(start.elapsed());
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), dribbler.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(start.elapsed());
                break;
            }
            _ => {}
        }
    }
    let took = closed.unwrap_or_else(|| panic!("the dribbled preface kept :80 open for {limit:?}"));
    assert!(
        took >= Duration::from_millis(300),
        "closed too early: {took:?}"
    );

    // :443 with ALPN h2: the handshake completes, then nothing.
    let mut tls = gw.tls("a.test", &[b"h2"]).await;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let shut = loop {
        match tokio::time::timeout_at(start + limit, tls.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => continue, // the server's SETTINGS
        }
    };
    assert!(
        shut,
        "a silent h2 connection on :443 stayed open past {limit:?}"
    );

    // A client that sends its request in time is served as before.
    let (s, body) = gw.curl("a.test", "/", &["-m", "5", "--http2"]);
    assert_eq!((s, body.as_str()), (200, "ok"));
    let metrics = gw.admin_get("/metrics");
    assert!(
        metric(
            &metrics,
            "meshgate_errors_total{route=\"unknown\",kind=\"header_timeout\"}"
        ) >= 3,
        "{metrics}"
    );
}

/// Silent connections filling :80's slots leave HTTPS served: each listener has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_http_connections_leave_https_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let backend = fixed_backend("ok").await;
    let gw = start_gateway(
        dir.path(),
        &format!(
            "[limits]\nmax_connections = 8\n\
             [security]\nallow_private_backends = true\n\
             [[route]]\nhost = \"a.test\"\nbackends = [{{ addr = \"{}\" }}]\n",
            backend.addr()
        ),
    );
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(local(gw.http)).await.unwrap());
    }
    // Let the gateway accept them (they are silent: it can only be told by the wait).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, body) = gw.curl("a.test", "/", &["-m", "3"]);
    assert_eq!(
        (s, body.as_str()),
        (200, "ok"),
        "HTTPS starved by silent :80 clients"
    );
    drop(silent);
}

/// One client gets at most `max_connections_per_ip` of the public slots; its next
/// connections are reset at once and counted, and other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_cap_resets_extra_connections() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), "[limits]\nmax_connections_per_ip = 4\n");
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 3], local(gw.http)).await);
    }
    // The fifth from the same client, on :80 and on :443 (one cap for both), is closed.
    for port in [gw.http, gw.https] {
        if let Ok(mut extra) = try_connect_from([127, 0, 0, 3], local(port)).await {
            let took = closed_within(&mut extra, Duration::from_secs(2)).await;
            assert!(
                took.is_some(),
                "the client's 5th connection to {port} stayed open"
            );
        }
    }
    // Another client is served.
    let mut other = connect_from([127, 0, 0, 4], local(gw.http)).await;
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(3), other.read_exact(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");
    let metrics = gw.admin_get("/metrics");
    assert_eq!(
        metric(
            &metrics,
            "meshgate_connections_refused_total{listener=\"http\",reason=\"per_ip_limit\"}"
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "meshgate_connections_refused_total{listener=\"https\",reason=\"per_ip_limit\"}"
        ),
        1,
        "{metrics}"
    );
    // Closing one gives the client a place again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..20 {
        let Ok(mut c) = try_connect_from([127, 0, 0, 3], local(gw.http)).await else {
            continue;
        };
        if closed_within(&mut c, Duration::from_millis(200))
            .await
            .is_none()
        {
            again = Some(c);
            break;
        }
    }
    assert!(again.is_some(), "the client never got its place back");
}

/// 65 silent connections from one client to the operator's listener leave it serving
/// `/status` to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_cannot_block_the_operator_listener() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path(), "");
    let mut silent = Vec::new();
    for _ in 0..65 {
        // Those over the client's cap are reset, some before `connect` returns.
        silent.push(try_connect_from([127, 0, 0, 5], local(gw.admin)).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = format!("http://127.0.0.1:{}/status", gw.admin);
    let (s, body) = curl3(&[&url]);
    assert_eq!(s, 200, "the operator's listener is blocked: {body}");
    drop(silent);
}
