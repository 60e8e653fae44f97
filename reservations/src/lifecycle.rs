//! The custom-domain lifecycle as a sans-IO state machine: what a DNS check's result, or a
//! certificate arriving, does to a domain reservation at a given time. The verifier feeds it
//! DNS results; the store feeds it certificate news. It does no I/O and reads no clock.
//!
//! States: `pending` → (proof holds) → `verified` → (certificate ready, or passthrough, or
//! certificates not required) → `active`. A verified or active domain whose proof fails keeps
//! serving for the grace period, then becomes `deactivated` with the reason; when the proof
//! holds again it is verified (and activated) again.
//!
//! Several deployers may claim one domain while nobody holds it (pending or deactivated
//! claims). [`settle`] runs after each verification round: the first claim to be verified
//! holds the domain and the others are `dropped`, with the reason kept for their owners;
//! claims still unproven after the pending expiry, and dropped claims as old, are deleted.

use crate::reservation::{Kind, Reservation, Status};
use meshgate_config::route::Mode;

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

/// Applies one input at time `now_ms` (unix ms) to a domain reservation. Returns true when
/// its status changed. Names are left untouched.
pub fn step(r: &mut Reservation, input: Input, now_ms: u64, rules: &Rules) -> bool {
    if r.kind != Kind::Domain {
        return false;
    }
    if matches!(r.status, Status::Dropped { .. }) {
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

/// What [`settle`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Claims deleted: unproven past the expiry, or dropped as long ago.
    pub expired: usize,
    /// Claims dropped because another claim holds the domain.
    pub dropped: usize,
}

/// Settles competing domain claims in `records` (a verification round's batch) at `now_ms`:
/// per domain, the verified (or active) claim holds it; if a round verified several, the
/// oldest claim wins. Every other pending or deactivated claim on that domain is dropped.
/// Pending claims older than `expiry_ms`, and dropped ones dropped that long ago, are removed
/// from `records`. Names are left alone.
pub fn settle(records: &mut Vec<Reservation>, now_ms: u64, expiry_ms: u64) -> Settled {
    let mut done = Settled::default();
    let age = |since_s: u64| now_ms.saturating_sub(since_s.saturating_mul(1000));
    let before = records.len();
    records.retain(|r| {
        r.kind != Kind::Domain
            || match r.status {
                Status::Pending => age(r.created_at) < expiry_ms,
                Status::Dropped { .. } => age(r.updated_at) < expiry_ms,
                _ => true,
            }
    });
    done.expired = before - records.len();
    let mut holders: std::collections::HashMap<String, (u64, String)> =
        std::collections::HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.kind == Kind::Domain && r.status.is_verified())
    {
        let candidate = (r.created_at, r.owner.clone());
        holders
            .entry(r.name.clone())
            .and_modify(|h| *h = std::cmp::min(h.clone(), candidate.clone()))
            .or_insert(candidate);
    }
    for r in records.iter_mut().filter(|r| r.kind == Kind::Domain) {
        let Some((_, holder)) = holders.get(&r.name) else {
            continue;
        };
        let loses = *holder != r.owner
            && matches!(
                r.status,
                Status::Pending | Status::Deactivated { .. } | Status::Verified | Status::Active
            );
        if loses {
            r.status = Status::Dropped {
                reason: format!(
                    "another deployer proved ownership of {} first; this claim was dropped. \
                     Whoever controls the domain's DNS decides who holds it: publish your TXT \
                     token and claim it again once the holder's proof stops holding",
                    r.name
                ),
            };
            r.updated_at = now_ms / 1000;
            done.dropped += 1;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::{Options, Verification};
    use meshgate_config::route::Mode;

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
            consent: Vec::new(),
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

    fn claim(owner: &str, created_at: u64) -> Reservation {
        let mut r = domain(Mode::Passthrough);
        r.owner = owner.into();
        r.created_at = created_at;
        r.updated_at = created_at;
        r
    }

    #[test]
    fn first_claim_to_prove_holds_the_others_are_dropped_with_a_reason() {
        let rules = Rules {
            grace_ms: 0,
            require_certificate: false,
        };
        let mut batch = vec![
            claim("squatter", 10),
            claim("owner", 20),
            claim("third", 30),
        ];
        step(&mut batch[1], Input::Checked(Ok(())), 40_000, &rules);
        assert_eq!(
            settle(&mut batch, 40_000, 3_600_000),
            Settled {
                expired: 0,
                dropped: 2
            }
        );
        assert_eq!(batch[1].status, Status::Active);
        for loser in [&batch[0], &batch[2]] {
            assert!(
                matches!(&loser.status, Status::Dropped { reason } if reason.contains("proved ownership")),
                "{:?}",
                loser.status
            );
        }
        // A dropped claim is not verified later, even if its TXT appears.
        let dropped = batch[0].status.clone();
        step(&mut batch[0], Input::Checked(Ok(())), 41_000, &rules);
        assert_eq!(batch[0].status, dropped);
        // Two proofs in one round: the older claim wins.
        let mut both = vec![claim("late", 20), claim("early", 10)];
        for r in &mut both {
            step(r, Input::Checked(Ok(())), 50_000, &rules);
        }
        settle(&mut both, 50_000, 3_600_000);
        assert_eq!(both[1].status, Status::Active);
        assert!(matches!(both[0].status, Status::Dropped { .. }));
    }

    #[test]
    fn unproven_claims_expire_dropped_ones_later() {
        let mut batch = vec![claim("a", 0), claim("b", 100)];
        batch[1].status = Status::Dropped { reason: "x".into() };
        assert_eq!(settle(&mut batch, 99_999, 100_000).expired, 0);
        assert_eq!(settle(&mut batch, 100_000, 100_000).expired, 1);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].owner, "b");
        assert_eq!(settle(&mut batch, 200_000, 100_000).expired, 1);
        assert!(batch.is_empty());
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
