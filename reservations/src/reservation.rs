//! Reservations: a deployer's name under the farmer's domain, or a deployer's own domain,
//! with its backends and switches. Validation here is the single source of the rules the admin
//! API enforces; every refusal names the field and the reason.
//!
//! Names and custom domains are [`HostName`]s (its rule: lowercase LDH labels of 1–63
//! chars, no `_`, punycode for IDN, at most 253 chars in all). Compared with the system we
//! replace (`[a-z0-9-_]`, 3–64 chars):
//! - at most 63 chars: a DNS label cannot be longer (RFC 1035 §2.3.4), so a 64-char name could
//!   never resolve;
//! - no `_`: not valid in host names (RFC 952/1123) and public CAs refuse certificates for it;
//! - at least 1 char: any valid label works; a minimum length protected nothing;
//! - the farmer's infrastructure labels (`www`, `api`, `ns1`, …) are reserved, and so are the
//!   labels mail clients and servers look up under a domain (`mta-sts`, `openpgpkey`,
//!   `autoconfig`, `autodiscover`): whoever holds them could publish the farmer's mail
//!   policy, keys or client settings;
//! - a punycode label must decode to a single script (UTS 39 §5.1, through
//!   `unicode-security`): `xn--pypal-4ve` (`pаypal` with a Cyrillic `а`) is refused.
//!
//! A custom domain further needs two labels, a top-level label that is not all digits, not
//! to be an IP address, and not to lie under the farmer's domain.

use meshgate_config::host::{HostName, HostNameError, HostPattern, MAX_NAME_LEN};
use meshgate_config::pool::{Policy as PoolPolicy, PoolConfig};
use meshgate_config::route::{Backend, Mode, Route, RouteOptions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Most backends one reservation may list.
const MAX_BACKENDS: usize = 32;
/// Label of the TXT record that proves ownership of a custom domain.
const CHALLENGE_LABEL: &str = "_meshgate-challenge";

/// Labels a deployer cannot reserve: names the farmer's own services, mail, DNS and ACME use.
const RESERVED_NAMES: &[&str] = &[
    "www",
    "api",
    "admin",
    "mail",
    "smtp",
    "imap",
    "pop",
    "pop3",
    "mx",
    "ns",
    "dns",
    "ftp",
    "gateway",
    "metrics",
    "status",
    "localhost",
    "autoconfig",
    "autodiscover",
    "mta-sts",
    "openpgpkey",
    "wpad",
    "acme",
    "_acme-challenge",
    CHALLENGE_LABEL,
];

/// A refusal naming the offending field and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

/// Which of the two reservation kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `<name>.<farmer domain>`.
    Name,
    /// A deployer's own FQDN pointed at the gateway.
    Domain,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Name => "name",
            Kind::Domain => "domain",
        }
    }
}

/// Identifies one reservation: its kind and its name (label for names, FQDN for domains),
/// and for domains the deployer claiming it. A name has one holder; a domain may be claimed
/// by several deployers at once until one of them proves it (the `lifecycle` module settles who).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub name: String,
    /// The claimant of a domain; `None` for names.
    pub owner: Option<String>,
}

impl Key {
    pub fn name(name: impl Into<String>) -> Self {
        Key {
            kind: Kind::Name,
            name: name.into(),
            owner: None,
        }
    }
    /// `owner`'s claim on `fqdn`.
    pub fn domain(fqdn: impl Into<String>, owner: impl Into<String>) -> Self {
        Key {
            kind: Kind::Domain,
            name: fqdn.into(),
            owner: Some(owner.into()),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.name)?;
        if let Some(o) = &self.owner {
            write!(f, " (claimed by {o})")?;
        }
        Ok(())
    }
}

/// Per-reservation switches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Answer plain HTTP on :80 with a redirect to HTTPS (the default).
    pub redirect_https: bool,
    /// Serve plain HTTP on :80 instead of redirecting.
    pub allow_plain_http: bool,
    /// Keep a client on one backend (consistent hashing).
    pub sticky: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redirect_https: true,
            allow_plain_http: false,
            sticky: false,
        }
    }
}

