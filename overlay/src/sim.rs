//! Deterministic in-memory simulator: N nodes running the real [`NodeCore`] (links with their
//! Noise handshakes and encrypted control frames, routing, sessions, forwarding) over virtual
//! byte-stream links with per-link latency, on a virtual clock. Each core's timers run at its
//! own [`NodeCore::poll_timeout`].
//!
//! Links are byte streams as TCP gives them: the bytes a core queues are carried in chunks,
//! at most a window of unread bytes per direction (a reader that stops reading holds the
//! writer back, as a full socket buffer would). Faults: a link cut silently (both ends find
//! out by timeout), a node killed silently, a control frame corrupted, a stream truncated
//! mid-frame and reset, a reader paused, and a new link replacing an old one between the same
//! two nodes. Forwarded packets are watched through each core's relay tap: a packet seen
//! twice by one node with a different hop limit is a forwarding loop, and panics.
//!
//! Scale: once routing is converged a simulated second costs work linear in the number of
//! nodes (keepalives), and signature checks are shared between the simulated nodes (each node
//! still counts its own). Memory beyond the routing tables: the bytes in flight (at most a
//! window per link direction, counted with their peak in [`Sim::memory`]) and the links'
//! buffers in the cores; a chunk is handed to the reading core without a copy and the link
//! keeps no read buffer between deliveries unless a frame is incomplete. Control traffic is
//! what the cores counted on their links (frame bytes: header, ciphertext and tag).
//!
//! Time runs instant by instant: at each, every node reads all that reached it (then sends
//! its routing changes once), or every node whose timers are due runs them. What a core
//! sends arrives a link's latency later, so the cores of one instant are independent: they
//! run side by side ([`Sim::set_threads`]), and their outputs are carried afterwards in
//! node order, the same outcome on any number of threads.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::addr::prefix_of;
use crate::clock::Micros;
use crate::core::{CoreConfig, CoreOut, Counters, LinkOrigin, NodeCore};
use crate::identity::Identity;
use crate::routing::SharedVerifications;
use crate::wire::{FRAME_HEADER_LEN, FrameKind};

mod instant;
use instant::{Job, Work};

/// Unread bytes in flight per link direction at most, by default (a socket's buffers): a
/// writer whose reader is this far behind waits, its bytes staying in its core's bounded
/// link queue. The simulator counts the bytes in flight in all directions
/// ([`Sim::memory`]); [`Sim::set_window`] changes it.
pub const WINDOW: usize = 256 * 1024;
/// A packet seen again by the same node within this long with another hop limit is looping
/// (session-init retries, which repeat a packet, are a second apart).
const LOOP_WINDOW: Micros = 500_000;

/// Where the simulator's memory beyond the routing tables is, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimMemory {
    /// Chunks of link bytes travelling or waiting for a paused reader.
    pub flight_chunks: usize,
    /// Their bytes (each direction holds at most a window unread, [`WINDOW`] by default).
    pub flight_bytes: usize,
    /// The most bytes that were in flight at once so far.
    pub peak_flight_bytes: usize,
    /// Bytes waiting in the cores' link send queues (bounded per link by the core's limits).
    pub queued_bytes: usize,
    /// Heap the live links' buffers hold in the cores: read buffers, decryption scratch,
    /// send queues (their waiting bytes included).
    pub link_buffer_bytes: usize,
    /// Links the cores run.
    pub links: usize,
}

/// Control traffic sent by all nodes since the simulation started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlTraffic {
    pub messages: u64,
    /// Bytes on the links (frame header + ciphertext + Noise tag per message).
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

/// What travels on a link towards one end.
enum Carried {
    Bytes(Bytes),
    /// The other end closed the stream (or it was reset).
    Eof,
}

struct Flight {
    link: u64,
    /// Which end receives it (0: the dialer, 1: the acceptor).
    to_end: usize,
    what: Carried,
}

