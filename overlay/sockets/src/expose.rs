//! Forwarding overlay ports to local services (the workload side on hosts without privileges).

use crate::Stack;
use crate::tcp::TcpStream;
use std::io;
use std::net::SocketAddr;
use tokio::task::JoinHandle;

/// Copy buffer per direction: large enough that a fast stream is not syscall-bound.
const SPLICE_BUFFER: usize = 64 * 1024;

/// A running [`expose`]: stops accepting (and resets connections not yet accepted) when
/// dropped or stopped. Streams already spliced run to completion.
pub struct Exposed {
    task: JoinHandle<()>,
    overlay_port: u16,
    local: SocketAddr,
}

impl Exposed {
    pub fn overlay_port(&self) -> u16 {
        self.overlay_port
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    pub fn stop(self) {}
}

impl Drop for Exposed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts overlay streams on `overlay_port` and splices each to a new TCP connection to
/// `local`. If `local` refuses, the overlay stream is reset, so the dialer sees a refusal too.
/// Half-close is forwarded both ways.
pub fn expose(stack: &Stack, overlay_port: u16, local: SocketAddr) -> io::Result<Exposed> {
    let listener = stack.listen(overlay_port)?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(async move {
                        if let Err(e) = splice(stream, local).await {
                            tracing::debug!(%peer, %local, "exposed stream ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(overlay_port, "expose stopped: {e}");
                    return;
                }
            }
        }
    });
    Ok(Exposed {
        task,
        overlay_port,
        local,
    })
}

async fn splice(mut overlay: TcpStream, local: SocketAddr) -> io::Result<()> {
    let mut service = match tokio::net::TcpStream::connect(local).await {
        Ok(s) => s,
        Err(e) => {
            overlay.abort();
            return Err(e);
        }
    };
    let _ = service.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(
        &mut overlay,
        &mut service,
        SPLICE_BUFFER,
        SPLICE_BUFFER,
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            overlay.abort();
            Err(e)
        }
    }
}
