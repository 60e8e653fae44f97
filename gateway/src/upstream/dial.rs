//! The one seam between the gateway and the networks behind it: a backend address in, a byte
//! stream out. Overlay addresses go through the embedded overlay node's userspace stack; other
//! addresses through kernel sockets.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream to a backend.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ByteStream for T {}

pub type BoxStream = Box<dyn ByteStream>;
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send + 'a>>;

/// Opens byte streams to backends.
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_>;
}

/// Dials kernel TCP sockets (host network, including hosts' own overlay interfaces).
#[derive(Debug, Default, Clone)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
