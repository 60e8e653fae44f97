//! The tokio shell around [`NodeCore`]: a TCP listener and dialers that hand connected
//! sockets to one core task, which moves bytes between each link's socket and the core
//! (handshake, framing, Noise and timers are the core's), sleeps until the core's next
//! deadline or input, and runs the L3 port.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::{
    CoreConfig, CoreOut, Counters, LOCAL_PAUSE_MAX, LinkOrigin, NodeCore, ShellDrop,
};
use crate::discovery::{DiscoveryConfig, DiscoveryCounters};
use crate::discovery_io::DiscoveryTask;
use crate::identity::{Identity, IdentityError, encode_hex};
use crate::limits::Limits;
use crate::link::DownReason;
use crate::link_io::{LinkSocket, ReadState};
use crate::routing::{Nbr, RouteInfo};
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
    /// A TCP connection for a link: the core runs its handshake. `ended` learns why the
    /// link went down.
    Connected {
        stream: TcpStream,
        remote: SocketAddr,
        outbound: bool,
        expect_key: Option<[u8; 32]>,
        ended: oneshot::Sender<DownReason>,
    },
}

/// A link's socket and what the shell shows about it; the protocol state is the core's.
struct ShellLink {
    socket: LinkSocket,
    remote: SocketAddr,
    outbound: bool,
    /// Set when the handshake is done.
    key: Option<[u8; 32]>,
    ended: Option<oneshot::Sender<DownReason>>,
}

/// Bytes read from one link per core round before the other links and the L3 port get a turn.
const READ_BUDGET: usize = 256 * 1024;
const DELIVER_BACKLOG: usize = 4096;
/// How often, at most, the status snapshot is refreshed while things change.
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// Inbound handshakes in progress at most (the core refuses more).
pub const MAX_INBOUND_HANDSHAKES: usize = crate::core::MAX_INBOUND_HANDSHAKES;

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
            next_link: 1,
            pending_deliver: VecDeque::new(),
            l3_events,
            status_due: None,
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
            events: ev_tx.clone(),
            cancel: cancel.clone(),
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
                            && !run_link(s, to, true, ctx, Some(dial.key)).await
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

    /// A snapshot of peers, routes and counters (refreshed within 100 ms of a change).
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
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
}

/// Accepts connections and hands them to the core, which limits handshakes in progress.
async fn accept_loop(l: TcpListener, ctx: LinkCtx) {
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    // In accept order: the core refuses handshakes beyond its cap. Nobody
                    // waits for an inbound link's end.
                    let (ended, _) = oneshot::channel();
                    let connected = Event::Connected {
                        stream,
                        remote,
                        outbound: false,
                        expect_key: None,
                        ended,
                    };
                    if ctx.events.send(connected).await.is_err() {
                        return;
                    }
                }
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
            run_link(s, remote, true, ctx.clone(), None).await;
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

/// Hands a connected socket to the core, which runs the link on it, and waits until the link
/// is gone. With `expect_key` (a discovered node), a peer that authenticates another key is
/// dropped: `false` then.
async fn run_link(
    stream: TcpStream,
    remote: SocketAddr,
    outbound: bool,
    ctx: LinkCtx,
    expect_key: Option<[u8; 32]>,
) -> bool {
    let _ = stream.set_nodelay(true);
    let (ended, reason) = oneshot::channel();
    let connected = Event::Connected {
        stream,
        remote,
        outbound,
        expect_key,
        ended,
    };
    if ctx.events.send(connected).await.is_err() {
        return true;
    }
    // The core owns the link now; it says why when the link is gone.
    !matches!(reason.await, Ok(DownReason::UnexpectedKey))
}

/// How a link's socket ended in one core round.
enum LinkInput {
    /// Bytes were read into the core's buffer for this link.
    Read(u64),
    /// The peer closed the stream, or the socket failed (after the bytes read).
    Ended(u64),
}

