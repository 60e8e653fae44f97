//! Backend streams: the gateway's dialer (overlay or direct, behind the SSRF guard).

use super::ssrf;
use crate::upstream::dial::{DialFuture, Dialer, DirectDialer};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Overlay addresses through the embedded node (when there is one), everything else through
/// kernel sockets after the SSRF guard.
pub(crate) struct GatewayDialer {
    pub overlay: Option<Arc<dyn Dialer>>,
    /// Decides which addresses belong to the overlay.
    pub is_overlay: fn(&IpAddr) -> bool,
    /// Reloadable: `security.allow_private_backends`.
    pub allow_private: std::sync::atomic::AtomicBool,
    /// Own addresses and NAT64 prefixes, refreshed on reload and periodically.
    pub guard: ssrf::Guard,
}

impl Dialer for GatewayDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_> {
        if let Some(overlay) = &self.overlay
            && (self.is_overlay)(&addr.ip())
        {
            return overlay.dial(addr);
        }
        if !self
            .allow_private
            .load(std::sync::atomic::Ordering::Relaxed)
            && let Some(why) = self.guard.refusal(addr.ip())
        {
            let err = io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "backend {addr} refused by the SSRF guard: {why} address (set security.allow_private_backends to allow)"
                ),
            );
            return Box::pin(async move { Err(err) });
        }
        DirectDialer.dial(addr)
    }
}
