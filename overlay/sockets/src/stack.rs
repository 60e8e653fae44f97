//! The userspace TCP/IP stack: one smoltcp interface on an L3 port, driven by one poll task.
//!
//! Streams and listeners share the interface through a mutex and copy straight into and out of
//! the smoltcp socket buffers. The poll task wakes on inbound packets, on a notification from a
//! stream (data written or read), on room in the outbound channel, and on smoltcp's own timers
//! (`poll_delay`); it never spins.

use crate::device::QueueDevice;
use crate::tcp::{TcpListener, TcpStream};
use bytes::Bytes;
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Tuning of a [`Stack`].
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Receive and send buffer of each TCP socket, in bytes. It bounds the window and so the
    /// throughput of one stream to `buffer / RTT`: 256 KiB carries 2 Gbit/s at 1 ms RTT and
    /// 10 Gbit/s at 0.2 ms (loopback overlay hops). Memory is committed as it is touched, up to
    /// 2 × buffer per busy stream.
    pub socket_buffer: usize,
    /// Connections accepted by the stack but not yet taken with `accept()`, per listener.
    /// Further SYNs are refused with a reset.
    pub accept_backlog: usize,
    /// How long `connect` waits for the handshake.
    pub connect_timeout: Duration,
    /// A stream whose sent data stays unacknowledged this long is reset (dead peer or no route).
    pub stream_timeout: Duration,
    /// Keep-alive probe interval on idle streams (detects dead peers).
    pub keep_alive: Duration,
    /// Packets queued toward the L3 port before the device pushes back on smoltcp.
    pub outbound_queue: usize,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            socket_buffer: 256 * 1024,
            accept_backlog: 1024,
            connect_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(120),
            keep_alive: Duration::from_secs(30),
            outbound_queue: 64,
        }
    }
}

/// Traffic counters of a stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// TCP sockets currently held (streams, listeners' spare sockets, closing sockets).
    pub sockets: u64,
}

/// Listening sockets kept ready per listener. Each SYN that takes one triggers a refill before
/// the next inbound packet is processed, so a burst of SYNs never finds the port closed.
const LISTEN_SPARES: usize = 4;
/// Inbound packets handed to smoltcp per poll round (then egress runs: ACK clocking).
const INGRESS_BATCH: usize = 64;
const EPHEMERAL_START: u16 = 49152;

pub(crate) struct Listener {
    listening: Vec<SocketHandle>,
    embryonic: Vec<SocketHandle>,
    pub(crate) ready: VecDeque<SocketHandle>,
    pub(crate) waker: Option<Waker>,
}

