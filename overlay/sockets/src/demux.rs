//! Which TCP connection an inbound IPv6 packet belongs to, read from its headers without
//! trusting them: the stack shards its sockets by this identity.

use std::net::Ipv6Addr;

const IPV6_HEADER: usize = 40;
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_TCP: u8 = 6;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_ICMPV6: u8 = 58;
const NEXT_DESTINATION: u8 = 60;
/// Extension headers followed before giving up (a chain longer than this is not real traffic).
const MAX_EXTENSIONS: usize = 8;
/// ICMPv6 errors that quote the packet that caused them: destination unreachable, packet too
/// big, time exceeded, parameter problem.
const ICMPV6_ERRORS: std::ops::RangeInclusive<u8> = 1..=4;
const ICMPV6_HEADER: usize = 8;

/// A TCP connection as seen from this stack: the peer's address and port and our port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnectionKey {
    pub remote: Ipv6Addr,
    pub remote_port: u16,
    pub local_port: u16,
}

/// The connection an inbound packet belongs to: a TCP segment's own, or for an ICMPv6 error the
/// connection of the TCP segment it quotes. `None` for anything else or anything truncated.
pub(crate) fn inbound_connection(packet: &[u8]) -> Option<ConnectionKey> {
    let (next, payload) = transport(packet)?;
    match next {
        NEXT_TCP => {
            let (src_port, dst_port) = ports(payload)?;
            Some(ConnectionKey {
                remote: source(packet)?,
                remote_port: src_port,
                local_port: dst_port,
            })
        }
        NEXT_ICMPV6 if ICMPV6_ERRORS.contains(payload.first()?) => {
            // The quoted packet is one we sent: its destination is the peer.
            let quoted = payload.get(ICMPV6_HEADER..)?;
            let (next, quoted_payload) = transport(quoted)?;
            if next != NEXT_TCP {
                return None;
            }
            let (src_port, dst_port) = ports(quoted_payload)?;
            Some(ConnectionKey {
                remote: destination(quoted)?,
                remote_port: dst_port,
                local_port: src_port,
            })
        }
        _ => None,
    }
}

/// What the receive side of a connection learns from one inbound TCP segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentSeq {
    /// Sequence number of the first byte after this segment's payload (a SYN's own number
    /// + 1: where data starts).
    pub end: u32,
    /// The segment opens the connection (SYN): `end` is where its data starts.
    pub syn: bool,
}

/// For a TCP segment (not an ICMPv6 error): the sequence numbers its payload covers. `None`
/// for resets (they carry no stream data) and anything truncated.
pub(crate) fn inbound_segment_seq(packet: &[u8]) -> Option<SegmentSeq> {
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    let (next, tcp) = transport(packet)?;
    if next != NEXT_TCP {
        return None;
    }
    let header = tcp.get(..20)?;
    let flags = header[13];
    if flags & RST != 0 {
        return None;
    }
    let seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let data_offset = usize::from(header[12] >> 4) * 4;
    let payload = tcp.len().checked_sub(data_offset)?;
    let syn = flags & SYN != 0;
    // A SYN takes one sequence number before the data.
    let end = seq
        .wrapping_add(u32::from(syn))
        .wrapping_add(u32::try_from(payload).ok()?);
    Some(SegmentSeq { end, syn })
}

/// For a TCP segment opening a connection (SYN without ACK): its connection.
pub(crate) fn connection_request(packet: &[u8]) -> Option<ConnectionKey> {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let (next, payload) = transport(packet)?;
    if next != NEXT_TCP || *payload.get(13)? & (SYN | ACK) != SYN {
        return None;
    }
    inbound_connection(packet)
}

fn source(packet: &[u8]) -> Option<Ipv6Addr> {
    let bytes: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
    Some(Ipv6Addr::from(bytes))
}

fn destination(packet: &[u8]) -> Option<Ipv6Addr> {
    let bytes: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
    Some(Ipv6Addr::from(bytes))
}

fn ports(tcp: &[u8]) -> Option<(u16, u16)> {
    let header = tcp.get(..4)?;
    Some((
        u16::from_be_bytes([header[0], header[1]]),
        u16::from_be_bytes([header[2], header[3]]),
    ))
}

