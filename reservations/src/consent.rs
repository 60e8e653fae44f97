//! Backend consent: an overlay backend serves a reservation only while its node consents.
//!
//! Overlay addresses are bound to node keys, and the overlay's end-to-end sessions
//! authenticate every packet's source address, so a stream to `[address]:`[`CONSENT_PORT`]
//! reaches the node holding that address's key and nobody else. The node answers
//! `GET /v1/consent` there with its `[consent] allow` list ([`ConsentDoc`]); the gateway
//! asks when a reservation is made or changed, and every `consent_interval_secs` after.
//!
//! Per backend ([`BackendConsent`], a sans-IO state machine fed by [`step`]):
//! - the node lists the reservation (its host, or `owner@farmer-domain`, for the port):
//!   granted, served;
//! - the node answers without it: refused at once (revocation takes one interval);
//! - the node cannot be asked (unreachable, timeout, bad answer): the last-known consent
//!   holds for `consent_grace_secs`, then the backend is withdrawn.
//!
//! So a revoked backend stops being served within `interval + timeout` when its node answers,
//! and within `grace + interval + timeout` when it does not.

use crate::counters::Counters;
use crate::reservation::{BackendConsent, ConsentState, Kind, Reservation, Status, needs_consent};
use crate::store::{SharedStore, StoreError};
pub use meshgate_config::node::{CONSENT_PORT, ConsentGrant};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The path a node answers on [`CONSENT_PORT`].
pub const CONSENT_PATH: &str = "/v1/consent";
/// Largest consent answer a gateway reads; a node lists a few grants, not megabytes.
pub const MAX_CONSENT_BYTES: usize = 64 * 1024;
/// Most consent queries a checking round runs at once.
const CONCURRENT_QUERIES: usize = 16;

/// What a node answers on [`CONSENT_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentDoc {
    /// Always 1.
    pub version: u32,
    /// The answering node's overlay address (a gateway checks it is the one it asked).
    pub address: Ipv6Addr,
    /// The node's `[consent] allow` list.
    pub allow: Vec<ConsentGrant>,
}

impl ConsentDoc {
    /// Whether the node consents to `host` (the reservation's host) of deployer `owner` on
    /// the gateway of `farmer_domain`, for its overlay `port`.
    pub fn grants(&self, host: &str, owner: &str, farmer_domain: &str, port: u16) -> bool {
        let qualified = format!("{owner}@{farmer_domain}");
        self.allow.iter().any(|g| {
            let who = g.host.as_deref() == Some(host) || g.owner.as_deref() == Some(&qualified);
            who && (g.ports.is_empty() || g.ports.contains(&port))
        })
    }
}

/// What asking one node gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The node answered with its list.
    Listed(ConsentDoc),
    /// The node could not be asked, or its answer was unusable; nothing is known.
    Unanswered(String),
}

/// Asks nodes for their consent over the overlay (the composition root implements it with the
/// gateway's overlay dialer; tests may use anything).
pub trait ConsentSource: Send + Sync + 'static {
    fn fetch(&self, node: Ipv6Addr) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>>;
}

/// The consent rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// How long a granted consent outlives failed queries.
    pub grace_ms: u64,
}

/// Applies one node's answer about `backend` of `r` at `now_ms` to its entry. Returns whether
/// the entry moved into or out of `Granted`.
pub fn step(
    entry: &mut BackendConsent,
    r: &Reservation,
    farmer_domain: &str,
    answer: &Answer,
    now_ms: u64,
    rules: &Rules,
) -> bool {
    let before = entry.state;
    entry.checked_ms = Some(now_ms);
    match answer {
        Answer::Listed(doc) => {
            let host = r.host(farmer_domain);
            if doc.grants(&host, &r.owner, farmer_domain, entry.backend.port()) {
                entry.state = ConsentState::Granted;
                entry.confirmed_ms = Some(now_ms);
                entry.reason = None;
            } else {
                entry.state = ConsentState::Refused;
                entry.reason = Some(refusal(entry.backend, &host, &r.owner, farmer_domain));
            }
        }
        Answer::Unanswered(why) => {
            let within_grace = entry
                .confirmed_ms
                .is_some_and(|t| now_ms.saturating_sub(t) < rules.grace_ms);
            if entry.state == ConsentState::Granted && within_grace {
                entry.reason = Some(format!(
                    "could not ask the node ({why}); its last consent holds for the grace period"
                ));
            } else {
                entry.state = ConsentState::Unknown;
                entry.reason = Some(format!(
                    "cannot ask node {} for its consent on overlay port {CONSENT_PORT}: {why}",
                    entry.backend.ip()
                ));
            }
        }
    }
    (before == ConsentState::Granted) != (entry.state == ConsentState::Granted)
}