pub(crate) struct Inner {
    pub(crate) iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    device: QueueDevice,
    pub(crate) listeners: HashMap<u16, Listener>,
    /// Sockets whose stream was dropped: removed once closed.
    orphans: Vec<SocketHandle>,
    ephemeral: HashMap<SocketHandle, u16>,
    ephemeral_in_use: HashSet<u16>,
    next_ephemeral: u16,
    pub(crate) config: StackConfig,
    pub(crate) stopped: bool,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the poll task: something a stream did may need packets sent.
    pub(crate) notify: Notify,
    address: Ipv6Addr,
    mtu: usize,
    packets_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves smoltcp state consistent enough to keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A userspace TCP/IP endpoint on an overlay L3 port. Cheap to clone; all clones share one
/// interface. The poll task stops on [`Stack::shutdown`] or when the L3 port closes.
#[derive(Clone)]
pub struct Stack {
    pub(crate) shared: Arc<Shared>,
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
        // IPv6 needs 1280; an IPv6 packet's payload length field caps it at 65535 + 40.
        let mtu = mtu.clamp(1280, 65535);
        let mut device = QueueDevice::new(mtu, config.outbound_queue.max(1));
        let now = SmolInstant::now();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut device, now);
        iface.update_ip_addrs(|addrs| {
            // The node owns exactly this address; everything else is reached through the L3
            // port (medium-ip has no neighbours, so no routes are needed).
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(address), 128));
        });
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let inner = Inner {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            listeners: HashMap::new(),
            orphans: Vec::new(),
            ephemeral: HashMap::new(),
            ephemeral_in_use: HashSet::new(),
            next_ephemeral: EPHEMERAL_START + (seed % 16384) as u16,
            config,
            stopped: false,
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            notify: Notify::new(),
            address,
            mtu,
            packets_in: AtomicU64::new(0),
            packets_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        tokio::spawn(run(shared.clone(), tx, rx));
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
        StackStats {
            packets_in: s.packets_in.load(Ordering::Relaxed),
            packets_out: s.packets_out.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            sockets: s.lock().sockets.iter().count() as u64,
        }
    }

    /// Opens a TCP stream to `remote` over the overlay.
    pub async fn connect(&self, remote: SocketAddrV6) -> io::Result<TcpStream> {
        let (handle, timeout) = {
            let mut guard = self.shared.lock();
            let inner = &mut *guard;
            if inner.stopped {
                return Err(stopped_error());
            }
            let port = inner.allocate_port()?;
            let mut socket = inner.new_socket();
            socket.set_timeout(Some(SmolDuration::from_micros(
                inner.config.connect_timeout.as_micros() as u64,
            )));
            let remote_ep = IpEndpoint::new(IpAddress::Ipv6(*remote.ip()), remote.port());
            if let Err(e) = socket.connect(inner.iface.context(), remote_ep, port) {
                inner.ephemeral_in_use.remove(&port);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot connect to {remote}: {e}"),
                ));
            }
            let handle = inner.sockets.add(socket);
            inner.ephemeral.insert(handle, port);
            (handle, inner.config.connect_timeout)
        };
        self.shared.notify.notify_one();
        // Dropping this future mid-handshake must not leak the socket.
        let guard = ConnectGuard {
            shared: &self.shared,
            handle: Some(handle),
        };
        let established = std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.stopped {
                return std::task::Poll::Ready(Err(stopped_error()));
            }
            let socket = inner.sockets.get_mut::<tcp::Socket>(handle);
            match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_send_waker(cx.waker());
                    std::task::Poll::Pending
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
        let handle = guard.disarm();
        let (local, stream_timeout) = {
            let mut inner = self.shared.lock();
            let stream_timeout = inner.config.stream_timeout;
            let socket = inner.sockets.get_mut::<tcp::Socket>(handle);
            socket.set_timeout(Some(SmolDuration::from_micros(
                stream_timeout.as_micros() as u64
            )));
            (socket.local_endpoint(), stream_timeout)
        };
        let _ = stream_timeout;
        let local = match local {
            Some(ep) => endpoint_v6(ep),
            None => SocketAddrV6::new(self.address(), 0, 0, 0),
        };
        Ok(TcpStream::new(self.shared.clone(), handle, local, remote))
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
        inner.listeners.insert(
            port,
            Listener {
                listening: Vec::new(),
                embryonic: Vec::new(),
                ready: VecDeque::new(),
                waker: None,
            },
        );
        inner.maintain_listeners();
        drop(inner);
        Ok(TcpListener::new(
            self.shared.clone(),
            SocketAddrV6::new(self.address(), port, 0, 0),
        ))
    }

    /// Stops the poll task and resets every stream.
    pub fn shutdown(&self) {
        self.shared.lock().stop();
        self.shared.notify.notify_one();
    }
}

struct ConnectGuard<'a> {
    shared: &'a Shared,
    handle: Option<SocketHandle>,
}

impl ConnectGuard<'_> {
    fn disarm(mut self) -> SocketHandle {
        self.handle.take().expect("connect guard disarmed twice")
    }
}

