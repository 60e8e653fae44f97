//! Reservations in a gateway process: the store in `data_dir`, the custom-domain verifier,
//! the backend-consent checker (asking overlay nodes through the gateway's overlay dialer)
//! and the API the deployers' listener (`[api]`) serves, all from `domains` and
//! `[reservations]`; and the farmer's admin token file.

use super::consent::OverlayConsentSource;
use super::fleet::Fleet;
use anyhow::{Context, Result};
use meshgate_config::gateway::GatewayConfig;
use meshgate_gateway::admin::api::{Api, ApiConfig, ConsentCheck};
use meshgate_gateway::upstream::dial::Dialer;
use meshgate_reservations::consent::{self, Checker};
use meshgate_reservations::counters::Counters;
use meshgate_reservations::store::SharedStore;
use meshgate_reservations::store::etcd::EtcdStore;
use meshgate_reservations::store::redb::RedbStore;
use meshgate_reservations::token::AdminToken;
use meshgate_reservations::verify::{Verifier, VerifierConfig};
use std::net::IpAddr;
use std::sync::Arc;

/// The store, the API over it, the verifier and consent-checker tasks (aborted on drop).
pub struct Reservations {
    pub store: SharedStore,
    /// The same store when it is the fleet's (etcd), for its revision and cache counts.
    pub fleet_store: Option<Arc<EtcdStore>>,
    pub api: Arc<Api>,
    verifier: tokio::task::JoinHandle<()>,
    consent: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Reservations {
    fn drop(&mut self) {
        self.verifier.abort();
        if let Some(c) = &self.consent {
            c.abort();
        }
    }
}

impl Reservations {
    /// Opens the store for the first of `domains` (none: no reservations) and starts the
    /// domain verifier on the current runtime, and the consent checker when there is an
    /// overlay (`overlay`: the gateway's overlay dialer); `admin` is the farmer's token
    /// ([`admin_token`]).
    pub fn start(
        config: &GatewayConfig,
        admin: AdminToken,
        overlay: Option<Arc<dyn Dialer>>,
        fleet: Option<&Fleet>,
    ) -> Result<Option<Reservations>> {
        let Some(domain) = config.domains.first() else {
            return Ok(None);
        };
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
        // In a fleet the store is etcd's (cached locally); on its own, redb in data_dir.
        let fleet_store = match fleet {
            Some(f) => Some(Arc::new(f.open_store(config, domain.as_str())?)),
            None => None,
        };
        let store: SharedStore = match &fleet_store {
            Some(s) => s.clone(),
            None => Arc::new(RedbStore::open(&config.data_dir, domain.as_str())?),
        };
        let counters = Arc::new(Counters::default());
        let verifier = Verifier::new(store.clone(), verifier_config(config, domain.as_str()))?
            .with_counters(counters.clone())
            .spawn();
        let r = &config.reservations;
        let consent = overlay.map(|dialer| ConsentCheck {
            source: Arc::new(OverlayConsentSource {
                dialer,
                timeout: r.consent_timeout(),
            }),
            rules: consent::Rules {
                grace_ms: u64::try_from(r.consent_grace().as_millis()).unwrap_or(u64::MAX),
            },
        });
        let checker = consent.as_ref().map(|c| {
            Checker {
                store: store.clone(),
                source: c.source.clone(),
                rules: c.rules,
                interval: r.consent_interval(),
                counters: counters.clone(),
                wake: Arc::default(),
            }
            .spawn()
        });
        let api_config = ApiConfig {
            gateway_addrs: public_addresses(config),
            max_per_owner: r.max_per_owner,
            consent,
            counters,
            ..Default::default()
        };
        let api = Arc::new(Api::new(store.clone(), admin, api_config));
        tracing::info!(domain = %domain, api = %config.api.listen, "reservations enabled");
        Ok(Some(Reservations {
            store,
            fleet_store,
            api,
            verifier,
            consent: checker,
        }))
    }
}

/// The farmer's admin token from `admin.token_file` (default `<data_dir>/admin.token`),
/// created (0600) when missing. `POST /reload` and the API's farmer calls need it.
pub fn admin_token(config: &GatewayConfig) -> Result<AdminToken> {
    let token_file = config
        .admin
        .token_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("admin.token"));
    if let Some(dir) = token_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let (admin, _) = AdminToken::load_or_create(&token_file)
        .with_context(|| format!("admin token {}", token_file.display()))?;
    Ok(admin)
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
        pending_expiry: r.pending_expiry(),
        ..VerifierConfig::new(domain, public_addresses(config))
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
