//! The TUN endpoint: kernel sockets reach the overlay through a TUN interface.
//!
//! Needs CAP_NET_ADMIN. [`Tun::start`] creates the interface, assigns the node's address with
//! prefix length `OVERLAY_PREFIX_LEN` (so the kernel installs the connected route for the
//! whole overlay range `600::/7` on the interface: no separate route to manage, and it goes
//! away with the interface) and pumps packets between the interface and the L3 port.
//!
//! **MTU and MSS.** The interface MTU is the overlay MTU (the L3 port's, 32 KiB by default), so
//! the kernel's TCP picks MSS = MTU − 60 (IPv6 + TCP headers) for overlay destinations and
//! never sends a packet the overlay cannot carry; nothing is fragmented and no PMTU discovery
//! is involved. Peers on the userspace stack advertise the same MSS (same MTU). A large MTU is
//! our offload: one read/write per 32 KiB segment instead of per 1400-byte packet, which is
//! what TSO/GRO via virtio-net headers would otherwise buy; tun-rs' offload mode would only
//! split the kernel's 64 KiB GSO packets back into MTU-sized packets, so it is left off.
//!
//! The interface is removed when the [`Tun`] is dropped (the device is not persistent).
//!
//! **No route.** The node reports a destination it has no route to as a typed event, not as
//! packet bytes; [`TunUnreachable::no_route`] turns it into an ICMPv6 "destination
//! unreachable, no route" (type 1, code 0) to the local sender, quoting the newest packet the
//! kernel sent to that destination (the kernel matches the error to its socket by the quoted
//! headers). A connect to a destination without a route then fails at once (`ENETUNREACH`).

use bytes::Bytes;
use std::io;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Prefix length assigned with the node address: the overlay range `600::/7`.
const OVERLAY_PREFIX_LEN: u8 = 7;

/// Packet counters of a TUN endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunStats {
    /// Packets from the kernel into the overlay.
    pub packets_to_overlay: u64,
    pub bytes_to_overlay: u64,
    /// Packets from the overlay to the kernel.
    pub packets_from_overlay: u64,
    pub bytes_from_overlay: u64,
    /// Packets from the kernel not sent to the overlay (multicast, link-local, not IPv6).
    pub packets_filtered: u64,
    /// ICMPv6 "no route" errors given to the kernel.
    pub unreachable_sent: u64,
}

#[derive(Default)]
struct Counters {
    to_overlay: AtomicU64,
    to_overlay_bytes: AtomicU64,
    from_overlay: AtomicU64,
    from_overlay_bytes: AtomicU64,
    filtered: AtomicU64,
    unreachable_sent: AtomicU64,
}

/// Heads of the newest packets from the kernel, quoted by ICMPv6 errors.
const RECENT_PACKETS: usize = 256;
/// Bytes quoted per packet: the IPv6 header and the start of the transport header (TCP with
/// options), well within the 1280 bytes an ICMPv6 error may have in all.
const QUOTE_LEN: usize = 128;

type RecentHeads = Arc<std::sync::Mutex<std::collections::VecDeque<Bytes>>>;

/// Turns the node's "no route" events into ICMPv6 errors for the kernel. Cheap to clone.
#[derive(Clone)]
pub struct TunUnreachable {
    address: Ipv6Addr,
    recent: RecentHeads,
    to_kernel: mpsc::Sender<Bytes>,
    counters: Arc<Counters>,
}

