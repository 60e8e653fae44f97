//! `meshgate gateway --config gateway.toml`.

use crate::overlay::EmbeddedNode;
use crate::server::Gateway;
use anyhow::{Context, Result};
use meshgate_config::gateway::GatewayConfig;
use meshgate_reservations::verify::VerifierConfig;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The gateway configuration file.
    #[arg(long, short, default_value = "gateway.toml")]
    pub config: PathBuf,
}

/// Logs to stderr (colours only on a terminal, so log files stay plain); `RUST_LOG` overrides
/// the default `info`.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

pub async fn run(args: Args) -> Result<()> {
    init_logging();
    let config = GatewayConfig::load(&args.config)?;
    let node = match &config.overlay {
        Some(o) => Some(EmbeddedNode::start(o).await?),
        None => None,
    };
    if let Some(n) = &node {
        tracing::info!(address = %n.node.address(), "overlay node started");
    }
    let overlay = node
        .as_ref()
        .map(|n| Arc::new(n.dialer()) as Arc<dyn crate::dial::Dialer>);
    let config_copy = config.clone();
    let gateway = Gateway::new(
        config,
        Some(args.config.clone()),
        overlay,
        meshgate_overlay::is_overlay_address,
    )?;
    if let Some(n) = &node {
        gateway.observe_overlay(n.observer());
    }
    let _services = start_services(&gateway, &config_copy).await?;
    let bound = gateway.bind()?;
    for l in bound.https.iter() {
        tracing::info!(addr = %l.local_addr()?, "https listener");
    }
    for l in bound.http.iter() {
        tracing::info!(addr = %l.local_addr()?, "http listener");
    }
    tracing::info!(addr = %bound.admin.local_addr()?, "admin listener");
    spawn_sighup_reload(gateway.clone())?;
    gateway.serve(bound, shutdown_signal()).await?;
    tracing::info!("shutting down");
    if let Some(n) = node {
        n.shutdown().await;
    }
    Ok(())
}

/// What runs beside the listeners: the reservations store + API, the certificate manager and
/// the task feeding it the names to serve. Dropping it stops the certificate tasks.
pub struct Services {
    reservations: Option<crate::api::Reservations>,
    certs: Option<CertService>,
}

