//! Fleet membership: each gateway registers itself under `members/<id>`, bound to a lease it
//! keeps alive (a gateway that dies drops out within the lease TTL), and refreshes its record
//! as its last applied revision moves; every gateway follows the member list through a watch.

use crate::etcd::Etcd;
use crate::etcd::watch::{Change, WatchEvent};
use crate::keys::FleetKeys;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Default lease TTL of a member record.
pub const MEMBER_TTL: Duration = Duration::from_secs(10);

/// How often a member rewrites its record when its applied revision moved (bounds the etcd
/// traffic of a busy fleet: one small put per gateway per interval).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// One gateway as the fleet sees it (`members/<id>`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The gateway id (its overlay address, or its host name).
    pub id: String,
    /// Public addresses clients reach it on (DNS answers).
    pub advertise: Vec<std::net::IpAddr>,
    /// meshgate version.
    pub version: String,
    /// The etcd revision its cache has applied.
    pub applied_revision: i64,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The running registration; dropping it stops refreshing (the record expires with its
/// lease).
#[derive(Debug)]
pub struct Registration {
    task: tokio::task::JoinHandle<()>,
    lease: watch::Receiver<Option<i64>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Registration {
    /// The lease the record is currently bound to (None while not registered).
    pub fn lease(&self) -> watch::Receiver<Option<i64>> {
        self.lease.clone()
    }
}

/// Registers `me` and keeps it registered: re-granting a lease and re-writing the record
/// after the lease is lost (etcd down longer than the TTL), and rewriting it when `applied`
/// moves (at most every [`REFRESH_INTERVAL`]).
pub fn register(
    etcd: &Etcd,
    keys: &FleetKeys,
    me: MemberRecord,
    mut applied: watch::Receiver<i64>,
    ttl: Duration,
) -> Registration {
    let etcd = etcd.clone();
    let key = keys.member(&me.id);
    let (lease_tx, lease) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut me = me;
        loop {
            let lease = match etcd.grant_lease(ttl).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "member lease");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let _ = lease_tx.send(Some(lease.id()));
            let mut written = None;
            loop {
                let now = *applied.borrow_and_update();
                if written != Some(now) {
                    me.applied_revision = now;
                    me.updated_unix_ms = now_unix_ms();
                    let value = serde_json::to_vec(&me).expect("member record serializes");
                    match etcd.put_with(&key, value, Some(lease.id())).await {
                        Ok(_) => written = Some(now),
                        Err(e) => tracing::debug!(error = %e, "member record"),
                    }
                }
                tokio::select! {
                    _ = lease.lost() => break,
                    _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
                }
                if written.is_some() {
                    tokio::select! {
                        _ = lease.lost() => break,
                        r = applied.changed() => if r.is_err() { return },
                    }
                }
            }
            let _ = lease_tx.send(None);
            tracing::warn!(member = %me.id, "fleet member lease lost; registering again");
        }
    });
    Registration { task, lease }
}

/// The live members, by id, as a watch on `members/` sees them.
pub type MemberSet = Arc<BTreeMap<String, MemberRecord>>;

/// Follows the member list; the receiver holds the current set. The task ends when every
/// receiver is dropped.
pub fn follow(etcd: &Etcd, keys: &FleetKeys) -> watch::Receiver<MemberSet> {
    let (tx, rx) = watch::channel(MemberSet::default());
    let mut w = etcd.watch_prefix(&keys.members(), None);
    let prefix = keys.members();
    tokio::spawn(async move {
        let mut set = BTreeMap::new();
        let decode = |bytes: &[u8]| serde_json::from_slice::<MemberRecord>(bytes).ok();
        loop {
            let ev = tokio::select! {
                ev = w.next() => ev,
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            match ev {
                WatchEvent::Snapshot { kvs, .. } => {
                    set.clear();
                    for kv in kvs {
                        if let Some(m) = decode(kv.value()) {
                            set.insert(m.id.clone(), m);
                        }
                    }
                }
                WatchEvent::Changes { changes, .. } => {
                    for c in changes {
                        match c {
                            Change::Put(kv) => {
                                if let Some(m) = decode(kv.value()) {
                                    set.insert(m.id.clone(), m);
                                }
                            }
                            Change::Delete { key, .. } => {
                                let key = String::from_utf8_lossy(&key);
                                if let Some(id) = key.strip_prefix(&prefix) {
                                    set.remove(id);
                                }
                            }
                        }
                    }
                }
            }
            let _ = tx.send(Arc::new(set.clone()));
        }
    });
    rx
}

/// The members registered now (one list call).
pub async fn list(etcd: &Etcd, keys: &FleetKeys) -> Result<Vec<MemberRecord>, crate::FleetError> {
    let (kvs, _) = etcd.list_prefix(&keys.members()).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}
