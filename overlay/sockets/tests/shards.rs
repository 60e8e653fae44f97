//! The stack's shards: connections spread over them, every packet reaches its connection's
//! shard (inbound segments, the replies to our own connects), and malformed packets are
//! harmless.

mod common;

use bytes::Bytes;
use common::pattern;
use meshgate_sockets::{Stack, StackConfig};
use meshgate_testkit::eventually;
use std::collections::HashSet;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const A: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0xa);
const B: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0xb);
const TCP: u8 = 6;
const ICMPV6: u8 = 58;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn wire(mtu: usize, config: StackConfig) -> (Stack, Stack) {
    let (a_tx, b_rx) = mpsc::channel(256);
    let (b_tx, a_rx) = mpsc::channel(256);
    (
        Stack::with_config(A, mtu, a_tx, a_rx, config.clone()),
        Stack::with_config(B, mtu, b_tx, b_rx, config),
    )
}

/// Shards holding at least one connection, and how many shards there are.
fn shards_in_use(stack: &Stack) -> (usize, usize) {
    let per_shard = stack.connections_per_shard();
    (
        per_shard.iter().filter(|&&n| n > 0).count(),
        per_shard.len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_over_shards_intact() {
    let config = StackConfig {
        socket_buffer: 64 * 1024,
        ..StackConfig::default()
    };
    let (a, b) = wire(16384, config);
    let listener = b.listen(8080).unwrap();
    const STREAMS: usize = 300;
    const SIZE: usize = 96 * 1024;
    // The server echoes every stream back; all stay open until every stream has been
    // accepted and has echoed, so the shards are counted with all connections present.
    let all_done = Arc::new(tokio::sync::Barrier::new(2 * STREAMS + 1));
    let server_done = all_done.clone();
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().await.unwrap();
            let done = server_done.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut total = 0;
                while total < SIZE {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "early EOF");
                    s.write_all(&buf[..n]).await.unwrap();
                    total += n;
                }
                done.wait().await;
                drop(s);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let data = Arc::new(pattern(11, SIZE + STREAMS));
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let a = a.clone();
        let data = data.clone();
        let done = all_done.clone();
        clients.push(tokio::spawn(async move {
            let c = a.connect(SocketAddrV6::new(B, 8080, 0, 0)).await.unwrap();
            let (mut r, mut w) = tokio::io::split(c);
            let mine = &data[i..i + SIZE];
            let (_, echoed) = tokio::join!(async { w.write_all(mine).await.unwrap() }, async {
                let mut echoed = vec![0u8; SIZE];
                r.read_exact(&mut echoed).await.unwrap();
                echoed
            });
            assert!(echoed == mine, "stream {i} corrupted");
            done.wait().await;
        }));
    }
    let check = tokio::spawn(async move {
        all_done.wait().await;
        (shards_in_use(&a), shards_in_use(&b))
    });
    let ((a_used, shards), (b_used, _)) = tokio::time::timeout(Duration::from_secs(60), check)
        .await
        .expect("streams stalled")
        .unwrap();
    // 300 connections hashed over the shards leave (almost surely) none of them empty; one
    // interface for everything would show as a single shard in use.
    assert!(shards > 1, "the stack is not sharded");
    assert!(
        a_used * 4 >= shards * 3 && b_used * 4 >= shards * 3,
        "connections not spread: client uses {a_used}, server {b_used} of {shards} shards"
    );
    for c in clients {
        c.await.unwrap();
    }
    server.await.unwrap();
}

