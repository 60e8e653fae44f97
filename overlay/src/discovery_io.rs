//! The tokio shell of LAN discovery: one UDP socket on the beacon port, joined to the
//! link-local group on every allowed interface; beacons out on each interface every
//! interval; datagrams in go to the discovery rules, whose dials it starts.
//!
//! Interfaces are listed every interval, so an interface that comes up
//! later is joined then. Multicast loopback is off: nodes on one host do not find each other
//! through it (they have loopback peers for that), and a node never hears itself.

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::discovery::{Discovery, DiscoveryConfig, DiscoveryCounters, GROUP, encode_beacon};

/// Keys of the nodes this node has a link to, as the core task publishes them.
pub(crate) type LinkedKeys = watch::Receiver<Arc<BTreeSet<[u8; 32]>>>;

/// A network interface discovery may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interface {
    name: String,
    index: u32,
}

/// Interfaces that are up, multicast-capable and have an IPv6 link-local address: the named
/// ones, or all but loopback. (Asked of the kernel, not read from `/sys/class/net`, which
/// shows the network namespace sysfs was mounted in.)
fn interfaces(allowed: &[String]) -> Vec<Interface> {
    use getifaddrs::InterfaceFlags as F;
    let Ok(all) = getifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<Interface> = all
        .filter(|i| allowed.is_empty() || allowed.contains(&i.name))
        .filter(|i| {
            i.flags.contains(F::UP)
                && i.flags.contains(F::MULTICAST)
                && (!i.flags.contains(F::LOOPBACK) || !allowed.is_empty())
        })
        .filter(|i| {
            matches!(i.address.ip_addr(), Some(std::net::IpAddr::V6(a)) if a.segments()[0] & 0xffc0 == 0xfe80)
        })
        .filter_map(|i| {
            Some(Interface {
                index: i.index?,
                name: i.name,
            })
        })
        .collect();
    out.sort_by_key(|i| i.index);
    out.dedup_by_key(|i| i.index);
    out
}

fn bind(port: u16) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    // Several nodes on one host (tests, a gateway beside a node) share the port; multicast
    // reaches every socket bound to it.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_multicast_loop_v6(false)?;
    s.set_multicast_hops_v6(1)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(s.into())
}

/// What the discovery task needs from the node.
pub(crate) struct DiscoveryTask {
    pub cfg: DiscoveryConfig,
    pub own_key: [u8; 32],
    /// The node's link port, `None` when it does not listen (it then only dials).
    pub listen_port: Option<u16>,
    pub linked: LinkedKeys,
    pub counters: Arc<Mutex<DiscoveryCounters>>,
    /// Starts a link attempt to a discovered node; the sender tells when it ended.
    pub dial: Box<dyn Fn(crate::discovery::Dial, mpsc::Sender<[u8; 32]>) + Send>,
    pub cancel: tokio_util::sync::CancellationToken,
}

impl DiscoveryTask {
    pub(crate) async fn run(self) {
        let socket = match bind(self.cfg.port) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(port = self.cfg.port, "LAN discovery off: cannot bind: {e}");
                return;
            }
        };
        let start = Instant::now();
        let mut rules = Discovery::new(self.own_key, self.listen_port.is_some(), self.cfg.clone());
        let beacon = self.listen_port.map(|p| encode_beacon(&self.own_key, p));
        let (ended_tx, mut ended_rx) = mpsc::channel::<[u8; 32]>(64);
        let mut joined = BTreeSet::<u32>::new();
        let mut ifaces = Vec::new();
        let mut ticker = tokio::time::interval(self.cfg.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = ticker.tick() => {
                    ifaces = interfaces(&self.cfg.interfaces);
                    for i in &ifaces {
                        if !joined.contains(&i.index) {
                            match socket.join_multicast_v6(&GROUP, i.index) {
                                Ok(()) => { joined.insert(i.index); }
                                Err(e) => tracing::debug!(interface = %i.name, "cannot join the discovery group: {e}"),
                            }
                        }
                    }
                    let Some(beacon) = beacon else { continue };
                    for i in &ifaces {
                        let to = SocketAddrV6::new(GROUP, self.cfg.port, 0, i.index);
                        let sent = SockRef::from(&socket)
                            .set_multicast_if_v6(i.index)
                            .and(socket.try_send_to(&beacon, to.into()).map(|_| ()));
                        match sent {
                            Ok(()) => rules.counters.beacons_sent += 1,
                            // No usable link-local address yet (e.g. DAD), or down: next round.
                            Err(e) => tracing::debug!(interface = %i.name, "beacon not sent: {e}"),
                        }
                    }
                }
                r = socket.recv_from(&mut buf) => {
                    let Ok((n, SocketAddr::V6(from))) = r else { continue };
                    let allowed = ifaces.iter().any(|i| i.index == from.scope_id());
                    let now = start.elapsed().as_micros() as u64;
                    let linked = self.linked.borrow().clone();
                    if let Some(dial) = rules.heard(now, from, allowed, &buf[..n], |k| linked.contains(k)) {
                        (self.dial)(dial, ended_tx.clone());
                    }
                }
                Some(key) = ended_rx.recv() => rules.ended(&key),
            }
            if let Ok(mut c) = self.counters.lock() {
                let mismatches = c.discovery_key_mismatch;
                *c = rules.counters.clone();
                c.discovery_key_mismatch = mismatches;
            }
        }
    }
}
