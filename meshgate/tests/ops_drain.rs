//! Graceful drain of the real `meshgate gateway` process: SIGTERM while slow requests are in
//! flight over HTTP/1.1 and h2. Every request completes with 200 and its whole body, the
//! listeners refuse new connections as soon as the stop begins, the h2 connection takes no
//! new stream (GOAWAY), and the process exits 0 well before the drain deadline.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_testkit::http::{Protocol, serve_http};
use meshgate_testkit::pattern::PatternCheck;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const HOST: &str = "slow.meshgate.test";
/// Each response: head after `HEAD_DELAY`, then `CHUNKS` × `CHUNK` bytes `CHUNK_GAP` apart.
const HEAD_DELAY: Duration = Duration::from_millis(800);
const CHUNKS: u64 = 8;
const CHUNK: usize = 16 * 1024;
const CHUNK_GAP: Duration = Duration::from_millis(250);
const H1_REQUESTS: usize = 6;
const H2_STREAMS: usize = 6;

/// A backend whose every response takes ~2.8 s: a late head, then a slowly streamed pattern
/// body. Counts the requests that reached it.
async fn slow_backend(arrived: Arc<AtomicUsize>) -> Served {
    let (l, _) = meshgate_testkit::listener().await;
    serve_http(l, Protocol::Http1, move |_req| {
        let arrived = arrived.clone();
        async move {
            arrived.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(HEAD_DELAY).await;
            let body = futures_util::stream::unfold(0u64, |i| async move {
                if i == CHUNKS {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(CHUNK_GAP).await;
                }
                let data = pattern_chunk(i * CHUNK as u64, CHUNK);
                Some((Ok::<_, std::io::Error>(Frame::data(data)), i + 1))
            });
            http::Response::new(StreamBody::new(body))
        }
    })
}

/// Reads a response's whole body: (status, bytes, first wrong byte).
async fn read(
    resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<(u16, u64, Option<u64>), String> {
    let resp = resp.map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut check = PatternCheck::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body cut after {} bytes: {e}", check.len))?;
        if let Some(d) = frame.data_ref() {
            check.feed(d);
        }
    }
    Ok((status, check.len, check.first_bad))
}

