//! LAN peer discovery rules (sans-IO): the beacon a node multicasts on its links ("a node with
//! this key accepts overlay links on this port here") and which beacons heard lead to a dial.
//!
//! A beacon is never trusted beyond "try a handshake here": it only names an address to dial,
//! the link is then authenticated by the normal Noise handshake, and a link whose
//! authenticated key is not the beacon's key is closed (`discovery_key_mismatch`). Beacons are
//! rate-limited per source address and in total before anything else is done with them, the
//! table of sources is bounded, and discovered links are capped. Only one side of a pair
//! dials (the one with the smaller key, unless the other has waited long enough), so two
//! nodes that hear each other make one link. The shell is `discovery_io`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;

use crate::clock::Micros;

/// The link-local multicast group beacons go to (`ff02::6d67`, "mg").
pub const GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x6d67);
/// Default UDP port of beacons (every node of a LAN must use the same one).
pub const DEFAULT_PORT: u16 = 9650;
/// Beacon: magic (4) `MGD1`, the node's ed25519 public key (32), its link port (2).
pub const BEACON_LEN: usize = 38;
const MAGIC: &[u8; 4] = b"MGD1";

/// Discovery settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Interfaces beacons are sent and heard on; empty = every interface that is up, not
    /// loopback, and multicast-capable.
    pub interfaces: Vec<String>,
    /// UDP port of beacons.
    pub port: u16,
    /// A beacon goes out on every interface this often.
    pub interval: Duration,
    /// Beacons taken per second in total (all sources); more are dropped and counted.
    pub max_beacons_per_sec: u32,
    /// Source addresses remembered at once (per-source rate limit, tie-break and retry
    /// state); beacons from new sources are dropped while it is full of recent ones.
    pub max_sources: usize,
    /// Discovered links (and attempts) at once; beacons beyond it lead to no dial.
    pub max_links: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            interfaces: Vec::new(),
            port: DEFAULT_PORT,
            interval: Duration::from_secs(2),
            max_beacons_per_sec: 100,
            max_sources: 1024,
            max_links: 16,
        }
    }
}

/// Discovery counters (in the node's status under `discovery`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiscoveryCounters {
    pub beacons_sent: u64,
    pub beacons_received: u64,
    /// Not a beacon (length, magic) or not from a link-local address on an allowed interface.
    pub beacons_malformed: u64,
    /// Dropped: the source sent another less than half an interval ago.
    pub beacons_rate_limited_source: u64,
    /// Dropped: over `max_beacons_per_sec` in total.
    pub beacons_rate_limited_total: u64,
    /// Dropped: `max_sources` sources remembered, all recent.
    pub beacon_sources_full: u64,
    /// Dial attempts to discovered nodes.
    pub discovery_dials: u64,
    /// Not dialed: `max_links` discovered links (or attempts) already.
    pub discovery_links_full: u64,
    /// Links closed: the handshake authenticated another key than the beacon named.
    pub discovery_key_mismatch: u64,
}

/// Why a datagram was not a beacon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeaconError {
    Length,
    Magic,
    Port,
}

/// Encodes a beacon for `key` accepting links on `port`.
pub fn encode_beacon(key: &[u8; 32], port: u16) -> [u8; BEACON_LEN] {
    let mut b = [0u8; BEACON_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..36].copy_from_slice(key);
    b[36..].copy_from_slice(&port.to_be_bytes());
    b
}

/// (key, port) of a beacon.
pub fn decode_beacon(b: &[u8]) -> Result<([u8; 32], u16), BeaconError> {
    if b.len() != BEACON_LEN {
        return Err(BeaconError::Length);
    }
    if &b[..4] != MAGIC {
        return Err(BeaconError::Magic);
    }
    let key: [u8; 32] = b[4..36].try_into().map_err(|_| BeaconError::Length)?;
    let port = u16::from_be_bytes([b[36], b[37]]);
    if port == 0 {
        return Err(BeaconError::Port);
    }
    Ok((key, port))
}

/// Try a handshake with `key` at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub key: [u8; 32],
    pub addr: SocketAddrV6,
}

#[derive(Debug, Clone)]
struct Source {
    /// When a beacon from this source was last taken.
    last: Micros,
    /// Since when this node has left the dial to the source (tie-break).
    deferred_since: Option<Micros>,
    /// When this node last dialed it.
    dialed_at: Option<Micros>,
}

/// A node's discovery state: rate limits, sources, attempts in progress.
pub struct Discovery {
    own_key: [u8; 32],
    /// Whether this node accepts links (then the peer with the smaller key dials).
    listening: bool,
    cfg: DiscoveryConfig,
    sources: BTreeMap<Ipv6Addr, Source>,
    /// Keys with a discovered link or attempt in progress.
    active: BTreeSet<[u8; 32]>,
    /// Total-rate token bucket, in thousandths of a beacon.
    tokens: u64,
    refilled: Micros,
    pub counters: DiscoveryCounters,
}

