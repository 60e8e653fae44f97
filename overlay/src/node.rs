//! The tokio runtime around [`NodeCore`]: TCP listener and dialers that run link handshakes,
//! one core task that owns all protocol state and every link's socket ([`LinkIo`]), and the
//! L3 port.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::{CoreConfig, CoreOut, Counters, LinkOrigin, NodeCore};
use crate::discovery::{DiscoveryConfig, DiscoveryCounters};
use crate::discovery_io::DiscoveryTask;
use crate::identity::{Identity, IdentityError, encode_hex};
use crate::limits::Limits;
use crate::link::{self, LinkError};
use crate::link_io::{LinkIo, OutFrame, OutQueue, ReadState};
use crate::routing::{Nbr, RouteInfo};
use crate::wire::FrameKind;
use crate::{DEFAULT_MTU, L3Event, L3Port};

/// How to run a node. Only `key_path` (or `identity`) is required.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's key file (created with mode 0600 if absent).
    pub key_path: PathBuf,
    /// TCP address for incoming links; `None` = outbound links only (behind NAT).
    pub listen: Option<SocketAddr>,
    /// Peers to keep links to (reconnected with jittered exponential backoff).
    pub peers: Vec<SocketAddr>,
    /// Peers given as `host:port` (or an address literal): resolved again before every
    /// connection attempt, so a peer whose name moves to a new address is found again.
    pub named_peers: Vec<String>,
    /// How `named_peers` are resolved (the system resolver when absent).
    pub resolver: Option<PeerResolver>,
    /// A silent link is declared dead after this long.
    pub dead_peer_timeout: Duration,
    /// Keepalive / RTT probe interval (must be well below `dead_peer_timeout`).
    pub hello_interval: Duration,
    /// Overlay MTU (largest IPv6 packet on the L3 port), 1280..=65535.
    pub mtu: usize,
    /// Use this identity instead of the key file (tests, benchmarks).
    pub identity: Option<Identity>,
    /// Capacity (packets) of each L3 port channel.
    pub l3_queue: usize,
    /// Reconnect backoff bounds.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Copies of every packet this node forwards for others (tests, debugging).
    pub relay_tap: Option<mpsc::Sender<Bytes>>,
    /// Session tuning (rekey limits).
    pub session: crate::session::SessionConfig,
    /// Limits against hostile peers (queues, links, routes, sessions).
    pub limits: Limits,
    /// LAN discovery (link-local multicast beacons); `None` = off.
    pub discovery: Option<DiscoveryConfig>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            key_path: PathBuf::from("meshgate-node.key"),
            listen: None,
            peers: Vec::new(),
            named_peers: Vec::new(),
            resolver: None,
            dead_peer_timeout: Duration::from_secs(3),
            hello_interval: Duration::from_millis(1000),
            mtu: DEFAULT_MTU,
            identity: None,
            l3_queue: 1024,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            relay_tap: None,
            session: Default::default(),
            limits: Limits::default(),
            discovery: None,
        }
    }
}

/// The addresses of a named peer (`host:port`).
pub type ResolveFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// Resolves named peers; asked before every connection attempt to one. Tests give their own
/// (a name that moves); nodes use [`PeerResolver::system`].
#[derive(Clone)]
pub struct PeerResolver(Arc<dyn Fn(String) -> ResolveFuture + Send + Sync>);

impl PeerResolver {
    pub fn new(f: impl Fn(String) -> ResolveFuture + Send + Sync + 'static) -> PeerResolver {
        PeerResolver(Arc::new(f))
    }

    /// The system resolver (`getaddrinfo`, so `/etc/hosts` and DNS).
    pub fn system() -> PeerResolver {
        PeerResolver::new(|name| {
            Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
        })
    }

    async fn resolve(&self, name: &str) -> std::io::Result<Vec<SocketAddr>> {
        (self.0)(name.to_string()).await
    }
}

impl std::fmt::Debug for PeerResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerResolver")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid node config: {0}")]
    Config(String),
}

