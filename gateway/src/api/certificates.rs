//! Glue between reservations and the certificate manager: certificates are ordered only for
//! the gateway's static terminate routes and verified terminate-mode domains, and a domain
//! waiting for its certificate becomes active once it is valid.

use meshgate_certs::CertManager;
use meshgate_config::route::Mode;
use meshgate_reservations::reservation::Key;
use meshgate_reservations::store::{ReservationStore, SharedStore};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// States in which the manager serves a certificate for the name.
fn serving(state: &str) -> bool {
    matches!(state, "valid" | "renewing" | "renewal-failing")
}

/// Verified domains whose reservation terminates TLS here (passthrough backends hold their
/// own certificates).
fn terminating(store: &dyn ReservationStore, verified: &BTreeSet<String>) -> BTreeSet<String> {
    verified
        .iter()
        .filter(|d| {
            matches!(store.get(&Key::domain((*d).clone())),
                Ok(Some(r)) if r.mode == Mode::Terminate)
        })
        .cloned()
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
        if !serving(status.state) || !domains.contains(&status.name) {
            continue;
        }
        let key = Key::domain(status.name.clone());
        let ready = matches!(
            store.get(&key),
            Ok(Some(r)) if r.verification.certificate_ready
        );
        if !ready && let Err(e) = store.set_certificate_ready(&status.name, true) {
            tracing::warn!(domain = %status.name, "cannot record its certificate: {e}");
        }
    }
}

type Registered = (std::sync::Weak<crate::server::Inner>, Arc<CertManager>);

/// Certificate managers by the gateway they serve, for `/status` (a gateway's shared state
/// has no slot for them).
static MANAGERS: std::sync::Mutex<Vec<Registered>> = std::sync::Mutex::new(Vec::new());

/// Makes `certs`' status part of `gateway`'s `/status`.
pub fn register_status(gateway: &Arc<crate::server::Inner>, certs: Arc<CertManager>) {
    let mut m = MANAGERS.lock().unwrap_or_else(|p| p.into_inner());
    m.retain(|(g, _)| g.strong_count() > 0 && !std::ptr::eq(g.as_ptr(), Arc::as_ptr(gateway)));
    m.push((Arc::downgrade(gateway), certs));
}

/// The status of every certificate the manager registered for `gateway` handles, or `None`
/// without a certificate manager.
pub fn status_of(gateway: &crate::server::Inner) -> Option<Vec<meshgate_certs::CertStatus>> {
    let m = MANAGERS.lock().unwrap_or_else(|p| p.into_inner());
    m.iter()
        .find(|(g, _)| std::ptr::eq(g.as_ptr(), gateway))
        .map(|(_, c)| c.status())
}
