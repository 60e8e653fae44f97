//! The composition root: every process role is assembled here, its dependencies built first
//! and given to it whole. A gateway is its overlay node, its reservations (store, API,
//! verifier), its certificate manager and the gateway itself; a node is an overlay node with
//! its endpoint and status server.

pub mod certificates;
pub mod consent;
pub mod fleet;
pub mod node;
pub mod process;
pub mod reservations;

use anyhow::Result;
use certificates::CertService;
use meshgate_config::gateway::GatewayConfig;
use meshgate_gateway::admin::overlay::OverlayObserver;
use meshgate_gateway::upstream::overlay::EmbeddedNode;
use meshgate_gateway::{Gateway, GatewayParts, OverlayParts, ReservationParts};
use reservations::Reservations;
use std::path::PathBuf;
use std::sync::Arc;

/// What a gateway is assembled from.
pub struct GatewaySetup {
    pub config: GatewayConfig,
    /// The file `reload` (SIGHUP, `POST /reload`) re-reads.
    pub config_path: Option<PathBuf>,
    /// An overlay node already started (the demo's); otherwise `[overlay]` starts one.
    pub node: Option<EmbeddedNode>,
}

impl GatewaySetup {
    pub fn new(config: GatewayConfig) -> Self {
        GatewaySetup {
            config,
            config_path: None,
            node: None,
        }
    }
}

/// An assembled gateway and what runs beside it. Dropping it stops the reservations verifier
/// and the certificate tasks; [`AppGateway::shutdown`] also stops the overlay node.
pub struct AppGateway {
    pub gateway: Gateway,
    pub node: Option<EmbeddedNode>,
    pub reservations: Option<Reservations>,
    pub certs: Option<CertService>,
    /// The fleet membership (`[fleet]`): the etcd handle, the member record and list.
    pub fleet: Option<(fleet::Fleet, fleet::Membership)>,
}

impl AppGateway {
    /// Stops the overlay node (the rest stops when dropped).
    pub async fn shutdown(mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }
}

/// Assembles a gateway: the overlay node (given or from `[overlay]`), the reservations store,
/// API and verifier (when `domains` is set), the certificate manager (when `[tls.acme]` is
/// set), then the gateway with all of them, and the certificate follower fed by its routes.
pub async fn gateway(setup: GatewaySetup) -> Result<AppGateway> {
    let GatewaySetup {
        config,
        config_path,
        node,
    } = setup;
    let node = match (node, &config.overlay) {
        (Some(n), _) => Some(n),
        (None, Some(o)) => Some(EmbeddedNode::start(o).await?),
        (None, None) => None,
    };
    if let Some(n) = &node {
        tracing::info!(address = %n.node.address(), "overlay node started");
    }
    // The reservations need the farmer's token; without them it only guards `POST /reload`,
    // so a gateway that cannot keep one still starts (SIGHUP reloads).
    let admin_token = match reservations::admin_token(&config) {
        Ok(t) => Some(t),
        Err(e) if config.domains.is_empty() => {
            tracing::warn!(error = %format!("{e:#}"), "no admin token: POST /reload is off");
            None
        }
        Err(e) => return Err(e),
    };
    let fleet = fleet::Fleet::from_config(&config, node.as_ref().map(|n| n.node.address()))?;
    let reservations = match &admin_token {
        Some(t) => Reservations::start(
            &config,
            t.clone(),
            node.as_ref()
                .map(|n| Arc::new(n.dialer()) as Arc<dyn meshgate_gateway::upstream::dial::Dialer>),
            fleet.as_ref(),
        )?,
        None => None,
    };
    let fleet = fleet.map(|f| {
        let store = reservations.as_ref().and_then(|r| r.fleet_store.clone());
        let applied = store.as_ref().map_or_else(
            || tokio::sync::watch::channel(0).1,
            |s| s.applied_revision(),
        );
        let membership = f.join(applied);
        (f, membership, store)
    });
    let manager = certificates::manager(&config, fleet.as_ref().map(|(f, _, _)| f))?;
    let parts = GatewayParts {
        overlay: node.as_ref().map(|n| OverlayParts {
            dialer: Arc::new(n.dialer()),
            is_overlay: meshgate_overlay::is_overlay_address,
            observer: Some(OverlayObserver::new(
                n.node.status_source(),
                n.stack.clone(),
            )),
        }),
        reservations: reservations.as_ref().map(|r| ReservationParts {
            api: r.api.clone(),
            routes: r.store.routes(),
        }),
        certs: manager.as_ref().map(|c| c.manager.clone()),
        admin_token,
        config_path,
        config,
        fleet: fleet.as_ref().map(|(f, m, store)| {
            Arc::new(fleet::FleetStatus {
                name: f.config.name.clone(),
                id: f.id.clone(),
                health: f.etcd.health(),
                applied: m.applied.clone(),
                members: m.members.clone(),
                lease: m.registration.lease(),
                cached: store.clone(),
            }) as Arc<dyn meshgate_gateway::admin::section::StatusSection>
        }),
    };
    let gateway = Gateway::new(parts)?;
    let certs = manager.map(|m| {
        CertService::start(
            m,
            reservations.as_ref().map(|r| r.store.clone()),
            gateway.watch_routes(),
            fleet.as_ref().map(|(_, m, _)| m.members.clone()),
        )
    });
    Ok(AppGateway {
        gateway,
        node,
        reservations,
        certs,
        fleet: fleet.map(|(f, m, _)| (f, m)),
    })
}