struct CertService {
    manager: Arc<meshgate_certs::CertManager>,
    driver: tokio::task::AbortHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Services {
    /// The reservations store, when `domains` is set.
    pub fn store(&self) -> Option<&meshgate_reservations::store::SharedStore> {
        self.reservations.as_ref().map(|r| &r.store)
    }

    /// The certificate manager, when `[tls.acme]` is set.
    pub fn certs(&self) -> Option<&Arc<meshgate_certs::CertManager>> {
        self.certs.as_ref().map(|c| &c.manager)
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if let Some(c) = &self.certs {
            c.driver.abort();
            c.tasks.iter().for_each(|t| t.abort());
        }
        if let Some(r) = &self.reservations {
            r.verifier.abort();
        }
    }
}

/// ACME challenges answered from the certificate manager's pending set.
struct CertChallenges(Arc<meshgate_certs::challenge::ChallengeResponder>);

impl crate::server::Challenges for CertChallenges {
    fn http01(&self, token: &str) -> Option<String> {
        self.0.http01_response(token)
    }
    fn tls_alpn01(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.tls_alpn01_cert(name)
    }
}

/// How often the certificate follower reports served certificates to the store.
const CERT_FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Starts the reservations store + API (when `domains` is set) and the certificate manager
/// (when `[tls.acme]` is set), wired into `gateway`. Certificates are desired for the
/// static terminate routes and the verified terminate-mode custom domains.
pub async fn start_services(gateway: &Gateway, config: &GatewayConfig) -> Result<Services> {
    let public = public_addresses(config);
    let reservations = match config.domains.first() {
        Some(domain) => {
            let token_file = config
                .admin
                .token_file
                .clone()
                .unwrap_or_else(|| config.data_dir.join("admin.token"));
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
            let r = crate::api::Reservations::start(
                &config.data_dir,
                domain.as_str(),
                &token_file,
                crate::api::ApiConfig {
                    gateway_addrs: public,
                    ..Default::default()
                },
                verifier_config(config, domain.as_str()),
            )?;
            gateway.set_api(crate::api::handler(r.api.clone()));
            gateway.follow_reserved_routes(r.store.routes());
            tracing::info!(domain = %domain, token_file = %token_file.display(), "reservations enabled");
            Some(r)
        }
        None => None,
    };
    let certs = match &config.tls.acme {
        Some(acme) => Some(start_certs(
            gateway,
            config,
            acme,
            reservations.as_ref().map(|r| r.store.clone()),
        )?),
        None => None,
    };
    Ok(Services {
        reservations,
        certs,
    })
}

fn start_certs(
    gateway: &Gateway,
    config: &GatewayConfig,
    acme: &meshgate_config::gateway::Acme,
    store: Option<meshgate_reservations::store::SharedStore>,
) -> Result<CertService> {
    let cfg = cert_config(config, acme)?;
    let manager = Arc::new(meshgate_certs::CertManager::new(cfg)?);
    gateway
        .inner()
        .metrics
        .register(|r| manager.register_metrics(r));
    crate::api::register_status(gateway.inner(), manager.clone());
    gateway.set_challenges(Arc::new(CertChallenges(manager.challenges())));
    let resolver = manager.resolver();
    gateway
        .resolver()
        .set_fallback(Arc::new(move |name: &str| resolver.lookup(name)));
    // Terminate hosts of the route table (static routes; routed reservations are verified
    // or covered by the wildcard). Verified domains not yet routed come from the store.
    let (routed_tx, routed_rx) = tokio::sync::watch::channel(Arc::new(BTreeSet::new()));
    gateway.on_routes_changed(Arc::new(move |table: &crate::routes::RouteTable| {
        let hosts: BTreeSet<String> = table
            .entries()
            .filter(|e| e.route.mode == meshgate_config::route::Mode::Terminate)
            .map(|e| e.route.host.to_string())
            .filter(|h| !h.starts_with("*."))
            .collect();
        routed_tx.send_if_modified(|cur| {
            let changed = **cur != hosts;
            if changed {
                *cur = Arc::new(hosts);
            }
            changed
        });
    }));
    let follower =
        crate::api::follow_certificates(store, manager.clone(), routed_rx, CERT_FOLLOW_POLL);
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
    Ok(CertService {
        manager,
        driver: driver_abort,
        tasks: vec![follower, watcher],
    })
}

/// The certificate manager's settings from `data_dir`, `domains` and `[tls.acme]`.
fn cert_config(
    config: &GatewayConfig,
    acme: &meshgate_config::gateway::Acme,
) -> Result<meshgate_certs::CertConfig> {
    let dns_listen = acme
        .dns_responder
        .then(|| acme.dns_listen.unwrap_or(([0, 0, 0, 0], 53).into()));
    let cfg = serde_json::json!({
        "state_dir": config.data_dir.join("certs"),
        "farmer_domain": config.domains.first(),
        "acme": {
            "directory": acme.directory,
            "contact_email": acme.contact.trim_start_matches("mailto:"),
            "ca_root": acme.directory_ca,
            "challenge": acme.challenge,
            "order_timeout_secs": acme.order_timeout_secs.unwrap_or(90.0),
        },
        "dns": { "listen": dns_listen, "ns_host": acme.ns_host },
    });
    serde_json::from_value(cfg).context("certificate manager configuration")
}

/// The addresses a custom domain may resolve to instead of CNAMEing here: the configured
/// `reservations.public_addresses`, else the non-wildcard, non-loopback HTTPS listen addresses.
fn public_addresses(config: &GatewayConfig) -> Vec<IpAddr> {
    if !config.reservations.public_addresses.is_empty() {
        return config.reservations.public_addresses.clone();
    }
    config
        .listen
        .https
        .iter()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
        .collect()
}

/// The custom-domain verifier's settings from `[reservations]`.
fn verifier_config(config: &GatewayConfig, domain: &str) -> VerifierConfig {
    let r = &config.reservations;
    VerifierConfig {
        nameservers: r.nameservers.clone(),
        interval: r.interval(),
        grace: r.grace(),
        require_certificate: r.require_certificate,
        timeout: r.query_timeout(),
        ..VerifierConfig::new(domain, public_addresses(config))
    }
}

fn spawn_sighup_reload(gateway: Gateway) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let g = gateway.clone();
            match tokio::task::spawn_blocking(move || g.reload()).await {
                Ok(Ok(n)) => tracing::info!(routes = n, "reloaded on SIGHUP"),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "reload refused; previous configuration kept")
                }
                Err(_) => {}
            }
        }
    });
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn parse(text: &str) -> GatewayConfig {
        GatewayConfig::parse(Path::new("gateway.toml"), text).unwrap()
    }

    #[test]
    fn acme_table_reaches_the_certificate_manager() {
        let c = parse(
            "domains = [\"gw.example.org\"]\n[tls.acme]\ncontact = \"mailto:ops@example.org\"\n\
             challenge = \"tls-alpn-01\"\nns_host = \"ns1.example.org\"\n\
             dns_listen = \"127.0.0.1:5353\"\norder_timeout_secs = 30\n",
        );
        let cert = cert_config(&c, c.tls.acme.as_ref().unwrap()).unwrap();
        assert_eq!(cert.dns.ns_host.as_deref(), Some("ns1.example.org"));
        assert_eq!(cert.dns.listen, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(cert.acme.order_timeout_secs, 30.0);
        assert_eq!(
            cert.acme.challenge,
            meshgate_certs::CustomChallenge::TlsAlpn01
        );
        assert_eq!(cert.farmer_domain.as_deref(), Some("gw.example.org"));
        // Defaults: responder on :53, 90 s orders; `dns_responder = false` turns it off.
        let c = parse("[tls.acme]\ncontact = \"mailto:ops@example.org\"\n");
        let cert = cert_config(&c, c.tls.acme.as_ref().unwrap()).unwrap();
        assert_eq!(cert.dns.listen, Some("0.0.0.0:53".parse().unwrap()));
        assert_eq!(cert.acme.order_timeout_secs, 90.0);
        let c = parse("[tls.acme]\ncontact = \"mailto:ops@example.org\"\ndns_responder = false\n");
        let cert = cert_config(&c, c.tls.acme.as_ref().unwrap()).unwrap();
        assert_eq!(cert.dns.listen, None);
    }

    #[test]
    fn unknown_acme_challenge_is_a_located_error() {
        let text = "[tls.acme]\ncontact = \"mailto:ops@example.org\"\nchallenge = \"dns-01\"\n";
        let e = GatewayConfig::parse(Path::new("gateway.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.toml:3"), "{e}");
        assert!(e.contains("tls.acme.challenge"), "{e}");
    }

    #[test]
    fn reservations_table_reaches_the_verifier() {
        let c = parse(
            "domains = [\"gw.example.org\"]\n[listen]\nhttps = [\"[::]:443\"]\n\
             [reservations]\nnameservers = [\"127.0.0.1:5353\"]\n\
             public_addresses = [\"203.0.113.7\", \"2001:db8::7\"]\ninterval_secs = 42\n\
             grace_secs = 7\nrequire_certificate = true\nquery_timeout_ms = 900\n",
        );
        let v = verifier_config(&c, "gw.example.org");
        assert_eq!(v.gateway_domain, "gw.example.org");
        assert_eq!(v.nameservers, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(
            v.gateway_addrs,
            vec![
                "203.0.113.7".parse::<IpAddr>().unwrap(),
                "2001:db8::7".parse().unwrap()
            ]
        );
        assert_eq!(v.interval, Duration::from_secs(42));
        assert_eq!(v.grace, Duration::from_secs(7));
        assert!(v.require_certificate);
        assert_eq!(v.timeout, Duration::from_millis(900));
    }

    #[test]
    fn without_reservations_table_listeners_give_the_addresses() {
        let c =
            parse("[listen]\nhttps = [\"[::]:443\", \"198.51.100.1:443\", \"127.0.0.1:8443\"]\n");
        let v = verifier_config(&c, "gw.example.org");
        assert_eq!(
            v.gateway_addrs,
            vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        assert!(v.nameservers.is_empty());
        assert_eq!(v.interval, Duration::from_secs(300));
        assert_eq!(v.grace, Duration::from_secs(3600));
        assert!(!v.require_certificate);
        // With only `[::]:443`, nothing is known: the CNAME proof is the only one.
        let c = parse("");
        assert!(
            verifier_config(&c, "gw.example.org")
                .gateway_addrs
                .is_empty()
        );
    }
}