impl Drop for ConnectGuard<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let mut inner = self.shared.lock();
            inner.sockets.get_mut::<tcp::Socket>(handle).abort();
            inner.orphan(handle);
            drop(inner);
            self.shared.notify.notify_one();
        }
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
    pub(crate) fn new_socket(&self) -> tcp::Socket<'static> {
        let size = self.config.socket_buffer.max(4096);
        let rx = tcp::SocketBuffer::new(vec![0u8; size]);
        let tx = tcp::SocketBuffer::new(vec![0u8; size]);
        let mut socket = tcp::Socket::new(rx, tx);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        // Streams carry proxied request/response traffic: latency over coalescing.
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(SmolDuration::from_micros(
            self.config.keep_alive.as_micros() as u64,
        )));
        socket
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

    /// Removes a socket from the set and frees its ephemeral port.
    pub(crate) fn remove(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
        if let Some(port) = self.ephemeral.remove(&handle) {
            self.ephemeral_in_use.remove(&port);
        }
    }

    /// Hands a socket whose owner went away to the stack, which removes it once closed.
    pub(crate) fn orphan(&mut self, handle: SocketHandle) {
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if finished(socket) {
            self.remove(handle);
        } else {
            // Bound how long a closing socket may linger (peer never acknowledges our FIN).
            socket.set_timeout(Some(SmolDuration::from_secs(30)));
            self.orphans.push(handle);
        }
    }

    fn reap_orphans(&mut self) {
        let mut i = 0;
        while i < self.orphans.len() {
            let handle = self.orphans[i];
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            // Nobody will read what arrives after close: reset like a kernel stack does.
            if socket.recv_queue() > 0 {
                socket.abort();
            }
            if finished(socket) {
                self.orphans.swap_remove(i);
                self.remove(handle);
            } else {
                i += 1;
            }
        }
    }

    /// Refills listening sockets and moves established connections to the accept queues.
    fn maintain_listeners(&mut self) {
        let ports: Vec<u16> = self.listeners.keys().copied().collect();
        for port in ports {
            let Some(mut l) = self.listeners.remove(&port) else {
                continue;
            };
            let mut i = 0;
            while i < l.listening.len() {
                let h = l.listening[i];
                if self.sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen {
                    i += 1;
                } else {
                    l.embryonic.push(l.listening.swap_remove(i));
                }
            }
            let mut woke = false;
            let mut i = 0;
            while i < l.embryonic.len() {
                let h = l.embryonic[i];
                match self.sockets.get::<tcp::Socket>(h).state() {
                    tcp::State::SynReceived => i += 1,
                    // A reset handshake returns the socket to listening.
                    tcp::State::Listen => l.listening.push(l.embryonic.swap_remove(i)),
                    tcp::State::Closed | tcp::State::TimeWait => {
                        l.embryonic.swap_remove(i);
                        self.remove(h);
                    }
                    _ => {
                        l.embryonic.swap_remove(i);
                        let timeout = self.config.stream_timeout;
                        self.sockets.get_mut::<tcp::Socket>(h).set_timeout(Some(
                            SmolDuration::from_micros(timeout.as_micros() as u64),
                        ));
                        l.ready.push_back(h);
                        woke = true;
                    }
                }
            }
            let room = l.ready.len() + l.embryonic.len() < self.config.accept_backlog;
            while room && l.listening.len() < LISTEN_SPARES {
                let mut socket = self.new_socket();
                if socket
                    .listen(IpListenEndpoint { addr: None, port })
                    .is_err()
                {
                    break;
                }
                l.listening.push(self.sockets.add(socket));
            }
            if woke && let Some(w) = l.waker.take() {
                w.wake();
            }
            self.listeners.insert(port, l);
        }
    }

    /// Closes a listener: its unaccepted connections are reset.
    pub(crate) fn close_listener(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.listening {
                self.remove(h);
            }
            for h in l.embryonic.into_iter().chain(l.ready) {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                self.orphan(h);
            }
        }
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        for (_, socket) in self.sockets.iter_mut() {
            if let smoltcp::socket::Socket::Tcp(s) = socket {
                // Wakes every waiting reader and writer; they then see the stack stopped.
                s.abort();
            }
        }
        for l in self.listeners.values_mut() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
    }

    /// One poll round: a batch of inbound packets, then everything smoltcp wants to send.
    fn poll(&mut self) {
        let now = SmolInstant::now();
        let mut changed = false;
        while !self.device.inbound.is_empty() {
            match self
                .iface
                .poll_ingress_single(now, &mut self.device, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => {
                    changed = true;
                    if !self.listeners.is_empty() {
                        self.maintain_listeners();
                    }
                }
            }
        }
        while !self.device.outbound_full() {
            match self
                .iface
                .poll_egress(now, &mut self.device, &mut self.sockets)
            {
                PollResult::None => break,
                PollResult::SocketStateChanged => changed = true,
            }
        }
        if changed {
            if !self.listeners.is_empty() {
                self.maintain_listeners();
            }
            self.reap_orphans();
        }
    }
}