/// A link as shown in status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub link_id: u64,
    pub remote: SocketAddr,
    pub outbound: bool,
    pub public_key: String,
    pub address: Ipv6Addr,
    pub rtt_us: Option<u32>,
    pub cost: u32,
    pub state: &'static str,
}

/// A node's status (JSON-serialisable).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeStatus {
    pub address: String,
    pub public_key: String,
    pub mtu: usize,
    pub listen: Option<SocketAddr>,
    pub peers: Vec<PeerStatus>,
    pub routes: Vec<RouteInfo>,
    pub counters: Counters,
    /// LAN discovery's counters (absent when discovery is off).
    pub discovery: Option<DiscoveryCounters>,
}

/// The latest status a node published (the core refreshes it as links, routes and counters
/// change).
#[derive(Clone)]
pub struct StatusSource(Arc<Mutex<NodeStatus>>);

impl StatusSource {
    pub fn get(&self) -> NodeStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A running overlay node.
pub struct Node {
    address: Ipv6Addr,
    listen_addr: Option<SocketAddr>,
    mtu: usize,
    l3: Mutex<Option<L3Port>>,
    status: Arc<Mutex<NodeStatus>>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Keeps the core's event channel open while the node lives: a node with neither a
    /// listener nor peers has no link task holding a sender, and the core task ends when
    /// the channel closes.
    _events: mpsc::Sender<Event>,
}

enum Event {
    LinkUp {
        id: u64,
        key: [u8; 32],
        transport: Box<snow::TransportState>,
        io: Box<LinkIo>,
        cancel: CancellationToken,
        remote: SocketAddr,
        outbound: bool,
    },
    Fault(Fault),
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    HandshakeFailed,
    HandshakeRefused,
    IdentityMismatch,
    Oversized,
    BadFrame,
}

struct LinkHandle {
    transport: Box<snow::TransportState>,
    io: Box<LinkIo>,
    /// Cancelled when the link is gone: its dialer then reconnects.
    cancel: CancellationToken,
    remote: SocketAddr,
    outbound: bool,
    key: [u8; 32],
}

/// Bytes read from one link per core round before the other links and the L3 port get a turn.
const READ_BUDGET: usize = 256 * 1024;
const DELIVER_BACKLOG: usize = 4096;
const TICK: Duration = Duration::from_millis(100);
/// Inbound handshakes in progress at most. A handshake costs X25519 operations and memory
/// before the peer is authenticated; beyond this, new connections are closed at once
/// (`handshakes_refused`). Existing links are unaffected; a flood of idle connections can
/// delay new inbound links by at most the 5 s handshake timeout per wave.
pub const MAX_INBOUND_HANDSHAKES: usize = 64;

impl Node {
    /// Loads (or creates) the identity, binds the listener, starts dialing peers.
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        if !(1280..=65535).contains(&cfg.mtu) {
            return Err(NodeError::Config(format!(
                "mtu {} outside 1280..=65535",
                cfg.mtu
            )));
        }
        if cfg.hello_interval.is_zero() || cfg.hello_interval >= cfg.dead_peer_timeout {
            return Err(NodeError::Config(
                "hello_interval must be > 0 and below dead_peer_timeout".into(),
            ));
        }
        let id = match &cfg.identity {
            Some(id) => id.clone(),
            None => Identity::load_or_create(&cfg.key_path)?,
        };
        let listener = match cfg.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| NodeError::Listen { addr, source })?,
            ),
            None => None,
        };
        let listen_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let address = id.address();
        let epoch_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let core_cfg = CoreConfig {
            mtu: cfg.mtu,
            dead_peer_timeout: cfg.dead_peer_timeout.as_micros() as u64,
            hello_interval: cfg.hello_interval.as_micros() as u64,
            session: cfg.session.clone(),
            limits: cfg.limits.clone(),
            ..CoreConfig::default()
        };
        let start = Instant::now();
        let mut core = NodeCore::new(
            id.clone(),
            core_cfg,
            epoch_ms,
            0,
            Box::new(rand::random::<[u8; 32]>),
        );
        if let Some(tap) = cfg.relay_tap.clone() {
            core.set_relay_tap(Box::new(move |b: &[u8]| {
                let _ = tap.try_send(Bytes::copy_from_slice(b));
            }));
        }
        let (l3_tx, l3_in) = mpsc::channel::<Bytes>(cfg.l3_queue.max(1));
        let (l3_out, l3_rx) = mpsc::channel::<Bytes>(cfg.l3_queue.max(1));
        let (l3_events, l3_events_rx) = mpsc::channel::<L3Event>(cfg.l3_queue.max(1));
        let (ev_tx, ev_rx) = mpsc::channel::<Event>(1024);
        let cancel = CancellationToken::new();
        let status = Arc::new(Mutex::new(NodeStatus {
            address: address.to_string(),
            public_key: encode_hex(&id.public_key()),
            mtu: cfg.mtu,
            listen: listen_addr,
            ..NodeStatus::default()
        }));
        let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let mut tasks = Vec::new();
        let discovery_counters = cfg
            .discovery
            .as_ref()
            .map(|_| Arc::new(Mutex::new(DiscoveryCounters::default())));
        let (linked_tx, linked_rx) = tokio::sync::watch::channel(Arc::default());
        let core_task = CoreTask {
            linked: linked_tx,
            discovery: discovery_counters.clone(),
            core,
            start,
            links: BTreeMap::new(),
            pending_deliver: VecDeque::new(),
            l3_events,
            write_stall_timeout: cfg.limits.write_stall_timeout,
            status: status.clone(),
            base_status: status.lock().map(|s| s.clone()).unwrap_or_default(),
        };
        tasks.push(tokio::spawn(core_task.run(
            ev_rx,
            l3_in,
            l3_out,
            cancel.clone(),
        )));
        let ctx = LinkCtx {
            id: id.clone(),
            events: ev_tx.clone(),
            cancel: cancel.clone(),
            next_id,
            queue_limits: (cfg.limits.link_queue_frames, cfg.limits.link_queue_bytes),
        };
        if let Some(l) = listener {
            tasks.push(tokio::spawn(accept_loop(l, ctx.clone())));
        }
        if let (Some(dcfg), Some(counters)) = (cfg.discovery.clone(), discovery_counters) {
            let dial_ctx = ctx.clone();
            let mismatches = counters.clone();
            let task = DiscoveryTask {
                cfg: dcfg,
                own_key: id.public_key(),
                listen_port: listen_addr.map(|a| a.port()),
                linked: linked_rx,
                counters,
                dial: Box::new(move |dial, ended| {
                    let ctx = dial_ctx.clone();
                    let mismatches = mismatches.clone();
                    tokio::spawn(async move {
                        let to = SocketAddr::V6(dial.addr);
                        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to));
                        let connected = tokio::select! {
                            _ = ctx.cancel.cancelled() => None,
                            r = connect => r.ok().and_then(|r| r.ok()),
                        };
                        if let Some(s) = connected
                            && !run_link(s, to, true, ctx, None, Some(dial.key)).await
                            && let Ok(mut c) = mismatches.lock()
                        {
                            c.discovery_key_mismatch += 1;
                        }
                        let _ = ended.send(dial.key).await;
                    });
                }),
                cancel: cancel.clone(),
            };
            tasks.push(tokio::spawn(task.run()));
        }
        let resolver = cfg.resolver.clone().unwrap_or_else(PeerResolver::system);
        let targets = (cfg.peers.iter().map(|a| DialTarget::Address(*a)))
            .chain(cfg.named_peers.iter().map(|n| DialTarget::Name(n.clone())));
        for target in targets {
            tasks.push(tokio::spawn(dial_loop(
                target,
                resolver.clone(),
                ctx.clone(),
                cfg.reconnect_min,
                cfg.reconnect_max,
            )));
        }
        let mtu = cfg.mtu;
        Ok(Node {
            address,
            listen_addr,
            mtu,
            l3: Mutex::new(Some(L3Port {
                address,
                mtu,
                tx: l3_tx,
                rx: l3_rx,
                events: l3_events_rx,
            })),
            status,
            cancel,
            tasks,
            _events: ev_tx,
        })
    }

    /// The node's overlay address.
    pub fn address(&self) -> Ipv6Addr {
        self.address
    }

    /// The bound listen address (with the real port when configured with port 0).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// Largest IPv6 packet the overlay carries.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// The L3 port (available once).
    pub fn take_l3_port(&self) -> Option<L3Port> {
        self.l3.lock().ok().and_then(|mut g| g.take())
    }

    /// A snapshot of peers, routes and counters (refreshed every 100 ms).
    pub fn status(&self) -> NodeStatus {
        self.status_source().get()
    }

    /// A handle that reads the node's latest status without holding the node (status
    /// endpoints, metrics collectors).
    pub fn status_source(&self) -> StatusSource {
        StatusSource(self.status.clone())
    }

    /// Stops all tasks and closes all links.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Clone)]
