//! `gateway.toml`: the public gateway's configuration. Every field has a documented default
//! (see `docs/configuration.md`); errors name the file, line, field and what is expected.

use crate::file::{self, ConfigError};
use crate::host::{HostName, HostPattern};
use crate::pool::PoolConfig;
use crate::route::{Backend, Mode, Route, RouteOptions};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole `gateway.toml`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// The farmer's domain(s): `<name>.<domain>` reservations live under these.
    pub domains: Vec<HostName>,
    /// Where state (certificates, stores) lives.
    pub data_dir: PathBuf,
    pub listen: Listeners,
    /// The operator's listener: `/metrics`, `/status`, `POST /reload`.
    pub admin: Admin,
    /// The deployers' listener: the reservations API (`/v1/…`).
    pub api: ApiListener,
    /// The embedded overlay node; absent means no overlay backends.
    pub overlay: Option<Overlay>,
    pub tls: Tls,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// `[upstream]`: the idle keep-alive connections kept to backends.
    pub upstream: crate::upstream::Upstream,
    pub security: Security,
    /// `[log]`: the access log's format.
    pub log: crate::log::Log,
    /// Custom-domain verification for reservations.
    pub reservations: Reservations,
    /// Static routes, `[[route]]` tables.
    pub routes: Vec<Route>,
    /// `[fleet]`: shared state on etcd; absent means a gateway on its own.
    pub fleet: Option<crate::fleet::Fleet>,
}

/// `gateway.toml` as written. Hosts are still text here so that validation can name the
/// field of a bad one (a serde error has a position but no field path) before they become
/// [`HostName`]s and [`HostPattern`]s.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default)]
    listen: Listeners,
    #[serde(default)]
    admin: Admin,
    #[serde(default)]
    api: ApiListener,
    #[serde(default)]
    overlay: Option<Overlay>,
    #[serde(default)]
    tls: Tls,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    upstream: crate::upstream::Upstream,
    #[serde(default)]
    security: Security,
    #[serde(default)]
    log: crate::log::Log,
    #[serde(default)]
    reservations: Reservations,
    #[serde(default, rename = "route")]
    routes: Vec<RouteFile>,
    #[serde(default)]
    fleet: Option<crate::fleet::Fleet>,
}

/// A `[[route]]` table as written: [`Route`] with its host still text.
#[derive(Deserialize)]
struct RouteFile {
    host: String,
    backends: Vec<Backend>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    options: RouteOptions,
    #[serde(default)]
    pool: PoolConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/meshgate")
}

/// Public listeners. `[::]` binds dual-stack (IPv4 and IPv6).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// TLS listeners (terminate and passthrough), default `["[::]:443"]`.
    #[serde(default = "default_https")]
    pub https: Vec<SocketAddr>,
    /// Plain HTTP listeners (ACME HTTP-01, redirects), default `["[::]:80"]`.
    #[serde(default = "default_http")]
    pub http: Vec<SocketAddr>,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            https: default_https(),
            http: default_http(),
        }
    }
}

fn default_https() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0u16; 8], 443))]
}
fn default_http() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0u16; 8], 80))]
}

/// The operator's listener: `/metrics`, `/status`, `POST /reload` (admin token). Keep it on
/// loopback or a management network; deployers use [`ApiListener`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Default `127.0.0.1:9090` (loopback only).
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
    /// File holding the farmer's admin token (mode 0600): `POST /reload` and the reservations
    /// API's farmer calls need it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve the operator's listener over TLS; absent = plain HTTP.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Connections open at once on this listener; more wait in the accept queue.
    #[serde(default = "d64")]
    pub max_connections: usize,
    /// Connections open at once from one client address (IPv6: one /64); more are closed.
    #[serde(default = "d16")]
    pub max_connections_per_ip: usize,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin(),
            token_file: None,
            tls: None,
            max_connections: d64(),
            max_connections_per_ip: d16(),
        }
    }
}

/// The deployers' listener (`[api]`): the reservations API, bound when `domains` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiListener {
    /// Default `127.0.0.1:9091` (loopback only); deployers elsewhere need e.g. `[::]:9091`
    /// with `tls`, since their tokens travel in every request.
    #[serde(default = "default_api")]
    pub listen: SocketAddr,
    /// Serve the API over TLS; absent = plain HTTP.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Connections open at once on this listener; more wait in the accept queue.
    #[serde(default = "d256")]
    pub max_connections: usize,
    /// Connections open at once from one client address (IPv6: one /64); more are closed.
    #[serde(default = "d16")]
    pub max_connections_per_ip: usize,
}

impl Default for ApiListener {
    fn default() -> Self {
        ApiListener {
            listen: default_api(),
            tls: None,
            max_connections: d256(),
            max_connections_per_ip: d16(),
        }
    }
}

fn default_api() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9091))
}

fn d16() -> usize {
    16
}
fn d64() -> usize {
    64
}
fn d256() -> usize {
    256
}

