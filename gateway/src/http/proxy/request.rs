//! Phase 2, build the upstream request: hop-by-hop headers removed (RFC 9110 §7.6.1), exactly
//! one Host (the validated routed host), the forwarding and client-address headers replaced
//! by what this edge saw or removed, this gateway's `Via` entry appended, the upgrade offer
//! kept when the route allows it, and the version and authority the backend protocol needs.
//! [`head`] is pure; [`build`] only splits the client's request around it. The request's host
//! itself is read and checked here too ([`request_host`], [`is_valid_host`]).

use super::loops::Identity;
use crate::http::body::Body;
pub(crate) use crate::http::client::ClientIp;
use crate::http::client::HostNames;
use crate::routes::normalize_host;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Version};
use hyper::body::Incoming;
use meshgate_config::route::{BackendProtocol, RouteOptions};

/// The client's request split for forwarding.
pub(crate) struct Upstream {
    pub(crate) head: UpstreamHead,
    pub(crate) body: Incoming,
    /// The client side of an HTTP/1.1 upgrade the route allows, with the protocols offered.
    pub(crate) client_upgrade: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
    /// An `Upgrade` offer that was dropped (not allowed on the route, or `h2c`).
    pub(crate) refused_upgrade: Option<HeaderValue>,
}

/// What this edge saw of a request, put into the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hop<'a> {
    pub(crate) client: &'a ClientIp,
    /// `https` or `http`.
    pub(crate) proto: &'a str,
    /// The validated host: as the client wrote it, port included, the upstream `Host` (h1)
    /// or `:authority` (h2c); normalized in `X-Forwarded-Host` and `Forwarded` (values made
    /// once per connection and host).
    pub(crate) names: &'a HostNames,
    /// This gateway's `Via` pseudonym.
    pub(crate) via: &'a Identity,
}

/// Everything of the upstream request but its body and its backend.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamHead {
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    pub(crate) version: Version,
    /// h2c: the `:authority` to send (the client's host); h1 names the backend instead.
    pub(crate) authority: Option<String>,
    /// The client's own parsed path and query (shared, not copied): an origin-form target
    /// (`/...`) becomes the h1 request URI without formatting or parsing again.
    path: Option<http::uri::PathAndQuery>,
}

impl UpstreamHead {
    /// The request to send with `body`, the head copied (for an attempt that may be followed
    /// by another); `None` if the target is not a valid URI.
    pub(crate) fn to(&self, body: Body) -> Option<Request<Body>> {
        let mut req = Request::new(body);
        *req.uri_mut() = self.uri()?;
        *req.method_mut() = self.method.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }

    /// [`UpstreamHead::to`] for the last attempt: the head moves into the request, nothing is
    /// copied.
    pub(crate) fn into_request(self, body: Body) -> Option<Request<Body>> {
        let mut req = Request::new(body);
        *req.uri_mut() = self.uri()?;
        *req.method_mut() = self.method;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        Some(req)
    }

    /// Path and query as sent (`/` when the client's target had neither).
    pub(crate) fn target(&self) -> &str {
        self.path.as_ref().map_or("/", |p| p.as_str())
    }

    fn uri(&self) -> Option<http::Uri> {
        // h1: the origin-form target as the backend will see it (the connection names the
        // backend, Host is kept). h2c: the URI's authority is sent as `:authority`, so it is
        // the client's host (already validated).
        let target = self.target();
        match (&self.authority, &self.path) {
            (None, Some(origin)) if target.starts_with('/') => {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(origin.clone());
                http::Uri::from_parts(parts).ok()
            }
            (Some(a), _) => format!("http://{a}{target}").parse().ok(),
            // A query with an empty path (`http://a?q`) still needs the `/`.
            (None, _) if target.starts_with('?') => format!("/{target}").parse().ok(),
            (None, _) => target.parse().ok(),
        }
    }

    /// The value of cookie `name` in the request, for sticky backends.
    pub(crate) fn cookie(&self, name: &str) -> Option<String> {
        cookie(&self.headers, name)
    }
}

/// Splits `req` into the upstream head (see [`head`]), its body and its upgrade (kept only
/// when `options` allows the protocol and the backend speaks HTTP/1.1).
pub(crate) fn build(mut req: Request<Incoming>, hop: &Hop<'_>, options: &RouteOptions) -> Upstream {
    let offered = upgrade_of(&req);
    let (upgrade, refused_upgrade) = match offered {
        None => (None, None),
        Some(v) => match allowed_upgrade(&v, options) {
            Some(kept) => (Some(kept), None),
            None => (None, Some(v)),
        },
    };
    let client_upgrade = upgrade
        .as_ref()
        .map(|v| (hyper::upgrade::on(&mut req), v.clone()));
    let (parts, body) = req.into_parts();
    Upstream {
        head: head(parts, hop, options.backend_protocol, upgrade),
        body,
        client_upgrade,
        refused_upgrade,
    }
}

