//! Assembly: a [`Gateway`] is built once from [`GatewayParts`], every dependency given up
//! front, then bound and served. Nothing is set on it afterwards.

use crate::admin::api::Api;
use crate::admin::overlay::OverlayObserver;
use crate::listen::{self, Bound};
use crate::observe::metrics::Metrics;
use crate::routes::RouteTable;
use crate::state::Shared;
use crate::upstream::clients::Clients;
use crate::upstream::connector::GatewayDialer;
use crate::upstream::dial::Dialer;
use anyhow::Result;
use meshgate_certs::{CertManager, CertResolver, DevCa};
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::route::Route;
use meshgate_reservations::token::AdminToken;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// Everything a gateway is made of.
pub struct GatewayParts {
    pub config: GatewayConfig,
    /// The file `reload` re-reads; `None` for a gateway assembled from a value.
    pub config_path: Option<PathBuf>,
    /// The embedded overlay node; `None` sends every backend through the host network.
    pub overlay: Option<OverlayParts>,
    /// The reservations API and the routes it reserves.
    pub reservations: Option<ReservationParts>,
    /// The ACME certificate manager: challenges answered, certificates served, status shown.
    pub certs: Option<Arc<CertManager>>,
    /// The farmer's admin token; without it `POST /reload` is refused (SIGHUP still works).
    pub admin_token: Option<AdminToken>,
    /// The fleet section of `/status` (a gateway in a fleet).
    pub fleet: Option<Arc<dyn crate::admin::section::StatusSection>>,
}

impl GatewayParts {
    /// A gateway with nothing but its configuration.
    pub fn new(config: GatewayConfig) -> Self {
        GatewayParts {
            config,
            config_path: None,
            overlay: None,
            reservations: None,
            certs: None,
            admin_token: None,
            fleet: None,
        }
    }
}

/// The overlay as the gateway sees it: a dialer for overlay addresses and, for the operator's
/// listener, the node's status.
pub struct OverlayParts {
    pub dialer: Arc<dyn Dialer>,
    /// Which backend addresses belong to the overlay.
    pub is_overlay: fn(&IpAddr) -> bool,
    pub observer: Option<OverlayObserver>,
}

/// The reservations: the API served on the deployers' listener (`[api]`) and the routes it
/// reserves.
pub struct ReservationParts {
    pub api: Arc<Api>,
    /// The reserved routes, merged with the static ones on every change.
    pub routes: watch::Receiver<Arc<Vec<Route>>>,
}