struct LinkCtx {
    id: Identity,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    /// (frames, bytes) each link's send queue holds at most.
    queue_limits: (usize, usize),
}

async fn accept_loop(l: TcpListener, ctx: LinkCtx) {
    let handshakes = Arc::new(Semaphore::new(MAX_INBOUND_HANDSHAKES));
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok((s, remote)) => match handshakes.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            run_link(s, remote, false, ctx, Some(permit), None).await;
                        });
                    }
                    Err(_) => {
                        drop(s);
                        let _ = ctx.events.send(Event::Fault(Fault::HandshakeRefused)).await;
                    }
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Reconnect delays for one peer: the step starts at `min` and doubles after every attempt,
/// up to `max`; each wait is the step scaled by a random factor in [0.5, 1] (jitter avoids
/// synchronized reconnect storms after a shared outage, while keeping at least half the
/// step so a dead peer is not hammered).
#[derive(Debug, Clone)]
pub(crate) struct ReconnectBackoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl ReconnectBackoff {
    pub(crate) fn new(min: Duration, max: Duration) -> ReconnectBackoff {
        ReconnectBackoff {
            min,
            max,
            step: min,
        }
    }

    /// Start over from `min` (the last link was up for a while).
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }

    /// The wait before the next attempt; advances the step.
    pub(crate) fn next_delay(&mut self, rng: &mut impl rand::Rng) -> Duration {
        use rand::RngExt;
        // step/2 + step/2·u with u in [0, 1): computed this way it cannot round past `step`
        // or overflow, even for a step near `Duration::MAX`.
        let half = self.step / 2;
        let wait = half
            .saturating_add(half.mul_f64(rng.random::<f64>()))
            .min(self.step);
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }
}

