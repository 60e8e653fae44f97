//! The certificate backend on etcd: certificates (private keys sealed under the fleet key),
//! the ACME account (sealed, registered under its own lock), order locks bound to leases with fenced commits, the order URL
//! a successor resumes, and challenge responses published for every gateway.
//!
//! A local copy of the certificates (the single-gateway file store, 0600 files) is the cache
//! the gateway serves from at start and while etcd is down; a watch keeps it current.

use super::lock::{Acquired, acquire, acquired, fenced};
use crate::etcd::Etcd;
use crate::etcd::lease::Lease;
use crate::etcd::watch::{Change, WatchEvent};
use crate::keys::FleetKeys;
use crate::seal::FleetKey;
use etcd_client::TxnOp;
use meshgate_certs::{
    AccountGuard, AccountLock, BoxFuture, CertBackend, CertError, CertStore, Challenge,
    LockAttempt, OrderGuard, StoredCert,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// A certificate as stored in etcd (JSON); the key is sealed, bound to the etcd key.
#[derive(Serialize, Deserialize)]
struct CertValue {
    chain_pem: String,
    /// Hex of the sealed PEM private key.
    key_sealed: String,
}

/// An unfinished order (JSON at `acme/orders/<name>`), for the next lock holder.
#[derive(Debug, Serialize, Deserialize)]
struct OrderValue {
    url: String,
    holder: String,
}

/// The ACME key layout under `/meshgate/<name>/acme/`.
#[derive(Debug, Clone)]
pub struct AcmeKeys {
    root: String,
}

impl AcmeKeys {
    pub fn new(keys: &FleetKeys) -> Self {
        AcmeKeys { root: keys.acme() }
    }
    /// `acme/account`: the ACME account JSON, sealed.
    pub fn account(&self) -> String {
        format!("{}account", self.root)
    }
    /// `acme/certs/`: one key per certificate.
    pub fn certs(&self) -> String {
        format!("{}certs/", self.root)
    }
    pub fn cert(&self, name: &str) -> String {
        format!("{}{name}", self.certs())
    }
    /// `acme/locks/@account`: held while the ACME account is registered ('@' is in no
    /// certificate name), under the holder's lease.
    pub fn account_lock(&self) -> String {
        self.lock("@account")
    }
    /// `acme/locks/<name>`: the holder's id, under the holder's lease.
    pub fn lock(&self, name: &str) -> String {
        format!("{}locks/{name}", self.root)
    }
    /// `acme/orders/<name>`: the order URL being worked on (no lease: outlives its holder).
    pub fn order(&self, name: &str) -> String {
        format!("{}orders/{name}", self.root)
    }
    /// `acme/challenges/`: published challenge responses, under their holder's lock lease.
    pub fn challenges(&self) -> String {
        format!("{}challenges/", self.root)
    }
    pub fn challenge(&self, c: &Challenge) -> String {
        let json = serde_json::to_vec(c).unwrap_or_default();
        let id = blake3::hash(&json).to_hex();
        format!("{}{}", self.challenges(), &id[..32])
    }
}

/// Settings of the etcd certificate backend.
#[derive(Debug, Clone)]
pub struct AcmeStoreOptions {
    /// This gateway's id (recorded as lock holder).
    pub holder: String,
    /// TTL of an order lock's lease: a holder that dies or pauses loses the lock after it.
    pub lock_ttl: Duration,
    /// How long a published challenge is given to reach every gateway's responders (watch
    /// latency) before the ACME server is asked to validate.
    pub settle: Duration,
}

/// Default of [`AcmeStoreOptions::settle`]: a watch delivers in milliseconds; one second
/// covers a busy gateway.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);

struct Inner {
    etcd: Etcd,
    keys: AcmeKeys,
    fleet_key: FleetKey,
    options: AcmeStoreOptions,
    /// The local copy: served at start and while etcd is down.
    cache: CertStore,
    certs: Mutex<HashMap<String, StoredCert>>,
    changes: watch::Sender<u64>,
}

/// The etcd certificate backend; cheap to clone.
#[derive(Clone)]
pub struct EtcdCertBackend {
    inner: Arc<Inner>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A certificate's etcd value for `etcd_key`: the chain, and the key sealed under
/// `fleet_key` (bound to `etcd_key`).
pub(super) fn seal_cert(
    fleet_key: &FleetKey,
    etcd_key: &str,
    chain_pem: &str,
    key_pem: &str,
) -> Vec<u8> {
    let sealed = fleet_key.seal(etcd_key, key_pem.as_bytes());
    serde_json::to_vec(&CertValue {
        chain_pem: chain_pem.to_string(),
        key_sealed: hex(&sealed),
    })
    .unwrap_or_default()
}

fn store_err(e: impl std::fmt::Display) -> CertError {
    CertError::Store(e.to_string())
}

impl EtcdCertBackend {
    /// The backend over `etcd`; certificates from `cache` (a local file store) are served
    /// until the watch (started by [`Self::follow`]) brings etcd's.
    pub fn new(
        etcd: Etcd,
        keys: &FleetKeys,
        fleet_key: FleetKey,
        cache: CertStore,
        options: AcmeStoreOptions,
    ) -> Self {
        let mut certs = HashMap::new();
        for c in cache.load_all().into_iter().flatten() {
            certs.insert(c.key.clone(), c);
        }
        EtcdCertBackend {
            inner: Arc::new(Inner {
                etcd,
                keys: AcmeKeys::new(keys),
                fleet_key,
                options,
                cache,
                certs: Mutex::new(certs),
                changes: watch::channel(0).0,
            }),
        }
    }

    pub fn keys(&self) -> &AcmeKeys {
        &self.inner.keys
    }

    fn certs(&self) -> std::sync::MutexGuard<'_, HashMap<String, StoredCert>> {
        self.inner.certs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals a certificate for `etcd_key`.
    fn cert_value(&self, etcd_key: &str, chain_pem: &str, key_pem: &str) -> Vec<u8> {
        seal_cert(&self.inner.fleet_key, etcd_key, chain_pem, key_pem)
    }

    /// Opens a stored certificate value found at `etcd_key`.
    fn open_cert(&self, etcd_key: &str, value: &[u8]) -> Result<StoredCert, CertError> {
        let name = etcd_key
            .strip_prefix(&self.inner.keys.certs())
            .ok_or_else(|| store_err(format!("{etcd_key}: not a certificate key")))?;
        let v: CertValue = serde_json::from_slice(value)
            .map_err(|e| store_err(format!("{etcd_key}: unreadable certificate: {e}")))?;
        let sealed = unhex(&v.key_sealed)
            .ok_or_else(|| store_err(format!("{etcd_key}: the sealed key is not hex")))?;
        let key_pem = self
            .inner
            .fleet_key
            .open(etcd_key, &sealed)
            .map_err(store_err)?;
        let key_pem = String::from_utf8(key_pem)
            .map_err(|_| store_err(format!("{etcd_key}: the private key is not text")))?;
        StoredCert::from_pem(name, v.chain_pem, key_pem)
    }

    /// Applies one certificate from etcd: cached locally (0600 files) and announced.
    fn apply_cert(&self, etcd_key: &str, value: &[u8]) {
        match self.open_cert(etcd_key, value) {
            Ok(c) => {
                let changed = self
                    .certs()
                    .get(&c.key)
                    .is_none_or(|old| old.chain_pem != c.chain_pem);
                if !changed {
                    return;
                }
                if let Err(e) = self.inner.cache.save(&c.key, &c.chain_pem, &c.key_pem) {
                    tracing::warn!(name = %c.key, "caching the fleet's certificate: {e}");
                }
                self.certs().insert(c.key.clone(), c);
                self.inner.changes.send_modify(|n| *n += 1);
            }
            Err(e) => tracing::error!("certificate from etcd: {e}"),
        }
    }

    /// Follows `acme/certs/` into the cache until the task is dropped.
    pub fn follow(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut w = this.inner.etcd.watch_prefix(&this.inner.keys.certs(), None);
            while let Some(ev) = w.next().await {
                match ev {
                    // Certificates are never deleted from the cache: serving an old one
                    // beats serving none.
                    WatchEvent::Snapshot { kvs, .. } => {
                        for kv in kvs {
                            this.apply_cert(&String::from_utf8_lossy(kv.key()), kv.value());
                        }
                    }
                    WatchEvent::Changes { changes, .. } => {
                        for c in changes {
                            if let Change::Put(kv) = c {
                                this.apply_cert(&String::from_utf8_lossy(kv.key()), kv.value());
                            }
                        }
                    }
                }
            }
        })
    }

    /// Takes the lock at `lock_key` (reading `read_key` with it): the held lock and what
    /// `read_key` held, or the current holder.
    async fn take_lock(
        &self,
        name: &str,
        lock_key: String,
        read_key: &str,
    ) -> Result<Result<(HeldLock, Option<Vec<u8>>), String>, CertError> {
        let inner = &self.inner;
        let lease = inner
            .etcd
            .grant_lease(inner.options.lock_ttl)
            .await
            .map_err(store_err)?;
        let txn = acquire(&lock_key, &inner.options.holder, lease.id(), read_key);
        let resp = match inner.etcd.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                let _ = lease.revoke().await;
                return Err(store_err(e));
            }
        };
        match acquired(&resp) {
            Acquired::Busy { holder } => {
                let _ = lease.revoke().await;
                Ok(Err(holder))
            }
            Acquired::Held { token, order } => {
                tracing::info!(name, token, lease = lease.id(), "lock taken");
                let held = HeldLock {
                    backend: self.clone(),
                    name: name.to_string(),
                    lock_key,
                    token,
                    lease: Mutex::new(Some(lease)),
                };
                Ok(Ok((held, order)))
            }
        }
    }

    async fn try_lock(&self, name: &str) -> Result<LockAttempt, CertError> {
        let (lock_key, order_key) = (self.inner.keys.lock(name), self.inner.keys.order(name));
        Ok(match self.take_lock(name, lock_key, &order_key).await? {
            Err(holder) => LockAttempt::Busy { holder },
            Ok((lock, order)) => {
                let resume = order
                    .and_then(|v| serde_json::from_slice::<OrderValue>(&v).ok())
                    .map(|o| {
                        tracing::info!(name, url = %o.url, previous = %o.holder,
                            "taking over an unfinished order");
                        o.url
                    });
                LockAttempt::Acquired(Box::new(EtcdGuard { lock, resume }))
            }
        })
    }

    async fn try_lock_account(&self) -> Result<AccountLock, CertError> {
        let keys = &self.inner.keys;
        let taken = self
            .take_lock("ACME account", keys.account_lock(), &keys.account())
            .await?;
        Ok(match taken {
            Err(holder) => AccountLock::Busy { holder },
            Ok((lock, _)) => AccountLock::Acquired(Box::new(EtcdAccountGuard { lock })),
        })
    }
}

