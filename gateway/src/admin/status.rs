//! `/status`: what the gateway serves now, as JSON: routes with their pools' health and recent
//! traffic, served and managed certificates, the embedded overlay node, the fleet (members,
//! store health) and the latest errors.

use super::overlay::OverlayObserver;
use crate::state::Shared;

/// The `/status` document.
pub(crate) fn json(shared: &Shared) -> serde_json::Value {
    let now = std::time::Instant::now();
    let history = &shared.metrics.history;
    let routes: Vec<serde_json::Value> = shared
        .routes()
        .entries()
        .map(|e| {
            serde_json::json!({
                "host": e.route.host,
                "mode": e.route.mode,
                "backends": e.route.backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(),
                "options": e.route.options,
                "pool": e.pool.status(),
                "traffic": history.route(e.route.host.as_str(), now),
            })
        })
        .collect();
    // `names`: every name a certificate is served for; `managed`: the certificate manager's
    // state per certificate (expiry, next renewal, last ACME problem).
    let managed = shared.certs.as_ref().map(|c| c.status());
    let mut names = shared.resolver.names();
    for c in managed.iter().flatten().filter(|c| c.not_after.is_some()) {
        names.extend(c.names.iter().cloned());
    }
    names.sort();
    names.dedup();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "connections": shared.metrics.connections.get(),
        "routes": routes,
        "certificates": {"names": names, "managed": managed},
        "overlay": shared.overlay.as_ref().map(OverlayObserver::status_json),
        "recent_errors": history.recent_errors(),
        "traffic_routes_forgotten": history.evicted(),
        "fleet": shared.fleet.as_ref().map(|f| f.json()),
    })
}
