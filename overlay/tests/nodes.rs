//! Real nodes over loopback TCP.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use meshgate_overlay::{Identity, L3Event, L3Port, Node, NodeConfig, UnreachableReason};
use meshgate_testkit::{eventually, listener};

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
    eventually(Duration::from_secs(10), "routes", || {
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

fn route_peer(n: &Node, to: Ipv6Addr) -> Option<Ipv6Addr> {
    let st = n.status();
    let p = meshgate_overlay::addr::prefix_string(&meshgate_overlay::addr::prefix_of(&to));
    let hop = st.routes.iter().find(|r| r.prefix == p)?.next_hop?;
    st.peers
        .iter()
        .find(|x| x.link_id == hop)
        .map(|x| x.address)
}

fn tapped(
    listen: bool,
    peers: Vec<SocketAddr>,
) -> (NodeConfig, tokio::sync::mpsc::Receiver<Bytes>) {
    let (tx, rx) = tokio::sync::mpsc::channel(100_000);
    let mut c = cfg(listen, peers);
    c.relay_tap = Some(tx);
    (c, rx)
}

const MARKER: &[u8] = b"PLAINTEXT-MARKER-0123456789";

fn numbered(seq: u32) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    for _ in 0..20 {
        p.extend_from_slice(MARKER);
    }
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A–B–C and A–D–C: relays only ever see ciphertext; killing the relay in use mid-stream,
/// delivery resumes over the other path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_see_only_ciphertext_and_stream_survives_relay_death() {
    let (cb, mut tap_b) = tapped(true, vec![]);
    let (cd, mut tap_d) = tapped(true, vec![]);
    let b = Node::start(cb).await.unwrap();
    let d = Node::start(cd).await.unwrap();
    let relays = vec![b.listen_addr().unwrap(), d.listen_addr().unwrap()];
    // Neither A nor C listens: both are reachable only through their outbound links.
    let a = Node::start(cfg(false, relays.clone())).await.unwrap();
    let c = Node::start(cfg(false, relays)).await.unwrap();
    eventually(Duration::from_secs(10), "routes A<->C", || {
        has_route(&a, c.address()) && has_route(&c, a.address())
    })
    .await;
    let pa = a.take_l3_port().unwrap();
    let mut pc = c.take_l3_port().unwrap();
    let (src, dst) = (a.address(), c.address());

    let mut next = 0u32;
    let mut received = Vec::new();
    // Stream until 50 packets arrived, then kill the relay carrying them.
    let mut pump = async |until: usize, limit_s: u64, received: &mut Vec<u32>, next: &mut u32| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(limit_s);
        while received.len() < until {
            assert!(
                tokio::time::Instant::now() < deadline,
                "stream stalled at {} packets",
                received.len()
            );
            pa.tx
                .send(packet(src, dst, &numbered(*next)))
                .await
                .unwrap();
            *next += 1;
            while let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_millis(5), pc.rx.recv()).await
            {
                assert_eq!(&p[..40], &packet(src, dst, &numbered(0))[..40]);
                assert!(contains(&p, MARKER));
                received.push(u32::from_be_bytes(p[40..44].try_into().unwrap()));
            }
        }
    };
    pump(50, 10, &mut received, &mut next).await;
    let via = route_peer(&a, dst).expect("A has a route to C");
    let (victim, survivor) = if via == b.address() { (b, d) } else { (d, b) };
    assert_eq!(via, victim.address());
    victim.shutdown().await;
    let killed_at = next;
    let t0 = std::time::Instant::now();
    pump(100, 5, &mut received, &mut next).await;
    assert!(
        received.iter().any(|s| *s > killed_at),
        "nothing sent after the kill arrived"
    );
    eprintln!("delivery resumed {:?} after the relay died", t0.elapsed());
    assert_eq!(route_peer(&a, dst), Some(survivor.address()));

    // Whatever the relays forwarded: packets, never the plaintext.
    let mut forwarded = 0;
    for tap in [&mut tap_b, &mut tap_d] {
        while let Ok(p) = tap.try_recv() {
            forwarded += 1;
            assert!(!contains(&p, MARKER), "a relay saw plaintext");
        }
    }
    assert!(forwarded >= 100, "relays forwarded {forwarded} packets");
    a.shutdown().await;
    c.shutdown().await;
    survivor.shutdown().await;
}

