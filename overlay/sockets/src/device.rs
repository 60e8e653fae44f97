//! The smoltcp device: two packet queues between the interface and the L3 port.
//!
//! The device never drops a packet smoltcp hands it. `transmit` refuses (returns `None`) once
//! the outbound queue holds `soft_limit` packets, so smoltcp keeps the data in its socket
//! buffers and retries on a later poll: backpressure instead of loss (smoltcp recovers from loss
//! slowly: 1 s minimum RTO, no SACK).

use bytes::{Bytes, BytesMut};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::collections::VecDeque;

pub(crate) struct QueueDevice {
    pub inbound: VecDeque<Bytes>,
    pub outbound: VecDeque<Bytes>,
    mtu: usize,
    soft_limit: usize,
}

impl QueueDevice {
    pub fn new(mtu: usize, soft_limit: usize) -> Self {
        QueueDevice {
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
            mtu,
            soft_limit,
        }
    }

    pub fn outbound_full(&self) -> bool {
        self.outbound.len() >= self.soft_limit
    }
}

pub(crate) struct RxToken(Bytes);

pub(crate) struct TxToken<'a>(&'a mut VecDeque<Bytes>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = BytesMut::zeroed(len);
        let r = f(&mut buf);
        self.0.push_back(buf.freeze());
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        // A reply generated while receiving (an RST, say) may exceed the soft limit: it is
        // bounded by the inbound batch, and the poll loop stops taking inbound packets while
        // the outbound queue is over its limit.
        let pkt = self.inbound.pop_front()?;
        Some((RxToken(pkt), TxToken(&mut self.outbound)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.outbound_full() {
            return None;
        }
        Some(TxToken(&mut self.outbound))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = None;
        // Every packet on the overlay is authenticated end to end (AEAD), so verifying the TCP
        // checksum again on receive buys nothing. We still compute it on transmit: kernel
        // stacks behind a TUN endpoint check it.
        let mut checksum = ChecksumCapabilities::default();
        checksum.tcp = phy::Checksum::Tx;
        checksum.icmpv6 = phy::Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}
