//! Three real gateway processes sharing their reservations and tokens on a real 3-member
//! etcd: a reservation made on A is served by B and C within 1 s, a token revoked on A is
//! refused on B, `/status` and `meshgate fleet status` show the members, and etcd holds no
//! secret in clear.

mod fleet_kit;

use fleet_kit::*;
use http::{Method, StatusCode};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_on_one_gateway_is_served_by_the_others_and_a_revoked_token_is_refused() {
    let fleet = Fleet::start(3).await;
    let c = client();
    let (a, b, cc) = (fleet.gw(0), fleet.gw(1), fleet.gw(2));
    let (token_id, token) = deployer_token(&c, a, "alice").await;

    // The token minted on A works on B (it reached B's cache through etcd).
    meshgate_testkit::eventually_ok(Duration::from_secs(2), "the token known on B", || async {
        let (s, v) = api(&c, b, Method::GET, "/v1/whoami", &token, None).await;
        if s == StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{s} {v}"))
        }
    })
    .await;

    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let name = format!("app{i}");
        let host = format!("{name}.{FARM}");
        let (s, v) = reserve(&c, a, &token, &name, fleet.backend).await;
        assert_eq!(s, StatusCode::CREATED, "{v}\n{}", a.log());
        // The writer serves it at once (it waited for its own cache).
        let (s, body) = get(&c, a, &host).await.expect("A answers");
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body, format!("served {host}"));
        for g in [b, cc] {
            let took = served_within(&c, g, &host, Duration::from_secs(1)).await;
            worst = worst.max(took);
        }
    }
    eprintln!("slowest propagation to B or C: {worst:?}");

    // Revoked on A, refused on B.
    let admin_a = a.admin_token();
    let (s, _) = api(
        &c,
        a,
        Method::DELETE,
        &format!("/v1/tokens/{token_id}"),
        &admin_a,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    meshgate_testkit::eventually_ok(
        Duration::from_secs(1),
        "the revoked token refused on B",
        || async {
            let (s, v) = api(&c, b, Method::GET, "/v1/whoami", &token, None).await;
            if s == StatusCode::UNAUTHORIZED {
                Ok(())
            } else {
                Err(format!("{s} {v}"))
            }
        },
    )
    .await;
    let (s, _) = reserve(&c, cc, &token, "late", fleet.backend).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "C refuses the revoked token too"
    );

    // /status: the fleet section of every gateway sees three members and a healthy store.
    meshgate_testkit::eventually_ok(
        Duration::from_secs(10),
        "three members in /status",
        || async {
            let st = status(b);
            let f = &st["fleet"];
            let n = f["members"].as_array().map_or(0, Vec::len);
            if n == 3 && f["store"]["state"] == "available" && f["registered"] == true {
                Ok(())
            } else {
                Err(f.to_string())
            }
        },
    )
    .await;
    let st = status(a);
    assert_eq!(st["fleet"]["name"], FLEET);
    assert_eq!(st["fleet"]["id"], "gw0");
    assert_eq!(st["fleet"]["cached"]["reservations"], 5);

    // `meshgate fleet status` from A's config.
    let (ok, out, err) = fleet_cli(&["status", "--config", a.config_path.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    for id in ["gw0", "gw1", "gw2"] {
        assert!(out.contains(id), "{out}");
    }
    assert!(out.contains("store    available"), "{out}");

    // etcd's content: no private key or secret in clear; the challenge key is sealed.
    let dump = fleet.etcd.dump(&format!("/meshgate/{FLEET}/"));
    assert!(
        !dump.contains("PRIVATE KEY"),
        "PEM private key in etcd:\n{dump}"
    );
    assert!(!dump.contains(&token), "a deployer token in clear in etcd");
    let challenge = fleet
        .etcd
        .etcdctl(&[
            "get",
            "--print-value-only",
            &format!("/meshgate/{FLEET}/secrets/challenge-key"),
        ])
        .unwrap();
    assert!(
        challenge.starts_with("MGSEAL1"),
        "challenge key not sealed: {challenge:?}"
    );
}
