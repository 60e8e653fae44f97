//! TLS on :443: the terminating server configuration, a per-SNI resolver whose entries are
//! swapped live, loading PEM files, and a local development CA for the demo and tests.

use anyhow::{Context, Result};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Name → certificate map: exact names first, then `*.parent` wildcards.
pub type CertMap = HashMap<String, Arc<CertifiedKey>>;

/// Another certificate source asked when a name is not in the map (the ACME manager).
pub type Fallback = Arc<dyn Fn(&str) -> Option<Arc<CertifiedKey>> + Send + Sync>;

/// The resolver rustls asks for each handshake. `replace` swaps the whole map atomically;
/// sessions already established keep the certificate they were given.
#[derive(Default)]
pub struct CertResolver {
    certs: RwLock<Arc<CertMap>>,
    fallback: Option<Fallback>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver")
            .field("names", &self.names())
            .finish()
    }
}

impl CertResolver {
    /// Names missing from the map are looked up in `fallback` (files and dev CA win).
    pub fn new(fallback: Option<Fallback>) -> Self {
        CertResolver {
            certs: RwLock::default(),
            fallback,
        }
    }

    pub fn replace(&self, certs: CertMap) {
        if let Ok(mut g) = self.certs.write() {
            *g = Arc::new(certs);
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.certs.read().ok()?.clone();
        if let Some(c) = meshgate_certs::resolver::exact_or_wildcard(&map, name) {
            return Some(c);
        }
        let fallback = self.fallback.as_ref()?;
        fallback(name)
    }

    /// The current map (for reusing certificates across rebuilds).
    pub fn snapshot(&self) -> Arc<CertMap> {
        self.certs.read().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn names(&self) -> Vec<String> {
        self.certs
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.get(&name)
    }
}

/// The server configuration for terminated TLS: certificates from `resolver`, ALPN h2 then
/// http/1.1, safe default versions.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless session tickets (keys rotated every 6 h, never written anywhere): returning
    // clients resume without a certificate signature, as with nginx's and Caddy's defaults.
    // Routing is unaffected: it reads the SNI before the handshake.
    tls.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(tls))
}

/// The server configuration answering an ACME TLS-ALPN-01 validation with `cert`.
pub fn acme_tls_alpn_config(cert: Arc<CertifiedKey>) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Always(cert)));
    config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves one certificate whatever the name (TLS-ALPN-01 challenge connections).
#[derive(Debug)]
pub struct Always(pub Arc<CertifiedKey>);

impl ResolvesServerCert for Always {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Loads a certificate chain and key from PEM files; returns the DNS names it covers.
pub fn load_pem_files(cert: &Path, key: &Path) -> Result<(Vec<String>, Arc<CertifiedKey>)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}: cannot read certificates", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: bad PEM certificate", cert.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: cannot read a PEM private key", key.display()))?;
    certified_key(chain, key_der)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(Vec<String>, Arc<CertifiedKey>)> {
    let leaf = chain.first().context("no certificate in the chain")?;
    let names = dns_names(leaf)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("unsupported private key: {e}"))?;
    Ok((names, Arc::new(CertifiedKey::new(chain, signing))))
}

fn dns_names(cert: &CertificateDer<'_>) -> Result<Vec<String>> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow::anyhow!("cannot parse certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// The local development CA of the certs crate (demo and tests, never production names),
/// with the shapes the gateway and its tests use.
pub struct DevCa(meshgate_certs::DevCa);

impl DevCa {
    /// Loads `dir/ca.pem` + `dir/ca.key`, creating them (key mode 0600) when missing.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(DevCa(meshgate_certs::DevCa::load_or_create(dir)?))
    }

    /// The CA certificate file clients pass to `--cacert`.
    pub fn ca_path(&self) -> PathBuf {
        self.0.ca_pem_path()
    }

    /// Issues a fresh leaf for `names` (first is the CN).
    pub fn issue(&self, names: &[String]) -> Result<Arc<CertifiedKey>> {
        Ok(self.0.certified_key(names)?)
    }

    /// Like `issue`, returning DER for servers that are not the gateway (test backends).
    pub fn issue_der(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let pem = self.0.issue(names, LEAF_LIFETIME)?;
        let chain = CertificateDer::pem_slice_iter(pem.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("dev CA chain")?;
        let key = PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes()).context("dev CA key")?;
        Ok((chain, key))
    }
}

/// Leaves from the dev CA for test backends.
const LEAF_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 86400);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_ca_issues_and_resolver_prefers_exact_then_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::open(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let exact = ca.issue(&["a.example".into()]).unwrap();
        let wild = ca.issue(&["*.example".into()]).unwrap();
        let r = CertResolver::default();
        let mut m = CertMap::new();
        m.insert("a.example".into(), exact.clone());
        m.insert("*.example".into(), wild.clone());
        r.replace(m);
        assert!(Arc::ptr_eq(&r.get("a.example").unwrap(), &exact));
        assert!(Arc::ptr_eq(&r.get("b.example").unwrap(), &wild));
        assert!(r.get("x.b.example").is_none());
        // Reopening reuses the same CA.
        let again = DevCa::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read(again.ca_path()).unwrap(),
            std::fs::read(ca.ca_path()).unwrap()
        );
    }
}
