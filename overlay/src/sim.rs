//! Deterministic in-memory simulator: N nodes running the real [`NodeCore`] (routing,
//! sessions, forwarding) over virtual links with per-link latency, on a virtual clock.
//! Control messages go through their wire encoding; links and nodes can fail silently.
//! Every routed packet carries a trace of the nodes it visited: a revisit panics.
//!
//! Scale: the cost of a simulated second is linear in the number of nodes once routing is
//! converged (each node's timers do work proportional to its links, not to the network),
//! and signature checks are shared between the simulated nodes (each node still counts
//! its own). The simulator measures control traffic (frame bytes as on a real link:
//! header, plaintext and Noise tag) and the time spent inside the cores.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::addr::prefix_of;
use crate::clock::Micros;
use crate::core::{CoreConfig, CoreOut, Counters, LinkOrigin, NodeCore};
use crate::identity::Identity;
use crate::routing::SharedVerifications;
use crate::wire::Control;

/// Bytes a control message costs on a link besides its plaintext: frame header and tag.
const CONTROL_FRAME_OVERHEAD: u64 = 5 + 16;

/// Control traffic sent by all nodes since the simulation started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlTraffic {
    pub messages: u64,
    /// Bytes on the links (frame header + plaintext + Noise tag per message).
    pub bytes: u64,
}

/// A deterministic pseudo-random generator (SplitMix64) for topologies and key material.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        b
    }
}

enum Msg {
    Control(Vec<u8>),
    Packet { bytes: Bytes, trace: Vec<usize> },
}

struct Flight {
    from: usize,
    to: usize,
    msg: Msg,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    latency: Micros,
    up: bool,
}

struct SimNode {
    core: NodeCore,
    key: [u8; 32],
    alive: bool,
    delivered: Vec<Bytes>,
    events: Vec<crate::L3Event>,
}

/// The simulator.
pub struct Sim {
    now: Micros,
    nodes: Vec<SimNode>,
    links: HashMap<(usize, usize), Link>,
    /// Flights by arrival time, each time's in sending order. Latencies are whole µs and
    /// events cluster on few distinct times, so this beats a heap of all flights.
    queue: BTreeMap<Micros, VecDeque<Flight>>,
    next_tick: Micros,
    /// Longest trace any packet had (hops).
    pub max_hops: usize,
    /// Packets forwarded in total.
    pub(crate) forwarded: u64,
    cfg: CoreConfig,
    rng: SimRng,
    traffic: ControlTraffic,
    core_time: Duration,
}

const TICK: Micros = 100_000;

impl Sim {
    /// `n` nodes with identities derived from `seed`.
    pub fn new(seed: u64, n: usize, mut cfg: CoreConfig) -> Sim {
        cfg.routing.shared_verifications = Some(SharedVerifications::default());
        let mut sim = Sim {
            now: 0,
            nodes: Vec::with_capacity(n),
            links: HashMap::new(),
            queue: BTreeMap::new(),
            next_tick: 0,
            max_hops: 0,
            forwarded: 0,
            cfg,
            rng: SimRng::new(seed),
            traffic: ControlTraffic::default(),
            core_time: Duration::ZERO,
        };
        for _ in 0..n {
            sim.add_node();
        }
        sim
    }

