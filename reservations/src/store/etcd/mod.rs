//! The fleet's reservation store: reservations and deployer tokens (hashes only) in etcd
//! under `/meshgate/<name>/state/`, shared by every gateway of the fleet.
//!
//! Reads never touch etcd: each gateway serves from its cache (`cache`), fed by a watch on
//! the state prefix and saved to `data_dir`, so routes and tokens keep working while etcd is
//! unreachable and after a restart in that state. Writes go to etcd as transactions guarded
//! by the records' `mod_revision` (optimistic concurrency: an edit closure is re-run on the
//! record as it is now when another gateway got there first), then wait until the cache has
//! applied them, so the writer reads its own write and its routes are published. When etcd
//! cannot be reached a write fails with `StoreError::Unavailable` (the API answers 503).
//!
//! The challenge key lives in etcd sealed under the fleet key; so every gateway derives the
//! same custom-domain challenge tokens. A gateway whose fleet key does not open the fleet's
//! key check refuses to start.
//!
//! The trait is synchronous (callers run it on blocking threads); the store runs its etcd
//! calls, its watch and its cache saving on a small runtime of its own and waits for them,
//! so it never blocks or deadlocks the caller's runtime.

mod cache;
pub mod import;

use super::rules::{Views, check_create, record_key};
use super::{Refused, ReservationStore, StoreError};
use crate::reservation::{Key, Kind, Reservation};
use crate::token::{ChallengeKey, StoredToken};
use cache::{Cache, Entry, Layout};
use meshgate_config::route::Route;
use meshgate_fleet::etcd::{Compare, CompareOp, Txn, TxnOp};
use meshgate_fleet::{Etcd, FleetError, FleetKey, FleetKeys, StoreHealth};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The saved cache, in `data_dir`.
pub const CACHE_FILE: &str = "fleet-cache.json";

/// How often a write is retried when other gateways keep changing the same records.
const MAX_ATTEMPTS: usize = 8;

/// How long a write waits for its own change to come back through the watch.
const APPLY_WAIT: Duration = Duration::from_secs(3);

/// Plaintext of the fleet key check (only whether it opens matters).
const KEY_CHECK: &[u8] = b"meshgate fleet key check v1";

/// What the store needs, given by the composition root.
#[derive(Debug, Clone)]
pub struct EtcdStoreConfig {
    pub etcd: Etcd,
    pub keys: FleetKeys,
    pub fleet_key: FleetKey,
    pub farmer_domain: String,
    /// Where the cache is saved (the gateway's `data_dir`).
    pub data_dir: PathBuf,
    /// How long opening waits for etcd before serving from the saved cache.
    pub start_wait: Duration,
}

struct Shared {
    etcd: Etcd,
    layout: Layout,
    farmer_domain: String,
    cache: Mutex<Cache>,
    applied: watch::Sender<i64>,
    views: Views,
    cache_path: PathBuf,
    dirty: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic while holding the lock leaves a cache that is still a valid map.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, cache: &Cache) {
        self.views.publish(
            &self.farmer_domain,
            cache.reservations.values().map(|e| &e.value),
        );
        self.applied.send_if_modified(|a| {
            let moved = *a != cache.revision;
            *a = cache.revision;
            moved
        });
    }
}

/// The reservation store of a gateway in a fleet.
pub struct EtcdStore {
    shared: Arc<Shared>,
    keys: FleetKeys,
    challenge_key: ChallengeKey,
    verify_now: Arc<Notify>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("root", &self.keys.root())
            .field("farmer_domain", &self.shared.farmer_domain)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let _ = self.shared.lock().save(&self.shared.cache_path);
            // May be dropped on an async thread: never block there.
            rt.shutdown_background();
        }
    }
}

fn unavailable(e: FleetError) -> StoreError {
    match e {
        FleetError::Unavailable { cause, .. } => StoreError::Unavailable { cause },
        other => StoreError::Db(other.to_string()),
    }
}

fn open_err(path: &Path, message: String) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        message,
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Db(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// A runtime that is shut down without blocking when dropped.
struct ShutdownInBackground(Option<tokio::runtime::Runtime>);

impl ShutdownInBackground {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until taken").handle()
    }

    fn take(&mut self) -> tokio::runtime::Runtime {
        self.0.take().expect("taken once")
    }
}

