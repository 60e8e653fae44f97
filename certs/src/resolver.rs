//! The rustls certificate resolver the gateway's TLS listener uses. Entries are swapped live:
//! each handshake looks up the current certificate, connections already established keep theirs.

use crate::challenge::{ChallengeResponder, offers_acme_tls};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Resolves by SNI: the exact name, then the `*.parent` wildcard. A ClientHello offering
/// `acme-tls/1` gets the pending TLS-ALPN-01 challenge certificate instead. No SNI, or an
/// unknown name, aborts the handshake; nothing is ever ordered because of a client's SNI.
#[derive(Debug)]
pub struct CertResolver {
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    challenges: Arc<ChallengeResponder>,
}

impl Default for CertResolver {
    fn default() -> Self {
        Self::new(Arc::new(ChallengeResponder::default()))
    }
}

impl CertResolver {
    pub fn new(challenges: Arc<ChallengeResponder>) -> Self {
        CertResolver {
            certs: RwLock::new(HashMap::new()),
            challenges,
        }
    }

    /// Serves `key` for each of `names` (exact names or `*.domain`), replacing what was there.
    pub fn install(&self, names: &[String], key: Arc<CertifiedKey>) {
        if let Ok(mut m) = self.certs.write() {
            for n in names {
                m.insert(n.to_ascii_lowercase(), key.clone());
            }
        }
    }

    /// Stops serving `names`.
    pub fn remove(&self, names: &[String]) {
        if let Ok(mut m) = self.certs.write() {
            for n in names {
                m.remove(&n.to_ascii_lowercase());
            }
        }
    }

    /// The certificate a handshake for `sni` would get.
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        let certs = self.certs.read().ok()?;
        exact_or_wildcard(&certs, &sni)
    }
}

/// The certificate for a lowercase `name` in `certs`: the exact name, else the `*.parent`
/// wildcard one label up (a wildcard never covers deeper names, as in RFC 6125).
pub fn exact_or_wildcard(
    certs: &HashMap<String, Arc<CertifiedKey>>,
    name: &str,
) -> Option<Arc<CertifiedKey>> {
    if let Some(k) = certs.get(name) {
        return Some(k.clone());
    }
    let (_, parent) = name.split_once('.')?;
    certs.get(&format!("*.{parent}")).cloned()
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        if offers_acme_tls(&hello) {
            return self.challenges.tls_alpn01_cert(sni);
        }
        self.lookup(sni)
    }
}
