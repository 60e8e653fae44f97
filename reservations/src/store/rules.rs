//! What every backend computes the same way: the record key of a reservation, the checks a
//! new reservation must pass against the stored ones, and the views derived from all of them
//! (routes, verified domains) with their publication.

use super::StoreError;
use crate::reservation::{Key, Kind, Reservation, Status};
use meshgate_config::route::Route;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::watch;

/// `name/<label>`, or `domain/<fqdn>/<owner>`: one record per claim on a domain.
pub(crate) fn record_key(key: &Key) -> String {
    match &key.owner {
        Some(owner) => format!("{}/{}/{owner}", key.kind.as_str(), key.name),
        None => format!("{}/{}", key.kind.as_str(), key.name),
    }
}

/// The checks of `ReservationStore::create`: `existing` is the record stored under the new
/// one's key, `all` every stored record.
pub(crate) fn check_create<'a>(
    r: &Reservation,
    existing: Option<&Reservation>,
    all: impl IntoIterator<Item = &'a Reservation>,
    max_per_owner: usize,
) -> Result<(), StoreError> {
    let key = r.key();
    if let Some(existing) = existing
        && !matches!(existing.status, Status::Dropped { .. })
    {
        return Err(StoreError::Conflict {
            key: key.to_string(),
            owner: existing.owner.clone(),
        });
    }
    let mut held_by_owner = 0;
    for other in all {
        if matches!(other.status, Status::Dropped { .. }) {
            continue;
        }
        if other.owner == r.owner {
            held_by_owner += 1;
        }
        if r.kind == Kind::Domain
            && other.kind == Kind::Domain
            && other.name == r.name
            && other.owner != r.owner
            && other.status.is_verified()
        {
            return Err(StoreError::Held {
                key: key.to_string(),
            });
        }
    }
    if held_by_owner >= max_per_owner {
        return Err(StoreError::Quota {
            owner: r.owner.clone(),
            limit: max_per_owner,
        });
    }
    Ok(())
}

/// The derived views' channels a backend publishes on.
#[derive(Debug)]
pub(crate) struct Views {
    pub routes: watch::Sender<Arc<Vec<Route>>>,
    pub verified: watch::Sender<Arc<BTreeSet<String>>>,
}

impl Views {
    pub fn new() -> Views {
        Views {
            routes: watch::Sender::new(Arc::new(Vec::new())),
            verified: watch::Sender::new(Arc::new(BTreeSet::new())),
        }
    }

    /// Recomputes routes and verified domains from every record and publishes those that
    /// changed.
    pub fn publish<'a>(&self, farmer_domain: &str, all: impl IntoIterator<Item = &'a Reservation>) {
        let mut routes = Vec::new();
        let mut verified = BTreeSet::new();
        for r in all {
            if r.kind == Kind::Domain && r.status.is_verified() {
                verified.insert(r.name.clone());
            }
            if !r.is_routable() {
                continue;
            }
            match r.to_route(farmer_domain) {
                Ok(route) => routes.push(route),
                Err(e) => {
                    tracing::error!(reservation = %r.key(), "not routed, invalid host: {e}");
                }
            }
        }
        routes.sort_by(|a, b| a.host.cmp(&b.host));
        // At most one claim on a domain is active (see `lifecycle::settle`); should a bug let
        // two through, one host still gets one route.
        routes.dedup_by(|a, b| a.host == b.host);
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
    }
}