/// What a deployer reads when a node does not consent, with the line that fixes it.
fn refusal(backend: SocketAddr, host: &str, owner: &str, farmer_domain: &str) -> String {
    format!(
        "node {} does not consent to serve `{host}` on port {}: add \
         `{{ host = \"{host}\" }}` (or `{{ owner = \"{owner}@{farmer_domain}\" }}`) to \
         `[consent] allow` in that node's node.toml",
        backend.ip(),
        backend.port()
    )
}

/// Brings `r`'s consent entries in line with its backends (one per overlay backend; new
/// ones start `Unknown`) and applies the answers of the nodes asked. Returns how many
/// backends were granted or withdrawn.
pub fn apply(
    r: &mut Reservation,
    answers: &HashMap<Ipv6Addr, Answer>,
    farmer_domain: &str,
    now_ms: u64,
    rules: &Rules,
) -> usize {
    let mut entries: Vec<BackendConsent> = r
        .backends
        .iter()
        .filter(|b| needs_consent(b.ip()))
        .map(|b| {
            r.consent
                .iter()
                .find(|c| c.backend == *b)
                .cloned()
                .unwrap_or(BackendConsent {
                    backend: *b,
                    state: ConsentState::Unknown,
                    confirmed_ms: None,
                    checked_ms: None,
                    reason: Some("not asked yet".into()),
                })
        })
        .collect();
    let mut moved = 0;
    for e in &mut entries {
        let IpAddr::V6(node) = e.backend.ip() else {
            continue;
        };
        if let Some(answer) = answers.get(&node)
            && step(e, r, farmer_domain, answer, now_ms, rules)
        {
            moved += 1;
        }
    }
    r.consent = entries;
    moved
}

/// The overlay nodes behind `records`' backends.
pub fn nodes_of<'a>(records: impl IntoIterator<Item = &'a Reservation>) -> BTreeSet<Ipv6Addr> {
    records
        .into_iter()
        .flat_map(|r| r.backends.iter())
        .filter_map(|b| match b.ip() {
            IpAddr::V6(v6) if needs_consent(b.ip()) => Some(v6),
            _ => None,
        })
        .collect()
}

/// Asks each of `nodes` (up to [`CONCURRENT_QUERIES`] at once).
pub async fn ask_all(
    source: &dyn ConsentSource,
    nodes: BTreeSet<Ipv6Addr>,
    counters: &Counters,
) -> HashMap<Ipv6Addr, Answer> {
    use futures_util::StreamExt;
    let answers: HashMap<Ipv6Addr, Answer> = futures_util::stream::iter(nodes)
        .map(|n| async move { (n, source.fetch(n).await) })
        .buffer_unordered(CONCURRENT_QUERIES)
        .collect()
        .await;
    for a in answers.values() {
        counters.add(match a {
            Answer::Listed(_) => &counters.consent_queries,
            Answer::Unanswered(_) => &counters.consent_queries_failed,
        });
    }
    answers
}

/// Re-asks every overlay backend's node every `interval`, and at once when asked to.
pub struct Checker {
    pub store: SharedStore,
    pub source: Arc<dyn ConsentSource>,
    pub rules: Rules,
    pub interval: Duration,
    pub counters: Arc<Counters>,
    pub wake: Arc<Notify>,
}