/// The upper-layer protocol and its bytes, past the IPv6 header and any extension headers.
/// A non-first fragment carries no transport header: `None`.
fn transport(packet: &[u8]) -> Option<(u8, &[u8])> {
    if packet.len() < IPV6_HEADER || packet[0] >> 4 != 6 {
        return None;
    }
    let mut next = packet[6];
    let mut rest = &packet[IPV6_HEADER..];
    for _ in 0..MAX_EXTENSIONS {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION => {
                let len = (usize::from(*rest.get(1)?) + 1) * 8;
                next = *rest.first()?;
                rest = rest.get(len..)?;
            }
            NEXT_FRAGMENT => {
                let header = rest.get(..8)?;
                let offset = u16::from_be_bytes([header[2], header[3]]) >> 3;
                if offset != 0 {
                    return None;
                }
                next = header[0];
                rest = &rest[8..];
            }
            _ => return Some((next, rest)),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 1);
    const REMOTE: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 2);

    fn ipv6(next: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.push(next);
        p.push(64);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    fn tcp(src_port: u16, dst_port: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[..2].copy_from_slice(&src_port.to_be_bytes());
        t[2..4].copy_from_slice(&dst_port.to_be_bytes());
        t[12] = 5 << 4;
        t
    }

    #[test]
    fn tcp_segment() {
        let p = ipv6(NEXT_TCP, REMOTE, LOCAL, &tcp(40000, 80));
        assert_eq!(
            inbound_connection(&p),
            Some(ConnectionKey {
                remote: REMOTE,
                remote_port: 40000,
                local_port: 80
            })
        );
    }

    #[test]
    fn segment_sequence_ends() {
        let seg = |flags: u8, seq: u32, payload: usize| {
            let mut t = tcp(40000, 80);
            t[4..8].copy_from_slice(&seq.to_be_bytes());
            t[13] = flags;
            t.extend(std::iter::repeat_n(7u8, payload));
            ipv6(NEXT_TCP, REMOTE, LOCAL, &t)
        };
        let syn = SegmentSeq {
            end: 101,
            syn: true,
        };
        assert_eq!(inbound_segment_seq(&seg(0x02, 100, 0)), Some(syn));
        assert_eq!(inbound_segment_seq(&seg(0x12, 100, 0)), Some(syn));
        let data = SegmentSeq { end: 4, syn: false };
        assert_eq!(
            inbound_segment_seq(&seg(0x18, u32::MAX - 9, 14)),
            Some(data)
        );
        assert_eq!(inbound_segment_seq(&seg(0x04, 100, 0)), None, "reset");
        // A data offset past the packet's end.
        let mut bad = seg(0x10, 1, 0);
        bad[40 + 12] = 15 << 4;
        assert_eq!(inbound_segment_seq(&bad), None);
        assert_eq!(inbound_segment_seq(&seg(0x10, 1, 0)[..50]), None);
    }

    #[test]
    fn connection_requests_are_syns_without_ack() {
        let with_flags = |flags: u8| {
            let mut t = tcp(40000, 80);
            t[13] = flags;
            ipv6(NEXT_TCP, REMOTE, LOCAL, &t)
        };
        let key = connection_request(&with_flags(0x02)).unwrap();
        assert_eq!(
            (key.remote, key.remote_port, key.local_port),
            (REMOTE, 40000, 80)
        );
        for flags in [0x12, 0x10, 0x18, 0x04, 0x11, 0] {
            assert_eq!(
                connection_request(&with_flags(flags)),
                None,
                "flags {flags:#x}"
            );
        }
        // Truncated before the flags byte, or not TCP.
        let syn = with_flags(0x02);
        assert_eq!(connection_request(&syn[..40 + 13]), None);
        let mut udp = syn.clone();
        udp[6] = 17;
        assert_eq!(connection_request(&udp), None);
    }

    #[test]
    fn tcp_after_extension_headers() {
        // Hop-by-hop (8 bytes) → destination options (16 bytes) → first fragment → TCP.
        let mut ext = vec![NEXT_DESTINATION, 0, 0, 0, 0, 0, 0, 0];
        ext.extend_from_slice(&[NEXT_FRAGMENT, 1, 0, 0, 0, 0, 0, 0]);
        ext.extend_from_slice(&[0; 8]);
        ext.extend_from_slice(&[NEXT_TCP, 0, 0, 1, 0, 0, 0, 7]);
        ext.extend_from_slice(&tcp(1234, 443));
        let p = ipv6(NEXT_HOP_BY_HOP, REMOTE, LOCAL, &ext);
        let key = inbound_connection(&p).unwrap();
        assert_eq!((key.remote_port, key.local_port), (1234, 443));
        // A later fragment has no TCP header to read.
        let mut later = vec![NEXT_TCP, 0, 0x05, 0x00, 0, 0, 0, 7];
        later.extend_from_slice(&tcp(1234, 443));
        assert_eq!(
            inbound_connection(&ipv6(NEXT_FRAGMENT, REMOTE, LOCAL, &later)),
            None
        );
    }

    #[test]
    fn icmp_error_maps_to_the_quoted_connection() {
        // Our segment 50000 → 8080 to REMOTE, quoted by a router's "destination unreachable".
        let quoted = ipv6(NEXT_TCP, LOCAL, REMOTE, &tcp(50000, 8080));
        let mut icmp = vec![1, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quoted);
        let router = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 9);
        let p = ipv6(NEXT_ICMPV6, router, LOCAL, &icmp);
        assert_eq!(
            inbound_connection(&p),
            Some(ConnectionKey {
                remote: REMOTE,
                remote_port: 8080,
                local_port: 50000
            })
        );
        // An echo request is not an error: no connection.
        icmp[0] = 128;
        assert_eq!(
            inbound_connection(&ipv6(NEXT_ICMPV6, router, LOCAL, &icmp)),
            None
        );
    }

    #[test]
    fn truncated_and_garbage_packets_never_panic() {
        let good = ipv6(NEXT_TCP, REMOTE, LOCAL, &tcp(40000, 80));
        for len in 0..good.len() {
            let key = inbound_connection(&good[..len]);
            // Ports need the first 4 bytes of the TCP header.
            assert_eq!(key.is_some(), len >= IPV6_HEADER + 4, "length {len}");
        }
        let mut quoted = vec![1, 0, 0, 0, 0, 0, 0, 0];
        quoted.extend_from_slice(&ipv6(NEXT_TCP, LOCAL, REMOTE, &tcp(1, 2)));
        let icmp = ipv6(NEXT_ICMPV6, REMOTE, LOCAL, &quoted);
        for len in 0..icmp.len() {
            let _ = inbound_connection(&icmp[..len]);
        }
        // Extension header lengths pointing past the end, and deterministic garbage.
        let long_ext = ipv6(NEXT_ROUTING, REMOTE, LOCAL, &[NEXT_TCP, 255, 0, 0]);
        assert_eq!(inbound_connection(&long_ext), None);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..2000 {
            let mut p = Vec::with_capacity(len % 200);
            for _ in 0..len % 200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                p.push(x as u8);
            }
            if let Some(first) = p.first_mut() {
                // Half of them claim IPv6 so the header walk is exercised.
                if len % 2 == 0 {
                    *first = 0x60;
                }
            }
            let _ = inbound_connection(&p);
        }
    }
}