/// A configured gateway, ready to bind and serve.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub fn new(parts: GatewayParts) -> Result<Self> {
        let GatewayParts {
            config,
            config_path,
            overlay,
            reservations,
            certs,
            admin_token,
            fleet,
        } = parts;
        let dev_ca = match &config.tls.dev_ca {
            Some(d) => Some(DevCa::load_or_create(&d.dir)?),
            None => None,
        };
        let admin_tls = crate::admin::tls::acceptor(
            "admin",
            config.admin.tls.as_ref(),
            config.admin.listen,
            dev_ca.as_ref(),
        )?;
        // The deployers' listener exists only with the reservations API.
        let api_tls = match &reservations {
            Some(_) => crate::admin::tls::acceptor(
                "api",
                config.api.tls.as_ref(),
                config.api.listen,
                dev_ca.as_ref(),
            )?,
            None => None,
        };
        // One resolver: the configured certificates (files, dev CA) and the managed ones.
        let resolver = certs
            .as_ref()
            .map_or_else(|| Arc::new(CertResolver::default()), |m| m.resolver());
        let tls = crate::tls::server_config(resolver.clone())?;
        let (overlay_dialer, is_overlay, observer) = match overlay {
            Some(o) => (Some(o.dialer), o.is_overlay, o.observer),
            None => (None, (|_: &IpAddr| false) as fn(&IpAddr) -> bool, None),
        };
        let dialer = Arc::new(GatewayDialer {
            overlay: overlay_dialer,
            is_overlay,
            allow_private: config.security.allow_private_backends.into(),
            guard: crate::upstream::ssrf::Guard::new(&config),
        });
        let clients = Clients::new(dialer.clone() as Arc<dyn Dialer>, &config.upstream);
        let metrics = Metrics::new(|registry| {
            registry.register_collector(Box::new(clients.observer()));
            if let Some(o) = &observer {
                registry.register_collector(Box::new(o.clone()));
            }
            if let Some(m) = &certs {
                m.register_metrics(registry);
            }
            if let Some(r) = &reservations {
                registry.register_collector(r.api.metrics());
            }
        });
        let (api, reserved) = match reservations {
            Some(r) => (Some(r.api), Some(r.routes)),
            None => (None, None),
        };
        let follow = reserved.clone();
        let shared = Arc::new(Shared {
            config_path,
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            access_log: config.log.access,
            drain: crate::listen::drain::Drain::default(),
            config: RwLock::new(Arc::new(config)),
            reserved,
            routes: watch::Sender::new(Arc::default()),
            resolver,
            dev_ca,
            tls,
            clients,
            dialer,
            metrics,
            certs,
            api,
            admin_token,
            started: std::time::Instant::now(),
            admin_tls,
            api_tls,
            overlay: observer,
            fleet,
            via: crate::http::proxy::loops::Identity::random(),
        });
        shared.rebuild()?;
        if let Some(rx) = follow {
            follow_reserved_routes(Arc::downgrade(&shared), rx);
        }
        refresh_own_addresses(Arc::downgrade(&shared));
        Ok(Gateway { shared })
    }

    /// Re-reads the config file and applies it; returns the number of routes.
    pub fn reload(&self) -> Result<usize> {
        self.shared.reload()
    }

    /// Applies `config` as a reload would.
    pub fn apply(&self, config: GatewayConfig) -> Result<usize> {
        self.shared.apply(config)
    }

    /// The route table now.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.shared.routes()
    }

    /// Every route table from now on (the current one first).
    pub fn watch_routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.shared.routes.subscribe()
    }

    /// Binds every configured listener (dual-stack on `[::]`): HTTPS, HTTP, the operator's,
    /// and the deployers' when the gateway has the reservations API.
    pub fn bind(&self) -> Result<Bound> {
        let c = self.shared.config();
        Bound::new(
            &c.listen.https,
            &c.listen.http,
            c.admin.listen,
            self.api_listen(),
        )
    }

    /// Binds the given HTTPS listeners, the configured operator's listener and the
    /// deployers' when there is one (no plain HTTP).
    pub fn bind_listeners(&self, https: &[SocketAddr]) -> Result<Bound> {
        let c = self.shared.config();
        Bound::new(https, &[], c.admin.listen, self.api_listen())
    }

    /// `[api] listen` when the reservations API runs.
    fn api_listen(&self) -> Option<SocketAddr> {
        let c = self.shared.config();
        self.shared.api.as_ref().map(|_| c.api.listen)
    }

    /// Serves until `shutdown` completes, then drains: the listeners close (new connections
    /// are refused), in-flight requests get `timeouts.drain_ms` to finish (h2 clients are
    /// sent GOAWAY), then tunnels and passthrough streams are closed.
    pub async fn serve(&self, bound: Bound, shutdown: impl Future<Output = ()>) -> Result<()> {
        let control: Arc<dyn crate::admin::Control> = Arc::new(self.clone());
        let mut tasks = tokio::task::JoinSet::new();
        listen::spawn_all(&mut tasks, &self.shared, control, bound);
        shutdown.await;
        // Each accept loop owns its listener: once they are gone, connecting is refused.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let deadline = self.shared.timeouts.drain();
        tracing::info!(
            deadline_ms = deadline.as_millis() as u64,
            in_flight_connections = self.shared.drain.http.len(),
            "listeners closed; draining"
        );
        let drained = self.shared.drain.run(deadline).await;
        if drained.cut > 0 {
            tracing::warn!(
                connections = drained.cut,
                "drain deadline passed; connections with requests in flight closed"
            );
        }
        tracing::info!(
            streams_closed = drained.closed,
            "drained; tunnels and passthrough streams closed"
        );
        Ok(())
    }
}

impl crate::admin::Control for Gateway {
    fn reload(&self) -> Result<usize> {
        self.shared.reload()
    }
}

/// Rebuilds the table on every change of the reserved routes, while the gateway lives.
fn follow_reserved_routes(
    shared: std::sync::Weak<Shared>,
    mut rx: watch::Receiver<Arc<Vec<Route>>>,
) {
    tokio::spawn(async move {
        rx.mark_unchanged();
        while rx.changed().await.is_ok() {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if let Err(e) = shared.rebuild() {
                tracing::error!(error = %format!("{e:#}"), "cannot apply reserved routes");
            }
        }
    });
}

