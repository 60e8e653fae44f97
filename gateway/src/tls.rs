//! Certificates on :443: a per-SNI resolver whose entries are swapped live, loading PEM files,
//! and a local development CA for the demo and tests.

use anyhow::{Context, Result};
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
    fallback: RwLock<Option<Fallback>>,
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
    pub fn set_fallback(&self, fallback: Fallback) {
        if let Ok(mut g) = self.fallback.write() {
            *g = Some(fallback);
        }
    }

    pub fn replace(&self, certs: CertMap) {
        if let Ok(mut g) = self.certs.write() {
            *g = Arc::new(certs);
        }
    }

    /// Adds or replaces one name (used by the certificate manager on issuance and renewal).
    pub fn insert(&self, name: String, cert: Arc<CertifiedKey>) {
        if let Ok(mut g) = self.certs.write() {
            let mut map = (**g).clone();
            map.insert(name, cert);
            *g = Arc::new(map);
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.certs.read().ok()?.clone();
        if let Some(c) = map.get(name) {
            return Some(c.clone());
        }
        let wildcard = name
            .split_once('.')
            .and_then(|(_, parent)| map.get(&format!("*.{parent}")).cloned());
        if wildcard.is_some() {
            return wildcard;
        }
        let fallback = self.fallback.read().ok()?.clone()?;
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

/// A local certificate authority for the demo and tests (never for production names).
pub struct DevCa {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl DevCa {
    /// Loads `dir/ca.pem` + `dir/ca.key`, creating them (key mode 0600) when missing.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() || !key_path.exists() {
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "meshgate development CA");
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key)?;
            write_secret(&key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, cert.pem())?;
        }
        let key_pem = std::fs::read_to_string(&key_path)?;
        let key = rcgen::KeyPair::from_pem(&key_pem)?;
        let cert_pem = std::fs::read_to_string(&cert_path)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{}: not a CA certificate", cert_path.display()))?;
        Ok(DevCa {
            dir: dir.to_path_buf(),
            issuer,
        })
    }

    /// The CA certificate file clients pass to `--cacert`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a fresh leaf for `names` (first is the CN), valid for a year.
    pub fn issue(&self, names: &[String]) -> Result<Arc<CertifiedKey>> {
        let (chain, key) = self.issue_der(names)?;
        Ok(certified_key(chain, key)?.1)
    }

    /// Like `issue`, returning DER for servers that are not the gateway (test backends).
    pub fn issue_der(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        if let Some(cn) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn.as_str());
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("key encoding: {e}"))?;
        Ok((vec![cert.der().clone()], key_der))
    }
}

/// Writes a secret file with mode 0600 from the start.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

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
