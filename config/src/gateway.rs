//! `gateway.toml`: the public gateway's configuration. Every field has a documented default
//! (see `docs/configuration.md`); errors name the file, line, field and what is expected.

use crate::file::{self, ConfigError};
use crate::route::{Mode, Route};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole `gateway.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The farmer's domain(s): `<name>.<domain>` reservations live under these.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Where state (certificates, stores) lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub listen: Listeners,
    #[serde(default)]
    pub admin: Admin,
    /// The embedded overlay node; absent means no overlay backends.
    #[serde(default)]
    pub overlay: Option<Overlay>,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub security: Security,
    /// Static routes, `[[route]]` tables.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
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

/// The admin listener: `/metrics`, `/status`, `POST /reload`, `/v1/*`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Default `127.0.0.1:9090` (loopback only).
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
    /// File holding the farmer's admin token (mode 0600), used by the reservations API.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: default_admin(),
            token_file: None,
        }
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
    /// Peers to connect to, `host:port`.
    #[serde(default)]
    pub peers: Vec<String>,
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
    /// Time to open a backend stream (502 after).
    #[serde(default = "d5000")]
    pub connect_ms: u64,
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
    /// Concurrent client connections over all listeners; more wait in the accept queue.
    #[serde(default = "d20000")]
    pub max_connections: usize,
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
        }
    }
}

/// Backend safety switches.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// Allow direct backends in loopback, private, link-local or the gateway's own addresses
    /// (SSRF guard off). Default `false`.
    #[serde(default)]
    pub allow_private_backends: bool,
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
        let config: GatewayConfig = file::parse(path, text)?;
        config.validate(path, text)?;
        Ok(config)
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let err = |field: &str, msg: String| ConfigError::at_field(path, text, field, msg);
        for (i, d) in self.domains.iter().enumerate() {
            if !is_hostname(d) {
                return Err(err(
                    &format!("domains.{i}"),
                    format!("`{d}` is not a lowercase DNS name like `gw.example.org`"),
                ));
            }
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
        let mut seen = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let host_ok = match r.host.strip_prefix("*.") {
                Some(suffix) => is_hostname(suffix),
                None => is_hostname(&r.host),
            };
            if !host_ok {
                return Err(err(
                    &format!("route.{i}.host"),
                    format!(
                        "`{}` is not a lowercase DNS name or `*.suffix` wildcard",
                        r.host
                    ),
                ));
            }
            if !seen.insert(r.host.as_str()) {
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
        }
        Ok(())
    }
}

/// A lowercase DNS name: dot-separated labels of `a-z0-9-` (and `_`), none empty or over 63.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
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
        assert_eq!(c.timeouts.connect_ms, 5000);
        assert_eq!(c.limits.max_headers, 100);
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
