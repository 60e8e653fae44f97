//! The ACME client (instant-acme): account persistence, one order from start to certificate,
//! challenge publication and cleanup, ARI lookups. Decisions about *when* to order live in
//! [`crate::schedule`]; this module only performs an order.

use crate::backend::{CertBackend, Challenge, OrderGuard};
use crate::challenge::ChallengeResponder;
use crate::devca::IssuedPem;
use crate::dns::ChallengeZone;
use crate::error::IssueError;
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Where challenge responses are published during an order: this gateway's responders and,
/// through the order lock, every other gateway's.
pub(crate) struct ChallengeTargets<'a> {
    pub responder: &'a ChallengeResponder,
    pub dns: Option<&'a ChallengeZone>,
    pub guard: &'a dyn OrderGuard,
}

impl ChallengeTargets<'_> {
    /// Answers `challenge` here, then publishes it for the fleet.
    async fn publish(&self, challenge: &Challenge, what: &str) -> Result<(), IssueError> {
        apply_challenge(self.responder, self.dns, challenge, true)
            .await
            .map_err(|e| IssueError::new(format!("{what}: {e}")))?;
        self.guard
            .publish(challenge)
            .await
            .map_err(|e| IssueError::new(format!("{what}: publishing the challenge: {e}")))
    }
}

/// Adds (`present`) or removes one challenge response in this gateway's responders.
pub(crate) async fn apply_challenge(
    responder: &ChallengeResponder,
    dns: Option<&ChallengeZone>,
    challenge: &Challenge,
    present: bool,
) -> Result<(), crate::error::CertError> {
    match (challenge, present) {
        (
            Challenge::Http01 {
                token,
                key_authorization,
            },
            true,
        ) => responder.set_http01(token, key_authorization),
        (Challenge::Http01 { token, .. }, false) => responder.clear_http01(token),
        (Challenge::TlsAlpn01 { name, digest }, true) => responder.set_tls_alpn01(name, digest)?,
        (Challenge::TlsAlpn01 { name, .. }, false) => responder.clear_tls_alpn01(name),
        (Challenge::Dns01 { value }, present) => {
            let zone = dns.ok_or_else(|| {
                crate::error::CertError::Config(
                    "no DNS-01 zone is served (no farmer domain)".into(),
                )
            })?;
            if present {
                zone.add_txt(value).await
            } else {
                zone.remove_txt(value).await
            }
        }
    }
    Ok(())
}

pub(crate) struct AcmeClient {
    account: Account,
    orders_placed: Arc<AtomicU64>,
}

impl AcmeClient {
    /// The account stored in `store` for `directory`, or a new one registered under the
    /// backend's account lock (see the `account` module).
    pub(crate) async fn connect(
        directory: &str,
        contact: &str,
        ca_root: Option<&Path>,
        store: &dyn CertBackend,
        orders_placed: Arc<AtomicU64>,
    ) -> Result<Self, IssueError> {
        let account = crate::account::connect(directory, contact, ca_root, store).await?;
        Ok(AcmeClient {
            account,
            orders_placed,
        })
    }

    /// The account's URL at the ACME server.
    pub(crate) fn account_id(&self) -> &str {
        self.account.id()
    }

    /// Places one order for `names` (or resumes the unfinished order at `resume`, placed by
    /// a lock holder that died), answers its challenges with `challenge`, and returns the
    /// chain and a fresh ECDSA P-256 key. Published challenge responses are always removed.
    pub(crate) async fn order(
        &self,
        names: &[String],
        challenge: ChallengeType,
        targets: &ChallengeTargets<'_>,
        timeout: Duration,
        replaces: Option<&str>,
        resume: Option<&str>,
    ) -> Result<IssuedPem, IssueError> {
        let mut published = Published::default();
        let result = tokio::time::timeout(
            timeout,
            self.order_inner(
                names,
                challenge.clone(),
                targets,
                &mut published,
                replaces,
                resume,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(IssueError::new(format!(
                "order for {names:?} ({challenge:?}) did not complete within {timeout:?}"
            )))
        });
        published.clear(targets).await;
        result
    }