/// TLS for the operator's or the deployers' listener (`[admin] tls`, `[api] tls`):
/// `{ cert = "chain.pem", key = "key.pem" }` or `{ dev_ca = true }`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain (leaf first).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key (mode 0600).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Issue the listener's certificate from `[tls.dev_ca]` instead of files.
    #[serde(default)]
    pub dev_ca: bool,
    /// Names (DNS names or IP addresses) the dev-CA certificate covers; default: the
    /// listener's address (or `127.0.0.1` and `::1` when it is unspecified) and `localhost`.
    #[serde(default)]
    pub names: Vec<String>,
}

/// Custom-domain verification (`[reservations]`): how the gateway checks that a domain points
/// here and carries its owner's TXT token, and how often.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reservations {
    /// Name servers to ask (`ip:port`); empty = those in `/etc/resolv.conf`.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// The gateway's public addresses: a domain resolving only to these counts as pointed.
    /// Empty = the non-wildcard, non-loopback `listen.https` addresses.
    #[serde(default)]
    pub public_addresses: Vec<IpAddr>,
    /// Re-validation period of every domain, in seconds.
    #[serde(default = "d300")]
    pub interval_secs: u64,
    /// How long a domain may fail re-validation before it is deactivated, in seconds.
    #[serde(default = "d3600")]
    pub grace_secs: u64,
    /// Activate terminate-mode domains only once their certificate is issued.
    #[serde(default)]
    pub require_certificate: bool,
    /// Per-DNS-query timeout, in milliseconds.
    #[serde(default = "d5000")]
    pub query_timeout_ms: u64,
    /// A custom-domain claim still unproven this long after it was made is deleted, in
    /// seconds (default 259200, 3 days); a claim dropped because another deployer proved the
    /// domain first is kept this long so its owner can read why.
    #[serde(default = "d259200")]
    pub pending_expiry_secs: u64,
    /// Most reservations (names and domain claims) one deployer may hold (default 100).
    #[serde(default = "d100_owner")]
    pub max_per_owner: usize,
    /// How often every overlay backend's node is asked again whether it consents, in seconds
    /// (default 30).
    #[serde(default = "d30")]
    pub consent_interval_secs: u64,
    /// How long a backend whose node cannot be asked keeps its last-known consent, in seconds
    /// (default 120). A node that answers without the consent is withdrawn at once.
    #[serde(default = "d120")]
    pub consent_grace_secs: u64,
    /// Time for one consent query over the overlay (connect, ask, answer), in milliseconds
    /// (default 5000).
    #[serde(default = "d5000")]
    pub consent_timeout_ms: u64,
}

fn d259200() -> u64 {
    259_200
}
fn d100_owner() -> usize {
    100
}
fn d120() -> u64 {
    120
}

fn d300() -> u64 {
    300
}
fn d3600() -> u64 {
    3600
}

impl Default for Reservations {
    fn default() -> Self {
        Reservations {
            nameservers: Vec::new(),
            public_addresses: Vec::new(),
            interval_secs: d300(),
            grace_secs: d3600(),
            require_certificate: false,
            query_timeout_ms: d5000(),
            pending_expiry_secs: d259200(),
            max_per_owner: d100_owner(),
            consent_interval_secs: d30(),
            consent_grace_secs: d120(),
            consent_timeout_ms: d5000(),
        }
    }
}

impl Reservations {
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_secs)
    }
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }
    pub fn pending_expiry(&self) -> Duration {
        Duration::from_secs(self.pending_expiry_secs)
    }
    pub fn consent_interval(&self) -> Duration {
        Duration::from_secs(self.consent_interval_secs)
    }
    pub fn consent_grace(&self) -> Duration {
        Duration::from_secs(self.consent_grace_secs)
    }
    pub fn consent_timeout(&self) -> Duration {
        Duration::from_millis(self.consent_timeout_ms)
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// The embedded overlay node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// Node key file (created by `meshgate keygen`, mode 0600).
    pub key_file: PathBuf,
    /// Link listener for other overlay nodes; absent = outbound links only.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Peers to connect to, `host:port` or `address:port` (names are resolved again before
    /// every connection attempt).
    #[serde(default)]
    pub peers: Vec<String>,
    /// `[overlay.limits]`: limits against hostile peers (see `overlay_limits`).
    #[serde(default)]
    pub limits: crate::overlay_limits::OverlayLimits,
    /// `[overlay.discovery]`: LAN peer discovery, as `[discovery]` in `node.toml`.
    #[serde(default)]
    pub discovery: crate::node::Discovery,
}

