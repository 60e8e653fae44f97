//! What the proxy works out once per client connection instead of once per request: the
//! client's address as the forwarding headers carry it, and for the last request host
//! validated on the connection (a connection's requests nearly always name one host) its
//! normalized name and the header values made from it.

use http::header::HeaderValue;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// A client's address as the forwarding headers carry it (IPv4-mapped addresses as IPv4).
#[derive(Debug, Clone)]
pub(crate) struct ClientIp {
    /// `X-Forwarded-For` and `X-Real-IP`; a clone shares the bytes.
    pub(crate) value: HeaderValue,
    pub(crate) v6: bool,
}

impl ClientIp {
    pub(crate) fn of(client: SocketAddr) -> ClientIp {
        let ip = client.ip().to_canonical();
        ClientIp {
            // An IP address's text is always a valid header value.
            value: HeaderValue::from_str(&ip.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            v6: ip.is_ipv6(),
        }
    }
}

/// A validated request host and what the upstream head carries for it from this client.
/// All of it is a pure function of the host text, the client address and the scheme, which
/// are fixed for a connection: made once, each request clones the values (no copy).
#[derive(Debug)]
pub(crate) struct HostNames {
    /// The host as the client wrote it, port included (the memo's key; h2c `:authority`).
    pub(crate) authority: String,
    /// Lowercase, no port or trailing dot: the route table's key.
    pub(crate) host: String,
    /// The upstream `Host` (HTTP/1.1 backends): `authority`.
    pub(crate) host_value: HeaderValue,
    /// `X-Forwarded-Host`: `host`.
    pub(crate) forwarded_host: HeaderValue,
    /// `Forwarded: for=<client>;proto=<scheme>;host="<host>"` (RFC 7239).
    pub(crate) forwarded: HeaderValue,
}

impl HostNames {
    /// The names for `authority` (already validated: a DNS name or IP literal with an
    /// optional port, so every value is a valid header value) normalized to `host`, asked
    /// for by `client` over `proto` (`https` or `http`). `None` only if a value is not a
    /// valid header value after all.
    pub(crate) fn new(
        authority: &str,
        host: String,
        client: &ClientIp,
        proto: &str,
    ) -> Option<HostNames> {
        let ip_text = client.value.to_str().ok()?;
        let mut forwarded = String::with_capacity(32 + ip_text.len() + proto.len() + host.len());
        forwarded.push_str("for=");
        if client.v6 {
            forwarded.push_str("\"[");
            forwarded.push_str(ip_text);
            forwarded.push_str("]\"");
        } else {
            forwarded.push_str(ip_text);
        }
        forwarded.push_str(";proto=");
        forwarded.push_str(proto);
        forwarded.push_str(";host=\"");
        forwarded.push_str(&host);
        forwarded.push('"');
        Some(HostNames {
            authority: authority.to_owned(),
            host_value: HeaderValue::from_str(authority).ok()?,
            forwarded_host: HeaderValue::from_str(&host).ok()?,
            forwarded: HeaderValue::from_str(&forwarded).ok()?,
            host,
        })
    }
}

/// The last host a connection's request named that passed validation, with its
/// [`HostNames`]. A request naming the same host again skips validation, normalization and
/// building the values. One entry: a connection that alternates hosts only recomputes.
#[derive(Default)]
pub(crate) struct HostMemo {
    last: Mutex<Option<Arc<HostNames>>>,
}

impl HostMemo {
    /// The names for `authority` if it is the host validated last.
    pub(crate) fn get(&self, authority: &str) -> Option<Arc<HostNames>> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|n| n.authority == authority).cloned()
    }

    /// Remembers `names` (of a host that passed validation).
    pub(crate) fn set(&self, names: &Arc<HostNames>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some(names.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_is_canonical_and_memo_answers_only_the_same_text() {
        let ip = ClientIp::of("[::ffff:192.0.2.1]:5000".parse().unwrap());
        assert_eq!(ip.value, "192.0.2.1");
        assert!(!ip.v6);
        assert!(ClientIp::of("[2001:db8::1]:1".parse().unwrap()).v6);
        let memo = HostMemo::default();
        assert!(memo.get("A.example:443").is_none());
        let names = HostNames::new("A.example:443", "a.example".into(), &ip, "https").unwrap();
        memo.set(&Arc::new(names));
        let got = memo.get("A.example:443").unwrap();
        assert_eq!(got.host, "a.example");
        assert_eq!(got.host_value, "A.example:443");
        assert!(memo.get("a.example:443").is_none());
    }

    #[test]
    fn forwarded_names_the_client_scheme_and_host() {
        let v4 = ClientIp::of("192.0.2.1:5000".parse().unwrap());
        let n = HostNames::new("a.example", "a.example".into(), &v4, "https").unwrap();
        assert_eq!(n.forwarded, "for=192.0.2.1;proto=https;host=\"a.example\"");
        assert_eq!(n.forwarded_host, "a.example");
        let v6 = ClientIp::of("[2001:db8::1]:1".parse().unwrap());
        let n = HostNames::new("B.example.:80", "b.example".into(), &v6, "http").unwrap();
        assert_eq!(
            n.forwarded,
            "for=\"[2001:db8::1]\";proto=http;host=\"b.example\""
        );
        assert_eq!(n.host_value, "B.example.:80");
    }
}
