//! SSRF guard: a public gateway must not let a route reach into the gateway host's own
//! services or private networks unless the operator allows it. The addresses that count as
//! the gateway's own (interfaces, every listener's IP, `reservations.public_addresses`) are re-read at
//! runtime, so a reservation cannot loop the gateway into itself through an address it gained
//! after start or one it has only behind NAT.

use meshgate_config::gateway::GatewayConfig;
use meshgate_config::nat64::Nat64Prefix;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock};

/// What the guard knows beyond the fixed special ranges; swapped whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Known {
    /// The gateway's own addresses (IPv4-mapped ones as IPv4).
    pub(crate) own: Vec<IpAddr>,
    /// `security.nat64_prefixes`: checked besides the well-known ones.
    pub(crate) nat64: Vec<Nat64Prefix>,
}

impl Known {
    /// The gateway's own addresses now (interfaces re-read) and the configured prefixes.
    pub(crate) fn of(config: &GatewayConfig) -> Known {
        Known::with_interfaces(config, interface_addresses())
    }

    fn with_interfaces(config: &GatewayConfig, interfaces: Vec<IpAddr>) -> Known {
        let mut own: Vec<IpAddr> = interfaces
            .into_iter()
            .chain(
                config
                    .listen
                    .https
                    .iter()
                    .chain(&config.listen.http)
                    .chain([&config.admin.listen, &config.api.listen])
                    .map(|a| a.ip()),
            )
            .chain(config.reservations.public_addresses.iter().copied())
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| ip.to_canonical())
            .collect();
        own.sort();
        own.dedup();
        Known {
            own,
            nat64: config.security.nat64_prefixes.clone(),
        }
    }
}

/// The guard's current knowledge, refreshed from the configuration and the interfaces.
#[derive(Debug, Default)]
pub(crate) struct Guard {
    known: RwLock<Arc<Known>>,
}

impl Guard {
    pub(crate) fn new(config: &GatewayConfig) -> Guard {
        Guard {
            known: RwLock::new(Arc::new(Known::of(config))),
        }
    }

    /// Re-reads the interfaces and takes own addresses and prefixes from `config`.
    pub(crate) fn refresh(&self, config: &GatewayConfig) {
        let known = Known::of(config);
        if let Ok(mut k) = self.known.write()
            && **k != known
        {
            tracing::info!(own = known.own.len(), "SSRF guard: own addresses changed");
            *k = Arc::new(known);
        }
    }

    pub(crate) fn known(&self) -> Arc<Known> {
        self.known
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Why `ip` is refused, or `None` when it is a public address.
    pub(crate) fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        refusal(ip, &self.known())
    }
}

/// Why an address is refused, or `None` when it is a public address.
pub(crate) fn refusal(ip: IpAddr, known: &Known) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if known.own.contains(&ip) {
        return Some("one of the gateway's own addresses");
    }
    match ip {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6, known),
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

fn refusal_v6(ip: Ipv6Addr, known: &Known) -> Option<&'static str> {
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
    } else {
        // NAT64, SIIT, 6to4 and Teredo would carry the connection to the embedded IPv4
        // address: it passes only if it would pass on its own (own addresses included).
        let v4s = embedded_v4(ip, &known.nat64);
        v4s.into_iter()
            .find_map(|v4| refusal(IpAddr::V4(v4), known))
            .map(|_| "translated to a refused IPv4")
    }
}

