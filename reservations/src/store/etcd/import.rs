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

/// Keys per transaction of a bulk import: under etcd's default `--max-txn-ops` (128), which
/// counts compares and puts alike.
const BATCH: usize = 60;

/// Writes every `(key, value)` whose key etcd does not hold: (copied, kept). A batch is one
/// transaction "all absent → put all"; a batch where some key exists is done key by key.
/// (10,000 records take ~170 transactions instead of 10,000.)
async fn put_all_if_absent(
    etcd: &Etcd,
    records: Vec<(String, Vec<u8>)>,
) -> Result<(usize, usize), FleetError> {
    let (mut copied, mut kept) = (0, 0);
    for batch in records.chunks(BATCH) {
        let txn = Txn::new()
            .when(
                batch
                    .iter()
                    .map(|(k, _)| Compare::version(k.as_str(), CompareOp::Equal, 0))
                    .collect::<Vec<_>>(),
            )
            .and_then(
                batch
                    .iter()
                    .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None))
                    .collect::<Vec<_>>(),
            );
        if etcd.txn(txn).await?.succeeded() {
            copied += batch.len();
            continue;
        }
        for (k, v) in batch {
            if put_if_absent(etcd, k, v.clone()).await? {
                copied += 1;
            } else {
                kept += 1;
            }
        }
    }
    Ok((copied, kept))
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
    let mut records = Vec::new();
    for r in source.list(None, None)? {
        let key = format!("{}{}", keys.reservations(), record_key(&r.key()));
        records.push((key, encode(&r)?));
    }
    let copied = put_all_if_absent(etcd, records).await?;
    report.reservations_copied = copied.0;
    report.reservations_kept = copied.1;
    let mut tokens = Vec::new();
    for t in source.tokens()? {
        tokens.push((format!("{}{}", keys.tokens(), t.id), encode(&t)?));
    }
    let copied = put_all_if_absent(etcd, tokens).await?;
    report.tokens_copied = copied.0;
    report.tokens_kept = copied.1;
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
