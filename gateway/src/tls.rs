//! TLS on :443: the terminating server configuration (certificates from the one
//! `meshgate_certs::CertResolver`), the TLS-ALPN-01 answer, and loading PEM files.

use anyhow::{Context, Result};
use meshgate_certs::CertResolver;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

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