/// IPv4 addresses an IPv6 address embeds: NAT64 `64:ff9b::/96` (RFC 6052), local-use
/// NAT64 `64:ff9b:1::/48` (RFC 8215; the /96 and /48 layouts), the operator's NAT64
/// prefixes, IPv4-translated `::ffff:0:a.b.c.d` (SIIT, RFC 2765), 6to4 `2002::/16`
/// (RFC 3056), and Teredo `2001::/32` (RFC 4380: the server, and the client obfuscated).
fn embedded_v4(ip: Ipv6Addr, nat64: &[Nat64Prefix]) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    let b = ip.octets();
    let last32 = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let mut out: Vec<Ipv4Addr> = nat64.iter().filter_map(|p| p.embedded(ip)).collect();
    if let Some(v4) = Nat64Prefix::WELL_KNOWN.embedded(ip) {
        out.push(v4);
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
            out.push(last32);
        } else {
            out.extend(written);
        }
    } else if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        out.push(last32);
    } else if s[0] == 0x2002 {
        out.push(Ipv4Addr::new(b[2], b[3], b[4], b[5]));
    } else if s[..2] == [0x2001, 0] {
        out.push(Ipv4Addr::new(b[4], b[5], b[6], b[7]));
        out.push(Ipv4Addr::new(!b[12], !b[13], !b[14], !b[15]));
    }
    out
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

    fn none() -> Known {
        Known::default()
    }

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
            assert!(refusal(bad.parse().unwrap(), &none()).is_some(), "{bad}");
        }
        for good in ["1.1.1.1", "2001:db8::1", "400::1", "203.0.113.9"] {
            assert!(refusal(good.parse().unwrap(), &none()).is_none(), "{good}");
        }
        let own: IpAddr = "203.0.113.9".parse().unwrap();
        let known = Known {
            own: vec![own],
            nat64: Vec::new(),
        };
        assert!(refusal(own, &known).is_some());
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
            assert!(refusal(bad.parse().unwrap(), &none()).is_some(), "{bad}");
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
            assert!(refusal(good.parse().unwrap(), &none()).is_none(), "{good}");
        }
    }

    #[test]
    fn translated_teredo_and_operator_nat64_checked_by_their_ipv4() {
        let nat64: Nat64Prefix = "2001:db8:64::/96".to_string().try_into().unwrap();
        let known = Known {
            own: vec!["203.0.113.7".parse().unwrap()],
            nat64: vec![nat64],
        };
        for bad in [
            // IPv4-translated (SIIT) embedding loopback, private and an own address.
            "::ffff:0:127.0.0.1",
            "::ffff:0:10.1.2.3",
            "::ffff:0:203.0.113.7",
            // Teredo: server 10.0.0.1; client 127.0.0.1 (obfuscated: 80ff:fffe).
            "2001:0:a00:1::1",
            "2001:0:808:808:0:0:80ff:fffe",
            // The operator's NAT64 prefix, and the well-known one, to private or own IPv4.
            "2001:db8:64::192.168.0.1",
            "2001:db8:64::203.0.113.7",
            "64:ff9b::203.0.113.7",
            "64:ff9b::7f00:1",
            // 6to4 to an own address.
            "2002:cb00:7107::1",
        ] {
            assert!(refusal(bad.parse().unwrap(), &known).is_some(), "{bad}");
        }
        for good in [
            "::ffff:0:8.8.8.8",
            "2001:0:808:808:0:0:f7f7:f7f7",
            "2001:db8:64::8.8.8.8",
            "2001:db8:65::10.0.0.1",
            "64:ff9b::1.1.1.1",
        ] {
            assert!(refusal(good.parse().unwrap(), &known).is_none(), "{good}");
        }
    }

    #[test]
    fn own_addresses_include_listen_ips_and_public_addresses() {
        let config = meshgate_config::gateway::GatewayConfig::parse(
            std::path::Path::new("g.toml"),
            "[listen]\nhttps = [\"[::]:443\", \"198.51.100.4:443\"]\nhttp = []\n\
             [reservations]\npublic_addresses = [\"203.0.113.7\", \"2001:db8::7\"]\n",
        )
        .unwrap();
        let known = Known::with_interfaces(&config, vec!["::ffff:192.0.2.1".parse().unwrap()]);
        for own in ["203.0.113.7", "2001:db8::7", "198.51.100.4", "192.0.2.1"] {
            let ip: IpAddr = own.parse().unwrap();
            assert!(known.own.contains(&ip), "{own} in {:?}", known.own);
            assert!(refusal(ip, &known).is_some(), "{own}");
        }
        assert!(!known.own.iter().any(|ip| ip.is_unspecified()));
        // The guard takes a reloaded configuration's addresses.
        let guard = Guard::new(
            &meshgate_config::gateway::GatewayConfig::parse(std::path::Path::new("g.toml"), "")
                .unwrap(),
        );
        assert!(guard.refusal("203.0.113.7".parse().unwrap()).is_none());
        guard.refresh(&config);
        assert!(guard.refusal("203.0.113.7".parse().unwrap()).is_some());
        assert!(guard.refusal("::1".parse().unwrap()).is_some());
    }
}
