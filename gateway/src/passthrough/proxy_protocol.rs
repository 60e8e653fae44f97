//! PROXY protocol v2 header (binary), sent before passthrough bytes when a route asks for it,
//! so the backend learns the client's address.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a TCP stream from `client` to the gateway's `local` address.
pub(crate) fn header_v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let c = client.ip().to_canonical();
    let l = local.ip().to_canonical();
    let mut out = SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY command
    match (c, l) {
        (IpAddr::V4(c4), IpAddr::V4(l4)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c4.octets());
            out.extend_from_slice(&l4.octets());
        }
        _ => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c).octets());
            out.extend_from_slice(&v6(l).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let h = header_v2(
            "192.0.2.1:5000".parse().unwrap(),
            "[::ffff:198.51.100.2]:443".parse().unwrap(),
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 1]);
        assert_eq!(&h[20..24], &[198, 51, 100, 2]);
        assert_eq!(&h[24..], &[0x13, 0x88, 0x01, 0xbb]);
    }

    #[test]
    fn ipv6_header_length() {
        let h = header_v2(
            "[2001:db8::1]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
    }
}