/// A configured peer: a fixed address, or a name resolved again for every attempt.
enum DialTarget {
    Address(SocketAddr),
    Name(String),
}

/// Time for one connection attempt (name resolution and TCP connect to each address).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves `target` (names afresh each time) and connects to the first address that answers.
async fn connect_target(target: &DialTarget, resolver: &PeerResolver) -> Option<TcpStream> {
    let addrs = match target {
        DialTarget::Address(a) => vec![*a],
        DialTarget::Name(name) => match resolver.resolve(name).await {
            Ok(a) if !a.is_empty() => a,
            Ok(_) => {
                tracing::warn!(peer = %name, "peer name resolved to no address; retrying later");
                return None;
            }
            Err(e) => {
                tracing::warn!(peer = %name, "cannot resolve peer name, retrying later: {e}");
                return None;
            }
        },
    };
    for a in addrs {
        if let Ok(s) = TcpStream::connect(a).await {
            return Some(s);
        }
    }
    None
}

async fn dial_loop(
    target: DialTarget,
    resolver: PeerResolver,
    ctx: LinkCtx,
    min: Duration,
    max: Duration,
) {
    let mut backoff = ReconnectBackoff::new(min, max);
    loop {
        if ctx.cancel.is_cancelled() {
            return;
        }
        let started = Instant::now();
        let connected = tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect_target(&target, &resolver)) => r,
        };
        if let Ok(Some(s)) = connected
            && let Ok(remote) = s.peer_addr()
        {
            run_link(s, remote, true, ctx.clone(), None, None).await;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset(); // the link was up for a while: start over
        }
        let wait = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Handshake, then pump frames until the link ends. `handshake_permit` (inbound links) is
