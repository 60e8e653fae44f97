//! Phase 2, build the upstream request: hop-by-hop headers removed (RFC 9110 §7.6.1), the
//! forwarding headers replaced by what this edge saw, the upgrade offer kept, and the version
//! and authority the backend protocol needs. [`head`] is pure; [`build`] only splits the
//! client's request around it.

use crate::http::ConnInfo;
use crate::http::body::Body;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Version};
use hyper::body::Incoming;
use meshgate_config::route::BackendProtocol;
use std::net::SocketAddr;

/// The client's request split for forwarding.
pub(crate) struct Upstream {
    pub(crate) head: UpstreamHead,
    pub(crate) body: Incoming,
    /// The client side of an HTTP/1.1 upgrade, when one was asked for.
    pub(crate) client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Everything of the upstream request but its body and its backend.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamHead {
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    pub(crate) version: Version,
    /// h2c: the `:authority` to send (the client's host); h1 names the backend instead.
    pub(crate) authority: Option<String>,
    /// Path and query.
    pub(crate) target: String,
}

impl UpstreamHead {
    /// The request to send to `backend` with `body`; `None` if the target is not a valid URI.
    pub(crate) fn to(&self, backend: SocketAddr, body: Body) -> Option<Request<Body>> {
        // h1: the URI names the backend and Host is kept. h2c: the URI's authority is sent as
        // `:authority`, so it is the client's host (already validated).
        let authority = match &self.authority {
            Some(a) => a.clone(),
            None => backend.to_string(),
        };
        let uri = format!("http://{authority}{}", self.target)
            .parse::<http::Uri>()
            .ok()?;
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }

    /// The value of cookie `name` in the request, for sticky backends.
    pub(crate) fn cookie(&self, name: &str) -> Option<String> {
        cookie(&self.headers, name)
    }
}

/// Splits `req` into the upstream head (see [`head`]), its body and its upgrade.
pub(crate) fn build(
    mut req: Request<Incoming>,
    conn: &ConnInfo,
    host: &str,
    protocol: BackendProtocol,
) -> Upstream {
    let upgrade = upgrade_of(&req);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    Upstream {
        head: head(parts, conn.client, conn.proto, host, protocol, upgrade),
        body,
        client_upgrade,
    }
}

/// The upstream head for a client request from `client` over `proto` (`https`/`http`) for
/// the validated `host`.
pub(crate) fn head(
    parts: Parts,
    client: SocketAddr,
    proto: &str,
    host: &str,
    protocol: BackendProtocol,
    upgrade: Option<HeaderValue>,
) -> UpstreamHead {
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if let Some(up) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, up.clone());
    }
    if !headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    set_forwarded(&mut headers, client, proto, host);
    let (version, authority) = match protocol {
        BackendProtocol::Http1 => (Version::HTTP_11, None),
        BackendProtocol::H2c => {
            // The same precedence as `request_host`: the value that was validated.
            let host_header = headers.remove(header::HOST);
            let authority = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| host_header.and_then(|v| v.to_str().ok().map(str::to_string)))
                .unwrap_or_else(|| host.to_string());
            (Version::HTTP_2, Some(authority))
        }
    };
    UpstreamHead {
        method: parts.method,
        headers,
        version,
        authority,
        target: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
    }
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
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

/// The host a request is for: `:authority` (h2) or `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
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

fn set_forwarded(h: &mut HeaderMap, client: SocketAddr, proto: &str, host: &str) {
    // We are the edge: client-supplied forwarding headers are replaced, not trusted.
    let ip = client.ip().to_canonical();
    let for_value = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let pairs = [
        ("x-forwarded-for", ip.to_string()),
        ("x-forwarded-proto", proto.to_string()),
        ("x-forwarded-host", host.to_string()),
        (
            "forwarded",
            format!("for={for_value};proto={proto};host=\"{host}\""),
        ),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
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
    fn hop_by_hop_and_connection_named_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
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
        set_forwarded(
            &mut h,
            "[::ffff:192.0.2.1]:5000".parse().unwrap(),
            "https",
            "a.example",
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.1;proto=https;host=\"a.example\""
        );
    }

    /// The upstream head of `req` from a fixed client.
    fn head_of(
        req: Request<()>,
        proto: &str,
        host: &str,
        protocol: BackendProtocol,
        upgrade: Option<HeaderValue>,
    ) -> UpstreamHead {
        let client = "192.0.2.9:4000".parse().unwrap();
        head(req.into_parts().0, client, proto, host, protocol, upgrade)
    }

    #[test]
    fn h1_head_keeps_host_and_names_the_backend() {
        let req = Request::get("/p?q=1")
            .header("host", "App.example.org")
            .header("connection", "close")
            .header("x-forwarded-host", "evil")
            .body(())
            .unwrap();
        let head = head_of(
            req,
            "https",
            "app.example.org",
            BackendProtocol::Http1,
            None,
        );
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.authority, None);
        assert_eq!(head.target, "/p?q=1");
        assert_eq!(head.headers.get("host").unwrap(), "App.example.org");
        assert!(head.headers.get("connection").is_none());
        assert_eq!(
            head.headers.get("x-forwarded-host").unwrap(),
            "app.example.org"
        );
        let backend: SocketAddr = "[2001:db8::5]:8080".parse().unwrap();
        let out = head.to(backend, crate::http::body::empty()).unwrap();
        assert_eq!(out.uri(), "http://[2001:db8::5]:8080/p?q=1");
    }

    #[test]
    fn h2c_head_sends_the_client_host_as_authority() {
        let req = Request::get("https://app.example.org/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let head = head_of(req, "https", "app.example.org", BackendProtocol::H2c, None);
        assert_eq!(head.version, Version::HTTP_2);
        assert_eq!(head.authority.as_deref(), Some("app.example.org"));
        assert!(head.headers.get("host").is_none());
        let out = head
            .to("10.0.0.1:80".parse().unwrap(), crate::http::body::empty())
            .unwrap();
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
