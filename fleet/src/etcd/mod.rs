//! The etcd client layer: one [`Etcd`] handle over a list of member endpoints that retries a
//! call on the next member when one is dead, cut off or without a leader, and reports the
//! store's health; [`watch`] streams a prefix from a revision (resumed after a broken stream,
//! re-listed after a compaction) and [`lease`] keeps leases alive across broken streams.
//!
//! Why one client per endpoint instead of etcd-client's balanced channel: a call that lands
//! on a dead or leaderless member must go to the next member at once, and a watch must be
//! re-created on a member that still has a leader. With a client per endpoint the choice is
//! ours and visible in `/status`; every request carries `hasleader` so a member cut off from
//! the quorum refuses at once instead of hanging.

pub mod lease;
pub mod watch;

use crate::error::FleetError;
use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

pub use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, PutOptions, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};

/// Most keys one range request returns; larger prefixes are read in pages at one revision
/// (a response stays well under gRPC's 4 MiB message limit).
pub const PAGE_KEYS: i64 = 1000;

/// TLS towards etcd, as PEM bytes (read from the files `[fleet]` names).
#[derive(Clone)]
pub struct EtcdTls {
    /// CA certificate(s) that sign the etcd members' server certificates.
    pub ca_pem: Vec<u8>,
    /// This gateway's client certificate and key, when etcd asks for client certificates.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Member endpoints (`http://host:port` or `https://host:port`).
    pub endpoints: Vec<String>,
    /// etcd user name and password (etcd's own auth).
    pub user: Option<(String, String)>,
    pub tls: Option<EtcdTls>,
    /// Bound on connecting to one member.
    pub connect_timeout: Duration,
    /// Bound on one attempt of a call on one member.
    pub attempt_timeout: Duration,
    /// Bound on a call across attempts and members; past it the call fails `Unavailable`.
    pub call_budget: Duration,
    /// HTTP/2 ping interval on idle streams: a watch on a member that stopped answering is
    /// noticed within about twice this.
    pub keep_alive: Duration,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("call_budget", &self.call_budget)
            .finish()
    }
}

impl EtcdOptions {
    /// Defaults for `endpoints`: 1 s to connect, 1.5 s per attempt, 4 s per call, 1 s pings.
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            user: None,
            tls: None,
            connect_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_millis(1500),
            call_budget: Duration::from_secs(4),
            keep_alive: Duration::from_secs(1),
        }
    }
}

/// The store's health as this gateway last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    /// No call has completed yet.
    Connecting,
    /// The last call succeeded, on this member.
    Available { endpoint: String },
    /// The last call failed on every member.
    Unavailable { cause: String, since_unix_ms: u64 },
}

impl StoreHealth {
    pub fn is_available(&self) -> bool {
        matches!(self, StoreHealth::Available { .. })
    }
}

struct Member {
    url: String,
    client: Mutex<Option<Client>>,
}

struct Inner {
    options: EtcdOptions,
    members: Vec<Member>,
    /// The member the next call tries first: the last one that answered.
    preferred: AtomicUsize,
    health: tokio::sync::watch::Sender<StoreHealth>,
}

/// A handle on the etcd cluster, cheap to clone. Connects lazily: a gateway starts (and
/// serves from its cache) while etcd is down.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.inner.options.endpoints)
            .field("health", &*self.inner.health.borrow())
            .finish()
    }
}

/// What a failed attempt means for the call.
enum Verdict {
    /// Try the next member (dead, cut off, no leader, timed out).
    Retry(String),
    /// etcd answered: the call fails with this error.
    Fail(FleetError),
}

fn classify(what: &str, e: etcd_client::Error) -> Verdict {
    use etcd_client::Error as E;
    use tonic_code::Code;
    match e {
        E::TransportError(e) => Verdict::Retry(format!("transport: {e}")),
        E::IoError(e) => Verdict::Retry(format!("i/o: {e}")),
        E::WatchError(e) => Verdict::Retry(format!("watch stream: {e}")),
        E::LeaseKeepAliveError(e) if e.contains("not found") => {
            Verdict::Fail(FleetError::LeaseLost { id: 0 })
        }
        E::LeaseKeepAliveError(e) => Verdict::Retry(format!("keep-alive stream: {e}")),
        E::GRpcStatus(s) => match s.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted => Verdict::Retry(s.message().to_string()),
            Code::OutOfRange if s.message().contains("compacted") => {
                Verdict::Fail(FleetError::Compacted {
                    requested: 0,
                    compacted: 0,
                })
            }
            _ => Verdict::Fail(FleetError::Refused {
                what: what.to_string(),
                cause: s.message().to_string(),
            }),
        },
        other => Verdict::Fail(FleetError::Refused {
            what: what.to_string(),
            cause: other.to_string(),
        }),
    }
}

