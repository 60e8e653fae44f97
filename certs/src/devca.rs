//! The one local development CA (rcgen): `acme.directory = "local-dev-ca"`, the gateway's
//! `[tls.dev_ca]`, the demo and tests that need certificates without ACME. `ca.pem` and
//! `ca.key` live in one directory (mode 0700, files 0600); hand `ca.pem` to `curl --cacert`.

use crate::error::CertError;
use crate::store::{create_private_dir, write_private};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long the leaves of [`DevCa::certified_key`] and of `local-dev-ca` orders are valid.
pub(crate) const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 86400);

pub struct DevCa {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").field("dir", &self.dir).finish()
    }
}

/// A leaf issued by the dev CA: chain PEM (leaf then CA) and private key PEM.
#[derive(Debug, Clone)]
pub(crate) struct IssuedPem {
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
}

impl DevCa {
    /// Loads the CA from `dir`, or creates one (ECDSA P-256, 10 years) when none exists.
    pub fn load_or_create(dir: impl AsRef<Path>) -> Result<Self, CertError> {
        let dir = dir.as_ref().to_path_buf();
        create_private_dir(&dir)?;
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() {
            let cert_pem =
                std::fs::read_to_string(&cert_path).map_err(|e| CertError::file(&cert_path, e))?;
            let key_pem =
                std::fs::read_to_string(&key_path).map_err(|e| CertError::file(&key_path, e))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::file(&key_path, e))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| CertError::file(&cert_path, e))?;
            return Ok(DevCa {
                dir,
                cert_pem,
                issuer,
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertError::Cert(format!("dev CA key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "meshgate development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(3650 * 86400);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CertError::Cert(format!("dev CA certificate: {e}")))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&cert_path, cert.pem().as_bytes())?;
        Ok(DevCa {
            dir,
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM, for `curl --cacert` or a rustls root store.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf (ECDSA P-256) for `names`, valid for `lifetime` from one minute ago.
    pub(crate) fn issue(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<IssuedPem, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertError::Cert(format!("leaf key: {e}")))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| CertError::Cert(format!("leaf names {names:?}: {e}")))?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.clone());
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + lifetime;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CertError::Cert(format!("leaf for {names:?}: {e}")))?;
        Ok(IssuedPem {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a leaf and returns it ready for a rustls resolver.
    pub fn certified_key(&self, names: &[String]) -> Result<Arc<CertifiedKey>, CertError> {
        let pem = self.issue(names, LEAF_LIFETIME)?;
        crate::pem::certified_key(&pem.chain_pem, &pem.key_pem)
    }
}
