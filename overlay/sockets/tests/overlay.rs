//! The userspace stack on real overlay nodes linked over loopback TCP.

mod common;

use meshgate_overlay::addr::{prefix_of, prefix_string};
use meshgate_overlay::{Identity, Node, NodeConfig};
use meshgate_sockets::{Stack, StackConfig};
use meshgate_testkit::{eventually, eventually_ok};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const GIB: u64 = 1 << 30;

/// The tests here each saturate both cores: running them one at a time keeps each fast and
/// keeps timeouts meaningful on a loaded CI machine.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start_node(peers: Vec<SocketAddr>, dead_peer_timeout: Duration) -> Node {
    Node::start(NodeConfig {
        identity: Some(Identity::generate()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers,
        dead_peer_timeout,
        hello_interval: dead_peer_timeout / 5,
        ..NodeConfig::default()
    })
    .await
    .expect("node starts")
}

fn stack_on(node: &Node, config: StackConfig) -> Stack {
    let port = node.take_l3_port().expect("L3 port");
    Stack::with_config(port.address, port.mtu, port.tx, port.rx, config)
}

/// A chain of `n` nodes, each dialing the previous one.
async fn chain(n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for _ in 0..n {
        let peers = nodes
            .last()
            .map(|p| vec![p.listen_addr().unwrap()])
            .unwrap_or_default();
        nodes.push(start_node(peers, Duration::from_secs(5)).await);
    }
    nodes
}

async fn wait_route(node: &Node, to: Ipv6Addr) {
    let want = prefix_string(&prefix_of(&to));
    eventually(Duration::from_secs(20), &format!("a route to {to}"), || {
        node.status()
            .routes
            .iter()
            .any(|r| r.prefix == want && r.next_hop.is_some())
    })
    .await;
}

/// Writes `total` bytes of position-dependent data; returns their hash.
async fn send_data(w: &mut (impl AsyncWrite + Unpin), total: u64, seed: u64) -> blake3::Hash {
    const CHUNK: usize = 256 * 1024;
    let base = common::pattern(seed, CHUNK);
    let mut chunk = base.clone();
    let mut hasher = blake3::Hasher::new();
    let mut sent = 0u64;
    let mut index = 0u64;
    while sent < total {
        let n = CHUNK.min((total - sent) as usize);
        // Stamp the chunk index so reordered or repeated chunks change the hash.
        chunk[..8].copy_from_slice(
            &(u64::from_le_bytes(base[..8].try_into().unwrap()) ^ index).to_le_bytes(),
        );
        w.write_all(&chunk[..n]).await.unwrap();
        hasher.update(&chunk[..n]);
        sent += n as u64;
        index += 1;
    }
    hasher.finalize()
}