/// An IPv6 packet from `src` to `dst` carrying `payload` as protocol `next`.
fn ipv6(next: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP segment without options or data, checksummed for `src` → `dst`.
fn tcp_segment(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ports: (u16, u16),
    seq: u32,
    ack: u32,
    flags: u8,
) -> Vec<u8> {
    tcp_segment_carrying(src, dst, ports, (seq, ack), flags, &[])
}

/// A TCP segment without options carrying `data`, checksummed for `src` → `dst`.
fn tcp_segment_carrying(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ports: (u16, u16),
    (seq, ack): (u32, u32),
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&ports.0.to_be_bytes());
    t[2..4].copy_from_slice(&ports.1.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(data);
    let mut sum = 0u32;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(t.len() as u32).to_be_bytes());
    add(&[0, 0, 0, TCP]);
    add(&t);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    t[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    t
}

/// (source port, destination port, sequence number, flags) of a TCP segment the stack sent.
fn parse_tcp(packet: &[u8]) -> Option<(u16, u16, u32, u8)> {
    if packet.len() < 60 || packet[6] != TCP {
        return None;
    }
    let t = &packet[40..];
    Some((
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        t[13],
    ))
}

/// A SYN the stack sent: (source port, destination port, sequence number).
fn parse_syn(packet: &[u8]) -> Option<(u16, u16, u32)> {
    let (src, dst, seq, flags) = parse_tcp(packet)?;
    (flags & (SYN | ACK) == SYN).then_some((src, dst, seq))
}

/// A stack at `addr` whose L3 port a test plays by hand: (stack, what it sends, what to
/// send it).
fn raw_peer_of(
    addr: Ipv6Addr,
    config: StackConfig,
    queue: usize,
) -> (Stack, mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>) {
    let (stack_tx, from_stack) = mpsc::channel::<Bytes>(queue);
    let (to_stack, stack_rx) = mpsc::channel::<Bytes>(queue);
    (
        Stack::with_config(addr, 1400, stack_tx, stack_rx, config),
        from_stack,
        to_stack,
    )
}

/// A hand-written peer answers the SYNs of many concurrent connects: each SYN-ACK must reach
/// the shard holding the connecting socket (the shard its local port was picked for), or the
/// stack resets it and the connect times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_replies_reach_their_shard() {
    let config = StackConfig {
        connect_timeout: Duration::from_secs(3),
        ..StackConfig::default()
    };
    let (a, mut peer_rx, peer_tx) = raw_peer_of(A, config, 1024);
    const CONNECTS: u16 = 128;
    let mut connects = Vec::new();
    for i in 0..CONNECTS {
        let a = a.clone();
        connects.push(tokio::spawn(async move {
            a.connect(SocketAddrV6::new(B, 2000 + i, 0, 0)).await
        }));
    }
    let mut answered = HashSet::new();
    let peer = tokio::spawn(async move {
        let mut resets = 0;
        while answered.len() < usize::from(CONNECTS) {
            let packet = tokio::time::timeout(Duration::from_secs(5), peer_rx.recv())
                .await
                .expect("the stack stopped sending SYNs")
                .expect("stack gone");
            if packet.len() > 53 && packet[6] == TCP && packet[40 + 13] & 0x04 != 0 {
                resets += 1;
            }
            let Some((local_port, remote_port, seq)) = parse_syn(&packet) else {
                continue;
            };
            if !answered.insert(local_port) {
                continue;
            }
            let reply = tcp_segment(
                B,
                A,
                (remote_port, local_port),
                7_000_000,
                seq.wrapping_add(1),
                SYN | ACK,
            );
            peer_tx
                .send(Bytes::from(ipv6(TCP, B, A, &reply)))
                .await
                .unwrap();
        }
        // Keep the channels open until every connect returned.
        (peer_rx, peer_tx, resets)
    });
    let mut ports = HashSet::new();
    for c in connects {
        let stream = c
            .await
            .unwrap()
            .expect("connect whose SYN-ACK was answered");
        ports.insert(stream.local_addr().port());
    }
    assert_eq!(ports.len(), usize::from(CONNECTS));
    let (_rx, _tx, resets) = peer.await.unwrap();
    assert_eq!(resets, 0, "a SYN-ACK reached a shard without its socket");
    let (used, shards) = shards_in_use(&a);
    assert!(used > shards / 2, "connects used {used} of {shards} shards");
}

