//! The fleet's order lock, as etcd transactions built and read here without I/O.
//!
//! - Taking the lock: `create_revision(lock) == 0` → put the holder's id under the lock's
//!   lease and read the order state; else read the lock (who holds it). The put's revision
//!   is the lock's create revision: the fencing token.
//! - Every write made under the lock (order state, the certificate) is a transaction
//!   comparing `create_revision(lock)` with that token: a holder whose lease lapsed (paused,
//!   partitioned) finds the key gone or re-created by the next holder, and writes nothing.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};

/// The transaction that takes the lock at `lock_key` for `holder` under `lease`, reading
/// `order_key` (a previous holder's unfinished order) when it succeeds.
pub fn acquire(lock_key: &str, holder: &str, lease: i64, order_key: &str) -> Txn {
    Txn::new()
        .when([Compare::create_revision(lock_key, CompareOp::Equal, 0)])
        .and_then([
            TxnOp::put(
                lock_key,
                holder.as_bytes().to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::get(order_key, None),
        ])
        .or_else([TxnOp::get(lock_key, None)])
}

/// What taking the lock found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Held now; `token` fences later writes, `order` is the stored order state, if any.
    Held { token: i64, order: Option<Vec<u8>> },
    /// Held by `holder` (empty when the lock vanished between compare and read).
    Busy { holder: String },
}

/// Reads the response of [`acquire`].
pub fn acquired(resp: &TxnResponse) -> Acquired {
    let ops = resp.op_responses();
    if resp.succeeded() {
        let token = resp.header().map(|h| h.revision()).unwrap_or(0);
        let order = ops.iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        Acquired::Held { token, order }
    } else {
        let holder = ops
            .iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        Acquired::Busy { holder }
    }
}

/// `ops`, applied only while the lock at `lock_key` is the one created at `token`.
pub fn fenced(lock_key: &str, token: i64, ops: Vec<TxnOp>) -> Txn {
    Txn::new()
        .when([Compare::create_revision(lock_key, CompareOp::Equal, token)])
        .and_then(ops)
}