/// Where certificates come from. Several sources may be combined; files win over the dev CA.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate/key PEM file pairs; names are taken from the certificates.
    #[serde(default)]
    pub certificates: Vec<CertFiles>,
    /// ACME issuance.
    #[serde(default)]
    pub acme: Option<Acme>,
    /// A local development CA that issues certificates for every route host and domain.
    #[serde(default)]
    pub dev_ca: Option<DevCa>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// `letsencrypt`, `letsencrypt-staging`, or a directory URL.
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Account contact, e.g. `mailto:ops@example.org`.
    pub contact: String,
    /// `http-01` or `tls-alpn-01` for custom domains (the other is the fallback).
    #[serde(default = "default_challenge")]
    pub challenge: String,
    /// CA roots file to trust for the ACME directory (tests against Pebble).
    #[serde(default)]
    pub directory_ca: Option<PathBuf>,
    /// Where the DNS-01 responder for `_acme-challenge.<domain>` listens (UDP+TCP);
    /// default `0.0.0.0:53`.
    #[serde(default)]
    pub dns_listen: Option<SocketAddr>,
    /// `false`: no built-in DNS-01 responder (the zone is served elsewhere). Default `true`.
    #[serde(default = "default_true")]
    pub dns_responder: bool,
    /// SOA/NS name of the `_acme-challenge.<domain>` zone; default: the farmer domain.
    #[serde(default)]
    pub ns_host: Option<String>,
    /// How long one ACME order may take, in seconds; default 90.
    #[serde(default)]
    pub order_timeout_secs: Option<f64>,
    /// With `[fleet]`: TTL of an order lock's etcd lease, seconds (a dead or paused holder
    /// loses the lock after it); default 15.
    #[serde(default)]
    pub lock_ttl_secs: Option<u64>,
    /// With `[fleet]`: the farmer zone's NS names (first = SOA primary); default
    /// `[ns_host or the farmer domain]`.
    #[serde(default)]
    pub zone_name_servers: Vec<String>,
    /// With `[fleet]`: CAs in the farmer zone's CAA records; default `["letsencrypt.org"]`.
    #[serde(default)]
    pub zone_caa: Option<Vec<String>>,
    /// With `[fleet]`: TTL of the farmer zone's A/AAAA answers, seconds; default 30.
    #[serde(default)]
    pub zone_ttl_secs: Option<u32>,
    /// With `[fleet]`: the members' port probed before they are answered; default 443.
    #[serde(default)]
    pub probe_port: Option<u16>,
    /// With `[fleet]`: time between two health probes of a member, ms; default 5000.
    #[serde(default)]
    pub probe_interval_ms: Option<u64>,
}

fn default_true() -> bool {
    true
}

fn default_acme_directory() -> String {
    "letsencrypt".into()
}
fn default_challenge() -> String {
    "http-01".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevCa {
    /// Directory for the CA certificate (`ca.pem`) and key; created when missing.
    pub dir: PathBuf,
}

/// Timeouts, in milliseconds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Time for a client to send its whole ClientHello and finish the TLS handshake.
    #[serde(default = "d10000")]
    pub handshake_ms: u64,
    /// Time for a client to send a complete request head.
    #[serde(default = "d10000")]
    pub header_ms: u64,
    /// A connection with no bytes moving either way for this long is closed.
    #[serde(default = "d120000")]
    pub idle_ms: u64,
    /// Time from a request to the backend's response head (504 after).
    #[serde(default = "d60000")]
    pub request_ms: u64,
    /// Budget for reaching a backend: queue wait and every connect attempt across backends
    /// (503 when none answers in time). The default of each route's `pool.connect_timeout_ms`.
    #[serde(default = "d5000")]
    pub connect_ms: u64,
    /// On SIGTERM: how long in-flight requests may take to finish after the listeners close
    /// (0 = close at once); tunnels and passthrough streams are closed after it.
    #[serde(default = "d10000")]
    pub drain_ms: u64,
}

fn d5000() -> u64 {
    5000
}
fn d10000() -> u64 {
    10000
}
fn d60000() -> u64 {
    60000
}
fn d120000() -> u64 {
    120000
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake_ms: d10000(),
            header_ms: d10000(),
            idle_ms: d120000(),
            request_ms: d60000(),
            connect_ms: d5000(),
            drain_ms: d10000(),
        }
    }
}

impl Timeouts {
    pub fn handshake(&self) -> Duration {
        Duration::from_millis(self.handshake_ms)
    }
    pub fn header(&self) -> Duration {
        Duration::from_millis(self.header_ms)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
    pub fn request(&self) -> Duration {
        Duration::from_millis(self.request_ms)
    }
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }
}

/// Size and count limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    #[serde(default = "d65536")]
    pub max_header_bytes: usize,
    /// Most request headers; more gets 431.
    #[serde(default = "d100")]
    pub max_headers: usize,
    /// Largest ClientHello accepted before the connection is closed.
    #[serde(default = "d16384")]
    pub max_client_hello_bytes: usize,
    /// Concurrent client connections on the HTTPS listeners; more wait in the accept queue.
    #[serde(default = "d20000")]
    pub max_connections: usize,
    /// Concurrent client connections on the plain HTTP listeners (their own slots, so :80
    /// cannot starve :443); more wait in the accept queue.
    #[serde(default = "d4096")]
    pub max_http_connections: usize,
    /// Concurrent connections from one client address (IPv6: one /64) over the HTTPS and
    /// HTTP listeners together; more are closed at once.
    #[serde(default = "d256")]
    pub max_connections_per_ip: usize,
}

fn d4096() -> usize {
    4096
}

fn d100() -> usize {
    100
}
fn d16384() -> usize {
    16384
}
fn d20000() -> usize {
    20000
}
fn d65536() -> usize {
    65536
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: d65536(),
            max_headers: d100(),
            max_client_hello_bytes: d16384(),
            max_connections: d20000(),
            max_http_connections: d4096(),
            max_connections_per_ip: d256(),
        }
    }
}