/// A fault armed for the next bytes sent in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Flip a byte of the next control frame's tag.
    CorruptControl,
    /// Give the next frame header an unknown kind.
    CorruptHeader,
    /// Carry only this many more bytes, then reset the stream (both ends see it end).
    Truncate(usize),
}

/// One direction of a link's stream, as the simulator watches it.
#[derive(Default)]
struct Direction {
    /// Bytes sent and not yet read by the receiver.
    unread: usize,
    /// The receiver does not read: what arrives waits here.
    paused: bool,
    backlog: VecDeque<Carried>,
    fault: Option<Fault>,
    /// Framing state of the stream so far (faults target frames): header bytes of the
    /// current frame seen, and body bytes still to come.
    header: Vec<u8>,
    body_left: usize,
}

struct SimLink {
    /// (dialer, acceptor).
    ends: [usize; 2],
    latency: Micros,
    /// False once cut: everything on it is lost silently.
    up: bool,
    /// Whether each end's core still runs the link.
    open: [bool; 2],
    /// Towards end 0 and towards end 1.
    dir: [Direction; 2],
}

impl SimLink {
    fn end_of(&self, node: usize) -> usize {
        usize::from(self.ends[0] != node)
    }
}

struct SimNode {
    core: NodeCore,
    key: [u8; 32],
    alive: bool,
    /// Links this node's core runs.
    links: Vec<u64>,
    /// When this node's timers are due (as registered in `Sim::timers`).
    timer: Option<Micros>,
    /// Its work at the instant being run (an index into that instant's works).
    work: Option<usize>,
    delivered: Vec<Bytes>,
    events: Vec<crate::L3Event>,
}

/// Packets the relays forwarded, as their taps saw them: (node, hop limit, packet hash).
type Taps = Arc<Mutex<Vec<(usize, u8, u64)>>>;

/// The simulator.
pub struct Sim {
    now: Micros,
    nodes: Vec<SimNode>,
    /// Links by id (ids are handed out in order from 1: the slab's index + 1).
    links: LinkSlab,
    /// The newest link between two nodes, by (lower, higher) index.
    pairs: HashMap<(usize, usize), u64>,
    next_link: u64,
    /// Flights by arrival time, each time's in sending order. Latencies are whole µs and
    /// events cluster on few distinct times, so this beats a heap of all flights.
    queue: BTreeMap<Micros, VecDeque<Flight>>,
    /// Nodes' timers by due time.
    timers: BTreeSet<(Micros, usize)>,
    /// Unread bytes per link direction at most.
    window: usize,
    /// Bytes in `queue` and in paused readers' backlogs, now and at most so far.
    flight_bytes: usize,
    peak_flight_bytes: usize,
    /// Longest path any packet took (links crossed).
    pub max_hops: usize,
    /// Packets forwarded in total.
    pub(crate) forwarded: u64,
    taps: Taps,
    /// Forwarded packets recently seen: hash -> (node, hop limit, when).
    seen: HashMap<u64, Vec<(usize, u8, Micros)>>,
    cfg: CoreConfig,
    rng: SimRng,
    core_time: Duration,
    /// The part of it spent in instants with enough nodes to run side by side.
    shared_core_time: Duration,
    /// Runs the cores of one instant side by side (`None`: on the calling thread).
    pool: Option<rayon::ThreadPool>,
}

