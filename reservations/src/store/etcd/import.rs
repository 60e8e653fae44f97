//! `meshgate fleet import`, the reservations half: a standalone gateway's reservations,
//! deployer tokens and challenge key copied into the fleet's etcd. Every record is written
//! only where etcd has none (a transaction on the key's absence), so running it twice, or
//! after gateways have started changing records, changes nothing that is there.

use super::{ChallengeKey, decode, encode};
use crate::store::ReservationStore;
use crate::store::rules::record_key;
use meshgate_fleet::etcd::{Compare, CompareOp, Txn, TxnOp};
use meshgate_fleet::{Etcd, FleetError, FleetKey, FleetKeys};
use std::path::Path;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub reservations_copied: usize,
    /// Already in etcd (left as they are).
    pub reservations_kept: usize,
    pub tokens_copied: usize,
    pub tokens_kept: usize,
    /// The standalone challenge key was copied (sealed); false when etcd had one already
    /// (custom domains proven with the standalone's TXT value must then be proven again).
    pub challenge_key_copied: bool,
    /// Whether etcd's challenge key is the standalone's (so existing TXT proofs still hold).
    pub challenge_key_same: bool,
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Etcd(#[from] FleetError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Seal(#[from] meshgate_fleet::SealError),
}

async fn put_if_absent(etcd: &Etcd, key: &str, value: Vec<u8>) -> Result<bool, FleetError> {
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    Ok(etcd.txn(txn).await?.succeeded())
}

/// Copies `source`'s records and the challenge key file `challenge_key_file` (when it
/// exists) into the fleet.
pub async fn import_standalone(
    source: &dyn ReservationStore,
    challenge_key_file: &Path,
    etcd: &Etcd,
    keys: &FleetKeys,
    fleet_key: &FleetKey,
) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    for r in source.list(None, None)? {
        let key = format!("{}{}", keys.reservations(), record_key(&r.key()));
        if put_if_absent(etcd, &key, encode(&r)?).await? {
            report.reservations_copied += 1;
        } else {
            report.reservations_kept += 1;
        }
    }
    for t in source.tokens()? {
        let key = format!("{}{}", keys.tokens(), t.id);
        if put_if_absent(etcd, &key, encode(&t)?).await? {
            report.tokens_copied += 1;
        } else {
            report.tokens_kept += 1;
        }
    }
    if challenge_key_file.exists() {
        let ours = ChallengeKey::load_or_create(challenge_key_file)
            .map_err(crate::store::StoreError::from)?;
        let at = keys.challenge_key();
        report.challenge_key_copied =
            put_if_absent(etcd, &at, fleet_key.seal(&at, ours.secret())).await?;
        if let Some(kv) = etcd.get(&at).await? {
            let theirs = fleet_key.open(&at, kv.value())?;
            report.challenge_key_same = theirs.as_slice() == ours.secret();
        }
    }
    Ok(report)
}

/// Every record under the fleet's state prefix decodes (a check after an import).
pub async fn verify_state(etcd: &Etcd, keys: &FleetKeys) -> Result<usize, ImportError> {
    let (kvs, _) = etcd.list_prefix(&keys.reservations()).await?;
    for kv in &kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        decode::<crate::reservation::Reservation>(&key, kv.value())?;
    }
    Ok(kvs.len())
}
