//! Seed inputs for the corpora, made by the real encoders: ClientHellos from rustls, a link's
//! bytes from a real Noise handshake and sealed control frames, and a recorded exchange between
//! two node cores (routes, session setup, data). `examples/seeds.rs` writes them out.

use crate::overlay::{
    Event, LINK_RTT_US, NEIGHBOR_SEED, NODE_SEED, NodeUnderTest, frame, new_core,
};
use bytes::BytesMut;
use meshgate_overlay::core::{CoreOut, LinkOrigin};
use meshgate_overlay::fuzzing::encode_control;
use meshgate_overlay::identity::Identity;
use meshgate_overlay::link;
use meshgate_overlay::wire::{Control, FrameKind};
use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::sync::Arc;

/// (target, seed name, bytes).
pub type Seed = (&'static str, String, Vec<u8>);

/// Every generated seed.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    hellos(&mut seeds);
    overlay(&mut seeds);
    link_stream(&mut seeds);
    demux(&mut seeds);
    proxy(&mut seeds);
    seeds
}

/// A real ClientHello from rustls.
pub fn rustls_hello(
    name: &str,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

/// The same handshake message split over records of `piece` bytes.
fn split_records(hello: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in hello[5..].chunks(piece) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn hellos(seeds: &mut Vec<Seed>) {
    use rustls::version::{TLS12, TLS13};
    let h2: &[&[u8]] = &[b"h2", b"http/1.1"];
    let long = format!("{}.example", vec!["a".repeat(63); 3].join("."));
    let mut hellos = vec![
        ("tls13-h2", rustls_hello("App.Example.org", h2, &[&TLS13])),
        ("tls12", rustls_hello("a.test", &[], &[&TLS12])),
        (
            "both",
            rustls_hello("xn--bcher-kva.example", h2, &[&TLS13, &TLS12]),
        ),
        (
            "acme",
            rustls_hello("new.example.net", &[b"acme-tls/1"], &[&TLS13]),
        ),
        ("ip-no-sni", rustls_hello("192.0.2.1", h2, &[&TLS13])),
        ("long-name", rustls_hello(&long, h2, &[&TLS13])),
    ];
    let base = hellos[0].1.clone();
    hellos.push(("split-40", split_records(&base, 40)));
    hellos.push(("split-7", split_records(&base, 7)));
    hellos.push(("http", b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec()));
    for (name, h) in hellos {
        let mut one = vec![0];
        one.extend_from_slice(&h);
        seeds.push(("client_hello", name.to_string(), one));
        for (max, chunk) in [(0u8, 255u8), (1, 7)] {
            let mut r = vec![max, chunk];
            r.extend_from_slice(&h);
            seeds.push(("client_hello_reader", format!("{name}-{max}-{chunk}"), r));
        }
    }
}

/// An IPv6 packet with no next header.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[59, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A real exchange: the node under test (B) and its neighbor (A) link, learn routes, set up
/// sessions both ways and exchange data. Returns B's events and every message on the wire.
pub(crate) struct Exchange {
    pub(crate) events: Vec<Event>,
    pub(crate) controls: Vec<Vec<u8>>,
    pub(crate) packets: Vec<Vec<u8>>,
}

pub(crate) fn exchange() -> Exchange {
    const B_ON_A: u64 = 2;
    let (mut b, b_first) = NodeUnderTest::linked();
    let mut a = new_core(NEIGHBOR_SEED, 1);
    let (a_addr, b_addr) = (
        Identity::from_seed(&NEIGHBOR_SEED).address(),
        Identity::from_seed(&NODE_SEED).address(),
    );
    let mut ex = Exchange {
        events: Vec::new(),
        controls: Vec::new(),
        packets: Vec::new(),
    };
    let mut queue = VecDeque::new();
    let mut a_out = Vec::new();
    a.link_up(
        B_ON_A,
        Identity::from_seed(&NODE_SEED).public_key(),
        LinkOrigin::Outbound,
        b.now,
        &mut a_out,
    );
    a.link_rtt(B_ON_A, LINK_RTT_US, b.now, &mut a_out);
    // B's first updates reach A before anything is recorded: a fresh node under test sends the
    // same ones when it is linked.
    for o in b_first {
        match o {
            CoreOut::Control(_, c) => a.control(B_ON_A, c, b.now, &mut a_out),
            CoreOut::Packet(_, p) => a.packet(B_ON_A, BytesMut::from(&p[..]), b.now, &mut a_out),
            _ => {}
        }
    }
    let step = |b: &mut NodeUnderTest,
                a: &mut meshgate_overlay::core::NodeCore,
                queue: &mut VecDeque<Event>,
                a_out: &mut Vec<CoreOut>,
                ex: &mut Exchange| {
        for o in a_out.drain(..) {
            match o {
                CoreOut::Control(_, c) => {
                    let enc = encode_control(&c);
                    ex.controls.push(enc.clone());
                    queue.push_back(Event::Control(enc));
                }
                CoreOut::Packet(_, p) => {
                    ex.packets.push(p.to_vec());
                    queue.push_back(Event::Packet(p.to_vec()));
                }
                _ => {}
            }
        }
        while let Some(e) = queue.pop_front() {
            ex.events.push(e.clone());
            for o in b.apply(&e) {
                match o {
                    CoreOut::Control(_, c) => {
                        ex.controls.push(encode_control(&c));
                        a.control(B_ON_A, c, b.now, a_out);
                    }
                    CoreOut::Packet(_, p) => {
                        ex.packets.push(p.to_vec());
                        a.packet(B_ON_A, BytesMut::from(&p[..]), b.now, a_out);
                    }
                    _ => {}
                }
            }
            for o in a_out.drain(..) {
                match o {
                    CoreOut::Control(_, c) => {
                        let enc = encode_control(&c);
                        ex.controls.push(enc.clone());
                        queue.push_back(Event::Control(enc));
                    }
                    CoreOut::Packet(_, p) => {
                        ex.packets.push(p.to_vec());
                        queue.push_back(Event::Packet(p.to_vec()));
                    }
                    _ => {}
                }
            }
        }
    };
    let tick = |b: &mut NodeUnderTest,
                a: &mut meshgate_overlay::core::NodeCore,
                queue: &mut VecDeque<Event>,
                a_out: &mut Vec<CoreOut>,
                ex: &mut Exchange| {
        queue.push_back(Event::Tick(2));
        step(b, a, queue, a_out, ex);
        a.tick(b.now, a_out);
        step(b, a, queue, a_out, ex);
    };
    step(&mut b, &mut a, &mut queue, &mut a_out, &mut ex);
    for _ in 0..12 {
        tick(&mut b, &mut a, &mut queue, &mut a_out, &mut ex);
    }
    // A → B: a session init, B's response, then data.
    for i in 0..3u8 {
        a.local(ipv6(a_addr, b_addr, &[i; 24]).into(), b.now, &mut a_out);
        step(&mut b, &mut a, &mut queue, &mut a_out, &mut ex);
    }
    // B → A from B's own port.
    for i in 0..2u8 {
        queue.push_back(Event::Local(ipv6(b_addr, a_addr, &[i; 16])));
        step(&mut b, &mut a, &mut queue, &mut a_out, &mut ex);
    }
    for _ in 0..3 {
        tick(&mut b, &mut a, &mut queue, &mut a_out, &mut ex);
    }
    ex
}

fn script(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        e.encode(&mut out);
    }
    out
}

fn overlay(seeds: &mut Vec<Seed>) {
    let ex = exchange();
    seeds.push(("overlay_node", "exchange".into(), script(&ex.events)));
    // The exchange up to each session-setup packet, so short inputs reach it too.
    for (i, e) in ex.events.iter().enumerate() {
        if let Event::Packet(p) = e {
            seeds.push((
                "overlay_node",
                format!("upto-{i}"),
                script(&ex.events[..=i]),
            ));
            if p.first() == Some(&1) {
                break;
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in &ex.controls {
        if seen.insert((c[0], c.len())) {
            seeds.push(("control", format!("real-{}-{}", c[0], c.len()), c.clone()));
        }
    }
    for c in [
        Control::Hello { timestamp_us: 1 },
        Control::HelloAck { echo_us: 2 },
        Control::Updates(vec![]),
        Control::SeqnoRequest {
            prefix: [6; 8],
            seqno: 3,
            hop_count: 4,
        },
    ] {
        let enc = encode_control(&c);
        seeds.push(("control", format!("made-{}", enc[0]), enc));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &ex.packets {
        if seen.insert(p[0]) {
            seeds.push(("routed", format!("real-type-{}", p[0]), p.clone()));
        }
    }
    let unreachable = meshgate_overlay::wire::encode_unreachable(
        &"600::1".parse().expect("addr"),
        &"700::2".parse().expect("addr"),
        &"800::3".parse().expect("addr"),
    );
    seeds.push(("routed", "unreachable".into(), unreachable.to_vec()));
}

/// The bytes a real initiator sends on a link: Noise handshake frames, sealed control frames
/// and packet frames.
fn link_stream(seeds: &mut Vec<Seed>) {
    let ex = exchange();
    let written = crate::block_on(async {
        let (mut x, mut y) = tokio::io::duplex(1 << 20);
        let a = Identity::from_seed(&NEIGHBOR_SEED);
        let b = Identity::from_seed(&NODE_SEED);
        let (ra, rb) = tokio::join!(
            link::handshake(&mut x, &a, true),
            link::handshake(&mut y, &b, false)
        );
        let (mut ta, _) = ra.expect("initiator");
        rb.expect("responder");
        drop((x, y));
        // Replay the initiator's side into a recorder for the seed.
        let (mut x, mut y) = tokio::io::duplex(1 << 20);
        let mut rec = Recorder(Vec::new());
        let (ra, _) = tokio::join!(
            async {
                let r = link::handshake(&mut rec_pipe(&mut x, &mut rec), &a, true).await;
                drop(x);
                r
            },
            link::handshake(&mut y, &b, false)
        );
        let _ = ra;
        let mut bytes = rec.0;
        for c in ex.controls.iter().take(4) {
            let c = meshgate_overlay::fuzzing::decode_control(c).expect("control");
            bytes.extend_from_slice(&link::seal_control(&mut ta, &c).expect("seal"));
        }
        for p in ex.packets.iter().take(3) {
            bytes.extend_from_slice(&frame(FrameKind::Packet, p));
        }
        bytes
    });
    for seed in [0u8, 1, 3] {
        let mut s = vec![seed];
        s.extend_from_slice(&written);
        seeds.push(("link_frames", format!("initiator-{seed}"), s));
    }
}

struct Recorder(Vec<u8>);

/// A stream that reads from `inner` and copies what is written into `rec` as well.
struct RecPipe<'a, S> {
    inner: &'a mut S,
    rec: &'a mut Recorder,
}

fn rec_pipe<'a, S>(inner: &'a mut S, rec: &'a mut Recorder) -> RecPipe<'a, S> {
    RecPipe { inner, rec }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for RecPipe<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for RecPipe<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            this.rec.0.extend_from_slice(&buf[..n]);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

fn demux(seeds: &mut Vec<Seed>) {
    let local: Ipv6Addr = "400::1".parse().expect("addr");
    let remote: Ipv6Addr = "400::2".parse().expect("addr");
    let packet = |next: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]| {
        let mut p = ipv6(src, dst, payload);
        p[6] = next;
        p
    };
    let tcp = |sport: u16, dport: u16, flags: u8| {
        let mut t = vec![0u8; 20];
        t[..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    };
    seeds.push((
        "demux",
        "syn".into(),
        packet(6, remote, local, &tcp(40000, 80, 2)),
    ));
    seeds.push((
        "demux",
        "ack".into(),
        packet(6, remote, local, &tcp(40000, 80, 0x10)),
    ));
    let mut ext = vec![60, 0, 0, 0, 0, 0, 0, 0];
    ext.extend_from_slice(&[44, 1, 0, 0, 0, 0, 0, 0]);
    ext.extend_from_slice(&[0; 8]);
    ext.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 7]);
    ext.extend_from_slice(&tcp(1234, 443, 2));
    seeds.push(("demux", "extensions".into(), packet(0, remote, local, &ext)));
    let mut icmp = vec![1, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&packet(6, local, remote, &tcp(50000, 8080, 0x18)));
    seeds.push((
        "demux",
        "icmp-error".into(),
        packet(58, "400::9".parse().expect("addr"), local, &icmp),
    ));
}

fn proxy(seeds: &mut Vec<Seed>) {
    for (kind, name) in [(0u8, "v4"), (1, "v6"), (2, "mapped"), (3, "mixed")] {
        let mut s = vec![kind];
        s.extend((1..=36).map(|i| i as u8 * 7));
        s.extend_from_slice(b"\x16\x03\x01");
        seeds.push(("proxy_v2", name.into(), s));
    }
}