mod hostile {
    use super::*;
    use meshgate_overlay::link;
    use meshgate_overlay::wire::{self, Control, FrameKind, RouteUpdate};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn counter(n: &Node, what: &str, f: impl Fn(&meshgate_overlay::core::Counters) -> u64) {
        eventually(Duration::from_secs(5), what, || f(&n.status().counters) > 0).await;
    }

    /// Reads until EOF (the node closed the link); fails if it stays open.
    async fn closed(s: &mut TcpStream) {
        let mut buf = [0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(r.is_ok(), "node kept a hostile link open");
    }

    /// A–B–C plus attackers connecting to C: every attack is refused and counted, and
    /// A still reaches C afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_peers_are_refused_and_counted() {
        let (cb, mut tap_b) = tapped(true, vec![]);
        let b = Node::start(cb).await.unwrap();
        let c = Node::start(cfg(true, vec![b.listen_addr().unwrap()]))
            .await
            .unwrap();
        let a_id = Identity::generate();
        let mut ca = cfg(false, vec![b.listen_addr().unwrap()]);
        ca.identity = Some(a_id.clone());
        let a = Node::start(ca).await.unwrap();
        eventually(Duration::from_secs(10), "routes", || {
            has_route(&a, c.address()) && has_route(&c, a.address())
        })
        .await;
        let mut pa = a.take_l3_port().unwrap();
        let mut pc = c.take_l3_port().unwrap();
        exchange(&mut pa, &mut pc, b"before the attacks").await;
        let c_addr = c.listen_addr().unwrap();

        // 1. Random bytes on the link port.
        let mut s = TcpStream::connect(c_addr).await.unwrap();
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let _ = s.write_all(&junk).await;
        closed(&mut s).await;
        counter(&c, "garbage counted", |k| {
            k.handshake_failed + k.bad_frame + k.oversized_frame
        })
        .await;

        // 2. Wrong key: claims A's identity with its own Noise static key.
        let mallory = Identity::generate();
        let mut s = TcpStream::connect(c_addr).await.unwrap();
        let r = link::handshake_claiming(&mut s, &mallory, &a_id.public_key(), true).await;
        // Either side may notice first; the node must refuse and count it.
        drop(r);
        counter(&c, "identity mismatch counted", |k| k.identity_mismatch).await;

        // 3. Oversized frame after a valid handshake.
        let mut s = TcpStream::connect(c_addr).await.unwrap();
        let (_t, key) = link::handshake(&mut s, &mallory, true).await.unwrap();
        assert_eq!(key, link_key(&c));
        let mut h = [0u8; 5];
        h[..4].copy_from_slice(&(10u32 << 20).to_be_bytes());
        h[4] = FrameKind::Packet as u8;
        s.write_all(&h).await.unwrap();
        closed(&mut s).await;
        counter(&c, "oversized frame counted", |k| k.oversized_frame).await;

        // 4. Forged routes for A's prefix: wrong key for the prefix, and a bad signature.
        let mut s = TcpStream::connect(c_addr).await.unwrap();
        let (mut t, _) = link::handshake(&mut s, &mallory, true).await.unwrap();
        // Answer C's first Hello: a link joins routing once its RTT is known.
        loop {
            let (kind, body) = link::read_frame(&mut s).await.unwrap().unwrap();
            if kind != FrameKind::Control {
                continue;
            }
            if let Control::Hello { timestamp_us } = link::open_control(&mut t, &body).unwrap() {
                let ack = Control::HelloAck {
                    echo_us: timestamp_us,
                };
                s.write_all(&link::seal_control(&mut t, &ack).unwrap())
                    .await
                    .unwrap();
                break;
            }
        }
        let a_prefix = meshgate_overlay::addr::prefix_of(&a.address());
        let forged = vec![
            RouteUpdate {
                prefix: a_prefix,
                seqno: u64::MAX / 2,
                metric: 0,
                router_key: mallory.public_key(),
                signature: mallory.sign(b"x"),
            },
            RouteUpdate {
                prefix: a_prefix,
                seqno: u64::MAX / 2,
                metric: 0,
                router_key: a_id.public_key(),
                signature: mallory.sign(b"x"),
            },
        ];
        let frame = link::seal_control(&mut t, &Control::Updates(forged)).unwrap();
        s.write_all(&frame).await.unwrap();
        counter(&c, "forged prefix counted", |k| k.routing.forged_prefix).await;
        counter(&c, "bad signature counted", |k| k.routing.bad_signature).await;
        assert_eq!(
            route_peer(&c, a.address()),
            Some(b.address()),
            "C must still route to A via B"
        );

        // 5. A replayed data packet (captured at relay B) injected into C.
        while tap_b.try_recv().is_ok() {}
        exchange(&mut pa, &mut pc, b"to be replayed").await;
        let mut captured = None;
        while let Ok(p) = tap_b.try_recv() {
            if p[0] == wire::PKT_DATA && p[18..34] == c.address().octets() {
                captured = Some(p);
            }
        }
        let captured = captured.expect("B forwarded A's data packet");
        s.write_all(&wire::encode_frame(FrameKind::Packet, &captured))
            .await
            .unwrap();
        counter(&c, "replay counted", |k| k.e2e_replayed).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), pc.rx.recv())
                .await
                .is_err(),
            "replay was delivered"
        );

        // The attacker's link is now silent: it is declared dead within the timeout (2 s).
        let t0 = std::time::Instant::now();
        closed(&mut s).await;
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "silent peer kept for {:?}",
            t0.elapsed()
        );
        counter(&c, "dead peer counted", |k| k.dead_peers).await;

        // The node keeps serving.
        exchange(&mut pa, &mut pc, b"after the attacks").await;
        exchange(&mut pc, &mut pa, b"and back").await;
        a.shutdown().await;
        b.shutdown().await;
        c.shutdown().await;
    }

    /// Issue 13, item 1: a peer links in with a fresh key, floods Hellos and never reads the
    /// answers. Its link's queue stays bounded, the link is closed once its socket takes
    /// nothing for the write-stall timeout, and meanwhile the node keeps taking packets from
    /// its L3 port and carrying them on its other links.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_reads_stalls_only_its_own_link() {
        let mut ca = cfg(true, vec![]);
        ca.limits.write_stall_timeout = 3_000_000;
        let a = Node::start(ca).await.unwrap();
        let b = Node::start(cfg(false, vec![a.listen_addr().unwrap()]))
            .await
            .unwrap();
        eventually(Duration::from_secs(10), "routes", || {
            has_route(&a, b.address()) && has_route(&b, a.address())
        })
        .await;
        let mut pa = a.take_l3_port().unwrap();
        let mut pb = b.take_l3_port().unwrap();
        exchange(&mut pa, &mut pb, b"before").await;

        // The attacker, on a runtime of its own (another machine): a small receive buffer, a
        // valid handshake, then only writes.
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = sent.clone();
        let target = a.listen_addr().unwrap();
        let flood = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.set_recv_buffer_size(4096).unwrap();
                let mut s = sock.connect(target).await.unwrap();
                let (mut t, _) = link::handshake(&mut s, &Identity::generate(), true)
                    .await
                    .unwrap();
                // Paced (50,000 a second, below what the node answers) so that the answers
                // fill the kernel's buffers rather than being dropped from the link's queue
                // at once. Bounded: at most 400,000 Hellos, until the node closes the link.
                for batch in 0..400u64 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let mut buf = Vec::new();
                    for k in 0..1000 {
                        let hello = Control::Hello {
                            timestamp_us: batch * 1000 + k,
                        };
                        buf.extend_from_slice(&link::seal_control(&mut t, &hello).unwrap());
                    }
                    if s.write_all(&buf).await.is_err() {
                        return;
                    }
                    counted.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
                }
            })
        });
        eventually(Duration::from_secs(10), "the flood is under way", || {
            a.status().counters.link_control_drops > 0
        })
        .await;
        // The L3 port and the other link keep working, promptly, while the attacker's link
        // is full and still up.
        for k in 0..5u8 {
            let t0 = std::time::Instant::now();
            exchange(&mut pa, &mut pb, &[b'a', k]).await;
            exchange(&mut pb, &mut pa, &[b'b', k]).await;
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "slow: {:?}",
                t0.elapsed()
            );
        }
        assert_eq!(a.status().peers.len(), 2, "the stalled link is still there");
        eventually(Duration::from_secs(20), "stalled link closed", || {
            a.status().counters.link_write_stalls == 1
        })
        .await;
        eventually(Duration::from_secs(10), "the flood ends", || {
            flood.is_finished()
        })
        .await;
        flood.join().unwrap();
        let c = a.status().counters;
        eprintln!(
            "{} Hellos sent, {} answers dropped",
            sent.load(std::sync::atomic::Ordering::Relaxed),
            c.link_control_drops
        );
        assert_eq!(c.link_queue_drops, 0, "no packet of the good link dropped");
        exchange(&mut pa, &mut pb, b"after").await;
        a.shutdown().await;
        b.shutdown().await;
    }

    fn link_key(n: &Node) -> [u8; 32] {
        meshgate_overlay::identity::decode_hex32(&n.status().public_key).unwrap()
    }
}

