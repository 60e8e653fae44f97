//! The one rustls certificate resolver of the gateway's :443 listener. It holds the
//! gateway's configured certificates (PEM files, dev CA leaves; swapped as a whole map), the
//! certificates the manager issued (installed and removed by name) and the pending
//! TLS-ALPN-01 challenge certificates. Each handshake looks up the current entry; connections
//! already established keep theirs.

use crate::challenge::{ChallengeResponder, offers_acme_tls};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Name → certificate: exact lowercase names and `*.parent` wildcards.
pub type CertMap = HashMap<String, Arc<CertifiedKey>>;

/// Resolves by SNI: the configured certificates first, then the managed ones, each by exact
/// name and then the `*.parent` wildcard. A ClientHello offering `acme-tls/1` gets the pending
/// TLS-ALPN-01 challenge certificate instead. No SNI, or an unknown name, aborts the
/// handshake; nothing is ever ordered because of a client's SNI.
#[derive(Default)]
pub struct CertResolver {
    /// The gateway's own certificates; an `Arc` so a handshake never waits on a reload.
    configured: RwLock<Arc<CertMap>>,
    /// Certificates issued by the manager, under their lowercase names.
    managed: RwLock<CertMap>,
    challenges: Arc<ChallengeResponder>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("configured", &self.names())
            .field("managed", &self.managed_names())
            .finish()
    }
}

impl CertResolver {
    /// The challenge responses the manager publishes (HTTP-01 tokens, TLS-ALPN-01
    /// certificates) and this resolver serves to `acme-tls/1` handshakes.
    pub(crate) fn challenges(&self) -> Arc<ChallengeResponder> {
        self.challenges.clone()
    }

    /// Replaces the configured certificates with `certs` at once.
    pub fn replace(&self, certs: CertMap) {
        if let Ok(mut g) = self.configured.write() {
            *g = Arc::new(certs);
        }
    }

    /// The configured certificates (to reuse them when the next map is built).
    pub fn snapshot(&self) -> Arc<CertMap> {
        self.configured
            .read()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Names of the configured certificates.
    pub fn names(&self) -> Vec<String> {
        self.snapshot().keys().cloned().collect()
    }

    fn managed_names(&self) -> Vec<String> {
        self.managed
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Serves the managed `key` for each of `names` (exact names or `*.domain`), replacing
    /// what was there.
    pub(crate) fn install(&self, names: &[String], key: Arc<CertifiedKey>) {
        if let Ok(mut m) = self.managed.write() {
            for n in names {
                m.insert(n.to_ascii_lowercase(), key.clone());
            }
        }
    }

    /// Stops serving the managed certificates of `names`.
    pub(crate) fn remove(&self, names: &[String]) {
        if let Ok(mut m) = self.managed.write() {
            for n in names {
                m.remove(&n.to_ascii_lowercase());
            }
        }
    }

    /// The certificate a handshake for `sni` would get (any case, trailing dot or not for the
    /// managed names).
    pub fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let name = sni.to_ascii_lowercase();
        if let Some(k) = exact_or_wildcard(&self.snapshot(), &name) {
            return Some(k);
        }
        let managed = self.managed.read().ok()?;
        exact_or_wildcard(&managed, name.trim_end_matches('.'))
    }
}

/// The certificate for a lowercase `name` in `certs`: the exact name, else the `*.parent`
/// wildcard one label up (a wildcard never covers deeper names, as in RFC 6125).
fn exact_or_wildcard(certs: &CertMap, name: &str) -> Option<Arc<CertifiedKey>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devca::DevCa;

    #[test]
    fn dev_ca_issues_and_resolver_prefers_exact_then_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let exact = ca.certified_key(&["a.example".into()]).unwrap();
        let wild = ca.certified_key(&["*.example".into()]).unwrap();
        let r = CertResolver::default();
        let mut m = CertMap::new();
        m.insert("a.example".into(), exact.clone());
        m.insert("*.example".into(), wild.clone());
        r.replace(m);
        assert!(Arc::ptr_eq(&r.lookup("a.example").unwrap(), &exact));
        assert!(Arc::ptr_eq(&r.lookup("b.example").unwrap(), &wild));
        assert!(r.lookup("x.b.example").is_none());
        // Reopening reuses the same CA.
        let again = DevCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.ca_pem(), ca.ca_pem());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            ca.ca_pem()
        );
    }

    #[test]
    fn configured_certificates_win_over_managed_ones_and_are_swapped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::load_or_create(dir.path()).unwrap();
        let key = |n: &str| ca.certified_key(&[n.to_string()]).unwrap();
        let (file, issued, wild) = (key("a.test"), key("a.test"), key("*.test"));
        let r = CertResolver::default();
        r.install(&["A.test".into()], issued.clone());
        r.install(&["*.test".into()], wild.clone());
        assert!(Arc::ptr_eq(&r.lookup("a.test").unwrap(), &issued));
        assert!(
            Arc::ptr_eq(&r.lookup("A.Test.").unwrap(), &issued),
            "case and trailing dot"
        );
        assert!(r.names().is_empty(), "names() lists the configured ones");

        r.replace(CertMap::from([("a.test".to_string(), file.clone())]));
        assert!(Arc::ptr_eq(&r.lookup("a.test").unwrap(), &file));
        assert!(Arc::ptr_eq(&r.lookup("b.test").unwrap(), &wild));
        assert_eq!(r.names(), vec!["a.test".to_string()]);
        assert!(Arc::ptr_eq(r.snapshot().get("a.test").unwrap(), &file));

        r.replace(CertMap::new());
        r.remove(&["*.TEST".into()]);
        assert!(Arc::ptr_eq(&r.lookup("a.test").unwrap(), &issued));
        assert!(r.lookup("b.test").is_none());
    }
}
