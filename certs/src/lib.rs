//! Certificates for the meshgate gateway: ACME issuance and renewal (HTTP-01, TLS-ALPN-01,
//! DNS-01 wildcard with a built-in authoritative responder), an on-disk store, a live-swapping
//! rustls resolver and a local development CA.
//!
//! # Wiring into the gateway
//!
//! ```no_run
//! # async fn wire() -> Result<(), meshgate_certs::CertError> {
//! use meshgate_certs::{AcmeConfig, CertConfig, CertManager};
//! // Or `CertConfig::try_from(&gateway_config)`, from `data_dir`, `domains` and `[tls.acme]`.
//! let mut config = CertConfig::new(
//!     "/var/lib/meshgate/certs",
//!     AcmeConfig::new("letsencrypt", "ops@example.org"),
//! );
//! config.farmer_domain = Some("gw.example.org".into());
//! let certs = CertManager::new(config)?;
//! // :443 terminate: every handshake asks the resolver (exact name, then `*.parent`); the
//! // gateway swaps its configured certificates into the same resolver (`certs.resolver()`).
//! let tls = certs.server_config(vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
//! // :443 ClientHello offering `acme-tls/1` → use `certs.tls_alpn01_config()` instead
//! //   (see `meshgate_certs::offers_acme_tls`).
//! // :80 → `certs.http01_response(token)` for `/.well-known/acme-challenge/<token>`.
//! // Reservations changed (only verified custom domains!):
//! certs.set_desired(["shop.example.com".to_string()]);
//! let _driver = certs.spawn(); // orders, renews, answers DNS-01 on `dns.listen`
//! # let _ = tls; Ok(()) }
//! ```
//!
//! ACME flow decisions live in `schedule::Scheduler`, a sans-IO state machine; the tokio
//! driver in `manager` performs the orders it asks for.

#![warn(unreachable_pub)]

mod account;
mod acme;
mod backend;
mod challenge;
mod config;
mod devca;
mod dns;
mod error;
pub mod farm;
mod manager;
mod pem;
mod resolver;
mod schedule;
mod status;
mod store;

pub use backend::{
    AccountGuard, AccountLock, BoxFuture, CertBackend, Challenge, LocalBackend, LockAttempt,
    OrderGuard,
};
pub use challenge::{ChallengeResponder, offers_acme_tls};
pub use config::{AcmeConfig, CertConfig, CustomChallenge, Directory, DnsConfig, RenewPolicy};
pub use devca::DevCa;
pub use dns::{ChallengeZone, DnsServer, serve_dns};
pub use error::{CertError, IssueError};
pub use manager::CertManager;
pub use pem::load_pem_files;
pub use resolver::{CertMap, CertResolver};
pub use schedule::Validity;
pub use status::{CertState, CertStatus};
pub use store::{CertStore, StoredCert};

/// The rustls crypto provider used everywhere in this crate (ring; no aws-lc).
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