/// Packets the node must not carry are refused and counted; no route gives a typed event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_packets_are_checked_and_unroutable_ones_answered() {
    let a = Node::start(cfg(true, vec![])).await.unwrap();
    let mut pa = a.take_l3_port().unwrap();
    let me = a.address();
    let stranger: Ipv6Addr = "7ab:cdef::1".parse().unwrap();
    // Wrong source, destination outside the overlay, garbage: counted and dropped.
    pa.tx
        .send(packet("600::1".parse().unwrap(), stranger, b"spoofed"))
        .await
        .unwrap();
    pa.tx
        .send(packet(me, "2001:db8::1".parse().unwrap(), b"outside"))
        .await
        .unwrap();
    pa.tx.send(Bytes::from_static(b"not ipv6")).await.unwrap();
    // No route: a typed "unreachable" event comes back (no packet bytes).
    let p = packet(me, stranger, b"nobody home");
    pa.tx.send(p.clone()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(2), pa.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        L3Event::Unreachable {
            dst: stranger,
            reason: UnreachableReason::NoRoute
        }
    );
    assert!(pa.rx.try_recv().is_err(), "no ICMPv6 bytes on the port");
    eventually(Duration::from_secs(5), "counters", || {
        let c = a.status().counters;
        c.local_bad_source == 1
            && c.local_bad_destination == 1
            && c.local_bad_packet == 1
            && c.no_route == 1
    })
    .await;
    a.shutdown().await;
}