/// Where a reservation stands. Names are always `Active`; domains move
/// pending → verified → active, and to deactivated when the proof stops holding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    /// Waiting for the DNS proof.
    Pending,
    /// The proof holds; a certificate may be ordered; not serving yet.
    Verified,
    /// Serving traffic.
    Active,
    /// The proof stopped holding for longer than the grace period.
    Deactivated { reason: String },
    /// A domain claim that lost: another deployer proved the domain first. Kept (not
    /// checked, not served) until the pending expiry so its owner can read why.
    Dropped { reason: String },
}

impl Status {
    pub fn is_active(&self) -> bool {
        matches!(self, Status::Active)
    }
    pub fn is_verified(&self) -> bool {
        matches!(self, Status::Verified | Status::Active)
    }
}

/// What the verifier last saw for a domain (unused for names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Verification {
    /// Unix milliseconds of the last DNS check.
    pub last_checked_ms: Option<u64>,
    /// Why the last check failed, if it did.
    pub last_error: Option<String>,
    /// Unix milliseconds since which the proof has been failing on a verified/active domain.
    pub failing_since_ms: Option<u64>,
    /// The certificate layer holds a certificate for this domain.
    pub certificate_ready: bool,
}

/// One reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub kind: Kind,
    /// The label (names) or the FQDN (domains), lowercase, no trailing dot.
    pub name: String,
    /// The deployer id that owns it.
    pub owner: String,
    pub backends: Vec<SocketAddr>,
    pub mode: Mode,
    pub options: Options,
    pub status: Status,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
    #[serde(default)]
    pub verification: Verification,
    /// Consent of the nodes behind overlay backends, one entry per overlay backend (see
    /// the `consent` module). An overlay backend without a granted entry is not served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consent: Vec<BackendConsent>,
}

impl Reservation {
    /// A new reservation of already validated parts: names start active, domains pending.
    pub fn new(
        key: Key,
        owner: &str,
        backends: Vec<SocketAddr>,
        mode: Mode,
        options: Options,
        now_unix: u64,
    ) -> Self {
        Reservation {
            kind: key.kind,
            name: key.name,
            owner: owner.to_string(),
            backends,
            mode,
            options,
            status: match key.kind {
                Kind::Name => Status::Active,
                Kind::Domain => Status::Pending,
            },
            created_at: now_unix,
            updated_at: now_unix,
            verification: Verification::default(),
            consent: Vec::new(),
        }
    }

    pub fn key(&self) -> Key {
        Key {
            kind: self.kind,
            name: self.name.clone(),
            owner: match self.kind {
                Kind::Name => None,
                Kind::Domain => Some(self.owner.clone()),
            },
        }
    }

    /// The backends the gateway may send traffic to now: every non-overlay backend, and each
    /// overlay backend whose node's consent is granted.
    pub fn servable_backends(&self) -> Vec<SocketAddr> {
        self.backends
            .iter()
            .filter(|b| {
                !needs_consent(b.ip())
                    || self
                        .consent
                        .iter()
                        .any(|c| c.backend == **b && c.state == ConsentState::Granted)
            })
            .copied()
            .collect()
    }

    /// The host this reservation serves.
    pub fn host(&self, farmer_domain: &str) -> String {
        match self.kind {
            Kind::Name => format!("{}.{}", self.name, farmer_domain),
            Kind::Domain => self.name.clone(),
        }
    }

    /// Whether this reservation belongs in the routing table now.
    pub(crate) fn is_routable(&self) -> bool {
        let status = match self.kind {
            Kind::Name => true,
            Kind::Domain => self.status.is_active(),
        };
        status && !self.servable_backends().is_empty()
    }