/// Re-reads the gateway's own addresses for the SSRF guard every
/// `security.own_addresses_refresh_secs`, while the gateway lives (reloads refresh too).
fn refresh_own_addresses(shared: std::sync::Weak<Shared>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        loop {
            let Some(every) = shared
                .upgrade()
                .map(|s| s.config().security.own_addresses_refresh())
            else {
                return;
            };
            tokio::time::sleep(every).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.dialer.guard.refresh(&shared.config());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::pool::ClientInfo;

    fn gateway_config(text: &str) -> GatewayConfig {
        GatewayConfig::parse(std::path::Path::new("g.toml"), text).expect("test config parses")
    }

    #[tokio::test]
    async fn failed_reload_keeps_ssrf_guard_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        let listen = "listen = { https = [\"127.0.0.1:0\"], http = [] }\n";
        let route = format!(
            "[[route]]\nhost = \"a.example.org\"\nbackends = [{{ addr = \"{backend}\" }}]\n"
        );
        let gw = Gateway::new(GatewayParts::new(gateway_config(&format!(
            "{listen}{route}"
        ))))
        .expect("gateway starts");
        // Relaxes the guard but cannot apply: its certificate files do not exist.
        let broken = gateway_config(&format!(
            "{listen}[security]\nallow_private_backends = true\n\
             [[tls.certificates]]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n{route}"
        ));
        assert!(gw.apply(broken).is_err());
        let entry = gw.routes().lookup("a.example.org").expect("route");
        let lease = entry
            .pool
            .pick(&ClientInfo::from_ip("192.0.2.1".parse().unwrap()), &[])
            .await
            .expect("lease");
        let dialed = lease.dial().await.map(|_| ()).map_err(|e| e.error.kind());
        assert_eq!(dialed, Err(std::io::ErrorKind::PermissionDenied));
    }

    /// How the gateway's dialer answers for each route's backend: `Err(PermissionDenied)`
    /// when the SSRF guard refuses it, else whatever connecting gave (within 1 s).
    async fn dials(gw: &Gateway, hosts: &[&str]) -> Vec<Result<(), std::io::ErrorKind>> {
        let mut out = Vec::new();
        for h in hosts {
            let entry = gw.routes().lookup(h).expect("route");
            let lease = entry
                .pool
                .pick(&ClientInfo::from_ip("192.0.2.1".parse().unwrap()), &[])
                .await
                .expect("lease");
            let dialed = tokio::time::timeout(std::time::Duration::from_secs(1), lease.dial())
                .await
                .map_or(Err(std::io::ErrorKind::TimedOut), |r| {
                    r.map(|_| ()).map_err(|e| e.error.kind())
                });
            out.push(dialed);
        }
        out
    }

    /// Items 9 and 12: the gateway's public address behind NAT (`public_addresses`, taken on
    /// reload, no restart) and IPv4 reached through IPv4-translated, Teredo and operator NAT64
    /// addresses are refused before any connect.
    #[tokio::test]
    async fn public_addresses_and_translated_ipv4_are_refused() {
        let listen = "listen = { https = [\"127.0.0.1:0\"], http = [] }\n";
        let routes = "[[route]]\nhost = \"self.example.org\"\nbackends = [{ addr = \"203.0.113.7:443\" }]\n\
             [[route]]\nhost = \"siit.example.org\"\nbackends = [{ addr = \"[::ffff:0:127.0.0.1]:9\" }]\n\
             [[route]]\nhost = \"teredo.example.org\"\nbackends = [{ addr = \"[2001:0:a00:1::1]:9\" }]\n\
             [[route]]\nhost = \"nat64.example.org\"\nbackends = [{ addr = \"[2001:db8:64::10.0.0.1]:9\" }]\n";
        let gw = Gateway::new(GatewayParts::new(gateway_config(&format!(
            "{listen}[security]\nnat64_prefixes = [\"2001:db8:64::/96\"]\n{routes}"
        ))))
        .expect("gateway starts");
        let denied = Err(std::io::ErrorKind::PermissionDenied);
        let translated = [
            "siit.example.org",
            "teredo.example.org",
            "nat64.example.org",
        ];
        assert_eq!(dials(&gw, &translated).await, vec![denied; 3]);
        // Not (yet) known as the gateway's own: dialed (and failing, or timing out, here).
        assert_ne!(dials(&gw, &["self.example.org"]).await, vec![denied]);
        gw.apply(gateway_config(&format!(
            "{listen}[reservations]\npublic_addresses = [\"203.0.113.7\"]\n{routes}"
        )))
        .expect("reload applies");
        assert_eq!(dials(&gw, &["self.example.org"]).await, vec![denied]);
    }
}