/// Backend safety switches.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// Allow direct backends in loopback, private, link-local or the gateway's own addresses
    /// (SSRF guard off). Default `false`.
    #[serde(default)]
    pub allow_private_backends: bool,
    /// NAT64 prefixes of the gateway's network (RFC 6052), checked by the SSRF guard like the
    /// well-known `64:ff9b::/96` and `64:ff9b:1::/48` (always checked). Default `[]`.
    #[serde(default)]
    pub nat64_prefixes: Vec<crate::nat64::Nat64Prefix>,
    /// How often the gateway re-reads its own addresses (interfaces) for the SSRF guard, in
    /// seconds; they are also re-read on every reload. Default 30.
    #[serde(default = "d30")]
    pub own_addresses_refresh_secs: u64,
}

fn d30() -> u64 {
    30
}

impl Default for Security {
    fn default() -> Self {
        Security {
            allow_private_backends: false,
            nat64_prefixes: Vec::new(),
            own_addresses_refresh_secs: d30(),
        }
    }
}

impl Security {
    pub fn own_addresses_refresh(&self) -> Duration {
        Duration::from_secs(self.own_addresses_refresh_secs)
    }
}

impl GatewayConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, format!("cannot read file: {e}")))?;
        Self::parse(path, &text)
    }

    /// Parses and validates TOML text named `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let written: GatewayFile = file::parse(path, text)?;
        written.validate(path, text)
    }
}

/// `text`, if it is a host name written in canonical form (lowercase, no trailing dot).
fn canonical_host(text: &str) -> Option<HostName> {
    HostName::parse(text).ok().filter(|h| h.as_str() == text)
}

/// `text`, if it is a route host written in canonical form.
fn canonical_pattern(text: &str) -> Option<HostPattern> {
    HostPattern::parse(text).ok().filter(|h| h.as_str() == text)
}

impl GatewayFile {
    fn validate(self, path: &Path, text: &str) -> Result<GatewayConfig, ConfigError> {
        let err = |field: &str, msg: String| ConfigError::at_field(path, text, field, msg);
        let mut domains = Vec::with_capacity(self.domains.len());
        for (i, d) in self.domains.iter().enumerate() {
            let Some(domain) = canonical_host(d) else {
                return Err(err(
                    &format!("domains.{i}"),
                    format!("`{d}` is not a lowercase DNS name like `gw.example.org`"),
                ));
            };
            domains.push(domain);
        }
        if self.listen.https.is_empty() && self.listen.http.is_empty() {
            return Err(err(
                "listen.https",
                "at least one https or http listener is expected".into(),
            ));
        }
        let t = &self.timeouts;
        for (name, v) in [
            ("handshake_ms", t.handshake_ms),
            ("header_ms", t.header_ms),
            ("idle_ms", t.idle_ms),
            ("request_ms", t.request_ms),
            ("connect_ms", t.connect_ms),
        ] {
            if v == 0 {
                return Err(err(
                    &format!("timeouts.{name}"),
                    "expected a positive number of milliseconds".into(),
                ));
            }
        }
        if self.limits.max_header_bytes < 8192 {
            return Err(err(
                "limits.max_header_bytes",
                "expected at least 8192 bytes".into(),
            ));
        }
        if self.limits.max_client_hello_bytes < 512 {
            return Err(err(
                "limits.max_client_hello_bytes",
                "expected at least 512 bytes".into(),
            ));
        }
        if let Some(acme) = &self.tls.acme
            && !matches!(acme.challenge.as_str(), "http-01" | "tls-alpn-01")
        {
            return Err(err(
                "tls.acme.challenge",
                format!(
                    "expected `http-01` or `tls-alpn-01`, got `{}`",
                    acme.challenge
                ),
            ));
        }
        if self.security.own_addresses_refresh_secs == 0 {
            return Err(err(
                "security.own_addresses_refresh_secs",
                "expected a positive number of seconds".into(),
            ));
        }
        self.validate_listener_tls("admin", self.admin.tls.as_ref(), &err)?;
        self.validate_listener_tls("api", self.api.tls.as_ref(), &err)?;
        self.validate_connection_limits(&err)?;
        self.validate_reservations(&err)?;
        let mut routes: Vec<Route> = Vec::with_capacity(self.routes.len());
        let mut seen = HashSet::new();
        for (i, r) in self.routes.into_iter().enumerate() {
            let Some(host) = canonical_pattern(&r.host) else {
                return Err(err(
                    &format!("route.{i}.host"),
                    format!(
                        "`{}` is not a lowercase DNS name or `*.suffix` wildcard",
                        r.host
                    ),
                ));
            };
            if !seen.insert(host.clone()) {
                return Err(err(
                    &format!("route.{i}.host"),
                    format!("`{}` is routed twice", r.host),
                ));
            }
            if r.backends.is_empty() {
                return Err(err(
                    &format!("route.{i}.backends"),
                    "expected at least one backend `{ addr = \"ip:port\" }`".into(),
                ));
            }
            if r.mode == Mode::Passthrough && r.options.allow_plain_http {
                return Err(err(
                    &format!("route.{i}.allow_plain_http"),
                    "a passthrough route has no plain HTTP side; remove this option".into(),
                ));
            }
            if let Some(u) = r.options.upgrades.iter().find(|u| {
                u.eq_ignore_ascii_case("h2c")
                    || u.is_empty()
                    || !u
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            }) {
                return Err(err(
                    &format!("route.{i}.options.upgrades"),
                    format!(
                        "`{u}` cannot be tunnelled; expected protocol names like `websocket` (never `h2c`)"
                    ),
                ));
            }
            if let Some((key, msg)) = r.options.hsts.as_ref().and_then(|h| h.invalid()) {
                return Err(err(&format!("route.{i}.options.hsts.{key}"), msg));
            }
            if let Err((field, msg)) = r.pool.validate() {
                return Err(err(&format!("route.{i}.{field}"), msg));
            }
            routes.push(Route {
                host,
                backends: r.backends,
                mode: r.mode,
                options: r.options,
                pool: r.pool,
            });
        }
        if let Some((key, msg)) = self.overlay.as_ref().and_then(|o| o.limits.invalid()) {
            return Err(err(&format!("overlay.limits.{key}"), msg));
        }
        if let Some((key, msg)) = self.overlay.as_ref().and_then(|o| o.discovery.invalid()) {
            return Err(err(&format!("overlay.discovery.{key}"), msg));
        }
        for (i, p) in self.overlay.iter().flat_map(|o| o.peers.iter()).enumerate() {
            if let Err(reason) = crate::node::check_peer(p) {
                return Err(err(&format!("overlay.peers.{i}"), reason));
            }
        }
        if let Some((key, msg)) = self.upstream.invalid() {
            return Err(err(&format!("upstream.{key}"), msg));
        }
        if let Some(Err((key, msg))) = self.fleet.as_ref().map(|f| f.validate()) {
            return Err(err(&format!("fleet.{key}"), msg));
        }
        Ok(GatewayConfig {
            domains,
            data_dir: self.data_dir,
            listen: self.listen,
            admin: self.admin,
            api: self.api,
            overlay: self.overlay,
            tls: self.tls,
            timeouts: self.timeouts,
            limits: self.limits,
            upstream: self.upstream,
            security: self.security,
            log: self.log,
            reservations: self.reservations,
            routes,
            fleet: self.fleet,
        })
    }

