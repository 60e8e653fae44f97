//! Custom-domain proof: the DNS checks that feed the lifecycle state machine
//! ([`crate::lifecycle`]), and the verifier task that runs them against the store.
//!
//! A domain becomes active only when both hold:
//! - **pointing**: it CNAMEs to the gateway's domain (or a name under it), or every A/AAAA it
//!   resolves to is one of the gateway's addresses (and there is at least one);
//! - **ownership**: `_meshgate-challenge.<fqdn>` has a TXT string equal to the owner's
//!   challenge token (see [`crate::token::ChallengeKey::token_for`]).
//!
//! The verifier re-checks every domain periodically and on request.

use crate::clock::now_unix_ms;
use crate::counters::Counters;
use crate::lifecycle::{Input, Rules, Settled, settle, step};
use crate::reservation::{Key, Kind, Reservation, Status, challenge_name};
use crate::store::{SharedStore, StoreError};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Most DNS checks a verification round runs at once.
const CONCURRENT_CHECKS: usize = 16;

/// Why a DNS check did not confirm the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CheckFailure {
    /// DNS answered, and the proof does not hold.
    Failed(String),
    /// DNS gave no usable answer; nothing is known.
    Inconclusive(String),
}

impl CheckFailure {
    /// The state machine's input for a check that ended with `result`.
    fn input(result: Result<(), CheckFailure>) -> Input {
        match result {
            Ok(()) => Input::Checked(Ok(())),
            Err(CheckFailure::Failed(reason)) => Input::Checked(Err(reason)),
            Err(CheckFailure::Inconclusive(reason)) => Input::Inconclusive(reason),
        }
    }
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::Failed(r) => f.write_str(r),
            CheckFailure::Inconclusive(r) => write!(f, "inconclusive: {r}"),
        }
    }
}

