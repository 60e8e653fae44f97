//! The reservation store seam: [`ReservationStore`], what every backend offers, and
//! [`StoreError`]. [`redb::RedbStore`] (one gateway, an embedded database) is the first
//! backend; [`etcd::EtcdStore`] (several gateways on etcd, each serving from a local cache fed
//! by a watch) implements the same trait. The rules both apply alike live in `rules`.
//!
//! Consumers (the admin API, the verifier, the certificate follower) hold an
//! `Arc<dyn ReservationStore>` and never name a backend. The trait is object-safe: edits are
//! `&mut dyn FnMut` closures, and [`ReservationStoreExt`] adds the typed-error forms on top.

pub mod etcd;
pub mod redb;
mod rules;

use crate::lifecycle::{self, Input, Rules};
use crate::reservation::{Key, Kind, Reservation};
use crate::token::{SecretError, StoredToken};
use meshgate_config::route::Route;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::{Notify, watch};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reservation store {path}: {message}")]
    Open {
        path: std::path::PathBuf,
        message: String,
    },
    /// The backend failed (I/O, transaction, connection).
    #[error("reservation store: {0}")]
    Db(String),
    #[error("reservation store: record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error("{key} is already reserved")]
    Conflict { key: String, owner: String },
    /// Another deployer holds the domain (its proof holds).
    #[error("{key}: the domain is held by another deployer")]
    Held { key: String },
    /// The owner already holds the most reservations allowed.
    #[error("{owner} holds {limit} reservations, the most allowed")]
    Quota { owner: String, limit: usize },
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The shared store cannot be reached (etcd quorum lost or members down): reads are
    /// served from the local cache, writes are refused until it returns.
    #[error("reservation store unavailable: {cause}")]
    Unavailable { cause: String },
}

/// An edit closure's refusal: nothing is written and the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// A store shared by the gateway's tasks.
pub type SharedStore = Arc<dyn ReservationStore>;

/// Reservations and deployer tokens, durable, with the derived views the gateway follows.
///
/// Edit closures (`update_with`, `update_many`, `delete_with`) see the current record and
/// may run more than once for one call: a backend with optimistic concurrency re-reads and
/// re-applies them when another writer got there first. They must therefore only compute
/// from the record they are given and what they capture.
pub trait ReservationStore: Send + Sync + std::fmt::Debug {
    /// The farmer's domain names are reserved under (lowercase, no trailing dot).
    fn farmer_domain(&self) -> &str;

    /// The TXT value `owner` must publish at `_meshgate-challenge.<fqdn>`.
    fn challenge_token(&self, owner: &str, fqdn: &str) -> String;

    /// Routes of every routable reservation (all names, active domains), sorted by host.
    /// Updated after every committed change.
    fn routes(&self) -> watch::Receiver<Arc<Vec<Route>>>;

    /// FQDNs of verified and active domains: the names the certificate layer may order
    /// certificates for (names are covered by the farmer's wildcard certificate).
    fn verified_domains(&self) -> watch::Receiver<Arc<BTreeSet<String>>>;

    /// Asks the verifier to check pending domains now instead of at its next tick.
    fn request_verification(&self);

    /// What the verifier waits on besides its interval.
    fn verification_requests(&self) -> Arc<Notify>;

    /// One reservation.
    fn get(&self, key: &Key) -> Result<Option<Reservation>, StoreError>;

    /// Reservations, optionally only one owner's and/or one kind, sorted by kind then name.
    fn list(&self, owner: Option<&str>, kind: Option<Kind>)
    -> Result<Vec<Reservation>, StoreError>;

    /// Inserts a new reservation atomically with its checks: `Conflict` if the key is taken
    /// (a name by anyone; a domain claim by the same owner, unless that claim was dropped,
    /// which the new one replaces), `Held` if another owner's claim on the domain is
    /// verified or active, `Quota` if the owner already has `max_per_owner` reservations
    /// (dropped claims not counted).
    fn create(&self, r: &Reservation, max_per_owner: usize) -> Result<(), StoreError>;

