//! Real nodes over loopback TCP.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use meshgate_overlay::{Identity, L3Port, Node, NodeConfig};

fn packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Bytes {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(59);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    Bytes::from(p)
}

fn cfg(listen: bool, peers: Vec<SocketAddr>) -> NodeConfig {
    NodeConfig {
        identity: Some(Identity::generate()),
        listen: listen.then(|| "127.0.0.1:0".parse().unwrap()),
        peers,
        dead_peer_timeout: Duration::from_secs(2),
        hello_interval: Duration::from_millis(200),
        ..NodeConfig::default()
    }
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has_route(n: &Node, to: Ipv6Addr) -> bool {
    let p = meshgate_overlay::addr::prefix_string(&meshgate_overlay::addr::prefix_of(&to));
    n.status()
        .routes
        .iter()
        .any(|r| r.prefix == p && r.feasible)
}

/// Sends `payload` from a to b until one arrives (sessions and routes settle first).
async fn exchange(a: &mut L3Port, b: &mut L3Port, payload: &[u8]) {
    let p = packet(a.address, b.address, payload);
    a.tx.send(p.clone()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), b.rx.recv())
        .await
        .expect("delivery timed out")
        .unwrap();
    assert_eq!(got, p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_packets_both_ways() {
    let b = Node::start(cfg(true, vec![])).await.unwrap();
    let a = Node::start(cfg(false, vec![b.listen_addr().unwrap()]))
        .await
        .unwrap();
    wait_for("routes", 10, || {
        has_route(&a, b.address()) && has_route(&b, a.address())
    })
    .await;
    let mut pa = a.take_l3_port().unwrap();
    let mut pb = b.take_l3_port().unwrap();
    assert!(a.take_l3_port().is_none());
    exchange(&mut pa, &mut pb, b"hello over the overlay").await;
    // b has no route to a except through a's own outbound link (a has no listener).
    exchange(&mut pb, &mut pa, b"and back").await;
    let big = vec![7u8; a.mtu() - 40];
    exchange(&mut pa, &mut pb, &big).await;
    let st = a.status();
    assert_eq!(st.peers.len(), 1);
    assert!(
        serde_json::to_string(&st)
            .unwrap()
            .contains(&a.address().to_string())
    );
    a.shutdown().await;
    b.shutdown().await;
}
