//! A link's bounded send queue (sans-IO): frames waiting for the transport, capped in frames
//! and bytes, handed out as vectored slices, and the time of the last progress (which tells
//! when the peer stopped taking bytes).

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Bytes, BytesMut};

use crate::clock::Micros;
use crate::wire::FRAME_HEADER_LEN;

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

/// Slots an empty queue keeps (a link sending a few frames at a time reuses them).
const SLOTS_KEPT: usize = 16;

pub(crate) struct OutQueue {
    frames: VecDeque<OutFrame>,
    /// Bytes of `frames.front()` already written.
    off: usize,
    /// Bytes queued and not written yet.
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

    /// The unwritten bytes of the first frames, as slices (two per frame); how many were set.
    pub(crate) fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut used = 0;
        let mut skip = self.off;
        for f in self.frames.iter() {
            for part in [&f.head[..], &f.body[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                if used == slices.len() {
                    return used;
                }
                slices[used] = IoSlice::new(&part[skip..]);
                used += 1;
                skip = 0;
            }
        }
        used
    }

    /// Up to `max` unwritten bytes copied into one buffer and counted as written (the
    /// simulator's transport).
    pub(crate) fn take(&mut self, max: usize, now: Micros) -> Bytes {
        let mut b = BytesMut::with_capacity(max.min(self.bytes));
        let mut skip = self.off;
        'frames: for f in self.frames.iter() {
            for part in [&f.head[..], &f.body[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                let part = &part[skip..];
                skip = 0;
                let n = part.len().min(max - b.len());
                b.extend_from_slice(&part[..n]);
                if b.len() == max {
                    break 'frames;
                }
            }
        }
        self.written(b.len(), now);
        b.freeze()
    }

    /// Frames waiting (the core keeps the last quarter for messages that must arrive).
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a frame of `len` bytes would be queued now.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.frames.is_empty()
            || (self.frames.len() < self.max_frames && self.bytes + len <= self.max_bytes)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Heap bytes held: the queue's slots and the bodies of the frames waiting.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.frames.capacity() * std::mem::size_of::<OutFrame>()
            + self.frames.iter().map(|f| f.body.len()).sum::<usize>()
    }

    /// Gives back the slots a burst left, once the queue is empty (a few are kept, so a
    /// link that queues a frame or two at a time does not reallocate).
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > SLOTS_KEPT {
            self.frames = VecDeque::new();
        }
    }

    /// When frames will have waited `timeout` without a byte written (`None`: empty).
    pub(crate) fn stall_deadline(&self, timeout: Micros) -> Option<Micros> {
        (!self.frames.is_empty()).then(|| self.progress_at.saturating_add(timeout))
    }

    /// Whether bytes were written (or the queue last started filling) less than `window`
    /// before `now`: the transport is taking bytes.
    pub(crate) fn progressed_within(&self, now: Micros, window: Micros) -> bool {
        now.saturating_sub(self.progress_at) < window
    }

    /// Whether frames have waited `timeout` without a byte written.
    pub(crate) fn stalled(&self, now: Micros, timeout: Micros) -> bool {
        self.stall_deadline(timeout).is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, FrameKind};

    fn frame(len: usize) -> OutFrame {
        OutFrame {
            head: wire::frame_header(FrameKind::Packet, len),
            body: Bytes::from(vec![len as u8; len]),
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
    fn slices_and_take_hand_out_the_same_bytes_across_partial_writes() {
        let mut a = OutQueue::new(64, 1 << 20);
        let mut b = OutQueue::new(64, 1 << 20);
        let mut want = Vec::new();
        for len in [1, 7, 300, 2, 40] {
            let f = frame(len);
            want.extend_from_slice(&f.head);
            want.extend_from_slice(&f.body);
            assert!(a.push(frame(len), 0).is_ok() && b.push(f, 0).is_ok());
        }
        let mut via_slices = Vec::new();
        while !a.is_empty() {
            let mut s = [IoSlice::new(&[]); 3];
            let n = a.slices(&mut s);
            // Write at most 11 bytes, as a socket taking little at a time would.
            let mut chunk: Vec<u8> = s[..n].iter().flat_map(|s| s.iter().copied()).collect();
            chunk.truncate(11);
            via_slices.extend_from_slice(&chunk);
            a.written(chunk.len(), 1);
        }
        let mut via_take = Vec::new();
        while b.pending_bytes() > 0 {
            via_take.extend_from_slice(&b.take(13, 1));
        }
        assert_eq!(via_slices, want);
        assert_eq!(via_take, want);
        assert!(b.is_empty());
    }
}