/// The upstream head for a client request seen as `hop`.
pub(crate) fn head(
    parts: Parts,
    hop: &Hop<'_>,
    protocol: BackendProtocol,
    upgrade: Option<HeaderValue>,
) -> UpstreamHead {
    let mut headers = parts.headers;
    // Room for the headers set below at once, not one growth (and rehash) per insert.
    headers.reserve(8);
    strip_hop_by_hop(&mut headers);
    strip_client_address(&mut headers);
    if let Some(up) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, up.clone());
    }
    set_forwarded(&mut headers, hop);
    hop.via.append_via(&mut headers, parts.version);
    // Exactly one Host, the validated one, whatever the client sent or `Connection` named:
    // `insert` replaces every value the client gave (in the first one's place); h2c sends
    // `:authority` instead.
    let (version, authority) = match protocol {
        BackendProtocol::Http1 => {
            headers.insert(header::HOST, hop.names.host_value.clone());
            (Version::HTTP_11, None)
        }
        BackendProtocol::H2c => {
            headers.remove(header::HOST);
            (Version::HTTP_2, Some(hop.names.authority.clone()))
        }
    };
    UpstreamHead {
        method: parts.method,
        headers,
        version,
        authority,
        path: parts.uri.into_parts().path_and_query,
    }
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), besides the names
/// `Connection` lists.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
/// Bits of [`HOP_BY_HOP`] entries, as [`hop_by_hop_bit`] gives them.
const CONNECTION_BIT: u16 = 1;
const TE_BIT: u16 = 1 << 5;

/// The bit of a hop-by-hop name (lowercase, as a `HeaderName` is), `0` for any other name.
/// Matched on the text: a name's own comparison costs more, and removing every listed name by
/// look-up cost more than the rest of building the upstream head.
fn hop_by_hop_bit(name: &str) -> u16 {
    match name {
        "connection" => CONNECTION_BIT,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "proxy-authenticate" => 1 << 3,
        "proxy-authorization" => 1 << 4,
        "te" => TE_BIT,
        "trailer" => 1 << 6,
        "transfer-encoding" => 1 << 7,
        "upgrade" => 1 << 8,
        _ => 0,
    }
}

/// Removes the hop-by-hop headers and those `Connection` names; keeps `TE: trailers`. One
/// pass over the message's own names finds which are present (as bits, nothing allocated);
/// only those are removed.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let present = h
        .keys()
        .fold(0u16, |bits, n| bits | hop_by_hop_bit(n.as_str()));
    if present == 0 {
        return;
    }
    // Tokens naming hop-by-hop headers (`keep-alive` mostly) are removed below anyway, so
    // only other names are parsed.
    let named: Vec<HeaderName> = if present & CONNECTION_BIT != 0 {
        h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !HOP_BY_HOP
                        .iter()
                        .any(|n| n.as_str().eq_ignore_ascii_case(t))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let te_trailers = present & TE_BIT != 0
        && h.get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for n in named {
        // The framing and the host are never the client's to drop; the headers the gateway
        // sets itself are set after this.
        if n != header::HOST && n != header::CONTENT_LENGTH {
            h.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if te_trailers {
        // gRPC needs `te: trailers` end to end; it is the one TE value h2 allows.
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (`Connection: upgrade`).
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    wants.then(|| req.headers().get(header::UPGRADE).cloned())?
}

/// The protocols of an `Upgrade` offer the route allows (in the client's order), or `None`
/// when it allows none of them or the backend speaks h2c (no upgrades there).
fn allowed_upgrade(offer: &HeaderValue, options: &RouteOptions) -> Option<HeaderValue> {
    if options.backend_protocol != BackendProtocol::Http1 {
        return None;
    }
    let kept: Vec<&str> = offer
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|p| options.allows_upgrade(p))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Whether a backend's `101` switched to one of the protocols `offered` (names compared
/// without case; a backend may leave the version out).
pub(crate) fn upgrade_accepted(offered: &HeaderValue, answered: Option<&HeaderValue>) -> bool {
    let name = |p: &str| {
        p.trim()
            .split('/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let Some(answer) = answered.and_then(|v| v.to_str().ok()).map(name) else {
        return false;
    };
    offered
        .to_str()
        .is_ok_and(|o| !answer.is_empty() && o.split(',').any(|p| name(p) == answer))
}

/// Why a request's host cannot be trusted (each answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostError {
    /// Neither `Host` nor an authority in the target.
    Missing,
    /// More than one `Host` field (RFC 9112 §3.2).
    Duplicate,
    /// `Host` names another host than the absolute-form target (RFC 9112 §3.2.2) or
    /// `:authority` (RFC 9113 §8.3.1).
    Mismatch,
}

impl HostError {
    /// The error kind counted in `meshgate_errors_total`.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            HostError::Missing => "no_host",
            HostError::Duplicate => "duplicate_host",
            HostError::Mismatch => "host_mismatch",
        }
    }
}

/// The host a request is for: the target's authority (absolute-form, or h2 `:authority`) or
/// the one `Host`; both present must name the same host (and port, when both give one).
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<&str, HostError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Duplicate);
    }
    let host = match host {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| HostError::Mismatch)?),
    };
    match (req.uri().authority(), host) {
        (Some(a), Some(h)) if !same_host(a.as_str(), h) => Err(HostError::Mismatch),
        (Some(a), _) => Ok(a.as_str()),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(HostError::Missing),
    }
}