/// Key files: created 0600 on first start, refused when readable by others.
#[tokio::test]
async fn node_key_file_rules() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("node.key");
    let c = NodeConfig {
        key_path: key_path.clone(),
        ..NodeConfig::default()
    };
    let n = Node::start(c.clone()).await.unwrap();
    let addr = n.address();
    n.shutdown().await;
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let n = Node::start(c.clone()).await.unwrap();
    assert_eq!(n.address(), addr, "same key, same address");
    n.shutdown().await;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = Node::start(c)
        .await
        .err()
        .expect("group-readable key refused")
        .to_string();
    assert!(
        err.contains("node.key") && err.contains("chmod 600"),
        "{err}"
    );
}

/// Dialers keep retrying with backoff: a peer that comes up late, or restarts, is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialer_reconnects_to_late_and_restarted_peers() {
    // Until the peer comes up, its port belongs to a listener that closes every connection
    // unanswered: each accept is one failed attempt of the dialer.
    let (squatter, port) = listener().await;
    let mut ca = cfg(false, vec![port]);
    ca.reconnect_max = Duration::from_millis(800);
    let a = Node::start(ca).await.unwrap();
    for attempt in 1..=3 {
        let (s, _) = tokio::time::timeout(Duration::from_secs(5), squatter.accept())
            .await
            .unwrap_or_else(|_| panic!("dial attempt {attempt} never came"))
            .unwrap();
        drop(s);
    }
    drop(squatter);
    let mut cb = cfg(true, vec![]);
    cb.listen = Some(port);
    let b = Node::start(cb.clone()).await.unwrap();
    eventually(Duration::from_secs(5), "route to late peer", || {
        has_route(&a, b.address())
    })
    .await;
    let b_addr = b.address();
    b.shutdown().await;
    eventually(Duration::from_secs(5), "route withdrawn", || {
        !has_route(&a, b_addr) && a.status().peers.is_empty()
    })
    .await;
    cb.identity = Some(Identity::generate());
    let b2 = Node::start(cb).await.unwrap();
    eventually(Duration::from_secs(5), "route to restarted peer", || {
        has_route(&a, b2.address())
    })
    .await;
    assert!(a.status().counters.links_up >= 2);
    a.shutdown().await;
    b2.shutdown().await;
}