    /// `[admin] tls` or `[api] tls` (`table` names which).
    fn validate_listener_tls(
        &self,
        table: &str,
        tls: Option<&ListenerTls>,
        err: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let Some(t) = tls else {
            return Ok(());
        };
        let at = format!("{table}.tls");
        // `tls = { … }` inline puts every key on the `tls =` line; `[admin.tls]` on its own.
        let err = |field: &str, msg: String| {
            let mut e = err(field, msg);
            if e.line.is_none() {
                let located = err(&at, String::new());
                (e.line, e.column) = (located.line, located.column);
            }
            e
        };
        match (&t.cert, &t.key, t.dev_ca) {
            (Some(_), Some(_), false) => {}
            (None, None, true) if self.tls.dev_ca.is_none() => {
                return Err(err(
                    &format!("{at}.dev_ca"),
                    "needs a `[tls.dev_ca]` table with the CA's `dir`".into(),
                ));
            }
            (None, None, true) => {}
            (Some(_), None, false) => {
                return Err(err(
                    &at,
                    "`cert` is given without `key`; both PEM files are expected".into(),
                ));
            }
            (None, Some(_), false) => {
                return Err(err(
                    &at,
                    "`key` is given without `cert`; both PEM files are expected".into(),
                ));
            }
            (None, None, false) => {
                return Err(err(
                    &at,
                    "expected `{ cert = \"chain.pem\", key = \"key.pem\" }` or `{ dev_ca = true }`"
                        .into(),
                ));
            }
            (_, _, true) => {
                return Err(err(
                    &at,
                    "`dev_ca = true` and `cert`/`key` exclude each other; choose one".into(),
                ));
            }
        }
        if !t.names.is_empty() && !t.dev_ca {
            return Err(err(
                &format!("{at}.names"),
                "only used with `dev_ca = true`; a certificate file carries its own names".into(),
            ));
        }
        for n in &t.names {
            if n.parse::<IpAddr>().is_err() && canonical_host(n).is_none() {
                return Err(err(
                    &format!("{at}.names"),
                    format!("`{n}` is neither an IP address nor a lowercase DNS name"),
                ));
            }
        }
        Ok(())
    }

