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

use bytes::{Bytes, BytesMut};
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
}

#[derive(Default)]
struct Counters {
    to_overlay: AtomicU64,
    to_overlay_bytes: AtomicU64,
    from_overlay: AtomicU64,
    from_overlay_bytes: AtomicU64,
    filtered: AtomicU64,
}

/// A running TUN endpoint.
pub struct Tun {
    name: String,
    counters: Arc<Counters>,
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
        let inbound = tokio::spawn(kernel_to_overlay(device.clone(), mtu, tx, counters.clone()));
        let outbound = tokio::spawn(overlay_to_kernel(device, rx, counters.clone()));
        Ok(Tun {
            name,
            counters,
            tasks: vec![inbound, outbound],
        })
    }

    /// The interface name (the kernel's, if it chose one).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> TunStats {
        let c = &self.counters;
        TunStats {
            packets_to_overlay: c.to_overlay.load(Ordering::Relaxed),
            bytes_to_overlay: c.to_overlay_bytes.load(Ordering::Relaxed),
            packets_from_overlay: c.from_overlay.load(Ordering::Relaxed),
            bytes_from_overlay: c.from_overlay_bytes.load(Ordering::Relaxed),
            packets_filtered: c.filtered.load(Ordering::Relaxed),
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
) {
    let mut buf = BytesMut::new();
    loop {
        buf.resize(mtu, 0);
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
        let packet = buf.split_to(n).freeze();
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
    counters: Arc<Counters>,
) {
    while let Some(packet) = rx.recv().await {
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
    use super::overlay_bound;

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