/// Reads to EOF; returns (bytes, hash, longest gap between reads).
async fn recv_data(r: &mut (impl AsyncRead + Unpin)) -> (u64, blake3::Hash, Duration) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    let mut last = Instant::now();
    let mut gap = Duration::ZERO;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        let now = Instant::now();
        gap = gap.max(now - last);
        last = now;
        if n == 0 {
            return (total, hasher.finalize(), gap);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// One stream of `total` bytes from the first to the last node of a chain.
async fn transfer_over_chain(hops: usize, total: u64) {
    let _serial = HEAVY.lock().await;
    let nodes = chain(hops + 1).await;
    let first = nodes.first().unwrap();
    let last = nodes.last().unwrap();
    let client = stack_on(first, StackConfig::default());
    let server = stack_on(last, StackConfig::default());
    wait_route(first, last.address()).await;
    wait_route(last, first.address()).await;
    let listener = server.listen(9000).unwrap();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let got = recv_data(&mut s).await;
        s.write_all(got.1.as_bytes()).await.unwrap();
        got
    });
    let started = Instant::now();
    let mut c = client
        .connect(SocketAddrV6::new(last.address(), 9000, 0, 0))
        .await
        .unwrap();
    let sent = send_data(&mut c, total, hops as u64).await;
    c.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    c.read_to_end(&mut echoed).await.unwrap();
    let (received, hash, _) = receiver.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{hops} hop(s): {total} bytes in {secs:.2} s = {:.2} Gbit/s (dev profile)",
        total as f64 * 8.0 / secs / 1e9
    );
    if std::env::var_os("MESHGATE_DEBUG_COUNTERS").is_some() {
        for n in &nodes {
            let c = serde_json::to_value(n.status().counters).unwrap();
            let nz: Vec<String> = c
                .as_object()
                .unwrap()
                .iter()
                .filter(|(_, v)| v.as_u64().is_some_and(|x| x > 0))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            eprintln!("{}: {} routing={}", n.address(), nz.join(" "), c["routing"]);
        }
        eprintln!("client {:?}\nserver {:?}", client.stats(), server.stats());
    }
    assert_eq!(received, total);
    assert_eq!(hash, sent, "data corrupted over {hops} hop(s)");
    assert_eq!(echoed, sent.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_one_hop() {
    transfer_over_chain(1, GIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_three_hops() {
    transfer_over_chain(3, GIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_of_one_mib_over_a_hop() {
    const STREAMS: usize = 1000;
    const SIZE: usize = 1 << 20;
    let _serial = HEAVY.lock().await;
    let nodes = chain(2).await;
    let config = StackConfig {
        socket_buffer: 64 * 1024,
        // 1000 simultaneous SYNs on a loaded machine: allow for SYN retransmissions.
        connect_timeout: Duration::from_secs(30),
        ..StackConfig::default()
    };
    let client = stack_on(&nodes[0], config.clone());
    let server = stack_on(&nodes[1], config);
    wait_route(&nodes[0], nodes[1].address()).await;
    wait_route(&nodes[1], nodes[0].address()).await;
    let listener = server.listen(8080).unwrap();
    // The server answers each stream with the hash of what it read.
    let acceptor = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (_, hash, _) = recv_data(&mut s).await;
                s.write_all(hash.as_bytes()).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let data = std::sync::Arc::new(common::pattern(11, SIZE + STREAMS));
    let target = SocketAddrV6::new(nodes[1].address(), 8080, 0, 0);
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let client = client.clone();
        let data = data.clone();
        clients.push(tokio::spawn(async move {
            let mut c = client.connect(target).await.unwrap();
            let mine = &data[i..i + SIZE];
            c.write_all(mine).await.unwrap();
            c.shutdown().await.unwrap();
            let mut digest = Vec::new();
            c.read_to_end(&mut digest).await.unwrap();
            assert_eq!(
                digest,
                blake3::hash(mine).as_bytes(),
                "stream {i} corrupted"
            );
        }));
    }
    common::join_within(Duration::from_secs(240), clients, acceptor, || {
        format!(
            "1000 streams; client stack {:?}, server stack {:?}",
            client.stats(),
            server.stats()
        )
    })
    .await;
    eprintln!(
        "1000 × 1 MiB over one hop in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

/// A—R1—B and A—R2—B: the relay carrying a stream is stopped mid-transfer; the stream stalls,
/// moves to the other relay and completes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_transfer_stream_survives() {
    let _serial = HEAVY.lock().await;
    let dead = Duration::from_secs(1);
    let a = start_node(vec![], dead).await;
    let a_addr = a.listen_addr().unwrap();
    let mut relays = [
        Some(start_node(vec![a_addr], dead).await),
        Some(start_node(vec![a_addr], dead).await),
    ];
    let relay_addrs: Vec<SocketAddr> = relays
        .iter()
        .map(|r| r.as_ref().unwrap().listen_addr().unwrap())
        .collect();
    let b = start_node(relay_addrs, dead).await;
    let client = stack_on(&a, StackConfig::default());
    let server = stack_on(&b, StackConfig::default());
    wait_route(&a, b.address()).await;
    wait_route(&b, a.address()).await;

    // Large enough that most of the stream is still to come once the relay has stopped (the
    // stream runs at ~0.5 GiB/s here, and stopping a node takes a while).
    const TOTAL: u64 = 768 << 20;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = server.listen(7000).unwrap();
    let progress = received.clone();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut hasher = blake3::Hasher::new();
        let mut last = Instant::now();
        let mut gap = Duration::ZERO;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            gap = gap.max(last.elapsed());
            last = Instant::now();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            progress.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        (hasher.finalize(), gap)
    });
    let target = SocketAddrV6::new(b.address(), 7000, 0, 0);
    let sender = tokio::spawn(async move {
        let mut c = client.connect(target).await.unwrap();
        let hash = send_data(&mut c, TOTAL, 5).await;
        c.shutdown().await.unwrap();
        (hash, client, c)
    });

    // Wait until an eighth has arrived, then stop the relay that is carrying the stream.
    eventually(Duration::from_secs(60), "an eighth of the transfer", || {
        received.load(std::sync::atomic::Ordering::Relaxed) >= TOTAL / 8
    })
    .await;
    let forwarded = |r: &Option<Node>| r.as_ref().unwrap().status().counters.bytes_forwarded;
    // The relay carrying the stream is the one that forwards the next 16 MiB.
    let before: Vec<u64> = relays.iter().map(forwarded).collect();
    let after: Vec<u64> = eventually_ok(Duration::from_secs(60), "a relay carrying it", || {
        let now: Vec<u64> = relays.iter().map(forwarded).collect();
        let carried = (0..2).any(|i| now[i] - before[i] >= 16 << 20);
        async move { if carried { Ok(now) } else { Err(now) } }
    })
    .await;
    let busy = if after[0] - before[0] >= after[1] - before[1] {
        0
    } else {
        1
    };
    let other = 1 - busy;
    let at_kill = received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        at_kill < TOTAL,
        "transfer finished before the relay could be stopped"
    );
    relays[busy].take().unwrap().shutdown().await;
    let other_before = forwarded(&relays[other]);
    let after_kill = received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        after_kill < TOTAL * 3 / 4,
        "only {} MiB were left when the relay had stopped",
        (TOTAL - after_kill) >> 20
    );

    let (sent_hash, _client, _c) = tokio::time::timeout(Duration::from_secs(90), sender)
        .await
        .expect("sender stuck after relay loss")
        .unwrap();
    let (got_hash, gap) = tokio::time::timeout(Duration::from_secs(90), receiver)
        .await
        .expect("receiver stuck after relay loss")
        .unwrap();
    eprintln!(
        "relay {busy} stopped after {} MiB; longest stall {:.2} s",
        at_kill >> 20,
        gap.as_secs_f64()
    );
    assert_eq!(received.load(std::sync::atomic::Ordering::Relaxed), TOTAL);
    assert_eq!(got_hash, sent_hash, "data corrupted across the reroute");
    // Packets in flight through the stopped relay are lost and retransmitted after smoltcp's
    // 1 s minimum RTO (the printed stall); when no packet was in flight there at the kill
    // there is no stall to see, so the stall is reported, not asserted.
    assert!(
        forwarded(&relays[other]) - other_before >= (TOTAL - after_kill) / 2,
        "the surviving relay did not carry the rest of the stream"
    );
}

/// Issue 15, item 5: the node's own "no route" event fails a pending connect at once (it used
/// to wait for the 10 s connect timeout); a destination that is reachable is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_a_route_fails_at_once_on_the_nodes_no_route_event() {
    let node = start_node(Vec::new(), Duration::from_secs(3)).await;
    let mut port = node.take_l3_port().expect("L3 port");
    let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
    // What `meshgate node` does with the events: only the node's own verdict counts.
    let s = stack.clone();
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = failed.clone();
    tokio::spawn(async move {
        while let Some(ev) = port.events.recv().await {
            if let meshgate_overlay::L3Event::Unreachable {
                dst,
                reason: meshgate_overlay::UnreachableReason::NoRoute,
            } = ev
            {
                f.fetch_add(
                    s.destination_unreachable(dst),
                    std::sync::atomic::Ordering::SeqCst,
                );
            }
        }
    });
    let nowhere: Ipv6Addr = "600:dead:beef::1".parse().unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        stack.connect(SocketAddrV6::new(nowhere, 80, 0, 0)),
    )
    .await
    .expect("the connect fails before its timeout")
    .expect_err("no route");
    assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable, "{err}");
    assert!(err.to_string().contains("600:dead:beef::1"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The event handler wakes the connect before it adds to its own count, so the test may see
    // the error first.
    eventually(
        Duration::from_secs(2),
        "the no-route event failed the connect",
        || failed.load(std::sync::atomic::Ordering::SeqCst) >= 1,
    )
    .await;
    eventually(Duration::from_secs(2), "no_route counted", || {
        node.status().counters.no_route >= 1
    })
    .await;
    // The failed socket is gone, and another destination's connect is untouched.
    assert_eq!(
        stack.destination_unreachable("600:aaaa::1".parse().unwrap()),
        0
    );
    stack.shutdown();
    node.shutdown().await;
}
