//! `node.toml`: a standalone overlay node (`meshgate node --config node.toml`).
//!
//! ```toml
//! key = "/var/lib/meshgate/node.key"   # created (mode 0600) if absent
//! listen = "[::]:9651"                 # optional: accept links from peers
//! peers = ["203.0.113.7:9651", "peer.example.org:9651"]   # links to keep up (names are
//!                                      # resolved again before every connection attempt)
//! dead_peer_timeout_ms = 3000
//! mode = "userspace"                   # or "tun" (needs CAP_NET_ADMIN)
//! tun_name = "meshgate0"
//! status_listen = "127.0.0.1:9652"     # local status endpoint (plain HTTP, JSON)
//! expose = [{ port = 8080, to = "127.0.0.1:8080" }]   # userspace mode only
//! socket_buffer_kib = 256              # userspace mode only: per-stream TCP buffer
//!
//! [discovery]                          # LAN discovery by link-local multicast beacons
//! enabled = true                       # on by default
//! interfaces = ["eth0"]                # default: every multicast-capable interface
//! [limits]                             # overlay limits, see `overlay_limits`
//! max_links = 256
//! [consent]                            # which gateway reservations may serve this node
//! allow = [{ host = "shop.gw.example.org" }, { owner = "alice@gw.example.org", ports = [8080] }]
//! max_connections = 16                 # concurrent consent queries answered
//! ```

