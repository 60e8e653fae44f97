//! Where certificates, the ACME account, order locks, order state and published challenge
//! responses live: the `CertBackend` seam the manager uses, and `LocalBackend`, the
//! single-gateway default (the on-disk store and an in-process lock).
//!
//! A fleet implements the same trait on a shared store: one lock per name bound to a lease,
//! a fenced commit (a holder that lost its lock cannot store a certificate), the order URL
//! kept for the next holder, and challenges published for every gateway to answer.

use crate::error::CertError;
use crate::store::{CertStore, StoredCert};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A boxed, sendable future (the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A challenge response published while an order waits for validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Challenge {
    #[serde(rename = "http-01")]
    /// `GET /.well-known/acme-challenge/<token>` answers `key_authorization`.
    Http01 {
        token: String,
        key_authorization: String,
    },
    #[serde(rename = "tls-alpn-01")]
    /// A handshake for `name` offering `acme-tls/1` gets a certificate carrying `digest`
    /// (SHA-256 of the key authorization).
    TlsAlpn01 { name: String, digest: Vec<u8> },
    #[serde(rename = "dns-01")]
    /// `_acme-challenge.<domain> TXT <value>`.
    Dns01 { value: String },
}

/// The outcome of asking for an order lock.
pub enum LockAttempt {
    /// This gateway may order; the guard releases the lock when dropped.
    Acquired(Box<dyn OrderGuard>),
    /// Another gateway (`holder`) is ordering this certificate.
    Busy { holder: String },
}

impl std::fmt::Debug for LockAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockAttempt::Acquired(_) => f.write_str("Acquired"),
            LockAttempt::Busy { holder } => write!(f, "Busy({holder})"),
        }
    }
}

/// The outcome of asking for the ACME account lock (held while an account is registered, so
/// that gateways starting together register one account, not one each).
pub enum AccountLock {
    /// This gateway registers the account; it is saved through the guard, which releases the
    /// lock when dropped.
    Acquired(Box<dyn AccountGuard>),
    /// Another gateway (`holder`) is registering the account.
    Busy { holder: String },
}

impl std::fmt::Debug for AccountLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountLock::Acquired(_) => f.write_str("Acquired"),
            AccountLock::Busy { holder } => write!(f, "Busy({holder})"),
        }
    }
}

/// The held account lock.
pub trait AccountGuard: Send + Sync {
    /// Saves the account (JSON; holds its private key) only while this guard still holds
    /// the lock: otherwise `CertError::Fenced`, and nothing is written.
    fn save<'a>(&'a self, json: &'a [u8]) -> BoxFuture<'a, Result<(), CertError>>;
}

/// A held order lock for one certificate. Dropping it releases the lock (best effort; a
/// shared store also lets it lapse with its lease).
pub trait OrderGuard: Send + Sync {
    /// The order a previous holder placed and did not finish, to resume.
    fn resume_url(&self) -> Option<String>;
    /// Records the order being worked on, so that the next holder can resume it.
    fn record_order<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<(), CertError>>;
    /// Publishes a challenge response for every gateway to answer.
    fn publish<'a>(&'a self, challenge: &'a Challenge) -> BoxFuture<'a, Result<(), CertError>>;
    /// How long a published challenge takes to reach every gateway: the validation is
    /// requested only after it (zero for a single gateway).
    fn settle(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Withdraws a published challenge response.
    fn withdraw<'a>(&'a self, challenge: &'a Challenge) -> BoxFuture<'a, Result<(), CertError>>;
    /// Stores the certificate for `key` and forgets the order, only while this guard still
    /// holds the lock: otherwise `CertError::Fenced`, and nothing is written.
    fn commit<'a>(
        &'a self,
        key: &'a str,
        chain_pem: &'a str,
        key_pem: &'a str,
    ) -> BoxFuture<'a, Result<(), CertError>>;
}

/// Certificate storage and order coordination, as the certificate manager sees them.
pub trait CertBackend: Send + Sync {
    /// What this backend is, for logs (`"files in /var/lib/meshgate/certs"`).
    fn describe(&self) -> String;
    /// Every stored certificate; unreadable entries as errors.
    fn load_all(&self) -> Vec<Result<StoredCert, CertError>>;
    /// The certificate stored under `key` now (read through to the shared store).
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredCert>, CertError>>;
    /// The ACME account (JSON), if one was saved.
    fn read_account(&self) -> BoxFuture<'_, Result<Option<String>, CertError>>;
    /// Saves the ACME account (JSON; holds the account's private key).
    fn write_account<'a>(&'a self, json: &'a [u8]) -> BoxFuture<'a, Result<(), CertError>>;
    /// Takes the lock for registering the ACME account, or says who holds it.
    fn lock_account(&self) -> BoxFuture<'_, Result<AccountLock, CertError>>;
    /// Takes the order lock for `key`, or says who holds it.
    fn lock_order<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockAttempt, CertError>>;
    /// Bumped whenever certificates change behind the manager's back (another gateway
    /// committed one); `None` when that cannot happen.
    fn changes(&self) -> Option<watch::Receiver<u64>>;
}

