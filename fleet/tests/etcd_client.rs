//! The etcd client layer against a real 3-member etcd: calls fail over to live members, a
//! watch survives its member's death and resumes without a gap, a compacted resume point is
//! re-listed, leases outlive the member that renewed them and report their loss.

use meshgate_fleet::{Etcd, EtcdOptions, StoreHealth, WatchEvent};
use meshgate_testkit::etcd::{EtcdCluster, EtcdRelay};
use std::collections::BTreeMap;
use std::time::Duration;

fn client(endpoints: Vec<String>) -> Etcd {
    Etcd::new(EtcdOptions::new(endpoints)).expect("etcd client")
}

/// Applies watch events to a map, as a cache would.
fn apply(map: &mut BTreeMap<String, String>, ev: WatchEvent) -> i64 {
    let rev = ev.revision();
    match ev {
        WatchEvent::Snapshot { kvs, .. } => {
            map.clear();
            for kv in kvs {
                map.insert(kv.key_str().unwrap().into(), kv.value_str().unwrap().into());
            }
        }
        WatchEvent::Changes { changes, .. } => {
            for c in changes {
                match c {
                    meshgate_fleet::Change::Put(kv) => {
                        map.insert(kv.key_str().unwrap().into(), kv.value_str().unwrap().into());
                    }
                    meshgate_fleet::Change::Delete { key, .. } => {
                        map.remove(std::str::from_utf8(&key).unwrap());
                    }
                }
            }
        }
    }
    rev
}

async fn next(w: &mut meshgate_fleet::PrefixWatch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("a watch event within 20 s")
        .expect("watch running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_watch_carry_on_across_a_killed_leader_and_follower() {
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = client(cluster.endpoints());
    etcd.put("/w/a", b"1".to_vec()).await.unwrap();
    let mut watch = etcd.watch_prefix("/w/", None);
    let mut seen = BTreeMap::new();
    apply(&mut seen, next(&mut watch).await);
    assert_eq!(seen.get("/w/a").map(String::as_str), Some("1"));
    assert!(etcd.health().borrow().is_available());

    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.kill(leader);
    let follower = (0..3).find(|&i| i != leader).unwrap();
    // Writes keep succeeding through the election (retried on live members).
    for i in 0..20 {
        etcd.put(&format!("/w/k{i:02}"), format!("{i}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("put {i} after the leader died: {e}"));
    }
    while seen.len() < 21 {
        apply(&mut seen, next(&mut watch).await);
    }
    assert_eq!(seen.get("/w/k19").map(String::as_str), Some("19"));

    cluster.restart(leader).await;
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster.kill(follower);
    etcd.delete("/w/a").await.unwrap();
    while seen.contains_key("/w/a") {
        apply(&mut seen, next(&mut watch).await);
    }
    assert_eq!(seen.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_watcher_relists_after_compaction_and_calls_fail_unavailable() {
    let cluster = EtcdCluster::start(3).await;
    let relay = EtcdRelay::start(&cluster).await;
    let writer = client(cluster.endpoints());
    let mut opts = EtcdOptions::new(relay.endpoints());
    opts.call_budget = Duration::from_secs(1);
    let cut_off = Etcd::new(opts).unwrap();
    writer.put("/c/keep", b"1".to_vec()).await.unwrap();
    writer.put("/c/gone", b"1".to_vec()).await.unwrap();
    let mut watch = cut_off.watch_prefix("/c/", None);
    let mut seen = BTreeMap::new();
    let first = apply(&mut seen, next(&mut watch).await);
    assert_eq!(seen.len(), 2);

    relay.cut();
    let e = cut_off.put("/c/x", b"1".to_vec()).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(
        matches!(&*cut_off.health().borrow(), StoreHealth::Unavailable { .. }),
        "health after a failed call"
    );
    writer.delete("/c/gone").await.unwrap();
    writer.put("/c/new", b"2".to_vec()).await.unwrap();
    let rev = writer.revision("/c/").await.unwrap();
    writer.compact(rev).await.unwrap();
    assert!(rev > first);

    relay.restore();
    // The resume point is compacted: the watch lists again and lands on the same state.
    let mut snapshot_seen = false;
    while seen.contains_key("/c/gone") || !seen.contains_key("/c/new") {
        let ev = next(&mut watch).await;
        snapshot_seen |= matches!(ev, WatchEvent::Snapshot { .. });
        apply(&mut seen, ev);
    }
    assert!(snapshot_seen, "the watch re-listed after the compaction");
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["/c/keep", "/c/new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_watch_starts_after_the_given_revision() {
    let cluster = EtcdCluster::start(3).await;
    let etcd = client(cluster.endpoints());
    let r1 = etcd.put("/r/a", b"1".to_vec()).await.unwrap();
    etcd.put("/r/b", b"2".to_vec()).await.unwrap();
    let mut watch = etcd.watch_prefix("/r/", Some(r1));
    match next(&mut watch).await {
        WatchEvent::Changes { changes, .. } => {
            let keys: Vec<_> = changes.iter().map(|c| c.key().to_vec()).collect();
            assert_eq!(keys, vec![b"/r/b".to_vec()]);
        }
        other => panic!("expected the change after {r1}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlives_its_member_and_reports_its_revocation() {
    let mut cluster = EtcdCluster::start(3).await;
    let etcd = client(cluster.endpoints());
    // The TTL leaves room for an election: the killed member may be the leader, and no lease is
    // renewed until another is elected (1–2 s with the test cluster's 1 s election timeout, more
    // on a loaded machine). With a 3 s TTL the lease was lost once in a full run of the suite.
    let lease = etcd.grant_lease(Duration::from_secs(6)).await.unwrap();
    etcd.put_with("/l/member", b"me".to_vec(), Some(lease.id()))
        .await
        .unwrap();
    // Kill the member the client talks to (the first one), then wait past the TTL.
    cluster.kill(0);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!lease.is_lost());
    assert!(
        etcd.get("/l/member").await.unwrap().is_some(),
        "key kept alive"
    );
    cluster
        .etcdctl(&["lease", "revoke", &format!("{:x}", lease.id())])
        .expect("revoke");
    tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("the lease reports its loss");
    assert!(etcd.get("/l/member").await.unwrap().is_none());
}
