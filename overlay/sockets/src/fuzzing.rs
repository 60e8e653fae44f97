//! Entry points for the fuzz targets (`fuzz/targets`) into the stack's packet demultiplexer,
//! which the crate keeps private. Not an API: hidden, and may change with the fuzz targets.

use std::net::Ipv6Addr;

/// (remote address, remote port, local port) of the connection an inbound packet belongs to
/// ([`crate::demux::inbound_connection`]).
pub fn inbound_connection(packet: &[u8]) -> Option<(Ipv6Addr, u16, u16)> {
    crate::demux::inbound_connection(packet).map(|k| (k.remote, k.remote_port, k.local_port))
}

/// The connection a SYN opens ([`crate::demux::connection_request`]).
pub fn connection_request(packet: &[u8]) -> Option<(Ipv6Addr, u16, u16)> {
    crate::demux::connection_request(packet).map(|k| (k.remote, k.remote_port, k.local_port))
}