impl Sim {
    /// `n` nodes with identities derived from `seed`.
    pub fn new(seed: u64, n: usize, mut cfg: CoreConfig) -> Sim {
        cfg.routing.shared_verifications = Some(SharedVerifications::default());
        let mut sim = Sim {
            now: 0,
            nodes: Vec::with_capacity(n),
            links: LinkSlab::default(),
            pairs: HashMap::new(),
            next_link: 1,
            queue: BTreeMap::new(),
            timers: BTreeSet::new(),
            window: WINDOW,
            flight_bytes: 0,
            peak_flight_bytes: 0,
            max_hops: 0,
            forwarded: 0,
            taps: Taps::default(),
            seen: HashMap::new(),
            cfg,
            rng: SimRng::new(seed),
            core_time: Duration::ZERO,
            shared_core_time: Duration::ZERO,
            pool: None,
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        sim.set_threads(threads);
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
        let index = self.nodes.len();
        let mut core = NodeCore::new(
            id.clone(),
            self.cfg.clone(),
            epoch,
            self.now,
            Box::new(move || r.bytes32()),
        );
        let taps = self.taps.clone();
        core.set_relay_tap(Box::new(move |b: &[u8]| {
            if let Ok(mut t) = taps.lock() {
                t.push((index, b.get(1).copied().unwrap_or(0), packet_hash(b)));
            }
        }));
        self.nodes.push(SimNode {
            key: id.public_key(),
            core,
            alive: true,
            links: Vec::new(),
            timer: None,
            work: None,
            delivered: Vec::new(),
            events: Vec::new(),
        });
        index
    }

    /// Whether node `i` runs (it was not killed).
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    /// Control traffic sent by all nodes so far (what their links counted).
    pub fn control_traffic(&self) -> ControlTraffic {
        let mut t = ControlTraffic::default();
        for n in &self.nodes {
            let c = n.core.counters();
            t.messages += c.control_frames_sent;
            t.bytes += c.control_bytes_sent;
        }
        t
    }

    /// Where the memory beyond the routing tables is now. Walks every flight and link: for
    /// progress reports, not hot loops.
    pub fn memory(&self) -> SimMemory {
        let mut m = SimMemory {
            flight_chunks: self.queue.values().map(VecDeque::len).sum(),
            flight_bytes: self.flight_bytes,
            peak_flight_bytes: self.peak_flight_bytes,
            ..SimMemory::default()
        };
        for n in self.nodes.iter().filter(|n| n.alive) {
            for &l in &n.links {
                m.queued_bytes += n.core.link_pending_bytes(l);
                m.link_buffer_bytes += n.core.link_buffer_bytes(l);
                m.links += 1;
            }
        }
        m
    }

    /// Unread bytes each link direction may hold (at least 1; [`WINDOW`] by default).
    pub fn set_window(&mut self, bytes: usize) {
        self.window = bytes.max(1);
    }

    /// Runs the cores of one simulated instant on `threads` threads (1: on the calling
    /// thread; by default as many as the machine has cores). The outcome is the same for
    /// any number: the cores are independent within an instant, and their outputs are
    /// carried in node order.
    pub fn set_threads(&mut self, threads: usize) {
        self.pool = (threads > 1)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("sim-{i}"))
                    .build()
                    .ok()
            })
            .flatten();
    }

    /// Wall-clock time spent inside the nodes' cores so far (all nodes; the sum over the
    /// threads).
    pub fn core_time(&self) -> Duration {
        self.core_time
    }

    /// The part of [`Sim::core_time`] spent at instants with enough nodes to share among
    /// threads (counted on one thread too: the share a second thread can take).
    pub fn shared_core_time(&self) -> Duration {
        self.shared_core_time
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

    /// Opens a link with one-way latency `latency` µs: the lower-numbered node dials, the
    /// other accepts (it sees the link come from 10.x.y.z, the dialer's index). Both cores
    /// run the Noise handshake over it. A link already between the two stays as it is: the
    /// new one replaces it in [`Sim::cut`], [`Sim::latency`] and the fault calls.
    pub fn connect(&mut self, a: usize, b: usize, latency: Micros) {
        let (dialer, acceptor) = (a.min(b), a.max(b));
        let id = self.next_link;
        self.next_link += 1;
        self.links.insert(
            id,
            SimLink {
                ends: [dialer, acceptor],
                latency,
                up: true,
                open: [true, true],
                dir: Default::default(),
            },
        );
        self.pairs.insert(Sim::key(a, b), id);
        let from = LinkOrigin::Inbound(IpAddr::from(Ipv4Addr::from(
            0x0a00_0000 | (dialer as u32 & 0x00ff_ffff),
        )));
        for (node, origin) in [(acceptor, from), (dialer, LinkOrigin::Outbound)] {
            let t = Instant::now();
            let ok = self.nodes[node].core.open_link(id, origin, None, self.now);
            self.core_time += t.elapsed();
            let end = usize::from(node == acceptor);
            if ok {
                self.nodes[node].links.push(id);
            } else if let Some(l) = self.links.get_mut(&id) {
                l.open[end] = false;
            }
            self.after_core(node, Vec::new());
        }
    }

    /// The newest link between `a` and `b`.
    fn pair(&self, a: usize, b: usize) -> Option<u64> {
        self.pairs.get(&Sim::key(a, b)).copied()
    }

    /// Silently drops everything on the link between `a` and `b` (both ends find out by
    /// timeout).
    pub fn cut(&mut self, a: usize, b: usize) {
        if let Some(l) = self.pair(a, b).and_then(|id| self.links.get_mut(&id)) {
            l.up = false;
        }
    }

    /// Stops a node silently (its neighbors find out by timeout).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Flips a tag byte of the next control frame `from` sends to `to` (Noise then refuses
    /// it at `to`).
    pub fn corrupt_next_control(&mut self, from: usize, to: usize) {
        self.arm(from, to, Fault::CorruptControl);
    }

    /// Gives the next frame header `from` sends to `to` an unknown kind.
    pub fn corrupt_next_header(&mut self, from: usize, to: usize) {
        self.arm(from, to, Fault::CorruptHeader);
    }

    /// Carries only `keep` more bytes from `from` to `to`, then resets the stream: both ends
    /// see it end, `to` possibly in the middle of a frame.
    pub fn truncate_after(&mut self, from: usize, to: usize, keep: usize) {
        self.arm(from, to, Fault::Truncate(keep));
    }

    fn arm(&mut self, from: usize, to: usize, fault: Fault) {
        if let Some(l) = self.pair(from, to).and_then(|id| self.links.get_mut(&id)) {
            let end = l.end_of(to);
            l.dir[end].fault = Some(fault);
        }
    }

    /// Node `reader` stops (`false`) or resumes reading its newest link from `peer`. A reader
    /// that stops holds the writer back once a window of bytes is unread.
    pub fn set_reading(&mut self, reader: usize, peer: usize, reading: bool) {
        let Some(id) = self.pair(reader, peer) else {
            return;
        };
        let Some(l) = self.links.get_mut(&id) else {
            return;
        };
        let end = l.end_of(reader);
        l.dir[end].paused = !reading;
        if reading {
            let backlog = std::mem::take(&mut l.dir[end].backlog);
            for what in backlog {
                self.receive(id, end, what);
            }
        }
    }

    /// Whether node `i`'s core runs a link that is up (handshake done) to node `j`.
    pub fn linked(&self, i: usize, j: usize) -> bool {
        let key = self.nodes[j].key;
        self.nodes[i].core.neighbor_keys().any(|k| k == key)
    }

    /// Links node `i`'s core runs (handshaking ones included).
    pub fn links_of(&self, i: usize) -> usize {
        self.nodes[i].links.len()
    }

    /// The next hop node `i` uses towards node `j`.
    pub(crate) fn next_hop(&self, i: usize, j: usize) -> Option<usize> {
        let p = prefix_of(&self.address(j));
        let link = self.nodes[i].core.router.next_hop(&p)?;
        self.links.get(&link).map(|l| l.ends[1 - l.end_of(i)])
    }

    /// Every node's next hop towards node `j` (`None`: no route, or over a link or to a node
    /// that is dead; always `None` at `j`). One routing lookup per node: checking all pairs
    /// for loops with these is linear per destination, where walking each path is not.
    pub fn next_hops_towards(&self, j: usize) -> Vec<Option<usize>> {
        let p = prefix_of(&self.address(j));
        (0..self.nodes.len())
            .map(|i| {
                if i == j {
                    return None;
                }
                let link = self.nodes[i].core.router.next_hop(&p)?;
                let l = self.links.get(&link)?;
                let n = l.ends[1 - l.end_of(i)];
                (l.up && self.nodes[n].alive).then_some(n)
            })
            .collect()
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
            let p = prefix_of(&self.address(j));
            let Some(link) = self.nodes[at].core.router.next_hop(&p) else {
                return Err(PathError::NoRoute { to: j, path });
            };
            let Some(l) = self.links.get(&link) else {
                return Err(PathError::NoRoute { to: j, path });
            };
            let n = l.ends[1 - l.end_of(at)];
            if path.contains(&n) {
                return Err(PathError::Loop { path, next: n });
            }
            if !l.up || !self.nodes[n].alive {
                return Err(PathError::DeadHop { path, next: n });
            }
            path.push(n);
            at = n;
        }
        Ok(path)
    }

    /// The latency of the newest link between neighbors (µs).
    pub fn latency(&self, a: usize, b: usize) -> Option<Micros> {
        self.pair(a, b)
            .and_then(|id| self.links.get(&id))
            .map(|l| l.latency)
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
        let t = Instant::now();
        self.nodes[i].core.local(p.clone(), self.now, &mut out);
        self.core_time += t.elapsed();
        self.after_core(i, out);
        p
    }

    /// Puts a routed packet on the link from `from` to its neighbor `to`, as if `from`
    /// had sent it (tests: forged or hand-made packets).
    pub fn inject(&mut self, from: usize, to: usize, bytes: Bytes) {
        if let Some(id) = self.pair(from, to) {
            self.nodes[from].core.link_send_packet(id, bytes, self.now);
            self.after_core(from, Vec::new());
        }
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
        if let Carried::Bytes(b) = &flight.what {
            self.flight_bytes += b.len();
            self.peak_flight_bytes = self.peak_flight_bytes.max(self.flight_bytes);
        }
        self.queue.entry(at).or_default().push_back(flight);
    }

    /// A chunk left the simulator's hands (read, or lost with its link or node).
    fn landed(&mut self, what: &Carried) {
        if let Carried::Bytes(b) = what {
            self.flight_bytes -= b.len();
        }
    }

    /// Handles a core's outputs, carries the bytes its links have waiting, and files its
    /// next timer.
    fn after_core(&mut self, node: usize, out: Vec<CoreOut>) {
        for o in out {
            match o {
                CoreOut::Deliver(b) => self.nodes[node].delivered.push(b),
                CoreOut::Unreachable { dst, reason } => self.nodes[node]
                    .events
                    .push(crate::L3Event::Unreachable { dst, reason }),
                CoreOut::LinkDown { link, .. } => self.link_down(node, link),
                // Every neighbor has a link in the core, which routes these itself.
                CoreOut::LinkUp { .. }
                | CoreOut::Control(..)
                | CoreOut::Packet(..)
                | CoreOut::Close(_) => {}
            }
        }
        self.drain_taps();
        self.pull(node);
        let t = self.nodes[node].core.poll_timeout();
        if t != self.nodes[node].timer {
            if let Some(old) = self.nodes[node].timer {
                self.timers.remove(&(old, node));
            }
            if let Some(new) = t {
                self.timers.insert((new, node));
            }
            self.nodes[node].timer = t;
        }
    }

    /// `node`'s core forgot `link`: its end of the stream closes (the other end sees the
    /// stream end after the latency, unless the link was cut).
    fn link_down(&mut self, node: usize, link: u64) {
        self.nodes[node].links.retain(|l| *l != link);
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let end = l.end_of(node);
        l.open[end] = false;
        let (up, latency, other) = (l.up, l.latency, 1 - end);
        if l.open == [false, false] {
            // What waits for a paused reader goes with the link.
            let backlog: Vec<Carried> =
                l.dir.iter_mut().flat_map(|d| d.backlog.drain(..)).collect();
            for what in &backlog {
                self.landed(what);
            }
            self.links.remove(&link);
            return;
        }
        if up {
            let at = self.now + latency;
            self.schedule(
                at,
                Flight {
                    link,
                    to_end: other,
                    what: Carried::Eof,
                },
            );
        }
    }

    /// Carries what `node`'s links have waiting, within each direction's window.
    fn pull(&mut self, node: usize) {
        for k in 0..self.nodes[node].links.len() {
            let link = self.nodes[node].links[k];
            self.pull_link(node, link);
        }
    }

    /// Carries what `node` has waiting on `link`, within the window.
    fn pull_link(&mut self, node: usize, link: u64) {
        if !self.nodes[node].core.link_has_output(link) {
            return;
        }
        let Some(l) = self.links.get(&link) else {
            return;
        };
        let to_end = 1 - l.end_of(node);
        let room = self.window.saturating_sub(l.dir[to_end].unread);
        if room == 0 {
            return;
        }
        let bytes = self.nodes[node].core.link_take_output(link, room, self.now);
        self.send_bytes(link, to_end, bytes);
    }

    fn send_bytes(&mut self, link: u64, to_end: usize, mut bytes: Bytes) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let at = self.now + l.latency;
        let up = l.up;
        let d = &mut l.dir[to_end];
        let mut reset = false;
        if let Some(fault) = d.fault {
            let mut b = BytesMut::from(&bytes[..]);
            match fault {
                Fault::Truncate(keep) => {
                    b.truncate(keep);
                    reset = true;
                    d.fault = None;
                }
                Fault::CorruptControl | Fault::CorruptHeader => {
                    if corrupt(d, &mut b, fault) {
                        d.fault = None;
                    }
                }
            }
            bytes = b.freeze();
        } else {
            track_frames(d, &bytes);
        }
        d.unread += bytes.len();
        if !up {
            return;
        }
        let from_end = 1 - to_end;
        self.schedule(
            at,
            Flight {
                link,
                to_end,
                what: Carried::Bytes(bytes),
            },
        );
        if reset {
            // A reset: both ends see the stream end.
            for end in [to_end, from_end] {
                self.schedule(
                    at,
                    Flight {
                        link,
                        to_end: end,
                        what: Carried::Eof,
                    },
                );
            }
        }
    }

    /// Advances the virtual clock by `dur` µs, delivering bytes and running timers.
    pub fn run_for(&mut self, dur: Micros) {
        let end = self.now + dur;
        loop {
            let next_msg = self.queue.first_key_value().map(|(t, _)| *t);
            let next_timer = self.timers.first().copied();
            let msg_first = match (next_msg, next_timer) {
                (Some(m), Some((t, _))) => m <= t,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if msg_first {
                next_msg.unwrap_or(end)
            } else {
                next_timer.map_or(end, |(t, _)| t)
            };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            if msg_first {
                if let Some((_, flights)) = self.queue.pop_first() {
                    self.read_instant(flights);
                }
            } else {
                self.timers_instant();
            }
        }
        self.now = end;
    }

    /// Everything arriving now is read before any node sends the routing changes it
    /// caused (as a node reads all its ready links in one wake-up): each receiving node
    /// reads all its flights, then sends once. Reads happen before this instant's writes:
    /// the windows' room is made first, then the receivers send, then the writers whose
    /// bytes were read go on.
    fn read_instant(&mut self, flights: VecDeque<Flight>) {
        let mut works: Vec<Work> = Vec::new();
        let mut writers = Vec::new();
        for f in flights {
            let Some((to, from, up)) =
                (self.links.get(&f.link)).map(|l| (l.ends[f.to_end], l.ends[1 - f.to_end], l.up))
            else {
                self.landed(&f.what);
                continue;
            };
            if !self.nodes[to].alive {
                self.landed(&f.what);
                continue;
            }
            let w = *self.nodes[to].work.get_or_insert_with(|| {
                works.push(Work::new(to, Job::Read(Vec::new())));
                works.len() - 1
            });
            let Some(l) = self
                .links
                .get_mut(&f.link)
                .filter(|_| up && self.nodes[from].alive)
            else {
                self.landed(&f.what);
                continue;
            };
            let d = &mut l.dir[f.to_end];
            if d.paused {
                d.backlog.push_back(f.what);
                continue;
            }
            if let Carried::Bytes(b) = &f.what {
                d.unread = d.unread.saturating_sub(b.len());
            }
            let open = l.open[f.to_end];
            self.landed(&f.what);
            if open {
                if let Job::Read(reads) = &mut works[w].job {
                    reads.push((f.link, f.what));
                }
                writers.push((from, f.link, 1 - f.to_end));
            }
        }
        for w in &works {
            self.nodes[w.node].work = None;
        }
        self.run_works(works);
        // Reading made room in the windows: the writers may go on on these links.
        for (from, link, from_end) in writers {
            if self.nodes[from].alive && self.links.get(&link).is_some_and(|l| l.open[from_end]) {
                self.pull_link(from, link);
            }
        }
    }

    /// Runs every node's timers due now (nodes' timers are independent: what one sends
    /// arrives later).
    fn timers_instant(&mut self) {
        let mut works = Vec::new();
        while let Some(&(t, node)) = self.timers.first()
            && t <= self.now
        {
            self.timers.pop_first();
            self.nodes[node].timer = None;
            if self.nodes[node].alive {
                works.push(Work::new(node, Job::Timeout));
            }
        }
        self.run_works(works);
    }

    /// Runs the works' cores (side by side when there are enough), then carries their
    /// outputs in node order.
    fn run_works(&mut self, mut works: Vec<Work>) {
        let shared = instant::run(&mut self.nodes, &mut works, self.now, self.pool.as_ref());
        for w in works {
            self.core_time += w.took;
            if shared {
                self.shared_core_time += w.took;
            }
            self.after_core(w.node, w.out);
        }
    }

    /// The receiving end reads what arrived.
    fn receive(&mut self, link: u64, to_end: usize, what: Carried) {
        self.landed(&what);
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let (to, from, open) = (l.ends[to_end], l.ends[1 - to_end], l.open[to_end]);
        if let Carried::Bytes(b) = &what {
            l.dir[to_end].unread = l.dir[to_end].unread.saturating_sub(b.len());
        }
        // The writer's end of this link: reading made room in its window.
        let from_end = 1 - to_end;
        if !open {
            return;
        }
        let mut out = Vec::new();
        let t = Instant::now();
        match what {
            Carried::Bytes(b) => self.nodes[to]
                .core
                .link_receive(link, b, self.now, &mut out),
            Carried::Eof => self.nodes[to].core.link_closed(link, self.now, &mut out),
        }
        self.core_time += t.elapsed();
        self.after_core(to, out);
        // Reading made room in the window: the writer may go on on this link (its others
        // did not change).
        if self.nodes[from].alive && self.links.get(&link).is_some_and(|l| l.open[from_end]) {
            self.pull_link(from, link);
        }
    }

    /// Checks what the relays' taps saw for forwarding loops, and the longest path.
    fn drain_taps(&mut self) {
        let mut seen: Vec<(usize, u8, u64)> = match self.taps.lock() {
            Ok(mut t) if !t.is_empty() => std::mem::take(&mut *t),
            _ => return,
        };
        // The cores of one instant may run on several threads: their taps' order is not
        // the simulation's.
        seen.sort_unstable();
        let now = self.now;
        if self.seen.len() > 100_000 {
            self.seen.retain(|_, v| {
                v.iter()
                    .any(|(_, _, t)| now.saturating_sub(*t) < LOOP_WINDOW)
            });
        }
        for (node, hop_limit, hash) in seen {
            self.forwarded += 1;
            // Links crossed once this relay sends it on: the ones the hop limit counts (it
            // starts at 64 and each relay takes one) plus the next.
            let hops = usize::from(crate::wire::DEFAULT_HOP_LIMIT.saturating_sub(hop_limit)) + 1;
            self.max_hops = self.max_hops.max(hops);
            let v = self.seen.entry(hash).or_default();
            for (n, h, t) in v.iter() {
                assert!(
                    !(*n == node && *h != hop_limit && now.saturating_sub(*t) < LOOP_WINDOW),
                    "forwarding loop: node {node} forwarded the same packet with hop limits {h} and {hop_limit}"
                );
            }
            v.push((node, hop_limit, now));
        }
    }
}

