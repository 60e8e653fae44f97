//! SSRF guard: a public gateway must not let a route reach into the gateway host's own
//! services or private networks unless the operator allows it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused, or `None` when it is a public address.
pub(crate) fn refusal(ip: IpAddr, own: &[IpAddr]) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if own.contains(&ip) {
        return Some("one of the gateway's own addresses");
    }
    match ip {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking (198.18.0.0/15)")
    } else if ip.is_unspecified() || ip.is_multicast() || o[0] == 0 || o[0] >= 240 {
        // 0.0.0.0/8 "this network", 240.0.0.0/4 reserved (with broadcast), multicast.
        Some("not a unicast host address")
    } else {
        None
    }
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || ip.is_multicast() {
        Some("not a unicast host address")
    } else if s[..6] == [0; 6] {
        // Deprecated IPv4-compatible `::a.b.c.d`: never a real backend, may reach IPv4.
        Some("IPv4-compatible (deprecated)")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("private (unique local)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local (deprecated)")
    } else if embedded_v4(ip).iter().any(|v4| refusal_v4(*v4).is_some()) {
        // NAT64 and 6to4 gateways would carry the connection to that IPv4 address.
        Some("translated to a non-public IPv4")
    } else {
        None
    }
}

/// IPv4 addresses a translation prefix embeds: NAT64 `64:ff9b::/96` (RFC 6052), local-use
/// NAT64 `64:ff9b:1::/48` (RFC 8215; the /96 and /48 layouts), 6to4 `2002::/16` (RFC 3056).
fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    let b = ip.octets();
    let last32 = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        vec![last32]
    } else if s[..3] == [0x64, 0xff9b, 1] {
        // The operator picks the prefix length: a /96 puts the address in the last 32 bits,
        // a /48 in bytes 6-7 and 9-10 (byte 8 is reserved). Both are checked; the empty
        // (all-zero) one of a well-formed address is not an address.
        let layouts = [last32, Ipv4Addr::new(b[6], b[7], b[9], b[10])];
        let written: Vec<Ipv4Addr> = layouts
            .into_iter()
            .filter(|v| !v.is_unspecified())
            .collect();
        if written.is_empty() {
            vec![last32]
        } else {
            written
        }
    } else if s[0] == 0x2002 {
        vec![Ipv4Addr::new(b[2], b[3], b[4], b[5])]
    } else {
        Vec::new()
    }
}

/// The host's interface addresses (for the "own addresses" rule).
#[allow(unsafe_code)] // FFI: getifaddrs has no safe std equivalent.
pub(crate) fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list that we only read, each node and address checked
    // for null and cast by its own `sa_family`, then free once with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_refused_public_allowed() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(refusal(bad.parse().unwrap(), &[]).is_some(), "{bad}");
        }
        for good in ["1.1.1.1", "2001:db8::1", "400::1", "203.0.113.9"] {
            assert!(refusal(good.parse().unwrap(), &[]).is_none(), "{good}");
        }
        let own: IpAddr = "203.0.113.9".parse().unwrap();
        assert!(refusal(own, &[own]).is_some());
        assert!(interface_addresses().iter().any(|a| a.is_loopback()));
    }

    #[test]
    fn special_and_translated_ranges_refused() {
        for bad in [
            // IPv4 special ranges.
            "198.18.0.1",
            "198.19.255.254",
            "240.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
            "224.0.0.1",
            // NAT64 embedding private or loopback IPv4.
            "64:ff9b::7f00:1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::192.168.1.1",
            "64:ff9b:1::10.0.0.1",
            "64:ff9b:1:a00:0:100:101:101",
            // 6to4 embedding private IPv4.
            "2002:a00:1::1",
            "2002:c0a8:101::1",
            "2002:7f00:1::",
            // IPv4-compatible, site-local, multicast, unspecified.
            "::10.0.0.1",
            "::8.8.8.8",
            "fec0::1",
            "feff::1",
            "ff02::1",
            "::",
            "::ffff:198.18.0.1",
        ] {
            assert!(refusal(bad.parse().unwrap(), &[]).is_some(), "{bad}");
        }
        for good in [
            "198.20.0.1",
            "198.17.255.255",
            "223.255.255.254",
            "64:ff9b::1.1.1.1",
            "64:ff9b:1::8.8.8.8",
            "64:ff9b:1:808:8:800::",
            "2002:808:808::1",
            "2a01:4f8::1",
        ] {
            assert!(refusal(good.parse().unwrap(), &[]).is_none(), "{good}");
        }
    }
}
