//! PEM and X.509 helpers: chains and keys into rustls types, validity and names out of a leaf.

use crate::error::CertError;
use crate::schedule::Validity;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Loads a certificate chain and its private key from PEM files (`[[tls.certificates]]`,
/// `[admin] tls`): the DNS names the leaf covers, and the rustls key. Errors name the file.
pub fn load_pem_files(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<String>, Arc<CertifiedKey>), CertError> {
    let chain_pem = std::fs::read_to_string(cert)
        .map_err(|e| CertError::file(cert, format!("cannot read certificates: {e}")))?;
    let key_pem = std::fs::read_to_string(key)
        .map_err(|e| CertError::file(key, format!("cannot read a PEM private key: {e}")))?;
    let (_, names) = leaf_info(&chain_pem).map_err(|e| CertError::file(cert, e))?;
    let certified = certified_key(&chain_pem, &key_pem).map_err(|e| CertError::file(key, e))?;
    Ok((names, certified))
}

/// Parses a PEM chain (leaf first) and a PEM private key into a rustls `CertifiedKey`.
pub(crate) fn certified_key(
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = parse_chain(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CertError::Cert(format!("private key PEM: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Cert(format!("private key unusable: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// All certificates of a PEM chain, in order.
pub(crate) fn parse_chain(chain_pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Cert(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CertError::Cert(
            "certificate PEM holds no certificate".into(),
        ));
    }
    Ok(chain)
}

/// Validity period and DNS names (SANs) of the first certificate of a PEM chain.
pub(crate) fn leaf_info(chain_pem: &str) -> Result<(Validity, Vec<String>), CertError> {
    let chain = parse_chain(chain_pem)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .map_err(|e| CertError::Cert(format!("leaf certificate: {e}")))?;
    let v = leaf.validity();
    let to_system = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let validity = Validity {
        not_before: to_system(v.not_before.timestamp()),
        not_after: to_system(v.not_after.timestamp()),
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok((validity, names))
}

/// Checks a DNS name (optionally `*.`-prefixed) and returns it lowercased, by the one host
/// name rule ([`meshgate_config::host::HostPattern`]). Names become file names and ACME
/// identifiers, so only letters, digits, `-` and dots get through.
pub(crate) fn normalize_name(name: &str) -> Result<String, CertError> {
    meshgate_config::host::HostPattern::parse(name)
        .map(String::from)
        .map_err(|e| CertError::InvalidName {
            name: name.to_string(),
            reason: e.to_string(),
        })
}

/// Seconds since the Unix epoch, for status and metrics.
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// RFC 3339 text of a time, for the admin status.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs(t))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{}", unix_secs(t)))
}
