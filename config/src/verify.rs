//! Custom-domain proof: the state machine (sans-IO) and the DNS checks that feed it.
//!
//! A domain becomes active only when both hold:
//! - **pointing**: it CNAMEs to the gateway's domain (or a name under it), or every A/AAAA it
//!   resolves to is one of the gateway's addresses (and there is at least one);
//! - **ownership**: `_meshgate-challenge.<fqdn>` has a TXT string equal to the owner's
//!   challenge token (see [`crate::token::ChallengeKey::token_for`]).
//!
//! States: `pending` → (proof holds) → `verified` → (certificate ready, or passthrough, or
//! certificates not required) → `active`. A verified or active domain whose proof fails keeps
//! serving for the grace period, then becomes `deactivated` with the reason; when the proof
//! holds again it is verified (and activated) again. The verifier re-checks every domain
//! periodically and on request.

use crate::reservation::{Key, Kind, Reservation, Status, challenge_name};
use crate::route::Mode;
use crate::store::{Store, StoreError, now_unix_ms};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Most DNS checks a verification round runs at once.
pub const CONCURRENT_CHECKS: usize = 16;

/// The verification rules the state machine applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// How long a verified/active domain may fail its proof before it is deactivated.
    pub grace_ms: u64,
    /// Terminate-mode domains become active only once the certificate layer has a certificate.
    pub require_certificate: bool,
}

/// What the state machine is fed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A DNS check finished: `Ok` when the proof holds, else why not.
    Checked(Result<(), String>),
    /// A DNS check could not tell (timeout, SERVFAIL, server unreachable): recorded, but it
    /// neither proves nor disproves anything, so no status changes and no grace clock starts.
    Inconclusive(String),
    /// The certificate layer has (or lost) a certificate for the domain.
    CertificateReady(bool),
}

/// Why a DNS check did not confirm the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    /// DNS answered, and the proof does not hold.
    Failed(String),
    /// DNS gave no usable answer; nothing is known.
    Inconclusive(String),
}