/// A lock held under its own lease; writes under it are fenced.
struct HeldLock {
    backend: EtcdCertBackend,
    /// What the lock is for (a certificate's name), for errors and logs.
    name: String,
    lock_key: String,
    /// The lock's create revision: every write under the lock compares it.
    token: i64,
    lease: Mutex<Option<Lease>>,
}

impl HeldLock {
    fn lease_id(&self) -> Option<i64> {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        lease.as_ref().filter(|l| !l.is_lost()).map(|l| l.id())
    }

    fn fenced_error(&self, reason: &str) -> CertError {
        CertError::Fenced {
            key: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// Runs `ops` only while the lock is still this guard's.
    async fn fenced_write(&self, ops: Vec<TxnOp>, what: &str) -> Result<(), CertError> {
        if self.lease_id().is_none() {
            return Err(self.fenced_error("the lock's lease is lost"));
        }
        let etcd = &self.backend.inner.etcd;
        let resp = etcd
            .txn(fenced(&self.lock_key, self.token, ops))
            .await
            .map_err(store_err)?;
        if resp.succeeded() {
            Ok(())
        } else {
            tracing::warn!(name = %self.name, token = self.token, "{what} refused: the lock is no longer ours");
            Err(self.fenced_error("another gateway holds the lock now"))
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Revoking deletes the lock and this holder's challenges at once; without a runtime
        // they lapse with the lease.
        if let (Some(lease), Ok(rt)) = (lease, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = lease.revoke().await;
            });
        }
    }
}

/// A held order lock.
struct EtcdGuard {
    lock: HeldLock,
    resume: Option<String>,
}

/// The held account lock: the account is saved (sealed) only while it is ours.
struct EtcdAccountGuard {
    lock: HeldLock,
}

impl AccountGuard for EtcdAccountGuard {
    fn save<'a>(&'a self, json: &'a [u8]) -> BoxFuture<'a, Result<(), CertError>> {
        Box::pin(async move {
            let inner = &self.lock.backend.inner;
            let key = inner.keys.account();
            let sealed = inner.fleet_key.seal(&key, json);
            self.lock
                .fenced_write(
                    vec![TxnOp::put(key, sealed, None)],
                    "saving the ACME account",
                )
                .await
        })
    }
}

impl OrderGuard for EtcdGuard {
    fn resume_url(&self) -> Option<String> {
        self.resume.clone()
    }

