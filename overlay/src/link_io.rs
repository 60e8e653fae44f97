//! A link's socket as the node's core task drives it: bytes read into the core's buffer for
//! the link, and the core's waiting bytes written with vectored non-blocking writes. Nothing
//! here knows frames or Noise; that is the core's (the link state machine).
//!
//! The core task owns every link's socket, so a packet crosses no task boundary between the
//! socket and the protocol state: bytes read are handled in the same poll, and bytes the core
//! queues are written at once (`try_flush`), falling back to waiting for writability only
//! when the kernel's send buffer is full. Reader and writer tasks per link each cost a task
//! wake-up per packet, which on small request/response traffic was most of the link cost.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::clock::Micros;
use crate::core::NodeCore;
use crate::routing::Nbr;

/// Slices at most per vectored write (two per frame).
const WRITE_SLICES: usize = 128;
/// Slices tried first (a write of up to three frames needs no more).
const FEW_SLICES: usize = 8;

pub(crate) struct LinkSocket {
    stream: TcpStream,
}

/// What one poll of a link's read side produced.
pub(crate) enum ReadState {
    /// Bytes were read; the socket may have more.
    Read,
    /// The peer closed the stream or the socket failed (bytes read before are in the buffer).
    Ended,
}

impl LinkSocket {
    pub(crate) fn new(stream: TcpStream) -> LinkSocket {
        LinkSocket { stream }
    }

    /// Writes as much of the link's waiting bytes as the socket takes now. `Err`: broken.
    pub(crate) fn try_flush(
        &mut self,
        core: &mut NodeCore,
        id: Nbr,
        now: &mut impl FnMut() -> Micros,
    ) -> io::Result<()> {
        while core.link_has_output(id) {
            match self.write_some(core, id, &mut *now) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Like [`LinkSocket::try_flush`], and when the socket is full, arranges a wake-up for
    /// when it has room. `Ready(Ok(true))` when something was written.
    pub(crate) fn poll_flush(
        &mut self,
        core: &mut NodeCore,
        id: Nbr,
        cx: &mut Context<'_>,
        now: &mut impl FnMut() -> Micros,
    ) -> Poll<io::Result<bool>> {
        let mut wrote = false;
        while core.link_has_output(id) {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.write_some(core, id, &mut *now) {
                Ok(()) => wrote = true,
                // Readiness was stale; tokio cleared it, so the next poll registers.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if wrote {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }

    /// One vectored write of the link's first waiting frames.
    fn write_some(
        &mut self,
        core: &mut NodeCore,
        id: Nbr,
        now: &mut impl FnMut() -> Micros,
    ) -> io::Result<()> {
        // On the stack: this runs for every write on the hot path. Most writes are a frame or
        // two, so a few slices are tried first; setting up all of them cost more than the rest
        // of the write (outside the kernel).
        let mut few = [io::IoSlice::new(&[]); FEW_SLICES];
        let used = core.link_output(id, &mut few);
        let n = if used < FEW_SLICES {
            self.stream.try_write_vectored(&few[..used])?
        } else {
            let mut slices = [io::IoSlice::new(&[]); WRITE_SLICES];
            let used = core.link_output(id, &mut slices);
            self.stream.try_write_vectored(&slices[..used])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        core.link_written(id, n, now());
        Ok(())
    }

    /// Reads into `buf` (the core's read buffer for this link), up to about `budget` bytes.
    /// `Pending` (with a wake-up arranged) when the socket had nothing.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        budget: usize,
    ) -> Poll<ReadState> {
        let mut read = 0;
        loop {
            if read >= budget {
                return Poll::Ready(ReadState::Read);
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(64 * 1024);
            }
            // The socket's own poll, not a readiness check and `try_read`: a read that fills
            // less than the buffer shows the socket drained and clears its readiness, so the
            // next poll waits without another `recv` that would only say `WouldBlock`.
            match poll_read_buf(Pin::new(&mut self.stream), cx, buf) {
                Poll::Pending if read > 0 => return Poll::Ready(ReadState::Read),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(ReadState::Ended),
                Poll::Ready(Ok(n)) => read += n,
            }
        }
    }
}