impl CheckFailure {
    /// The state machine's input for a check that ended with `result`.
    pub fn input(result: Result<(), CheckFailure>) -> Input {
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

/// Applies one input at time `now_ms` (unix ms) to a domain reservation. Returns true when
/// its status changed. Names are left untouched.
pub fn step(r: &mut Reservation, input: Input, now_ms: u64, rules: &Rules) -> bool {
    if r.kind != Kind::Domain {
        return false;
    }
    let before = r.status.clone();
    let v = &mut r.verification;
    match input {
        Input::Checked(Ok(())) => {
            v.last_checked_ms = Some(now_ms);
            v.last_error = None;
            v.failing_since_ms = None;
            if matches!(r.status, Status::Pending | Status::Deactivated { .. }) {
                r.status = Status::Verified;
            }
        }
        Input::Checked(Err(reason)) => {
            v.last_checked_ms = Some(now_ms);
            if matches!(r.status, Status::Verified | Status::Active) {
                let since = *v.failing_since_ms.get_or_insert(now_ms);
                if now_ms.saturating_sub(since) >= rules.grace_ms {
                    r.status = Status::Deactivated {
                        reason: format!(
                            "the DNS proof failed for longer than the {} s grace period: {reason}",
                            rules.grace_ms / 1000
                        ),
                    };
                    v.failing_since_ms = None;
                }
            }
            v.last_error = Some(reason);
        }
        Input::Inconclusive(reason) => {
            v.last_checked_ms = Some(now_ms);
            v.last_error = Some(format!("inconclusive (DNS gave no answer): {reason}"));
        }
        Input::CertificateReady(ready) => v.certificate_ready = ready,
    }
    let can_serve = r.mode == Mode::Passthrough
        || !rules.require_certificate
        || r.verification.certificate_ready;
    if r.status == Status::Verified && can_serve && r.verification.failing_since_ms.is_none() {
        r.status = Status::Active;
    }
    r.status != before
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
}

impl VerifierConfig {
    /// Defaults: system resolvers, re-validate every 5 minutes, 1 hour grace, no certificate
    /// gate, 5 s query timeout.
    pub fn new(gateway_domain: &str, gateway_addrs: Vec<IpAddr>) -> Self {
        VerifierConfig {
            nameservers: Vec::new(),
            gateway_domain: gateway_domain.trim_end_matches('.').to_ascii_lowercase(),
            gateway_addrs,
            interval: Duration::from_secs(300),
            grace: Duration::from_secs(3600),
            require_certificate: false,
            timeout: Duration::from_secs(5),
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
    store: Arc<Store>,
    cfg: VerifierConfig,
    nameservers: Vec<SocketAddr>,
}

impl Verifier {
    pub fn new(store: Arc<Store>, cfg: VerifierConfig) -> Result<Self, VerifyError> {
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
        })
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

    /// Checks the proof for `fqdn` owned by `owner`: `Ok`, the reason it does not hold, or
    /// why DNS could not tell.
    pub async fn check(&self, fqdn: &str, owner: &str) -> Result<(), CheckFailure> {
        let resolver = self.resolver().map_err(CheckFailure::Inconclusive)?;
        self.check_with(&resolver, fqdn, owner).await
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

    /// Checks one domain now and applies the result. `Ok(None)` if it does not exist.
    pub async fn check_domain(
        &self,
        fqdn: &str,
        now_ms: u64,
    ) -> Result<Option<Reservation>, StoreError> {
        let Some(r) = self.store.get(&Key::domain(fqdn))? else {
            return Ok(None);
        };
        let result = self.check(fqdn, &r.owner).await;
        self.apply(&r, result, now_ms)
    }

    /// Checks every domain once at time `now_ms` (up to [`CONCURRENT_CHECKS`] at a time) and
    /// applies all results in one store transaction. Returns how many changed status.
    pub async fn check_all(&self, now_ms: u64) -> Result<usize, StoreError> {
        use futures_util::StreamExt;
        let domains = self.store.list(None, Some(Kind::Domain))?;
        let resolver = self.resolver();
        let checks: Vec<_> = domains
            .iter()
            .map(|r| self.check_owned(&resolver, r.name.clone(), r.owner.clone()))
            .collect();
        let results: HashMap<(String, String), Result<(), CheckFailure>> =
            futures_util::stream::iter(checks)
                .buffer_unordered(CONCURRENT_CHECKS)
                .collect()
                .await;
        let keys: Vec<Key> = domains.iter().map(Reservation::key).collect();
        let rules = self.cfg.rules();
        let mut changed = 0;
        let mut results = results;
        self.store.update_many(&keys, |r| {
            // A domain deleted and re-created by someone else meanwhile: the check was for
            // the old owner, so it says nothing about this one.
            if let Some(result) = results.remove(&(r.name.clone(), r.owner.clone()))
                && step(r, CheckFailure::input(result), now_ms, &rules)
            {
                changed += 1;
                tracing::info!(domain = %r.name, status = ?r.status, "domain status changed");
            }
        })?;
        Ok(changed)
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

    fn apply(
        &self,
        checked: &Reservation,
        result: Result<(), CheckFailure>,
        now_ms: u64,
    ) -> Result<Option<Reservation>, StoreError> {
        let rules = self.cfg.rules();
        self.store.update(&checked.key(), |r| {
            // The reservation was deleted and re-created by someone else meanwhile: the
            // check was for the old owner, so it says nothing about this one.
            if r.owner == checked.owner && step(r, CheckFailure::input(result), now_ms, &rules) {
                tracing::info!(domain = %r.name, status = ?r.status, "domain status changed");
            }
            Ok::<(), StoreError>(())
        })
    }

    /// Re-validates every domain each `interval`, and at once when the store asks.
    pub async fn run(self) {
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

    /// Runs [`Verifier::run`] on the current tokio runtime.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::{Options, Verification};

    fn domain(mode: Mode) -> Reservation {
        Reservation {
            kind: Kind::Domain,
            name: "shop.example".into(),
            owner: "alice".into(),
            backends: vec!["[400::1]:80".parse().unwrap()],
            mode,
            options: Options::default(),
            status: Status::Pending,
            created_at: 0,
            updated_at: 0,
            verification: Verification::default(),
        }
    }

    const RULES: Rules = Rules {
        grace_ms: 60_000,
        require_certificate: true,
    };

    #[test]
    fn pending_verified_active_with_certificate() {
        let mut r = domain(Mode::Terminate);
        assert!(!step(
            &mut r,
            Input::Checked(Err("no TXT".into())),
            1,
            &RULES
        ));
        assert_eq!(r.status, Status::Pending);
        assert_eq!(r.verification.last_error.as_deref(), Some("no TXT"));
        assert!(step(&mut r, Input::Checked(Ok(())), 2, &RULES));
        assert_eq!(r.status, Status::Verified);
        assert!(step(&mut r, Input::CertificateReady(true), 3, &RULES));
        assert_eq!(r.status, Status::Active);
    }

    #[test]
    fn passthrough_needs_no_certificate() {
        let mut r = domain(Mode::Passthrough);
        step(&mut r, Input::Checked(Ok(())), 1, &RULES);
        assert_eq!(r.status, Status::Active);
    }

    #[test]
    fn inconclusive_checks_change_nothing_and_start_no_grace_clock() {
        let rules = Rules {
            require_certificate: false,
            grace_ms: 0,
        };
        let mut r = domain(Mode::Terminate);
        step(&mut r, Input::Checked(Ok(())), 0, &rules);
        assert_eq!(r.status, Status::Active);
        let timeout = Input::Inconclusive("request timed out".into());
        assert!(!step(&mut r, timeout.clone(), 10_000, &rules));
        assert_eq!(r.status, Status::Active);
        assert_eq!(r.verification.failing_since_ms, None);
        assert_eq!(r.verification.last_checked_ms, Some(10_000));
        assert!(
            r.verification
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("inconclusive") && e.contains("timed out"))
        );
        // Nor does it verify a pending domain.
        let mut p = domain(Mode::Passthrough);
        assert!(!step(&mut p, timeout, 1, &rules));
        assert_eq!(p.status, Status::Pending);
    }

    #[test]
    fn failing_proof_deactivates_after_grace_only() {
        let rules = Rules {
            require_certificate: false,
            ..RULES
        };
        let mut r = domain(Mode::Terminate);
        step(&mut r, Input::Checked(Ok(())), 0, &rules);
        assert_eq!(r.status, Status::Active);
        step(&mut r, Input::Checked(Err("moved".into())), 10_000, &rules);
        step(&mut r, Input::Checked(Err("moved".into())), 69_999, &rules);
        assert_eq!(r.status, Status::Active, "still within grace");
        // A blip that recovers resets the clock.
        step(&mut r, Input::Checked(Ok(())), 70_000, &rules);
        step(&mut r, Input::Checked(Err("moved".into())), 80_000, &rules);
        step(&mut r, Input::Checked(Err("moved".into())), 139_999, &rules);
        assert_eq!(r.status, Status::Active);
        assert!(step(
            &mut r,
            Input::Checked(Err("moved".into())),
            140_000,
            &rules
        ));
        assert!(matches!(&r.status, Status::Deactivated { reason } if reason.contains("moved")));
        // Pointed back: verified and active again.
        step(&mut r, Input::Checked(Ok(())), 200_000, &rules);
        assert_eq!(r.status, Status::Active);
    }
}
