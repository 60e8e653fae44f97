//! The gateway's copy of the fleet's reservations and tokens: fed by the etcd watch, read by
//! every lookup, and saved to `data_dir` so a gateway restarted while etcd is down still
//! serves what it last knew.

use crate::reservation::Reservation;
use crate::token::StoredToken;
use meshgate_fleet::{Change, WatchEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// A record and the etcd revision it was last written at (the optimistic-concurrency token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry<T> {
    pub mod_revision: i64,
    pub value: T,
}

/// What the gateway knows of the shared state, as of `revision`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Cache {
    /// The etcd revision applied last (0: nothing known yet).
    pub revision: i64,
    /// By record key (`name/<label>`, `domain/<fqdn>/<owner>`).
    pub reservations: BTreeMap<String, Entry<Reservation>>,
    /// By token id.
    pub tokens: BTreeMap<String, Entry<StoredToken>>,
    /// The sealed challenge key and key check, as etcd holds them (opened at start).
    #[serde(default)]
    pub sealed_challenge_key: Option<Vec<u8>>,
    #[serde(default)]
    pub sealed_key_check: Option<Vec<u8>>,
}

/// Where a key under the state prefix belongs.
enum Slot<'a> {
    Reservation(&'a str),
    Token(&'a str),
    Other,
}

/// The state prefix's two sub-prefixes.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub reservations: String,
    pub tokens: String,
}

impl Layout {
    fn slot<'a>(&self, key: &'a str) -> Slot<'a> {
        if let Some(k) = key.strip_prefix(self.reservations.as_str()) {
            Slot::Reservation(k)
        } else if let Some(k) = key.strip_prefix(self.tokens.as_str()) {
            Slot::Token(k)
        } else {
            Slot::Other
        }
    }
}

impl Cache {
    /// Applies one watch event. A record that does not decode is logged and skipped (the
    /// rest of the fleet's state still serves).
    pub fn apply(&mut self, layout: &Layout, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot { revision, kvs } => {
                self.reservations.clear();
                self.tokens.clear();
                for kv in kvs {
                    self.put(layout, kv.key(), kv.value(), kv.mod_revision());
                }
                self.revision = revision;
            }
            WatchEvent::Changes { revision, changes } => {
                for c in changes {
                    match c {
                        Change::Put(kv) => {
                            self.put(layout, kv.key(), kv.value(), kv.mod_revision())
                        }
                        Change::Delete { key, .. } => {
                            let key = String::from_utf8_lossy(&key);
                            match layout.slot(&key) {
                                Slot::Reservation(k) => {
                                    self.reservations.remove(k);
                                }
                                Slot::Token(k) => {
                                    self.tokens.remove(k);
                                }
                                Slot::Other => {}
                            }
                        }
                    }
                }
                self.revision = self.revision.max(revision);
            }
        }
    }

    fn put(&mut self, layout: &Layout, key: &[u8], value: &[u8], mod_revision: i64) {
        let key = String::from_utf8_lossy(key);
        match layout.slot(&key) {
            Slot::Reservation(k) => match serde_json::from_slice::<Reservation>(value) {
                Ok(value) => {
                    self.reservations.insert(
                        k.to_string(),
                        Entry {
                            mod_revision,
                            value,
                        },
                    );
                }
                Err(e) => tracing::error!(%key, "fleet reservation record unreadable: {e}"),
            },
            Slot::Token(k) => match serde_json::from_slice::<StoredToken>(value) {
                Ok(value) => {
                    self.tokens.insert(
                        k.to_string(),
                        Entry {
                            mod_revision,
                            value,
                        },
                    );
                }
                Err(e) => tracing::error!(%key, "fleet token record unreadable: {e}"),
            },
            Slot::Other => {}
        }
    }

    /// Reads a saved cache; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Cache>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: unreadable cache: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Saves the cache (0600, replaced atomically).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        meshgate_config::private_file::write_private_file(
            path,
            &bytes,
            meshgate_config::private_file::Placement::Replace,
        )
        .map_err(|e| e.to_string())
    }
}