    /// Every listener's slots and per-client cap are positive, and the operator's and the
    /// deployers' listeners are apart.
    fn validate_connection_limits(
        &self,
        err: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        for (field, v) in [
            ("limits.max_connections", self.limits.max_connections),
            (
                "limits.max_http_connections",
                self.limits.max_http_connections,
            ),
            (
                "limits.max_connections_per_ip",
                self.limits.max_connections_per_ip,
            ),
            ("admin.max_connections", self.admin.max_connections),
            (
                "admin.max_connections_per_ip",
                self.admin.max_connections_per_ip,
            ),
            ("api.max_connections", self.api.max_connections),
            (
                "api.max_connections_per_ip",
                self.api.max_connections_per_ip,
            ),
        ] {
            if v == 0 {
                return Err(err(
                    field,
                    "expected a positive number of connections".into(),
                ));
            }
        }
        let (a, b) = (self.admin.listen, self.api.listen);
        if a.port() != 0
            && a.port() == b.port()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        {
            return Err(err(
                "api.listen",
                format!(
                    "`{b}` overlaps `admin.listen` (`{a}`); the deployers' API and the operator's endpoints need listeners of their own"
                ),
            ));
        }
        Ok(())
    }

    fn validate_reservations(
        &self,
        err: &impl Fn(&str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let r = &self.reservations;
        if r.interval_secs == 0 {
            return Err(err(
                "reservations.interval_secs",
                "expected a positive number of seconds".into(),
            ));
        }
        if r.query_timeout_ms == 0 {
            return Err(err(
                "reservations.query_timeout_ms",
                "expected a positive number of milliseconds".into(),
            ));
        }
        for (field, value) in [
            ("reservations.pending_expiry_secs", r.pending_expiry_secs),
            (
                "reservations.consent_interval_secs",
                r.consent_interval_secs,
            ),
            ("reservations.consent_timeout_ms", r.consent_timeout_ms),
        ] {
            if value == 0 {
                return Err(err(field, "expected a positive number".into()));
            }
        }
        if r.max_per_owner == 0 {
            return Err(err(
                "reservations.max_per_owner",
                "expected at least 1 reservation per deployer".into(),
            ));
        }
        if let Some(ns) = r
            .nameservers
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err(err(
                "reservations.nameservers",
                format!(
                    "`{ns}` is not a name server address; expected `ip:port` like `9.9.9.9:53`"
                ),
            ));
        }
        if let Some(ip) = r
            .public_addresses
            .iter()
            .find(|ip| ip.is_unspecified() || ip.is_multicast())
        {
            return Err(err(
                "reservations.public_addresses",
                format!(
                    "`{ip}` is not an address clients can reach; expected the gateway's public IPs"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn empty_file_gets_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.https, vec!["[::]:443".parse().unwrap()]);
        assert_eq!(c.listen.http, vec!["[::]:80".parse().unwrap()]);
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert!(!c.security.allow_private_backends);
        assert!(c.security.nat64_prefixes.is_empty());
        assert_eq!(c.security.own_addresses_refresh_secs, 30);
        assert_eq!(c.timeouts.connect_ms, 5000);
        assert_eq!(c.limits.max_headers, 100);
    }

    #[test]
    fn upstream_keys_parse_and_bad_ones_name_their_field() {
        assert_eq!(
            parse("").unwrap().upstream,
            crate::upstream::Upstream::default()
        );
        let c = parse("[upstream]\nidle_kept_per_backend = 8\nsurplus_idle_timeout_ms = 250\n")
            .unwrap();
        assert_eq!(c.upstream.idle_kept_per_backend, 8);
        assert_eq!(c.upstream.surplus_idle_timeout_ms, 250);
        assert_eq!(c.upstream.max_idle_per_backend, 4096);
        let e = parse("[upstream]\nmax_idle_per_backend = 16\nidle_kept_per_backend = 32\n")
            .unwrap_err();
        assert!(
            e.to_string().contains("upstream.idle_kept_per_backend"),
            "{e}"
        );
        assert_eq!(e.line, Some(3), "{e}");
        assert!(parse("[upstream]\nidle_kept = 8\n").is_err());
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
domains = ["gw.example.org"]
[listen]
https = ["0.0.0.0:8443", "[::1]:8443"]
[tls.dev_ca]
dir = "/tmp/ca"
[[route]]
host = "app.gw.example.org"
backends = [{ addr = "[200::1]:8080" }, { addr = "10.0.0.1:80", weight = 3 }]
options = { allow_plain_http = true, backend_protocol = "h2c" }
[[route]]
host = "*.pass.example.org"
mode = "passthrough"
backends = [{ addr = "10.0.0.2:443" }]
options = { proxy_protocol = true }
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].backends[1].weight, 3);
        assert_eq!(c.routes[1].mode, Mode::Passthrough);
        assert!(c.routes[1].options.proxy_protocol);
    }

    #[test]
    fn bad_backend_address_names_line() {
        let text = "[[route]]\nhost = \"a.example\"\nbackends = [{ addr = \"nope\" }]\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().contains("gateway.toml:3"), "{e}");
    }

    #[test]
    fn bad_host_names_field_and_expectation() {
        let text = "[[route]]\nhost = \"Bad Host\"\nbackends = [{ addr = \"10.0.0.1:80\" }]\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("route.0.host"), "{e}");
        assert!(e.message.contains("lowercase DNS name"), "{e}");
    }

    #[test]
    fn hosts_follow_the_one_host_name_rule() {
        let route = |host: &str| {
            parse(&format!(
                "[[route]]\nhost = \"{host}\"\nbackends = [{{ addr = \"10.0.0.1:80\" }}]\n"
            ))
        };
        for good in [
            "a.example",
            "*.pass.example.org",
            "xn--bcher-kva.example",
            "10.0.0.1",
        ] {
            assert_eq!(route(good).unwrap().routes[0].host, good);
        }
        let wildcard = route("*.pass.example.org").unwrap();
        assert_eq!(
            wildcard.routes[0].host.wildcard_parent(),
            Some("pass.example.org")
        );
        // Written hosts are canonical: lowercase, no trailing dot, no `_`, ASCII.
        for bad in [
            "A.example",
            "a.example.",
            "a_b.example",
            "*.a_b.example",
            "bücher.example",
            "a.*.example",
            "ab--cd.example",
        ] {
            let e = route(bad).unwrap_err();
            assert!(e.message.contains("route.0.host"), "{bad}: {e}");
            assert_eq!(e.line, Some(2), "{bad}: {e}");
        }
        let c = parse("domains = [\"gw.example.org\"]\n").unwrap();
        assert_eq!(c.domains[0], "gw.example.org");
        let e = parse("domains = [\"gw.example.org\", \"gw_2.example.org\"]\n").unwrap_err();
        assert!(e.message.contains("domains.1"), "{e}");
        assert!(e.message.contains("lowercase DNS name"), "{e}");
    }

    #[test]
    fn route_errors_point_at_the_route_in_question() {
        let route = |host: &str| {
            format!("[[route]]\nhost = \"{host}\"\nbackends = [{{ addr = \"10.0.0.1:80\" }}]\n")
        };
        let dup = route("a.example") + &route("b.example") + &route("a.example");
        let e = parse(&dup).unwrap_err();
        assert!(e.message.contains("route.2.host"), "{e}");
        assert_eq!(e.line, Some(8), "{e}");
        let empty = route("a.example") + "[[route]]\nhost = \"b.example\"\nbackends = []\n";
        let e = parse(&empty).unwrap_err();
        assert!(e.message.contains("route.1.backends"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }

    #[test]
    fn duplicate_and_empty_routes_refused() {
        let dup = "[[route]]\nhost = \"a.example\"\nbackends = [{ addr = \"10.0.0.1:80\" }]\n\
                   [[route]]\nhost = \"a.example\"\nbackends = [{ addr = \"10.0.0.1:80\" }]\n";
        assert!(parse(dup).unwrap_err().message.contains("routed twice"));
        let empty = "[[route]]\nhost = \"a.example\"\nbackends = []\n";
        assert!(
            parse(empty)
                .unwrap_err()
                .message
                .contains("at least one backend")
        );
    }

    #[test]
    fn unknown_field_and_zero_timeout_refused() {
        let e = parse("[timeouts]\nheader_ms = 0\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("timeouts.header_ms"), "{e}");
        let e = parse("[limits]\nmax_hedaers = 3\n").unwrap_err();
        assert!(e.message.contains("max_hedaers"), "{e}");
    }
}

#[cfg(test)]
mod reservations_and_admin_tls_tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn reservations_defaults_and_values() {
        let c = parse("").unwrap();
        assert_eq!(c.reservations, Reservations::default());
        assert_eq!(c.reservations.interval(), Duration::from_secs(300));
        assert_eq!(c.reservations.grace(), Duration::from_secs(3600));
        assert!(c.admin.tls.is_none());
        let c = parse(
            "[reservations]\nnameservers = [\"127.0.0.1:5353\", \"[::1]:53\"]\n\
             public_addresses = [\"203.0.113.7\", \"2001:db8::7\"]\ninterval_secs = 60\n\
             grace_secs = 0\nrequire_certificate = true\nquery_timeout_ms = 800\n",
        )
        .unwrap();
        let r = &c.reservations;
        assert_eq!(r.nameservers[1], "[::1]:53".parse().unwrap());
        assert_eq!(
            r.public_addresses[0],
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!((r.interval_secs, r.grace_secs), (60, 0));
        assert!(r.require_certificate);
        assert_eq!(r.query_timeout(), Duration::from_millis(800));
    }

    #[test]
    fn bad_reservations_values_name_file_line_and_field() {
        let e = parse(
            "domains = [\"gw.example.org\"]\n[reservations]\ngrace_secs = 5\ninterval_secs = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(
            e.to_string()
                .starts_with("gateway.toml:4:1: reservations.interval_secs: "),
            "{e}"
        );
        assert!(e.message.contains("positive number of seconds"), "{e}");

        let e = parse("[reservations]\npublic_addresses = [\"0.0.0.0\"]\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("reservations.public_addresses"), "{e}");

        // Type errors are located by the TOML parser.
        let e = parse("[reservations]\nnameservers = [\"ns1.example\"]\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = parse("[reservations]\ngrace = 5\n").unwrap_err();
        assert!(e.message.contains("grace"), "{e}");
        let e = parse("[reservations]\nquery_timeout_ms = 0\n").unwrap_err();
        assert!(e.message.contains("reservations.query_timeout_ms"), "{e}");
    }

    #[test]
    fn admin_tls_forms() {
        let c = parse("[admin]\ntls = { cert = \"a.pem\", key = \"k.pem\" }\n").unwrap();
        let t = c.admin.tls.unwrap();
        assert_eq!(t.cert.as_deref(), Some(Path::new("a.pem")));
        assert!(!t.dev_ca);
        let c = parse("[admin.tls]\ndev_ca = true\nnames = [\"admin.example\", \"::1\"]\n[tls.dev_ca]\ndir = \"/tmp/ca\"\n")
            .unwrap();
        assert!(c.admin.tls.unwrap().dev_ca);
    }

    #[test]
    fn bad_admin_tls_is_located() {
        let e =
            parse("[admin]\nlisten = \"127.0.0.1:1\"\ntls = { cert = \"a.pem\" }\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.message.contains("admin.tls") && e.message.contains("without `key`"),
            "{e}"
        );
        let e = parse("[admin]\ntls = { dev_ca = true }\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("[tls.dev_ca]"), "{e}");
        let e = parse("[admin.tls]\ncert = \"a.pem\"\nkey = \"k.pem\"\ndev_ca = true\n[tls.dev_ca]\ndir = \"/x\"\n")
            .unwrap_err();
        assert!(e.message.contains("exclude each other"), "{e}");
        let e = parse(
            "[admin.tls]\ndev_ca = true\nnames = [\"Bad Name\"]\n[tls.dev_ca]\ndir = \"/x\"\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("admin.tls.names"), "{e}");
        let e = parse("[admin]\ntls = { certificate = \"a.pem\" }\n").unwrap_err();
        assert!(e.message.contains("certificate"), "{e}");
    }

    #[test]
    fn security_nat64_prefixes_and_refresh_are_checked() {
        let c = parse(
            "[security]\nnat64_prefixes = [\"2001:db8:64::/96\"]\nown_addresses_refresh_secs = 5\n",
        )
        .unwrap();
        assert_eq!(
            String::from(c.security.nat64_prefixes[0]),
            "2001:db8:64::/96"
        );
        assert_eq!(c.security.own_addresses_refresh().as_secs(), 5);
        let e = parse("[security]\nnat64_prefixes = [\"2001:db8:64::/97\"]\n").unwrap_err();
        assert!(e.message.contains("64:ff9b::/96"), "{e}");
        let e = parse("[security]\nown_addresses_refresh_secs = 0\n").unwrap_err();
        assert!(
            e.message.contains("security.own_addresses_refresh_secs"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod listener_tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn operator_and_api_listeners_default_to_loopback_with_their_own_slots() {
        let c = parse("").unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.api.listen, "127.0.0.1:9091".parse().unwrap());
        assert!(c.api.tls.is_none());
        assert_eq!(
            (c.admin.max_connections, c.admin.max_connections_per_ip),
            (64, 16)
        );
        assert_eq!(
            (c.api.max_connections, c.api.max_connections_per_ip),
            (256, 16)
        );
        let l = &c.limits;
        assert_eq!(
            (
                l.max_connections,
                l.max_http_connections,
                l.max_connections_per_ip
            ),
            (20000, 4096, 256)
        );
        let c = parse(
            "[api]\nlisten = \"[::]:9443\"\ntls = { cert = \"a.pem\", key = \"k.pem\" }\n\
             max_connections = 10\nmax_connections_per_ip = 2\n\
             [limits]\nmax_http_connections = 5\nmax_connections_per_ip = 3\n",
        )
        .unwrap();
        assert_eq!(c.api.listen, "[::]:9443".parse().unwrap());
        assert!(c.api.tls.is_some());
        assert_eq!(
            (c.api.max_connections, c.api.max_connections_per_ip),
            (10, 2)
        );
        assert_eq!(
            (
                c.limits.max_http_connections,
                c.limits.max_connections_per_ip
            ),
            (5, 3)
        );
    }

    #[test]
    fn bad_listener_values_are_located() {
        let e = parse("[api]\ntls = { cert = \"a.pem\" }\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.message.contains("api.tls") && e.message.contains("without `key`"),
            "{e}"
        );
        let e = parse("[api]\ntls = { dev_ca = true }\n").unwrap_err();
        assert!(e.message.contains("api.tls.dev_ca"), "{e}");
        let e = parse("[limits]\nmax_connections_per_ip = 0\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("limits.max_connections_per_ip"), "{e}");
        let e = parse("[admin]\nmax_connections = 0\n").unwrap_err();
        assert!(e.message.contains("admin.max_connections"), "{e}");
        // One address for both would put the operator's endpoints back in deployers' reach.
        for api in ["127.0.0.1:9090", "[::]:9090", "0.0.0.0:9090"] {
            let e = parse(&format!("[api]\nlisten = \"{api}\"\n")).unwrap_err();
            assert!(e.message.contains("api.listen"), "{api}: {e}");
            assert!(e.message.contains("listeners of their own"), "{api}: {e}");
        }
        assert!(parse("[api]\nlisten = \"127.0.0.2:9090\"\n").is_ok());
    }
}
