//! ACME once per fleet: the certificate backend on etcd (sealed certificates and account,
//! order locks bound to leases with fenced commits, resumable orders) and the follower that
//! answers every gateway's challenges here.
//!
//! Key layout under `/meshgate/<name>/acme/`: `account` (sealed), `certs/<name>` (chain and
//! sealed key), `locks/<name>` (holder id, under its lease; `locks/@account` while the
//! account is registered), `orders/<name>` (order URL and
//! holder, no lease), `challenges/<hash>` (challenge JSON, under the holder's lock lease).

mod challenges;
mod import;
mod lock;
mod store;

pub use challenges::follow_challenges;
pub use import::{AccountImport, CertImportReport, import_certificates};
pub use store::{AcmeKeys, AcmeStoreOptions, DEFAULT_SETTLE, EtcdCertBackend};