fn get(path: String) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!("https://{HOST}{path}"))
        .header(http::header::HOST, HOST)
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_over_h1_and_h2() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let backend = slow_backend(arrived.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start_gateway(
        dir.path(),
        &format!(
            "[timeouts]\ndrain_ms = 20000\n\
             [security]\nallow_private_backends = true\n\
             [[route]]\nhost = \"{HOST}\"\nbackends = [{{ addr = \"{}\" }}]\n",
            backend.addr()
        ),
    );

    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..H1_REQUESTS {
        let (mut send, _conn) = gw.h1(HOST).await;
        inflight.spawn(async move {
            (
                format!("h1 #{i}"),
                read(send.send_request(get(format!("/h1/{i}"))).await).await,
            )
        });
    }
    let tls = gw.tls(HOST, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..H2_STREAMS {
        let mut send = h2.clone();
        inflight.spawn(async move {
            (
                format!("h2 #{i}"),
                read(send.send_request(get(format!("/h2/{i}"))).await).await,
            )
        });
    }
    let total = H1_REQUESTS + H2_STREAMS;
    eventually(
        Duration::from_secs(10),
        "every request to reach the backend",
        || arrived.load(Ordering::SeqCst) == total,
    )
    .await;

    // Stop the gateway with every request in flight (their heads are ~0.8 s away, their
    // bodies ~2.8 s).
    let stopped_at = Instant::now();
    let rc = sigterm(gw.child.id());
    assert_eq!(rc, 0, "kill -TERM");

    // New connections are refused as soon as the listeners close, long before the drain ends.
    // Each accept loop is its own task and the tasks end one by one, so both listeners are
    // awaited, each within the same bound.
    let https = gw.https_addr();
    let plain = std::net::SocketAddr::from(([127, 0, 0, 1], gw.http));
    for (name, addr) in [("HTTPS", https), ("plain HTTP", plain)] {
        eventually(
            Duration::from_secs(2),
            &format!("the {name} listener to refuse connections"),
            || {
                matches!(
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                )
            },
        )
        .await;
    }
    let refused_after = stopped_at.elapsed();
    assert!(
        refused_after < Duration::from_millis(1500),
        "listeners closed only after {refused_after:?}"
    );
    // The h2 connection gets GOAWAY: hyper's graceful shutdown is h2's two-phase GOAWAY, so a
    // stream opened before the final one (a PING round trip after the first) is still
    // accepted, and then must be served in full like any in-flight request; once the final
    // GOAWAY is in, a new stream is refused.
    let mut accepted_late = 0;
    let mut refused = false;
    for _ in 0..25 {
        let mut late = h2.clone();
        let late = tokio::time::timeout(
            Duration::from_secs(5),
            late.send_request(get("/late".into())),
        )
        .await
        .expect("the late stream is answered or refused promptly");
        if late.is_err() {
            refused = true;
            break;
        }
        accepted_late += 1;
        inflight.spawn(async move { (format!("late #{accepted_late}"), read(late).await) });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "streams opened after GOAWAY were still served");
    let total = total + accepted_late;
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        total,
        "a refused late stream reached the backend"
    );

    // Every in-flight request finishes with 200 and its whole, intact body.
    let mut done = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(15), inflight.join_next())
        .await
        .expect("in-flight requests finish")
    {
        let (name, result) = r.unwrap();
        let (status, len, bad) = result.unwrap_or_else(|e| panic!("{name}: {e}\n{}", gw.log()));
        assert_eq!(status, 200, "{name}");
        assert_eq!(len, CHUNKS * CHUNK as u64, "{name}: body length");
        assert_eq!(bad, None, "{name}: body corrupted");
        done += 1;
    }
    assert_eq!(done, total);

    // Then the process exits 0, by itself, well within drain_ms.
    let status = meshgate_testkit::eventually::eventually_blocking(
        Duration::from_secs(10),
        "the gateway to exit",
        || {
            gw.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_string())
        },
    );
    assert!(status.success(), "exit status {status}\n{}", gw.log());
    assert!(
        stopped_at.elapsed() < Duration::from_secs(12),
        "drain took {:?}",
        stopped_at.elapsed()
    );
    let log = gw.log();
    assert!(log.contains("listeners closed; draining"), "{log}");
    assert!(!log.contains("drain deadline passed"), "{log}");
}

/// A drain that runs out of time: requests still in flight at `drain_ms` are cut, and the
/// process still exits 0 shortly after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_bounds_the_stop() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let backend = slow_backend(arrived.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = start_gateway(
        dir.path(),
        &format!(
            "[timeouts]\ndrain_ms = 300\n\
             [security]\nallow_private_backends = true\n\
             [[route]]\nhost = \"{HOST}\"\nbackends = [{{ addr = \"{}\" }}]\n",
            backend.addr()
        ),
    );
    let (mut send, _conn) = gw.h1(HOST).await;
    let request =
        tokio::spawn(async move { read(send.send_request(get("/cut".into())).await).await });
    eventually(
        Duration::from_secs(10),
        "the request to reach the backend",
        || arrived.load(Ordering::SeqCst) == 1,
    )
    .await;
    let stopped_at = Instant::now();
    assert_eq!(sigterm(gw.child.id()), 0);
    let status = meshgate_testkit::eventually::eventually_blocking(
        Duration::from_secs(10),
        "the gateway to exit",
        || {
            gw.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "running".to_string())
        },
    );
    let took = stopped_at.elapsed();
    assert!(status.success(), "exit status {status}\n{}", gw.log());
    // 0.3 s of drain + at most 1 s for closed connections to finish their records.
    assert!(took < Duration::from_millis(2500), "stop took {took:?}");
    // The request (its body ~2.8 s long) could not finish: cut, not answered in full.
    let result = request.await.unwrap();
    assert!(
        !matches!(result, Ok((200, len, None)) if len == CHUNKS * CHUNK as u64),
        "{result:?}"
    );
    assert!(gw.log().contains("drain deadline passed"), "{}", gw.log());
}

/// `kill -TERM pid`, through the `kill` program: the workspace forbids unsafe code.
fn sigterm(pid: u32) -> i32 {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs")
        .code()
        .unwrap_or(-1)
}