impl Checker {
    /// One round at `now_ms`: asks every node behind a live reservation, applies the answers
    /// in one store change. Returns how many backends were granted or withdrawn.
    pub async fn check_all(&self, now_ms: u64) -> Result<usize, StoreError> {
        let records: Vec<Reservation> = self
            .store
            .list(None, None)?
            .into_iter()
            .filter(|r| !matches!(r.status, Status::Dropped { .. }))
            .filter(|r| r.backends.iter().any(|b| needs_consent(b.ip())))
            .collect();
        if records.is_empty() {
            return Ok(0);
        }
        let answers = ask_all(&*self.source, nodes_of(&records), &self.counters).await;
        let keys: Vec<_> = records.iter().map(Reservation::key).collect();
        let farmer = self.store.farmer_domain().to_string();
        let rules = self.rules;
        let mut moved = 0;
        let mut withdrawn = 0;
        self.store.update_many(&keys, &mut |batch| {
            moved = 0;
            withdrawn = 0;
            for r in batch.iter_mut() {
                let before = r.servable_backends().len();
                moved += apply(r, &answers, &farmer, now_ms, &rules);
                let after = r.servable_backends().len();
                withdrawn += before.saturating_sub(after);
                if r.kind == Kind::Name || r.status.is_active() {
                    for c in r.consent.iter().filter(|c| c.state != ConsentState::Granted) {
                        tracing::debug!(reservation = %r.key(), backend = %c.backend, reason = ?c.reason, "backend not served");
                    }
                }
            }
        })?;
        if withdrawn > 0 {
            tracing::warn!(
                backends = withdrawn,
                "overlay backends withdrawn: their nodes no longer consent"
            );
            self.counters
                .consent_withdrawn
                .fetch_add(withdrawn as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(moved)
    }

    async fn run(self) {
        loop {
            if let Err(e) = self.check_all(crate::clock::now_unix_ms()).await {
                tracing::warn!("consent round failed: {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Runs the checker on the current tokio runtime.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::{Key, Options};
    use meshgate_config::route::Mode;

    const FARM: &str = "gw.example";
    const RULES: Rules = Rules { grace_ms: 10_000 };

    fn node() -> Ipv6Addr {
        "6a1::1".parse().unwrap()
    }

    fn name(owner: &str) -> Reservation {
        Reservation::new(
            Key::name("shop"),
            owner,
            vec![
                SocketAddr::from((node(), 8080)),
                "203.0.113.1:80".parse().unwrap(),
            ],
            Mode::Terminate,
            Options::default(),
            1,
        )
    }

    fn listed(allow: Vec<ConsentGrant>) -> HashMap<Ipv6Addr, Answer> {
        HashMap::from([(
            node(),
            Answer::Listed(ConsentDoc {
                version: 1,
                address: node(),
                allow,
            }),
        )])
    }

    fn host(h: &str, ports: Vec<u16>) -> ConsentGrant {
        ConsentGrant {
            host: Some(h.into()),
            owner: None,
            ports,
        }
    }

    #[test]
    fn overlay_backends_wait_for_consent_others_do_not() {
        let mut r = name("alice");
        apply(&mut r, &HashMap::new(), FARM, 0, &RULES);
        assert_eq!(r.consent.len(), 1, "only the overlay backend needs consent");
        assert_eq!(r.consent[0].state, ConsentState::Unknown);
        assert_eq!(
            r.servable_backends(),
            vec!["203.0.113.1:80".parse().unwrap()]
        );
    }

    #[test]
    fn grants_by_host_or_qualified_owner_and_port() {
        let mut r = name("alice");
        apply(
            &mut r,
            &listed(vec![host("shop.gw.example", vec![])]),
            FARM,
            1,
            &RULES,
        );
        assert_eq!(r.consent[0].state, ConsentState::Granted);
        let mut r = name("alice");
        let owner = ConsentGrant {
            host: None,
            owner: Some("alice@gw.example".into()),
            ports: vec![8080],
        };
        apply(&mut r, &listed(vec![owner.clone()]), FARM, 1, &RULES);
        assert_eq!(r.consent[0].state, ConsentState::Granted);
        // Another deployer named alice on another gateway is not this one.
        let mut r = name("alice");
        apply(&mut r, &listed(vec![owner]), "other.example", 1, &RULES);
        assert_eq!(r.consent[0].state, ConsentState::Refused);
        // The wrong port or another host: refused, and the reason says how to consent.
        let mut r = name("mallory");
        apply(
            &mut r,
            &listed(vec![host("shop.gw.example", vec![9000])]),
            FARM,
            1,
            &RULES,
        );
        assert_eq!(r.consent[0].state, ConsentState::Refused);
        let reason = r.consent[0].reason.clone().unwrap();
        assert!(
            reason.contains("{ host = \"shop.gw.example\" }"),
            "{reason}"
        );
    }

    #[test]
    fn revocation_is_immediate_silence_only_after_grace() {
        let grant = listed(vec![host("shop.gw.example", vec![])]);
        let silent = HashMap::from([(node(), Answer::Unanswered("timed out".into()))]);
        let mut r = name("alice");
        apply(&mut r, &grant, FARM, 1_000, &RULES);
        assert_eq!(apply(&mut r, &silent, FARM, 10_999, &RULES), 0);
        assert_eq!(r.consent[0].state, ConsentState::Granted, "within grace");
        assert_eq!(apply(&mut r, &silent, FARM, 11_000, &RULES), 1);
        assert_eq!(r.consent[0].state, ConsentState::Unknown);
        apply(&mut r, &grant, FARM, 12_000, &RULES);
        assert_eq!(r.consent[0].state, ConsentState::Granted);
        assert_eq!(apply(&mut r, &listed(vec![]), FARM, 12_001, &RULES), 1);
        assert_eq!(r.consent[0].state, ConsentState::Refused);
        // Silence never grants.
        apply(&mut r, &silent, FARM, 12_002, &RULES);
        assert_eq!(r.consent[0].state, ConsentState::Unknown);
    }

    #[test]
    fn entries_follow_the_backend_list() {
        let mut r = name("alice");
        apply(
            &mut r,
            &listed(vec![host("shop.gw.example", vec![])]),
            FARM,
            1,
            &RULES,
        );
        r.backends = vec![SocketAddr::from((node(), 9090))];
        apply(&mut r, &HashMap::new(), FARM, 2, &RULES);
        assert_eq!(r.consent.len(), 1);
        assert_eq!(r.consent[0].backend.port(), 9090);
        assert_eq!(r.consent[0].state, ConsentState::Unknown);
    }
}