/// Polls every link's socket: writes what the core has waiting for it, reads into the
/// core's buffer (up to [`READ_BUDGET`] per link). `Ready` when there is input or a write
/// made progress (congestion may have cleared).
fn poll_links(
    links: &mut BTreeMap<u64, ShellLink>,
    core: &mut NodeCore,
    now: &mut impl FnMut() -> u64,
    cx: &mut std::task::Context<'_>,
    inbox: &mut Vec<LinkInput>,
) -> std::task::Poll<()> {
    use std::task::Poll;
    let mut progress = false;
    for (&id, l) in links.iter_mut() {
        match l.socket.poll_flush(core, id, cx, &mut *now) {
            Poll::Ready(Ok(_)) => progress = true,
            Poll::Ready(Err(_)) => {
                inbox.push(LinkInput::Ended(id));
                continue;
            }
            Poll::Pending => {}
        }
        let Some(buf) = core.link_read_buf(id) else {
            continue;
        };
        match l.socket.poll_read(cx, buf, READ_BUDGET) {
            Poll::Pending => {}
            Poll::Ready(ReadState::Read) => inbox.push(LinkInput::Read(id)),
            Poll::Ready(ReadState::Ended) => {
                inbox.push(LinkInput::Read(id));
                inbox.push(LinkInput::Ended(id));
            }
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
    links: BTreeMap<u64, ShellLink>,
    next_link: u64,
    pending_deliver: VecDeque<Bytes>,
    /// Typed events for the local stack (bounded; dropped and counted when full).
    l3_events: mpsc::Sender<L3Event>,
    /// When the status snapshot is refreshed next (something changed since the last one).
    status_due: Option<Instant>,
    status: Arc<Mutex<NodeStatus>>,
    base_status: NodeStatus,
}

impl CoreTask {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The core's next deadline, the status refresh or the end of a paused packet's wait,
    /// whichever is first.
    fn wake_at(&self, paused_until: Option<u64>) -> Option<tokio::time::Instant> {
        let at = |t: u64| self.start + Duration::from_micros(t);
        let core = self.core.poll_timeout().map(at);
        [core, self.status_due, paused_until.map(at)]
            .into_iter()
            .flatten()
            .min()
            .map(tokio::time::Instant::from_std)
    }

    /// Takes packets from the L3 port: `first`, then up to 64 more already waiting, until one
    /// finds its link full; that one is returned, to wait (see [`NodeCore::local_or_pause`]).
    fn local_batch(
        &mut self,
        first: Bytes,
        now: u64,
        l3_in: &mut mpsc::Receiver<Bytes>,
        out: &mut Vec<CoreOut>,
    ) -> Option<Bytes> {
        self.core.count_local_round();
        if let Some(p) = self.core.local_or_pause(first, now, out) {
            return Some(p);
        }
        for _ in 0..64 {
            let Ok(p) = l3_in.try_recv() else { break };
            if let Some(p) = self.core.local_or_pause(p, now, out) {
                return Some(p);
            }
        }
        None
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut l3_in: mpsc::Receiver<Bytes>,
        l3_out: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) {
        let mut out = Vec::new();
        let mut inbox = Vec::new();
        let mut l3_open = true;
        // One timer for the task's life, moved only when the next deadline moves: a fresh
        // sleep per round registered and removed a timer-wheel entry for every packet.
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<tokio::time::Instant> = None;
        // One waiter on the cancellation for the task's life (a fresh one per round entered
        // and left the token's waiter list, a lock each, for every packet).
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        // A packet from the L3 port waiting for room on its link, and until when (the core's
        // clock); the port is not read meanwhile. After `LOCAL_PAUSE_MAX` it goes the way of
        // any packet for a full link: dropped and counted.
        let mut paused: Option<(Bytes, u64)> = None;
        let start = self.start;
        loop {
            // The clock is read once per round, by the arm that woke (a round is over in
            // microseconds); reading it at every step was a good part of the task's own cost.
            let mut round_now = None;
            let wake_at = self.wake_at(paused.as_ref().map(|p| p.1));
            if let Some(t) = wake_at
                && armed != Some(t)
            {
                timer.as_mut().reset(t);
                armed = Some(t);
            }
            // Unbiased: under sustained inbound traffic the timers (keepalives, dead-link
            // checks) and the local L3 port must still get their turn.
            tokio::select! {
                _ = &mut cancelled => break,
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    self.event(ev);
                    for _ in 0..256 {
                        match events.try_recv() {
                            Ok(ev) => self.event(ev),
                            Err(_) => break,
                        }
                    }
                }
                _ = &mut timer, if wake_at.is_some() => {
                    armed = None;
                    let now = *round_now.insert(self.now());
                    self.core.handle_timeout(now, &mut out);
                    if self.status_due.is_some_and(|t| Instant::now() >= t) {
                        self.publish_status();
                    }
                }
                permit = l3_out.reserve(), if !self.pending_deliver.is_empty() => {
                    match permit {
                        Ok(p) => if let Some(b) = self.pending_deliver.pop_front() { p.send(b) },
                        Err(_) => self.pending_deliver.clear(),
                    }
                }
                _ = std::future::poll_fn(|cx| {
                    // Read only when a write made progress (the time the link last drained).
                    let mut now = || start.elapsed().as_micros() as u64;
                    poll_links(&mut self.links, &mut self.core, &mut now, cx, &mut inbox)
                }) => {
                    let now = *round_now.insert(self.now());
                    for input in inbox.drain(..) {
                        match input {
                            LinkInput::Read(id) => self.core.link_input(id, now, &mut out),
                            LinkInput::Ended(id) => self.core.link_closed(id, now, &mut out),
                        }
                    }
                }
                // Never gated on the links: a full link drops its own packets (counted), it
                // does not hold back the L3 port or other links.
                // Not read while a packet waits for its link (backpressure on the stack).
                p = l3_in.recv(), if l3_open && paused.is_none() => {
                    match p {
                        Some(p) => {
                            let now = *round_now.insert(self.now());
                            paused = self
                                .local_batch(p, now, &mut l3_in, &mut out)
                                .map(|p| (p, now + LOCAL_PAUSE_MAX));
                        }
                        None => l3_open = false,
                    }
                }
            }
            let now = round_now.unwrap_or_else(|| self.now());
            self.apply(&mut out, &l3_out);
            self.flush_links(&mut out, &l3_out, now);
            // The links may have drained: the waiting packet goes when its link has room, or
            // when its wait is over (then `local` drops and counts it if the link is still
            // full).
            if let Some((p, until)) = paused.take() {
                if now < until && self.core.local_blocked(&p, now) {
                    paused = Some((p, until));
                } else {
                    self.core.local(p, now, &mut out);
                    self.apply(&mut out, &l3_out);
                    self.flush_links(&mut out, &l3_out, now);
                }
            }
            if self.status_due.is_none() {
                self.status_due = Some(Instant::now() + STATUS_INTERVAL);
            }
        }
        for (_, l) in std::mem::take(&mut self.links) {
            if let Some(e) = l.ended {
                let _ = e.send(DownReason::Closed);
            }
        }
    }

    fn event(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::Connected {
                stream,
                remote,
                outbound,
                expect_key,
                ended,
            } => {
                let id = self.next_link;
                self.next_link += 1;
                let origin = if outbound {
                    LinkOrigin::Outbound
                } else {
                    LinkOrigin::Inbound(remote.ip())
                };
                if !self.core.open_link(id, origin, expect_key, now) {
                    let _ = ended.send(DownReason::Refused);
                    return;
                }
                self.links.insert(
                    id,
                    ShellLink {
                        socket: LinkSocket::new(stream),
                        remote,
                        outbound,
                        key: None,
                        ended: Some(ended),
                    },
                );
            }
        }
    }

    fn apply(&mut self, out: &mut Vec<CoreOut>, l3_out: &mpsc::Sender<Bytes>) {
        for o in out.drain(..) {
            match o {
                CoreOut::LinkUp { link, key } => {
                    if let Some(l) = self.links.get_mut(&link) {
                        l.key = Some(key);
                    }
                    self.publish_status();
                }
                CoreOut::LinkDown { link, reason } => {
                    if let Some(l) = self.links.remove(&link)
                        && let Some(e) = l.ended
                    {
                        let _ = e.send(reason);
                    }
                    self.publish_status();
                }
                CoreOut::Unreachable { dst, reason } => {
                    if let Err(mpsc::error::TrySendError::Full(_)) = self
                        .l3_events
                        .try_send(L3Event::Unreachable { dst, reason })
                    {
                        self.core.count_shell_drop(ShellDrop::L3Event);
                    }
                }
                CoreOut::Deliver(b) => {
                    if !self.pending_deliver.is_empty() {
                        if self.pending_deliver.len() < DELIVER_BACKLOG {
                            self.pending_deliver.push_back(b);
                        } else {
                            self.core.count_shell_drop(ShellDrop::Deliver);
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
                // Every neighbor of this core has a link: the core routes these itself.
                CoreOut::Control(..) | CoreOut::Packet(..) | CoreOut::Close(_) => {}
            }
        }
    }

    /// Writes what the links' sockets take now; a link whose socket failed goes down.
    fn flush_links(&mut self, out: &mut Vec<CoreOut>, l3_out: &mpsc::Sender<Bytes>, now: u64) {
        // Each round removes at least one link, so this ends.
        loop {
            let core = &mut self.core;
            let failed: Vec<Nbr> = self
                .links
                .iter_mut()
                .filter_map(|(&id, l)| {
                    l.socket
                        .try_flush(core, id, &mut || now)
                        .is_err()
                        .then_some(id)
                })
                .collect();
            if failed.is_empty() {
                return;
            }
            for id in failed {
                self.core.link_closed(id, now, out);
            }
            self.apply(out, l3_out);
        }
    }

    fn publish_status(&mut self) {
        self.status_due = None;
        let nbrs = self.core.neighbors();
        let peers = nbrs
            .iter()
            .filter_map(|n| {
                let l = self.links.get(&n.nbr)?;
                let key = l.key?;
                Some(PeerStatus {
                    link_id: n.nbr,
                    remote: l.remote,
                    outbound: l.outbound,
                    public_key: encode_hex(&key),
                    address: crate::addr::address_for_key(&key),
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
                .and_then(|l| l.key)
                .map(|k| crate::addr::address_for_key(&k));
        }
        st.counters = self.core.counters();
        st.discovery = (self.discovery.as_ref()).and_then(|d| d.lock().ok().map(|c| c.clone()));
        let keys: std::collections::BTreeSet<[u8; 32]> =
            self.links.values().filter_map(|l| l.key).collect();
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
