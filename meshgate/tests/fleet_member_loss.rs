//! Under steady requests to three gateway processes, an etcd follower and then the leader
//! are killed: no request fails, and changes still propagate through the surviving members.

mod fleet_kit;

use fleet_kit::*;
use http::StatusCode;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_follower_then_the_leader_fails_no_request() {
    let Steady {
        mut fleet,
        client: c,
        token,
        load,
    } = Steady::start().await;

    let leader = fleet.etcd.wait_for_leader(Duration::from_secs(20)).await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    fleet.etcd.kill(follower);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A change made now (two members left, still a quorum) reaches every gateway.
    let (s, v) = reserve(&c, fleet.gw(1), &token, "after-follower", fleet.backend).await;
    assert_eq!(s, StatusCode::CREATED, "{v}\n{}", fleet.gw(1).log());
    for g in &fleet.gateways {
        served_within(
            &c,
            g,
            &format!("after-follower.{FARM}"),
            Duration::from_secs(2),
        )
        .await;
    }

    fleet.etcd.restart(follower).await;
    let leader = fleet.etcd.wait_for_leader(Duration::from_secs(20)).await;
    // Let the restarted follower catch up before the leader goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.etcd.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // After the election, writes work again through any gateway.
    let (s, v) = reserve(&c, fleet.gw(2), &token, "after-leader", fleet.backend).await;
    assert_eq!(s, StatusCode::CREATED, "{v}\n{}", fleet.gw(2).log());
    for g in &fleet.gateways {
        served_within(
            &c,
            g,
            &format!("after-leader.{FARM}"),
            Duration::from_secs(2),
        )
        .await;
    }

    let (sent, failed, failures) = load.finish().await;
    eprintln!("{sent} requests during the member losses, {failed} failed");
    assert!(sent > 200, "the load ran ({sent} requests)");
    assert_eq!(failed, 0, "failed requests: {failures:#?}");
}
