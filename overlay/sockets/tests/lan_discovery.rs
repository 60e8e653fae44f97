//! Issue 15, item 6: two nodes in two network namespaces joined by a veth pair, with no
//! configured peers, find each other by link-local multicast beacons, link up through the
//! authenticated handshake, and carry a TCP stream between their userspace stacks.

mod common;

use meshgate_overlay::addr::{prefix_of, prefix_string};
use meshgate_overlay::discovery::DiscoveryConfig;
use meshgate_overlay::{Identity, Node, NodeConfig, NodeStatus};
use meshgate_sockets::Stack;
use meshgate_testkit::eventually;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_PORT: u16 = 7;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

async fn start_node(id: Identity, interface: &str) -> Node {
    Node::start(NodeConfig {
        identity: Some(id),
        listen: Some("[::]:0".parse().unwrap()),
        peers: Vec::new(),
        dead_peer_timeout: Duration::from_secs(2),
        hello_interval: Duration::from_millis(300),
        discovery: Some(DiscoveryConfig {
            interfaces: vec![interface.to_string()],
            interval: Duration::from_millis(300),
            ..DiscoveryConfig::default()
        }),
        ..NodeConfig::default()
    })
    .await
    .unwrap()
}

async fn wait_route(node: &Node, to: Ipv6Addr) {
    let want = prefix_string(&prefix_of(&to));
    eventually(Duration::from_secs(30), &format!("a route to {to}"), || {
        node.status()
            .routes
            .iter()
            .any(|r| r.prefix == want && r.next_hop.is_some())
    })
    .await;
}

#[test]
fn nodes_on_one_link_discover_each_other_and_carry_a_stream() {
    let ns_a = netns_or_skip!("disca");
    let ns_b = netns_or_skip!("discb");
    ns_a.veth_to("mgd0", &ns_b, "mgd1").expect("veth pair");
    let (id_a, id_b) = (Identity::generate(), Identity::generate());
    let (addr_a, addr_b) = (id_a.address(), id_b.address());
    // B tells A it is done; A answers once it took its status (the link still up).
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (a_done_tx, a_done_rx) = tokio::sync::oneshot::channel::<()>();

    // A: echoes what a stream sends to overlay port 7, until B is done.
    let a = ns_a.spawn(move || {
        runtime().block_on(async move {
            let node = start_node(id_a, "mgd0").await;
            let port = node.take_l3_port().unwrap();
            let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
            let listener = stack.listen(ECHO_PORT).unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = s.shutdown().await;
                    });
                }
            });
            let _ = tokio::time::timeout(Duration::from_secs(60), done_rx).await;
            let status = node.status();
            let _ = a_done_tx.send(());
            node.shutdown().await;
            status
        })
    });

    // B: no peers either; once discovery linked it to A, a stream goes through.
    let b = ns_b.spawn(move || {
        runtime().block_on(async move {
            let node = start_node(id_b, "mgd1").await;
            let port = node.take_l3_port().unwrap();
            let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
            wait_route(&node, addr_a).await;
            let data = common::pattern(15, 64 * 1024);
            let mut s = stack
                .connect(SocketAddrV6::new(addr_a, ECHO_PORT, 0, 0))
                .await
                .expect("stream to the discovered node");
            let (mut r, mut w) = tokio::io::split(&mut s);
            let sent = data.clone();
            let (wrote, echoed) = tokio::join!(
                async move {
                    w.write_all(&sent).await?;
                    w.shutdown().await
                },
                async move {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).await.map(|_| got)
                }
            );
            wrote.unwrap();
            assert!(
                echoed.unwrap() == data,
                "the echo differs from what was sent"
            );
            let status = node.status();
            let _ = done_tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), a_done_rx).await;
            node.shutdown().await;
            status
        })
    });
    let sb: NodeStatus = b.join().expect("node B's side");
    let sa: NodeStatus = a.join().expect("node A's side");

    // One link between them (only one side dials), over the veth pair's link-local addresses.
    for (name, st, other) in [("A", &sa, addr_b), ("B", &sb, addr_a)] {
        assert_eq!(st.peers.len(), 1, "{name}: {:?}", st.peers);
        let p = &st.peers[0];
        assert_eq!(p.address, other, "{name}");
        match p.remote {
            std::net::SocketAddr::V6(r) => {
                assert_eq!(r.ip().segments()[0], 0xfe80, "{name}: {r}")
            }
            r => panic!("{name}: link from {r}"),
        }
        let d = st.discovery.as_ref().expect("discovery counters");
        assert!(d.beacons_sent > 0, "{name}: {d:?}");
        assert_eq!(d.discovery_key_mismatch, 0, "{name}: {d:?}");
    }
    let dials = |st: &NodeStatus| st.discovery.as_ref().map_or(0, |d| d.discovery_dials);
    assert_eq!(
        dials(&sa) + dials(&sb),
        1,
        "one side dialed, after a beacon"
    );
    let heard = |st: &NodeStatus| st.discovery.as_ref().map_or(0, |d| d.beacons_received);
    assert!(heard(&sa) + heard(&sb) >= 1);
    // Only one side dialed: one link was ever made.
    assert_eq!((sa.counters.links_up, sb.counters.links_up), (1, 1));
}
