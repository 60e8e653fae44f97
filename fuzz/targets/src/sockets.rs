//! The userspace stack's packet demultiplexer: which connection an inbound packet belongs to.

use meshgate_sockets::fuzzing::{connection_request, inbound_connection};

/// Any bytes as an inbound IPv6 packet: a connection request is also an inbound packet of the
/// same connection, and the connection read never depends on bytes past the end.
pub fn demux(data: &[u8]) {
    let inbound = inbound_connection(data);
    if let Some(request) = connection_request(data) {
        assert_eq!(inbound, Some(request));
    }
    if let Some((remote, _, _)) = inbound {
        // Not a TCP segment's own source: then it is an address quoted by an ICMPv6 error.
        if data.get(6) == Some(&6) {
            assert_eq!(&data[8..24], &remote.octets());
        }
    }
}
