//! Watching a key prefix without missing a change: the first event is either the full state
//! (a list at one revision) or, when resuming, the changes after a known revision; a broken
//! stream is re-created on the next member from the last revision seen; a resume point that
//! etcd has compacted away is replaced by a fresh list.

use super::Etcd;
use crate::error::FleetError;
use etcd_client::{EventType, KeyValue, WatchOptions};
use std::time::Duration;
use tokio::sync::mpsc;

/// Batches queued between the watch task and its consumer; a slow consumer holds the watch
/// back (etcd keeps the events) rather than growing memory.
pub const WATCH_QUEUE: usize = 64;

/// One change under the watched prefix.
#[derive(Debug, Clone)]
pub enum Change {
    /// Created or changed (the key-value carries key, value, mod revision and lease).
    Put(KeyValue),
    /// Deleted (or its lease expired).
    Delete { key: Vec<u8>, mod_revision: i64 },
}

impl Change {
    pub fn key(&self) -> &[u8] {
        match self {
            Change::Put(kv) => kv.key(),
            Change::Delete { key, .. } => key,
        }
    }
}

/// What a prefix watch delivers, in order.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// Everything under the prefix at `revision`: replace what you hold. Sent first (unless
    /// resuming) and again whenever the resume point was compacted away.
    Snapshot { revision: i64, kvs: Vec<KeyValue> },
    /// Changes after the previous event, up to `revision`, in commit order.
    Changes { revision: i64, changes: Vec<Change> },
}

impl WatchEvent {
    /// The store revision this event brings its consumer to.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Snapshot { revision, .. } | WatchEvent::Changes { revision, .. } => {
                *revision
            }
        }
    }
}

/// A running prefix watch. Dropping it stops the watch.
#[derive(Debug)]
pub struct PrefixWatch {
    events: mpsc::Receiver<WatchEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl PrefixWatch {
    /// The next event; `None` only after the watch task ended (it does not end on its own).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.events.recv().await
    }

    /// The next event if one is queued already (to apply a burst in one go).
    pub fn try_next(&mut self) -> Option<WatchEvent> {
        self.events.try_recv().ok()
    }
}

impl Drop for PrefixWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a watch stream ended.
enum Broken {
    /// The resume revision is gone: list again.
    Compacted,
    /// The stream failed or the member lost its leader: resume elsewhere.
    Stream(String),
    /// The consumer went away.
    Closed,
}

impl Etcd {
    /// Watches every key under `prefix`. With `after: Some(rev)` the watch resumes with the
    /// changes after `rev` (a consumer restarting from its persisted cache); with `None`, or
    /// when `rev` was compacted, it starts with a [`WatchEvent::Snapshot`].
    pub fn watch_prefix(&self, prefix: &str, after: Option<i64>) -> PrefixWatch {
        let (tx, events) = mpsc::channel(WATCH_QUEUE);
        let etcd = self.clone();
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move { etcd.run_watch(prefix, after, tx).await });
        PrefixWatch { events, task }
    }

    async fn run_watch(self, prefix: String, after: Option<i64>, tx: mpsc::Sender<WatchEvent>) {
        let mut applied = after;
        let mut pause = Duration::from_millis(50);
        loop {
            let rev = match applied {
                Some(rev) => rev,
                None => match self.list_prefix(&prefix).await {
                    Ok((kvs, revision)) => {
                        if tx
                            .send(WatchEvent::Snapshot { revision, kvs })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        applied = Some(revision);
                        revision
                    }
                    Err(e) => {
                        tracing::debug!(%prefix, error = %e, "etcd list for watch failed");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            match self.stream_changes(&prefix, rev, &mut applied, &tx).await {
                Broken::Closed => return,
                Broken::Compacted => {
                    tracing::info!(%prefix, after = rev, "etcd watch resume point compacted; re-listing");
                    applied = None;
                }
                Broken::Stream(cause) => {
                    tracing::debug!(%prefix, %cause, "etcd watch broken; resuming");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
            pause = Duration::from_millis(50);
        }
    }

    /// One watch stream from `rev + 1`, until it breaks. `applied` follows what was sent.
    async fn stream_changes(
        &self,
        prefix: &str,
        rev: i64,
        applied: &mut Option<i64>,
        tx: &mpsc::Sender<WatchEvent>,
    ) -> Broken {
        let key = prefix.to_string();
        let created = self
            .call("watch", |mut c| {
                let key = key.clone();
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1)
                    .with_progress_notify();
                async move { c.watch(key, Some(opts)).await }
            })
            .await;
        let mut stream = match created {
            Ok(s) => s,
            Err(FleetError::Compacted { .. }) => return Broken::Compacted,
            Err(e) => return Broken::Stream(e.to_string()),
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Broken::Stream("stream ended".into()),
                Err(e) => return Broken::Stream(e.to_string()),
            };
            if msg.compact_revision() > 0 {
                return Broken::Compacted;
            }
            if msg.canceled() {
                let reason = msg.cancel_reason();
                if reason.contains("compacted") {
                    return Broken::Compacted;
                }
                return Broken::Stream(format!("watch canceled: {reason}"));
            }
            let events = msg.events();
            if events.is_empty() {
                continue;
            }
            let mut last = applied.unwrap_or(rev);
            let changes: Vec<Change> = events
                .iter()
                .filter_map(|e| {
                    let kv = e.kv()?;
                    last = last.max(kv.mod_revision());
                    Some(match e.event_type() {
                        EventType::Put => Change::Put(kv.clone()),
                        EventType::Delete => Change::Delete {
                            key: kv.key().to_vec(),
                            mod_revision: kv.mod_revision(),
                        },
                    })
                })
                .collect();
            let event = WatchEvent::Changes {
                revision: last,
                changes,
            };
            if tx.send(event).await.is_err() {
                return Broken::Closed;
            }
            *applied = Some(last);
        }
    }
}
