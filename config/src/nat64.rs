//! A NAT64 prefix (RFC 6052 §2.2) as written in `security.nat64_prefixes`: where a translator
//! embeds an IPv4 address in an IPv6 one, so the SSRF guard can check that IPv4 address.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// An IPv6 prefix of one of the lengths RFC 6052 allows (32, 40, 48, 56, 64, 96), written
/// `64:ff9b::/96`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Nat64Prefix {
    prefix: Ipv6Addr,
    len: u8,
}

impl Nat64Prefix {
    /// The well-known prefix `64:ff9b::/96` (RFC 6052).
    pub const WELL_KNOWN: Nat64Prefix = Nat64Prefix {
        prefix: Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0),
        len: 96,
    };
    /// The local-use prefix `64:ff9b:1::/48` (RFC 8215).
    pub const LOCAL_USE: Nat64Prefix = Nat64Prefix {
        prefix: Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        len: 48,
    };

    /// The IPv4 address `ip` carries, if `ip` lies in this prefix.
    pub fn embedded(&self, ip: Ipv6Addr) -> Option<Ipv4Addr> {
        let bits = u128::from(ip);
        let mask = u128::MAX << (128 - u32::from(self.len));
        if bits & mask != u128::from(self.prefix) {
            return None;
        }
        // The 32 bits follow the prefix; bits 64..72 (byte 8, "u") are skipped.
        let b = ip.octets();
        let mut v4 = [0u8; 4];
        let from = usize::from(self.len / 8);
        for (slot, at) in v4.iter_mut().zip((from..16).filter(|&i| i != 8)) {
            *slot = b[at];
        }
        Some(Ipv4Addr::from(v4))
    }
}

impl TryFrom<String> for Nat64Prefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let expected =
            "expected an IPv6 prefix like `64:ff9b::/96` (length 32, 40, 48, 56, 64 or 96)";
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: {expected}"))?;
        let prefix: Ipv6Addr = addr.parse().map_err(|_| format!("`{s}`: {expected}"))?;
        let len: u8 = len.parse().map_err(|_| format!("`{s}`: {expected}"))?;
        if ![32, 40, 48, 56, 64, 96].contains(&len) {
            return Err(format!("`{s}`: {expected}"));
        }
        if u128::from(prefix) & !(u128::MAX << (128 - u32::from(len))) != 0 {
            return Err(format!("`{s}`: bits after the prefix length must be zero"));
        }
        Ok(Nat64Prefix { prefix, len })
    }
}

impl From<Nat64Prefix> for String {
    fn from(p: Nat64Prefix) -> String {
        format!("{}/{}", p.prefix, p.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Nat64Prefix {
        Nat64Prefix::try_from(s.to_string()).unwrap()
    }

    #[test]
    fn every_rfc6052_layout_yields_the_ipv4_address() {
        // RFC 6052 §2.4's examples for 192.0.2.33 under 2001:db8::/n.
        for (prefix, ip) in [
            ("2001:db8::/32", "2001:db8:c000:221::"),
            ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
            ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
        ] {
            assert_eq!(
                p(prefix).embedded(ip.parse().unwrap()),
                Some(Ipv4Addr::new(192, 0, 2, 33)),
                "{prefix}"
            );
        }
        assert_eq!(
            p("2001:db8::/32").embedded("2001:db9::1".parse().unwrap()),
            None
        );
        assert_eq!(
            Nat64Prefix::WELL_KNOWN.embedded("64:ff9b::10.0.0.1".parse().unwrap()),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(String::from(Nat64Prefix::LOCAL_USE), "64:ff9b:1::/48");
    }

    #[test]
    fn bad_prefixes_are_refused() {
        for bad in [
            "64:ff9b::",
            "64:ff9b::/33",
            "64:ff9b::1/96",
            "10.0.0.0/8",
            "x/96",
        ] {
            assert!(Nat64Prefix::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }
}
