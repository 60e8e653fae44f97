//! meshgate overlay core: key-bound IPv6 addresses, Noise-authenticated TCP links,
//! signed Babel-style latency routing and an end-to-end encrypted IPv6 data plane.
//!
//! Protocol logic lives in sans-IO state machines ([`core::NodeCore`], [`link::Link`],
//! `routing::Router`, `session::Sessions`); [`Node`] runs them on tokio (moving bytes and
//! sleeping until the core's next deadline) and [`sim`] runs many of them on a virtual clock. Wire formats: `docs/protocol.md`.

pub mod addr;
pub mod clock;
pub mod core;
pub mod discovery;
mod discovery_io;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod limits;
pub mod link;
mod link_io;
pub mod node;
pub mod routing;
pub mod session;
pub mod sim;
pub mod wire;

pub use addr::{is_overlay_address, is_overlay_v6};
pub use identity::Identity;
pub use limits::Limits;
pub use node::{Node, NodeConfig, NodeError, NodeStatus, PeerStatus, StatusSource};

/// Default overlay MTU (largest IPv6 packet carried). Links are TCP streams, so packets need
/// not fit a physical MTU; the AEAD and per-packet handling costs are paid per packet, so
/// large packets give the userspace TCP stack above far more throughput. 32 KiB keeps
/// per-packet latency and buffering moderate. See `docs/protocol.md`.
pub const DEFAULT_MTU: usize = 32 * 1024;

/// Why the node tells its local stack that a destination is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreachableReason {
    /// This node's own routing has no route to the destination (authoritative: the local
    /// stack may fail connections to it).
    NoRoute,
    /// A relay (`relay`, an unauthenticated claim of the packet's source) said it has no
    /// route. Anyone on the path can forge this: informational only.
    ReportedByRelay { relay: std::net::Ipv6Addr },
}

/// A typed event from the node to its local stack (never packet bytes that a peer shapes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L3Event {
    Unreachable {
        dst: std::net::Ipv6Addr,
        reason: UnreachableReason,
    },
}

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
    /// Typed events (a destination became unreachable). Dropping the receiver is fine: the
    /// node then discards them; a lagging reader loses them (`l3_events_dropped`).
    pub events: tokio::sync::mpsc::Receiver<L3Event>,
}
