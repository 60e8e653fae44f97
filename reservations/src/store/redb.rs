//! The single-gateway reservation store: an embedded redb database in the data directory.
//!
//! Every change is one redb write transaction (durable on commit, atomic across crashes). After
//! each commit the store recomputes the routable reservations and publishes them on a
//! `watch` channel the gateway swaps into its routing table, and the set of verified domains
//! the certificate layer orders certificates for.
//!
//! Records are JSON so fields can be added without a migration.

use super::rules::{Views, check_create, record_key};
use super::{Refused, ReservationStore, StoreError};
use crate::reservation::{Key, Kind, Reservation};
use crate::token::{ChallengeKey, StoredToken};
use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use meshgate_config::route::Route;
use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{Notify, watch};

const RESERVATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("reservations");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// File names inside the data directory.
const DB_FILE: &str = "reservations.redb";
const CHALLENGE_KEY_FILE: &str = "challenge.key";

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The persistent reservation and token store of one gateway.
pub struct RedbStore {
    db: Database,
    farmer_domain: String,
    challenge_key: ChallengeKey,
    views: Views,
    verify_now: Arc<Notify>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("farmer_domain", &self.farmer_domain)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) the store in `data_dir` for a gateway serving `farmer_domain`.
    /// Creates the directory (0700), the database (0600) and the challenge key (0600).
    pub fn open(data_dir: &Path, farmer_domain: &str) -> Result<RedbStore, StoreError> {
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
        migrate_domain_keys(&mut txn.open_table(RESERVATIONS).map_err(db_err)?)?;
        txn.open_table(TOKENS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let store = RedbStore {
            db,
            farmer_domain: farmer_domain.trim_end_matches('.').to_ascii_lowercase(),
            challenge_key,
            views: Views::new(),
            verify_now: Arc::new(Notify::new()),
        };
        store.publish()?;
        Ok(store)
    }

    /// Runs `f` on the current record of `key` inside one write transaction, writing the
    /// record back when `f` changed it and accepts. `Ok(None)` if there is no such record.
    fn edit(
        &self,
        key: &Key,
        f: &mut dyn FnMut(&mut Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError> {
        let k = record_key(key);
        let txn = self.db.begin_write().map_err(db_err)?;
        let updated = {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let current = match table.get(k.as_str()).map_err(db_err)? {
                Some(v) => decode::<Reservation>(&k, v.value())?,
                None => return Ok(None),
            };
            let mut next = current.clone();
            if f(&mut next).is_err() || next == current {
                return Ok(Some(current));
            }
            let bytes = encode(&next)?;
            table.insert(k.as_str(), bytes.as_slice()).map_err(db_err)?;
            next
        };
        txn.commit().map_err(db_err)?;
        self.publish()?;
        Ok(Some(updated))
    }

    /// Creates many reservations in one write transaction, each checked as [`create`] checks
    /// one (against the stored records and those before it in `rs`); nothing is written if
    /// one is refused. For bulk loads (a migration, the fleet benchmark's 10,000
    /// reservations): `create` re-reads every record per call, which is quadratic in bulk.
    ///
    /// [`create`]: ReservationStore::create
    pub fn create_many(&self, rs: &[Reservation], max_per_owner: usize) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let mut all = std::collections::BTreeMap::new();
            for item in table.iter().map_err(db_err)? {
                let (rk, v) = item.map_err(db_err)?;
                let other: Reservation = decode(rk.value(), v.value())?;
                all.insert(rk.value().to_string(), other);
            }
            for r in rs {
                let k = record_key(&r.key());
                check_create(r, all.get(&k), all.values(), max_per_owner)?;
                table
                    .insert(k.as_str(), encode(r)?.as_slice())
                    .map_err(db_err)?;
                all.insert(k, r.clone());
            }
        }
        txn.commit().map_err(db_err)?;
        self.publish()
    }

    /// Recomputes and publishes routes and verified domains (only if they changed).
    fn publish(&self) -> Result<(), StoreError> {
        let all = self.list(None, None)?;
        self.views.publish(&self.farmer_domain, &all);
        Ok(())
    }
}

impl ReservationStore for RedbStore {
    fn farmer_domain(&self) -> &str {
        &self.farmer_domain
    }

    fn challenge_token(&self, owner: &str, fqdn: &str) -> String {
        self.challenge_key.token_for(owner, fqdn)
    }

    fn routes(&self) -> watch::Receiver<Arc<Vec<Route>>> {
        self.views.routes.subscribe()
    }