    /// The route the gateway serves for this reservation. `sticky` selects the `hash_cookie`
    /// pool policy (default cookie). `redirect_https` is always `!allow_plain_http` (see
    /// [`validate_options`]), which is what the route's `allow_plain_http` carries. Fails
    /// only for a record whose name was never validated as a host name.
    pub(crate) fn to_route(&self, farmer_domain: &str) -> Result<Route, HostNameError> {
        Ok(Route {
            host: HostPattern::parse(&self.host(farmer_domain))?,
            backends: self
                .servable_backends()
                .iter()
                .map(|addr| Backend {
                    addr: *addr,
                    weight: 1,
                })
                .collect(),
            mode: self.mode,
            options: RouteOptions {
                allow_plain_http: self.options.allow_plain_http,
                ..RouteOptions::default()
            },
            // `sticky` keeps a client on one backend: hash on the affinity cookie, falling
            // back to the client IP for clients without it.
            pool: PoolConfig {
                policy: if self.options.sticky {
                    PoolPolicy::HashCookie
                } else {
                    PoolPolicy::default()
                },
                ..PoolConfig::default()
            },
        })
    }
}

/// Whether a backend address needs its node's consent: overlay addresses (`600::/7`, the
/// overlay's fixed range), whose holder can be asked over the overlay. Other addresses are
/// the SSRF guard's business.
pub fn needs_consent(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.octets()[0] & 0xfe == 0x06,
        IpAddr::V4(_) => false,
    }
}

/// Where one overlay backend's consent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentState {
    /// Never confirmed, or withdrawn after the grace: not served.
    Unknown,
    /// The node lists the reservation: served.
    Granted,
    /// The node answered without it: not served.
    Refused,
}

/// One overlay backend's consent as stored with its reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConsent {
    pub backend: SocketAddr,
    pub state: ConsentState,
    /// Unix ms the node last confirmed the consent.
    #[serde(default)]
    pub confirmed_ms: Option<u64>,
    /// Unix ms of the last query.
    #[serde(default)]
    pub checked_ms: Option<u64>,
    /// Why the backend is not served, or why the last query failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Rules the admin applies on top of the fixed ones.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Further reserved labels (lowercase).
    pub extra_reserved: Vec<String>,
    /// Accept loopback backends (tests, single-host setups). Other ranges are the gateway's
    /// SSRF guard's business at dial time.
    pub allow_loopback_backends: bool,
}

/// Validates and normalises (ASCII-lowercases) one label under the farmer's domain.
pub fn validate_name(
    field: &str,
    name: &str,
    farmer_domain: &str,
    policy: &Policy,
) -> Result<String, FieldError> {
    let lower = name.to_ascii_lowercase();
    let reserved = RESERVED_NAMES.contains(&lower.as_str())
        || policy.extra_reserved.contains(&lower)
        || is_ns_label(&lower);
    if reserved {
        return Err(FieldError::new(
            field,
            format!("`{lower}` is reserved by the gateway operator"),
        ));
    }
    if lower.contains('.') {
        return Err(FieldError::new(
            field,
            "a name is one DNS label: it must not contain `.` (reserve a custom domain instead)",
        ));
    }
    let label = host_name(field, &lower)?;
    single_script(field, label.as_str())?;
    let host_len = label.as_str().len() + 1 + farmer_domain.len();
    if host_len > MAX_NAME_LEN {
        return Err(FieldError::new(
            field,
            format!(
                "`{label}.{farmer_domain}` is {host_len} chars; a host name has at most {MAX_NAME_LEN}"
            ),
        ));
    }
    Ok(label.into_string())
}

