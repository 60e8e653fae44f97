//! Overlay addresses: `600::/7`, a hash of the node's ed25519 public key.
//!
//! `0400::/6` is "Reserved by IETF" in the IANA IPv6 address space registry (RFC 4291).
//! Mycelium uses its lower half `400::/7`, Yggdrasil uses `200::/7` (inside `0200::/7`,
//! formerly NSAP). We take the upper half, `600::/7` (`0600::`-`07ff::`), so one host can run
//! all three overlays without route conflicts.
//!
//! address = `0x06 | (h[0] & 1)` followed by `h[1..16]`, where
//! `h = BLAKE3("meshgate-overlay-address-v1" || ed25519 public key)`.
//! A node owns the /64 containing its address; routes are per /64 prefix.

use std::net::{IpAddr, Ipv6Addr};

/// The first byte of every overlay address, with the low bit cleared.
pub(crate) const PREFIX_BYTE: u8 = 0x06;
const ADDRESS_LABEL: &[u8] = b"meshgate-overlay-address-v1";

/// The /64 a node owns: the first 8 bytes of its address.
pub type Prefix = [u8; 8];

/// Whether an address lies in the overlay range `600::/7`.
pub fn is_overlay_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => is_overlay_v6(v6),
        IpAddr::V4(_) => false,
    }
}

/// Whether an IPv6 address lies in `600::/7`.
pub fn is_overlay_v6(ip: &Ipv6Addr) -> bool {
    ip.octets()[0] & 0xfe == PREFIX_BYTE
}

/// The overlay address derived from an ed25519 public key.
pub(crate) fn address_for_key(public_key: &[u8; 32]) -> Ipv6Addr {
    let mut h = blake3::Hasher::new();
    h.update(ADDRESS_LABEL);
    h.update(public_key);
    let hash = h.finalize();
    let mut a = [0u8; 16];
    a.copy_from_slice(&hash.as_bytes()[..16]);
    a[0] = PREFIX_BYTE | (a[0] & 1);
    Ipv6Addr::from(a)
}

/// The /64 prefix containing an address.
pub fn prefix_of(ip: &Ipv6Addr) -> Prefix {
    let o = ip.octets();
    let mut p = [0u8; 8];
    p.copy_from_slice(&o[..8]);
    p
}

/// The /64 prefix owned by the holder of a public key.
pub(crate) fn prefix_for_key(public_key: &[u8; 32]) -> Prefix {
    prefix_of(&address_for_key(public_key))
}

/// Formats a prefix as `xxxx:xxxx:xxxx:xxxx::/64`.
pub fn prefix_string(p: &Prefix) -> String {
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(p);
    format!("{}/64", Ipv6Addr::from(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_disjoint_from_yggdrasil_and_mycelium() {
        let ygg: Ipv6Addr = "200::1".parse().unwrap();
        let ygg_hi: Ipv6Addr = "3ff::1".parse().unwrap();
        let myc: Ipv6Addr = "400::1".parse().unwrap();
        let myc_hi: Ipv6Addr = "5ff:ffff::1".parse().unwrap();
        for a in [ygg, ygg_hi, myc, myc_hi] {
            assert!(!is_overlay_v6(&a), "{a}");
        }
        assert!(is_overlay_v6(&"600::1".parse().unwrap()));
        assert!(is_overlay_v6(&"7ff:ffff::1".parse().unwrap()));
        assert!(!is_overlay_v6(&"800::1".parse().unwrap()));
        assert!(!is_overlay_address(&"6.0.0.1".parse().unwrap()));
    }

    #[test]
    fn addresses_from_keys_are_in_range_and_spread() {
        let mut seen_low = false;
        let mut seen_high = false;
        for i in 0..64u8 {
            let a = address_for_key(&[i; 32]);
            assert!(is_overlay_v6(&a));
            seen_low |= a.octets()[0] == 6;
            seen_high |= a.octets()[0] == 7;
            assert_eq!(prefix_for_key(&[i; 32]), prefix_of(&a));
        }
        assert!(seen_low && seen_high);
    }
}