const ACCOUNT_FILE: &str = "account.json";
/// The account lock's entry among the local locks (a space: never a certificate's name).
const ACCOUNT_LOCK: &str = "acme account";

/// The single-gateway backend: certificates and the account in a [`CertStore`], order locks
/// in this process, nothing to publish beyond the gateway's own responders.
#[derive(Debug)]
pub struct LocalBackend {
    store: CertStore,
    locked: Arc<Mutex<HashSet<String>>>,
}

impl LocalBackend {
    pub fn new(store: CertStore) -> Self {
        LocalBackend {
            store,
            locked: Arc::default(),
        }
    }
}

struct LocalGuard {
    key: String,
    store: CertStore,
    locked: Arc<Mutex<HashSet<String>>>,
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

struct LocalAccountGuard {
    store: CertStore,
    locked: Arc<Mutex<HashSet<String>>>,
}

impl Drop for LocalAccountGuard {
    fn drop(&mut self) {
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ACCOUNT_LOCK);
    }
}

impl AccountGuard for LocalAccountGuard {
    fn save<'a>(&'a self, json: &'a [u8]) -> BoxFuture<'a, Result<(), CertError>> {
        ready(self.store.write_file(ACCOUNT_FILE, json))
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl OrderGuard for LocalGuard {
    fn resume_url(&self) -> Option<String> {
        None // an order of a process that died is not resumed: a new one is placed
    }
    fn record_order<'a>(&'a self, _url: &'a str) -> BoxFuture<'a, Result<(), CertError>> {
        ready(Ok(()))
    }
    fn publish<'a>(&'a self, _: &'a Challenge) -> BoxFuture<'a, Result<(), CertError>> {
        ready(Ok(())) // the manager's own responders already answer it
    }
    fn withdraw<'a>(&'a self, _: &'a Challenge) -> BoxFuture<'a, Result<(), CertError>> {
        ready(Ok(()))
    }
    fn commit<'a>(
        &'a self,
        key: &'a str,
        chain_pem: &'a str,
        key_pem: &'a str,
    ) -> BoxFuture<'a, Result<(), CertError>> {
        ready(self.store.save(key, chain_pem, key_pem))
    }
}

impl CertBackend for LocalBackend {
    fn describe(&self) -> String {
        format!("files in {}", self.store.dir().display())
    }
    fn load_all(&self) -> Vec<Result<StoredCert, CertError>> {
        self.store.load_all()
    }
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredCert>, CertError>> {
        ready(self.store.load(key))
    }
    fn read_account(&self) -> BoxFuture<'_, Result<Option<String>, CertError>> {
        ready(self.store.read_file(ACCOUNT_FILE))
    }
    fn write_account<'a>(&'a self, json: &'a [u8]) -> BoxFuture<'a, Result<(), CertError>> {
        ready(self.store.write_file(ACCOUNT_FILE, json))
    }
    fn lock_account(&self) -> BoxFuture<'_, Result<AccountLock, CertError>> {
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        let attempt = if locked.insert(ACCOUNT_LOCK.to_string()) {
            AccountLock::Acquired(Box::new(LocalAccountGuard {
                store: self.store.clone(),
                locked: self.locked.clone(),
            }))
        } else {
            AccountLock::Busy {
                holder: "this gateway".into(),
            }
        };
        ready(Ok(attempt))
    }
    fn lock_order<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockAttempt, CertError>> {
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        let attempt = if locked.insert(key.to_string()) {
            LockAttempt::Acquired(Box::new(LocalGuard {
                key: key.to_string(),
                store: self.store.clone(),
                locked: self.locked.clone(),
            }))
        } else {
            LockAttempt::Busy {
                holder: "this gateway".into(),
            }
        };
        ready(Ok(attempt))
    }
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_lock_is_exclusive_until_the_guard_drops() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(CertStore::open(dir.path()).unwrap());
        let first = backend.lock_order("a.test").await.unwrap();
        assert!(matches!(first, LockAttempt::Acquired(_)));
        assert!(matches!(
            backend.lock_order("a.test").await.unwrap(),
            LockAttempt::Busy { .. }
        ));
        assert!(matches!(
            backend.lock_order("b.test").await.unwrap(),
            LockAttempt::Acquired(_)
        ));
        drop(first);
        assert!(matches!(
            backend.lock_order("a.test").await.unwrap(),
            LockAttempt::Acquired(_)
        ));
    }

    #[test]
    fn challenges_serialize_with_their_type() {
        let c = Challenge::Dns01 { value: "v".into() };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"type":"dns-01","value":"v"}"#);
        assert_eq!(serde_json::from_str::<Challenge>(&json).unwrap(), c);
    }
}