/// released once the handshake is over. With `expect_key` (a discovered node), a peer that
/// authenticates another key is dropped: `false` then.
async fn run_link(
    stream: TcpStream,
    remote: SocketAddr,
    outbound: bool,
    ctx: LinkCtx,
    handshake_permit: Option<OwnedSemaphorePermit>,
    expect_key: Option<[u8; 32]>,
) -> bool {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    // Small buffer: large bodies bypass it (tokio reads straight into the frame buffer).
    let mut r = BufReader::with_capacity(8 * 1024, r);
    let mut rw = tokio::io::join(&mut r, &mut w);
    let hs = tokio::time::timeout(
        Duration::from_secs(5),
        link::handshake(&mut rw, &ctx.id, outbound),
    )
    .await;
    drop(handshake_permit);
    let (transport, key) = match hs {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let f = match e {
                LinkError::IdentityMismatch => Fault::IdentityMismatch,
                ref e if e.is_oversized() => Fault::Oversized,
                _ => Fault::HandshakeFailed,
            };
            let _ = ctx.events.send(Event::Fault(f)).await;
            return true;
        }
        Err(_) => {
            let _ = ctx.events.send(Event::Fault(Fault::HandshakeFailed)).await;
            return true;
        }
    };
    if expect_key.is_some_and(|k| k != key) {
        return false;
    }
    let id = ctx
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Bytes the handshake's reader took past the last handshake message belong to the first
    // frames; they go to the core with the socket.
    let leftover = r.buffer().to_vec();
    let stream = match r.into_inner().reunite(w) {
        Ok(s) => s,
        Err(_) => return true,
    };
    let cancel = ctx.cancel.child_token();
    if ctx
        .events
        .send(Event::LinkUp {
            id,
            key,
            transport: Box::new(transport),
            io: Box::new(LinkIo::new(
                stream,
                &leftover,
                OutQueue::new(ctx.queue_limits.0, ctx.queue_limits.1),
            )),
            cancel: cancel.clone(),
            remote,
            outbound,
        })
        .await
        .is_err()
    {
        return true;
    }
    // The core owns the link now; it cancels `cancel` when the link is gone.
    cancel.cancelled().await;
    true
}

/// What the links produced in one core round.
enum LinkInput {
    Frame(u64, FrameKind, BytesMut),
    Down(u64, Option<Fault>),
}

impl Fault {
    /// The counted fault behind a link read error (I/O errors and EOF are not faults).
    fn of_read_error(e: &LinkError) -> Option<Fault> {
        if e.is_oversized() {
            Some(Fault::Oversized)
        } else if matches!(e, LinkError::Frame(_)) {
            Some(Fault::BadFrame)
        } else {
            None
        }
    }
}