impl Discovery {
    pub fn new(own_key: [u8; 32], listening: bool, cfg: DiscoveryConfig) -> Discovery {
        let tokens = u64::from(cfg.max_beacons_per_sec) * 1000;
        Discovery {
            own_key,
            listening,
            cfg,
            sources: BTreeMap::new(),
            active: BTreeSet::new(),
            tokens,
            refilled: 0,
            counters: DiscoveryCounters::default(),
        }
    }

    fn interval(&self) -> Micros {
        self.cfg.interval.as_micros() as u64
    }

    /// A datagram from `from` (its scope id is the interface it arrived on; `allowed`:
    /// whether that interface is one discovery runs on). `linked(key)`: whether a link to
    /// that node is up already (configured, inbound or discovered).
    pub fn heard(
        &mut self,
        now: Micros,
        from: SocketAddrV6,
        allowed: bool,
        datagram: &[u8],
        linked: impl Fn(&[u8; 32]) -> bool,
    ) -> Option<Dial> {
        self.counters.beacons_received += 1;
        if !self.take_token(now) {
            self.counters.beacons_rate_limited_total += 1;
            return None;
        }
        let link_local = from.ip().segments()[0] & 0xffc0 == 0xfe80;
        let Ok((key, port)) = decode_beacon(datagram) else {
            self.counters.beacons_malformed += 1;
            return None;
        };
        if !link_local || !allowed || from.scope_id() == 0 {
            self.counters.beacons_malformed += 1;
            return None;
        }
        if key == self.own_key {
            return None;
        }
        let interval = self.interval();
        let src = *from.ip();
        if !self.sources.contains_key(&src) && self.sources.len() >= self.cfg.max_sources {
            // Forget sources not heard for a few intervals; if all are recent, refuse.
            self.sources
                .retain(|_, s| now.saturating_sub(s.last) < 4 * interval);
            if self.sources.len() >= self.cfg.max_sources {
                self.counters.beacon_sources_full += 1;
                return None;
            }
        }
        let s = self.sources.entry(src).or_insert(Source {
            last: 0,
            deferred_since: None,
            dialed_at: None,
        });
        if s.last != 0 && now.saturating_sub(s.last) < interval / 2 {
            self.counters.beacons_rate_limited_source += 1;
            return None;
        }
        s.last = now.max(1);
        if linked(&key) || self.active.contains(&key) {
            s.deferred_since = None;
            return None;
        }
        // One dialer per pair: the smaller key, unless the other has waited 3 intervals
        // (the smaller one may not hear us, e.g. it runs discovery on other interfaces).
        if self.listening && self.own_key > key {
            let since = *s.deferred_since.get_or_insert(now);
            if now.saturating_sub(since) < 3 * interval {
                return None;
            }
        }
        // A failed attempt is retried after a few intervals, not at every beacon.
        if s.dialed_at
            .is_some_and(|t| now.saturating_sub(t) < 5 * interval)
        {
            return None;
        }
        if self.active.len() >= self.cfg.max_links {
            self.counters.discovery_links_full += 1;
            return None;
        }
        s.dialed_at = Some(now);
        s.deferred_since = None;
        self.active.insert(key);
        self.counters.discovery_dials += 1;
        Some(Dial {
            key,
            addr: SocketAddrV6::new(src, port, 0, from.scope_id()),
        })
    }

    /// The attempt or link to `key` ended (a later beacon may lead to a new one).
    pub fn ended(&mut self, key: &[u8; 32]) {
        self.active.remove(key);
    }

    fn take_token(&mut self, now: Micros) -> bool {
        let rate = u64::from(self.cfg.max_beacons_per_sec);
        let refill = now.saturating_sub(self.refilled).saturating_mul(rate) / 1000;
        self.tokens = self.tokens.saturating_add(refill).min(rate * 1000);
        self.refilled = now;
        if self.tokens >= 1000 {
            self.tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(last: u16) -> SocketAddrV6 {
        SocketAddrV6::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, last), 40000, 0, 2)
    }

    fn cfg() -> DiscoveryConfig {
        DiscoveryConfig {
            interval: Duration::from_secs(1),
            max_beacons_per_sec: 10,
            max_sources: 4,
            max_links: 2,
            ..DiscoveryConfig::default()
        }
    }

    const S: Micros = 1_000_000;

    #[test]
    fn beacons_round_trip_and_garbage_is_refused() {
        let b = encode_beacon(&[7; 32], 9651);
        assert_eq!(decode_beacon(&b), Ok(([7; 32], 9651)));
        assert_eq!(decode_beacon(&b[..37]), Err(BeaconError::Length));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(decode_beacon(&bad), Err(BeaconError::Magic));
        assert_eq!(
            decode_beacon(&encode_beacon(&[7; 32], 0)),
            Err(BeaconError::Port)
        );
    }

