//! meshgate overlay core: key-bound IPv6 addresses, Noise-authenticated TCP links,
//! signed Babel-style latency routing and an end-to-end encrypted IPv6 data plane.
//!
//! Protocol logic lives in sans-IO state machines ([`core::NodeCore`], `routing::Router`,
//! `session::Sessions`); [`Node`] runs them on tokio and [`sim`] runs many of them on a
//! virtual clock. Wire formats: `docs/protocol.md`.

pub mod addr;
pub mod core;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod link;
mod link_io;
pub mod node;
pub mod routing;
pub mod session;
pub mod sim;
pub mod wire;

pub use addr::{is_overlay_address, is_overlay_v6};
pub use identity::Identity;
pub use node::{Node, NodeConfig, NodeError, NodeStatus, PeerStatus, StatusSource};

/// Default overlay MTU (largest IPv6 packet carried). Links are TCP streams, so packets need
/// not fit a physical MTU; the AEAD and per-packet handling costs are paid per packet, so
/// large packets give the userspace TCP stack above far more throughput. 32 KiB keeps
/// per-packet latency and buffering moderate. See `docs/protocol.md`.
pub const DEFAULT_MTU: usize = 32 * 1024;

/// The node's packet interface (see `docs/architecture.md`). Bounded channels are the
/// backpressure: a full `tx` makes the sender wait.
pub struct L3Port {
    /// The node's overlay address.
    pub address: std::net::Ipv6Addr,
    /// Largest IPv6 packet the overlay carries.
    pub mtu: usize,
    /// Packets into the overlay.
    pub tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// Packets delivered to this node.
    pub rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
}
