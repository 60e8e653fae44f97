//! etcd loses its quorum for 30 s under steady requests to three gateway processes: no
//! request on an existing route fails, admin writes answer 503 naming the cause, `/status`
//! shows the store unavailable, and after recovery a change made on A reaches B without a
//! restart.

mod fleet_kit;

use fleet_kit::*;
use http::StatusCode;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_quorum_fails_no_request_refuses_writes_and_is_caught_up_after() {
    let Steady {
        mut fleet,
        client: c,
        token,
        load,
    } = Steady::start().await;

    // Two of three members down: no quorum.
    let lost = Instant::now();
    fleet.etcd.kill(0);
    fleet.etcd.kill(1);

    // Writes answer 503 and name the cause.
    let (s, v) =
        meshgate_testkit::eventually_ok(Duration::from_secs(15), "a 503 on a write", || async {
            let (s, v) = reserve(&c, fleet.gw(0), &token, "during", fleet.backend).await;
            if s == StatusCode::SERVICE_UNAVAILABLE {
                Ok((s, v))
            } else {
                Err(format!("{s} {v}"))
            }
        })
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let reason = v["error"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("etcd") && reason.contains("unavailable"),
        "{v}"
    );
    assert_eq!(v["error"]["field"], "store");
    // /status names the store's state.
    meshgate_testkit::eventually_ok(
        Duration::from_secs(10),
        "/status: store unavailable",
        || async {
            let st = status(fleet.gw(1));
            if st["fleet"]["store"]["state"] == "unavailable" {
                Ok(())
            } else {
                Err(st["fleet"].to_string())
            }
        },
    )
    .await;
    // Reads (token checks) still work from the cache: the whoami of the deployer.
    let (s, _) = api(
        &c,
        fleet.gw(2),
        http::Method::GET,
        "/v1/whoami",
        &token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "token check served from the cache");

    let left = Duration::from_secs(30).saturating_sub(lost.elapsed());
    tokio::time::sleep(left).await;
    fleet.etcd.restart(0).await;
    fleet.etcd.restart(1).await;
    fleet.etcd.wait_for_leader(Duration::from_secs(30)).await;

    // After recovery a change on A reaches B, no restart.
    let (s, v) = meshgate_testkit::eventually_ok(
        Duration::from_secs(15),
        "a write accepted again",
        || async {
            let (s, v) = reserve(&c, fleet.gw(0), &token, "after", fleet.backend).await;
            if s == StatusCode::CREATED {
                Ok((s, v))
            } else {
                Err(format!("{s} {v}"))
            }
        },
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    served_within(
        &c,
        fleet.gw(1),
        &format!("after.{FARM}"),
        Duration::from_secs(2),
    )
    .await;
    meshgate_testkit::eventually_ok(
        Duration::from_secs(10),
        "/status: store available",
        || async {
            let st = status(fleet.gw(1));
            if st["fleet"]["store"]["state"] == "available" {
                Ok(())
            } else {
                Err(st["fleet"].to_string())
            }
        },
    )
    .await;

    let (sent, failed, failures) = load.finish().await;
    eprintln!("{sent} requests across the quorum loss, {failed} failed");
    assert!(sent > 1000, "the load ran ({sent} requests)");
    assert_eq!(failed, 0, "failed requests: {failures:#?}");
}
