//! Memory of the TCP sockets' buffers: one anonymous mapping per buffer, committed page by page
//! as data touches it, partly given back while the socket is quiet, and returned whole to the
//! OS when the socket goes.
//!
//! smoltcp's ring buffers have a fixed capacity (it sets the window scale), and a heap
//! allocation of that capacity was committed whole: the allocator zeroes reused memory, so
//! every socket paid 2 × `socket_buffer` (512 KiB at the default) at creation, and freed
//! buffers stayed in the allocator's cache. A private anonymous mapping is zero-filled by the
//! kernel on first touch, so a socket carrying small requests and responses commits only the
//! pages its data passed through, and `munmap` returns them at once.
//!
//! Giving pages back from a live socket is only done where nothing can be read from them:
//! - the send buffer when it is empty: everything sent was acknowledged;
//! - the receive buffer when it is empty *and* every byte the peer ever sent has been read:
//!   smoltcp keeps out-of-order segments in the free part of the ring, invisible from outside,
//!   and zeroing them would corrupt the stream once the gap is filled. The shard tracks the
//!   highest sequence number each connection received (from the packets' headers) and the
//!   stream counts what it read; when the two meet, no segment can be waiting.

// This module is the crate's one FFI seam (mmap, madvise, mincore, munmap); every unsafe
// block carries its SAFETY argument.
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;

/// The system page size, the unit of commitment.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(4096)
}

/// One buffer: a private anonymous mapping of `len` bytes.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; which thread unmaps it is
// irrelevant, and shared access goes through the stack's mutex.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        let len = len.max(1);
        // SAFETY: a fresh anonymous private mapping: no file, no fixed address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }

    /// Gives the pages back to the OS; they read as zeros when next touched.
    fn release(&self) {
        // SAFETY: the range is this mapping. MADV_DONTNEED on private anonymous memory only
        // replaces its contents with zeros; callers do it where the contents are free space.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }

    /// Bytes of the mapping resident in memory (mincore).
    fn resident(&self, page: usize) -> usize {
        let pages = self.len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is this (page-aligned) mapping, `vec` has one byte per page.
        let rc = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, vec.as_mut_ptr()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|b| **b & 1 != 0).count() * page
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `Mapping::new` with this length; the socket that
        // borrowed it was dropped first (see `SocketMemory`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The two buffers of one socket. The socket borrows them as `&'static mut [u8]`: whoever
/// holds a `SocketMemory` drops it only after the socket it was given to (the shard removes
/// the socket from its set first, and declares its socket set before its memory table).
pub(crate) struct SocketMemory {
    rx: Mapping,
    tx: Mapping,
    /// Data was written since the send buffer was last given back.
    pub(crate) sent_since_release: bool,
    /// Data was read since the receive buffer was last given back.
    pub(crate) read_since_release: bool,
    /// Bytes the stream has read, modulo 2^32 (as TCP sequence numbers count).
    pub(crate) read_total: u32,
}

impl SocketMemory {
    /// Two fresh buffers of `size` bytes each and the slices smoltcp gets (rx, tx).
    pub(crate) fn new(
        size: usize,
    ) -> io::Result<(SocketMemory, &'static mut [u8], &'static mut [u8])> {
        let rx = Mapping::new(size)?;
        let tx = Mapping::new(size)?;
        // SAFETY: each mapping is valid for `len` bytes and outlives the socket (struct doc);
        // the two slices do not overlap and nothing else reads or writes the mappings except
        // `release_send`, which the caller invokes only on an empty send ring.
        let (rx_slice, tx_slice) = unsafe {
            (
                std::slice::from_raw_parts_mut(rx.ptr.as_ptr(), size),
                std::slice::from_raw_parts_mut(tx.ptr.as_ptr(), size),
            )
        };
        let memory = SocketMemory {
            rx,
            tx,
            sent_since_release: false,
            read_since_release: false,
            read_total: 0,
        };
        Ok((memory, rx_slice, tx_slice))
    }

    /// Gives the send buffer's pages back: only call it while the socket's send queue is empty.
    pub(crate) fn release_send(&mut self) {
        self.tx.release();
        self.sent_since_release = false;
    }

    /// Gives the receive buffer's pages back: only call it while the receive ring is empty and
    /// holds no out-of-order segment (see the module comment).
    pub(crate) fn release_recv(&mut self) {
        self.rx.release();
        self.read_since_release = false;
    }

    /// Resident bytes of both buffers.
    pub(crate) fn resident(&self) -> usize {
        let page = page_size();
        self.rx.resident(page) + self.tx.resident(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_committed_as_touched_and_released_when_asked() {
        let page = page_size();
        let (mut m, rx, tx) = SocketMemory::new(64 * page).unwrap();
        assert_eq!(m.resident(), 0, "nothing touched yet");
        rx[..3 * page].fill(1);
        tx[..page].fill(2);
        assert_eq!(m.resident(), 4 * page);
        m.release_send();
        assert_eq!(m.resident(), 3 * page);
        m.release_recv();
        assert_eq!(m.resident(), 0);
        assert_eq!((rx[0], tx[0]), (0, 0), "released pages read as zeros");
    }
}