    /// Changes a reservation atomically. `edit` may refuse (nothing is written). `Ok(None)`
    /// if it does not exist; else the record as it is now (unchanged after a refusal).
    fn update_with(
        &self,
        key: &Key,
        edit: &mut dyn FnMut(&mut Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError>;

    /// Hands the existing reservations of `keys` (missing ones skipped) to `edit` as one
    /// batch and commits what it leaves in one atomic change (one publish): changed records
    /// are written, records it removed from the batch are deleted. E.g. a verification
    /// round, which settles competing claims across records. Returns the batch as committed.
    fn update_many(
        &self,
        keys: &[Key],
        edit: &mut dyn FnMut(&mut Vec<Reservation>),
    ) -> Result<Vec<Reservation>, StoreError>;

    /// Every claim on the domain `fqdn` (at most one of them verified or active).
    fn domain_claims(&self, fqdn: &str) -> Result<Vec<Reservation>, StoreError> {
        Ok(self
            .list(None, Some(Kind::Domain))?
            .into_iter()
            .filter(|r| r.name == fqdn)
            .collect())
    }

    /// Deletes a reservation unless `allow` refuses. `Ok(None)` if it does not exist; else
    /// the record (still stored after a refusal).
    fn delete_with(
        &self,
        key: &Key,
        allow: &mut dyn FnMut(&Reservation) -> Result<(), Refused>,
    ) -> Result<Option<Reservation>, StoreError>;

    /// Stores a deployer token (hash only).
    fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError>;

    /// A deployer token by id.
    fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError>;

    /// Every deployer token (hashes only).
    fn tokens(&self) -> Result<Vec<StoredToken>, StoreError>;

    /// Revokes a deployer token; false if there was none.
    fn delete_token(&self, id: &str) -> Result<bool, StoreError>;

    /// Records whether the certificate layer holds a certificate for `fqdn` on its claims; a
    /// verified domain waiting for one becomes active. Returns the verified claim, if any.
    fn set_certificate_ready(
        &self,
        fqdn: &str,
        ready: bool,
    ) -> Result<Option<Reservation>, StoreError> {
        let rules = Rules {
            require_certificate: true,
            grace_ms: u64::MAX,
        };
        let now_ms = crate::clock::now_unix_ms();
        let mut holder = None;
        for claim in self.domain_claims(fqdn)? {
            let updated = self.update_with(&claim.key(), &mut |r| {
                lifecycle::step(r, Input::CertificateReady(ready), now_ms, &rules);
                Ok(())
            })?;
            if let Some(r) = updated.filter(|r| r.status.is_verified()) {
                holder = Some(r);
            }
        }
        Ok(holder)
    }
}

/// [`ReservationStore`]'s edits with the caller's own error type: the closure's error is
/// handed back as is, and a store failure converts into it.
pub trait ReservationStoreExt: ReservationStore {
    /// [`ReservationStore::update_with`] whose `edit` refuses with an `E`.
    fn update<E: From<StoreError>>(
        &self,
        key: &Key,
        mut edit: impl FnMut(&mut Reservation) -> Result<(), E>,
    ) -> Result<Option<Reservation>, E> {
        let mut refusal = None;
        let updated = self.update_with(key, &mut |r| {
            edit(r).map_err(|e| {
                refusal = Some(e);
                Refused
            })
        })?;
        refusal.map_or(Ok(updated), Err)
    }

    /// [`ReservationStore::delete_with`] whose `allow` refuses with an `E`.
    fn delete<E: From<StoreError>>(
        &self,
        key: &Key,
        mut allow: impl FnMut(&Reservation) -> Result<(), E>,
    ) -> Result<Option<Reservation>, E> {
        let mut refusal = None;
        let removed = self.delete_with(key, &mut |r| {
            allow(r).map_err(|e| {
                refusal = Some(e);
                Refused
            })
        })?;
        refusal.map_or(Ok(removed), Err)
    }
}

impl<S: ReservationStore + ?Sized> ReservationStoreExt for S {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::{Options, Status};
    use meshgate_config::route::Mode;

    #[derive(Debug, PartialEq)]
    enum Refusal {
        No,
        Store,
    }

    impl From<StoreError> for Refusal {
        fn from(_: StoreError) -> Self {
            Refusal::Store
        }
    }

    fn store(dir: &std::path::Path) -> SharedStore {
        Arc::new(redb::RedbStore::open(dir, "farm.example").unwrap())
    }

    fn domain(fqdn: &str) -> Reservation {
        Reservation::new(
            Key::domain(fqdn, "alice"),
            "alice",
            vec!["[400::1]:80".parse().unwrap()],
            Mode::Terminate,
            Options::default(),
            1,
        )
    }

    #[test]
    fn a_refused_edit_returns_its_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.create(&domain("shop.example"), 10).unwrap();
        let key = Key::domain("shop.example", "alice");
        let refused = s.update(&key, |r| {
            r.owner = "mallory".into();
            Err(Refusal::No)
        });
        assert_eq!(refused, Err(Refusal::No));
        assert_eq!(s.get(&key).unwrap().unwrap().owner, "alice");
        assert_eq!(s.delete(&key, |_| Err(Refusal::No)), Err(Refusal::No));
        assert!(s.get(&key).unwrap().is_some());
        let missing = s.update(&Key::domain("none.example", "alice"), |_| {
            Ok::<(), Refusal>(())
        });
        assert_eq!(missing, Ok(None));
        let removed = s.delete(&key, |_| Ok::<(), Refusal>(())).unwrap();
        assert_eq!(removed.map(|r| r.name), Some("shop.example".to_string()));
        assert!(s.get(&key).unwrap().is_none());
    }

    #[test]
    fn certificate_news_activates_a_verified_domain() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut d = domain("shop.example");
        d.status = Status::Verified;
        s.create(&d, 10).unwrap();
        let r = s
            .set_certificate_ready("shop.example", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.status, Status::Active);
        assert!(r.verification.certificate_ready);
        let routes = s.routes().borrow().clone();
        assert_eq!(routes.len(), 1);
    }

    #[test]
    fn a_bulk_create_writes_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = redb::RedbStore::open(dir.path(), "farm.example").unwrap();
        let batch: Vec<Reservation> = (0..3).map(|i| domain(&format!("d{i}.example"))).collect();
        s.create_many(&batch, 3).unwrap();
        assert_eq!(s.list(None, None).unwrap().len(), 3);
        // A fourth for alice is over her quota of 3: the whole batch is refused, nothing new.
        let more = vec![domain("e0.example"), domain("d0.example")];
        assert!(matches!(
            s.create_many(&more, 10),
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            s.create_many(&[domain("e0.example")], 3),
            Err(StoreError::Quota { limit: 3, .. })
        ));
        assert_eq!(s.list(None, None).unwrap().len(), 3);
        assert!(
            s.get(&Key::domain("e0.example", "alice"))
                .unwrap()
                .is_none()
        );
    }
}