/// Truncated and garbage packets (to the demultiplexer and to smoltcp) change nothing: an open
/// stream keeps working and new connections are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_harmless() {
    let (b_tx, mut from_b) = mpsc::channel::<Bytes>(1024);
    let (to_b, b_rx) = mpsc::channel::<Bytes>(1024);
    let b = Stack::new(B, 1400, b_tx, b_rx);
    let (a_tx, mut from_a) = mpsc::channel::<Bytes>(1024);
    let (to_a, a_rx) = mpsc::channel::<Bytes>(1024);
    let a = Stack::new(A, 1400, a_tx, a_rx);
    // The wire between them; the test injects extra packets toward B on `inject`.
    let inject = to_b.clone();
    tokio::spawn(async move {
        while let Some(p) = from_a.recv().await {
            if to_b.send(p).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(p) = from_b.recv().await {
            if to_a.send(p).await.is_err() {
                return;
            }
        }
    });
    let listener = b.listen(80).unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut c = a.connect(SocketAddrV6::new(B, 80, 0, 0)).await.unwrap();
    let port = c.local_addr().port();

    let syn = tcp_segment(A, B, (port, 80), 1, 0, SYN);
    let segment = ipv6(TCP, A, B, &syn);
    let quoted = {
        let mut icmp = vec![1, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&ipv6(TCP, B, A, &tcp_segment(B, A, (80, port), 1, 1, ACK)));
        ipv6(ICMPV6, A, B, &icmp)
    };
    let mut bad: Vec<Vec<u8>> = vec![Vec::new(), vec![0x60], vec![0xff; 39], vec![0x60; 40]];
    for len in 0..segment.len() {
        bad.push(segment[..len].to_vec());
    }
    for len in 0..quoted.len() {
        bad.push(quoted[..len].to_vec());
    }
    // An extension header whose length runs past the end, and one that never ends.
    bad.push(ipv6(0, A, B, &[TCP, 200, 0, 0, 0, 0, 0, 0]));
    bad.push(ipv6(0, A, B, &[0; 64]));
    // An IPv6 header that claims more payload than there is.
    let mut lying = segment.clone();
    lying[4..6].copy_from_slice(&5000u16.to_be_bytes());
    bad.push(lying);
    // Deterministic garbage, half of it with an IPv6 version nibble.
    for (i, seed) in (0..300u64).enumerate() {
        let mut p = pattern(seed, 1 + (seed as usize * 7) % 120);
        if i % 2 == 0 {
            p[0] = 0x60;
            if p.len() > 6 {
                p[6] = [TCP, ICMPV6, 0, 43, 44, 60][i % 6];
            }
        }
        bad.push(p);
    }
    for p in bad {
        inject.send(Bytes::from(p)).await.unwrap();
    }

    // The established stream still works and so do new connections.
    let mut echoed = [0u8; 5];
    c.write_all(b"hello").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut echoed))
        .await
        .expect("stream stalled after malformed packets")
        .unwrap();
    assert_eq!(&echoed, b"hello");
    let mut d = tokio::time::timeout(
        Duration::from_secs(5),
        a.connect(SocketAddrV6::new(B, 80, 0, 0)),
    )
    .await
    .expect("connect stalled")
    .unwrap();
    d.write_all(b"again").await.unwrap();
    d.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"again");
    server.abort();
}

/// The next SYN-ACK the stack sends to `port`: its sequence number.
async fn syn_ack_to(rx: &mut mpsc::Receiver<Bytes>, port: u16) -> u32 {
    loop {
        let packet = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no SYN-ACK within 5 s")
            .expect("stack gone");
        if let Some((_, dst, seq, flags)) = parse_tcp(&packet)
            && dst == port
            && flags & (SYN | ACK) == SYN | ACK
        {
            return seq;
        }
    }
}

/// A retransmitted SYN (its SYN-ACK was slow or lost) must reach the socket that already holds
/// the connection, never a spare listening socket: smoltcp offers segments to sockets in slot
/// order, and after churn the spare sits in a lower slot than the connection. Before the stack
/// dropped such SYNs, the spare opened a second socket for the same connection; the peer's ACK
/// and data then went to that one, and the accepted stream never saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmitted_syn_does_not_open_a_second_socket() {
    let (b, mut peer_rx, peer_tx) = raw_peer_of(B, StackConfig::default(), 64);
    let listener = b.listen(80).unwrap();
    let send = |segment: Vec<u8>| {
        let tx = peer_tx.clone();
        async move {
            tx.send(Bytes::from(ipv6(TCP, A, B, &segment)))
                .await
                .unwrap()
        }
    };
    const PORT: u16 = 40000;
    // A first connection on the same 4-tuple takes the shard's spare listener (slot 0); the
    // stack adds a new spare (slot 1). Aborting it frees slot 0.
    send(tcp_segment(A, B, (PORT, 80), 100, 0, SYN)).await;
    let isn = syn_ack_to(&mut peer_rx, PORT).await;
    send(tcp_segment(A, B, (PORT, 80), 101, isn.wrapping_add(1), ACK)).await;
    let (first, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("first connection accepted")
        .unwrap();
    first.abort();
    eventually(
        Duration::from_secs(5),
        "the aborted connection's socket removed",
        || b.connections_per_shard().iter().sum::<usize>() == 0,
    )
    .await;

    // The connection again: the spare in slot 1 takes the SYN and the new spare lands in the
    // freed slot 0, before it. Then the same SYN once more, as a retransmission.
    let syn = tcp_segment(A, B, (PORT, 80), 5000, 0, SYN);
    send(syn.clone()).await;
    let isn = syn_ack_to(&mut peer_rx, PORT).await;
    let taken = b.stats().packets_in;
    send(syn).await;
    // The stack counts a packet in the same locked round that handles it, and the lock is
    // taken again below: once the count moves, the retransmitted SYN has been handled.
    eventually(
        Duration::from_secs(5),
        "the retransmitted SYN taken",
        || b.stats().packets_in > taken,
    )
    .await;
    assert_eq!(
        b.connections_per_shard().iter().sum::<usize>(),
        1,
        "a retransmitted SYN opened a second socket for the connection"
    );
    // The handshake completes on the socket holding the connection, and its data arrives.
    let ack = isn.wrapping_add(1);
    send(tcp_segment(A, B, (PORT, 80), 5001, ack, ACK)).await;
    let (mut second, peer) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the connection is accepted")
        .unwrap();
    assert_eq!(peer.port(), PORT);
    const PSH: u8 = 0x08;
    let data = tcp_segment_carrying(A, B, (PORT, 80), (5001, ack), ACK | PSH, b"hello");
    send(data).await;
    let mut got = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut got))
        .await
        .expect("the data reached the accepted stream")
        .unwrap();
    assert_eq!(&got, b"hello");
}

