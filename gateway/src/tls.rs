//! TLS on :443: the terminating server configuration (certificates from the one
//! `meshgate_certs::CertResolver`) and the TLS-ALPN-01 answer.

use anyhow::Result;
use meshgate_certs::CertResolver;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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