/// A node configured with its own address as a peer refuses the link to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_self_is_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = cfg(true, vec![port]);
    c.listen = Some(port);
    let a = Node::start(c).await.unwrap();
    eventually(Duration::from_secs(5), "self link refused", || {
        a.status().counters.self_links >= 2
    })
    .await;
    assert!(a.status().peers.is_empty());
    assert!(a.status().routes.is_empty());
    a.shutdown().await;
}

/// Node A linked to node B, whose key lives in a file under `dir`; a packet exchanged, then B
/// shut down. Returns A, A's L3 port, B's config (to restart it with the same key) and B's
/// address.
async fn pair_with_restartable_peer(dir: &std::path::Path) -> (Node, L3Port, NodeConfig, Ipv6Addr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cb = cfg(true, vec![]);
    cb.identity = None;
    cb.key_path = dir.join("node.key");
    cb.listen = Some(port);
    let b = Node::start(cb.clone()).await.unwrap();
    let mut ca = cfg(false, vec![port]);
    ca.reconnect_max = Duration::from_millis(500);
    let a = Node::start(ca).await.unwrap();
    let b_addr = b.address();
    eventually(Duration::from_secs(10), "routes", || {
        has_route(&a, b_addr) && has_route(&b, a.address())
    })
    .await;
    let mut pa = a.take_l3_port().unwrap();
    let mut pb = b.take_l3_port().unwrap();
    exchange(&mut pa, &mut pb, b"before the restart").await;
    drop(pb);
    b.shutdown().await;
    (a, pa, cb, b_addr)
}

/// A peer restarts with the same key file while the other end still holds a session with its
/// previous run: one-way traffic resumes within seconds (the restarted node answers the
/// stale session's data with a signed unknown-session notice and the sender re-initiates),
/// instead of being black-holed until the old session expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_resumes_after_a_peer_restarts_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut pa, cb, b_addr) = pair_with_restartable_peer(dir.path()).await;
    eventually(Duration::from_secs(5), "link down", || {
        a.status().peers.is_empty()
    })
    .await;

    let b2 = Node::start(cb).await.unwrap();
    assert_eq!(b2.address(), b_addr, "same key file, same address");
    let mut pb2 = b2.take_l3_port().unwrap();
    eventually(Duration::from_secs(10), "routes after the restart", || {
        has_route(&a, b_addr) && has_route(&b2, a.address())
    })
    .await;
    // Only A sends: nothing from B2 would otherwise replace A's stale session.
    let t0 = std::time::Instant::now();
    let mut seq = 0u32;
    let got = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no delivery {:?} after the restart (counters: {:?})",
            t0.elapsed(),
            b2.status().counters
        );
        seq += 1;
        pa.tx
            .send(packet(a.address(), b_addr, &seq.to_be_bytes()))
            .await
            .unwrap();
        while pa.rx.try_recv().is_ok() {}
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(50), pb2.rx.recv()).await {
            break p;
        }
    };
    eprintln!("delivery resumed {:?} after the restart", t0.elapsed());
    assert_eq!(&got[8..40], &packet(a.address(), b_addr, b"")[8..40]);
    // Status snapshots lag by up to 100 ms.
    eventually(Duration::from_secs(2), "notice counted", || {
        let k = b2.status().counters;
        k.e2e_unknown_session >= 1 && k.e2e_unknown_notices_sent >= 1
    })
    .await;
    eventually(Duration::from_secs(2), "reset counted", || {
        a.status().counters.e2e_sessions_reset == 1
    })
    .await;
    a.shutdown().await;
    b2.shutdown().await;
}

