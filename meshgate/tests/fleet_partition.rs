//! A gateway cut off from etcd keeps serving from its cache; while it is cut off the fleet
//! changes and etcd compacts its history past the gateway's revision; when it can reach etcd
//! again it lists the state afresh and converges (a deleted route gone, a new one served).
//! Restarted while etcd is unreachable, it serves from its saved cache.

mod fleet_kit;

use fleet_kit::*;
use http::{Method, StatusCode};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_gateway_relists_after_compaction_and_converges() {
    let etcd = EtcdCluster::start(3).await;
    let relay = EtcdRelay::start(&etcd).await;
    let direct = etcd.endpoints();
    let relayed = relay.endpoints();
    // Gateway 1 reaches etcd only through the relay.
    let mut fleet = Fleet::start_on(etcd, 2, |i| {
        if i == 1 {
            relayed.clone()
        } else {
            direct.clone()
        }
    })
    .await;
    let c = client();
    let (a, b) = (0, 1);
    let (_, token) = deployer_token(&c, fleet.gw(a), "alice").await;
    for name in ["keep", "gone"] {
        let (s, v) = reserve(&c, fleet.gw(a), &token, name, fleet.backend).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        served_within(
            &c,
            fleet.gw(b),
            &format!("{name}.{FARM}"),
            Duration::from_secs(2),
        )
        .await;
    }

    relay.cut();
    let (s, _) = api(
        &c,
        fleet.gw(a),
        Method::DELETE,
        "/v1/names/gone",
        &token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = reserve(&c, fleet.gw(a), &token, "new", fleet.backend).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Churn, then compact everything up to now: B's resume point is gone.
    for i in 0..5 {
        let name = format!("churn{i}");
        reserve(&c, fleet.gw(a), &token, &name, fleet.backend).await;
        api(
            &c,
            fleet.gw(a),
            Method::DELETE,
            &format!("/v1/names/{name}"),
            &token,
            None,
        )
        .await;
    }
    let out = fleet
        .etcd
        .etcdctl(&["endpoint", "status", "-w", "json"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rev = v[0]["Status"]["header"]["revision"].as_u64().unwrap();
    fleet
        .etcd
        .etcdctl(&["compact", &rev.to_string()])
        .expect("compact");

    // Cut off, B still serves what it had, including the route deleted meanwhile.
    let (s, _) = get(&c, fleet.gw(b), &format!("keep.{FARM}")).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let (s, _) = get(&c, fleet.gw(b), &format!("gone.{FARM}")).await.unwrap();
    assert_eq!(
        s,
        StatusCode::OK,
        "the cut-off gateway still has its cached route"
    );
    let (s, v) = reserve(&c, fleet.gw(b), &token, "refused", fleet.backend).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");

    // Restarted while cut off: serves from its saved cache.
    let gw_b = fleet.gateways.remove(b);
    let dir = gw_b.dir.clone();
    drop(gw_b);
    let restarted = start_fleet_gateway(&dir, &fleet.bodies[b]);
    let (s, _) = get(&c, &restarted, &format!("keep.{FARM}")).await.unwrap();
    assert_eq!(
        s,
        StatusCode::OK,
        "served from the saved cache\n{}",
        restarted.log()
    );
    assert!(
        restarted.log().contains("saved cache"),
        "{}",
        restarted.log()
    );

    relay.restore();
    served_within(
        &c,
        &restarted,
        &format!("new.{FARM}"),
        Duration::from_secs(10),
    )
    .await;
    meshgate_testkit::eventually_ok(
        Duration::from_secs(5),
        "the deleted route gone on B",
        || async {
            match get(&c, &restarted, &format!("gone.{FARM}")).await {
                Ok((StatusCode::OK, _)) => Err("still served".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    let st = status(&restarted);
    assert_eq!(st["fleet"]["cached"]["reservations"], 2, "{}", st["fleet"]);
    assert!(
        restarted.log().contains("re-listing") || restarted.log().contains("compacted"),
        "the watch re-listed after the compaction:\n{}",
        restarted.log()
    );
}
