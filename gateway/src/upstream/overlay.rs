//! The gateway's embedded overlay node and the dialer that opens backend streams through its
//! userspace TCP stack.
//!
//! When the node loses its route to a workload (the workload node died and its links went
//! away), it answers every packet sent there with a typed "no route" event on its L3 port
//! ([`L3Event`], never packet bytes, which a peer could forge). Without it a connection whose
//! peer vanished would wait — an in-flight request until the response timeout, a connect
//! until its attempt timeout. The dialer turns those events into failures ([`Unreachables`])
//! the way a kernel treats ICMP errors: a pending
//! connect fails at once; an established stream only once the destination has stayed
//! unreachable for [`ESTABLISHED_GRACE`] with nothing heard from it, so a short gap while
//! routing moves to another path does not cut WebSockets or passthrough streams.

use crate::upstream::dial::{BoxStream, DialFuture, Dialer};
use anyhow::{Context, Result};
use meshgate_config::gateway::Overlay;
use meshgate_config::node::Discovery;
use meshgate_config::overlay_limits::OverlayLimits;
use meshgate_overlay::discovery::DiscoveryConfig;
use meshgate_overlay::{L3Event, Limits, Node, NodeConfig, UnreachableReason};
use meshgate_sockets::{InboundInspector, Stack, StackConfig};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Dials `[overlay address]:port` through a userspace stack on the overlay.
#[derive(Clone)]
pub struct OverlayDialer {
    pub stack: Stack,
    /// Destinations the node reported unreachable: their streams fail at once.
    pub unreachables: Unreachables,
}

impl Dialer for OverlayDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_> {
        Box::pin(async move {
            let SocketAddr::V6(v6) = addr else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "overlay backends are IPv6 addresses",
                ));
            };
            // Taken before the SYN goes out: the "no route" it may draw cancels these tokens.
            let (connecting, lost) = self.unreachables.tokens(*v6.ip());
            let stream = tokio::select! {
                s = self.stack.connect(v6) => s?,
                () = connecting.cancelled_owned() => return Err(unreachable_error(*v6.ip())),
            };
            Ok(Box::new(OverlayStream {
                inner: Some(stream),
                token: lost.clone(),
                lost: Box::pin(lost.cancelled_owned()),
                dest: *v6.ip(),
            }) as BoxStream)
        })
    }
}

/// How long a destination must stay unreachable, with nothing heard from it, before its
/// established streams fail. Routing finds an alternative path well within this when one
/// exists; a destination still unreachable after it has most likely gone away.
pub const ESTABLISHED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Per overlay destination, two tokens: one for pending connects, cancelled at the first
/// "no route"; one for established streams, cancelled when the destination stays unreachable.
/// A cancelled token is replaced for later streams (the destination may be back).
#[derive(Clone, Default)]
pub struct Unreachables {
    tokens: Arc<Mutex<HashMap<Ipv6Addr, DestinationTokens>>>,
}

#[derive(Default)]
struct DestinationTokens {
    connecting: CancellationToken,
    established: CancellationToken,
}

impl Unreachables {
    /// (connect token, stream token) of `dest` for a new stream.
    fn tokens(&self, dest: Ipv6Addr) -> (CancellationToken, CancellationToken) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let t = tokens.entry(dest).or_default();
        for token in [&mut t.connecting, &mut t.established] {
            if token.is_cancelled() {
                *token = CancellationToken::new();
            }
        }
        (t.connecting.clone(), t.established.clone())
    }

    /// Fails every pending connect to `dest`; with `established`, its streams too.
    fn lost(&self, dest: Ipv6Addr, established: bool) {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tokens.get(&dest) {
            t.connecting.cancel();
            if established {
                t.established.cancel();
            }
        }
    }
}

/// Since when each destination has been unreachable without a packet from it: decides when
/// [`ESTABLISHED_GRACE`] has run out. Owned by the task between node and stack.
#[derive(Default)]
struct UnreachableSince {
    since: HashMap<Ipv6Addr, std::time::Instant>,
}

/// Destinations tracked at once; beyond it the oldest entries are dropped (they only delay a
/// stream failure, never cause one).
const MAX_TRACKED_DESTINATIONS: usize = 4096;

impl UnreachableSince {
    /// A "no route" for `dest` at `now`: whether it has now lasted the grace.
    fn no_route(&mut self, dest: Ipv6Addr, now: std::time::Instant) -> bool {
        if self.since.len() >= MAX_TRACKED_DESTINATIONS && !self.since.contains_key(&dest) {
            let cutoff = now.checked_sub(ESTABLISHED_GRACE * 10).unwrap_or(now);
            self.since.retain(|_, t| *t > cutoff);
            if self.since.len() >= MAX_TRACKED_DESTINATIONS {
                self.since.clear();
            }
        }
        let first = *self.since.entry(dest).or_insert(now);
        if now.duration_since(first) >= ESTABLISHED_GRACE {
            self.since.remove(&dest);
            return true;
        }
        false
    }

