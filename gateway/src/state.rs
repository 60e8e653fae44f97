//! The state every connection reads, assembled once by [`crate::Gateway`] (which then
//! builds its first route table and certificate map with [`Shared::rebuild`]). Immutable after
//! assembly except what is meant to change, each swapped whole: the configuration (reload),
//! the route table, the certificate map and the SSRF switch. Connections already open keep
//! the snapshot they took.

use crate::admin::api::Api;
use crate::admin::overlay::OverlayObserver;
use crate::observe::metrics::Metrics;
use crate::routes::{PoolFactory, RouteTable};
use crate::upstream::clients::Clients;
use crate::upstream::connector::GatewayDialer;
use crate::upstream::dial::Dialer;
use anyhow::{Context, Result};
use meshgate_certs::{CertManager, CertMap, CertResolver, DevCa};
use meshgate_config::gateway::{GatewayConfig, Limits, Timeouts};
use meshgate_config::route::{Mode, Route};
use meshgate_reservations::token::AdminToken;
use rustls::ServerConfig;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

pub(crate) struct Shared {
    pub(crate) config_path: Option<PathBuf>,
    /// Swapped whole on reload; read with [`Shared::config`].
    pub(crate) config: RwLock<Arc<GatewayConfig>>,
    /// Routes from the reservations store, merged with the static ones on each rebuild.
    pub(crate) reserved: Option<watch::Receiver<Arc<Vec<Route>>>>,
    /// The current route table; subscribers (the certificate follower) see every new one.
    pub(crate) routes: watch::Sender<Arc<RouteTable>>,
    pub(crate) resolver: Arc<CertResolver>,
    pub(crate) dev_ca: Option<DevCa>,
    /// Terminating TLS on :443 (resolver above; ALPN h2 and http/1.1; stateless tickets).
    pub(crate) tls: Arc<ServerConfig>,
    pub(crate) clients: Clients,
    pub(crate) dialer: Arc<GatewayDialer>,
    pub(crate) metrics: Metrics,
    pub(crate) timeouts: Timeouts,
    pub(crate) limits: Limits,
    /// `[log] access` (fixed until restart).
    pub(crate) access_log: meshgate_config::log::AccessFormat,
    /// Stopping: listeners closed, connections told to finish (see the listen layer's drain).
    pub(crate) drain: crate::listen::drain::Drain,
    /// The ACME certificate manager: challenges, managed certificates, their status.
    pub(crate) certs: Option<Arc<CertManager>>,
    /// The reservations API, served under `/v1/` on the deployers' listener.
    pub(crate) api: Option<Arc<Api>>,
    /// The farmer's admin token: `POST /reload` needs it.
    pub(crate) admin_token: Option<AdminToken>,
    pub(crate) started: std::time::Instant,
    /// `[admin] tls`: the operator's listener's TLS (fixed until restart).
    pub(crate) admin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// `[api] tls`: the deployers' listener's TLS (fixed until restart).
    pub(crate) api_tls: Option<tokio_rustls::TlsAcceptor>,
    /// The embedded overlay node, shown in `/status` and `/metrics`.
    pub(crate) overlay: Option<OverlayObserver>,
    /// The fleet section of `/status`, for a gateway in a fleet.
    pub(crate) fleet: Option<Arc<dyn crate::admin::section::StatusSection>>,
    /// This gateway's `Via` pseudonym (loop detection).
    pub(crate) via: crate::http::proxy::loops::Identity,
}

impl Shared {
    /// The route table now (a connection or request keeps the one it took).
    pub(crate) fn routes(&self) -> Arc<RouteTable> {
        self.routes.borrow().clone()
    }

    pub(crate) fn config(&self) -> Arc<GatewayConfig> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Rebuilds the route table and certificates from the current config and reservations.
    pub(crate) fn rebuild(&self) -> Result<()> {
        let config = self.config();
        let reserved = self
            .reserved
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default();
        let pools = PoolFactory {
            dialer: self.dialer.clone() as Arc<dyn Dialer>,
            // Each route's `[route.pool]`; unset connect timeouts come from `[timeouts]`.
            connect_ms: self.timeouts.connect_ms,
            previous: Some(self.routes()),
        };
        let table = RouteTable::build_with(&config.routes, &reserved, &pools);
        let certs = self.build_certs(&config, &table)?;
        self.resolver.replace(certs);
        self.routes.send_replace(Arc::new(table));
        Ok(())
    }

    fn build_certs(&self, config: &GatewayConfig, table: &RouteTable) -> Result<CertMap> {
        let old = self.resolver.snapshot();
        let mut map = CertMap::new();
        if let Some(ca) = &self.dev_ca {
            let mut names: Vec<String> = table
                .entries()
                .filter(|e| e.route.mode == Mode::Terminate)
                .map(|e| e.route.host.to_string())
                .collect();
            for d in &config.domains {
                names.push(d.to_string());
                names.push(format!("*.{d}"));
            }
            for n in names {
                let cert = match old.get(&n) {
                    Some(c) => c.clone(),
                    None => ca.certified_key(std::slice::from_ref(&n))?,
                };
                map.insert(n, cert);
            }
        }
        for files in &config.tls.certificates {
            let (names, cert) = meshgate_certs::load_pem_files(&files.cert, &files.key)?;
            for n in names {
                map.insert(n, cert.clone());
            }
        }
        // Names placed by the certificate manager (ACME) survive rebuilds.
        for (n, c) in old.iter() {
            map.entry(n.clone()).or_insert_with(|| c.clone());
        }
        Ok(map)
    }

    /// Re-reads the config file and applies routes, certificates and security switches.
    /// Listener, admin and overlay changes need a restart (logged).
    pub(crate) fn reload(&self) -> Result<usize> {
        let path = self
            .config_path
            .as_ref()
            .context("this gateway was started without a config file")?;
        let new = GatewayConfig::load(path)?;
        self.apply(new)
    }

    pub(crate) fn apply(&self, new: GatewayConfig) -> Result<usize> {
        let old = self.config();
        if new.listen != old.listen
            || new.admin != old.admin
            || new.api != old.api
            || new.overlay != old.overlay
        {
            tracing::warn!("listener, admin, api or overlay changes take effect after a restart");
        }
        if new.timeouts != old.timeouts
            || new.limits != old.limits
            || new.log != old.log
            || new.upstream != old.upstream
        {
            tracing::warn!("timeout, limit, log and upstream changes take effect after a restart");
        }
        if new.reservations != old.reservations {
            tracing::warn!("[reservations] changes take effect after a restart");
        }
        let allow_private = new.security.allow_private_backends;
        let previous = std::mem::replace(
            &mut *self.config.write().map_err(|_| anyhow::anyhow!("lock"))?,
            Arc::new(new),
        );
        if let Err(e) = self.rebuild() {
            if let Ok(mut c) = self.config.write() {
                *c = previous;
            }
            return Err(e);
        }
        // Only a config that applied may relax the SSRF guard.
        self.dialer
            .allow_private
            .store(allow_private, Ordering::Relaxed);
        self.dialer.guard.refresh(&self.config());
        let n = self.routes().len();
        tracing::info!(routes = n, "configuration applied");
        Ok(n)
    }
}