    /// Adds a node (a new identity, no links yet); returns its index.
    pub fn add_node(&mut self) -> usize {
        let id = Identity::from_seed(&self.rng.bytes32());
        let mut r = SimRng::new(self.rng.next_u64());
        // Seqnos start at the node's creation time, as a real node's start at Unix ms.
        let epoch = 1 + self.now / 1000;
        self.nodes.push(SimNode {
            key: id.public_key(),
            core: NodeCore::new(
                id,
                self.cfg.clone(),
                epoch,
                self.now,
                Box::new(move || r.bytes32()),
            ),
            alive: true,
            delivered: Vec::new(),
            events: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Whether node `i` runs (it was not killed).
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Control traffic sent by all nodes so far.
    pub fn control_traffic(&self) -> ControlTraffic {
        self.traffic
    }

    /// Wall-clock time spent inside the nodes' cores so far (all nodes).
    pub fn core_time(&self) -> Duration {
        self.core_time
    }

    /// Prefixes node `i` has a selected route to.
    pub fn routes_selected(&self, i: usize) -> usize {
        self.nodes[i].core.router.selected_count()
    }

    /// Prefixes in node `i`'s routing table.
    pub fn routes_held(&self, i: usize) -> usize {
        self.nodes[i].core.router.len()
    }

    pub fn now(&self) -> Micros {
        self.now
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn address(&self, i: usize) -> Ipv6Addr {
        self.nodes[i].core.address()
    }

    pub fn counters(&self, i: usize) -> Counters {
        self.nodes[i].core.counters()
    }

    fn key(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    /// Brings up a link with one-way latency `latency` µs.
    pub fn connect(&mut self, a: usize, b: usize, latency: Micros) {
        self.links
            .insert(Sim::key(a, b), Link { latency, up: true });
        let (ka, kb) = (self.pubkey(a), self.pubkey(b));
        // The lower-numbered node dials: the other sees an inbound link from 10.0.0.a.
        let (dialer, acceptor) = (a.min(b), a.max(b));
        let from = LinkOrigin::Inbound(IpAddr::from(Ipv4Addr::from(
            0x0a00_0000 | (dialer as u32 & 0x00ff_ffff),
        )));
        let mut out = Vec::new();
        let origin = if a == dialer {
            LinkOrigin::Outbound
        } else {
            from
        };
        let t = Instant::now();
        self.nodes[a]
            .core
            .link_up(b as u64, kb, origin, self.now, &mut out);
        self.core_time += t.elapsed();
        self.apply(a, out, None);
        let mut out = Vec::new();
        let origin = if b == acceptor {
            from
        } else {
            LinkOrigin::Outbound
        };
        let t = Instant::now();
        self.nodes[b]
            .core
            .link_up(a as u64, ka, origin, self.now, &mut out);
        self.core_time += t.elapsed();
        self.apply(b, out, None);
    }

    fn pubkey(&self, i: usize) -> [u8; 32] {
        self.nodes[i].key
    }

    /// Silently drops everything on a link (both ends find out by timeout).
    pub fn cut(&mut self, a: usize, b: usize) {
        if let Some(l) = self.links.get_mut(&Sim::key(a, b)) {
            l.up = false;
        }
    }

    /// Stops a node silently (its neighbors find out by timeout).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// The next hop node `i` uses towards node `j`.
    pub(crate) fn next_hop(&self, i: usize, j: usize) -> Option<usize> {
        let p = prefix_of(&self.address(j));
        self.nodes[i].core.router.next_hop(&p).map(|n| n as usize)
    }

    /// Whether node `i` has a selected route towards node `j`'s prefix.
    pub fn next_hop_exists(&self, i: usize, j: usize) -> bool {
        self.next_hop(i, j).is_some()
    }

    /// The route from `i` to `j` following next hops; `Err` says why there is none.
    pub fn path(&self, i: usize, j: usize) -> Result<Vec<usize>, PathError> {
        let mut path = vec![i];
        let mut at = i;
        while at != j {
            let Some(n) = self.next_hop(at, j) else {
                return Err(PathError::NoRoute { to: j, path });
            };
            if path.contains(&n) {
                return Err(PathError::Loop { path, next: n });
            }
            let up = self.links.get(&Sim::key(at, n)).is_some_and(|l| l.up);
            if !up || !self.nodes[n].alive {
                return Err(PathError::DeadHop { path, next: n });
            }
            path.push(n);
            at = n;
        }
        Ok(path)
    }

    /// The link latency between neighbors (µs).
    pub fn latency(&self, a: usize, b: usize) -> Option<Micros> {
        self.links.get(&Sim::key(a, b)).map(|l| l.latency)
    }

    /// Injects an IPv6 packet (next header 59) with `payload` from `i` to `j`'s address.
    pub fn send(&mut self, i: usize, j: usize, payload: &[u8]) -> Bytes {
        let dst = self.address(j);
        self.send_to(i, dst, payload)
    }

    /// Injects an IPv6 packet (next header 59) with `payload` from `i` to any address.
    pub fn send_to(&mut self, i: usize, dst: Ipv6Addr, payload: &[u8]) -> Bytes {
        let p = ipv6_packet(self.address(i), dst, payload);
        let mut out = Vec::new();
        self.nodes[i].core.local(p.clone(), self.now, &mut out);
        self.apply(i, out, None);
        p
    }

    /// Puts a routed packet on the link from `from` to its neighbor `to`, as if `from`
    /// had sent it (tests: forged or hand-made packets).
    pub fn inject(&mut self, from: usize, to: usize, bytes: Bytes) {
        let trace = vec![from];
        self.send_over_link(from, to, Msg::Packet { bytes, trace });
    }

    /// Typed L3 events (unreachables) node `i` raised since the last call.
    pub fn take_events(&mut self, i: usize) -> Vec<crate::L3Event> {
        std::mem::take(&mut self.nodes[i].events)
    }

    /// Packets delivered to node `i`'s L3 port since the last call.
    pub fn take_delivered(&mut self, i: usize) -> Vec<Bytes> {
        std::mem::take(&mut self.nodes[i].delivered)
    }

    fn schedule(&mut self, at: Micros, flight: Flight) {
        self.queue.entry(at).or_default().push_back(flight);
    }

    /// Delivers `msg` from `from` to `to` after the link's latency; a cut link loses it.
    fn send_over_link(&mut self, from: usize, to: usize, msg: Msg) {
        if let Some(l) = self.links.get(&Sim::key(from, to)).copied() {
            let at = self.now + l.latency;
            self.schedule(at, Flight { from, to, msg });
        }
    }

    fn apply(&mut self, from: usize, out: Vec<CoreOut>, incoming: Option<(&[u8], &[usize])>) {
        for o in out {
            match o {
                CoreOut::Control(n, c) => {
                    let to = n as usize;
                    let b = c.encode();
                    if self.links.contains_key(&Sim::key(from, to)) {
                        self.traffic.messages += 1;
                        self.traffic.bytes += b.len() as u64 + CONTROL_FRAME_OVERHEAD;
                    }
                    self.send_over_link(from, to, Msg::Control(b));
                }
                CoreOut::Packet(n, bytes) => {
                    let to = n as usize;
                    let trace = match incoming {
                        Some((inb, tr))
                            if inb.len() == bytes.len()
                                && inb.len() > 2
                                && inb[0] == bytes[0]
                                && inb[2..] == bytes[2..] =>
                        {
                            self.forwarded += 1;
                            let mut t = tr.to_vec();
                            t.push(from);
                            t
                        }
                        _ => vec![from],
                    };
                    assert!(
                        !trace.contains(&to),
                        "forwarding loop: packet visited {trace:?} and goes back to {to}"
                    );
                    self.max_hops = self.max_hops.max(trace.len());
                    self.send_over_link(from, to, Msg::Packet { bytes, trace });
                }
                CoreOut::Deliver(b) => self.nodes[from].delivered.push(b),
                CoreOut::Unreachable { dst, reason } => self.nodes[from]
                    .events
                    .push(crate::L3Event::Unreachable { dst, reason }),
                CoreOut::Close(n) => {
                    // Closing a TCP link: the other end sees it go down (if it is alive).
                    let to = n as usize;
                    if self.links.remove(&Sim::key(from, to)).is_some() && self.nodes[to].alive {
                        let mut out = Vec::new();
                        let t = Instant::now();
                        self.nodes[to]
                            .core
                            .link_down(from as u64, self.now, &mut out);
                        self.core_time += t.elapsed();
                        self.apply(to, out, None);
                    }
                }
            }
        }
    }

    /// Advances the virtual clock by `dur` µs, delivering messages and running timers.
    pub fn run_for(&mut self, dur: Micros) {
        let end = self.now + dur;
        loop {
            let next_msg = self.queue.first_key_value().map(|(t, _)| *t);
            let next = match next_msg {
                Some(t) if t <= self.next_tick => t,
                _ => self.next_tick,
            };
            if next > end {
                break;
            }
            self.now = next;
            if next_msg == Some(next) && next <= self.next_tick {
                let Some(mut first) = self.queue.first_entry() else {
                    continue;
                };
                let flight = first.get_mut().pop_front();
                if first.get().is_empty() {
                    first.remove();
                }
                if let Some(f) = flight {
                    self.deliver(f);
                }
            } else {
                self.next_tick += TICK;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].alive {
                        let mut out = Vec::new();
                        let t = Instant::now();
                        self.nodes[i].core.tick(self.now, &mut out);
                        self.core_time += t.elapsed();
                        self.apply(i, out, None);
                    }
                }
            }
        }
        self.now = end;
    }

    fn deliver(&mut self, f: Flight) {
        let link_up = self
            .links
            .get(&Sim::key(f.from, f.to))
            .is_some_and(|l| l.up);
        if !link_up || !self.nodes[f.to].alive || !self.nodes[f.from].alive {
            return;
        }
        let to = f.to;
        let mut out = Vec::new();
        match f.msg {
            Msg::Control(b) => {
                let c = Control::decode(&b).expect("simulated control message decodes");
                let t = Instant::now();
                self.nodes[to]
                    .core
                    .control(f.from as u64, c, self.now, &mut out);
                self.core_time += t.elapsed();
                self.apply(to, out, None);
            }
            Msg::Packet { bytes, trace } => {
                let buf = BytesMut::from(&bytes[..]);
                let t = Instant::now();
                self.nodes[to]
                    .core
                    .packet(f.from as u64, buf, self.now, &mut out);
                self.core_time += t.elapsed();
                self.apply(to, out, Some((&bytes, &trace)));
            }
        }
    }
}

/// `owner`'s signed announcement of its own prefix (benchmarks feed these to a core).
pub fn signed_announcement(owner: &Identity, seqno: u64, metric: u32) -> crate::wire::RouteUpdate {
    let key = owner.public_key();
    let prefix = crate::addr::prefix_for_key(&key);
    crate::wire::RouteUpdate {
        prefix,
        seqno,
        metric,
        router_key: key,
        signature: owner.sign(&crate::wire::route_signature_input(&prefix, seqno, &key)),
    }
}

/// A connected random graph on `n` nodes: a random spanning tree plus random extra edges
/// until the average degree is `avg_degree`; one-way latencies uniform in `latency_ms`
/// (whole milliseconds). Returns `(a, b, latency µs)` with `a < b`.
pub fn random_edges(
    rng: &mut SimRng,
    n: usize,
    avg_degree: usize,
    latency_ms: std::ops::RangeInclusive<u64>,
) -> Vec<(usize, usize, Micros)> {
    let (lo, hi) = (*latency_ms.start(), *latency_ms.end());
    let lat = |rng: &mut SimRng| (lo + rng.below(hi - lo + 1)) * 1000;
    let mut seen = std::collections::BTreeSet::new();
    let mut edges = Vec::new();
    for i in 1..n {
        let j = rng.below(i as u64) as usize;
        seen.insert((j, i));
        edges.push((j, i, lat(rng)));
    }
    let want = (n * avg_degree / 2).min(n * n.saturating_sub(1) / 2);
    while edges.len() < want {
        let a = rng.below(n as u64) as usize;
        let b = rng.below(n as u64) as usize;
        if a != b && seen.insert((a.min(b), a.max(b))) {
            edges.push((a.min(b), a.max(b), lat(rng)));
        }
    }
    edges
}

/// Why [`Sim::path`] found no usable route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The last node of `path` has no route towards `to` (not converged yet, or unreachable).
    NoRoute { to: usize, path: Vec<usize> },
    /// Following next hops from the end of `path` returns to a node on it: a forwarding
    /// loop, which the routing protocol must never produce.
    Loop { path: Vec<usize>, next: usize },
    /// The route goes over a link or node that died and was not detected yet.
    DeadHop { path: Vec<usize>, next: usize },
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::NoRoute { to, path } => {
                write!(f, "no route towards {to} at the end of {path:?}")
            }
            PathError::Loop { path, next } => write!(f, "forwarding loop {path:?} -> {next}"),
            PathError::DeadHop { path, next } => {
                write!(f, "route {path:?} -> {next} uses a dead link or node")
            }
        }
    }
}

impl std::error::Error for PathError {}

impl From<PathError> for String {
    fn from(e: PathError) -> String {
        e.to_string()
    }
}

/// A minimal IPv6 packet (next header 59, "no next header") carrying `payload`.
pub(crate) fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Bytes {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(59);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    Bytes::from(p)
}