/// A packet sent while the peer is gone finds no route: the sender forgets the session, so
/// the first packet after the peer is back (same key) starts a new handshake behind which it
/// waits, and arrives — no stale-session round trip, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_packet_after_a_same_key_restart_arrives_when_the_route_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut pa, cb, b_addr) = pair_with_restartable_peer(dir.path()).await;
    eventually(Duration::from_secs(5), "route gone", || {
        !has_route(&a, b_addr)
    })
    .await;
    pa.tx
        .send(packet(a.address(), b_addr, b"while gone"))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(2), pa.events.recv())
        .await
        .expect("an unreachable while the peer is gone")
        .unwrap();
    assert_eq!(
        ev,
        L3Event::Unreachable {
            dst: b_addr,
            reason: UnreachableReason::NoRoute
        }
    );

    let b2 = Node::start(cb).await.unwrap();
    let mut pb2 = b2.take_l3_port().unwrap();
    eventually(Duration::from_secs(10), "routes after the restart", || {
        has_route(&a, b_addr) && has_route(&b2, a.address())
    })
    .await;
    pa.tx
        .send(packet(a.address(), b_addr, b"first after"))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), pb2.rx.recv())
        .await
        .expect("the first packet after the restart arrives")
        .unwrap();
    assert!(got.ends_with(b"first after"));
    assert_eq!(
        a.status().counters.e2e_sessions_reset,
        0,
        "no stale session used"
    );
    a.shutdown().await;
    b2.shutdown().await;
}

/// When the L3 port's reader lags, packets beyond the delivery backlog are dropped and
/// counted, not lost silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_backlog_overflow_is_counted() {
    let mut c = cfg(true, vec![]);
    c.l3_queue = 1;
    let a = Node::start(c).await.unwrap();
    let pa = a.take_l3_port().unwrap();
    let me = a.address();
    let sent = 5_000u64;
    for k in 0..sent {
        // Addressed to ourselves: delivered straight back to the (unread) L3 port.
        pa.tx.send(packet(me, me, &k.to_be_bytes())).await.unwrap();
    }
    eventually(Duration::from_secs(5), "all packets handled", || {
        a.status().counters.packets_delivered == sent
    })
    .await;
    // One packet sits in the port's channel, 4096 in the backlog; the rest are counted.
    let drops = a.status().counters.deliver_backlog_drops;
    assert_eq!(drops, sent - 1 - 4096);
    // The node's task took them in rounds of 1 to 65.
    let rounds = a.status().counters.local_rounds;
    assert!(
        (sent.div_ceil(65)..=sent).contains(&rounds),
        "{rounds} rounds for {sent} packets"
    );
    drop(pa);
    a.shutdown().await;
}