mod tonic_code {
    pub use tonic::Code;
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Etcd {
    /// A handle for `options.endpoints`; nothing is connected until the first call.
    pub fn new(options: EtcdOptions) -> Result<Etcd, FleetError> {
        if options.endpoints.is_empty() {
            return Err(FleetError::Setup("no etcd endpoint given".into()));
        }
        for url in &options.endpoints {
            let ok = url.starts_with("http://") || url.starts_with("https://");
            if !ok {
                return Err(FleetError::Setup(format!(
                    "etcd endpoint {url:?}: want http://host:port or https://host:port"
                )));
            }
            if url.starts_with("https://") && options.tls.is_none() {
                return Err(FleetError::Setup(format!(
                    "etcd endpoint {url}: https needs a CA (tls ca_file)"
                )));
            }
        }
        let members = options
            .endpoints
            .iter()
            .map(|url| Member {
                url: url.clone(),
                client: Mutex::new(None),
            })
            .collect();
        let (health, _) = tokio::sync::watch::channel(StoreHealth::Connecting);
        Ok(Etcd {
            inner: Arc::new(Inner {
                options,
                members,
                preferred: AtomicUsize::new(0),
                health,
            }),
        })
    }

    pub fn options(&self) -> &EtcdOptions {
        &self.inner.options
    }

    /// The endpoints, comma-separated (for messages).
    pub fn endpoints(&self) -> String {
        self.inner.options.endpoints.join(",")
    }

    /// The store's health, updated by every call.
    pub fn health(&self) -> tokio::sync::watch::Receiver<StoreHealth> {
        self.inner.health.subscribe()
    }

    fn connect_options(&self) -> ConnectOptions {
        let o = &self.inner.options;
        let mut c = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(o.connect_timeout)
            .with_keep_alive(o.keep_alive, o.keep_alive)
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &o.user {
            c = c.with_user(user, password).with_auto_token_refresh(true);
        }
        if let Some(tls) = &o.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            c = c.with_tls(t);
        }
        c
    }

    /// Member `i`'s client, connecting it if needed.
    async fn client(&self, i: usize) -> Result<Client, Verdict> {
        let member = &self.inner.members[i];
        let mut slot = member.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connect = Client::connect([member.url.as_str()], Some(self.connect_options()));
        let budget = self.inner.options.connect_timeout + self.inner.options.attempt_timeout;
        match tokio::time::timeout(budget, connect).await {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(classify("connect", e)),
            Err(_) => Err(Verdict::Retry("connect timed out".into())),
        }
    }

    async fn forget(&self, i: usize) {
        *self.inner.members[i].client.lock().await = None;
    }

    fn mark_available(&self, i: usize) {
        self.inner.preferred.store(i, Ordering::Relaxed);
        let url = &self.inner.members[i].url;
        self.inner.health.send_if_modified(|h| match h {
            StoreHealth::Available { endpoint } if endpoint == url => false,
            _ => {
                *h = StoreHealth::Available {
                    endpoint: url.clone(),
                };
                true
            }
        });
    }

    fn mark_unavailable(&self, cause: &str) {
        self.inner.health.send_if_modified(|h| match h {
            StoreHealth::Unavailable { cause: c, .. } if c == cause => false,
            StoreHealth::Unavailable { cause: c, .. } => {
                *c = cause.to_string();
                true
            }
            _ => {
                *h = StoreHealth::Unavailable {
                    cause: cause.to_string(),
                    since_unix_ms: now_unix_ms(),
                };
                true
            }
        });
    }