impl Drop for ShutdownInBackground {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `rt` and waits for it on this thread (which may belong to another runtime).
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .expect("the fleet store's runtime runs while the store lives")
}

impl EtcdStore {
    /// Opens the fleet store: loads the saved cache, checks the fleet key and fetches (or
    /// creates) the challenge key in etcd, starts the watch and waits up to `start_wait` for
    /// etcd's current state. With etcd unreachable it starts from the saved cache; with
    /// neither it fails. A fleet key that does not open the fleet's secrets fails.
    pub fn open(config: EtcdStoreConfig) -> Result<EtcdStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleet-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Db(format!("fleet store runtime: {e}")))?;
        // Opening runs on a caller's async thread: a runtime dropped there on an error path
        // would panic, so an unfinished open shuts it down in the background.
        let mut runtime = ShutdownInBackground(Some(runtime));
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| open_err(&config.data_dir, e.to_string()))?;
        let cache_path = config.data_dir.join(CACHE_FILE);
        let saved = match Cache::load(&cache_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("fleet store: {e}; starting without it");
                None
            }
        };
        let handle = runtime.handle().clone();
        let EtcdStoreConfig {
            etcd,
            keys,
            fleet_key,
            farmer_domain,
            start_wait,
            ..
        } = config;

        // The secrets: from etcd when it answers, else as saved with the cache.
        let (etcd2, keys2, key2, saved2) = (etcd.clone(), keys.clone(), fleet_key, saved.clone());
        let secrets = run_on(&handle, async move {
            tokio::time::timeout(
                start_wait,
                fetch_secrets(&etcd2, &keys2, &key2, saved2.as_ref()),
            )
            .await
            .unwrap_or_else(|_| {
                fetch_saved_secrets(
                    &keys2,
                    &key2,
                    saved2.as_ref(),
                    "etcd did not answer in time",
                )
            })
        })
        .map_err(|m| open_err(&cache_path, m))?;

        let mut cache = saved.unwrap_or_default();
        cache.sealed_key_check = Some(secrets.sealed_key_check.clone());
        cache.sealed_challenge_key = Some(secrets.sealed_challenge_key.clone());
        let after = match secrets.current_revision {
            // A cache ahead of etcd is from another cluster (or a restore): list afresh.
            Some(now) if cache.revision > now => None,
            _ => (cache.revision > 0).then_some(cache.revision),
        };
        if after.is_none() && secrets.current_revision.is_some() {
            cache.revision = 0;
        }
        let layout = Layout {
            reservations: keys.reservations(),
            tokens: keys.tokens(),
        };
        let shared = Arc::new(Shared {
            etcd: etcd.clone(),
            layout,
            farmer_domain: farmer_domain.trim_end_matches('.').to_ascii_lowercase(),
            applied: watch::Sender::new(cache.revision),
            cache: Mutex::new(cache),
            views: Views::new(),
            cache_path,
            dirty: Notify::new(),
        });
        {
            let c = shared.lock();
            shared.publish(&c);
        }
        let first = Arc::new(Notify::new());
        {
            let _guard = handle.enter();
            let mut w = etcd.watch_prefix(&keys.state(), after);
            let (s, first) = (shared.clone(), first.clone());
            handle.spawn(async move {
                while let Some(ev) = w.next().await {
                    let mut c = s.lock();
                    c.apply(&s.layout, ev);
                    while let Some(more) = w.try_next() {
                        c.apply(&s.layout, more);
                    }
                    s.publish(&c);
                    drop(c);
                    s.dirty.notify_one();
                    first.notify_one();
                }
            });
            let s = shared.clone();
            handle.spawn(async move {
                loop {
                    s.dirty.notified().await;
                    // Coalesce a burst of changes into one save.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let c = s.lock().clone();
                    let path = s.cache_path.clone();
                    let saved = tokio::task::spawn_blocking(move || c.save(&path)).await;
                    if let Ok(Err(e)) = saved {
                        tracing::warn!("fleet store: saving the cache: {e}");
                    }
                }
            });
        }
        if secrets.current_revision.is_some() {
            // etcd answered: start from its state, not from an older saved one.
            let first = first.clone();
            run_on(&handle, async move {
                let _ = tokio::time::timeout(start_wait, first.notified()).await;
            });
        }
        Ok(EtcdStore {
            shared,
            keys,
            challenge_key: secrets.challenge_key,
            verify_now: Arc::new(Notify::new()),
            runtime: Some(runtime.take()),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .handle()
    }

    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        run_on(self.handle(), fut)
    }

    /// The revision the cache has applied, as it moves (for the member record and status).
    pub fn applied_revision(&self) -> watch::Receiver<i64> {
        self.shared.applied.subscribe()
    }

    /// etcd's health as this store's calls see it.
    pub fn health(&self) -> watch::Receiver<StoreHealth> {
        self.shared.etcd.health()
    }

    /// How many reservations and tokens the cache holds.
    pub fn cached_counts(&self) -> (usize, usize) {
        let c = self.shared.lock();
        (c.reservations.len(), c.tokens.len())
    }

    fn etcd_key(&self, record: &str) -> String {
        format!("{}{record}", self.keys.reservations())
    }

    /// Waits (bounded) until the cache has applied `revision`.
    fn wait_applied(&self, revision: i64) {
        let mut rx = self.shared.applied.subscribe();
        self.run(async move {
            let _ = tokio::time::timeout(APPLY_WAIT, rx.wait_for(|a| *a >= revision)).await;
        });
    }

    fn txn(&self, txn: Txn) -> Result<(bool, i64), StoreError> {
        let etcd = self.shared.etcd.clone();
        let r = self
            .run(async move { etcd.txn(txn).await })
            .map_err(unavailable)?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok((r.succeeded(), revision))
    }

    /// The record at `record` as etcd holds it now, with its mod revision.
    fn read(&self, record: &str) -> Result<Option<(Reservation, i64)>, StoreError> {
        let etcd = self.shared.etcd.clone();
        let key = self.etcd_key(record);
        let kv = self
            .run(async move { etcd.get(&key).await })
            .map_err(unavailable)?;
        match kv {
            Some(kv) => Ok(Some((decode(record, kv.value())?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    fn contention(what: &str) -> StoreError {
        StoreError::Db(format!(
            "{what}: other gateways kept changing the same records; try again"
        ))
    }
}

/// The fleet secrets a gateway opened at start.
struct Secrets {
    challenge_key: ChallengeKey,
    sealed_challenge_key: Vec<u8>,
    sealed_key_check: Vec<u8>,
    /// etcd's revision when it answered (None: started from the saved cache).
    current_revision: Option<i64>,
}

fn wrong_key(e: meshgate_fleet::SealError) -> String {
    format!("fleet key refused, not starting: {e}")
}

fn open_challenge_key(
    keys: &FleetKeys,
    fleet_key: &FleetKey,
    sealed: &[u8],
) -> Result<ChallengeKey, String> {
    let plain = fleet_key
        .open(&keys.challenge_key(), sealed)
        .map_err(wrong_key)?;
    let bytes: [u8; 32] = plain
        .as_slice()
        .try_into()
        .map_err(|_| format!("{}: not a 32-byte key", keys.challenge_key()))?;
    Ok(ChallengeKey::from_bytes(bytes))
}

fn fetch_saved_secrets(
    keys: &FleetKeys,
    fleet_key: &FleetKey,
    saved: Option<&Cache>,
    why: &str,
) -> Result<Secrets, String> {
    let (Some(check), Some(challenge)) = (
        saved.and_then(|c| c.sealed_key_check.clone()),
        saved.and_then(|c| c.sealed_challenge_key.clone()),
    ) else {
        return Err(format!(
            "{why}, and no saved fleet cache to start from (a gateway's first start needs etcd)"
        ));
    };
    fleet_key
        .open(&keys.key_check(), &check)
        .map_err(wrong_key)?;
    tracing::warn!("fleet store: {why}; serving the saved cache until etcd answers");
    Ok(Secrets {
        challenge_key: open_challenge_key(keys, fleet_key, &challenge)?,
        sealed_challenge_key: challenge,
        sealed_key_check: check,
        current_revision: None,
    })
}

/// Reads a sealed secret at `key`, creating it (sealed `make()`) when absent; returns the
/// sealed bytes as stored.
async fn get_or_create_sealed(
    etcd: &Etcd,
    fleet_key: &FleetKey,
    key: &str,
    make: impl Fn() -> Vec<u8>,
) -> Result<Vec<u8>, FleetError> {
    loop {
        if let Some(kv) = etcd.get(key).await? {
            return Ok(kv.value().to_vec());
        }
        let sealed = fleet_key.seal(key, &make());
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, sealed.clone(), None)]);
        if etcd.txn(txn).await?.succeeded() {
            return Ok(sealed);
        }
        // Another gateway created it first: read theirs.
    }
}

async fn fetch_secrets(
    etcd: &Etcd,
    keys: &FleetKeys,
    fleet_key: &FleetKey,
    saved: Option<&Cache>,
) -> Result<Secrets, String> {
    let fetched = async {
        let check =
            get_or_create_sealed(etcd, fleet_key, &keys.key_check(), || KEY_CHECK.to_vec()).await?;
        let challenge = get_or_create_sealed(etcd, fleet_key, &keys.challenge_key(), || {
            ChallengeKey::generate().secret().to_vec()
        })
        .await?;
        let revision = etcd.revision(keys.root()).await?;
        Ok::<_, FleetError>((check, challenge, revision))
    };
    match fetched.await {
        Ok((check, challenge, revision)) => {
            fleet_key
                .open(&keys.key_check(), &check)
                .map_err(wrong_key)?;
            Ok(Secrets {
                challenge_key: open_challenge_key(keys, fleet_key, &challenge)?,
                sealed_challenge_key: challenge,
                sealed_key_check: check,
                current_revision: Some(revision),
            })
        }
        Err(e @ FleetError::Unavailable { .. }) => {
            fetch_saved_secrets(keys, fleet_key, saved, &e.to_string())
        }
        Err(e) => Err(format!("fleet secrets in etcd: {e}")),
    }
}

impl ReservationStore for EtcdStore {
    fn farmer_domain(&self) -> &str {
        &self.shared.farmer_domain
    }

    fn challenge_token(&self, owner: &str, fqdn: &str) -> String {
        self.challenge_key.token_for(owner, fqdn)
    }

    fn routes(&self) -> watch::Receiver<Arc<Vec<Route>>> {
        self.shared.views.routes.subscribe()
    }

    fn verified_domains(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.shared.views.verified.subscribe()
    }

    fn request_verification(&self) {
        self.verify_now.notify_one();
    }

    fn verification_requests(&self) -> Arc<Notify> {
        self.verify_now.clone()
    }

    fn get(&self, key: &Key) -> Result<Option<Reservation>, StoreError> {
        let c = self.shared.lock();
        Ok(c.reservations
            .get(&record_key(key))
            .map(|e| e.value.clone()))
    }

    fn list(
        &self,
        owner: Option<&str>,
        kind: Option<Kind>,
    ) -> Result<Vec<Reservation>, StoreError> {
        let c = self.shared.lock();
        Ok(c.reservations
            .values()
            .map(|e| &e.value)
            .filter(|r| owner.is_none_or(|o| o == r.owner) && kind.is_none_or(|k| k == r.kind))
            .cloned()
            .collect())
    }

    fn create(&self, r: &Reservation, max_per_owner: usize) -> Result<(), StoreError> {
        let record = record_key(&r.key());
        let key = self.etcd_key(&record);
        let bytes = encode(r)?;
        let prefix = self.keys.reservations();
        for _ in 0..MAX_ATTEMPTS {
            // Check against the cache as of its revision, and commit only if no reservation
            // changed after it: the checks then held in etcd too.
            let revision = {
                let c = self.shared.lock();
                let existing = c.reservations.get(&record).map(|e| &e.value);
                check_create(
                    r,
                    existing,
                    c.reservations.values().map(|e| &e.value),
                    max_per_owner,
                )?;
                c.revision
            };
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(prefix.as_str(), CompareOp::Less, revision + 1)
                        .with_prefix(),
                ])
                .and_then([TxnOp::put(key.as_str(), bytes.clone(), None)]);
            let (ok, at) = self.txn(txn)?;
            self.wait_applied(at);
            if ok {
                return Ok(());
            }
        }
        Err(Self::contention(&format!("create {}", r.key())))
    }

    fn update_with(
        &self,
        key: &Key,
        edit: &mut dyn FnMut(&mut Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError> {
        let record = record_key(key);
        let etcd_key = self.etcd_key(&record);
        for _ in 0..MAX_ATTEMPTS {
            let Some((current, mod_revision)) = self.read(&record)? else {
                return Ok(None);
            };
            let mut next = current.clone();
            if edit(&mut next).is_err() || next == current {
                return Ok(Some(current));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    etcd_key.as_str(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::put(etcd_key.as_str(), encode(&next)?, None)]);
            let (ok, at) = self.txn(txn)?;
            if ok {
                self.wait_applied(at);
                return Ok(Some(next));
            }
        }
        Err(Self::contention(&format!("update {key}")))
    }

    fn update_many(
        &self,
        keys: &[Key],
        edit: &mut dyn FnMut(&mut Vec<Reservation>),
    ) -> Result<Vec<Reservation>, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let mut current = BTreeMap::new();
            let mut compares = Vec::new();
            for key in keys {
                let record = record_key(key);
                let etcd_key = self.etcd_key(&record);
                match self.read(&record)? {
                    Some((r, rev)) => {
                        compares.push(Compare::mod_revision(
                            etcd_key.as_str(),
                            CompareOp::Equal,
                            rev,
                        ));
                        current.insert(record, r);
                    }
                    None => compares.push(Compare::version(etcd_key.as_str(), CompareOp::Equal, 0)),
                }
            }
            let mut batch: Vec<Reservation> = current.values().cloned().collect();
            edit(&mut batch);
            let mut ops = Vec::new();
            let mut kept = BTreeSet::new();
            for next in &batch {
                let record = record_key(&next.key());
                if current.get(&record) != Some(next) {
                    ops.push(TxnOp::put(self.etcd_key(&record), encode(next)?, None));
                }
                kept.insert(record);
            }
            for record in current.keys().filter(|k| !kept.contains(*k)) {
                ops.push(TxnOp::delete(self.etcd_key(record), None));
            }
            if ops.is_empty() {
                return Ok(batch);
            }
            let (ok, at) = self.txn(Txn::new().when(compares).and_then(ops))?;
            if ok {
                self.wait_applied(at);
                return Ok(batch);
            }
        }
        Err(Self::contention("update a batch of reservations"))
    }

    fn delete_with(
        &self,
        key: &Key,
        allow: &mut dyn FnMut(&Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError> {
        let record = record_key(key);
        let etcd_key = self.etcd_key(&record);
        for _ in 0..MAX_ATTEMPTS {
            let Some((current, mod_revision)) = self.read(&record)? else {
                return Ok(None);
            };
            if allow(&current).is_err() {
                return Ok(Some(current));
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    etcd_key.as_str(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::delete(etcd_key.as_str(), None)]);
            let (ok, at) = self.txn(txn)?;
            if ok {
                self.wait_applied(at);
                return Ok(Some(current));
            }
        }
        Err(Self::contention(&format!("delete {key}")))
    }

    fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        let key = format!("{}{}", self.keys.tokens(), token.id);
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(token)?, None)]);
        let (ok, at) = self.txn(txn)?;
        if !ok {
            return Err(StoreError::Conflict {
                key: format!("token {}", token.id),
                owner: token.owner.clone(),
            });
        }
        self.wait_applied(at);
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        Ok(self.shared.lock().tokens.get(id).map(|e| e.value.clone()))
    }

    fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        Ok(self
            .shared
            .lock()
            .tokens
            .values()
            .map(|e: &Entry<StoredToken>| e.value.clone())
            .collect())
    }

    fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let key = format!("{}{id}", self.keys.tokens());
        let etcd = self.shared.etcd.clone();
        let r = self
            .run(async move {
                let txn = Txn::new().and_then([TxnOp::delete(key.as_str(), None)]);
                etcd.txn(txn).await
            })
            .map_err(unavailable)?;
        let deleted = r.op_responses().iter().any(|op| match op {
            meshgate_fleet::etcd::TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        let at = r.header().map(|h| h.revision()).unwrap_or(0);
        self.wait_applied(at);
        Ok(deleted)
    }
}
