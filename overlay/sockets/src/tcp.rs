//! TCP streams and listeners of a userspace [`crate::Stack`].

use crate::shards::{Shared, SocketId, endpoint_v6, stopped_error};
use smoltcp::socket::tcp;
use std::io;
use std::net::SocketAddrV6;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TCP stream over the overlay.
///
/// - `shutdown()` sends FIN after the queued data (half-close); reading continues.
/// - A read returns 0 bytes once the peer's FIN has arrived and all data was read.
/// - A reset by the peer (or [`TcpStream::abort`], or a dead peer timing out) fails reads and
///   writes with `ConnectionReset`.
/// - Dropping the stream closes it gracefully (FIN); if unread data is pending it resets,
///   as a kernel stack does.
pub struct TcpStream {
    shared: Arc<Shared>,
    id: SocketId,
    local: SocketAddrV6,
    peer: SocketAddrV6,
    write_shut: bool,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TcpStream {
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: SocketId,
        local: SocketAddrV6,
        peer: SocketAddrV6,
    ) -> Self {
        TcpStream {
            shared,
            id,
            local,
            peer,
            write_shut: false,
        }
    }

    pub fn local_addr(&self) -> SocketAddrV6 {
        self.local
    }

    pub fn peer_addr(&self) -> SocketAddrV6 {
        self.peer
    }

    /// Resets the connection (RST): the peer's reads and writes fail with `ConnectionReset`.
    pub fn abort(self) {
        {
            let mut inner = self.shared.lock();
            inner.socket_mut(self.id).abort();
        }
        // Drop orphans the (now closed) socket.
    }

    fn reset_error(&self, stopped: bool) -> io::Error {
        if stopped {
            return stopped_error();
        }
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("overlay connection to {} was reset", self.peer),
        )
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut inner = self.shared.lock();
        let stopped = inner.stopped;
        let socket = inner.socket_mut(self.id);
        // Only a read that starts with the buffer at least half full wakes the poll task for a
        // window update (smoltcp sends one when the window has doubled since it was last
        // announced). A zero window is always reopened this way; after other reads the peer
        // keeps a non-zero window until the next ACK refreshes it. Before, every read of every
        // request woke the poll task for a round that almost never sent anything.
        let window_may_reopen = socket.recv_queue() * 2 >= socket.recv_capacity();
        // Copied straight into the caller's unfilled space: initializing it first (what a
        // `&mut [u8]` needs) cleared hyper's whole read buffer, tens of KiB, for every read of
        // a few hundred bytes. The ring may wrap, so up to two contiguous parts.
        let mut n = 0;
        let mut result = Ok(());
        for _ in 0..2 {
            match socket.recv(|data| {
                let k = data.len().min(buf.remaining());
                buf.put_slice(&data[..k]);
                (k, k)
            }) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if buf.remaining() == 0 {
                break;
            }
        }
        if n > 0 {
            inner.note_read(self.id, n);
            if window_may_reopen {
                inner.mark_dirty(self.id.shard);
                drop(inner);
                // Reading opened the receive window: the poll task may owe the peer an update.
                self.shared.notify.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        match result {
            Ok(()) => {
                socket.register_recv_waker(cx.waker());
                Poll::Pending
            }
            Err(tcp::RecvError::Finished) => Poll::Ready(Ok(())),
            Err(tcp::RecvError::InvalidState) => {
                drop(inner);
                Poll::Ready(Err(self.reset_error(stopped)))
            }
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut inner = self.shared.lock();
        let stopped = inner.stopped;
        let socket = inner.socket_mut(self.id);
        if !socket.may_send() {
            drop(inner);
            return Poll::Ready(Err(self.reset_error(stopped)));
        }
        match socket.send_slice(data) {
            Ok(0) => {
                socket.register_send_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                inner.note_sent(self.id);
                // The write sends its own segments; the poll task runs only when needed.
                let wake = self.shared.send_after_write(&mut inner, self.id.shard, n);
                drop(inner);
                if wake {
                    self.shared.notify.notify_one();
                }
                Poll::Ready(Ok(n))
            }
            Err(_) => {
                drop(inner);
                Poll::Ready(Err(self.reset_error(stopped)))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is already in the stack's send buffer, as with a kernel socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_shut {
            self.write_shut = true;
            let mut inner = self.shared.lock();
            inner.socket_mut(self.id).close();
            inner.mark_dirty(self.id.shard);
            drop(inner);
            self.shared.notify.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let socket = inner.socket_mut(self.id);
        if socket.recv_queue() > 0 {
            socket.abort();
        } else {
            socket.close();
        }
        // Marks the shard dirty: the socket owes its peer a FIN or RST.
        inner.orphan(self.id);
        drop(inner);
        self.shared.notify.notify_one();
    }
}

/// Accepts TCP streams on one overlay port. Dropping it resets connections not yet accepted.
pub struct TcpListener {
    shared: Arc<Shared>,
    local: SocketAddrV6,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("local", &self.local)
            .finish()
    }
}

impl TcpListener {
    pub(crate) fn new(shared: Arc<Shared>, local: SocketAddrV6) -> Self {
        TcpListener { shared, local }
    }

    pub fn local_addr(&self) -> SocketAddrV6 {
        self.local
    }

    /// Waits for the next established connection.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddrV6)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, SocketAddrV6)>> {
        let mut inner = self.shared.lock();
        if inner.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        let port = self.local.port();
        loop {
            let Some(l) = inner.listeners.get_mut(&port) else {
                return Poll::Ready(Err(stopped_error()));
            };
            let Some(id) = l.ready.pop_front() else {
                l.waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            // Taking one frees backlog room: shards short of spares get them back now rather
            // than at their next state change (a SYN meeting no spare would be refused).
            inner.refill_listener(port);
            match inner.socket_mut(id).remote_endpoint() {
                Some(remote) => {
                    let peer = endpoint_v6(remote);
                    let stream = TcpStream::new(self.shared.clone(), id, self.local, peer);
                    return Poll::Ready(Ok((stream, peer)));
                }
                // Reset before it was accepted: skip it.
                None => inner.orphan(id),
            }
        }
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.shared.lock().close_listener(self.local.port());
        self.shared.notify.notify_one();
    }
}
