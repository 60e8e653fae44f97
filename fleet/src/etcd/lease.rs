//! Leases kept alive across broken streams: a [`Lease`] renews itself on whichever member
//! answers, and says it is lost once etcd reports it expired or the local estimate of its
//! expiry passes without a renewal (after which keys bound to it must be assumed gone).

use super::Etcd;
use crate::error::FleetError;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A granted lease, renewed by a task until it is lost, revoked or dropped (dropping stops
/// the renewals; etcd then expires the lease after its TTL).
#[derive(Debug)]
pub struct Lease {
    id: i64,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
    etcd: Etcd,
}

impl Lease {
    /// The lease id (for `put` with a lease, and `Compare::lease` fencing checks).
    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// True once the lease is known or presumed expired.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// A receiver that turns true when the lease is lost.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing and revokes the lease (its keys are deleted at once).
    pub async fn revoke(self) -> Result<(), FleetError> {
        self.task.abort();
        let id = self.id;
        self.etcd
            .call(
                "lease revoke",
                |mut c| async move { c.lease_revoke(id).await },
            )
            .await
            .map(|_| ())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Etcd {
    /// Grants a lease of `ttl` (whole seconds, at least 2) and keeps it alive.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease, FleetError> {
        let secs = ttl.as_secs().max(2) as i64;
        let granted = self
            .call("lease grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        let id = granted.id();
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        let (lost_tx, lost) = watch::channel(false);
        let etcd = self.clone();
        let expires = Instant::now() + ttl;
        let task = tokio::spawn(async move {
            etcd.keep_alive(id, ttl, expires).await;
            let _ = lost_tx.send(true);
        });
        Ok(Lease {
            id,
            ttl,
            lost,
            task,
            etcd: self.clone(),
        })
    }

    /// Renews lease `id` every third of its TTL until it expires; returns when it is lost.
    async fn keep_alive(&self, id: i64, ttl: Duration, mut expires: Instant) {
        let every = ttl / 3;
        loop {
            if Instant::now() >= expires {
                tracing::warn!(
                    lease = format!("{id:x}"),
                    "etcd lease not renewed in time: lost"
                );
                return;
            }
            let budget = expires.saturating_duration_since(Instant::now());
            let opened = tokio::time::timeout(
                budget,
                self.call("lease keep-alive", |mut c| async move {
                    c.lease_keep_alive(id).await
                }),
            )
            .await;
            let (mut keeper, mut stream) = match opened {
                Ok(Ok(pair)) => pair,
                Ok(Err(FleetError::LeaseLost { .. })) => {
                    tracing::warn!(lease = format!("{id:x}"), "etcd lease expired");
                    return;
                }
                Ok(Err(FleetError::Refused { cause, .. })) if cause.contains("not found") => {
                    tracing::warn!(lease = format!("{id:x}"), "etcd lease expired");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(lease = format!("{id:x}"), error = %e, "keep-alive stream");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(_) => continue,
            };
            // Opening the stream renewed the lease once (etcd-client sends the first request).
            expires = Instant::now() + ttl;
            loop {
                tokio::time::sleep(every).await;
                let answer = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                let budget = expires.saturating_duration_since(Instant::now());
                match tokio::time::timeout(
                    budget.min(every.max(Duration::from_millis(500))),
                    answer,
                )
                .await
                {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => expires = Instant::now() + ttl,
                    Ok(Ok(Some(_))) => {
                        tracing::warn!(lease = format!("{id:x}"), "etcd lease expired");
                        return;
                    }
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
                }
            }
        }
    }
}