    /// A packet arrived: its source is reachable again.
    fn heard(&mut self, packet: &[u8]) {
        if self.since.is_empty() {
            return;
        }
        if let Some(src) = packet.get(8..24).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
            self.since.remove(&Ipv6Addr::from(src));
        }
    }
}

fn unreachable_error(dest: Ipv6Addr) -> io::Error {
    io::Error::new(
        io::ErrorKind::HostUnreachable,
        format!("no overlay route to {dest}"),
    )
}

/// A stream from the [`OverlayDialer`]: fails reads and writes once its destination is
/// reported unreachable.
struct OverlayStream {
    /// Always `Some` until dropped.
    inner: Option<meshgate_sockets::TcpStream>,
    token: CancellationToken,
    lost: Pin<Box<WaitForCancellationFutureOwned>>,
    dest: Ipv6Addr,
}

impl OverlayStream {
    /// Fails once the destination is lost: an atomic load, so every read and write can ask.
    fn check(&self) -> io::Result<()> {
        if self.token.is_cancelled() {
            return Err(unreachable_error(self.dest));
        }
        Ok(())
    }

    /// The inner stream's answer, and when it waits, a wake-up for the loss as well. Only a
    /// waiting stream needs that registration (a lock in the token), not every ready read
    /// and write.
    fn after<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_pending() && self.lost.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(unreachable_error(self.dest)));
        }
        r
    }

    fn inner(&mut self) -> Pin<&mut meshgate_sockets::TcpStream> {
        Pin::new(self.inner.as_mut().expect("stream present until dropped"))
    }
}

impl Drop for OverlayStream {
    fn drop(&mut self) {
        // A stream to a lost destination is reset rather than closed: a FIN would be
        // retransmitted (each time drawing another "no route") until the stack gives up.
        if let Some(inner) = self.inner.take()
            && self.token.is_cancelled()
        {
            inner.abort();
        }
    }
}

impl AsyncRead for OverlayStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        let r = self.inner().poll_read(cx, buf);
        self.after(cx, r)
    }
}

impl AsyncWrite for OverlayStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        let r = self.inner().poll_write(cx, buf);
        self.after(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        let r = self.inner().poll_flush(cx);
        self.after(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }
}

/// Shown every packet from the node before the stack takes it: a packet from a destination
/// means it is reachable again.
fn heard_inspector(since: Arc<Mutex<UnreachableSince>>) -> InboundInspector {
    Arc::new(move |packet: &[u8]| {
        since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .heard(packet);
    })
}

/// One event from the node. Only the node's own "no route" counts: a relay's report is an
/// unauthenticated claim (routing withdraws a really lost destination here too).
fn on_event(ev: L3Event, since: &Mutex<UnreachableSince>, unreachables: &Unreachables) {
    match ev {
        L3Event::Unreachable {
            dst,
            reason: UnreachableReason::NoRoute,
        } => {
            let gone = since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .no_route(dst, std::time::Instant::now());
            unreachables.lost(dst, gone);
        }
        L3Event::Unreachable {
            reason: UnreachableReason::ReportedByRelay { .. },
            ..
        } => {}
    }
}

/// The overlay's limits from `[overlay.limits]` (also `node.toml`'s `[limits]`).
pub fn overlay_limits(l: &OverlayLimits) -> Limits {
    let ms = |v: u64| v.saturating_mul(1000);
    Limits {
        link_queue_frames: l.link_queue_frames as usize,
        link_queue_bytes: (l.link_queue_kib as usize).saturating_mul(1024),
        write_stall_timeout: ms(l.link_write_stall_ms),
        hello_timeout: ms(l.hello_timeout_ms),
        unverified_messages: l.unverified_messages as usize,
        max_links: l.max_links as usize,
        max_links_per_ip: l.max_links_per_ip as usize,
        max_routes: l.max_routes as usize,
        max_session_peers: l.max_session_peers as usize,
        session_init_window: ms(l.session_init_window_ms),
        session_init_replay_cache: l.session_init_replay_cache as usize,
        session_inits_per_sec: l.session_inits_per_sec,
        session_init_burst: l.session_init_burst,
    }
}

/// LAN discovery from `[overlay.discovery]` (also `node.toml`'s `[discovery]`); `None` = off.
pub fn overlay_discovery(d: &Discovery) -> Option<DiscoveryConfig> {
    d.enabled.then(|| DiscoveryConfig {
        interfaces: d.interfaces.clone(),
        port: d.port,
        interval: std::time::Duration::from_millis(d.interval_ms),
        max_beacons_per_sec: d.max_beacons_per_sec,
        max_sources: d.max_sources as usize,
        max_links: d.max_links as usize,
    })
}