/// Simulated links by id: a vector indexed by id - 1 (lookups on every hop of every path
/// check; hashing the id cost more than the rest of the walk).
#[derive(Default)]
struct LinkSlab(Vec<Option<SimLink>>);

impl LinkSlab {
    fn insert(&mut self, id: u64, l: SimLink) {
        let i = (id - 1) as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(l);
    }
    fn get(&self, id: &u64) -> Option<&SimLink> {
        self.0.get((*id as usize).wrapping_sub(1))?.as_ref()
    }
    fn get_mut(&mut self, id: &u64) -> Option<&mut SimLink> {
        self.0.get_mut((*id as usize).wrapping_sub(1))?.as_mut()
    }
    fn remove(&mut self, id: &u64) {
        if let Some(slot) = self.0.get_mut((*id as usize).wrapping_sub(1)) {
            *slot = None;
        }
    }
}

/// A forwarded packet's identity: everything but the hop limit.
fn packet_hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.first().hash(&mut h);
    b.get(2..).hash(&mut h);
    h.finish()
}

/// Follows the frames in `bytes` (one direction's stream, in order).
fn track_frames(d: &mut Direction, bytes: &[u8]) {
    let mut pos = 0;
    while pos < bytes.len() {
        if d.body_left > 0 {
            let n = d.body_left.min(bytes.len() - pos);
            d.body_left -= n;
            pos += n;
            continue;
        }
        d.header.push(bytes[pos]);
        pos += 1;
        if d.header.len() == FRAME_HEADER_LEN {
            let h = &d.header;
            d.body_left = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            d.header.clear();
        }
    }
}

