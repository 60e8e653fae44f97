//! Classification on :443: read the ClientHello without consuming it ([`hello`], [`read`]),
//! then decide from it and the route table alone what the connection becomes ([`decide`]):
//! a passthrough stream, a terminated TLS session, an ACME TLS-ALPN-01 answer, or an alert.

pub(crate) mod hello;
pub(crate) mod read;

use crate::routes::{RouteEntry, RouteTable};
use hello::ClientHello;
use meshgate_config::route::Mode;
use std::sync::Arc;

/// What a client connection on :443 becomes.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Splice the raw stream to the route's backend.
    Passthrough(Arc<RouteEntry>),
    /// Terminate TLS here and serve HTTP.
    Terminate(Arc<RouteEntry>),
    /// An ACME server validating `name` by TLS-ALPN-01.
    AcmeTlsAlpn(String),
    /// Refuse with a TLS alert.
    Reject(Rejection),
}

/// Why a connection is refused, and the alert that tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// No server name: routing needs one.
    NoSni,
    /// No route serves the name.
    UnknownSni,
}

impl Rejection {
    /// The TLS alert sent before closing.
    pub(crate) fn alert(self) -> u8 {
        hello::ALERT_UNRECOGNIZED_NAME
    }

    /// The error kind counted in `meshgate_errors_total`.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Rejection::NoSni => "no_sni",
            Rejection::UnknownSni => "unknown_sni",
        }
    }
}

/// The pure decision for a parsed ClientHello.
pub(crate) fn decide(hello: &ClientHello, routes: &RouteTable) -> Decision {
    let Some(sni) = &hello.sni else {
        return Decision::Reject(Rejection::NoSni);
    };
    if hello.alpn.iter().any(|p| p == b"acme-tls/1") {
        return Decision::AcmeTlsAlpn(sni.clone());
    }
    match routes.lookup(sni) {
        None => Decision::Reject(Rejection::UnknownSni),
        Some(entry) => match entry.route.mode {
            Mode::Passthrough => Decision::Passthrough(entry),
            Mode::Terminate => Decision::Terminate(entry),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_config::pool::PoolConfig;
    use meshgate_config::route::{Backend, Route, RouteOptions};

    fn route(host: &str, mode: Mode) -> Route {
        Route {
            host: host.parse().unwrap(),
            backends: vec![Backend {
                addr: ([10, 0, 0, 1], 80).into(),
                weight: 1,
            }],
            mode,
            options: RouteOptions::default(),
            pool: PoolConfig::default(),
        }
    }

    fn hello(sni: Option<&str>, alpn: &[&[u8]]) -> ClientHello {
        ClientHello {
            sni: sni.map(str::to_string),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }
    }

    fn table() -> RouteTable {
        RouteTable::build(
            &[
                route("web.example.org", Mode::Terminate),
                route("db.example.org", Mode::Passthrough),
                route("*.apps.example.org", Mode::Terminate),
            ],
            &[],
        )
    }

    #[tokio::test]
    async fn each_hello_gets_its_decision() {
        let t = table();
        let host = |d: Decision| match d {
            Decision::Terminate(e) => format!("terminate {}", e.route.host),
            Decision::Passthrough(e) => format!("passthrough {}", e.route.host),
            Decision::AcmeTlsAlpn(n) => format!("acme {n}"),
            Decision::Reject(r) => format!("reject {}", r.kind()),
        };
        let h2: &[&[u8]] = &[b"h2", b"http/1.1"];
        assert_eq!(
            host(decide(&hello(Some("web.example.org"), h2), &t)),
            "terminate web.example.org"
        );
        assert_eq!(
            host(decide(&hello(Some("db.example.org"), &[]), &t)),
            "passthrough db.example.org"
        );
        assert_eq!(
            host(decide(&hello(Some("x.apps.example.org"), h2), &t)),
            "terminate *.apps.example.org"
        );
        // A validation connection is answered whatever the route table says.
        assert_eq!(
            host(decide(
                &hello(Some("new.example.net"), &[b"acme-tls/1"]),
                &t
            )),
            "acme new.example.net"
        );
        assert_eq!(
            host(decide(&hello(Some("other.example.net"), h2), &t)),
            "reject unknown_sni"
        );
        assert_eq!(host(decide(&hello(None, h2), &t)), "reject no_sni");
        // Both refusals say "unrecognized name".
        assert_eq!(Rejection::NoSni.alert(), hello::ALERT_UNRECOGNIZED_NAME);
        assert_eq!(
            Rejection::UnknownSni.alert(),
            hello::ALERT_UNRECOGNIZED_NAME
        );
    }
}
