//! The certificate manager in a gateway process, built from `[tls.acme]`, and its glue to
//! the gateway and the reservations: certificates are ordered only for the gateway's static
//! terminate routes and verified terminate-mode domains, and a domain waiting for its
//! certificate becomes active once it is valid. With `[fleet]`, certificates, the ACME
//! account, order locks and challenges live in etcd, and the DNS responder also serves the
//! farmer's zone from the live, healthy members.

use super::fleet::Fleet;
use anyhow::{Context, Result};
use meshgate_certs::farm::{FarmZone, FarmZoneConfig, ProbePolicy, follow_members};
use meshgate_certs::{CertConfig, CertManager, CertStore, serve_dns};
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::route::Mode;
use meshgate_fleet::Etcd;
use meshgate_fleet::acme::{AcmeStoreOptions, EtcdCertBackend, follow_challenges};
use meshgate_fleet::members::MemberSet;
use meshgate_gateway::routes::RouteTable;
use meshgate_reservations::store::{ReservationStore, SharedStore};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
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

/// Default TTL of an order lock's lease (`tls.acme.lock_ttl_secs`).
const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(15);

/// The certificate manager and, in a fleet, what its etcd backend needs running.
pub struct Certificates {
    pub manager: Arc<CertManager>,
    fleet: Option<FleetAcme>,
}

/// The fleet side of the certificates: the etcd backend, and the farmer zone served with
/// the challenge zone on `dns.listen`.
struct FleetAcme {
    backend: EtcdCertBackend,
    etcd: Etcd,
    dns: Option<(SocketAddr, FarmZone)>,
    probe_port: u16,
    probe: ProbePolicy,
}

/// The certificate manager for `[tls.acme]` (on the fleet's etcd with `[fleet]`), or `None`
/// without that table.
pub fn manager(config: &GatewayConfig, fleet: Option<&Fleet>) -> Result<Option<Certificates>> {
    let Some(acme) = &config.tls.acme else {
        return Ok(None);
    };
    let mut cfg = CertConfig::try_from(config).context("certificate manager configuration")?;
    let Some(fleet) = fleet else {
        return Ok(Some(Certificates {
            manager: Arc::new(CertManager::new(cfg)?),
            fleet: None,
        }));
    };
    // The fleet's responder serves the challenge zone and the farmer zone together.
    let listen = cfg.dns.listen.take();
    let dns = match (&cfg.farmer_domain, listen) {
        (Some(domain), Some(listen)) => {
            let mut zone = FarmZoneConfig::new(domain);
            if !acme.zone_name_servers.is_empty() {
                zone.name_servers = acme.zone_name_servers.clone();
            } else {
                zone.name_servers = vec![acme.ns_host.clone().unwrap_or_else(|| domain.clone())];
            }
            if let Some(caa) = &acme.zone_caa {
                zone.caa_issuers = caa.clone();
            }
            if let Some(ttl) = acme.zone_ttl_secs {
                zone.answer_ttl = ttl;
            }
            Some((
                listen,
                FarmZone::new(&zone).context("tls.acme: the farmer zone")?,
            ))
        }
        _ => None,
    };
    let backend = EtcdCertBackend::new(
        fleet.etcd.clone(),
        &fleet.keys,
        fleet.fleet_key.clone(),
        CertStore::open(&cfg.state_dir)?,
        AcmeStoreOptions {
            holder: fleet.id.clone(),
            lock_ttl: acme
                .lock_ttl_secs
                .map_or(DEFAULT_LOCK_TTL, Duration::from_secs),
            settle: meshgate_fleet::acme::DEFAULT_SETTLE,
        },
    );
    let manager = Arc::new(CertManager::with_backend(cfg, Arc::new(backend.clone()))?);
    let probe = ProbePolicy {
        interval: acme
            .probe_interval_ms
            .map_or(ProbePolicy::default().interval, Duration::from_millis),
        ..ProbePolicy::default()
    };
    Ok(Some(Certificates {
        manager,
        fleet: Some(FleetAcme {
            backend,
            etcd: fleet.etcd.clone(),
            dns,
            probe_port: acme.probe_port.unwrap_or(443),
            probe,
        }),
    }))
}

/// Serves the farmer zone and the challenge zone on `listen`, retrying a failed bind with
/// backoff (1 s doubling to 5 min); never returns.
async fn serve_zones_with_retry(
    listen: SocketAddr,
    farm: FarmZone,
    challenge: Option<meshgate_certs::ChallengeZone>,
) {
    let mut delay = Duration::from_secs(1);
    let mut handlers = vec![(farm.origin().clone(), farm.zone_handler())];
    if let Some(c) = challenge {
        handlers.push((c.origin().clone(), c.zone_handler()));
    }
    let _server = loop {
        match serve_dns(listen, handlers.clone()).await {
            Ok(server) => break server,
            Err(e) => {
                tracing::error!(
                    retry_in_secs = delay.as_secs(),
                    "{e}; the farmer zone waits"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(300));
            }
        }
    };
    std::future::pending::<()>().await
}

/// The members' advertised addresses, as the farmer zone wants them.
fn advertised(members: &MemberSet) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = members
        .values()
        .flat_map(|m| m.advertise.iter().copied())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Feeds the members' addresses into a watch the farmer zone follows.
fn member_addresses(
    mut members: watch::Receiver<MemberSet>,
) -> (watch::Receiver<Vec<IpAddr>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(advertised(&members.borrow_and_update()));
    let task = tokio::spawn(async move {
        while members.changed().await.is_ok() {
            let now = advertised(&members.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = *cur != now;
                if changed {
                    *cur = now;
                }
                changed
            });
        }
    });
    (rx, task)
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
    /// domains in `store` not yet routed. In a fleet, also follows etcd's certificates and
    /// challenges and serves the farmer zone from `members`.
    pub fn start(
        certificates: Certificates,
        store: Option<SharedStore>,
        mut routes: watch::Receiver<Arc<RouteTable>>,
        members: Option<watch::Receiver<MemberSet>>,
    ) -> CertService {
        let Certificates { manager, fleet } = certificates;
        let mut fleet_tasks = Vec::new();
        if let Some(f) = fleet {
            fleet_tasks.push(f.backend.follow());
            fleet_tasks.push(follow_challenges(
                &f.etcd,
                f.backend.keys(),
                (*manager).clone(),
            ));
            if let Some((listen, zone)) = f.dns {
                let members = members.unwrap_or_else(|| watch::channel(MemberSet::default()).1);
                let (addresses, feed) = member_addresses(members);
                fleet_tasks.push(feed);
                fleet_tasks.push(tokio::spawn(follow_members(
                    zone.clone(),
                    addresses,
                    f.probe_port,
                    f.probe,
                )));
                let challenge = manager.dns_zone();
                fleet_tasks.push(tokio::spawn(serve_zones_with_retry(
                    listen, zone, challenge,
                )));
            }
        }
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
        let mut tasks = vec![hosts, follower, watcher];
        tasks.extend(fleet_tasks);
        CertService {
            manager,
            driver: driver_abort,
            tasks,
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
