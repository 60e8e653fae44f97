//! The smoltcp device: a shard's inbound queue and the stack's shared outbound queue.
//!
//! Egress: the device never drops a packet smoltcp hands it, and never refuses one either:
//! smoltcp 0.14 marks a fast retransmit as done and sets its retransmission timer idle before
//! the transmit, so a refused transmit lost that retransmission for good and left the
//! connection with data in flight and no timer (`tests/shards.rs`: 96 connections, one-packet
//! queue, about 40 % of the fast retransmits lost before this). The backpressure is applied
//! between egress passes instead: no egress pass starts while the outbound queue holds
//! `soft_limit` packets, and one pass emits at most one segment per socket of a shard, so
//! smoltcp keeps the rest in its socket buffers (backpressure instead of loss: smoltcp recovers
//! from loss slowly). All shards share one outbound queue, so the limit bounds what the whole
//! stack has waiting for the L3 port.
//!
//! Ingress: the stack always takes inbound packets, whatever the outbound queue holds (a stack
//! that stops reading while its own sends wait can deadlock with a peer doing the same). The
//! only packets ingress itself produces are smoltcp's direct replies (pure ACKs, RSTs, ICMP
//! errors); beyond [`Outbound::hard_limit`] (twice the soft limit) they are dropped and
//! counted: the peer retransmits, as after any loss. So the queue holds at most
//! `max(hard_limit, soft_limit + one egress pass)` packets.

use bytes::{Bytes, BytesMut};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use std::collections::VecDeque;

/// Packets produced by every shard, waiting for the L3 `tx` channel.
pub(crate) struct Outbound {
    pub queue: VecDeque<Bytes>,
    soft_limit: usize,
    /// Ingress replies dropped because the queue was at its hard limit.
    pub replies_dropped: u64,
}

impl Outbound {
    pub(crate) fn new(soft_limit: usize) -> Self {
        Outbound {
            queue: VecDeque::new(),
            soft_limit: soft_limit.max(1),
            replies_dropped: 0,
        }
    }

    /// Beyond this many queued packets, replies produced by ingress are dropped.
    pub(crate) fn hard_limit(&self) -> usize {
        self.soft_limit * 2
    }

    pub(crate) fn full(&self) -> bool {
        self.queue.len() >= self.soft_limit
    }
}

/// One shard's view of the L3 port for the duration of a smoltcp call.
pub(crate) struct ShardDevice<'a> {
    pub inbound: &'a mut VecDeque<Bytes>,
    pub outbound: &'a mut Outbound,
    pub mtu: usize,
}

pub(crate) struct RxToken(Bytes);

/// Where a packet smoltcp emits goes: egress always queues it; an ingress reply is dropped
/// (and counted) if the queue is at its hard limit when smoltcp writes it.
pub(crate) struct TxToken<'a> {
    outbound: &'a mut Outbound,
    ingress_reply: bool,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = BytesMut::zeroed(len);
        let r = f(&mut buf);
        let o = self.outbound;
        if self.ingress_reply && o.queue.len() >= o.hard_limit() {
            o.replies_dropped += 1;
        } else {
            o.queue.push_back(buf.freeze());
        }
        r
    }
}

impl Device for ShardDevice<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        // smoltcp uses this token only for its direct reply to this packet (see the module
        // comment): capped at the hard limit.
        let pkt = self.inbound.pop_front()?;
        Some((
            RxToken(pkt),
            TxToken {
                outbound: self.outbound,
                ingress_reply: true,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        // Never refused (see the module comment).
        Some(TxToken {
            outbound: self.outbound,
            ingress_reply: false,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    caps.max_burst_size = None;
    // Every packet on the overlay is authenticated end to end (AEAD), so verifying the TCP
    // checksum again on receive buys nothing. We still compute it on transmit: kernel stacks
    // behind a TUN endpoint check it.
    let mut checksum = ChecksumCapabilities::default();
    checksum.tcp = phy::Checksum::Tx;
    checksum.icmpv6 = phy::Checksum::Tx;
    caps.checksum = checksum;
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::TxToken as _;

    /// At the hard limit an ingress reply is dropped and counted; egress is still queued.
    #[test]
    fn ingress_replies_stop_at_the_hard_limit_egress_does_not() {
        let mut outbound = Outbound::new(2);
        let mut inbound = VecDeque::from(vec![Bytes::from_static(b"x"); 6]);
        let mut device = ShardDevice {
            inbound: &mut inbound,
            outbound: &mut outbound,
            mtu: 1280,
        };
        for _ in 0..6 {
            let (_rx, tx) = device.receive(Instant::ZERO).unwrap();
            tx.consume(40, |_| ());
        }
        assert_eq!(device.outbound.queue.len(), 4);
        assert_eq!(device.outbound.replies_dropped, 2);
        device.transmit(Instant::ZERO).unwrap().consume(40, |_| ());
        assert_eq!(device.outbound.queue.len(), 5);
        assert_eq!(device.outbound.replies_dropped, 2);
    }
}