/// Applies `fault` to the first frame in `b` it fits (following the framing as it goes);
/// `true` when applied.
fn corrupt(d: &mut Direction, b: &mut [u8], fault: Fault) -> bool {
    let mut applied = false;
    let mut pos = 0;
    while pos < b.len() {
        if d.body_left > 0 {
            let n = d.body_left.min(b.len() - pos);
            d.body_left -= n;
            pos += n;
            continue;
        }
        let at_kind = d.header.len() == FRAME_HEADER_LEN - 1;
        if at_kind && !applied {
            let kind = b[pos];
            let h = &d.header;
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if fault == Fault::CorruptHeader {
                b[pos] = 9;
                applied = true;
            } else if kind == FrameKind::Control as u8 && b.len() >= pos + 1 + len {
                // The tag is the body's last 16 bytes.
                b[pos + len] ^= 0x55;
                applied = true;
            }
        }
        d.header.push(b[pos]);
        pos += 1;
        if d.header.len() == FRAME_HEADER_LEN {
            let h = &d.header;
            d.body_left = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            d.header.clear();
        }
    }
    applied
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

/// Whether the `alive` nodes other than `gone` stay connected over `adj` once `gone` leaves:
/// churn scenarios pick leavers that do not partition the network, since an isolated node
/// would never converge.
pub fn stays_connected_without(adj: &[BTreeSet<usize>], alive: &[usize], gone: usize) -> bool {
    let Some(&start) = alive.iter().find(|&&v| v != gone) else {
        return false;
    };
    let mut seen = BTreeSet::from([start, gone]);
    let mut stack = vec![start];
    while let Some(v) = stack.pop() {
        for &w in &adj[v] {
            if seen.insert(w) {
                stack.push(w);
            }
        }
    }
    alive.iter().all(|v| seen.contains(v))
}