/// How the verifier reaches DNS and what counts as "pointed at this gateway".
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Name servers to ask (`ip:port`); empty means those in `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// The gateway's domain: a CNAME to it (or to a name under it) counts as pointed.
    pub gateway_domain: String,
    /// The gateway's public addresses: a domain resolving only to these counts as pointed.
    pub gateway_addrs: Vec<IpAddr>,
    /// Re-validation period.
    pub interval: Duration,
    /// Grace period before a repointed domain is deactivated.
    pub grace: Duration,
    /// Wait for a certificate before activating terminate-mode domains.
    pub require_certificate: bool,
    /// Per-query timeout.
    pub timeout: Duration,
    /// A claim unproven this long is deleted; a dropped one is kept this long.
    pub pending_expiry: Duration,
}

impl VerifierConfig {
    /// Defaults: system resolvers, re-validate every 5 minutes, 1 hour grace, no certificate
    /// gate, 5 s query timeout, unproven claims expire after 3 days.
    pub fn new(gateway_domain: &str, gateway_addrs: Vec<IpAddr>) -> Self {
        VerifierConfig {
            nameservers: Vec::new(),
            gateway_domain: gateway_domain.trim_end_matches('.').to_ascii_lowercase(),
            gateway_addrs,
            interval: Duration::from_secs(300),
            grace: Duration::from_secs(3600),
            require_certificate: false,
            timeout: Duration::from_secs(5),
            pending_expiry: Duration::from_secs(259_200),
        }
    }

    fn rules(&self) -> Rules {
        Rules {
            grace_ms: u64::try_from(self.grace.as_millis()).unwrap_or(u64::MAX),
            require_certificate: self.require_certificate,
        }
    }
}

/// Verifier setup failures.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no name servers configured and none found in /etc/resolv.conf")]
    NoNameServers,
    #[error("DNS resolver: {0}")]
    Resolver(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks domains over DNS and drives their state machines in the store.
pub struct Verifier {
    store: SharedStore,
    cfg: VerifierConfig,
    nameservers: Vec<SocketAddr>,
    counters: Arc<Counters>,
}

impl Verifier {
    pub fn new(store: SharedStore, cfg: VerifierConfig) -> Result<Self, VerifyError> {
        let nameservers = if cfg.nameservers.is_empty() {
            system_nameservers()
        } else {
            cfg.nameservers.clone()
        };
        if nameservers.is_empty() {
            return Err(VerifyError::NoNameServers);
        }
        Ok(Verifier {
            store,
            cfg,
            nameservers,
            counters: Arc::default(),
        })
    }

    /// Counts expired and dropped claims in `counters` (shared with the API's metrics).
    pub fn with_counters(mut self, counters: Arc<Counters>) -> Self {
        self.counters = counters;
        self
    }

    /// A fresh resolver per round, so a record changed since the last round is seen now and
    /// not after a cached TTL.
    fn resolver(&self) -> Result<TokioResolver, String> {
        let servers = self
            .nameservers
            .iter()
            .map(|sa| {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        );
        let opts = builder.options_mut();
        opts.timeout = self.cfg.timeout;
        opts.attempts = 2;
        opts.preserve_intermediates = true;
        builder
            .build()
            .map_err(|e| format!("cannot build a DNS resolver: {e}"))
    }

    async fn check_with(
        &self,
        resolver: &TokioResolver,
        fqdn: &str,
        owner: &str,
    ) -> Result<(), CheckFailure> {
        use CheckFailure::{Failed, Inconclusive};
        let pointed = self.check_pointing(resolver, fqdn).await;
        let owned = self.check_challenge(resolver, fqdn, owner).await;
        // A definite failure of either part decides; otherwise an unanswered part leaves
        // the whole check inconclusive.
        match (pointed, owned) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(Failed(p)), Err(Failed(o))) => Err(Failed(format!("{p}; {o}"))),
            (Err(Failed(e)), _) | (_, Err(Failed(e))) => Err(Failed(e)),
            (Err(Inconclusive(p)), Err(Inconclusive(o))) => Err(Inconclusive(format!("{p}; {o}"))),
            (Err(Inconclusive(e)), Ok(())) | (Ok(()), Err(Inconclusive(e))) => Err(Inconclusive(e)),
        }
    }

    async fn check_pointing(
        &self,
        resolver: &TokioResolver,
        fqdn: &str,
    ) -> Result<(), CheckFailure> {
        use CheckFailure::{Failed, Inconclusive};
        let gw = &self.cfg.gateway_domain;
        let name = format!("{fqdn}.");
        let cname = match resolver.lookup(name.as_str(), RecordType::CNAME).await {
            Ok(lookup) => lookup.answers().iter().find_map(|r| match &r.data {
                RData::CNAME(c) => Some(c.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
                _ => None,
            }),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => None,
            Err(e) => return Err(Inconclusive(format!("DNS lookup of {fqdn} CNAME: {e}"))),
        };
        if let Some(target) = &cname
            && (target == gw || target.ends_with(&format!(".{gw}")))
        {
            return Ok(());
        }
        let mut addrs = Vec::new();
        for rtype in [RecordType::A, RecordType::AAAA] {
            match resolver.lookup(name.as_str(), rtype).await {
                Ok(lookup) => addrs.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                Err(e) => {
                    return Err(Inconclusive(format!("DNS lookup of {fqdn} {rtype}: {e}")));
                }
            }
        }
        let foreign: Vec<String> = addrs
            .iter()
            .filter(|a| !self.cfg.gateway_addrs.contains(a))
            .map(ToString::to_string)
            .collect();
        let via = cname.map_or(String::new(), |t| format!(" (CNAME to {t})"));
        if addrs.is_empty() {
            Err(Failed(format!(
                "{fqdn}{via} neither CNAMEs to {gw} nor resolves to the gateway's addresses"
            )))
        } else if !foreign.is_empty() {
            Err(Failed(format!(
                "{fqdn}{via} resolves to {}, which is not this gateway (CNAME it to {gw})",
                foreign.join(", ")
            )))
        } else {
            Ok(())
        }
    }

    async fn check_challenge(
        &self,
        resolver: &TokioResolver,
        fqdn: &str,
        owner: &str,
    ) -> Result<(), CheckFailure> {
        use CheckFailure::{Failed, Inconclusive};
        let name = challenge_name(fqdn);
        let expected = self.store.challenge_token(owner, fqdn);
        let values: Vec<String> = match resolver
            .lookup(format!("{name}.").as_str(), RecordType::TXT)
            .await
        {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Vec::new(),
            Err(e) => return Err(Inconclusive(format!("DNS lookup of {name} TXT: {e}"))),
        };
        if values.iter().any(|v| v.trim() == expected) {
            Ok(())
        } else if values.is_empty() {
            Err(Failed(format!("no TXT record at {name}")))
        } else {
            Err(Failed(format!(
                "the TXT record at {name} does not hold the owner's token ({} other value(s))",
                values.len()
            )))
        }
    }

    /// Checks every domain once at time `now_ms` (up to [`CONCURRENT_CHECKS`] at a time) and
    /// applies all results in one store transaction. Returns how many changed status.
    pub async fn check_all(&self, now_ms: u64) -> Result<usize, StoreError> {
        use futures_util::StreamExt;
        let domains = self.store.list(None, Some(Kind::Domain))?;
        let resolver = self.resolver();
        let checks: Vec<_> = domains
            .iter()
            .filter(|r| !matches!(r.status, Status::Dropped { .. }))
            .map(|r| self.check_owned(&resolver, r.name.clone(), r.owner.clone()))
            .collect();
        let results: HashMap<(String, String), Result<(), CheckFailure>> =
            futures_util::stream::iter(checks)
                .buffer_unordered(CONCURRENT_CHECKS)
                .collect()
                .await;
        let keys: Vec<Key> = domains.iter().map(Reservation::key).collect();
        let rules = self.cfg.rules();
        // Whether each record's status changed, by key: a backend may re-run the edit, so
        // the last run's answer counts.
        // Each record's status before this round, by key: a backend may re-run the edit, so
        // the last run's view counts.
        let mut before: HashMap<Key, Status> = HashMap::new();
        let expiry_ms = u64::try_from(self.cfg.pending_expiry.as_millis()).unwrap_or(u64::MAX);
        let mut settled = Settled::default();
        let updated = self.store.update_many(&keys, &mut |batch| {
            before = batch.iter().map(|r| (r.key(), r.status.clone())).collect();
            for r in batch.iter_mut() {
                // A domain deleted and re-created meanwhile was not checked: nothing is known.
                if let Some(result) = results.get(&(r.name.clone(), r.owner.clone())).cloned() {
                    step(r, CheckFailure::input(result), now_ms, &rules);
                }
            }
            settled = settle(batch, now_ms, expiry_ms);
        })?;
        let changed: HashMap<Key, bool> = updated
            .iter()
            .map(|r| (r.key(), before.get(&r.key()) != Some(&r.status)))
            .collect();
        if settled.expired > 0 || settled.dropped > 0 {
            tracing::info!(
                expired = settled.expired,
                dropped = settled.dropped,
                "domain claims settled"
            );
        }
        self.counters
            .pending_expired
            .fetch_add(settled.expired as u64, std::sync::atomic::Ordering::Relaxed);
        self.counters
            .claims_dropped
            .fetch_add(settled.dropped as u64, std::sync::atomic::Ordering::Relaxed);
        for r in updated
            .iter()
            .filter(|r| changed.get(&r.key()) == Some(&true))
        {
            tracing::info!(domain = %r.name, status = ?r.status, "domain status changed");
        }
        Ok(changed.values().filter(|moved| **moved).count())
    }

    async fn check_owned(
        &self,
        resolver: &Result<TokioResolver, String>,
        name: String,
        owner: String,
    ) -> ((String, String), Result<(), CheckFailure>) {
        let result = match resolver {
            Ok(res) => self.check_with(res, &name, &owner).await,
            Err(e) => Err(CheckFailure::Inconclusive(e.clone())),
        };
        ((name, owner), result)
    }

    /// Re-validates every domain each `interval`, and at once when the store asks.
    async fn run(self) {
        let wake = self.store.verification_requests();
        loop {
            if let Err(e) = self.check_all(now_unix_ms()).await {
                tracing::warn!("domain verification round failed: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval) => {}
                _ = wake.notified() => {}
            }
        }
    }

    /// Runs the verifier (see [`Verifier::run`]) on the current tokio runtime.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }
}

/// `nameserver` lines of `/etc/resolv.conf`, port 53.
fn system_nameservers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
                .collect()
        })
        .unwrap_or_default()
}
