//! etcd over TLS with client certificates and user authentication, as the documented
//! `[fleet]` keys configure it: gateways share state through it; a gateway with a
//! certificate from another CA, a wrong password or another fleet key refuses to start and
//! says why.

mod fleet_kit;

use fleet_kit::*;
use http::StatusCode;
use meshgate_testkit::etcd::ClientSecurity;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const PASSWORD: &str = "s3cret-for-the-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_and_user_auth_and_every_refusal_is_clear() {
    let etcd = EtcdCluster::start_with(3, ClientSecurity::TlsClientCerts).await;
    etcd.enable_auth(&format!("/meshgate/{FLEET}/"), PASSWORD);
    let tls = etcd.tls().unwrap().clone();
    let endpoints = etcd.endpoints();
    assert!(endpoints[0].starts_with("https://"));
    let mut fleet = Fleet::start_on(etcd, 0, |_| Vec::new()).await;
    let pw = fleet.root.path().join("etcd.password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secure = |cert: &std::path::Path, key: &std::path::Path, pw: &std::path::Path| {
        format!(
            "user = \"gateway\"\npassword_file = \"{}\"\n[fleet.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            pw.display(),
            tls.ca.display(),
            cert.display(),
            key.display()
        )
    };
    let good = secure(&tls.client_cert, &tls.client_key, &pw);
    fleet.add_gateway(&endpoints, &good);
    fleet.add_gateway(&endpoints, &good);
    let c = client();
    let (_, token) = deployer_token(&c, fleet.gw(0), "alice").await;
    let (s, v) = reserve(&c, fleet.gw(0), &token, "secure", fleet.backend).await;
    assert_eq!(s, StatusCode::CREATED, "{v}\n{}", fleet.gw(0).log());
    served_within(
        &c,
        fleet.gw(1),
        &format!("secure.{FARM}"),
        Duration::from_secs(2),
    )
    .await;
    let dump = fleet
        .etcd
        .etcdctl_root(
            PASSWORD,
            &["get", "--prefix", &format!("/meshgate/{FLEET}/")],
        )
        .unwrap();
    assert!(dump.contains("secure"), "the reservation is in etcd");
    assert!(!dump.contains("PRIVATE KEY"));

    // A client certificate from another CA: refused by etcd's TLS, the gateway says so.
    let dir = fleet.root.path().join("stranger");
    std::fs::create_dir_all(&dir).unwrap();
    let body = fleet_body(
        &fleet.workload,
        &dir,
        &fleet.key_file,
        &endpoints,
        &secure(&tls.stranger_cert, &tls.stranger_key, &pw),
    );
    let (ok, log) = run_to_exit(&dir, &body);
    assert!(!ok);
    assert!(
        log.contains("etcd unavailable") && log.contains("first start needs etcd"),
        "{log}"
    );

    // A wrong password: etcd refuses the user, the gateway names authentication.
    let bad_pw = fleet.root.path().join("bad.password");
    std::fs::write(&bad_pw, "wrong\n").unwrap();
    std::fs::set_permissions(&bad_pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = fleet.root.path().join("badpw");
    std::fs::create_dir_all(&dir).unwrap();
    let body = fleet_body(
        &fleet.workload,
        &dir,
        &fleet.key_file,
        &endpoints,
        &secure(&tls.client_cert, &tls.client_key, &bad_pw),
    );
    let (ok, log) = run_to_exit(&dir, &body);
    assert!(!ok);
    assert!(log.contains("authentication failed"), "{log}");

    // A password file others can read is refused before anything is sent.
    std::fs::set_permissions(&bad_pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, log) = run_to_exit(&dir, &body);
    assert!(!ok);
    assert!(log.contains("chmod 600"), "{log}");

    // Another fleet key: fails closed, naming both key ids, and writes nothing.
    let before = fleet
        .etcd
        .etcdctl_root(
            PASSWORD,
            &[
                "get",
                "--prefix",
                "--keys-only",
                &format!("/meshgate/{FLEET}/"),
            ],
        )
        .unwrap();
    let other_key = fleet.root.path().join("other.key");
    write_fleet_key(&other_key);
    let dir = fleet.root.path().join("otherkey");
    std::fs::create_dir_all(&dir).unwrap();
    let body = fleet_body(&fleet.workload, &dir, &other_key, &endpoints, &good);
    let (ok, log) = run_to_exit(&dir, &body);
    assert!(!ok);
    assert!(
        log.contains("fleet key refused")
            && log.contains("every gateway of the fleet needs the same key_file"),
        "{log}"
    );
    let after = fleet
        .etcd
        .etcdctl_root(
            PASSWORD,
            &[
                "get",
                "--prefix",
                "--keys-only",
                &format!("/meshgate/{FLEET}/"),
            ],
        )
        .unwrap();
    let members = |s: &str| {
        s.lines()
            .filter(|l| !l.contains("/members/"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        members(&before),
        members(&after),
        "the refused gateway wrote nothing"
    );
}
