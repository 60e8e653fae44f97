//! Overlay data-plane throughput: packets/s and bytes/s through 1 and 3 hops, in-process
//! (the sans-IO cores wired directly, one thread) and over loopback TCP links (real nodes),
//! beside the bare AES-256-GCM seal throughput (ring, what the data plane uses) measured in the
//! same run.
//!
//! `cargo run --release -p meshgate-bench --bin overlay`

use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, KeyInit, Nonce};
use meshgate_bench::{median, write_section};
use meshgate_overlay::core::{CoreConfig, CoreOut, LinkOrigin, NodeCore};
use meshgate_overlay::sim::SimRng;
use meshgate_overlay::{DEFAULT_MTU, Identity, Node, NodeConfig};
use ring::aead::{AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, UnboundKey};

// The nodes run in this process; they use the allocator the `meshgate` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 5;
const RUN_TIME: Duration = Duration::from_millis(700);

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> Bytes {
    let payload = len - 40;
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload as u16).to_be_bytes());
    p.push(59);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.resize(len, 0xab);
    Bytes::from(p)
}

/// (packets/s, bytes/s)
type Rate = (f64, f64);

fn aead_seal(size: usize) -> Rate {
    let key = ring_key(&AES_256_GCM);
    let mut buf = vec![0u8; size];
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < RUN_TIME {
        for _ in 0..16 {
            let tag = key
                .seal_in_place_separate_tag(ring_nonce(n), Aad::from([0u8; 45]), &mut buf)
                .unwrap();
            std::hint::black_box(&tag);
            n += 1;
        }
    }
    let s = start.elapsed().as_secs_f64();
    (n as f64 / s, (n as f64 * size as f64) / s)
}

fn ring_key(algorithm: &'static Algorithm) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(algorithm, &[7u8; 32]).unwrap())
}

fn ring_nonce(n: u64) -> ring::aead::Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&n.to_be_bytes());
    ring::aead::Nonce::assume_unique_for_key(nonce)
}

/// Nanoseconds per seal of a `size`-byte packet (45-byte associated data, as a data packet's
/// header), interleaved: ring's AES-256-GCM (what the overlay uses), ring's
/// ChaCha20-Poly1305 (used before) and the RustCrypto `chacha20poly1305` crate (before that).
fn aead_implementations(size: usize) -> [f64; 3] {
    let count: u64 = if size > 4096 { 20_000 } else { 400_000 };
    let mut buf = vec![0u8; size];
    let mut ring_ns = |algorithm| {
        let key = ring_key(algorithm);
        let start = Instant::now();
        for n in 0..count {
            let tag = key
                .seal_in_place_separate_tag(ring_nonce(n), Aad::from([0u8; 45]), &mut buf)
                .unwrap();
            std::hint::black_box(&tag);
        }
        start.elapsed().as_nanos() as f64 / count as f64
    };
    let aes_ns = ring_ns(&AES_256_GCM);
    let chacha_ns = ring_ns(&CHACHA20_POLY1305);
    let cipher = ChaCha20Poly1305::new_from_slice(&[7u8; 32]).unwrap();
    let start = Instant::now();
    for n in 0..count {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &[0u8; 45], buf.as_mut_slice().into())
            .unwrap();
        std::hint::black_box(&tag);
    }
    let rustcrypto_ns = start.elapsed().as_nanos() as f64 / count as f64;
    [aes_ns, chacha_ns, rustcrypto_ns]
}

/// A chain of sans-IO cores wired directly: 0 - 1 - ... - hops.
struct Chain {
    cores: Vec<NodeCore>,
    now: u64,
    delivered: u64,
}

