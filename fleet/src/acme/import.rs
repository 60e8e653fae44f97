//! `meshgate fleet import`, the certificates half: a standalone gateway's certificates and
//! ACME account copied into the fleet's etcd, private keys and account sealed under the fleet
//! key. A key etcd already holds is never overwritten (a transaction on its absence), so an
//! import run twice, or after the fleet has renewed a certificate, changes nothing there.

use super::store::{AcmeKeys, seal_cert};
use crate::etcd::{Compare, CompareOp, Etcd, Txn, TxnOp};
use crate::{FleetError, FleetKey, FleetKeys};
use meshgate_certs::{CertBackend, CertStore, LocalBackend};

/// What happened to the standalone ACME account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountImport {
    /// The standalone store has none.
    Absent,
    /// Copied (sealed).
    Copied,
    /// etcd holds an account already (kept; the standalone one is not used by the fleet).
    Kept,
}

/// What an import of certificates did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertImportReport {
    /// Names of the certificates copied.
    pub copied: Vec<String>,
    /// Names already in etcd (left as they are).
    pub kept: Vec<String>,
    /// Certificates of the standalone store that could not be read: (what, why). Skipped.
    pub unreadable: Vec<(String, String)>,
    pub account: AccountImport,
}

async fn put_if_absent(etcd: &Etcd, key: &str, value: Vec<u8>) -> Result<bool, FleetError> {
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    Ok(etcd.txn(txn).await?.succeeded())
}

/// Copies the certificates and the ACME account of `source` (a standalone gateway's
/// `<data_dir>/certs`) into the fleet.
pub async fn import_certificates(
    source: &CertStore,
    etcd: &Etcd,
    keys: &FleetKeys,
    fleet_key: &FleetKey,
) -> Result<CertImportReport, FleetError> {
    let acme = AcmeKeys::new(keys);
    let mut report = CertImportReport {
        copied: Vec::new(),
        kept: Vec::new(),
        unreadable: Vec::new(),
        account: AccountImport::Absent,
    };
    for cert in source.load_all() {
        let cert = match cert {
            Ok(c) => c,
            Err(e) => {
                report
                    .unreadable
                    .push(("a certificate".into(), e.to_string()));
                continue;
            }
        };
        let key = acme.cert(&cert.key);
        let value = seal_cert(fleet_key, &key, &cert.chain_pem, &cert.key_pem);
        if put_if_absent(etcd, &key, value).await? {
            report.copied.push(cert.key);
        } else {
            report.kept.push(cert.key);
        }
    }
    // The standalone account file, read as the standalone gateway reads it.
    let local = LocalBackend::new(source.clone());
    match local.read_account().await {
        Ok(Some(json)) => {
            let key = acme.account();
            let sealed = fleet_key.seal(&key, json.as_bytes());
            report.account = if put_if_absent(etcd, &key, sealed).await? {
                AccountImport::Copied
            } else {
                AccountImport::Kept
            };
        }
        Ok(None) => {}
        Err(e) => report
            .unreadable
            .push(("the ACME account".into(), e.to_string())),
    }
    Ok(report)
}