/// `ns`, `ns1`, `ns02`, …: name-server labels.
fn is_ns_label(label: &str) -> bool {
    label
        .strip_prefix("ns")
        .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Validates and normalises a custom FQDN: a [`HostName`] (lowercase, no trailing dot, IDN
/// only as punycode) of at least two labels, not an IP literal, no wildcard, not under
/// `farmer_domain`.
pub fn validate_fqdn(field: &str, fqdn: &str, farmer_domain: &str) -> Result<String, FieldError> {
    let lower = fqdn.to_ascii_lowercase();
    let bare = lower.strip_suffix('.').unwrap_or(&lower);
    if bare.parse::<IpAddr>().is_ok() || bare.starts_with('[') {
        return Err(FieldError::new(
            field,
            "an IP address is not a domain; reserve a host name",
        ));
    }
    if bare.contains('*') {
        return Err(FieldError::new(field, "wildcards cannot be reserved"));
    }
    let name = host_name(field, fqdn)?;
    single_script(field, name.as_str())?;
    if name.labels().count() < 2 {
        return Err(FieldError::new(
            field,
            "must be a fully qualified domain with at least two labels",
        ));
    }
    if name
        .labels()
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(FieldError::new(
            field,
            "the top-level label is all digits, which no real domain has",
        ));
    }
    let farmer = farmer_domain.to_ascii_lowercase();
    if name == farmer.as_str() || name.as_str().ends_with(&format!(".{farmer}")) {
        return Err(FieldError::new(
            field,
            format!("is under the gateway's domain `{farmer}`; reserve a name instead"),
        ));
    }
    Ok(name.into_string())
}

/// Refuses a name with a punycode label that mixes scripts (UTS 39 §5.1 single-script, with
/// its augmented script sets, so Japanese Han + Kana is one script while Latin + Cyrillic is
/// not). Such labels exist to look like another name (`раypal`).
fn single_script(field: &str, name: &str) -> Result<(), FieldError> {
    use unicode_security::MixedScript;
    for label in name.split('.') {
        let Some(encoded) = label.strip_prefix("xn--") else {
            continue;
        };
        let Some(decoded) = idna::punycode::decode_to_string(encoded) else {
            return Err(FieldError::new(
                field,
                format!("label `{label}` is not valid punycode"),
            ));
        };
        if !decoded.as_str().is_single_script() {
            return Err(FieldError::new(
                field,
                format!(
                    "label `{label}` (`{decoded}`) mixes scripts, as names made to look like \
                     another do; use letters of one script"
                ),
            ));
        }
    }
    Ok(())
}

/// `text` as a [`HostName`], refused with `field` and the rule it breaks.
fn host_name(field: &str, text: &str) -> Result<HostName, FieldError> {
    HostName::parse(text).map_err(|e| FieldError::new(field, e.to_string()))
}

/// Validates a backend list: 1..=MAX_BACKENDS IP-literal `addr:port`, no port 0, no
/// unspecified or multicast address, loopback only if the policy allows. Overlay addresses
/// (600::/7) are ordinary IPv6 addresses here.
pub fn validate_backends(
    field: &str,
    backends: &[String],
    policy: &Policy,
) -> Result<Vec<SocketAddr>, FieldError> {
    if backends.is_empty() {
        return Err(FieldError::new(field, "at least one backend is required"));
    }
    if backends.len() > MAX_BACKENDS {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_BACKENDS} backends"),
        ));
    }
    let mut out = Vec::with_capacity(backends.len());
    for (i, text) in backends.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let addr: SocketAddr = text.trim().parse().map_err(|_| {
            FieldError::new(
                &f,
                format!("`{text}` is not an IP-literal `addr:port` (IPv6 as `[addr]:port`)"),
            )
        })?;
        if addr.port() == 0 {
            return Err(FieldError::new(&f, "port 0 is not a backend port"));
        }
        let ip = addr.ip();
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(FieldError::new(
                &f,
                format!("{ip} is not a unicast host address"),
            ));
        }
        if is_loopback(ip) && !policy.allow_loopback_backends {
            return Err(FieldError::new(
                &f,
                format!("{ip} is loopback: the gateway's own host is not a backend"),
            ));
        }
        if out.contains(&addr) {
            return Err(FieldError::new(&f, format!("{addr} is listed twice")));
        }
        out.push(addr);
    }
    Ok(out)
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Checks that the options do not contradict each other.
pub fn validate_options(field: &str, options: &Options) -> Result<(), FieldError> {
    if options.redirect_https && options.allow_plain_http {
        return Err(FieldError::new(
            format!("{field}.allow_plain_http"),
            "cannot both serve plain HTTP and redirect it to HTTPS; set redirect_https to false",
        ));
    }
    // :80 either redirects or serves plain HTTP; there is no third behaviour to select.
    if !options.redirect_https && !options.allow_plain_http {
        return Err(FieldError::new(
            format!("{field}.redirect_https"),
            "plain HTTP on :80 is redirected to HTTPS unless allow_plain_http is true; \
             set redirect_https to false only together with allow_plain_http = true",
        ));
    }
    Ok(())
}