/// Payload length of a TCP segment the stack sent (no options are assumed past the data
/// offset field).
fn tcp_payload_len(packet: &[u8]) -> usize {
    let data_offset = usize::from(packet[40 + 12] >> 4) * 4;
    packet.len().saturating_sub(40 + data_offset)
}

/// Fast retransmits must go out even when the stack's outbound queue is full. Many connections
/// share few shards and the outbound queue holds one packet, so during one egress pass the
/// first socket of a shard fills the queue. smoltcp 0.14 marks a fast retransmit done (and its
/// timer idle) before the transmit, so a device that refused the transmit lost that
/// retransmission for good: the connection kept data in flight with no timer running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_retransmits_survive_a_full_outbound_queue() {
    const CONNECTIONS: u16 = 96;
    let config = StackConfig {
        outbound_queue: 1,
        ..StackConfig::default()
    };
    let (a, mut peer_rx, peer_tx) = raw_peer_of(A, config, 4096);
    let send = |segment: Vec<u8>| Bytes::from(ipv6(TCP, B, A, &segment));
    let mut connects = Vec::new();
    for i in 0..CONNECTIONS {
        let a = a.clone();
        connects.push(tokio::spawn(async move {
            let mut s = a
                .connect(SocketAddrV6::new(B, 3000 + i, 0, 0))
                .await
                .unwrap();
            // Three segments' worth (the peer's MSS is the default 536 bytes): the peer
            // "loses" the first and acknowledges none of them.
            s.write_all(&pattern(u64::from(i), 3 * 536)).await.unwrap();
            s
        }));
    }
    // The peer accepts every connection (ISN 1000) and notes, per connection (A's port), the
    // peer's port, the sequence number of A's first data byte and how many data segments came.
    let mut conns: std::collections::HashMap<u16, (u16, u32, usize)> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while conns.values().filter(|c| c.2 >= 3).count() < usize::from(CONNECTIONS) {
        let packet = tokio::time::timeout_at(deadline, peer_rx.recv())
            .await
            .expect("the connections did not send their data")
            .unwrap();
        let Some((a_port, b_port, seq, flags)) = parse_tcp(&packet) else {
            continue;
        };
        if flags & (SYN | ACK) == SYN {
            let syn_ack = tcp_segment(B, A, (b_port, a_port), 1000, seq.wrapping_add(1), SYN | ACK);
            peer_tx.send(send(syn_ack)).await.unwrap();
        } else if tcp_payload_len(&packet) > 0 {
            let c = conns.entry(a_port).or_insert((b_port, seq, 0));
            c.2 += 1;
        }
    }
    // Three duplicate ACKs per connection, all at once, so that the fast retransmits of many
    // connections meet in the same egress passes.
    for (&a_port, &(b_port, first, _)) in &conns {
        for _ in 0..3 {
            let dup = tcp_segment(B, A, (b_port, a_port), 1001, first, ACK);
            peer_tx.send(send(dup)).await.unwrap();
        }
    }
    // Every connection resends its first segment. Without a fast retransmit nothing would
    // before the retransmission timeout (at least 1 s); a lost one leaves no timer at all.
    let mut resent = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while resent.len() < conns.len() {
        let Ok(packet) = tokio::time::timeout_at(deadline, peer_rx.recv()).await else {
            let stuck: Vec<u16> = conns
                .keys()
                .filter(|p| !resent.contains(*p))
                .copied()
                .collect();
            panic!(
                "{} of {} connections never resent their first segment: {stuck:?}",
                stuck.len(),
                conns.len()
            );
        };
        let packet = packet.unwrap();
        if let Some((a_port, _, seq, _)) = parse_tcp(&packet)
            && tcp_payload_len(&packet) > 0
            && conns.get(&a_port).is_some_and(|c| c.1 == seq)
        {
            resent.insert(a_port);
        }
    }
    drop(connects);
}
