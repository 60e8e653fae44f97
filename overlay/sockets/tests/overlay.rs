//! The userspace stack on real overlay nodes linked over loopback TCP.

mod common;

use meshgate_overlay::addr::{prefix_of, prefix_string};
use meshgate_overlay::{Identity, Node, NodeConfig};
use meshgate_sockets::{Stack, StackConfig};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const GIB: u64 = 1 << 30;

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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if node
            .status()
            .routes
            .iter()
            .any(|r| r.prefix == want && r.next_hop.is_some())
        {
            return;
        }
        assert!(Instant::now() < deadline, "no route to {to} after 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
async fn debug_three_hops_small() {
    transfer_over_chain(3, 64 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_one_hop() {
    transfer_over_chain(1, GIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_three_hops() {
    transfer_over_chain(3, GIB).await;
}