    #[test]
    fn a_beacon_leads_to_one_dial_at_the_beacons_address_and_port() {
        let mut d = Discovery::new([1; 32], true, cfg());
        let dial = d
            .heard(S, from(9), true, &encode_beacon(&[9; 32], 7000), |_| false)
            .expect("the smaller key dials");
        assert_eq!(dial.key, [9; 32]);
        assert_eq!(
            dial.addr,
            SocketAddrV6::new(*from(9).ip(), 7000, 0, from(9).scope_id())
        );
        // In progress: later beacons from it lead to nothing until it ends.
        assert!(
            d.heard(2 * S, from(9), true, &encode_beacon(&[9; 32], 7000), |_| {
                false
            })
            .is_none()
        );
        d.ended(&[9; 32]);
        // A failed attempt is retried after 5 intervals, not at once.
        assert!(
            d.heard(3 * S, from(9), true, &encode_beacon(&[9; 32], 7000), |_| {
                false
            })
            .is_none()
        );
        assert!(
            d.heard(7 * S, from(9), true, &encode_beacon(&[9; 32], 7000), |_| {
                false
            })
            .is_some()
        );
        // Already linked (e.g. it dialed us, or a configured peer): nothing.
        let mut d = Discovery::new([1; 32], true, cfg());
        assert!(
            d.heard(S, from(9), true, &encode_beacon(&[9; 32], 7000), |_| true)
                .is_none()
        );
        // Our own beacon (another interface, or looped back): nothing.
        assert!(
            d.heard(S, from(8), true, &encode_beacon(&[1; 32], 7000), |_| false)
                .is_none()
        );
        assert_eq!(d.counters.discovery_dials, 0);
    }

    #[test]
    fn the_larger_key_leaves_the_dial_to_the_smaller_then_dials_itself() {
        let mut d = Discovery::new([5; 32], true, cfg());
        let b = encode_beacon(&[2; 32], 7000);
        for t in [1, 2, 3] {
            assert!(
                d.heard(t * S, from(2), true, &b, |_| false).is_none(),
                "{t}"
            );
        }
        assert!(d.heard(4 * S, from(2), true, &b, |_| false).is_some());
        // A node that does not listen cannot be dialed: it always dials.
        let mut d = Discovery::new([5; 32], false, cfg());
        assert!(d.heard(S, from(2), true, &b, |_| false).is_some());
    }

    #[test]
    fn only_link_local_sources_on_allowed_interfaces_count() {
        let mut d = Discovery::new([1; 32], true, cfg());
        let b = encode_beacon(&[9; 32], 7000);
        let global = SocketAddrV6::new("2001:db8::9".parse().unwrap(), 1, 0, 2);
        assert!(d.heard(S, global, true, &b, |_| false).is_none());
        assert!(d.heard(S, from(9), false, &b, |_| false).is_none());
        assert!(d.heard(S, from(9), true, b"hello", |_| false).is_none());
        assert_eq!(d.counters.beacons_malformed, 3);
    }

    #[test]
    fn beacons_are_rate_limited_per_source_and_in_total_and_sources_are_bounded() {
        let mut d = Discovery::new([1; 32], true, cfg());
        let b = encode_beacon(&[9; 32], 7000);
        // One source repeating itself: one beacon per half interval is taken.
        assert!(d.heard(S, from(9), true, &b, |_| true).is_none());
        for k in 1..5 {
            d.heard(S + k * 100_000, from(9), true, &b, |_| true);
        }
        assert_eq!(d.counters.beacons_rate_limited_source, 4);
        // A flood from many sources: the total bucket (10/s) and the source table (4) hold.
        let mut d = Discovery::new([1; 32], true, cfg());
        for k in 0..100u16 {
            let key = [k as u8 + 10; 32];
            d.heard(S, from(100 + k), true, &encode_beacon(&key, 7000), |_| {
                false
            });
        }
        let c = &d.counters;
        assert_eq!(c.beacons_received, 100);
        assert_eq!(c.beacons_rate_limited_total, 90);
        assert_eq!(c.beacon_sources_full, 6);
        assert_eq!(c.discovery_dials, 2, "max_links");
        assert_eq!(c.discovery_links_full, 2);
        assert!(d.sources.len() <= 4);
        // A second later the bucket has refilled, and sources unheard for 4 intervals go.
        let later = S + 5 * S;
        assert!(
            d.heard(
                later,
                from(900),
                true,
                &encode_beacon(&[200; 32], 7),
                |_| true
            )
            .is_none()
        );
        assert_eq!(d.counters.beacon_sources_full, 6);
        assert!(d.sources.contains_key(from(900).ip()));
    }
}