/// Polls every link: writes what was waiting for room, reads and decodes frames (through
/// `frames`, a scratch buffer kept across rounds). `Ready` when there is input or a write
/// made progress (congestion may have cleared).
fn poll_links(
    links: &mut BTreeMap<u64, LinkHandle>,
    now: u64,
    cx: &mut std::task::Context<'_>,
    frames: &mut Vec<(FrameKind, BytesMut)>,
    inbox: &mut Vec<LinkInput>,
) -> std::task::Poll<()> {
    use std::task::Poll;
    let mut progress = false;
    for (&id, l) in links.iter_mut() {
        match l.io.poll_flush(cx, now) {
            Poll::Ready(Ok(_)) => progress = true,
            Poll::Ready(Err(_)) => {
                inbox.push(LinkInput::Down(id, None));
                continue;
            }
            Poll::Pending => {}
        }
        let Poll::Ready(r) = l.io.poll_read(cx, frames, READ_BUDGET) else {
            continue;
        };
        inbox.extend(frames.drain(..).map(|(k, b)| LinkInput::Frame(id, k, b)));
        match r {
            Ok(ReadState::Open) => {}
            Ok(ReadState::Eof) => inbox.push(LinkInput::Down(id, None)),
            Err(e) => inbox.push(LinkInput::Down(id, Fault::of_read_error(&e))),
        }
    }
    if progress || !inbox.is_empty() {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

struct CoreTask {
    core: NodeCore,
    /// The keys of linked nodes, for discovery (which dials only nodes not linked yet).
    linked: tokio::sync::watch::Sender<Arc<std::collections::BTreeSet<[u8; 32]>>>,
    /// Discovery's counters, shown in status.
    discovery: Option<Arc<Mutex<DiscoveryCounters>>>,
    start: Instant,
    links: BTreeMap<u64, LinkHandle>,
    pending_deliver: VecDeque<Bytes>,
    /// Typed events for the local stack (bounded; dropped and counted when full).
    l3_events: mpsc::Sender<L3Event>,
    write_stall_timeout: u64,
    status: Arc<Mutex<NodeStatus>>,
    base_status: NodeStatus,
}

impl CoreTask {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut l3_in: mpsc::Receiver<Bytes>,
        l3_out: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::new();
        let mut inbox = Vec::new();
        let mut frames = Vec::new();
        let mut l3_open = true;
        loop {
            // Unbiased: under sustained inbound traffic the ticker (hellos, dead-peer checks)
            // and the local L3 port must still get their turn.
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    self.event(ev, &mut out);
                    for _ in 0..256 {
                        match events.try_recv() {
                            Ok(ev) => self.event(ev, &mut out),
                            Err(_) => break,
                        }
                    }
                }
                _ = ticker.tick() => {
                    let now = self.now();
                    self.core.tick(now, &mut out);
                    self.close_stalled(now, &mut out);
                    self.publish_status();
                }
                permit = l3_out.reserve(), if !self.pending_deliver.is_empty() => {
                    match permit {
                        Ok(p) => if let Some(b) = self.pending_deliver.pop_front() { p.send(b) },
                        Err(_) => self.pending_deliver.clear(),
                    }
                }
                _ = std::future::poll_fn(|cx| {
                    let now = self.start.elapsed().as_micros() as u64;
                    poll_links(&mut self.links, now, cx, &mut frames, &mut inbox)
                }) => {
                    let now = self.now();
                    for input in inbox.drain(..) {
                        match input {
                            LinkInput::Frame(id, kind, body) => {
                                self.frame(id, kind, body, now, &mut out)
                            }
                            LinkInput::Down(id, fault) => {
                                if let Some(f) = fault {
                                    self.fault(f);
                                }
                                self.close(id, now, &mut out);
                            }
                        }
                    }
                }
                // Never gated on the links: a full link drops its own packets (counted), it
                // does not hold back the L3 port or other links.
                p = l3_in.recv(), if l3_open => {
                    match p {
                        Some(p) => {
                            let now = self.now();
                            self.core.local(p, now, &mut out);
                            for _ in 0..64 {
                                match l3_in.try_recv() {
                                    Ok(p) => self.core.local(p, now, &mut out),
                                    Err(_) => break,
                                }
                            }
                        }
                        None => l3_open = false,
                    }
                }
            }
            self.apply(&mut out, &l3_out);
            self.flush_links(&mut out, &l3_out);
        }
        for l in self.links.values() {
            l.cancel.cancel();
        }
    }

    fn event(&mut self, ev: Event, out: &mut Vec<CoreOut>) {
        let now = self.now();
        match ev {
            Event::LinkUp {
                id,
                key,
                transport,
                io,
                cancel,
                remote,
                outbound,
            } => {
                self.links.insert(
                    id,
                    LinkHandle {
                        transport,
                        io,
                        cancel,
                        remote,
                        outbound,
                        key,
                    },
                );
                let origin = if outbound {
                    LinkOrigin::Outbound
                } else {
                    LinkOrigin::Inbound(remote.ip())
                };
                self.core.link_up(id, key, origin, now, out);
                self.publish_status();
            }
            Event::Fault(f) => self.fault(f),
        }
    }

    fn frame(
        &mut self,
        id: Nbr,
        kind: FrameKind,
        body: BytesMut,
        now: u64,
        out: &mut Vec<CoreOut>,
    ) {
        match kind {
            FrameKind::Packet => self.core.packet(id, body, now, out),
            FrameKind::Control => {
                let Some(l) = self.links.get_mut(&id) else {
                    return;
                };
                match link::open_control(&mut l.transport, &body) {
                    Ok(msg) => self.core.control(id, msg, now, out),
                    Err(LinkError::Frame(_)) => {
                        self.core.counters.control_malformed += 1;
                        self.core.heard(id, now);
                    }
                    Err(_) => {
                        self.core.counters.control_decrypt_failed += 1;
                        self.close(id, now, out);
                    }
                }
            }
            FrameKind::Handshake => {
                self.core.counters.bad_frame += 1;
                self.close(id, now, out);
            }
        }
    }

    fn fault(&mut self, f: Fault) {
        let c = &mut self.core.counters;
        match f {
            Fault::HandshakeFailed => c.handshake_failed += 1,
            Fault::HandshakeRefused => c.handshakes_refused += 1,
            Fault::IdentityMismatch => c.identity_mismatch += 1,
            Fault::Oversized => c.oversized_frame += 1,
            Fault::BadFrame => c.bad_frame += 1,
        }
    }

    fn close(&mut self, id: Nbr, now: u64, out: &mut Vec<CoreOut>) {
        if let Some(l) = self.links.remove(&id) {
            l.cancel.cancel();
            self.core.link_down(id, now, out);
            self.publish_status();
        }
    }

    /// Closes links whose socket took no byte for the write-stall timeout (a peer that does
    /// not read).
    fn close_stalled(&mut self, now: u64, out: &mut Vec<CoreOut>) {
        let stalled: Vec<Nbr> = self
            .links
            .iter()
            .filter(|(_, l)| l.io.stalled(now, self.write_stall_timeout))
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            self.core.counters.link_write_stalls += 1;
            self.close(id, now, out);
        }
    }

    fn apply(&mut self, out: &mut Vec<CoreOut>, l3_out: &mpsc::Sender<Bytes>) {
        let now = self.now();
        let mut i = 0;
        // `close` may append more outputs; index instead of draining.
        while i < out.len() {
            let o = std::mem::replace(&mut out[i], CoreOut::Close(u64::MAX));
            i += 1;
            match o {
                CoreOut::Control(n, msg) => {
                    let Some(l) = self.links.get_mut(&n) else {
                        continue;
                    };
                    // Room is checked before sealing: a sealed frame that is then dropped
                    // would put the peer's Noise nonce out of step.
                    let plain = msg.encode();
                    if !l.io.has_room(link::sealed_frame_len(plain.len())) {
                        // Keepalives and seqno requests may be lost (they are repeated);
                        // routing state is never re-sent, so a link that cannot take an
                        // update is closed and the neighbors resynchronise on the next one.
                        self.core.counters.link_control_drops += 1;
                        if msg.must_arrive() {
                            self.close(n, now, out);
                        }
                        continue;
                    }
                    if let Ok((head, body)) = link::seal_plain_parts(&mut l.transport, &plain) {
                        l.io.queue(OutFrame { head, body }, now);
                    }
                }
                CoreOut::Packet(n, b) => {
                    if let Some(l) = self.links.get_mut(&n) {
                        let head = crate::wire::frame_header(FrameKind::Packet, b.len());
                        if !l.io.queue(OutFrame { head, body: b }, now) {
                            self.core.counters.link_queue_drops += 1;
                        }
                    }
                }
                CoreOut::Unreachable { dst, reason } => {
                    if let Err(mpsc::error::TrySendError::Full(_)) = self
                        .l3_events
                        .try_send(L3Event::Unreachable { dst, reason })
                    {
                        self.core.counters.l3_events_dropped += 1;
                    }
                }
                CoreOut::Deliver(b) => {
                    if !self.pending_deliver.is_empty() {
                        if self.pending_deliver.len() < DELIVER_BACKLOG {
                            self.pending_deliver.push_back(b);
                        } else {
                            self.core.counters.deliver_backlog_drops += 1;
                        }
                        continue;
                    }
                    match l3_out.try_send(b) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(b)) => {
                            self.pending_deliver.push_back(b)
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                CoreOut::Close(n) => {
                    if let Some(l) = self.links.remove(&n) {
                        l.cancel.cancel();
                    }
                }
            }
        }
        out.clear();
    }

    /// Writes what the links' sockets take now; a link whose socket failed goes down.
    fn flush_links(&mut self, out: &mut Vec<CoreOut>, l3_out: &mpsc::Sender<Bytes>) {
        // Each round removes at least one link, so this ends.
        loop {
            let now = self.now();
            let failed: Vec<Nbr> = self
                .links
                .iter_mut()
                .filter(|(_, l)| l.io.queued() > 0)
                .filter_map(|(&id, l)| l.io.try_flush(now).is_err().then_some(id))
                .collect();
            if failed.is_empty() {
                return;
            }
            let now = self.now();
            for id in failed {
                self.close(id, now, out);
            }
            // The link-down updates for the remaining links.
            self.apply(out, l3_out);
        }
    }

    fn publish_status(&mut self) {
        let nbrs = self.core.neighbors();
        let peers = nbrs
            .iter()
            .filter_map(|n| {
                let l = self.links.get(&n.nbr)?;
                Some(PeerStatus {
                    link_id: n.nbr,
                    remote: l.remote,
                    outbound: l.outbound,
                    public_key: encode_hex(&l.key),
                    address: crate::addr::address_for_key(&l.key),
                    rtt_us: n.srtt_us,
                    cost: n.cost,
                    state: if n.srtt_us.is_some() { "up" } else { "probing" },
                })
            })
            .collect();
        let mut st = self.base_status.clone();
        st.peers = peers;
        st.routes = self.core.router.routes(Some);
        for r in st.routes.iter_mut() {
            r.via = r
                .next_hop
                .and_then(|n| self.links.get(&n))
                .map(|l| crate::addr::address_for_key(&l.key));
        }
        st.counters = self.core.counters();
        st.discovery = (self.discovery.as_ref()).and_then(|d| d.lock().ok().map(|c| c.clone()));
        let keys: std::collections::BTreeSet<[u8; 32]> =
            self.links.values().map(|l| l.key).collect();
        self.linked.send_if_modified(|k| {
            let changed = **k != keys;
            if changed {
                *k = Arc::new(keys);
            }
            changed
        });
        if let Ok(mut g) = self.status.lock() {
            *g = st;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn delays(seed: u64, n: usize) -> Vec<Duration> {
        let mut backoff =
            ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| backoff.next_delay(&mut rng)).collect()
    }

    #[test]
    fn reconnect_backoff_grows_exponentially_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(30));
        for seed in 0..50 {
            for (k, wait) in delays(seed, 16).into_iter().enumerate() {
                // Step k is min·2^k capped at max; the wait is in [step/2, step].
                let step = min.saturating_mul(1 << k).min(max);
                assert!(
                    wait >= step / 2 && wait <= step,
                    "seed {seed} attempt {k}: {wait:?} outside [{:?}, {step:?}]",
                    step / 2
                );
            }
        }
        // Jittered: peers (independent random streams) do not wait in lockstep.
        let a = delays(1, 16);
        let b = delays(2, 16);
        assert_ne!(a, b);
        assert!(
            a.iter().zip(&b).filter(|(x, y)| x != y).count() >= 14,
            "most waits differ between peers: {a:?} vs {b:?}"
        );
        // ...and the jitter spans its range rather than sitting at one end.
        let firsts: Vec<Duration> = (0..200).map(|s| delays(s, 1)[0]).collect();
        assert!(firsts.iter().any(|d| *d < Duration::from_millis(60)));
        assert!(firsts.iter().any(|d| *d > Duration::from_millis(90)));
    }

    #[test]
    fn reconnect_backoff_starts_over_after_reset_and_survives_huge_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff =
            ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..10 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
        // Doubling saturates instead of overflowing (Duration's `* 2` would panic).
        let mut huge = ReconnectBackoff::new(Duration::MAX / 3, Duration::MAX);
        for _ in 0..4 {
            assert!(huge.next_delay(&mut rng) >= Duration::MAX / 6);
        }
    }
}
