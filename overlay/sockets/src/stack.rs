//! The userspace TCP/IP stack: the [`Stack`] handle (connect, listen, stats, shutdown) and
//! the one poll task that drives its shards ([`crate::shards`]) on an L3 port.
//!
//! The poll task takes inbound packets (always, even with its outbound queue full: device.rs
//! caps the replies they produce instead), polls the shards with work and hands their packets
//! to the L3 port; it sleeps until the earliest smoltcp timer, a packet, a stream's
//! notification or room on the L3 port. It never spins. A stream's write sends its own
//! segments on the writer's task (`Shared::send_after_write`: one task hand-off less per
//! packet) and wakes the poll task only for what it leaves: packets already waiting (order),
//! inbound packets on the shard, a write of more than 16 KiB (bulk goes through the poll task,
//! which batches it), a shard of more than a few sockets (an egress pass looks at each), a full
//! L3 port, or a timer earlier than the poll task's planned wake-up, which each round records
//! under the lock. Streams and listeners share the shards through one mutex and copy straight
//! into and out of the smoltcp socket buffers.

use crate::config::StackConfig;
use crate::shards::{Listener, Shared, SocketId, endpoint_v6, stopped_error};
use crate::tcp::{TcpListener, TcpStream};
use bytes::Bytes;
use smoltcp::socket::tcp;
use smoltcp::time::Duration as SmolDuration;
use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Traffic counters of a stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// TCP sockets currently held (streams, listeners' spare sockets, closing sockets).
    pub sockets: u64,
    /// Replies produced by ingress (pure ACKs, RSTs) dropped because the outbound queue was
    /// at its hard limit (twice `StackConfig::outbound_queue`).
    pub ingress_replies_dropped: u64,
    /// Packets waiting for the L3 port now (diagnostics).
    #[doc(hidden)]
    pub outbound_queued: u64,
    /// Rounds of the poll task so far (tests of how often it runs).
    #[doc(hidden)]
    pub poll_rounds: u64,
}

/// Inbound packets taken from the L3 port per poll round (then egress runs: ACK clocking).
const INGRESS_BATCH: usize = 64;

/// A userspace TCP/IP endpoint on an overlay L3 port. Cheap to clone; all clones share one
/// stack. The poll task stops on [`Stack::shutdown`] or when the L3 port closes.
#[derive(Clone)]
pub struct Stack {
    shared: Arc<Shared>,
}

impl Stack {
    /// Starts a stack for `address` on an L3 port (packets out on `tx`, in on `rx`) with
    /// default tuning. Must be called inside a tokio runtime.
    pub fn new(
        address: Ipv6Addr,
        mtu: usize,
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
    ) -> Stack {
        Stack::with_config(address, mtu, tx, rx, StackConfig::default())
    }

    /// Like [`Stack::new`] with explicit tuning.
    pub fn with_config(
        address: Ipv6Addr,
        mtu: usize,
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
        config: StackConfig,
    ) -> Stack {
        Self::with_inspector(address, mtu, tx, rx, config, None)
    }

    /// As [`Stack::with_config`], with `inspect` shown every inbound packet before the stack
    /// takes it (on the poll task: keep it short). The gateway learns of its node's "no
    /// route" errors this way without a task between node and stack.
    pub fn with_inspector(
        address: Ipv6Addr,
        mtu: usize,
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
        config: StackConfig,
        inspect: Option<InboundInspector>,
    ) -> Stack {
        let release_interval = config.release_interval;
        let shared = Arc::new(Shared::new(address, mtu, config, tx.clone()));
        tokio::spawn(run(shared.clone(), tx, rx, inspect));
        tokio::spawn(release_buffers(Arc::downgrade(&shared), release_interval));
        Stack { shared }
    }

    /// The stack's overlay address.
    pub fn address(&self) -> Ipv6Addr {
        self.shared.address
    }

    /// The largest IPv6 packet the stack sends (TCP MSS = mtu − 60).
    pub fn mtu(&self) -> usize {
        self.shared.mtu
    }

    /// Traffic counters.
    pub fn stats(&self) -> StackStats {
        let s = &self.shared;
        let inner = s.lock();
        StackStats {
            packets_in: s.packets_in.load(Ordering::Relaxed),
            packets_out: s.packets_out.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            sockets: inner.socket_count(),
            ingress_replies_dropped: inner.outbound.replies_dropped,
            outbound_queued: inner.outbound.queue.len() as u64,
            poll_rounds: s.poll_rounds.load(Ordering::Relaxed),
        }
    }

    /// Bytes of the sockets' buffers resident in memory (pages touched by data and not given
    /// back yet). Asks the kernel about every buffer: for status pages and tests, not hot paths.
    pub fn buffer_memory(&self) -> u64 {
        self.shared.lock().buffer_resident_bytes()
    }