    fn record_order<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Result<(), CertError>> {
        Box::pin(async move {
            let value = serde_json::to_vec(&OrderValue {
                url: url.to_string(),
                holder: self.lock.backend.inner.options.holder.clone(),
            })
            .unwrap_or_default();
            let key = self.lock.backend.inner.keys.order(&self.lock.name);
            self.lock
                .fenced_write(vec![TxnOp::put(key, value, None)], "recording the order")
                .await
        })
    }

    fn publish<'a>(&'a self, challenge: &'a Challenge) -> BoxFuture<'a, Result<(), CertError>> {
        Box::pin(async move {
            let Some(lease) = self.lock.lease_id() else {
                return Err(self.lock.fenced_error("the lock's lease is lost"));
            };
            let key = self.lock.backend.inner.keys.challenge(challenge);
            let value = serde_json::to_vec(challenge).unwrap_or_default();
            let put = TxnOp::put(
                key,
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            );
            self.lock
                .fenced_write(vec![put], "publishing a challenge")
                .await
        })
    }

    fn settle(&self) -> Duration {
        self.lock.backend.inner.options.settle
    }

    fn withdraw<'a>(&'a self, challenge: &'a Challenge) -> BoxFuture<'a, Result<(), CertError>> {
        Box::pin(async move {
            let key = self.lock.backend.inner.keys.challenge(challenge);
            self.lock
                .backend
                .inner
                .etcd
                .delete(&key)
                .await
                .map(|_| ())
                .map_err(store_err)
        })
    }