impl Chain {
    fn new(hops: usize) -> Chain {
        let mut rng = SimRng::new(hops as u64);
        let ids: Vec<Identity> = (0..=hops)
            .map(|_| Identity::from_seed(&rng.bytes32()))
            .collect();
        let mut cores: Vec<NodeCore> = ids
            .iter()
            .map(|id| {
                let mut r = SimRng::new(rng.next_u64());
                NodeCore::new(
                    id.clone(),
                    CoreConfig::default(),
                    1,
                    0,
                    Box::new(move || r.bytes32()),
                )
            })
            .collect();
        let mut q = VecDeque::new();
        for i in 0..hops {
            let mut out = Vec::new();
            cores[i].link_up(
                i as u64 + 1,
                ids[i + 1].public_key(),
                LinkOrigin::Outbound,
                0,
                &mut out,
            );
            q.extend(out.into_iter().map(|o| (i, o)));
            let mut out = Vec::new();
            cores[i + 1].link_up(
                i as u64,
                ids[i].public_key(),
                LinkOrigin::Outbound,
                0,
                &mut out,
            );
            q.extend(out.into_iter().map(|o| (i + 1, o)));
            // Keepalives and RTT probes are the links' (absent here): give each neighbor
            // its RTT so it joins routing.
            let mut out = Vec::new();
            cores[i].link_rtt(i as u64 + 1, 1000, 0, &mut out);
            q.extend(out.into_iter().map(|o| (i, o)));
            let mut out = Vec::new();
            cores[i + 1].link_rtt(i as u64, 1000, 0, &mut out);
            q.extend(out.into_iter().map(|o| (i + 1, o)));
        }
        let mut c = Chain {
            cores,
            now: 0,
            delivered: 0,
        };
        c.run(q);
        for _ in 0..30 {
            c.now += 100_000;
            let mut q = VecDeque::new();
            for i in 0..=hops {
                let mut out = Vec::new();
                c.cores[i].tick(c.now, &mut out);
                q.extend(out.into_iter().map(|o| (i, o)));
            }
            c.run(q);
        }
        c
    }

    fn run(&mut self, mut q: VecDeque<(usize, CoreOut)>) {
        while let Some((from, o)) = q.pop_front() {
            let mut out = Vec::new();
            match o {
                CoreOut::Control(n, c) => {
                    let to = n as usize;
                    self.cores[to].control(from as u64, c, self.now, &mut out);
                    q.extend(out.into_iter().map(|o| (to, o)));
                }
                CoreOut::Packet(n, b) => {
                    let to = n as usize;
                    let buf = b.try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..]));
                    self.cores[to].packet(from as u64, buf, self.now, &mut out);
                    q.extend(out.into_iter().map(|o| (to, o)));
                }
                CoreOut::Deliver(_) => self.delivered += 1,
                _ => {}
            }
        }
    }

    fn send(&mut self, p: Bytes) {
        let mut out = Vec::new();
        self.cores[0].local(p, self.now, &mut out);
        self.run(out.into_iter().map(|o| (0, o)).collect());
    }
}

fn in_process(hops: usize, size: usize) -> Rate {
    let mut chain = Chain::new(hops);
    let dst = chain.cores[hops].address();
    let p = ipv6(chain.cores[0].address(), dst, size);
    chain.send(p.clone()); // session setup
    let before = chain.delivered;
    let start = Instant::now();
    while start.elapsed() < RUN_TIME {
        for _ in 0..16 {
            chain.send(p.clone());
        }
    }
    let s = start.elapsed().as_secs_f64();
    let n = (chain.delivered - before) as f64;
    (n / s, n * size as f64 / s)
}

async fn over_tcp(hops: usize, size: usize) -> anyhow::Result<Rate> {
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..=hops {
        let peers = if i == 0 {
            vec![]
        } else {
            vec![nodes[i - 1].listen_addr().unwrap()]
        };
        nodes.push(
            Node::start(NodeConfig {
                identity: Some(Identity::generate()),
                listen: Some("127.0.0.1:0".parse()?),
                peers,
                ..NodeConfig::default()
            })
            .await?,
        );
    }
    let src = nodes[0].address();
    let dst = nodes[hops].address();
    let tx = nodes[0].take_l3_port().unwrap().tx;
    let mut rx = nodes[hops].take_l3_port().unwrap().rx;
    let p = ipv6(src, dst, size);
    // Wait until the route and the session are up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no route through {hops} hops");
        tx.send(p.clone()).await?;
        if tokio::time::timeout(Duration::from_millis(100), rx.recv())
            .await
            .is_ok()
        {
            break;
        }
    }
    while tokio::time::timeout(Duration::from_millis(100), rx.recv())
        .await
        .is_ok()
    {}
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        let mut last = Instant::now();
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            n += 1;
            last = Instant::now();
        }
        (n, last)
    });
    let start = Instant::now();
    while start.elapsed() < RUN_TIME {
        tx.send(p.clone()).await?;
    }
    let (n, last) = counter.await?;
    let s = (last - start).as_secs_f64();
    for node in nodes {
        node.shutdown().await;
    }
    Ok((n as f64 / s, n as f64 * size as f64 / s))
}

fn med(rates: &[Rate]) -> Rate {
    let mut p: Vec<f64> = rates.iter().map(|r| r.0).collect();
    let mut b: Vec<f64> = rates.iter().map(|r| r.1).collect();
    (median(&mut p), median(&mut b))
}

