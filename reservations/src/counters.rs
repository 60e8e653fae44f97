//! What reservations count for the operator: refusals at the limits, expired and dropped
//! domain claims, consent queries and withdrawn backends. Plain atomics shared by the API,
//! the verifier and the consent checker; the admin listener reads them at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Reservation counters (all monotonic).
#[derive(Debug, Default)]
pub struct Counters {
    /// Creations refused because the deployer holds `reservations.max_per_owner`.
    pub refused_quota: AtomicU64,
    /// Names refused because the label is reserved for the farmer.
    pub refused_reserved: AtomicU64,
    /// Names and domains refused for a punycode label that mixes scripts.
    pub refused_mixed_script: AtomicU64,
    /// Creations and updates refused because an overlay backend's node does not consent.
    pub refused_consent: AtomicU64,
    /// Domain claims deleted unproven after `reservations.pending_expiry_secs`.
    pub pending_expired: AtomicU64,
    /// Domain claims dropped because another deployer proved the domain first.
    pub claims_dropped: AtomicU64,
    /// Consent queries answered by a node.
    pub consent_queries: AtomicU64,
    /// Consent queries that got no usable answer.
    pub consent_queries_failed: AtomicU64,
    /// Overlay backends taken out of service because their node's consent is gone.
    pub consent_withdrawn: AtomicU64,
}

impl Counters {
    pub fn add(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, help, value)` of every counter, for a metrics exporter.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "refused_quota",
                "Reservations refused: the deployer is at reservations.max_per_owner",
                v(&self.refused_quota),
            ),
            (
                "refused_reserved_label",
                "Names refused: the label is reserved for the farmer",
                v(&self.refused_reserved),
            ),
            (
                "refused_mixed_script",
                "Names and domains refused: a punycode label mixes scripts",
                v(&self.refused_mixed_script),
            ),
            (
                "refused_consent",
                "Reservations refused: an overlay backend's node does not consent",
                v(&self.refused_consent),
            ),
            (
                "pending_expired",
                "Domain claims deleted unproven after reservations.pending_expiry_secs",
                v(&self.pending_expired),
            ),
            (
                "claims_dropped",
                "Domain claims dropped: another deployer proved the domain first",
                v(&self.claims_dropped),
            ),
            (
                "consent_queries",
                "Consent queries answered by overlay nodes",
                v(&self.consent_queries),
            ),
            (
                "consent_queries_failed",
                "Consent queries without a usable answer",
                v(&self.consent_queries_failed),
            ),
            (
                "consent_withdrawn",
                "Overlay backends withdrawn: their node's consent is gone",
                v(&self.consent_withdrawn),
            ),
        ]
    }
}