    /// Gives back now the buffers the periodic release would (tests, memory pressure).
    /// Returns how many buffers were given back.
    pub fn release_buffers(&self) -> usize {
        self.shared.lock().release_idle_buffers()
    }

    /// Connections (sockets with a peer, closing ones included) held by each shard: for tests
    /// and diagnostics of the demultiplexing.
    #[doc(hidden)]
    pub fn connections_per_shard(&self) -> Vec<usize> {
        self.shared.lock().connections_per_shard()
    }

    /// Opens a TCP stream to `remote` over the overlay.
    pub async fn connect(&self, remote: SocketAddrV6) -> io::Result<TcpStream> {
        let (id, timeout) = {
            let mut guard = self.shared.lock();
            let inner = &mut *guard;
            if inner.stopped {
                return Err(stopped_error());
            }
            (inner.connect(remote)?, inner.config.connect_timeout)
        };
        self.shared.notify.notify_one();
        // Dropping this future mid-handshake must not leak the socket.
        let guard = ConnectGuard {
            shared: &self.shared,
            id: Some(id),
        };
        let established = std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.stopped {
                return std::task::Poll::Ready(Err(stopped_error()));
            }
            let socket = inner.socket_mut(id);
            match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_send_waker(cx.waker());
                    std::task::Poll::Pending
                }
                tcp::State::Closed if inner.unreachable.remove(&(id.shard, id.handle)) => {
                    std::task::Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::HostUnreachable,
                        format!("no overlay route to {}", remote.ip()),
                    )))
                }
                tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait => {
                    std::task::Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("connection to {remote} refused or timed out"),
                    )))
                }
                _ => std::task::Poll::Ready(Ok(())),
            }
        });
        // smoltcp's own timeout covers the handshake; this is a belt for a stack that stalls.
        match tokio::time::timeout(timeout + Duration::from_secs(1), established).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection to {remote} timed out"),
                ));
            }
        }
        let id = guard.disarm();
        let local = {
            let mut guard = self.shared.lock();
            let inner = &mut *guard;
            let stream_timeout = inner.config.stream_timeout;
            let socket = inner.socket_mut(id);
            socket.set_timeout(Some(SmolDuration::from_micros(
                stream_timeout.as_micros() as u64
            )));
            let local = socket.local_endpoint();
            // The new timeout changes the shard's timers.
            inner.mark_dirty(id.shard);
            local
        };
        let local = match local {
            Some(ep) => endpoint_v6(ep),
            None => SocketAddrV6::new(self.address(), 0, 0, 0),
        };
        Ok(TcpStream::new(self.shared.clone(), id, local, remote))
    }

    /// Listens on `port` of the stack's address.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        if port == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot listen on port 0",
            ));
        }
        let mut inner = self.shared.lock();
        if inner.stopped {
            return Err(stopped_error());
        }
        if inner.listeners.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("overlay port {port} already has a listener"),
            ));
        }
        inner.listeners.insert(port, Listener::new());
        inner.refill_listener(port);
        drop(inner);
        Ok(TcpListener::new(
            self.shared.clone(),
            SocketAddrV6::new(self.address(), port, 0, 0),
        ))
    }

    /// The node has no route to `dst` (its typed "no route" event): connects in progress to
    /// it fail at once with `HostUnreachable` instead of waiting for their timeout, the way
    /// a kernel treats an ICMPv6 "no route". Established streams are left alone (routing may
    /// find another path). Returns how many connects failed.
    pub fn destination_unreachable(&self, dst: Ipv6Addr) -> usize {
        let failed = self.shared.lock().fail_connects_to(dst);
        if failed > 0 {
            self.shared.notify.notify_one();
        }
        failed
    }

    /// Stops the poll task and resets every stream.
    pub fn shutdown(&self) {
        self.shared.lock().stop();
        self.shared.notify.notify_one();
    }
}

struct ConnectGuard<'a> {
    shared: &'a Shared,
    id: Option<SocketId>,
}

impl ConnectGuard<'_> {
    fn disarm(mut self) -> SocketId {
        self.id.take().expect("connect guard disarmed twice")
    }
}

impl Drop for ConnectGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut inner = self.shared.lock();
            inner.socket_mut(id).abort();
            inner.orphan(id);
            drop(inner);
            self.shared.notify.notify_one();
        }
    }
}

