//! What the proxy works out once per client connection instead of once per request: the
//! client's address as the forwarding headers carry it, and the last request host validated
//! and normalized on the connection (a connection's requests nearly always name one host).

use http::header::HeaderValue;
use std::net::SocketAddr;
use std::sync::Mutex;

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

/// The last host a connection's request named that passed validation, as written and
/// normalized. Both are pure functions of the text, so a request naming the same host again
/// skips them. One entry: a connection that alternates hosts only recomputes.
#[derive(Default)]
pub(crate) struct HostMemo {
    last: Mutex<Option<(String, String)>>,
}

impl HostMemo {
    /// The normalized host for `authority` if it is the one validated last.
    pub(crate) fn get(&self, authority: &str) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((a, normalized)) if a == authority => Some(normalized.clone()),
            _ => None,
        }
    }

    /// Remembers that `authority` is valid and normalizes to `normalized`.
    pub(crate) fn set(&self, authority: &str, normalized: &str) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((authority.to_owned(), normalized.to_owned()));
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
        assert_eq!(memo.get("A.example:443"), None);
        memo.set("A.example:443", "a.example");
        assert_eq!(memo.get("A.example:443").as_deref(), Some("a.example"));
        assert_eq!(memo.get("a.example:443"), None);
    }
}
