//! Tuning of the userspace stack ([`StackConfig`]): its own module because both the stack
//! handle and the shard state read it.

use std::time::Duration;

/// Tuning of a [`Stack`](crate::Stack).
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Receive and send buffer of each TCP socket, in bytes. It bounds the window and so the
    /// throughput of one stream to `buffer / RTT`: 256 KiB carries 2 Gbit/s at 1 ms RTT and
    /// 10 Gbit/s at 0.2 ms (loopback overlay hops). Each buffer is its own anonymous mapping,
    /// committed page by page as data passes through it: up to 2 × buffer per busy stream, a
    /// few pages for one carrying small requests; the whole of it returns to the OS when the
    /// socket goes, and while it lives whenever it is empty (`release_interval`).
    pub socket_buffer: usize,
    /// Connections accepted by the stack but not yet taken with `accept()`, per listener.
    /// Further SYNs are refused with a reset.
    pub accept_backlog: usize,
    /// How long `connect` waits for the handshake.
    pub connect_timeout: Duration,
    /// A stream whose sent data stays unacknowledged this long is reset (dead peer or no route).
    pub stream_timeout: Duration,
    /// Keep-alive probe interval on idle streams (detects dead peers).
    pub keep_alive: Duration,
    /// Packets queued toward the L3 port before the stack stops starting egress passes (soft
    /// limit); replies to inbound packets are dropped and counted beyond twice this.
    pub outbound_queue: usize,
    /// How often the buffers of quiet sockets are given back to the OS: the send buffer once
    /// its data is acknowledged, the receive buffer once everything received was read (their
    /// pages are committed again when data next passes).
    pub release_interval: Duration,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig {
            socket_buffer: 256 * 1024,
            accept_backlog: 1024,
            connect_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(120),
            keep_alive: Duration::from_secs(30),
            outbound_queue: 64,
            release_interval: Duration::from_secs(1),
        }
    }
}