impl TunUnreachable {
    /// The node has no route to `dst`: tells the kernel's sender of the newest packet to it.
    /// Returns whether an error was given (none when no recent packet went there).
    pub fn no_route(&self, dst: Ipv6Addr) -> bool {
        let quoted = {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent
                .iter()
                .rev()
                .find(|p| p.get(24..40) == Some(&dst.octets()[..]))
                .cloned()
        };
        let Some(quoted) = quoted else {
            return false;
        };
        let Some(icmp) = icmpv6_no_route(self.address, &quoted) else {
            return false;
        };
        let sent = self.to_kernel.try_send(icmp).is_ok();
        if sent {
            self.counters
                .unreachable_sent
                .fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

/// ICMPv6 destination unreachable, code 0 (no route), from `from` to the quoted packet's
/// source (RFC 4443 §3.1).
fn icmpv6_no_route(from: Ipv6Addr, quoted: &[u8]) -> Option<Bytes> {
    let to: [u8; 16] = quoted.get(8..24)?.try_into().ok()?;
    let body_len = 8 + quoted.len();
    let mut p = Vec::with_capacity(40 + body_len);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(body_len as u16).to_be_bytes());
    p.extend_from_slice(&[58, 255]);
    p.extend_from_slice(&from.octets());
    p.extend_from_slice(&to);
    p.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(quoted);
    let sum = checksum(&from.octets(), &to, &p[40..]);
    p[42..44].copy_from_slice(&sum.to_be_bytes());
    Some(Bytes::from(p))
}

/// The ICMPv6 checksum: over the pseudo-header (addresses, length, next header 58) and body.
fn checksum(src: &[u8; 16], dst: &[u8; 16], body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += u32::from(w);
        }
    };
    add(src);
    add(dst);
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A running TUN endpoint.
pub struct Tun {
    name: String,
    counters: Arc<Counters>,
    unreachable: TunUnreachable,
    tasks: Vec<JoinHandle<()>>,
}

impl Tun {
    /// Creates TUN interface `name` with `address`/7 and MTU `mtu`, and pumps packets between
    /// it and the L3 port (`tx` into the overlay, `rx` from it).
    pub fn start(
        name: &str,
        address: Ipv6Addr,
        mtu: usize,
        tx: mpsc::Sender<Bytes>,
        rx: mpsc::Receiver<Bytes>,
    ) -> io::Result<Tun> {
        let mtu = mtu.clamp(1280, 65535);
        let device = tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv6(address, OVERLAY_PREFIX_LEN)
            .mtu(mtu as u16)
            .build_async()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot create TUN interface {name:?} (needs CAP_NET_ADMIN and /dev/net/tun): {e}"),
                )
            })?;
        let name = device.name().unwrap_or_else(|_| name.to_string());
        let device = Arc::new(device);
        let counters = Arc::new(Counters::default());
        let recent = RecentHeads::default();
        let (to_kernel, local) = mpsc::channel(64);
        let inbound = tokio::spawn(kernel_to_overlay(
            device.clone(),
            mtu,
            tx,
            counters.clone(),
            recent.clone(),
        ));
        let outbound = tokio::spawn(overlay_to_kernel(device, rx, local, counters.clone()));
        Ok(Tun {
            name,
            unreachable: TunUnreachable {
                address,
                recent,
                to_kernel,
                counters: counters.clone(),
            },
            counters,
            tasks: vec![inbound, outbound],
        })
    }

    /// The interface name (the kernel's, if it chose one).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the node's "no route" events go (see the module doc).
    pub fn unreachable(&self) -> TunUnreachable {
        self.unreachable.clone()
    }

    pub fn stats(&self) -> TunStats {
        let c = &self.counters;
        TunStats {
            packets_to_overlay: c.to_overlay.load(Ordering::Relaxed),
            bytes_to_overlay: c.to_overlay_bytes.load(Ordering::Relaxed),
            packets_from_overlay: c.from_overlay.load(Ordering::Relaxed),
            bytes_from_overlay: c.from_overlay_bytes.load(Ordering::Relaxed),
            packets_filtered: c.filtered.load(Ordering::Relaxed),
            unreachable_sent: c.unreachable_sent.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Tun {
    fn drop(&mut self) {
        // The tasks hold the device; aborting them closes it and the kernel removes it.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Whether a packet from the kernel belongs on the overlay: IPv6 to a unicast, non-link-local
/// destination (the kernel also emits router solicitations and MLD reports on the interface).
fn overlay_bound(packet: &[u8]) -> bool {
    let Some(dst) = packet.get(24..40) else {
        return false;
    };
    let version = packet.first().map(|b| b >> 4);
    version == Some(6) && dst[0] != 0xff && !(dst[0] == 0xfe && dst[1] & 0xc0 == 0x80)
}

async fn kernel_to_overlay(
    device: Arc<tun_rs::AsyncDevice>,
    mtu: usize,
    tx: mpsc::Sender<Bytes>,
    counters: Arc<Counters>,
    recent: RecentHeads,
) {
    // One MTU-sized buffer for every read; each packet leaves in a copy of its own length.
    // A `BytesMut` resized to the MTU and split per packet was reallocated and copied whole
    // for every packet, since the packet sent on still shared it (docs/performance.md, r12).
    let mut buf = vec![0u8; mtu];
    loop {
        let n = match device.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("TUN read failed, endpoint stops: {e}");
                return;
            }
        };
        if !overlay_bound(&buf[..n]) {
            counters.filtered.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let packet = Bytes::copy_from_slice(&buf[..n]);
        {
            let mut r = recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() >= RECENT_PACKETS {
                r.pop_front();
            }
            r.push_back(Bytes::copy_from_slice(&packet[..n.min(QUOTE_LEN)]));
        }
        // A full L3 port makes us wait: the kernel's queue toward us fills and its TCP slows
        // down, instead of packets being dropped here.
        if tx.send(packet).await.is_err() {
            return;
        }
        counters.to_overlay.fetch_add(1, Ordering::Relaxed);
        counters
            .to_overlay_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn overlay_to_kernel(
    device: Arc<tun_rs::AsyncDevice>,
    mut rx: mpsc::Receiver<Bytes>,
    mut local: mpsc::Receiver<Bytes>,
    counters: Arc<Counters>,
) {
    loop {
        let packet = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            Some(p) = local.recv() => p,
        };
        match device.send(&packet).await {
            Ok(_) => {
                counters.from_overlay.fetch_add(1, Ordering::Relaxed);
                counters
                    .from_overlay_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            // The kernel refuses a malformed packet: drop it, keep the endpoint running.
            Err(e) => tracing::debug!("TUN write refused a packet: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{checksum, icmpv6_no_route, overlay_bound};

    #[test]
    fn no_route_error_quotes_the_packet_and_checks_out() {
        let node: std::net::Ipv6Addr = "600:1::1".parse().unwrap();
        let dst: std::net::Ipv6Addr = "600:2::1".parse().unwrap();
        let mut syn = vec![0u8; 60];
        syn[0] = 0x60;
        syn[5] = 20;
        syn[6] = 6;
        syn[8..24].copy_from_slice(&node.octets());
        syn[24..40].copy_from_slice(&dst.octets());
        let icmp = icmpv6_no_route(node, &syn).unwrap();
        assert_eq!(icmp.len(), 40 + 8 + 60);
        assert_eq!(
            (icmp[6], icmp[40], icmp[41]),
            (58, 1, 0),
            "ICMPv6 type 1 code 0"
        );
        assert_eq!(
            &icmp[24..40],
            &node.octets(),
            "to the quoted packet's source"
        );
        assert_eq!(&icmp[48..], &syn[..]);
        // A correct checksum sums (with itself in place) to zero.
        let src: [u8; 16] = icmp[8..24].try_into().unwrap();
        let to: [u8; 16] = icmp[24..40].try_into().unwrap();
        assert_eq!(checksum(&src, &to, &icmp[40..]), 0);
        assert!(icmpv6_no_route(node, &syn[..10]).is_none());
    }

    fn packet(dst: [u8; 2]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[24] = dst[0];
        p[25] = dst[1];
        p
    }

    #[test]
    fn only_unicast_ipv6_goes_to_the_overlay() {
        assert!(overlay_bound(&packet([0x06, 0x12])));
        assert!(!overlay_bound(&packet([0xff, 0x02])));
        assert!(!overlay_bound(&packet([0xfe, 0x80])));
        assert!(!overlay_bound(&[0x45, 0, 0, 20]));
        assert!(!overlay_bound(&[]));
    }
}
