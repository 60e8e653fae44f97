//! Challenge responses the gateway serves while an order is pending: HTTP-01 tokens on :80
//! and TLS-ALPN-01 (`acme-tls/1`) certificates on :443.

use crate::error::CertError;
use rcgen::{CertificateParams, CustomExtension, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The ALPN protocol id of TLS-ALPN-01 (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// True when a ClientHello offers `acme-tls/1`: the gateway then completes the handshake with
/// [`ChallengeResponder::tls_alpn01_config`] (the validation connection carries no HTTP).
pub fn offers_acme_tls(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN))
}

/// Pending challenge responses, shared by the ACME driver (writer) and the listeners (readers).
#[derive(Debug, Default)]
pub struct ChallengeResponder {
    http01: RwLock<HashMap<String, String>>,
    alpn: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl ChallengeResponder {
    /// The body to answer `GET /.well-known/acme-challenge/<token>` with (`text/plain`),
    /// or `None` (answer 404) when no order is waiting on that token.
    pub fn http01_response(&self, token: &str) -> Option<String> {
        self.http01.read().ok()?.get(token).cloned()
    }

    pub(crate) fn set_http01(&self, token: &str, key_authorization: &str) {
        if let Ok(mut m) = self.http01.write() {
            m.insert(token.to_string(), key_authorization.to_string());
        }
    }

    pub(crate) fn clear_http01(&self, token: &str) {
        if let Ok(mut m) = self.http01.write() {
            m.remove(token);
        }
    }

    /// Publishes the `acme-tls/1` certificate for `name` (RFC 8737: self-signed, one SAN, the
    /// critical acmeIdentifier extension holding SHA-256 of the key authorization).
    pub(crate) fn set_tls_alpn01(&self, name: &str, digest: &[u8]) -> Result<(), CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertError::Cert(format!("tls-alpn-01 key: {e}")))?;
        let mut params = CertificateParams::new(vec![name.to_string()])
            .map_err(|e| CertError::Cert(format!("tls-alpn-01 cert for {name}: {e}")))?;
        params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
        let cert = params
            .self_signed(&key)
            .map_err(|e| CertError::Cert(format!("tls-alpn-01 cert for {name}: {e}")))?;
        let ck = crate::pem::certified_key(&cert.pem(), &key.serialize_pem())?;
        if let Ok(mut m) = self.alpn.write() {
            m.insert(name.to_string(), ck);
        }
        Ok(())
    }

    pub(crate) fn clear_tls_alpn01(&self, name: &str) {
        if let Ok(mut m) = self.alpn.write() {
            m.remove(name);
        }
    }

    /// The challenge certificate for an SNI, if a TLS-ALPN-01 validation is pending for it.
    pub fn tls_alpn01_cert(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn
            .read()
            .ok()?
            .get(&sni.to_ascii_lowercase())
            .cloned()
    }

    /// A rustls config that negotiates only `acme-tls/1` and presents the pending challenge
    /// certificate for the SNI (handshake refused when none is pending).
    pub fn tls_alpn01_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(AlpnChallengeResolver(self.clone())));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Arc::new(config)
    }
}

#[derive(Debug)]
struct AlpnChallengeResolver(Arc<ChallengeResponder>);

impl ResolvesServerCert for AlpnChallengeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.tls_alpn01_cert(hello.server_name()?)
    }
}
