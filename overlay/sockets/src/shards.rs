//! The stack's state, shared by the [`Stack`](crate::Stack) handle, its poll task and the
//! streams and listeners: shards of smoltcp sockets, listeners and ephemeral ports behind one
//! mutex ([`Shared`]). The stack drives it; streams and listeners only lock it and touch their
//! own socket.
//!
//! smoltcp's egress, its TCP socket lookup on ingress and its timer query each walk every
//! socket of an interface, so with one interface every packet would cost O(sockets), idle ones
//! included. The state is therefore split into [`SHARDS`] shards, each its own smoltcp
//! interface and socket set. An inbound packet goes to the shard its connection (remote
//! address, remote port, local port) hashes to; `connect` picks a local port, and with it the
//! shard its replies will hash to. Only shards with work are polled: inbound packets, a stream
//! that closed, read with its window at most half open, or wrote but could not send its own
//! segments (it marks its shard dirty before notifying), or the shard's own smoltcp timer
//! (cached after each poll; the poll task sleeps until the earliest).

use crate::buffers::SocketMemory;
use crate::config::StackConfig;
use crate::demux::{
    ConnectionKey, SegmentSeq, connection_request, inbound_connection, inbound_segment_seq,
};
use crate::device::{Outbound, ShardDevice};
use bytes::Bytes;
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
// aHash, not std's SipHash, for every per-packet lookup (the shard of an inbound packet, its
// connection's received sequence numbers, a socket's buffers): keyed at random per map, so a
// peer cannot aim connections at one bucket or shard, and several times cheaper per packet.
use ahash::{HashMap, HashSet};
use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use tokio::sync::{Notify, mpsc};

/// Shards of the stack. Per-packet work is O(sockets / SHARDS); the poll task looks at every
/// shard's flags once per round, O(SHARDS). Measured on an in-memory wire with 1000 idle
/// connections beside a 1-byte ping-pong: one shard 150–190 µs per round trip, 16 or 32
/// shards ~25 µs, against ~20 µs with no idle connections; 32 leaves room for thousands.
const SHARDS: usize = 32;
const _: () = assert!(SHARDS <= 64, "dirty shards are a u64 bit set");

/// Listening sockets kept ready per listener in each shard. Every inbound packet is followed by
/// a refill before the shard's next one is processed, so one spare suffices for a burst of
/// SYNs; more would only hold sockets in every shard.
const LISTEN_SPARES: usize = 1;
const EPHEMERAL_START: u16 = 49152;

/// A writer sends its own segments only while its shard holds at most this many sockets: an
/// egress pass looks at every socket of the shard, so with 1000 streams (31 per shard) each
/// write paid for 31 and the writers starved the poll task and the node (`sockets many`
/// fell from 3.3 to 1.7 Gbit/s). The poll task's one pass per round serves all of them.
const OWN_EGRESS_MAX_SOCKETS: usize = 4;

/// A write of more than this many bytes leaves its segments to the poll task: a bulk writer
/// sending a whole window under the shard's lock kept the poll task (taking the peer's ACKs)
/// waiting for it, and one stream on the in-memory wire fell from 19.6 to 15.4 Gbit/s. Small
/// writes (requests, responses, the gateway's traffic) are the ones a task hand-off costs most.
const OWN_EGRESS_MAX_WRITE: usize = 16 * 1024;

/// Connections whose received sequence numbers one shard tracks (for giving receive buffers
/// back). Entries without a socket are pruned at every release; a flood of SYNs beyond this
/// is simply not tracked, and those connections keep their receive pages until they close.
const MAX_TRACKED_PER_SHARD: usize = 4096;

/// What one connection has received: where its data starts and the end of the highest
/// payload seen.
#[derive(Clone, Copy)]
struct ReceivedSeq {
    start: u32,
    highest: u32,
}

/// A socket of the stack: the shard holding it and its handle there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SocketId {
    pub shard: usize,
    pub handle: SocketHandle,
}

