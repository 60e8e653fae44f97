//! A link's socket as the node's core task drives it: frames decoded from a read buffer,
//! frames queued and written with vectored non-blocking writes.
//!
//! The core task owns every link's socket, so a packet crosses no task boundary between the
//! socket and the protocol state: a frame read is handled in the same poll, and frames the
//! core emits are written at once (`try_flush`), falling back to waiting for writability only
//! when the kernel's send buffer is full. Reader and writer tasks per link each cost a task
//! wake-up per packet, which on small request/response traffic was most of the link cost.

use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::link::LinkError;
use crate::wire::{self, FRAME_HEADER_LEN, FrameKind};

/// A frame queued for a link: header and body kept apart so bodies are never copied.
pub(crate) struct OutFrame {
    pub head: [u8; FRAME_HEADER_LEN],
    pub body: Bytes,
}

impl OutFrame {
    fn len(&self) -> usize {
        FRAME_HEADER_LEN + self.body.len()
    }
}

/// Splits complete frames off the front of `buf`. A frame with a bad header is an error (the
/// link must close); an incomplete frame stays in `buf`.
pub(crate) fn decode_frames(
    buf: &mut BytesMut,
    frames: &mut Vec<(FrameKind, BytesMut)>,
) -> Result<(), LinkError> {
    while buf.len() >= FRAME_HEADER_LEN {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
        let (kind, len) = wire::parse_frame_header(&h)?;
        if buf.len() < FRAME_HEADER_LEN + len {
            // Make room for the rest of this frame in one piece.
            buf.reserve(FRAME_HEADER_LEN + len - buf.len());
            break;
        }
        let mut frame = buf.split_to(FRAME_HEADER_LEN + len);
        frame.advance(FRAME_HEADER_LEN);
        frames.push((kind, frame));
    }
    Ok(())
}

/// Frames at most per vectored write (two slices each).
const WRITE_BATCH: usize = 64;
/// Read buffer growth step: several small frames per read system call, one read per large one.
const READ_CHUNK: usize = 64 * 1024;

pub(crate) struct LinkIo {
    stream: TcpStream,
    rbuf: BytesMut,
    out: VecDeque<OutFrame>,
    /// Bytes of `out.front()` already written.
    out_off: usize,
}

/// What one poll of a link's read side produced.
pub(crate) enum ReadState {
    /// Frames may have been appended; the socket may have more (budget reached or not yet
    /// known to be drained).
    Open,
    /// The peer closed the stream.
    Eof,
}

impl LinkIo {
    /// Takes over a link's socket after the handshake, with bytes already read past it.
    pub(crate) fn new(stream: TcpStream, leftover: &[u8]) -> LinkIo {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK.max(leftover.len()));
        rbuf.extend_from_slice(leftover);
        LinkIo {
            stream,
            rbuf,
            out: VecDeque::new(),
            out_off: 0,
        }
    }

    pub(crate) fn queue(&mut self, f: OutFrame) {
        self.out.push_back(f);
    }

    /// Frames waiting for the socket.
    pub(crate) fn queued(&self) -> usize {
        self.out.len()
    }

    /// Writes as much of the queue as the socket takes now. `Err`: the link is broken.
    pub(crate) fn try_flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.write_some() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Like [`LinkIo::try_flush`], and when the socket is full, arranges a wake-up for when
    /// it has room. `Ready(Ok(true))` when something was written.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut wrote = false;
        while !self.out.is_empty() {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.write_some() {
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

    /// One vectored write of up to [`WRITE_BATCH`] queued frames.
    fn write_some(&mut self) -> io::Result<()> {
        // On the stack: this runs for every write on the hot path.
        let mut slices = [io::IoSlice::new(&[]); 2 * WRITE_BATCH];
        let mut used = 0;
        let mut skip = self.out_off;
        for f in self.out.iter().take(WRITE_BATCH) {
            for part in [&f.head[..], &f.body[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[used] = io::IoSlice::new(&part[skip..]);
                used += 1;
                skip = 0;
            }
        }
        let mut n = self.stream.try_write_vectored(&slices[..used])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while let Some(f) = self.out.front() {
            let rest = f.len() - self.out_off;
            if n < rest {
                self.out_off += n;
                break;
            }
            n -= rest;
            self.out_off = 0;
            self.out.pop_front();
        }
        Ok(())
    }

    /// Reads and decodes frames into `frames`, up to about `budget` bytes. `Pending` (with a
    /// wake-up arranged) when the socket had nothing and no frame was produced.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<(FrameKind, BytesMut)>,
        budget: usize,
    ) -> Poll<Result<ReadState, LinkError>> {
        let before = frames.len();
        let mut read = 0;
        loop {
            decode_frames(&mut self.rbuf, frames)?;
            if read >= budget {
                return Poll::Ready(Ok(ReadState::Open));
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Pending if frames.len() > before => return Poll::Ready(Ok(ReadState::Open)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) => {}
            }
            if self.rbuf.capacity() - self.rbuf.len() < FRAME_HEADER_LEN + 1024 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Poll::Ready(Ok(ReadState::Eof)),
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{WireError, encode_frame};

    #[test]
    fn frames_split_at_every_boundary_and_partial_frames_wait() {
        let mut stream = Vec::new();
        let bodies: Vec<Vec<u8>> = (1..40).map(|n| vec![n as u8; n * 37]).collect();
        for b in &bodies {
            stream.extend_from_slice(&encode_frame(FrameKind::Packet, b));
        }
        // Feed the stream in every chunk size from 1 byte up: frames come out whole, in order.
        for chunk in [1, 2, 3, 5, 7, 64, 1000, stream.len()] {
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                decode_frames(&mut buf, &mut frames).unwrap();
            }
            assert!(buf.is_empty(), "chunk {chunk}: {} bytes left", buf.len());
            let got: Vec<Vec<u8>> = frames.iter().map(|(_, b)| b.to_vec()).collect();
            assert_eq!(got, bodies, "chunk {chunk}");
        }
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        for header in [
            [0, 0, 0, 0, 3],               // empty frame
            [0, 0, 0, 4, 9],               // unknown kind
            [0, 0x10, 0, 0, 3],            // packet of 1 MiB
            [0xff, 0xff, 0xff, 0xff, 2u8], // control of 4 GiB
        ] {
            let mut buf = BytesMut::from(&header[..]);
            buf.extend_from_slice(&[0u8; 16]);
            let mut frames = Vec::new();
            assert!(
                decode_frames(&mut buf, &mut frames).is_err(),
                "{header:?} accepted"
            );
            assert!(frames.is_empty());
        }
        let mut buf = BytesMut::from(&[0, 0x10, 0, 0, 3][..]);
        match decode_frames(&mut buf, &mut Vec::new()) {
            Err(LinkError::Frame(WireError::Oversized { .. })) => {}
            other => panic!("oversized frame: {:?}", other.err()),
        }
    }
}