    /// Runs `f` against one member after another until one answers or the call budget is
    /// spent. `f` must be safe to repeat: an attempt that timed out may have been applied
    /// (guard writes with a `Txn` compare).
    pub async fn call<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, FleetError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let o = &self.inner.options;
        let deadline = tokio::time::Instant::now() + o.call_budget;
        let n = self.inner.members.len();
        let mut i = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut backoff = Duration::from_millis(20);
        let mut tried_in_round = 0;
        loop {
            let attempt = async {
                let client = self.client(i).await?;
                match tokio::time::timeout(o.attempt_timeout, f(client)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(classify(what, e)),
                    Err(_) => Err(Verdict::Retry(format!(
                        "no answer within {:?}",
                        o.attempt_timeout
                    ))),
                }
            };
            let cause = match attempt.await {
                Ok(v) => {
                    self.mark_available(i);
                    return Ok(v);
                }
                Err(Verdict::Fail(e)) => {
                    // etcd answered, so it is reachable.
                    self.mark_available(i);
                    return Err(e);
                }
                Err(Verdict::Retry(cause)) => cause,
            };
            let url = &self.inner.members[i].url;
            tracing::debug!(member = %url, %cause, what, "etcd call failed on member");
            if cause.starts_with("transport") || cause.starts_with("i/o") {
                self.forget(i).await;
            }
            i = (i + 1) % n;
            tried_in_round += 1;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let cause = format!("{what}: last error from {url}: {cause}");
                self.mark_unavailable(&cause);
                return Err(FleetError::Unavailable {
                    endpoints: self.endpoints(),
                    cause,
                });
            }
            if tried_in_round >= n {
                // Every member failed once: wait a little before the next round.
                tried_in_round = 0;
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }

    /// One key (linearizable read).
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, FleetError> {
        let key = key.to_string();
        let mut r = self
            .call("get", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(r.take_kvs().into_iter().next())
    }

    /// Every key under `prefix` at one revision (read in pages of [`PAGE_KEYS`]), and that
    /// revision.
    pub async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), FleetError> {
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0i64;
        loop {
            let (start, end2) = (from.clone(), end.clone());
            let mut r = self
                .call("list", |mut c| {
                    let mut opts = GetOptions::new()
                        .with_range(end2.clone())
                        .with_limit(PAGE_KEYS);
                    if revision > 0 {
                        opts = opts.with_revision(revision);
                    }
                    let start = start.clone();
                    async move { c.get(start, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = r.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = r.more();
            let kvs = r.take_kvs();
            if let Some(last) = kvs.last() {
                let mut next = last.key().to_vec();
                next.push(0);
                from = next;
            }
            out.extend(kvs);
            if !more {
                return Ok((out, revision));
            }
        }
    }

    /// Writes `key`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, FleetError> {
        self.put_with(key, value, None).await
    }

    /// Writes `key`, attached to `lease` when given.
    pub async fn put_with(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<i64, FleetError> {
        let key = key.to_string();
        let r = self
            .call("put", |mut c| {
                let (key, value) = (key.clone(), value.clone());
                let opts = lease.map(|l| PutOptions::new().with_lease(l));
                async move { c.put(key, value, opts).await }
            })
            .await?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Deletes `key`; true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, FleetError> {
        let key = key.to_string();
        let r = self
            .call("delete", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(r.deleted() > 0)
    }

    /// A transaction (compare, then one of two op lists). Repeat-safe only when its compares
    /// make it so.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, FleetError> {
        self.call("txn", |mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    /// The cluster's current revision (a linearizable read: fails without a quorum).
    /// `key` is any key the caller may read (etcd's auth checks the range even for a count):
    /// the fleet's root.
    pub async fn revision(&self, key: &str) -> Result<i64, FleetError> {
        let key = key.to_string();
        let r = self
            .call("revision", move |mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Compacts history up to `revision` (tests and operators).
    pub async fn compact(&self, revision: i64) -> Result<(), FleetError> {
        self.call(
            "compact",
            |mut c| async move { c.compact(revision, None).await },
        )
        .await
        .map(|_| ())
    }

    /// Checks the store every `interval` so [`Etcd::health`] stays current when nothing else
    /// calls it (a quorum lost while the gateway only reads its cache). Runs until the
    /// returned task is aborted.
    /// `key` is one the gateway may read (its fleet's root).
    pub fn spawn_health_probe(&self, key: &str, interval: Duration) -> tokio::task::JoinHandle<()> {
        let etcd = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            loop {
                let _ = etcd.revision(&key).await;
                tokio::time::sleep(interval).await;
            }
        })
    }
}

/// The key just past every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn endpoints_must_be_urls() {
        let e = Etcd::new(EtcdOptions::new(vec!["127.0.0.1:2379".into()])).unwrap_err();
        assert!(e.to_string().contains("want http://"), "{e}");
        let e = Etcd::new(EtcdOptions::new(vec!["https://127.0.0.1:2379".into()])).unwrap_err();
        assert!(e.to_string().contains("needs a CA"), "{e}");
        assert!(Etcd::new(EtcdOptions::new(vec![])).is_err());
    }
}