/// A listener's sockets in one shard.
#[derive(Default)]
struct ListenerShard {
    listening: Vec<SocketHandle>,
    /// Taken by a SYN, handshake not finished.
    embryonic: Vec<SocketHandle>,
}

pub(crate) struct Listener {
    shards: Vec<ListenerShard>,
    /// Established connections of every shard, in the order they were established.
    pub(crate) ready: VecDeque<SocketId>,
    pub(crate) waker: Option<Waker>,
}

impl Listener {
    pub(crate) fn new() -> Listener {
        Listener {
            shards: (0..SHARDS).map(|_| ListenerShard::default()).collect(),
            ready: VecDeque::new(),
            waker: None,
        }
    }

    fn pending(&self) -> usize {
        self.ready.len() + self.shards.iter().map(|s| s.embryonic.len()).sum::<usize>()
    }
}

struct Shard {
    iface: Interface,
    /// Declared before `memory`: the sockets borrow their buffers from it and drop first.
    sockets: SocketSet<'static>,
    inbound: VecDeque<Bytes>,
    /// Sockets whose stream was dropped: removed once closed.
    orphans: Vec<SocketHandle>,
    /// Local ports of the shard's connecting sockets, freed with the socket.
    ephemeral: HashMap<SocketHandle, u16>,
    /// smoltcp's next timer for this shard as of its last poll (`None`: nothing scheduled).
    /// Valid until the shard is touched, and every touch marks it dirty.
    poll_at: Option<SmolInstant>,
    /// The buffers of each socket in `sockets`, removed after the socket.
    memory: HashMap<SocketHandle, SocketMemory>,
    /// Received sequence numbers per connection, from inbound headers.
    received: HashMap<ConnectionKey, ReceivedSeq>,
}

impl Shard {
    /// Notes an inbound segment's sequence numbers for its connection.
    fn track_received(&mut self, key: ConnectionKey, seg: SegmentSeq) {
        if seg.syn {
            match self.received.get(&key) {
                // A retransmitted SYN: the connection's data so far still counts.
                Some(r) if r.start == seg.end => return,
                // A new connection on the same tuple (new initial sequence number).
                Some(_) => {}
                None if self.received.len() >= MAX_TRACKED_PER_SHARD => return,
                None => {}
            }
            self.received.insert(
                key,
                ReceivedSeq {
                    start: seg.end,
                    highest: seg.end,
                },
            );
        } else if let Some(r) = self.received.get_mut(&key) {
            // Sequence numbers wrap: "after" is a positive signed distance.
            if (seg.end.wrapping_sub(r.highest) as i32) > 0 {
                r.highest = seg.end;
            }
        }
    }

    /// Whether a socket of this shard is connected, or connecting, as `key`. A socket in
    /// TIME-WAIT does not count: the peer may open the connection anew.
    fn holds(&self, key: ConnectionKey) -> bool {
        self.sockets.iter().any(|(_, socket)| match socket {
            smoltcp::socket::Socket::Tcp(t) => {
                !matches!(
                    t.state(),
                    tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait
                ) && t.local_endpoint().is_some_and(|l| l.port == key.local_port)
                    && t.remote_endpoint().is_some_and(|r| {
                        r.port == key.remote_port && r.addr == IpAddress::Ipv6(key.remote)
                    })
            }
            #[allow(unreachable_patterns)]
            _ => false,
        })
    }
}

