//! What the manager reports per certificate: [`CertStatus`] for the admin API and `/status`,
//! and the [`CertState`] derived from the scheduler's view of it.

use crate::schedule::EntryView;
use serde::Serialize;
use std::time::SystemTime;

/// Where one certificate stands. Serialized in kebab-case (`"renewal-failing"`), the strings
/// the admin API and `/status` have always shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertState {
    /// No certificate yet, no order placed.
    Pending,
    /// No current certificate; an order is in flight.
    Ordering,
    /// A current certificate, not being renewed.
    Valid,
    /// A current certificate; its renewal order is in flight.
    Renewing,
    /// No certificate; the last order failed and is retried.
    Failed,
    /// The certificate is still current; its renewal failed and is retried.
    RenewalFailing,
    /// The certificate's `not_after` has passed and no order is in flight.
    Expired,
}

impl CertState {
    /// The state of a certificate with schedule `view` (none: nothing known yet) as of `now`.
    pub(crate) fn of(view: Option<&EntryView>, now: SystemTime) -> CertState {
        let Some(v) = view else {
            return CertState::Pending;
        };
        // An expired certificate counts as none: it is served but no client accepts it.
        let current = v.validity.is_some_and(|c| c.not_after > now);
        let expired = v.validity.is_some() && !current;
        match (current, v.in_flight, v.failures > 0) {
            (false, false, _) if expired => CertState::Expired,
            (false, true, _) => CertState::Ordering,
            (true, true, _) => CertState::Renewing,
            (false, false, true) => CertState::Failed,
            (true, false, true) => CertState::RenewalFailing,
            (false, false, false) => CertState::Pending,
            (true, false, false) => CertState::Valid,
        }
    }

    /// True when clients are served a current certificate for the name.
    pub fn serves(self) -> bool {
        matches!(
            self,
            CertState::Valid | CertState::Renewing | CertState::RenewalFailing
        )
    }
}

/// One certificate's state, for the admin status endpoint (serialize to JSON).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertStatus {
    /// The certificate's key: its primary name (`*.<domain>` for the farmer wildcard).
    pub name: String,
    /// Names the certificate covers.
    pub names: Vec<String>,
    pub state: CertState,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub renew_at: Option<String>,
    /// Consecutive failed orders.
    pub failures: u32,
    pub next_retry: Option<String>,
    /// The last failure, with the ACME problem detail and type when the server sent one.
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Validity;
    use std::time::Duration;

    fn view(validity: Option<Validity>, in_flight: bool, failures: u32) -> EntryView {
        EntryView {
            validity,
            due: None,
            in_flight,
            failures,
            retry_at: None,
            last_error: None,
        }
    }

    #[test]
    fn each_state_from_the_schedule_and_its_json_name() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let day = Duration::from_secs(86400);
        let current = Some(Validity {
            not_before: now - day,
            not_after: now + day,
        });
        let past = Some(Validity {
            not_before: now - 2 * day,
            not_after: now - day,
        });
        let cases = [
            (None, CertState::Pending, "pending", false),
            (
                Some(view(None, false, 0)),
                CertState::Pending,
                "pending",
                false,
            ),
            (
                Some(view(None, true, 0)),
                CertState::Ordering,
                "ordering",
                false,
            ),
            (
                Some(view(past, true, 1)),
                CertState::Ordering,
                "ordering",
                false,
            ),
            (
                Some(view(current, false, 0)),
                CertState::Valid,
                "valid",
                true,
            ),
            (
                Some(view(current, true, 0)),
                CertState::Renewing,
                "renewing",
                true,
            ),
            (
                Some(view(None, false, 2)),
                CertState::Failed,
                "failed",
                false,
            ),
            (
                Some(view(current, false, 1)),
                CertState::RenewalFailing,
                "renewal-failing",
                true,
            ),
            (
                Some(view(past, false, 3)),
                CertState::Expired,
                "expired",
                false,
            ),
        ];
        for (v, state, json, serves) in cases {
            assert_eq!(CertState::of(v.as_ref(), now), state, "{v:?}");
            assert_eq!(serde_json::to_value(state).unwrap(), json);
            assert_eq!(state.serves(), serves, "{state:?}");
        }
    }
}