/// Same host name (any case, trailing dot or not) and, if both give one, the same port.
fn same_host(a: &str, b: &str) -> bool {
    fn port(h: &str) -> Option<&str> {
        let after = h.rsplit_once(']').map_or(h, |(_, rest)| rest);
        after.rsplit_once(':').map(|(_, p)| p)
    }
    normalize_host(a) == normalize_host(b)
        && match (port(a), port(b)) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// A DNS name (any case, optional trailing dot) or an IP literal (`[v6]` for IPv6), with an
/// optional `:port`.
pub(crate) fn is_valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    let name_ok = name.is_none_or(|n| {
        n.parse::<std::net::Ipv4Addr>().is_ok() || meshgate_config::host::HostName::parse(n).is_ok()
    });
    port_ok && name_ok
}

/// Client-address headers that applications or frameworks trust, which only this edge may
/// set: removed from the client's request (`X-Real-IP` is then set, like `X-Forwarded-*`).
const CLIENT_ADDRESS: [&str; 15] = [
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-forwarded",
    "forwarded-for",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-original-forwarded-for",
    "x-url-scheme",
    "front-end-https",
];

/// Headers set by this edge: a client's copy is never forwarded.
const SET_HERE: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
];

/// Removes the client-address headers, also when spelt with `_` for `-`: CGI-style servers
/// (PHP, WSGI, Rack) map both to the same `HTTP_X_REAL_IP` variable. One pass over the
/// request's own headers; nothing is allocated unless one is found.
fn strip_client_address(h: &mut HeaderMap) {
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|n| is_client_address(n.as_str()))
        .cloned()
        .collect();
    for n in found {
        h.remove(n);
    }
}