/// Validates a deployer id (the owner of reservations and tokens): 1–64 chars of
/// `a-z0-9-_.`.
pub fn validate_owner(field: &str, owner: &str) -> Result<(), FieldError> {
    let ok = !owner.is_empty()
        && owner.len() <= 64
        && owner
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "a deployer id is 1-64 chars of a-z, 0-9, `-`, `_`, `.`",
        ))
    }
}

/// The TXT record name a domain's owner publishes the challenge token at.
pub fn challenge_name(fqdn: &str) -> String {
    format!("{CHALLENGE_LABEL}.{fqdn}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FARM: &str = "farm.example";

    fn name(n: &str) -> Result<String, FieldError> {
        validate_name("name", n, FARM, &Policy::default())
    }

    #[test]
    fn names_follow_label_rules() {
        assert_eq!(name("Alice-1").unwrap(), "alice-1");
        assert_eq!(name("a").unwrap(), "a");
        assert!(name(&"a".repeat(63)).is_ok());
        assert!(
            name(&"a".repeat(64))
                .unwrap_err()
                .reason
                .contains("at most 63")
        );
        assert!(name("-a").unwrap_err().reason.contains("start or end"));
        assert!(name("a_b").unwrap_err().reason.contains("`_`"));
        assert!(name("a.b").unwrap_err().reason.contains("one DNS label"));
        assert!(name("").is_err());
        assert!(name("ab--cd").unwrap_err().reason.contains("positions 3-4"));
        assert!(name("xn--bcher-kva").is_ok());
        assert!(name("xn--zz-").is_err());
    }

    #[test]
    fn reserved_words_are_refused() {
        for w in [
            "www",
            "API",
            "admin",
            "mail",
            "ns",
            "ns1",
            "_acme-challenge",
        ] {
            assert!(name(w).unwrap_err().reason.contains("reserved"), "{w}");
        }
        let policy = Policy {
            extra_reserved: vec!["shop".into()],
            ..Policy::default()
        };
        assert!(validate_name("name", "shop", FARM, &policy).is_err());
        assert!(name("nsx").is_ok());
    }

    #[test]
    fn fqdns_are_checked_per_label() {
        let f = |d: &str| validate_fqdn("fqdn", d, FARM);
        assert_eq!(f("Shop.Example.COM.").unwrap(), "shop.example.com");
        assert_eq!(f("xn--bcher-kva.example").unwrap(), "xn--bcher-kva.example");
        assert!(
            f("bücher.example")
                .unwrap_err()
                .reason
                .contains("xn--bcher-kva")
        );
        assert!(f("xn--xx.example").is_err());
        assert!(f("1.2.3.4").unwrap_err().reason.contains("IP address"));
        assert!(f("[::1]").is_err());
        assert!(f("*.example.com").unwrap_err().reason.contains("wildcard"));
        assert!(
            f("a.farm.example")
                .unwrap_err()
                .reason
                .contains("gateway's domain")
        );
        assert!(f("farm.example").is_err());
        assert!(f("notfarm.example").is_ok());
        assert!(f("localhost").unwrap_err().reason.contains("two labels"));
        assert!(f("a..b").unwrap_err().reason.contains("empty label"));
        assert!(f("_x.example.com").is_err());
        assert!(f(&format!("{}.com", "a".repeat(64))).is_err());
        let long = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        assert!(f(&long).unwrap_err().reason.contains("at most 253"));
    }

    #[test]
    fn backends_are_ip_literals() {
        let p = Policy::default();
        let b = |v: &[&str]| {
            validate_backends(
                "backends",
                &v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &p,
            )
        };
        assert!(b(&["[400:1::2]:8080", "10.0.0.1:80"]).is_ok());
        assert_eq!(b(&["web:80"]).unwrap_err().field, "backends[0]");
        assert!(b(&[]).is_err());
        assert!(
            b(&["127.0.0.1:80"])
                .unwrap_err()
                .reason
                .contains("loopback")
        );
        assert!(b(&["[::ffff:127.0.0.1]:80"]).is_err());
        assert!(b(&["0.0.0.0:80"]).is_err());
        assert!(b(&["10.0.0.1:0"]).is_err());
        assert!(b(&["10.0.0.1:80", "10.0.0.1:80"]).is_err());
    }

    #[test]
    fn options_redirect_or_serve_plain_http() {
        let o = |redirect_https, allow_plain_http| Options {
            redirect_https,
            allow_plain_http,
            sticky: false,
        };
        assert!(validate_options("options", &o(true, false)).is_ok());
        assert!(validate_options("options", &o(false, true)).is_ok());
        let e = validate_options("options", &o(true, true)).unwrap_err();
        assert_eq!(e.field, "options.allow_plain_http");
        // Neither redirect nor plain HTTP was accepted and then ignored; it is refused.
        let e = validate_options("options", &o(false, false)).unwrap_err();
        assert_eq!(e.field, "options.redirect_https");
        assert!(e.reason.contains("allow_plain_http"), "{}", e.reason);
    }

    #[test]
    fn route_from_reservation() {
        let r = Reservation {
            kind: Kind::Name,
            name: "alice".into(),
            owner: "a".into(),
            backends: vec!["[400::1]:80".parse().unwrap()],
            mode: Mode::Passthrough,
            options: Options {
                redirect_https: false,
                allow_plain_http: true,
                sticky: false,
            },
            status: Status::Active,
            created_at: 1,
            updated_at: 1,
            verification: Verification::default(),
            consent: Vec::new(),
        };
        let route = r.to_route(FARM).unwrap();
        assert_eq!(route.host, "alice.farm.example");
        assert_eq!(route.mode, Mode::Passthrough);
        assert!(route.options.allow_plain_http);
        assert_eq!(route.backends[0].addr, r.backends[0]);
        assert_eq!(route.pool, PoolConfig::default());
    }

    #[test]
    fn sticky_reservation_hashes_on_the_affinity_cookie() {
        let mut r = Reservation {
            kind: Kind::Name,
            name: "bob".into(),
            owner: "b".into(),
            backends: vec![
                "[400::1]:80".parse().unwrap(),
                "[400::2]:80".parse().unwrap(),
            ],
            mode: Mode::Terminate,
            options: Options {
                sticky: true,
                ..Options::default()
            },
            status: Status::Active,
            created_at: 1,
            updated_at: 1,
            verification: Verification::default(),
            consent: Vec::new(),
        };
        let route = r.to_route(FARM).unwrap();
        assert_eq!(route.pool.policy, PoolPolicy::HashCookie);
        assert_eq!(
            route.pool.sticky_cookie,
            PoolConfig::default().sticky_cookie
        );
        assert_eq!(route.pool.validate(), Ok(()));
        r.options.sticky = false;
        assert_eq!(
            r.to_route(FARM).unwrap().pool.policy,
            PoolPolicy::LeastLoaded
        );
    }
}
