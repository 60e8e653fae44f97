//! Glue between reservations and the certificate manager: certificates are ordered only for
//! verified domains, and a domain waiting for its certificate becomes active once it is valid.

use meshgate_certs::CertManager;
use meshgate_config::store::Store;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// States in which the manager serves a certificate for the name.
fn serving(state: &str) -> bool {
    matches!(state, "valid" | "renewing" | "renewal-failing")
}

/// Keeps `certs`' desired names equal to the store's verified domains and, every `poll`,
/// reports domains whose certificate is being served to the store (verified → active when
/// the verifier requires certificates). Runs until the store is dropped.
pub fn follow_certificates(
    store: Arc<Store>,
    certs: Arc<CertManager>,
    poll: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut verified = store.verified_domains();
    tokio::spawn(async move {
        let mut desired: Arc<BTreeSet<String>> = Arc::new(BTreeSet::new());
        loop {
            let now = verified.borrow_and_update().clone();
            if now != desired {
                certs.set_desired(now.iter().cloned());
                desired = now;
            }
            for status in certs.status() {
                if !serving(status.state) || !desired.contains(&status.name) {
                    continue;
                }
                let key = meshgate_config::reservation::Key::domain(status.name.clone());
                let ready = matches!(
                    store.get(&key),
                    Ok(Some(r)) if r.verification.certificate_ready
                );
                if !ready && let Err(e) = store.set_certificate_ready(&status.name, true) {
                    tracing::warn!(domain = %status.name, "cannot record its certificate: {e}");
                }
            }
            tokio::select! {
                changed = verified.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(poll) => {}
            }
        }
    })
}