/// Whether a (lowercase) header name is a client-address header, or the `_` spelling of one
/// of them, of a header set here, or of `Host`.
fn is_client_address(name: &str) -> bool {
    let spells = |listed: &str| {
        listed.len() == name.len()
            && listed
                .bytes()
                .zip(name.bytes())
                .all(|(l, c)| l == c || (l == b'-' && c == b'_'))
    };
    CLIENT_ADDRESS.iter().any(|l| spells(l))
        || (name.contains('_') && (SET_HERE.iter().any(|l| spells(l)) || spells("host")))
}

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn set_forwarded(h: &mut HeaderMap, hop: &Hop<'_>) {
    // We are the edge: client-supplied forwarding headers are replaced, not trusted. Every
    // value was made once for the connection (and host); a request only shares them.
    h.insert(X_REAL_IP.clone(), hop.client.value.clone());
    h.insert(X_FORWARDED_FOR.clone(), hop.client.value.clone());
    let proto_value = match hop.proto {
        "https" => Ok(HeaderValue::from_static("https")),
        "http" => Ok(HeaderValue::from_static("http")),
        other => HeaderValue::from_str(other),
    };
    if let Ok(v) = proto_value {
        h.insert(X_FORWARDED_PROTO.clone(), v);
    }
    h.insert(X_FORWARDED_HOST.clone(), hop.names.forwarded_host.clone());
    h.insert(header::FORWARDED, hop.names.forwarded.clone());
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_bits_name_their_table_entries() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(n.as_str()), 1 << i, "{n}");
        }
        assert_eq!(hop_by_hop_bit("x-kept"), 0);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Keep-Alive, X-Secret, content-length"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, gzip"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("content-length", HeaderValue::from_static("0"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        for gone in [
            "x-secret",
            "keep-alive",
            "connection",
            "proxy-authorization",
            "upgrade",
        ] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(h.get("content-length").unwrap(), "0");
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn hosts_must_be_names_or_ip_literals() {
        for good in [
            "a.example.org",
            "A.Example.org.",
            "a.example.org:8443",
            "localhost",
            "192.0.2.1",
            "192.0.2.1:80",
            "[2001:db8::1]",
            "[2001:db8::1]:443",
        ] {
            assert!(is_valid_host(good), "{good}");
        }
        for bad in [
            "a\";for=\"1.example.org",
            "a example.org",
            "a.example.org:",
            "a.example.org:99999",
            "a.example.org:8x",
            "a..example.org",
            "user@a.example.org",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "[not-v6]:443",
            "2001:db8::1",
            "",
        ] {
            assert!(!is_valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn forwarded_headers_replace_client_supplied() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let client = ClientIp::of("[::ffff:192.0.2.1]:5000".parse().unwrap());
        let names = HostNames::new("a.example", "a.example".into(), &client, "https").unwrap();
        let via = Identity::fixed("meshgate-test");
        let hop = Hop {
            client: &client,
            proto: "https",
            names: &names,
            via: &via,
        };
        set_forwarded(&mut h, &hop);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.1;proto=https;host=\"a.example\""
        );
    }

    /// The upstream head of `req` from a fixed client, for `authority` (normalized: `host`).
    fn head_of(
        req: Request<()>,
        proto: &str,
        authority: &str,
        protocol: BackendProtocol,
        upgrade: Option<HeaderValue>,
    ) -> UpstreamHead {
        let via = Identity::fixed("meshgate-test");
        let client = ClientIp::of("192.0.2.9:4000".parse().unwrap());
        let names = HostNames::new(authority, normalize_host(authority), &client, proto).unwrap();
        let hop = Hop {
            client: &client,
            proto,
            names: &names,
            via: &via,
        };
        head(req.into_parts().0, &hop, protocol, upgrade)
    }

    #[test]
    fn h1_head_sends_the_validated_host_and_names_the_backend() {
        let req = Request::get("/p?q=1")
            .header("host", "App.example.org")
            .header("connection", "close")
            .header("x-forwarded-host", "evil")
            .body(())
            .unwrap();
        let head = head_of(
            req,
            "https",
            "app.example.org:8443",
            BackendProtocol::Http1,
            None,
        );
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.authority, None);
        assert_eq!(head.target(), "/p?q=1");
        assert_eq!(head.headers.get("host").unwrap(), "app.example.org:8443");
        assert!(head.headers.get("connection").is_none());
        assert_eq!(
            head.headers.get("x-forwarded-host").unwrap(),
            "app.example.org"
        );
        assert_eq!(head.headers.get("via").unwrap(), "1.1 meshgate-test");
        let out = head.to(crate::http::body::empty()).unwrap();
        assert_eq!(out.uri(), "/p?q=1");
    }

    #[test]
    fn one_host_and_no_client_address_headers_reach_the_backend() {
        let mut req = Request::get("http://b.test/")
            .header("host", "evil.example")
            .header("host", "b.test")
            .header(
                "connection",
                "host, content-length, x-real-ip, x-forwarded-for",
            )
            .header("content-length", "0")
            .header("x-real-ip", "6.6.6.6")
            .header("true-client-ip", "6.6.6.6")
            .header("x-forwarded-port", "1")
            .header("x-client-ip", "6.6.6.6")
            .header("cf-connecting-ip", "6.6.6.6")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "gopher")
            .header("forwarded", "for=6.6.6.6")
            .body(())
            .unwrap();
        // Underscored spellings, which CGI-style servers read as the dashed ones.
        for n in ["x_real_ip", "x_forwarded_for", "true_client_ip", "host_"] {
            req.headers_mut().insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("6.6.6.6"),
            );
        }
        let head = head_of(req, "https", "b.test", BackendProtocol::Http1, None);
        let h = &head.headers;
        assert_eq!(h.get_all("host").iter().collect::<Vec<_>>(), ["b.test"]);
        assert_eq!(h.get("content-length").unwrap(), "0");
        assert_eq!(h.get("x-real-ip").unwrap(), "192.0.2.9");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.9;proto=https;host=\"b.test\""
        );
        for gone in [
            "true-client-ip",
            "x-forwarded-port",
            "x-client-ip",
            "cf-connecting-ip",
            "x_real_ip",
            "x_forwarded_for",
            "true_client_ip",
        ] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
        assert!(
            h.get("host_").is_some(),
            "only exact look-alikes are removed"
        );
    }

    #[test]
    fn host_must_agree_with_the_target_and_be_single() {
        let req = |uri: &str, hosts: &[&str], version: Version| {
            let mut b = Request::get(uri).version(version);
            for h in hosts {
                b = b.header("host", *h);
            }
            b.body(()).unwrap()
        };
        let h1 = Version::HTTP_11;
        let h2 = Version::HTTP_2;
        assert_eq!(request_host(&req("/", &["a.test"], h1)), Ok("a.test"));
        assert_eq!(
            request_host(&req("http://b.test/", &["B.test.:80"], h1)),
            Ok("b.test")
        );
        assert_eq!(
            request_host(&req("https://b.test:8443/", &[], h2)),
            Ok("b.test:8443")
        );
        assert_eq!(
            request_host(&req("https://b.test/", &["b.test:8443"], h2)),
            Ok("b.test")
        );
        assert_eq!(
            request_host(&req("http://b.test/", &["evil.example\"><x"], h1)),
            Err(HostError::Mismatch)
        );
        assert_eq!(
            request_host(&req("https://b.test/", &["evil.example"], h2)),
            Err(HostError::Mismatch)
        );
        assert_eq!(
            request_host(&req("https://b.test:443/", &["b.test:8443"], h2)),
            Err(HostError::Mismatch)
        );
        assert_eq!(
            request_host(&req("/", &["a.test", "a.test"], h1)),
            Err(HostError::Duplicate)
        );
        assert_eq!(request_host(&req("/", &[], h1)), Err(HostError::Missing));
    }

    #[test]
    fn only_allowed_upgrades_are_offered_never_h2c() {
        let options = RouteOptions::default();
        let offer = |v: &'static str| allowed_upgrade(&HeaderValue::from_static(v), &options);
        assert_eq!(offer("websocket").unwrap(), "websocket");
        assert_eq!(offer("WebSocket/13, h2c").unwrap(), "WebSocket/13");
        assert!(offer("h2c").is_none());
        assert!(offer("tls/1.2").is_none());
        let custom = RouteOptions {
            upgrades: vec!["h2c".into(), "foo".into()],
            ..RouteOptions::default()
        };
        assert!(allowed_upgrade(&HeaderValue::from_static("h2c"), &custom).is_none());
        assert_eq!(
            allowed_upgrade(&HeaderValue::from_static("foo"), &custom).unwrap(),
            "foo"
        );
        let h2c_backend = RouteOptions {
            backend_protocol: BackendProtocol::H2c,
            ..RouteOptions::default()
        };
        assert!(allowed_upgrade(&HeaderValue::from_static("websocket"), &h2c_backend).is_none());
        let ws = HeaderValue::from_static("websocket");
        assert!(upgrade_accepted(
            &ws,
            Some(&HeaderValue::from_static("WebSocket"))
        ));
        assert!(!upgrade_accepted(
            &ws,
            Some(&HeaderValue::from_static("h2c"))
        ));
        assert!(!upgrade_accepted(&ws, None));
    }

    #[test]
    fn h2c_head_sends_the_client_host_as_authority() {
        let req = Request::get("https://app.example.org/x")
            .version(Version::HTTP_2)
            .header("host", "app.example.org")
            .body(())
            .unwrap();
        let head = head_of(req, "https", "app.example.org", BackendProtocol::H2c, None);
        assert_eq!(head.version, Version::HTTP_2);
        assert_eq!(head.authority.as_deref(), Some("app.example.org"));
        assert!(head.headers.get("host").is_none());
        assert_eq!(head.headers.get("via").unwrap(), "2 meshgate-test");
        let out = head.to(crate::http::body::empty()).unwrap();
        assert_eq!(out.uri(), "http://app.example.org/x");
    }

    #[test]
    fn upgrade_offer_survives_hop_by_hop_removal() {
        let req = Request::get("/ws")
            .header("host", "a.example")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let up = upgrade_of(&req);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        let head = head_of(req, "http", "a.example", BackendProtocol::Http1, up);
        assert_eq!(head.headers.get("connection").unwrap(), "upgrade");
        assert_eq!(head.headers.get("upgrade").unwrap(), "websocket");
    }

    #[test]
    fn sticky_cookie_is_found_among_others() {
        let req = Request::get("/")
            .header("cookie", "a=1; mg=backend-2; b=3")
            .body(())
            .unwrap();
        let head = head_of(req, "https", "a.example", BackendProtocol::Http1, None);
        assert_eq!(head.cookie("mg").as_deref(), Some("backend-2"));
        assert_eq!(head.cookie("zz"), None);
    }
}
