//! The reservation store: an embedded redb database in the data directory.
//!
//! Every change is one redb write transaction (durable on commit, atomic across crashes). After
//! each commit the store recomputes the routable reservations and publishes them on a
//! `watch` channel the gateway swaps into its routing table, and the set of verified domains
//! the certificate layer orders certificates for.
//!
//! Records are JSON so fields can be added without a migration.

use crate::reservation::{Key, Kind, Reservation};
use crate::route::Route;
use crate::token::{ChallengeKey, SecretError, StoredToken};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{Notify, watch};

const RESERVATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("reservations");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// File names inside the data directory.
pub const DB_FILE: &str = "reservations.redb";
pub const CHALLENGE_KEY_FILE: &str = "challenge.key";

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reservation store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("reservation store: {0}")]
    Db(String),
    #[error("reservation store: record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error("{key} is already reserved")]
    Conflict { key: String, owner: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

fn record_key(key: &Key) -> String {
    format!("{}/{}", key.kind.as_str(), key.name)
}

/// Current time in unix seconds.
pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Current time in unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The persistent reservation and token store.
pub struct Store {
    db: Database,
    farmer_domain: String,
    challenge_key: ChallengeKey,
    routes: watch::Sender<Arc<Vec<Route>>>,
    verified: watch::Sender<Arc<BTreeSet<String>>>,
    verify_now: Arc<Notify>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("farmer_domain", &self.farmer_domain)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `data_dir` for a gateway serving `farmer_domain`.
    /// Creates the directory (0700), the database (0600) and the challenge key (0600).
    pub fn open(data_dir: &Path, farmer_domain: &str) -> Result<Store, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: data_dir.to_path_buf(),
            message,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| open_err(format!("cannot create the data directory: {e}")))?;
        let path = data_dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| StoreError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_err(format!("cannot restrict {DB_FILE} to 0600: {e}")))?;
        let challenge_key = ChallengeKey::load_or_create(&data_dir.join(CHALLENGE_KEY_FILE))?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(RESERVATIONS).map_err(db_err)?;
        txn.open_table(TOKENS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let store = Store {
            db,
            farmer_domain: farmer_domain.trim_end_matches('.').to_ascii_lowercase(),
            challenge_key,
            routes: watch::Sender::new(Arc::new(Vec::new())),
            verified: watch::Sender::new(Arc::new(BTreeSet::new())),
            verify_now: Arc::new(Notify::new()),
        };
        store.publish()?;
        Ok(store)
    }

    /// The farmer's domain names are reserved under.
    pub fn farmer_domain(&self) -> &str {
        &self.farmer_domain
    }

    /// The TXT value `owner` must publish at `_meshgate-challenge.<fqdn>`.
    pub fn challenge_token(&self, owner: &str, fqdn: &str) -> String {
        self.challenge_key.token_for(owner, fqdn)
    }

    /// Routes of every routable reservation (all names, active domains), sorted by host.
    /// Updated after every committed change.
    pub fn routes(&self) -> watch::Receiver<Arc<Vec<Route>>> {
        self.routes.subscribe()
    }

    /// FQDNs of verified and active domains: the names the certificate layer may order
    /// certificates for (names are covered by the farmer's wildcard certificate).
    pub fn verified_domains(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.verified.subscribe()
    }

    /// Asks the verifier to check pending domains now instead of at its next tick.
    pub fn request_verification(&self) {
        self.verify_now.notify_one();
    }

    /// What the verifier waits on besides its interval.
    pub fn verification_requests(&self) -> Arc<Notify> {
        self.verify_now.clone()
    }

    /// One reservation.
    pub fn get(&self, key: &Key) -> Result<Option<Reservation>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(RESERVATIONS).map_err(db_err)?;
        let k = record_key(key);
        match table.get(k.as_str()).map_err(db_err)? {
            Some(v) => decode(&k, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Reservations, optionally only one owner's and/or one kind, sorted by kind then name.
    pub fn list(
        &self,
        owner: Option<&str>,
        kind: Option<Kind>,
    ) -> Result<Vec<Reservation>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(RESERVATIONS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let r: Reservation = decode(k.value(), v.value())?;
            if owner.is_none_or(|o| o == r.owner) && kind.is_none_or(|kd| kd == r.kind) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Inserts a new reservation; `Conflict` if the key is taken (by anyone).
    pub fn create(&self, r: &Reservation) -> Result<(), StoreError> {
        let key = r.key();
        let k = record_key(&key);
        let bytes = encode(r)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            if let Some(existing) = table.get(k.as_str()).map_err(db_err)? {
                let existing: Reservation = decode(&k, existing.value())?;
                return Err(StoreError::Conflict {
                    key: key.to_string(),
                    owner: existing.owner,
                });
            }
            table.insert(k.as_str(), bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        self.publish()
    }

    /// Changes a reservation inside one transaction. `f` sees the current record and may
    /// refuse (its error is returned and nothing is written). `Ok(None)` if it does not exist.
    pub fn update<E: From<StoreError>>(
        &self,
        key: &Key,
        f: impl FnOnce(&mut Reservation) -> Result<(), E>,
    ) -> Result<Option<Reservation>, E> {
        let k = record_key(key);
        let txn = self.db.begin_write().map_err(db_err)?;
        let updated = {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let current = match table.get(k.as_str()).map_err(db_err)? {
                Some(v) => decode::<Reservation>(&k, v.value())?,
                None => return Ok(None),
            };
            let mut next = current.clone();
            f(&mut next)?;
            if next == current {
                return Ok(Some(next));
            }
            let bytes = encode(&next)?;
            table.insert(k.as_str(), bytes.as_slice()).map_err(db_err)?;
            next
        };
        txn.commit().map_err(db_err)?;
        self.publish()?;
        Ok(Some(updated))
    }

    /// Applies `f` to each existing reservation of `keys` in one transaction (one commit, one
    /// publish), e.g. a verification round. Missing keys are skipped. Returns the updated
    /// records.
    pub fn update_many(
        &self,
        keys: &[Key],
        mut f: impl FnMut(&mut Reservation),
    ) -> Result<Vec<Reservation>, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let mut out = Vec::with_capacity(keys.len());
        {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            for key in keys {
                let k = record_key(key);
                let current = match table.get(k.as_str()).map_err(db_err)? {
                    Some(v) => decode::<Reservation>(&k, v.value())?,
                    None => continue,
                };
                let mut next = current.clone();
                f(&mut next);
                if next != current {
                    let bytes = encode(&next)?;
                    table.insert(k.as_str(), bytes.as_slice()).map_err(db_err)?;
                }
                out.push(next);
            }
        }
        txn.commit().map_err(db_err)?;
        self.publish()?;
        Ok(out)
    }

    /// Deletes a reservation if `allow` accepts it. `Ok(None)` if it does not exist.
    pub fn delete<E: From<StoreError>>(
        &self,
        key: &Key,
        allow: impl FnOnce(&Reservation) -> Result<(), E>,
    ) -> Result<Option<Reservation>, E> {
        let k = record_key(key);
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed = {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let current = match table.get(k.as_str()).map_err(db_err)? {
                Some(v) => decode::<Reservation>(&k, v.value())?,
                None => return Ok(None),
            };
            allow(&current)?;
            table.remove(k.as_str()).map_err(db_err)?;
            current
        };
        txn.commit().map_err(db_err)?;
        self.publish()?;
        Ok(Some(removed))
    }

    /// Records whether the certificate layer holds a certificate for `fqdn`; a verified
    /// domain waiting for one becomes active.
    pub fn set_certificate_ready(
        &self,
        fqdn: &str,
        ready: bool,
    ) -> Result<Option<Reservation>, StoreError> {
        let rules = crate::verify::Rules {
            require_certificate: true,
            grace_ms: u64::MAX,
        };
        self.update(&Key::domain(fqdn), |r| {
            crate::verify::step(
                r,
                crate::verify::Input::CertificateReady(ready),
                now_unix_ms(),
                &rules,
            );
            Ok::<(), StoreError>(())
        })
    }

    /// Stores a deployer token (hash only).
    pub fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        let bytes = encode(token)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(TOKENS)
            .map_err(db_err)?
            .insert(token.id.as_str(), bytes.as_slice())
            .map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    /// A deployer token by id.
    pub fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TOKENS).map_err(db_err)?;
        match table.get(id).map_err(db_err)? {
            Some(v) => decode(id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every deployer token (hashes only).
    pub fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TOKENS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Revokes a deployer token; false if there was none.
    pub fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let existed = txn
            .open_table(TOKENS)
            .map_err(db_err)?
            .remove(id)
            .map_err(db_err)?
            .is_some();
        txn.commit().map_err(db_err)?;
        Ok(existed)
    }

    /// Recomputes and publishes routes and verified domains (only if they changed).
    fn publish(&self) -> Result<(), StoreError> {
        let all = self.list(None, None)?;
        let mut routes: Vec<Route> = all
            .iter()
            .filter(|r| r.is_routable())
            .map(|r| r.to_route(&self.farmer_domain))
            .collect();
        routes.sort_by(|a, b| a.host.cmp(&b.host));
        let verified: BTreeSet<String> = all
            .iter()
            .filter(|r| r.kind == Kind::Domain && r.status.is_verified())
            .map(|r| r.name.clone())
            .collect();
        self.routes.send_if_modified(|cur| {
            if **cur == routes {
                return false;
            }
            *cur = Arc::new(routes);
            true
        });
        self.verified.send_if_modified(|cur| {
            if **cur == verified {
                return false;
            }
            *cur = Arc::new(verified);
            true
        });
        Ok(())
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(db_err)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}
