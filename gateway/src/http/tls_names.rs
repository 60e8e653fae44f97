//! The names a terminated TLS connection was set up for: the client's SNI and the
//! certificate the gateway presented. A request on the connection may only be for a host
//! they cover (else 421, RFC 9110 §15.5.20), as browsers reuse a connection only for names
//! its certificate covers.

use crate::routes::normalize_host;
use crate::state::Shared;
use rustls::sign::CertifiedKey;
use std::sync::{Arc, OnceLock};

pub(crate) struct TlsNames {
    /// The SNI, normalized (lowercase, no trailing dot).
    sni: String,
    /// The certificate the handshake got for that SNI.
    cert: Option<Arc<CertifiedKey>>,
    /// The certificate's DNS names, lowercase, read the first time a request's host is not
    /// the SNI.
    names: OnceLock<Vec<String>>,
}

impl TlsNames {
    /// The names of `conn`, a finished handshake whose certificate came from `shared`'s
    /// resolver; `None` without an SNI (such connections are refused before the handshake).
    pub(crate) fn of(shared: &Shared, conn: &rustls::ServerConnection) -> Option<Arc<TlsNames>> {
        let sni = conn.server_name()?;
        Some(Arc::new(TlsNames::new(sni, shared.resolver.lookup(sni))))
    }

    pub(crate) fn new(sni: &str, cert: Option<Arc<CertifiedKey>>) -> TlsNames {
        TlsNames {
            sni: normalize_host(sni),
            cert,
            names: OnceLock::new(),
        }
    }

    /// Whether the connection may carry a request for the normalized `host`: it is the SNI,
    /// or a name of the certificate (exact, or a `*.parent` one label up).
    pub(crate) fn covers(&self, host: &str) -> bool {
        if host == self.sni {
            return true;
        }
        let names = self.names.get_or_init(|| {
            self.cert
                .as_ref()
                .and_then(|c| c.cert.first())
                .map(|leaf| dns_names(leaf.as_ref()))
                .unwrap_or_default()
        });
        names.iter().any(|n| match n.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => n == host,
        })
    }
}

/// The DNS names of a DER certificate's subjectAltName, lowercase.
fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => {
                Some(d.trim_end_matches('.').to_ascii_lowercase())
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_and_certificate_names_are_covered_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ca = meshgate_certs::DevCa::load_or_create(dir.path()).unwrap();
        let cert = ca
            .certified_key(&["a.test".to_string(), "*.apps.test".to_string()])
            .unwrap();
        let names = TlsNames::new("A.test.", Some(cert));
        for ok in ["a.test", "x.apps.test"] {
            assert!(names.covers(ok), "{ok}");
        }
        for no in ["b.test", "apps.test", "y.x.apps.test", ".apps.test"] {
            assert!(!names.covers(no), "{no}");
        }
        let bare = TlsNames::new("a.test", None);
        assert!(bare.covers("a.test"));
        assert!(!bare.covers("b.test"));
    }
}
