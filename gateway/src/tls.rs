//! Certificates on :443 besides `meshgate_certs::CertResolver`: loading PEM files, and a
//! resolver serving one certificate whatever the name.

use anyhow::{Context, Result};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

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