/// Connections that never finish their handshake hold at most MAX_INBOUND_HANDSHAKES slots:
/// further ones are closed at once and counted; once the idle ones go, peers link up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inbound_handshakes_are_capped() {
    use meshgate_overlay::node::MAX_INBOUND_HANDSHAKES;
    use tokio::io::AsyncReadExt;
    let a = Node::start(cfg(true, vec![])).await.unwrap();
    let port = a.listen_addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..MAX_INBOUND_HANDSHAKES {
        idle.push(tokio::net::TcpStream::connect(port).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(port).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection beyond the cap was kept: {closed:?}"
    );
    eventually(Duration::from_secs(2), "refusal counted", || {
        a.status().counters.handshakes_refused >= 1
    })
    .await;
    // The idle connections go away (their handshakes fail): a real peer links up.
    drop(idle);
    let b = Node::start(cfg(false, vec![port])).await.unwrap();
    eventually(Duration::from_secs(10), "route after the flood", || {
        has_route(&b, a.address())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A node with neither a listener nor peers (nothing to link to yet) keeps its L3 port
/// working: packets to its own address come back.
///
/// Paused time: the sleep lets the node's tasks run until they wait (a core task that lost
/// its event channel has exited by then), without a real delay.
#[tokio::test(start_paused = true)]
async fn node_without_links_keeps_serving_its_l3_port() {
    let a = Node::start(cfg(false, vec![])).await.unwrap();
    let mut pa = a.take_l3_port().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = packet(a.address(), a.address(), b"to myself");
    pa.tx
        .send(p.clone())
        .await
        .expect("core task still running");
    let got = tokio::time::timeout(Duration::from_secs(2), pa.rx.recv())
        .await
        .expect("delivery timed out");
    assert_eq!(got, Some(p));
    a.shutdown().await;
}

/// Issue 15, item 7: a peer given by name is resolved again before every attempt, so a peer
/// that moves to another address (same key, new address behind the same name) is found again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_peer_is_resolved_again_and_found_after_it_moves() {
    use std::sync::{Arc, Mutex};
    let key = Identity::generate();
    let mut cb = cfg(true, vec![]);
    cb.identity = Some(key.clone());
    let b = Node::start(cb.clone()).await.unwrap();
    // What `peer.example:9651` resolves to; the test moves it.
    let points_to = Arc::new(Mutex::new(vec![b.listen_addr().unwrap()]));
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let resolver = {
        let (points_to, asked) = (points_to.clone(), asked.clone());
        meshgate_overlay::node::PeerResolver::new(move |name| {
            asked.lock().unwrap().push(name);
            let addrs = points_to.lock().unwrap().clone();
            Box::pin(async move { Ok(addrs) })
        })
    };
    let mut ca = cfg(false, vec![]);
    ca.named_peers = vec!["peer.example:9651".into()];
    ca.resolver = Some(resolver);
    ca.reconnect_max = Duration::from_millis(400);
    let a = Node::start(ca).await.unwrap();
    eventually(Duration::from_secs(10), "route to the named peer", || {
        has_route(&a, b.address())
    })
    .await;
    assert_eq!(asked.lock().unwrap().as_slice(), ["peer.example:9651"]);
    // The peer moves: same key, another port; its old address now refuses connections.
    b.shutdown().await;
    let mut cb2 = cb.clone();
    cb2.listen = Some("127.0.0.1:0".parse().unwrap());
    let b2 = Node::start(cb2).await.unwrap();
    *points_to.lock().unwrap() = vec![b2.listen_addr().unwrap()];
    eventually(Duration::from_secs(10), "link to the moved peer", || {
        a.status()
            .peers
            .iter()
            .any(|p| Some(p.remote) == b2.listen_addr() && p.state == "up")
    })
    .await;
    assert!(
        asked.lock().unwrap().len() >= 2,
        "resolved once per attempt"
    );
    assert!(has_route(&a, key.address()));
    a.shutdown().await;
    b2.shutdown().await;
}

/// Issue 15, item 7: `localhost:PORT` through the system resolver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_named_localhost_links_up() {
    let b = Node::start(cfg(true, vec![])).await.unwrap();
    let mut ca = cfg(false, vec![]);
    ca.named_peers = vec![format!("localhost:{}", b.listen_addr().unwrap().port())];
    let a = Node::start(ca).await.unwrap();
    eventually(Duration::from_secs(10), "route via localhost", || {
        has_route(&a, b.address()) && has_route(&b, a.address())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}
