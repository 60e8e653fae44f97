//! What the deployers' API (`GET /v1/routes`) tells a deployer about each of its hosts, read
//! from the gateway's state: routed or not, recent traffic, certificate.

use super::api::HostActivity;
use crate::state::Shared;
use serde_json::{Value, json};
use std::time::Instant;

/// The gateway's view of a host.
pub(crate) struct GatewayActivity<'a>(pub(crate) &'a Shared);

impl HostActivity for GatewayActivity<'_> {
    fn describe(&self, host: &str) -> Value {
        let shared = self.0;
        let served = shared
            .routes()
            .entries()
            .any(|e| e.route.host.as_str() == host);
        let traffic = shared.metrics.history.route(host, Instant::now());
        json!({
            "served": served,
            "traffic": traffic,
            "certificate": certificate(shared, host),
        })
    }
}

/// The certificate `host` is served with: the managed (ACME) one covering it with its state,
/// expiry and last problem, or `{"state": "served"}` for one from files or the development
/// CA, or `{"state": "none"}`.
fn certificate(shared: &Shared, host: &str) -> Value {
    let covers = |name: &str| {
        name == host
            || name
                .strip_prefix("*.")
                .is_some_and(|parent| host.split_once('.').is_some_and(|(_, p)| p == parent))
    };
    if let Some(managed) = shared.certs.as_ref().map(|c| c.status())
        && let Some(c) = managed.iter().find(|c| c.names.iter().any(|n| covers(n)))
    {
        return json!({
            "state": c.state,
            "not_after": c.not_after,
            "renew_at": c.renew_at,
            "last_error": c.last_error,
        });
    }
    if shared.resolver.names().iter().any(|n| covers(n)) {
        json!({"state": "served"})
    } else {
        json!({"state": "none"})
    }
}