/// Sees every inbound packet before the stack does ([`Stack::with_inspector`]).
pub type InboundInspector = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The poll task.
async fn run(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Bytes>,
    mut rx: mpsc::Receiver<Bytes>,
    inspect: Option<InboundInspector>,
) {
    let mut staged: Option<Bytes> = None;
    let mut rx_open = true;
    // One timer for the task's life, moved only when smoltcp's next deadline moves: a fresh
    // sleep per round registered and removed a timer-wheel entry for every packet.
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut armed: Option<tokio::time::Instant> = None;
    // Likewise one waiter on the streams' notifications, replaced only after it fired: a
    // fresh one per round entered and left the notifier's waiter list (a lock each) per packet.
    let notified = shared.notify.notified();
    tokio::pin!(notified);
    loop {
        let now;
        let (poll_at, have_outbound, egress_room) = {
            let mut guard = shared.lock();
            let inner = &mut *guard;
            if inner.stopped {
                break;
            }
            shared.poll_rounds.fetch_add(1, Ordering::Relaxed);
            // Take inbound packets always, whatever waits to go out: a stack that stopped
            // reading while its outbound queue was full deadlocked with a peer doing the same
            // (each waiting for room only the other's reading makes). The replies ingress
            // produces are capped by the device instead (device.rs).
            let mut taken = 0;
            if let Some(p) = staged.take() {
                count(&shared.packets_in, &shared.bytes_in, p.len());
                if let Some(f) = &inspect {
                    f(&p);
                }
                inner.route_inbound(p);
                taken += 1;
            }
            while rx_open && taken < INGRESS_BATCH {
                match rx.try_recv() {
                    Ok(p) => {
                        count(&shared.packets_in, &shared.bytes_in, p.len());
                        if let Some(f) = &inspect {
                            f(&p);
                        }
                        inner.route_inbound(p);
                        taken += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => rx_open = false,
                }
            }
            now = shared.now();
            inner.poll_due(now);
            // Hand packets to the L3 port while it has room; the rest wait for a permit.
            while let Some(p) = inner.outbound.queue.pop_front() {
                let len = p.len();
                match tx.try_send(p) {
                    Ok(()) => count(&shared.packets_out, &shared.bytes_out, len),
                    Err(mpsc::error::TrySendError::Full(p)) => {
                        inner.outbound.queue.push_front(p);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        inner.outbound.queue.clear();
                        inner.stop();
                        break;
                    }
                }
            }
            if inner.stopped {
                break;
            }
            if !rx_open {
                inner.stop();
                break;
            }
            let poll_at = inner.next_poll_at();
            let egress_room = !inner.outbound.full();
            // The sleep below; with no room it waits for a permit alone (writers defer then).
            inner.planned_wake = if egress_room { poll_at } else { None };
            (poll_at, !inner.outbound.queue.is_empty(), egress_room)
        };
        // With the outbound queue full no egress can happen: wait for a permit or a packet
        // instead of spinning on a zero delay.
        let delay = if egress_room {
            // The round's time: a round takes microseconds, smoltcp's timers are coarser.
            poll_at.map(|at| {
                if at <= now {
                    Duration::ZERO
                } else {
                    Duration::from_micros((at - now).total_micros())
                }
            })
        } else {
            None
        };
        if delay == Some(Duration::ZERO) {
            tokio::task::yield_now().await;
            continue;
        }
        if let Some(d) = delay {
            let deadline = tokio::time::Instant::now() + d;
            // Within a millisecond is the same deadline (smoltcp's timers are coarser).
            let same = armed.is_some_and(|a| {
                a.max(deadline) - a.min(deadline) < Duration::from_millis(1) && a <= deadline
            });
            if !same {
                sleep.as_mut().reset(deadline);
                armed = Some(deadline);
            }
        }
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => staged = Some(p),
                None => rx_open = false,
            },
            _ = &mut notified => notified.set(shared.notify.notified()),
            permit = tx.reserve(), if have_outbound => match permit {
                Ok(permit) => {
                    let mut inner = shared.lock();
                    if let Some(p) = inner.outbound.queue.pop_front() {
                        count(&shared.packets_out, &shared.bytes_out, p.len());
                        permit.send(p);
                    }
                }
                Err(_) => break,
            },
            _ = &mut sleep, if delay.is_some() => armed = None,
        }
    }
    shared.lock().stop();
}

/// Every `every`, gives back the buffers of sockets with nothing in them (a socket between
/// requests holds no buffer memory). Ends with the stack.
async fn release_buffers(shared: std::sync::Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let mut inner = shared.lock();
        if inner.stopped {
            break;
        }
        inner.release_idle_buffers();
    }
}

fn count(packets: &AtomicU64, bytes: &AtomicU64, len: usize) {
    packets.fetch_add(1, Ordering::Relaxed);
    bytes.fetch_add(len as u64, Ordering::Relaxed);
}