pub(crate) struct Inner {
    shards: Vec<Shard>,
    pub(crate) outbound: Outbound,
    /// Bit `i`: shard `i` has a socket a stream changed since the shard's last poll.
    dirty: u64,
    /// Keyed hash of connection identities (a peer cannot aim its connections at one shard).
    shard_hasher: ahash::RandomState,
    /// The shard polled first next round: with the outbound queue filling up, shards take
    /// turns at its room.
    first_shard: usize,
    mtu: usize,
    pub(crate) listeners: HashMap<u16, Listener>,
    ephemeral_in_use: HashSet<u16>,
    next_ephemeral: u16,
    pub(crate) config: StackConfig,
    pub(crate) stopped: bool,
    /// Connecting sockets failed because their destination was reported unreachable: their
    /// connect says so instead of "refused or timed out". Removed when the connect returns.
    pub(crate) unreachable: HashSet<(usize, SocketHandle)>,
    /// The L3 port, for writers sending their own segments ([`Shared::send_after_write`]);
    /// dropped on stop so the port closes with the poll task.
    pub(crate) tx: Option<mpsc::Sender<Bytes>>,
    /// When the poll task will next wake on its own, as of its last round (`None`: only for
    /// a packet, a notification or a permit). A writer whose shard's new timer is earlier
    /// wakes it.
    pub(crate) planned_wake: Option<SmolInstant>,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the poll task: something a stream did may need packets sent.
    pub(crate) notify: Notify,
    pub(crate) address: Ipv6Addr,
    pub(crate) mtu: usize,
    pub(crate) packets_in: AtomicU64,
    pub(crate) packets_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) poll_rounds: AtomicU64,
    /// The stack's clock starts here: smoltcp's own `Instant::now` reads the wall clock, which
    /// can jump (and costs a little more); TCP timers want a monotonic one.
    epoch: std::time::Instant,
}

impl Shared {
    /// The state of a new stack for `address`, its shards set up and empty.
    pub(crate) fn new(
        address: Ipv6Addr,
        mtu: usize,
        config: StackConfig,
        tx: mpsc::Sender<Bytes>,
    ) -> Shared {
        // IPv6 needs 1280; an IPv6 packet's payload length field caps it at 65535 + 40.
        let mtu = mtu.clamp(1280, 65535);
        // Initial sequence numbers and the first ephemeral port come from SipHash with random
        // keys (computed once per stack); the per-packet shard choice from aHash.
        let seeds = RandomState::new();
        let shard_hasher = ahash::RandomState::new();
        let mut outbound = Outbound::new(config.outbound_queue);
        let epoch = std::time::Instant::now();
        let now = SmolInstant::ZERO;
        let shards = (0..SHARDS)
            .map(|i| {
                let mut inbound = VecDeque::new();
                let mut device = ShardDevice {
                    inbound: &mut inbound,
                    outbound: &mut outbound,
                    mtu,
                };
                let mut iface_config = Config::new(HardwareAddress::Ip);
                // Initial sequence numbers come from this: each shard its own, unpredictable.
                iface_config.random_seed = seeds.hash_one(("seed", i));
                let mut iface = Interface::new(iface_config, &mut device, now);
                iface.update_ip_addrs(|addrs| {
                    // The node owns exactly this address; everything else is reached through
                    // the L3 port (medium-ip has no neighbours, so no routes are needed).
                    let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(address), 128));
                });
                Shard {
                    iface,
                    sockets: SocketSet::new(Vec::new()),
                    inbound,
                    orphans: Vec::new(),
                    ephemeral: HashMap::default(),
                    poll_at: None,
                    memory: HashMap::default(),
                    received: HashMap::default(),
                }
            })
            .collect();
        let start = (seeds.hash_one("ephemeral") % 16384) as u16;
        let inner = Inner {
            shards,
            outbound,
            dirty: 0,
            shard_hasher,
            first_shard: 0,
            mtu,
            listeners: HashMap::default(),
            ephemeral_in_use: HashSet::default(),
            next_ephemeral: EPHEMERAL_START + start,
            config,
            stopped: false,
            unreachable: HashSet::default(),
            tx: Some(tx),
            planned_wake: None,
        };
        Shared {
            inner: Mutex::new(inner),
            notify: Notify::new(),
            address,
            mtu,
            packets_in: AtomicU64::new(0),
            packets_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            poll_rounds: AtomicU64::new(0),
            epoch,
        }
    }

    /// The stack's time: monotonic, from the stack's start.
    pub(crate) fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves smoltcp state consistent enough to keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream wrote into a socket of `shard`: sends the shard's segments from here, on the
    /// writer's task, instead of handing the work to the poll task (a task hand-off per
    /// packet). Leaves it to the poll task (shard marked dirty) when packets already wait for
    /// the L3 port (they go first), inbound packets wait on the shard, the write was larger
    /// than [`OWN_EGRESS_MAX_WRITE`], or the shard holds more than [`OWN_EGRESS_MAX_SOCKETS`]
    /// sockets. Returns whether the poll task must be woken: that work left to it, packets
    /// left waiting for room on the L3 port, or the shard's new timer earlier than the poll
    /// task's planned wake-up.
    pub(crate) fn send_after_write(&self, inner: &mut Inner, shard: usize, written: usize) -> bool {
        if inner.tx.is_none()
            || written > OWN_EGRESS_MAX_WRITE
            || !inner.outbound.queue.is_empty()
            || !inner.shards[shard].inbound.is_empty()
            || inner.shards[shard].memory.len() > OWN_EGRESS_MAX_SOCKETS
        {
            inner.mark_dirty(shard);
            return true;
        }
        let now = self.now();
        // What the poll task would do for this shard (`Inner::poll_due`).
        inner.dirty &= !(1 << shard);
        inner.poll_shard(shard, now);
        let s = &mut inner.shards[shard];
        s.poll_at = s.iface.poll_at(now, &s.sockets);
        let mut wake = match (s.poll_at, inner.planned_wake) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(planned)) => at < planned,
        };
        let Inner { tx, outbound, .. } = inner;
        if let Some(tx) = tx {
            while let Some(p) = outbound.queue.pop_front() {
                let len = p.len();
                match tx.try_send(p) {
                    Ok(()) => {
                        self.packets_out.fetch_add(1, Ordering::Relaxed);
                        self.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    // Full: the poll task waits for a permit. Closed: it stops the stack.
                    Err(
                        mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p),
                    ) => {
                        outbound.queue.push_front(p);
                        wake = true;
                        break;
                    }
                }
            }
        }
        wake
    }
}

