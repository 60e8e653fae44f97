//! The certificate manager in a gateway process, built from `[tls.acme]`, and its glue to
//! the gateway and the reservations: certificates are ordered only for the gateway's static
//! terminate routes and verified terminate-mode domains, and a domain waiting for its
//! certificate becomes active once it is valid.

use anyhow::{Context, Result};
use meshgate_certs::{CertConfig, CertManager};
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::route::Mode;
use meshgate_gateway::routes::RouteTable;
use meshgate_reservations::store::{ReservationStore, SharedStore};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Verified domains whose reservation terminates TLS here (passthrough backends hold their
/// own certificates).
fn terminating(store: &dyn ReservationStore, verified: &BTreeSet<String>) -> BTreeSet<String> {
    verified
        .iter()
        .filter(|d| {
            matches!(store.domain_claims(d), Ok(claims)
                if claims.iter().any(|r| r.status.is_verified() && r.mode == Mode::Terminate))
        })
        .cloned()
        .collect()
}

/// How often the certificate follower reports served certificates to the store.
const CERT_FOLLOW_POLL: Duration = Duration::from_secs(1);

/// The certificate manager for `[tls.acme]`, or `None` without it.
pub fn manager(config: &GatewayConfig) -> Result<Option<Arc<CertManager>>> {
    if config.tls.acme.is_none() {
        return Ok(None);
    }
    let cfg = CertConfig::try_from(config).context("certificate manager configuration")?;
    Ok(Some(Arc::new(CertManager::new(cfg)?)))
}

/// The certificate manager's tasks: its driver, the follower feeding it the names to serve,
/// and the watcher reporting how the driver ended. Dropping it stops them.
pub struct CertService {
    pub manager: Arc<CertManager>,
    driver: tokio::task::AbortHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for CertService {
    fn drop(&mut self) {
        self.driver.abort();
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl CertService {
    /// Starts `manager`, desiring the terminate hosts of each route table from `routes` (static
    /// routes; routed reservations are verified or covered by the wildcard) and the verified
    /// domains in `store` not yet routed.
    pub fn start(
        manager: Arc<CertManager>,
        store: Option<SharedStore>,
        mut routes: watch::Receiver<Arc<RouteTable>>,
    ) -> CertService {
        let (routed_tx, routed_rx) =
            watch::channel(Arc::new(terminate_hosts(&routes.borrow_and_update())));
        let hosts = tokio::spawn(async move {
            while routes.changed().await.is_ok() {
                let hosts = terminate_hosts(&routes.borrow_and_update());
                routed_tx.send_if_modified(|cur| {
                    let changed = **cur != hosts;
                    if changed {
                        *cur = Arc::new(hosts);
                    }
                    changed
                });
            }
        });
        let follower = follow_certificates(store, manager.clone(), routed_rx, CERT_FOLLOW_POLL);
        let driver = manager.spawn();
        let driver_abort = driver.abort_handle();
        let watcher = tokio::spawn(async move {
            match driver.await {
                Ok(Err(e)) => tracing::error!(error = %e, "certificate manager stopped"),
                Err(e) if e.is_cancelled() => {}
                Err(e) => tracing::error!(error = %e, "certificate manager task failed"),
                Ok(Ok(())) => {}
            }
        });
        CertService {
            manager,
            driver: driver_abort,
            tasks: vec![hosts, follower, watcher],
        }
    }
}

/// The hosts of a table's terminate routes, wildcards aside.
fn terminate_hosts(table: &RouteTable) -> BTreeSet<String> {
    table
        .entries()
        .filter(|e| e.route.mode == Mode::Terminate)
        .map(|e| e.route.host.to_string())
        .filter(|h| !h.starts_with("*."))
        .collect()
}

/// Keeps `certs`' desired names equal to `routed` (the static terminate route hosts) ∪ the
/// store's verified terminate-mode domains and, every `poll`, reports domains whose
/// certificate is being served to the store (verified → active when the verifier requires
/// certificates). Without a store only `routed` is followed. Runs until `routed`'s sender
/// and the store's watch are dropped, or the task is aborted.
pub fn follow_certificates(
    store: Option<SharedStore>,
    certs: Arc<CertManager>,
    mut routed: watch::Receiver<Arc<BTreeSet<String>>>,
    poll: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut verified = store.as_ref().map(|s| s.verified_domains());
    tokio::spawn(async move {
        let mut desired: Option<BTreeSet<String>> = None;
        let mut routed_open = true;
        loop {
            let mut want: BTreeSet<String> = (**routed.borrow_and_update()).clone();
            let mut domains = BTreeSet::new();
            if let (Some(store), Some(v)) = (&store, verified.as_mut()) {
                let now = v.borrow_and_update().clone();
                domains = terminating(&**store, &now);
                want.extend(domains.iter().cloned());
            }
            if desired.as_ref() != Some(&want) {
                certs.set_desired(want.iter().cloned());
                desired = Some(want);
            }
            if let Some(store) = &store {
                mark_ready(&**store, &certs, &domains);
            }
            let verified_changed = async {
                match verified.as_mut() {
                    Some(v) => v.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let routed_changed = async {
                if routed_open {
                    routed.changed().await.is_ok()
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                ok = verified_changed => if !ok { return },
                ok = routed_changed => if !ok {
                    routed_open = false;
                    if store.is_none() { return }
                },
                _ = tokio::time::sleep(poll) => {}
            }
        }
    })
}

/// Records in the store which of `domains` have their certificate served.
fn mark_ready(store: &dyn ReservationStore, certs: &CertManager, domains: &BTreeSet<String>) {
    for status in certs.status() {
        if !status.state.serves() || !domains.contains(&status.name) {
            continue;
        }
        let ready = matches!(
            store.domain_claims(&status.name),
            Ok(claims) if claims.iter().any(|r| r.status.is_verified() && r.verification.certificate_ready)
        );
        if !ready && let Err(e) = store.set_certificate_ready(&status.name, true) {
            tracing::warn!(domain = %status.name, "cannot record its certificate: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn unknown_acme_challenge_is_a_located_error() {
        let text = "[tls.acme]\ncontact = \"mailto:ops@example.org\"\nchallenge = \"dns-01\"\n";
        let e = GatewayConfig::parse(Path::new("gateway.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.toml:3"), "{e}");
        assert!(e.contains("tls.acme.challenge"), "{e}");
    }
}
