//! Certificates through the gateway's own wiring (`meshgate::app::gateway`): with
//! `reservations.require_certificate`, a verified custom domain gets its certificate, goes
//! active and serves HTTPS; passthrough domains get no certificate; `/status` reports the
//! certificate manager's state.

mod common;

use common::InProcess;

use meshgate::app::{self, GatewaySetup};
use meshgate_certs::CertState;
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::route::Mode;
use meshgate_reservations::lifecycle::{Input, Rules, step};
use meshgate_reservations::reservation::{Key, Options, Reservation, Status};
use meshgate_reservations::store::{ReservationStore, ReservationStoreExt, StoreError};
use meshgate_testkit::curl::run_curl;
use meshgate_testkit::http::fixed_backend;
use meshgate_testkit::{eventually, eventually_ok};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn config(dir: &Path, backend: SocketAddr) -> GatewayConfig {
    let text = format!(
        r#"
domains = ["farm.example"]
data_dir = "{data}"
[listen]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
[api]
listen = "127.0.0.1:0"
[security]
allow_private_backends = true
[tls.acme]
directory = "local-dev-ca"
contact = "mailto:ops@farm.example"
dns_listen = "127.0.0.1:0"
[reservations]
nameservers = ["127.0.0.1:9"]
require_certificate = true
interval_secs = 3600
[[route]]
host = "static.example.net"
backends = [{{ addr = "{backend}" }}]
"#,
        data = dir.join("data").display(),
    );
    GatewayConfig::parse(&dir.join("gateway.toml"), &text).unwrap()
}

fn reserve(store: &dyn ReservationStore, fqdn: &str, backend: SocketAddr, mode: Mode) {
    store
        .create(
            &Reservation::new(
                Key::domain(fqdn, "alice"),
                "alice",
                vec![backend],
                mode,
                Options::default(),
                0,
            ),
            100,
        )
        .unwrap();
    // The DNS proof holds (the verifier's own DNS flow is tested in meshgate-reservations).
    let rules = Rules {
        grace_ms: 60_000,
        require_certificate: true,
    };
    store
        .update(&Key::domain(fqdn, "alice"), |r| {
            step(r, Input::Checked(Ok(())), 1, &rules);
            Ok::<(), StoreError>(())
        })
        .unwrap();
}

/// `curl` over HTTPS to `host` at `addr`, trusting only `ca`; (status, body).
fn curl(addr: SocketAddr, host: &str, ca: &Path) -> (u16, String) {
    run_curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("{host}:{}:127.0.0.1", addr.port()),
        &format!("https://{host}:{}/", addr.port()),
    ])
}

async fn admin_status(addr: SocketAddr) -> Value {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-m", "10"])
        .arg(format!("http://{addr}/status"))
        .output()
        .await
        .unwrap();
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_domain_gets_certificate_goes_active_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let backend_server = fixed_backend("backend ok").await;
    let backend = backend_server.addr();
    let config = config(dir.path(), backend);
    let services = app::gateway(GatewaySetup::new(config.clone()))
        .await
        .unwrap();
    let gateway = services.gateway.clone();
    let bound = gateway.bind().unwrap();
    let https = bound.https[0].local_addr().unwrap();
    let admin = bound.admin.local_addr().unwrap();
    let serving = InProcess::serve(&gateway, bound);
    let store = services.reservations.as_ref().unwrap().store.clone();
    let certs = services.certs.as_ref().unwrap().manager.clone();
    reserve(&*store, "shop.example.com", backend, Mode::Terminate);
    reserve(&*store, "pass.example.com", backend, Mode::Passthrough);

    let key = Key::domain("shop.example.com", "alice");
    let r = eventually_ok(Duration::from_secs(15), "shop.example.com active", || {
        let r = store.get(&key).unwrap().unwrap();
        let status = certs.status();
        async move {
            if r.status == Status::Active {
                Ok(r)
            } else {
                Err(format!("{r:?}; certs {status:?}"))
            }
        }
    })
    .await;
    assert!(r.verification.certificate_ready);
    let ca = config.data_dir.join("certs/dev-ca/ca.pem");
    let body = eventually_ok(Duration::from_secs(10), "shop.example.com served", || {
        let (code, body) = curl(https, "shop.example.com", &ca);
        async move {
            if code == 200 {
                Ok(body)
            } else {
                Err(format!("{code} {body}"))
            }
        }
    })
    .await;
    assert_eq!(body, "backend ok");
    eventually(
        Duration::from_secs(10),
        "a valid certificate for static.example.net",
        || {
            certs
                .status()
                .iter()
                .any(|s| s.name == "static.example.net" && s.state == CertState::Valid)
        },
    )
    .await;
    let (code, body) = curl(https, "static.example.net", &ca);
    assert_eq!((code, body.as_str()), (200, "backend ok"));
    let ordered: Vec<String> = certs.status().into_iter().map(|s| s.name).collect();
    assert_eq!(
        ordered,
        vec![
            "*.farm.example".to_string(),
            "shop.example.com".into(),
            "static.example.net".into()
        ],
        "passthrough domains get no certificate"
    );

    let status = admin_status(admin).await;
    let by_name = |n: &str| {
        status["certificates"]["managed"]
            .as_array()
            .unwrap_or_else(|| panic!("no managed certificates: {status}"))
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} missing: {status}"))
    };
    let shop = by_name("shop.example.com");
    assert_eq!(shop["state"], "valid", "{shop}");
    assert!(shop["not_after"].is_string() && shop["renew_at"].is_string());
    assert!(
        status["certificates"]["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "shop.example.com")),
        "{status}"
    );

    drop(services);
    serving.stop().await;
}