    fn commit<'a>(
        &'a self,
        key: &'a str,
        chain_pem: &'a str,
        key_pem: &'a str,
    ) -> BoxFuture<'a, Result<(), CertError>> {
        Box::pin(async move {
            let keys = &self.lock.backend.inner.keys;
            let cert_key = keys.cert(key);
            let value = self.lock.backend.cert_value(&cert_key, chain_pem, key_pem);
            self.lock
                .fenced_write(
                    vec![
                        TxnOp::put(cert_key.clone(), value.clone(), None),
                        TxnOp::delete(keys.order(key), None),
                    ],
                    "storing the certificate",
                )
                .await?;
            self.lock.backend.apply_cert(&cert_key, &value);
            Ok(())
        })
    }
}

impl CertBackend for EtcdCertBackend {
    fn describe(&self) -> String {
        format!(
            "etcd {} under {}",
            self.inner.etcd.endpoints(),
            self.inner.keys.root
        )
    }

    fn load_all(&self) -> Vec<Result<StoredCert, CertError>> {
        self.certs().values().cloned().map(Ok).collect()
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<StoredCert>, CertError>> {
        Box::pin(async move {
            let etcd_key = self.inner.keys.cert(key);
            match self.inner.etcd.get(&etcd_key).await.map_err(store_err)? {
                Some(kv) => {
                    self.apply_cert(&etcd_key, kv.value());
                    self.open_cert(&etcd_key, kv.value()).map(Some)
                }
                None => Ok(None),
            }
        })
    }

    fn read_account(&self) -> BoxFuture<'_, Result<Option<String>, CertError>> {
        Box::pin(async move {
            let key = self.inner.keys.account();
            let Some(kv) = self.inner.etcd.get(&key).await.map_err(store_err)? else {
                return Ok(None);
            };
            let plain = self
                .inner
                .fleet_key
                .open(&key, kv.value())
                .map_err(store_err)?;
            String::from_utf8(plain)
                .map(Some)
                .map_err(|_| store_err(format!("{key}: the account is not text")))
        })
    }

    fn write_account<'a>(&'a self, json: &'a [u8]) -> BoxFuture<'a, Result<(), CertError>> {
        Box::pin(async move {
            let key = self.inner.keys.account();
            let sealed = self.inner.fleet_key.seal(&key, json);
            self.inner
                .etcd
                .put(&key, sealed)
                .await
                .map(|_| ())
                .map_err(store_err)
        })
    }

    fn lock_account(&self) -> BoxFuture<'_, Result<AccountLock, CertError>> {
        Box::pin(self.try_lock_account())
    }

    fn lock_order<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<LockAttempt, CertError>> {
        Box::pin(self.try_lock(key))
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.changes.subscribe())
    }
}