/// A running embedded node with its userspace stack.
pub struct EmbeddedNode {
    pub node: Node,
    pub stack: Stack,
    pub unreachables: Unreachables,
}

impl EmbeddedNode {
    /// Starts the node from `[overlay]` (peers given as `host:port` are resolved again before
    /// every connection attempt, so a peer that moves is found again).
    pub async fn start(cfg: &Overlay) -> Result<Self> {
        let node_cfg = NodeConfig {
            key_path: cfg.key_file.clone(),
            listen: cfg.listen,
            named_peers: cfg.peers.clone(),
            limits: overlay_limits(&cfg.limits),
            discovery: overlay_discovery(&cfg.discovery),
            ..NodeConfig::default()
        };
        Self::start_with(node_cfg).await
    }

    pub async fn start_with(node_cfg: NodeConfig) -> Result<Self> {
        let node = Node::start(node_cfg)
            .await
            .context("cannot start the overlay node")?;
        let mut port = node.take_l3_port().context("overlay node has no L3 port")?;
        let unreachables = Unreachables::default();
        let since = Arc::new(Mutex::new(UnreachableSince::default()));
        let inspect = heard_inspector(since.clone());
        let events_unreachables = unreachables.clone();
        // Ends when the node stops (its core task holds the sender).
        tokio::spawn(async move {
            while let Some(ev) = port.events.recv().await {
                on_event(ev, &since, &events_unreachables);
            }
        });
        let stack = Stack::with_inspector(
            port.address,
            port.mtu,
            port.tx,
            port.rx,
            StackConfig::default(),
            Some(inspect),
        );
        Ok(EmbeddedNode {
            node,
            stack,
            unreachables,
        })
    }

    pub fn dialer(&self) -> OverlayDialer {
        OverlayDialer {
            stack: self.stack.clone(),
            unreachables: self.unreachables.clone(),
        }
    }

    pub async fn shutdown(self) {
        self.stack.shutdown();
        self.node.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = 6;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p
    }

    #[test]
    fn only_the_nodes_own_no_route_events_fail_streams() {
        let peer: Ipv6Addr = "600:2::1".parse().unwrap();
        let relay: Ipv6Addr = "600:3::1".parse().unwrap();
        let u = Unreachables::default();
        let since = Mutex::new(UnreachableSince::default());
        let (connecting, _) = u.tokens(peer);
        // A relay's claim is not authenticated: ignored.
        let relayed = L3Event::Unreachable {
            dst: peer,
            reason: UnreachableReason::ReportedByRelay { relay },
        };
        on_event(relayed, &since, &u);
        assert!(!connecting.is_cancelled());
        // The node's own "no route" fails pending connects.
        let own = L3Event::Unreachable {
            dst: peer,
            reason: UnreachableReason::NoRoute,
        };
        on_event(own, &since, &u);
        assert!(connecting.is_cancelled());
    }

    #[test]
    fn a_lost_destination_fails_connects_at_once_and_streams_when_gone() {
        let u = Unreachables::default();
        let a: Ipv6Addr = "600:2::1".parse().unwrap();
        let b: Ipv6Addr = "600:3::1".parse().unwrap();
        let ((ca, sa), (cb, sb)) = (u.tokens(a), u.tokens(b));
        u.lost(a, false);
        assert!(ca.is_cancelled() && !sa.is_cancelled());
        assert!(!cb.is_cancelled() && !sb.is_cancelled());
        u.lost(a, true);
        assert!(sa.is_cancelled() && !sb.is_cancelled());
        // Streams opened later (the destination may be back) get fresh tokens.
        let (c, s) = u.tokens(a);
        assert!(!c.is_cancelled() && !s.is_cancelled());
    }

    #[test]
    fn established_streams_survive_a_short_gap_and_fail_after_the_grace() {
        let own: Ipv6Addr = "600:1::1".parse().unwrap();
        let peer: Ipv6Addr = "600:2::1".parse().unwrap();
        let t0 = std::time::Instant::now();
        let mut since = UnreachableSince::default();
        assert!(!since.no_route(peer, t0));
        assert!(!since.no_route(peer, t0 + ESTABLISHED_GRACE / 2));
        // Routing found another path: a packet from the peer arrives, the clock starts over.
        since.heard(&packet(peer, own));
        assert!(!since.no_route(peer, t0 + ESTABLISHED_GRACE));
        assert!(!since.no_route(peer, t0 + ESTABLISHED_GRACE * 3 / 2));
        // Still unreachable a whole grace after the new first error: gone.
        assert!(since.no_route(peer, t0 + ESTABLISHED_GRACE * 2));
        // Packets from others do not reset it.
        assert!(!since.no_route(peer, t0 + ESTABLISHED_GRACE * 3));
        since.heard(&packet("600:9::1".parse().unwrap(), own));
        assert!(since.no_route(peer, t0 + ESTABLISHED_GRACE * 4));
    }
}
