//! The fleet's errors: what failed, against which etcd endpoints, and whether waiting helps.

/// A failure of the fleet's etcd layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    /// No etcd member answered within the retry budget (members down, quorum lost, network
    /// cut). Waiting may help; serving from the local cache does.
    #[error("etcd unavailable ({endpoints}): {cause}")]
    Unavailable { endpoints: String, cause: String },
    /// etcd answered and refused (bad request, permission denied, authentication failed).
    /// Retrying the same call does not help.
    #[error("etcd refused {what}: {cause}")]
    Refused { what: String, cause: String },
    /// A revision asked for is no longer in etcd's history: re-list.
    #[error("etcd revision {requested} is compacted (oldest kept: {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    /// The client could not be set up (endpoint URL, TLS files, credentials).
    #[error("etcd client setup: {0}")]
    Setup(String),
    /// A lease this operation depended on has expired or was revoked.
    #[error("etcd lease {id:x} is gone")]
    LeaseLost { id: i64 },
}

impl FleetError {
    /// True when etcd could not be reached (the admin API answers 503 for these).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, FleetError::Unavailable { .. })
    }
}
