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

use crate::clock::Micros;
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

/// A link's bounded send queue (sans-IO): frames and bytes are capped, and the time of the
/// last progress tells when the peer stopped taking bytes.
pub(crate) struct OutQueue {
    frames: VecDeque<OutFrame>,
    /// Bytes of `frames.front()` already written.
    off: usize,
    /// Bytes queued, the front frame's written part included.
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// When bytes were last written, or the queue last went from empty to non-empty.
    progress_at: Micros,
}

impl OutQueue {
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> OutQueue {
        OutQueue {
            frames: VecDeque::new(),
            off: 0,
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes,
            progress_at: 0,
        }
    }

    /// Queues `f`, or returns it when the queue is full (the caller drops and counts it).
    /// An empty queue always takes one frame, so a frame larger than `max_bytes` still goes.
    pub(crate) fn push(&mut self, f: OutFrame, now: Micros) -> Result<(), OutFrame> {
        if !self.has_room(f.len()) {
            return Err(f);
        }
        if self.frames.is_empty() {
            self.progress_at = now;
        }
        self.bytes += f.len();
        self.frames.push_back(f);
        Ok(())
    }

    /// `n` bytes of the queue's front were written at `now`.
    pub(crate) fn written(&mut self, mut n: usize, now: Micros) {
        if n > 0 {
            self.progress_at = now;
        }
        while let Some(f) = self.frames.front() {
            let rest = f.len() - self.off;
            if n < rest {
                self.off += n;
                self.bytes -= n;
                break;
            }
            n -= rest;
            self.bytes -= rest;
            self.off = 0;
            self.frames.pop_front();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether a frame of `len` bytes would be queued now.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.frames.is_empty()
            || (self.frames.len() < self.max_frames && self.bytes + len <= self.max_bytes)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether frames have waited `timeout` without a byte written.
    pub(crate) fn stalled(&self, now: Micros, timeout: Micros) -> bool {
        !self.frames.is_empty() && now.saturating_sub(self.progress_at) >= timeout
    }
}

pub(crate) struct LinkIo {
    stream: TcpStream,
    rbuf: BytesMut,
    out: OutQueue,
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
    pub(crate) fn new(stream: TcpStream, leftover: &[u8], out: OutQueue) -> LinkIo {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK.max(leftover.len()));
        rbuf.extend_from_slice(leftover);
        LinkIo { stream, rbuf, out }
    }

    /// Queues a frame; `false` when the link's queue is full (the frame is dropped).
    pub(crate) fn queue(&mut self, f: OutFrame, now: Micros) -> bool {
        self.out.push(f, now).is_ok()
    }

    /// Whether a frame of `len` bytes would be queued now.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.out.has_room(len)
    }

    /// Frames waiting for the socket.
    pub(crate) fn queued(&self) -> usize {
        self.out.len()
    }

    /// Whether frames have waited `timeout` without the socket taking a byte.
    pub(crate) fn stalled(&self, now: Micros, timeout: Micros) -> bool {
        self.out.stalled(now, timeout)
    }

    /// Writes as much of the queue as the socket takes now. `Err`: the link is broken.
    pub(crate) fn try_flush(&mut self, now: Micros) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.write_some(now) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Like [`LinkIo::try_flush`], and when the socket is full, arranges a wake-up for when
    /// it has room. `Ready(Ok(true))` when something was written.
    pub(crate) fn poll_flush(
        &mut self,
        cx: &mut Context<'_>,
        now: Micros,
    ) -> Poll<io::Result<bool>> {
        let mut wrote = false;
        while !self.out.is_empty() {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.write_some(now) {
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
    fn write_some(&mut self, now: Micros) -> io::Result<()> {
        // On the stack: this runs for every write on the hot path.
        let mut slices = [io::IoSlice::new(&[]); 2 * WRITE_BATCH];
        let mut used = 0;
        let mut skip = self.out.off;
        for f in self.out.frames.iter().take(WRITE_BATCH) {
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
        let n = self.stream.try_write_vectored(&slices[..used])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.out.written(n, now);
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

    fn frame(len: usize) -> OutFrame {
        OutFrame {
            head: wire::frame_header(FrameKind::Packet, len),
            body: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn out_queue_is_bounded_in_frames_and_bytes_and_notices_a_stall() {
        let per = FRAME_HEADER_LEN + 95;
        let mut q = OutQueue::new(4, 3 * per);
        assert!(q.push(frame(95), 10).is_ok());
        assert!(q.push(frame(95), 20).is_ok());
        assert!(q.push(frame(95), 30).is_ok());
        assert!(q.push(frame(95), 40).is_err(), "byte limit");
        assert_eq!(q.len(), 3);
        // Stalled once nothing was written for the timeout since the queue filled up.
        assert!(!q.stalled(1_000, 1_000));
        assert!(q.stalled(1_010, 1_000));
        // Partial progress counts as progress.
        q.written(per + 1, 1_500);
        assert_eq!(q.len(), 2);
        assert!(!q.stalled(2_000, 1_000));
        assert!(q.stalled(2_500, 1_000));
        q.written(2 * per - 1, 2_600);
        assert!(q.is_empty() && !q.stalled(9_999, 1_000));
        // Frame limit, and an oversized frame still goes alone into an empty queue.
        let mut q = OutQueue::new(2, 10);
        assert!(q.push(frame(100), 0).is_ok());
        assert!(q.push(frame(1), 0).is_err());
        let mut q = OutQueue::new(2, 1 << 20);
        assert!(q.push(frame(1), 0).is_ok() && q.push(frame(1), 0).is_ok());
        assert!(q.push(frame(1), 0).is_err(), "frame limit");
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