use crate::file::{self, ConfigError};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole `node.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeFileConfig {
    /// The node's key file; created with mode 0600 if absent. Default `meshgate-node.key`.
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// TCP address for incoming links; absent = outbound links only (behind NAT).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Peers to keep links to: `address:port` or `host:port` (see [`check_peer`]).
    #[serde(default)]
    pub peers: Vec<String>,
    /// A silent link is declared dead after this long (milliseconds, default 5000, ≥ 500).
    #[serde(default = "default_dead_peer_timeout_ms")]
    pub dead_peer_timeout_ms: u64,
    /// `userspace` (default; no privileges) or `tun`.
    #[serde(default)]
    pub mode: NodeMode,
    /// TUN interface name (tun mode), default `meshgate0`.
    #[serde(default = "default_tun_name")]
    pub tun_name: String,
    /// Local status endpoint, default `127.0.0.1:9652`.
    #[serde(default = "default_status_listen")]
    pub status_listen: SocketAddr,
    /// Overlay ports forwarded to local services (userspace mode).
    #[serde(default)]
    pub expose: Vec<Expose>,
    /// Receive and send buffer of each userspace-stack TCP socket, in KiB (userspace mode;
    /// absent = the stack's default, [`DEFAULT_SOCKET_BUFFER_KIB`]). It is the TCP window,
    /// so one stream carries at most `buffer / RTT`.
    #[serde(default)]
    pub socket_buffer_kib: Option<u64>,
    /// `[limits]`: the overlay's limits against hostile peers (see `overlay_limits`).
    #[serde(default)]
    pub limits: crate::overlay_limits::OverlayLimits,
    /// Which gateway reservations may use this node as a backend, answered to gateways on
    /// overlay port [`CONSENT_PORT`].
    #[serde(default)]
    pub consent: Consent,
    /// `[discovery]`: finding nodes on the same link (also the gateway's
    /// `[overlay.discovery]`).
    #[serde(default)]
    pub discovery: Discovery,
}

/// `[discovery]`: LAN peer discovery. Nodes on one link find each other by link-local IPv6
/// multicast beacons (group `ff02::6d67`, UDP `port`) and link up through the normal
/// authenticated handshake; a beacon is only ever a hint where to try one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// On by default.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Interfaces to send and hear beacons on; empty (default) = every interface that is up,
    /// multicast-capable, not loopback and has an IPv6 link-local address.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// UDP port of beacons (default 9650; the same on every node of the LAN).
    #[serde(default = "default_discovery_port")]
    pub port: u16,
    /// Beacon interval in milliseconds (default 2000, 100 to 600000).
    #[serde(default = "default_discovery_interval_ms")]
    pub interval_ms: u64,
    /// Beacons taken per second from all sources (default 100); more are dropped, counted.
    #[serde(default = "default_discovery_beacons_per_sec")]
    pub max_beacons_per_sec: u32,
    /// Beacon sources remembered at once (default 1024); new ones are dropped while full.
    #[serde(default = "default_discovery_sources")]
    pub max_sources: u32,
    /// Links to discovered nodes (and attempts) at once (default 16).
    #[serde(default = "default_discovery_links")]
    pub max_links: u32,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            enabled: true,
            interfaces: Vec::new(),
            port: default_discovery_port(),
            interval_ms: default_discovery_interval_ms(),
            max_beacons_per_sec: default_discovery_beacons_per_sec(),
            max_sources: default_discovery_sources(),
            max_links: default_discovery_links(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_discovery_port() -> u16 {
    9650
}
fn default_discovery_interval_ms() -> u64 {
    2000
}
fn default_discovery_beacons_per_sec() -> u32 {
    100
}
fn default_discovery_sources() -> u32 {
    1024
}
fn default_discovery_links() -> u32 {
    16
}

impl Discovery {
    /// The first wrong key, as `(key, message)`.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        if self.port == 0 {
            return Some(("port", "0 is not a port".into()));
        }
        if !(100..=600_000).contains(&self.interval_ms) {
            return Some((
                "interval_ms",
                format!("{}: expected 100 to 600000", self.interval_ms),
            ));
        }
        for (key, v) in [
            ("max_beacons_per_sec", self.max_beacons_per_sec),
            ("max_sources", self.max_sources),
            ("max_links", self.max_links),
        ] {
            if v == 0 {
                return Some((key, "must be at least 1".into()));
            }
        }
        if let Some(i) = self
            .interfaces
            .iter()
            .find(|i| i.is_empty() || i.len() > 15)
        {
            return Some((
                "interfaces",
                format!("{i:?}: an interface name has 1 to 15 characters"),
            ));
        }
        None
    }
}

/// The overlay port on which a node tells gateways which reservations it consents to serve.
/// Fixed, so a gateway knows where to ask; `expose` may not use it.
pub const CONSENT_PORT: u16 = 9653;

/// `[consent]`: the reservations this node's services may be published under. A gateway
/// serves an overlay backend of a reservation only while the backend's node lists it here.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// What the node consents to; empty = no reservation may use it.
    #[serde(default)]
    pub allow: Vec<ConsentGrant>,
    /// Consent queries answered at once (default 16, 1 to 1024); more wait for a slot.
    #[serde(default = "default_consent_connections")]
    pub max_connections: usize,
}

impl Default for Consent {
    fn default() -> Self {
        Consent {
            allow: Vec::new(),
            max_connections: default_consent_connections(),
        }
    }
}

fn default_consent_connections() -> usize {
    16
}

/// One consent: a reservation's host (`shop.gw.example.org`) or a deployer on a gateway
/// (`alice@gw.example.org`: every reservation of deployer `alice` on the gateway whose domain
/// is `gw.example.org`), optionally only for some overlay ports.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentGrant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Overlay ports the consent covers; empty = every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

impl ConsentGrant {
    /// Checks the grant: exactly one of `host` (a lowercase host name) and `owner`
    /// (`deployer@gateway-domain`), and no port 0. Returns the reason when wrong.
    pub fn check(&self) -> Result<(), String> {
        match (&self.host, &self.owner) {
            (Some(h), None) => {
                let name = crate::host::HostName::parse(h).map_err(|e| format!("host: {e}"))?;
                if name.as_str() != h {
                    return Err(format!("host: write `{h}` as `{name}`"));
                }
            }
            (None, Some(o)) => {
                let Some((id, domain)) = o.split_once('@') else {
                    return Err(format!(
                        "owner: `{o}` is not `deployer@gateway-domain` (e.g. `alice@gw.example.org`)"
                    ));
                };
                let id_ok = !id.is_empty()
                    && id.len() <= 64
                    && id.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                    });
                if !id_ok {
                    return Err(format!(
                        "owner: deployer id `{id}` is not 1-64 chars of a-z, 0-9, `-`, `_`, `.`"
                    ));
                }
                let name =
                    crate::host::HostName::parse(domain).map_err(|e| format!("owner: {e}"))?;
                if name.as_str() != domain {
                    return Err(format!("owner: write the domain `{domain}` as `{name}`"));
                }
            }
            _ => return Err("give exactly one of `host` and `owner`".into()),
        }
        if self.ports.contains(&0) {
            return Err("ports: port 0 is not a service port".into());
        }
        Ok(())
    }
}

/// The userspace stack's per-socket buffer when `socket_buffer_kib` is absent (matches
/// `meshgate_sockets::StackConfig::default()`).
pub const DEFAULT_SOCKET_BUFFER_KIB: u64 = 256;
/// Accepted `socket_buffer_kib` values. The lower bound holds two segments at the largest
/// overlay MTU (32 KiB), below which a stream cannot keep a segment in flight while the
/// previous one is acknowledged; the upper bound (64 MiB: 5 Gbit/s at 100 ms RTT) keeps a
/// typo from committing gigabytes per stream (up to 2 × buffer each) and stays far below
/// the 1 GiB window TCP window scaling allows.
pub const SOCKET_BUFFER_KIB_RANGE: std::ops::RangeInclusive<u64> = 64..=65536;

/// How the node's L3 port is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeMode {
    /// Embedded userspace TCP/IP stack; overlay ports reach local services through `expose`.
    #[default]
    Userspace,
    /// A TUN interface: kernel sockets use the overlay directly.
    Tun,
}

/// One exposed overlay port: `{ port = 8080, to = "127.0.0.1:8080" }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Expose {
    /// Port on the node's overlay address.
    pub port: u16,
    /// Local service the streams are forwarded to.
    pub to: SocketAddr,
}

