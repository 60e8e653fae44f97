//! TCP streams over the meshgate overlay.
//!
//! Two endpoints ride a node's L3 port (IPv6 packets in and out over bounded channels):
//! - [`Stack`]: a userspace TCP/IP stack (smoltcp, CUBIC) for hosts without privileges. It
//!   gives tokio `AsyncRead + AsyncWrite` streams ([`TcpStream`]), listeners ([`TcpListener`])
//!   and [`expose`] to forward an overlay port to a local service.
//! - [`tun`]: a TUN interface so kernel sockets reach the overlay (needs CAP_NET_ADMIN).
//!
//! The crate does not depend on the overlay core: it takes the channel ends, address and MTU.

mod buffers;
mod config;
mod demux;
mod device;
mod expose;
#[doc(hidden)]
pub mod fuzzing;
mod shards;
mod stack;
mod tcp;
pub mod tun;

pub use config::StackConfig;
pub use expose::{Exposed, expose};
pub use stack::{InboundInspector, Stack, StackStats};
pub use tcp::{TcpListener, TcpStream};