/// Median over runs of `x / reference`, each run's pair measured back to back.
fn med_ratio(x: &[Rate], reference: &[Rate]) -> f64 {
    let mut r: Vec<f64> = x.iter().zip(reference).map(|(a, b)| a.1 / b.1).collect();
    median(&mut r)
}

fn row(name: &str, r: &[Rate], seal: &[Rate]) -> String {
    let m = med(r);
    format!(
        "| {name} | {:.0} | {:.2} | {:.0} % |\n",
        m.0,
        m.1 / 1e9 * 8.0,
        med_ratio(r, seal) * 100.0
    )
}

/// Cost of one relay from the 3-hop/1-hop throughput ratio (two relays).
fn relay_cost(three: &[Rate], one: &[Rate]) -> f64 {
    (1.0 - med_ratio(three, one).sqrt()) * 100.0
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut md = String::new();
    md.push_str("## overlay\n\n");
    md.push_str(&format!(
        "IPv6 packets from node A's L3 port to the far node's L3 port, {RUNS} runs of {} ms per \
         figure; the runs of all rows are interleaved and every ratio is taken within one run, \
         then the median is reported (the 2-core machine is shared; load average at start: \
         {}). \"% of AEAD\" compares with bare AES-256-GCM sealing (ring, what the data plane \
         uses) of the same packet size on one core (the one-core bound: a 1-hop packet is \
         sealed once, opened once). In-process: the sans-IO node cores wired directly, all on \
         one thread. Loopback TCP: real `Node`s with Noise-authenticated TCP links in one tokio \
         runtime with 2 worker threads (for 3 hops: 4 nodes on 2 cores).\n\n",
        RUN_TIME.as_millis(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    for size in [DEFAULT_MTU, 1400] {
        let tcp = size == DEFAULT_MTU;
        let (mut seal, mut ip1, mut ip3, mut t1, mut t3) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            seal.push(aead_seal(size));
            ip1.push(in_process(1, size));
            ip3.push(in_process(3, size));
            if tcp {
                t1.push(rt.block_on(over_tcp(1, size))?);
                t3.push(rt.block_on(over_tcp(3, size))?);
            }
        }
        md.push_str(&format!("### {size}-byte packets\n\n"));
        md.push_str("| path | packets/s | Gbit/s | % of AEAD |\n|---|---|---|---|\n");
        md.push_str(&row("bare AEAD seal, one core", &seal, &seal));
        md.push_str(&row("in-process, 1 hop", &ip1, &seal));
        md.push_str(&row("in-process, 3 hops (2 relays)", &ip3, &seal));
        let mut note = format!(
            "\nCost per relay (from 3-hop vs 1-hop throughput): in-process {:.1} %",
            relay_cost(&ip3, &ip1)
        );
        if tcp {
            md.push_str(&row("loopback TCP nodes, 1 hop", &t1, &seal));
            md.push_str(&row("loopback TCP nodes, 3 hops (2 relays)", &t3, &seal));
            note.push_str(&format!(", loopback TCP {:.1} %", relay_cost(&t3, &t1)));
        }
        md.push_str(&note);
        md.push_str(".\n\n");
        eprintln!("{md}");
    }
    md.push_str(
        "### AEAD implementation\n\nSeal, ns per packet (45-byte associated data), medians of \
         the runs, interleaved: ring's AES-256-GCM (what the data plane uses), ring's \
         ChaCha20-Poly1305 (used before) and the RustCrypto `chacha20poly1305` crate (used \
         before that).\n\n| packet bytes | ring AES-256-GCM ns | ring ChaCha20-Poly1305 ns \
         | RustCrypto ChaCha20-Poly1305 ns | ChaCha20 (ring) / AES-GCM |\n|---|---|---|---|---|\n",
    );
    for size in [64, 300, 1400, DEFAULT_MTU] {
        let runs: Vec<[f64; 3]> = (0..RUNS).map(|_| aead_implementations(size)).collect();
        let column = |i: usize| median(&mut runs.iter().map(|r| r[i]).collect::<Vec<_>>());
        let (aes, chacha, rustcrypto) = (column(0), column(1), column(2));
        let mut ratios: Vec<f64> = runs.iter().map(|r| r[1] / r[0]).collect();
        md.push_str(&format!(
            "| {size} | {aes:.0} | {chacha:.0} | {rustcrypto:.0} | {:.2}× |\n",
            median(&mut ratios)
        ));
    }
    md.push('\n');
    write_section("overlay", &md)?;
    println!("{md}");
    Ok(())
}