    async fn order_inner(
        &self,
        names: &[String],
        challenge: ChallengeType,
        targets: &ChallengeTargets<'_>,
        published: &mut Published,
        replaces: Option<&str>,
        resume: Option<&str>,
    ) -> Result<IssuedPem, IssueError> {
        let what = format!("{challenge:?} order for {}", names.join(", "));
        let mut order = match resume {
            Some(url) => self.resumable(url, &what).await,
            None => None,
        };
        if order.is_none() {
            let placed = self.place(names, replaces, &what).await?;
            if let Err(e) = targets.guard.record_order(placed.url()).await {
                // The order goes on; only a successor could not resume it.
                tracing::warn!(url = placed.url(), "{what}: recording the order: {e}");
            }
            order = Some(placed);
        }
        let Some(mut order) = order else {
            unreachable!("placed above")
        };
        self.answer_and_finish(&mut order, names, challenge, targets, published, &what)
            .await
    }

    /// The order at `url` when it can still be completed (pending or ready).
    async fn resumable(&self, url: &str, what: &str) -> Option<instant_acme::Order> {
        match self.account.order(url.to_string()).await {
            Ok(mut order) => {
                let status = order.state().status;
                match status {
                    OrderStatus::Pending | OrderStatus::Ready => {
                        tracing::info!(url, ?status, "{what}: resuming an unfinished order");
                        Some(order)
                    }
                    other => {
                        tracing::info!(url, status = ?other, "{what}: previous order is not resumable; ordering afresh");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::info!(
                    url,
                    "{what}: previous order unreadable ({e}); ordering afresh"
                );
                None
            }
        }
    }

    /// Places a new order (naming the certificate it `replaces`, when the server allows).
    async fn place(
        &self,
        names: &[String],
        replaces: Option<&str>,
        what: &str,
    ) -> Result<instant_acme::Order, IssueError> {
        let identifiers: Vec<Identifier> =
            names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        // A renewal names the certificate it replaces (RFC 9773 §5); a server without ARI,
        // or one refusing it, gets a plain order.
        let replaced = replaces.and_then(certificate_identifier);
        let with_replaces = match replaced {
            Some(id) => {
                match self
                    .account
                    .new_order(&NewOrder::new(&identifiers).replaces(id.clone()))
                    .await
                {
                    Ok(order) => Some(order),
                    Err(instant_acme::Error::Unsupported(_)) => None,
                    Err(e) => {
                        tracing::info!(
                            "{what}: order replacing {id} refused ({e}); ordering afresh"
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let order = match with_replaces {
            Some(order) => order,
            None => self
                .account
                .new_order(&NewOrder::new(&identifiers))
                .await
                .map_err(|e| IssueError::acme(format!("{what}: new order"), &e))?,
        };
        self.orders_placed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(url = order.url(), "placed {what}");
        Ok(order)
    }

    /// Publishes and readies the challenges still pending, waits for the order to be ready,
    /// finalizes it with a fresh key and downloads the chain.
    async fn answer_and_finish(
        &self,
        order: &mut instant_acme::Order,
        names: &[String],
        challenge: ChallengeType,
        targets: &ChallengeTargets<'_>,
        published: &mut Published,
        what: &str,
    ) -> Result<IssuedPem, IssueError> {
        let what = what.to_string();

        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz =
                authz.map_err(|e| IssueError::acme(format!("{what}: authorization"), &e))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(IssueError::new(format!(
                        "{what}: authorization for {} is {other:?}",
                        authz.identifier()
                    )));
                }
            }
            let ident = authz.identifier().to_string();
            let bare = ident.trim_start_matches("*.").to_string();
            let mut ch = authz.challenge(challenge.clone()).ok_or_else(|| {
                IssueError::new(format!(
                    "{what}: the server offers no {challenge:?} challenge for {ident}"
                ))
            })?;
            let key_auth = ch.key_authorization();
            let published_challenge = match challenge {
                ChallengeType::Http01 => Challenge::Http01 {
                    token: ch.token.clone(),
                    key_authorization: key_auth.as_str().to_string(),
                },
                ChallengeType::TlsAlpn01 => Challenge::TlsAlpn01 {
                    name: bare,
                    digest: key_auth.digest().as_ref().to_vec(),
                },
                ChallengeType::Dns01 => Challenge::Dns01 {
                    value: key_auth.dns_value(),
                },
                _ => return Err(IssueError::new(format!("{what}: unsupported challenge"))),
            };
            // Recorded first: a half-published challenge is withdrawn too.
            published.challenges.push(published_challenge.clone());
            targets.publish(&published_challenge, &what).await?;
            // Every gateway must answer before the server asks any of them.
            let settle = targets.guard.settle();
            if !settle.is_zero() {
                tokio::time::sleep(settle).await;
            }
            // A resumed order's challenge may already be under validation.
            if ch.status == instant_acme::ChallengeStatus::Pending {
                ch.set_ready()
                    .await
                    .map_err(|e| IssueError::acme(format!("{what}: challenge for {ident}"), &e))?;
            }
        }

        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .backoff(1.5)
            .timeout(Duration::from_secs(60));
        let status = match order.poll_ready(&retry).await {
            Ok(s) => s,
            Err(instant_acme::Error::Api(p)) => {
                return Err(self
                    .challenge_error(order, &what)
                    .await
                    .unwrap_or_else(|| IssueError::problem(format!("{what}: order failed"), &p)));
            }
            Err(e) => {
                return Err(IssueError::acme(
                    format!("{what}: waiting for validation"),
                    &e,
                ));
            }
        };
        if status != OrderStatus::Ready {
            return Err(self
                .challenge_error(order, &what)
                .await
                .unwrap_or_else(|| IssueError::new(format!("{what}: order is {status:?}"))));
        }

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IssueError::new(format!("{what}: key generation: {e}")))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| IssueError::new(format!("{what}: CSR: {e}")))?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| IssueError::new(format!("{what}: CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| IssueError::acme(format!("{what}: finalize"), &e))?;
        let chain_pem = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| IssueError::acme(format!("{what}: certificate download"), &e))?;
        tracing::info!("issued {what}");
        Ok(IssuedPem {
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// The problem detail of the first failed challenge of an invalid order.
    async fn challenge_error(
        &self,
        order: &mut instant_acme::Order,
        what: &str,
    ) -> Option<IssueError> {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let Ok(mut authz) = authz else { continue };
            let Ok(state) = authz.refresh().await else {
                continue;
            };
            let ident = state.identifier().to_string();
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    return Some(IssueError::problem(
                        format!("{what}: {:?} challenge for {ident} failed", c.r#type),
                        p,
                    ));
                }
            }
        }
        None
    }

    /// The ACME Renewal Information window for a certificate and when to ask again, when the
    /// server supports ARI.
    pub(crate) async fn renewal_window(&self, chain_pem: &str) -> AriLookup {
        // An unidentifiable certificate will not become identifiable: the 2/3 rule stands.
        let Some(id) = certificate_identifier(chain_pem) else {
            return AriLookup::Unsupported;
        };
        match self.account.renewal_info(&id).await {
            Ok((info, retry_after)) => AriLookup::Window {
                start: SystemTime::from(info.suggested_window.start),
                end: SystemTime::from(info.suggested_window.end),
                retry_after,
            },
            Err(instant_acme::Error::Unsupported(_)) => AriLookup::Unsupported,
            Err(e) => AriLookup::Failed(e.to_string()),
        }
    }
}

/// The outcome of one ARI lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AriLookup {
    /// The server's suggested renewal window and when to ask again.
    Window {
        start: SystemTime,
        end: SystemTime,
        retry_after: Duration,
    },
    /// The server has no ARI (or the certificate cannot be identified): stop asking.
    Unsupported,
    /// A transient failure (network, server error): ask again later.
    Failed(String),
}

/// The ARI identifier of the leaf of `chain_pem`, if it has one.
fn certificate_identifier(chain_pem: &str) -> Option<CertificateIdentifier<'static>> {
    let chain = crate::pem::parse_chain(chain_pem).ok()?;
    let leaf = chain.first()?;
    CertificateIdentifier::try_from(leaf)
        .ok()
        .map(CertificateIdentifier::into_owned)
}

/// Challenge responses published by one order, removed when it ends.
#[derive(Default)]
struct Published {
    challenges: Vec<Challenge>,
}

impl Published {
    async fn clear(&mut self, targets: &ChallengeTargets<'_>) {
        for c in self.challenges.drain(..) {
            let _ = apply_challenge(targets.responder, targets.dns, &c, false).await;
            if let Err(e) = targets.guard.withdraw(&c).await {
                tracing::warn!("withdrawing a published challenge: {e}");
            }
        }
    }
}
