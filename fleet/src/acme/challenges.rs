//! Challenge responses published by any gateway's order, watched into this gateway's
//! responders: HTTP-01 on :80, TLS-ALPN-01 on :443 and DNS-01 in the challenge zone, so a
//! validation that lands on any gateway succeeds.

use super::store::AcmeKeys;
use crate::etcd::Etcd;
use crate::etcd::watch::{Change, WatchEvent};
use meshgate_certs::{CertManager, Challenge};
use std::collections::HashMap;

/// Follows `acme/challenges/` into `certs`' responders until the task is dropped.
pub fn follow_challenges(
    etcd: &Etcd,
    keys: &AcmeKeys,
    certs: CertManager,
) -> tokio::task::JoinHandle<()> {
    let mut watch = etcd.watch_prefix(&keys.challenges(), None);
    tokio::spawn(async move {
        let mut answering: HashMap<Vec<u8>, Challenge> = HashMap::new();
        while let Some(ev) = watch.next().await {
            match ev {
                WatchEvent::Snapshot { kvs, .. } => {
                    let mut now: HashMap<Vec<u8>, Challenge> = HashMap::new();
                    for kv in kvs {
                        if let Some(c) = parse(kv.key(), kv.value()) {
                            now.insert(kv.key().to_vec(), c);
                        }
                    }
                    for (k, c) in &answering {
                        if !now.contains_key(k) {
                            apply(&certs, c, false).await;
                        }
                    }
                    for c in now.values() {
                        apply(&certs, c, true).await;
                    }
                    answering = now;
                }
                WatchEvent::Changes { changes, .. } => {
                    for change in changes {
                        match change {
                            Change::Put(kv) => {
                                if let Some(c) = parse(kv.key(), kv.value()) {
                                    apply(&certs, &c, true).await;
                                    answering.insert(kv.key().to_vec(), c);
                                }
                            }
                            Change::Delete { key, .. } => {
                                if let Some(c) = answering.remove(&key) {
                                    apply(&certs, &c, false).await;
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

fn parse(key: &[u8], value: &[u8]) -> Option<Challenge> {
    match serde_json::from_slice(value) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "unreadable challenge: {e}");
            None
        }
    }
}

async fn apply(certs: &CertManager, c: &Challenge, present: bool) {
    if let Err(e) = certs.apply_challenge(c, present).await {
        tracing::warn!("answering a fleet challenge: {e}");
    }
}