    fn verified_domains(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.views.verified.subscribe()
    }

    fn request_verification(&self) {
        self.verify_now.notify_one();
    }

    fn verification_requests(&self) -> Arc<Notify> {
        self.verify_now.clone()
    }

    fn get(&self, key: &Key) -> Result<Option<Reservation>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(RESERVATIONS).map_err(db_err)?;
        let k = record_key(key);
        match table.get(k.as_str()).map_err(db_err)? {
            Some(v) => decode(&k, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn list(
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

    fn create(&self, r: &Reservation, max_per_owner: usize) -> Result<(), StoreError> {
        let key = r.key();
        let k = record_key(&key);
        let bytes = encode(r)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let mut all = Vec::new();
            let mut existing = None;
            for item in table.iter().map_err(db_err)? {
                let (rk, v) = item.map_err(db_err)?;
                let other: Reservation = decode(rk.value(), v.value())?;
                if rk.value() == k {
                    existing = Some(other.clone());
                }
                all.push(other);
            }
            check_create(r, existing.as_ref(), &all, max_per_owner)?;
            table.insert(k.as_str(), bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        self.publish()
    }

    fn update_with(
        &self,
        key: &Key,
        edit: &mut dyn FnMut(&mut Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError> {
        self.edit(key, edit)
    }

    fn update_many(
        &self,
        keys: &[Key],
        edit: &mut dyn FnMut(&mut Vec<Reservation>),
    ) -> Result<Vec<Reservation>, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let out = {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let mut current = std::collections::BTreeMap::new();
            for key in keys {
                let k = record_key(key);
                if let Some(v) = table.get(k.as_str()).map_err(db_err)? {
                    current.insert(k.clone(), decode::<Reservation>(&k, v.value())?);
                }
            }
            let mut batch: Vec<Reservation> = current.values().cloned().collect();
            edit(&mut batch);
            let mut kept = std::collections::BTreeSet::new();
            for next in &batch {
                let k = record_key(&next.key());
                if current.get(&k) != Some(next) {
                    let bytes = encode(next)?;
                    table.insert(k.as_str(), bytes.as_slice()).map_err(db_err)?;
                }
                kept.insert(k);
            }
            for k in current.keys().filter(|k| !kept.contains(*k)) {
                table.remove(k.as_str()).map_err(db_err)?;
            }
            batch
        };
        txn.commit().map_err(db_err)?;
        self.publish()?;
        Ok(out)
    }

    fn delete_with(
        &self,
        key: &Key,
        allow: &mut dyn FnMut(&Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError> {
        let k = record_key(key);
        let txn = self.db.begin_write().map_err(db_err)?;
        let removed = {
            let mut table = txn.open_table(RESERVATIONS).map_err(db_err)?;
            let current = match table.get(k.as_str()).map_err(db_err)? {
                Some(v) => decode::<Reservation>(&k, v.value())?,
                None => return Ok(None),
            };
            if allow(&current).is_err() {
                return Ok(Some(current));
            }
            table.remove(k.as_str()).map_err(db_err)?;
            current
        };
        txn.commit().map_err(db_err)?;
        self.publish()?;
        Ok(Some(removed))
    }

    fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        let bytes = encode(token)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(TOKENS)
            .map_err(db_err)?
            .insert(token.id.as_str(), bytes.as_slice())
            .map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TOKENS).map_err(db_err)?;
        match table.get(id).map_err(db_err)? {
            Some(v) => decode(id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TOKENS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn delete_token(&self, id: &str) -> Result<bool, StoreError> {
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
}

/// Records written before domains could have several claims were keyed `domain/<fqdn>`;
/// they become `domain/<fqdn>/<owner>`.
fn migrate_domain_keys(table: &mut ::redb::Table<&str, &[u8]>) -> Result<(), StoreError> {
    let mut old = Vec::new();
    for item in table.iter().map_err(db_err)? {
        let (k, v) = item.map_err(db_err)?;
        let key = k.value();
        if key.starts_with("domain/") && key.matches('/').count() == 1 {
            old.push((key.to_string(), v.value().to_vec()));
        }
    }
    for (k, bytes) in old {
        let r: Reservation = decode(&k, &bytes)?;
        table.remove(k.as_str()).map_err(db_err)?;
        table
            .insert(record_key(&r.key()).as_str(), bytes.as_slice())
            .map_err(db_err)?;
    }
    Ok(())
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