/// Checks a peer given as `address:port` (`[v6]:port` for IPv6) or `host:port`. A host name
/// is not resolved here: the node resolves it before every connection attempt, so a peer
/// that moves is found again. Returns what is wrong.
pub fn check_peer(peer: &str) -> Result<(), String> {
    if peer.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = peer.rsplit_once(':') else {
        return Err(format!(
            "`{peer}` has no port: write `host:port` or `address:port` (e.g. `peer.example.org:9651`)"
        ));
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(format!("`{peer}`: `{port}` is not a port (1 to 65535)")),
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "`{peer}` is not a valid address: write an IPv6 address as `[2001:db8::1]:9651`"
        ));
    }
    crate::host::HostName::parse(host).map_err(|e| format!("`{peer}`: host {e}"))?;
    Ok(())
}

fn default_key() -> PathBuf {
    PathBuf::from("meshgate-node.key")
}
fn default_dead_peer_timeout_ms() -> u64 {
    // 3 s: detection plus reconvergence stays within the overlay's 5 s rerouting bound.
    3000
}
fn default_tun_name() -> String {
    "meshgate0".to_string()
}
fn default_status_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9652))
}

impl NodeFileConfig {
    /// Loads and validates `node.toml`.
    pub fn load(path: &Path) -> Result<NodeFileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, format!("cannot read file: {e}")))?;
        Self::parse(path, &text)
    }

    /// Parses and validates `node.toml` text (named `path` in errors).
    pub fn parse(path: &Path, text: &str) -> Result<NodeFileConfig, ConfigError> {
        let cfg: NodeFileConfig = file::parse(path, text)?;
        cfg.validate(path, text)?;
        Ok(cfg)
    }

    pub fn dead_peer_timeout(&self) -> Duration {
        Duration::from_millis(self.dead_peer_timeout_ms)
    }

    /// Per-socket buffer of the userspace stack, in bytes.
    pub fn socket_buffer(&self) -> usize {
        let kib = self.socket_buffer_kib.unwrap_or(DEFAULT_SOCKET_BUFFER_KIB);
        // Validated to at most 64 MiB, so this fits even a 32-bit usize.
        usize::try_from(kib.saturating_mul(1024)).unwrap_or(usize::MAX)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| ConfigError::at_field(path, text, field, msg);
        if self.dead_peer_timeout_ms < 500 {
            return Err(err(
                "dead_peer_timeout_ms",
                format!(
                    "{} ms is too short: links probe every timeout/5, use at least 500",
                    self.dead_peer_timeout_ms
                ),
            ));
        }
        if self.mode == NodeMode::Tun {
            if !self.expose.is_empty() {
                return Err(err(
                    "expose",
                    "only in mode = \"userspace\": in tun mode local services listen on the \
                     overlay address directly"
                        .into(),
                ));
            }
            if self.socket_buffer_kib.is_some() {
                return Err(err(
                    "socket_buffer_kib",
                    "only in mode = \"userspace\": in tun mode the kernel sizes TCP buffers \
                     (net.ipv4.tcp_rmem / tcp_wmem)"
                        .into(),
                ));
            }
            if self.tun_name.is_empty() || self.tun_name.len() > 15 {
                return Err(err(
                    "tun_name",
                    format!(
                        "{:?}: an interface name has 1 to 15 characters",
                        self.tun_name
                    ),
                ));
            }
        }
        if !self.status_listen.ip().is_loopback() {
            return Err(err(
                "status_listen",
                format!(
                    "{}: the status endpoint is unauthenticated, bind it to loopback",
                    self.status_listen
                ),
            ));
        }
        if let Some(kib) = self.socket_buffer_kib
            && !SOCKET_BUFFER_KIB_RANGE.contains(&kib)
        {
            return Err(err(
                "socket_buffer_kib",
                format!(
                    "{kib} KiB is out of range: use {} to {} (the buffer is the TCP window, \
                     so one stream carries at most buffer / RTT)",
                    SOCKET_BUFFER_KIB_RANGE.start(),
                    SOCKET_BUFFER_KIB_RANGE.end()
                ),
            ));
        }
        if let Some((key, msg)) = self.limits.invalid() {
            return Err(err(&format!("limits.{key}"), msg));
        }
        if let Some((key, msg)) = self.discovery.invalid() {
            return Err(err(&format!("discovery.{key}"), msg));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if let Err(reason) = check_peer(p) {
                return Err(err(&format!("peers.{i}"), reason));
            }
        }
        if !(1..=1024).contains(&self.consent.max_connections) {
            return Err(err(
                "consent.max_connections",
                format!("{}: expected 1 to 1024", self.consent.max_connections),
            ));
        }
        for (i, g) in self.consent.allow.iter().enumerate() {
            if let Err(reason) = g.check() {
                return Err(err(&format!("consent.allow.{i}"), reason));
            }
        }
        let mut seen = HashSet::new();
        for (i, e) in self.expose.iter().enumerate() {
            if e.port == CONSENT_PORT {
                return Err(err(
                    &format!("expose.{i}.port"),
                    format!("overlay port {CONSENT_PORT} answers gateways' consent queries"),
                ));
            }
            if e.port == 0 {
                return Err(err(
                    &format!("expose.{i}.port"),
                    "port 0 is not valid".into(),
                ));
            }
            if !seen.insert(e.port) {
                return Err(err(
                    &format!("expose.{i}.port"),
                    format!("overlay port {} is exposed twice", e.port),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeFileConfig, ConfigError> {
        NodeFileConfig::parse(Path::new("node.toml"), text)
    }

    #[test]
    fn defaults_and_full_file() {
        let c = parse("").unwrap();
        assert_eq!(c.mode, NodeMode::Userspace);
        assert_eq!(c.status_listen, "127.0.0.1:9652".parse().unwrap());
        assert_eq!(c.dead_peer_timeout(), Duration::from_secs(3));
        assert_eq!(c.socket_buffer_kib, None);
        assert_eq!(c.socket_buffer(), 256 * 1024);
        let c = parse(
            "key = \"k\"\nlisten = \"127.0.0.1:9651\"\npeers = [\"127.0.0.1:1\"]\n\
             mode = \"userspace\"\nexpose = [{ port = 8080, to = \"127.0.0.1:8080\" }]\n",
        )
        .unwrap();
        assert_eq!(c.expose[0].port, 8080);
        assert_eq!(c.peers.len(), 1);
    }

    /// Issue 15, item 7: `peers = ["localhost:9651"]` was refused ("invalid socket address
    /// syntax") while the gateway's `[overlay]` took host names.
    #[test]
    fn peers_may_be_host_names() {
        let c = parse(
            "peers = [\"localhost:9651\", \"Peer-1.example.org:1\", \"[::1]:9651\", \"192.0.2.1:9\"]\n",
        )
        .unwrap();
        assert_eq!(c.peers.len(), 4);
        for (bad, why) in [
            ("localhost", "no port"),
            ("localhost:0", "not a port"),
            ("localhost:http", "not a port"),
            ("::1:9651", "[2001:db8::1]:9651"),
            ("bad_name:9651", "host"),
            (":9651", "host"),
        ] {
            let e = parse(&format!("key = \"k\"\npeers = [\"{bad}\"]\n")).unwrap_err();
            assert_eq!(e.line, Some(2), "{bad}: {e}");
            assert!(e.to_string().contains("peers.0"), "{bad}: {e}");
            assert!(e.message.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn discovery_is_on_by_default_and_checked() {
        let c = parse("").unwrap();
        assert!(c.discovery.enabled);
        assert_eq!((c.discovery.port, c.discovery.interval_ms), (9650, 2000));
        let c = parse("[discovery]\nenabled = false\ninterfaces = [\"eth1\"]\n").unwrap();
        assert!(!c.discovery.enabled);
        assert_eq!(c.discovery.interfaces, ["eth1"]);
        for (bad, key) in [
            ("interval_ms = 5", "discovery.interval_ms"),
            ("port = 0", "discovery.port"),
            ("max_links = 0", "discovery.max_links"),
            ("interfaces = [\"\"]", "discovery.interfaces"),
        ] {
            let e = parse(&format!("[discovery]\n{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn consent_grants_are_checked() {
        let c = parse(
            "[consent]\nallow = [{ host = \"a.gw.example\" }, \
             { owner = \"alice@gw.example\", ports = [8080] }]\n",
        )
        .unwrap();
        assert_eq!(c.consent.allow.len(), 2);
        assert_eq!(c.consent.max_connections, 16);
        for bad in [
            "{ host = \"A.gw.example\" }",
            "{ owner = \"alice\" }",
            "{ owner = \"Al ice@gw.example\" }",
            "{ host = \"a.gw.example\", owner = \"a@gw.example\" }",
            "{ ports = [80] }",
            "{ host = \"a.gw.example\", ports = [0] }",
        ] {
            let e = parse(&format!("[consent]\nallow = [{bad}]\n")).unwrap_err();
            assert!(e.to_string().contains("consent.allow.0"), "{bad}: {e}");
        }
        let e = parse("expose = [{ port = 9653, to = \"127.0.0.1:1\" }]\n").unwrap_err();
        assert!(e.message.contains("consent"), "{e}");
    }

    #[test]
    fn socket_buffer_kib_is_parsed_and_range_checked() {
        let c = parse("socket_buffer_kib = 1024\n").unwrap();
        assert_eq!(c.socket_buffer_kib, Some(1024));
        assert_eq!(c.socket_buffer(), 1024 * 1024);
        // Both ends of the range are accepted.
        assert_eq!(
            parse("socket_buffer_kib = 64\n").unwrap().socket_buffer(),
            64 * 1024
        );
        assert_eq!(
            parse("socket_buffer_kib = 65536\n")
                .unwrap()
                .socket_buffer(),
            64 << 20
        );
        // Out of range: the error names the file, the key's line and the accepted range.
        for bad in [0, 63, 65537, u64::MAX / 1024 + 1] {
            let e = parse(&format!("key = \"k\"\nsocket_buffer_kib = {bad}\n")).unwrap_err();
            assert_eq!(e.line, Some(2), "{e}");
            assert!(
                e.to_string()
                    .starts_with("node.toml:2:1: socket_buffer_kib"),
                "{e}"
            );
            assert!(e.message.contains("64 to 65536"), "{e}");
        }
        // Not a number / negative: refused by the parser, located too.
        for bad in ["\"big\"", "-1", "1.5"] {
            let e = parse(&format!("key = \"k\"\nsocket_buffer_kib = {bad}\n")).unwrap_err();
            assert_eq!(e.line, Some(2), "{bad}: {e}");
        }
        // In tun mode the kernel owns the buffers: setting it is a mistake, said so.
        let e = parse("mode = \"tun\"\nsocket_buffer_kib = 512\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("userspace"), "{e}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse("mode = \"tunnel\"\n").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        assert!(
            e.message.contains("tunnel") || e.message.contains("variant"),
            "{e}"
        );

        let e = parse("peers = [\"nowhere\"]\n").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        assert!(
            e.to_string().contains("peers.0") && e.message.contains("no port"),
            "{e}"
        );

        let e = parse("key = \"k\"\ndead_peer_timeout_ms = 10\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("dead_peer_timeout_ms"), "{e}");

        let e = parse("status_listen = \"0.0.0.0:9652\"\n").unwrap_err();
        assert!(
            e.to_string().starts_with("node.toml:1:1: status_listen"),
            "{e}"
        );

        let e = parse(
            "expose = [\n  { port = 80, to = \"127.0.0.1:1\" },\n  { port = 80, to = \"127.0.0.1:2\" },\n]\n",
        )
        .unwrap_err();
        assert!(e.message.contains("exposed twice"), "{e}");

        let e =
            parse("mode = \"tun\"\nexpose = [{ port = 1, to = \"127.0.0.1:1\" }]\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }
}