/// The poll task.
async fn run(shared: Arc<Shared>, tx: mpsc::Sender<Bytes>, mut rx: mpsc::Receiver<Bytes>) {
    let mut staged: Option<Bytes> = None;
    let mut rx_open = true;
    loop {
        let (delay, have_outbound, inbound_room) = {
            let mut guard = shared.lock();
            let inner = &mut *guard;
            if inner.stopped {
                break;
            }
            // Take inbound packets only while the outbound side has room: replies to them
            // (ACKs) must not pile up past the device's limit.
            let mut taken = 0;
            if let Some(p) = staged.take() {
                count(&shared.packets_in, &shared.bytes_in, p.len());
                inner.device.inbound.push_back(p);
                taken += 1;
            }
            while rx_open && taken < INGRESS_BATCH && !inner.device.outbound_full() {
                match rx.try_recv() {
                    Ok(p) => {
                        count(&shared.packets_in, &shared.bytes_in, p.len());
                        inner.device.inbound.push_back(p);
                        taken += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => rx_open = false,
                }
            }
            inner.poll();
            // Hand packets to the L3 port while it has room; the rest wait for a permit.
            while let Some(p) = inner.device.outbound.pop_front() {
                let len = p.len();
                match tx.try_send(p) {
                    Ok(()) => count(&shared.packets_out, &shared.bytes_out, len),
                    Err(mpsc::error::TrySendError::Full(p)) => {
                        inner.device.outbound.push_front(p);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        inner.device.outbound.clear();
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
            let now = SmolInstant::now();
            let delay = inner.iface.poll_delay(now, &inner.sockets);
            (
                delay,
                !inner.device.outbound.is_empty(),
                !inner.device.outbound_full(),
            )
        };
        // With the outbound queue full nothing smoltcp wants to do now can happen: wait for a
        // permit instead of spinning on a zero delay.
        let delay = if inbound_room {
            delay.map(|d| Duration::from_micros(d.total_micros()))
        } else {
            None
        };
        if delay == Some(Duration::ZERO) {
            tokio::task::yield_now().await;
            continue;
        }
        let sleep = tokio::time::sleep(delay.unwrap_or(Duration::from_secs(3600)));
        tokio::select! {
            p = rx.recv(), if inbound_room => match p {
                Some(p) => staged = Some(p),
                None => rx_open = false,
            },
            _ = shared.notify.notified() => {}
            permit = tx.reserve(), if have_outbound => match permit {
                Ok(permit) => {
                    let mut inner = shared.lock();
                    if let Some(p) = inner.device.outbound.pop_front() {
                        count(&shared.packets_out, &shared.bytes_out, p.len());
                        permit.send(p);
                    }
                }
                Err(_) => break,
            },
            _ = sleep, if delay.is_some() => {}
        }
    }
    shared.lock().stop();
}

fn count(packets: &AtomicU64, bytes: &AtomicU64, len: usize) {
    packets.fetch_add(1, Ordering::Relaxed);
    bytes.fetch_add(len as u64, Ordering::Relaxed);
}