/// Closed and nothing left to send: an aborted socket still owes its peer one RST while it has
/// an endpoint.
fn finished(socket: &tcp::Socket) -> bool {
    socket.state() == tcp::State::Closed && socket.local_endpoint().is_none()
}

pub(crate) fn stopped_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the overlay stack has stopped",
    )
}

pub(crate) fn endpoint_v6(ep: IpEndpoint) -> SocketAddrV6 {
    match ep.addr {
        IpAddress::Ipv6(a) => SocketAddrV6::new(a, ep.port, 0, 0),
    }
}

impl Inner {
    /// TCP sockets currently held (streams, listeners' spare sockets, closing sockets).
    pub(crate) fn socket_count(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.sockets.iter().count() as u64)
            .sum()
    }

    /// Connections (sockets with a peer, closing ones included) held by each shard.
    pub(crate) fn connections_per_shard(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .sockets
                    .iter()
                    .filter(|(_, socket)| match socket {
                        smoltcp::socket::Socket::Tcp(s) => s.remote_endpoint().is_some(),
                        #[allow(unreachable_patterns)]
                        _ => false,
                    })
                    .count()
            })
            .collect()
    }

    /// Starts a handshake to `remote` from a fresh ephemeral port (its shard marked dirty).
    pub(crate) fn connect(&mut self, remote: SocketAddrV6) -> io::Result<SocketId> {
        let port = self.allocate_port()?;
        // The local port decides the shard: the peer's replies hash to the same one.
        let shard = self.shard_of(ConnectionKey {
            remote: *remote.ip(),
            remote_port: remote.port(),
            local_port: port,
        });
        let (mut socket, memory) = match self.new_socket() {
            Ok(s) => s,
            Err(e) => {
                self.ephemeral_in_use.remove(&port);
                return Err(e);
            }
        };
        socket.set_timeout(Some(SmolDuration::from_micros(
            self.config.connect_timeout.as_micros() as u64,
        )));
        let remote_ep = IpEndpoint::new(IpAddress::Ipv6(*remote.ip()), remote.port());
        let s = &mut self.shards[shard];
        if let Err(e) = socket.connect(s.iface.context(), remote_ep, port) {
            // The socket before the memory it borrows.
            drop(socket);
            drop(memory);
            self.ephemeral_in_use.remove(&port);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot connect to {remote}: {e}"),
            ));
        }
        let handle = s.sockets.add(socket);
        s.memory.insert(handle, memory);
        s.ephemeral.insert(handle, port);
        self.mark_dirty(shard);
        Ok(SocketId { shard, handle })
    }

    /// A fresh TCP socket with the stack's buffers, congestion control and keep-alive, and
    /// the memory its buffers live in (kept beside the socket, dropped after it).
    fn new_socket(&self) -> io::Result<(tcp::Socket<'static>, SocketMemory)> {
        let size = self.config.socket_buffer.max(4096);
        let (memory, rx, tx) = SocketMemory::new(size)?;
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        // Streams carry proxied request/response traffic: latency over coalescing.
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(SmolDuration::from_micros(
            self.config.keep_alive.as_micros() as u64,
        )));
        Ok((socket, memory))
    }

    /// A socket of the stack. Whoever changes it in a way that may need packets sent marks its
    /// shard dirty ([`Inner::mark_dirty`]) before notifying the poll task.
    pub(crate) fn socket_mut(&mut self, id: SocketId) -> &mut tcp::Socket<'static> {
        self.shards[id.shard]
            .sockets
            .get_mut::<tcp::Socket>(id.handle)
    }

    /// A stream wrote into its send buffer: it may be given back once the data is acknowledged.
    pub(crate) fn note_sent(&mut self, id: SocketId) {
        if let Some(m) = self.shards[id.shard].memory.get_mut(&id.handle) {
            m.sent_since_release = true;
        }
    }

    /// A stream read `n` bytes from its receive buffer.
    pub(crate) fn note_read(&mut self, id: SocketId, n: usize) {
        if let Some(m) = self.shards[id.shard].memory.get_mut(&id.handle) {
            m.read_since_release = true;
            m.read_total = m.read_total.wrapping_add(n as u32);
        }
    }

    /// Gives back the buffers used since their last release that are empty now: send buffers
    /// whose data was all acknowledged, receive buffers whose connection has had everything
    /// it received read (no out-of-order segment can be waiting in them). Forgets the
    /// received sequence numbers of connections that no socket holds. Returns how many
    /// buffers were given back.
    pub(crate) fn release_idle_buffers(&mut self) -> usize {
        let mut released = 0;
        for shard in &mut self.shards {
            let mut live = HashSet::default();
            for (handle, memory) in &mut shard.memory {
                let socket = shard.sockets.get::<tcp::Socket>(*handle);
                let key = socket
                    .local_endpoint()
                    .zip(socket.remote_endpoint())
                    .map(|(l, r)| ConnectionKey {
                        remote: endpoint_v6(r).ip().to_owned(),
                        remote_port: r.port,
                        local_port: l.port,
                    });
                if let Some(key) = key {
                    live.insert(key);
                }
                if memory.sent_since_release && socket.send_queue() == 0 {
                    memory.release_send();
                    released += 1;
                }
                if memory.read_since_release
                    && socket.recv_queue() == 0
                    && let Some(r) = key.and_then(|k| shard.received.get(&k))
                    && r.highest.wrapping_sub(r.start) == memory.read_total
                {
                    memory.release_recv();
                    released += 1;
                }
            }
            shard.received.retain(|k, _| live.contains(k));
        }
        released
    }

    /// Bytes of socket buffer memory resident in RAM, every socket of every shard.
    pub(crate) fn buffer_resident_bytes(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|shard| shard.memory.values())
            .map(|m| m.resident() as u64)
            .sum()
    }

    pub(crate) fn mark_dirty(&mut self, shard: usize) {
        self.dirty |= 1 << shard;
    }

    fn shard_of(&self, key: ConnectionKey) -> usize {
        (self
            .shard_hasher
            .hash_one((key.remote, key.remote_port, key.local_port))
            % SHARDS as u64) as usize
    }

    /// Queues an inbound packet on its connection's shard; a packet that is not TCP (or not
    /// parseable) goes to shard 0, whose smoltcp answers or drops it as a single stack would.
    pub(crate) fn route_inbound(&mut self, packet: Bytes) {
        let key = inbound_connection(&packet);
        let shard = key.map_or(0, |key| self.shard_of(key));
        if let Some(key) = key
            && let Some(seg) = inbound_segment_seq(&packet)
        {
            self.shards[shard].track_received(key, seg);
        }
        self.shards[shard].inbound.push_back(packet);
    }

    fn allocate_port(&mut self) -> io::Result<u16> {
        for _ in 0..(u16::MAX - EPHEMERAL_START) {
            let port = self.next_ephemeral;
            self.next_ephemeral = if port == u16::MAX {
                EPHEMERAL_START
            } else {
                port + 1
            };
            if !self.ephemeral_in_use.contains(&port) && !self.listeners.contains_key(&port) {
                self.ephemeral_in_use.insert(port);
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no free ephemeral port on the overlay stack",
        ))
    }

    /// Removes a socket from its shard and frees its ephemeral port.
    fn remove(&mut self, id: SocketId) {
        self.unreachable.remove(&(id.shard, id.handle));
        let shard = &mut self.shards[id.shard];
        // The socket first: it borrows the memory.
        drop(shard.sockets.remove(id.handle));
        shard.memory.remove(&id.handle);
        if let Some(port) = shard.ephemeral.remove(&id.handle) {
            self.ephemeral_in_use.remove(&port);
        }
    }

    /// Hands a socket whose owner went away to the stack, which removes it once closed.
    pub(crate) fn orphan(&mut self, id: SocketId) {
        let socket = self.socket_mut(id);
        if finished(socket) {
            self.remove(id);
        } else {
            // Bound how long a closing socket may linger (peer never acknowledges our FIN).
            socket.set_timeout(Some(SmolDuration::from_secs(30)));
            self.shards[id.shard].orphans.push(id.handle);
            // It owes its peer a FIN or RST.
            self.mark_dirty(id.shard);
        }
    }

    fn reap_orphans(&mut self, shard: usize) {
        let mut i = 0;
        while i < self.shards[shard].orphans.len() {
            let handle = self.shards[shard].orphans[i];
            let socket = self.socket_mut(SocketId { shard, handle });
            // Nobody will read what arrives after close: reset like a kernel stack does.
            if socket.recv_queue() > 0 {
                socket.abort();
                // The RST goes out on this poll's egress or, if it already ran, the next.
                self.mark_dirty(shard);
            }
            if finished(self.socket_mut(SocketId { shard, handle })) {
                self.shards[shard].orphans.swap_remove(i);
                self.remove(SocketId { shard, handle });
            } else {
                i += 1;
            }
        }
    }

    /// In one shard: moves established connections to the accept queues and refills the
    /// listening sockets that SYNs took.
    fn maintain_listeners(&mut self, shard: usize) {
        // smoltcp reports a state change for every packet it processes or emits, so this runs
        // per packet: most of the time no listener's socket of this shard changed (no SYN, no
        // handshake in progress, every spare still listening), and checking that is cheap.
        let sockets = &self.shards[shard].sockets;
        let idle = self.listeners.values().all(|l| {
            let ls = &l.shards[shard];
            ls.embryonic.is_empty()
                && ls.listening.len() >= LISTEN_SPARES
                && ls
                    .listening
                    .iter()
                    .all(|h| sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen)
        });
        if idle {
            return;
        }
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let Some(mut l) = self.listeners.remove(&port) else {
                continue;
            };
            let sockets = &mut self.shards[shard].sockets;
            let ls = &mut l.shards[shard];
            let mut i = 0;
            while i < ls.listening.len() {
                let h = ls.listening[i];
                if sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen {
                    i += 1;
                } else {
                    ls.embryonic.push(ls.listening.swap_remove(i));
                }
            }
            let mut woke = false;
            let mut closed = Vec::new();
            let mut i = 0;
            while i < ls.embryonic.len() {
                let h = ls.embryonic[i];
                match sockets.get::<tcp::Socket>(h).state() {
                    tcp::State::SynReceived => i += 1,
                    // A reset handshake returns the socket to listening.
                    tcp::State::Listen => ls.listening.push(ls.embryonic.swap_remove(i)),
                    tcp::State::Closed | tcp::State::TimeWait => {
                        closed.push(ls.embryonic.swap_remove(i));
                    }
                    _ => {
                        ls.embryonic.swap_remove(i);
                        let timeout = self.config.stream_timeout;
                        sockets.get_mut::<tcp::Socket>(h).set_timeout(Some(
                            SmolDuration::from_micros(timeout.as_micros() as u64),
                        ));
                        l.ready.push_back(SocketId { shard, handle: h });
                        woke = true;
                    }
                }
            }
            for handle in closed {
                self.remove(SocketId { shard, handle });
            }
            self.refill_shard(&mut l, port, shard);
            if woke && let Some(w) = l.waker.take() {
                w.wake();
            }
            self.listeners.insert(port, l);
        }
    }

    /// Tops up a listener's spare listening sockets in one shard if its backlog has room.
    fn refill_shard(&mut self, l: &mut Listener, port: u16, shard: usize) {
        // The backlog counts every shard's pending connections; spares already listening may
        // take up to SHARDS × LISTEN_SPARES more SYNs before it is enforced.
        if l.pending() >= self.config.accept_backlog {
            return;
        }
        while l.shards[shard].listening.len() < LISTEN_SPARES {
            let Ok((mut socket, memory)) = self.new_socket() else {
                // Out of address space: the SYN meets no spare and is refused.
                break;
            };
            if socket
                .listen(IpListenEndpoint { addr: None, port })
                .is_err()
            {
                drop(socket);
                drop(memory);
                break;
            }
            let s = &mut self.shards[shard];
            let handle = s.sockets.add(socket);
            s.memory.insert(handle, memory);
            l.shards[shard].listening.push(handle);
        }
    }

    /// Tops up a listener's spares in every shard (a new listener, or room freed by accept).
    pub(crate) fn refill_listener(&mut self, port: u16) {
        let Some(mut l) = self.listeners.remove(&port) else {
            return;
        };
        if l.pending() < self.config.accept_backlog {
            for shard in 0..SHARDS {
                self.refill_shard(&mut l, port, shard);
            }
        }
        self.listeners.insert(port, l);
    }

    /// Closes a listener: its unaccepted connections are reset.
    pub(crate) fn close_listener(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for (shard, ls) in l.shards.into_iter().enumerate() {
                for handle in ls.listening {
                    self.remove(SocketId { shard, handle });
                }
                for handle in ls.embryonic {
                    let id = SocketId { shard, handle };
                    self.socket_mut(id).abort();
                    self.orphan(id);
                }
            }
            for id in l.ready {
                self.socket_mut(id).abort();
                self.orphan(id);
            }
        }
    }

    /// Fails every connect in progress to `dst` (the node has no route to it): the sockets
    /// are aborted and their connects return `HostUnreachable` at once. Returns how many.
    pub(crate) fn fail_connects_to(&mut self, dst: Ipv6Addr) -> usize {
        let mut failed = 0;
        for (i, shard) in self.shards.iter_mut().enumerate() {
            for (handle, socket) in shard.sockets.iter_mut() {
                let smoltcp::socket::Socket::Tcp(t) = socket else {
                    continue;
                };
                if t.state() == tcp::State::SynSent
                    && t.remote_endpoint()
                        .is_some_and(|r| r.addr == IpAddress::Ipv6(dst))
                {
                    t.abort();
                    self.unreachable.insert((i, handle));
                    failed += 1;
                }
            }
            if failed > 0 {
                self.dirty |= 1 << i;
            }
        }
        failed
    }

    pub(crate) fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.tx = None;
        for shard in &mut self.shards {
            for (_, socket) in shard.sockets.iter_mut() {
                if let smoltcp::socket::Socket::Tcp(s) = socket {
                    // Wakes every waiting reader and writer; they then see the stack stopped.
                    s.abort();
                }
            }
        }
        for l in self.listeners.values_mut() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
    }

    /// Polls every shard that has work: inbound packets, a dirty socket, or a due timer. Each
    /// polled shard's next timer is cached for [`Inner::next_poll_at`].
    pub(crate) fn poll_due(&mut self, now: SmolInstant) {
        let first = self.first_shard;
        self.first_shard = (first + 1) % SHARDS;
        for k in 0..SHARDS {
            let shard = (first + k) % SHARDS;
            let s = &self.shards[shard];
            let due = self.dirty & (1 << shard) != 0
                || !s.inbound.is_empty()
                || s.poll_at.is_some_and(|at| at <= now);
            if !due {
                continue;
            }
            self.dirty &= !(1 << shard);
            self.poll_shard(shard, now);
            let s = &mut self.shards[shard];
            s.poll_at = s.iface.poll_at(now, &s.sockets);
        }
    }

    /// The earliest cached timer of any shard.
    pub(crate) fn next_poll_at(&self) -> Option<SmolInstant> {
        self.shards.iter().filter_map(|s| s.poll_at).min()
    }

    /// One shard's round: its inbound packets, then everything it wants to send.
    fn poll_shard(&mut self, shard: usize, now: SmolInstant) {
        let mtu = self.mtu;
        let mut changed = false;
        loop {
            let s = &mut self.shards[shard];
            let Some(front) = s.inbound.front() else {
                break;
            };
            if connection_request(front).is_some_and(|key| s.holds(key)) {
                // A retransmitted SYN of a connection a socket here already holds (its SYN-ACK
                // was slow or lost). smoltcp offers a segment to the sockets in slot order and a
                // listening socket takes any SYN for its port, so a spare listener in a lower
                // slot would open a second socket for the same connection and the two would
                // split its segments. The holder retransmits its SYN-ACK on its own timer.
                s.inbound.pop_front();
                continue;
            }
            let mut device = ShardDevice {
                inbound: &mut s.inbound,
                outbound: &mut self.outbound,
                mtu,
            };
            match s
                .iface
                .poll_ingress_single(now, &mut device, &mut s.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => {
                    changed = true;
                    if !self.listeners.is_empty() {
                        self.maintain_listeners(shard);
                    }
                }
            }
        }
        while !self.outbound.full() {
            let s = &mut self.shards[shard];
            let mut device = ShardDevice {
                inbound: &mut s.inbound,
                outbound: &mut self.outbound,
                mtu,
            };
            match s.iface.poll_egress(now, &mut device, &mut s.sockets) {
                PollResult::None => break,
                PollResult::SocketStateChanged => changed = true,
            }
        }
        if changed {
            if !self.listeners.is_empty() {
                self.maintain_listeners(shard);
            }
            self.reap_orphans(shard);
        }
    }
}
