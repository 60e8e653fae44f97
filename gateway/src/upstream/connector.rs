//! Backend streams: the gateway's dialer (overlay or direct, behind the SSRF guard) and the
//! hyper connector that keeps pooled keep-alive connections per backend on top of it.

use super::ssrf;
use crate::upstream::dial::{BoxStream, DialFuture, Dialer, DirectDialer};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Overlay addresses through the embedded node (when there is one), everything else through
/// kernel sockets after the SSRF guard.
pub(crate) struct GatewayDialer {
    pub overlay: Option<Arc<dyn Dialer>>,
    /// Decides which addresses belong to the overlay.
    pub is_overlay: fn(&IpAddr) -> bool,
    /// Reloadable: `security.allow_private_backends`.
    pub allow_private: std::sync::atomic::AtomicBool,
    pub own_addresses: Vec<IpAddr>,
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
            && let Some(why) = ssrf::refusal(addr.ip(), &self.own_addresses)
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

/// hyper-util connector: the request URI's authority is the backend `ip:port`.
#[derive(Clone)]
pub(crate) struct DialConnector {
    pub dialer: Arc<dyn Dialer>,
    pub connect_timeout: Duration,
}

pub(crate) struct DialedConn(TokioIo<BoxStream>);

impl tower_service::Service<Uri> for DialConnector {
    type Response = DialedConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<DialedConn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.dialer.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "backend URI"))?;
            let stream = tokio::time::timeout(limit, dialer.dial(addr))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "backend connect timed out")
                })??;
            Ok(DialedConn(TokioIo::new(stream)))
        })
    }
}

impl Connection for DialedConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for DialedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for DialedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
