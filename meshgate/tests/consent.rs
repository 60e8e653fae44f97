//! Issue 13, item 13: an overlay backend serves a reservation only while its node consents,
//! with real overlay nodes on loopback: the gateway (assembled by `meshgate::app`) asks the
//! workload node over the overlay, refuses a reservation of a node that does not consent,
//! and withdraws a served backend within a bounded time once the node revokes its consent
//! or stops answering.

mod common;

use bytes::Bytes;
use common::{InProcess, Workload, http_backend};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use meshgate::app::consent::serve_on_stack;
use meshgate::app::{self, GatewaySetup};
use meshgate_config::gateway::GatewayConfig;
use meshgate_config::node::ConsentGrant;
use meshgate_gateway::admin::api::Api;
use meshgate_testkit::eventually_ok;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const INTERVAL_S: u64 = 1;
const GRACE_S: u64 = 3;
const TIMEOUT_MS: u64 = 1000;

async fn call(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(body))
        .unwrap();
    let resp = api.handle_request(req).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// GET `http://<gateway :80>/` for `host`: the status the client sees.
async fn get(gateway: SocketAddr, host: &str) -> StatusCode {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{gateway}/"))
        .header(header::HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
        Ok(Ok(resp)) => resp.status(),
        _ => StatusCode::GATEWAY_TIMEOUT,
    }
}

fn host(h: &str) -> ConsentGrant {
    ConsentGrant {
        host: Some(h.into()),
        owner: None,
        ports: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_backends_serve_only_with_their_nodes_consent_and_revocation_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let service = http_backend().await;
    let mut workload = Workload::start(dir.path()).await;
    let backend = workload.expose(8080, service.addr());
    let (consent, allow) = tokio::sync::watch::channel(Arc::new(Vec::<ConsentGrant>::new()));
    let consent_server = serve_on_stack(&workload.node.stack, allow, 4).unwrap();

    let text = format!(
        r#"domains = ["farm.test"]
data_dir = "{data}"
[listen]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
token_file = "{data}/admin.token"
[reservations]
nameservers = ["127.0.0.1:53"]
consent_interval_secs = {INTERVAL_S}
consent_grace_secs = {GRACE_S}
consent_timeout_ms = {TIMEOUT_MS}
{overlay}"#,
        data = dir.path().join("data").display(),
        overlay = workload.gateway_overlay_section(dir.path()),
    );
    let config = GatewayConfig::parse(&dir.path().join("gateway.toml"), &text).unwrap();
    let app = app::gateway(GatewaySetup::new(config)).await.unwrap();
    let bound = app.gateway.bind().unwrap();
    let http = bound.http[0].local_addr().unwrap();
    let serving = InProcess::serve(&app.gateway, bound);
    let api = app.reservations.as_ref().unwrap().api.clone();
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let token = |owner: &'static str| {
        let api = api.clone();
        let admin = admin.clone();
        async move {
            let (s, v) = call(
                &api,
                Method::POST,
                "/v1/tokens",
                admin.trim(),
                Some(json!({ "owner": owner })),
            )
            .await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            v["token"].as_str().unwrap().to_string()
        }
    };
    let (mallory, alice) = (token("mallory").await, token("alice").await);
    let reserve = |tok: String, name: &'static str| {
        let api = api.clone();
        async move {
            let body = json!({
                "name": name,
                "backends": [backend.to_string()],
                "options": { "redirect_https": false, "allow_plain_http": true },
            });
            call(&api, Method::POST, "/v1/names", &tok, Some(body)).await
        }
    };

    // 1. The attack: mallory names the workload's overlay address as its backend. The node
    // consents to nothing, so the reservation is refused with the reason (once the overlay
    // carries the gateway's question; before that the node cannot be asked yet).
    let (status, v) = eventually_ok(Duration::from_secs(20), "the node's answer", || {
        let r = reserve(mallory.clone(), "stolen");
        async move {
            let (s, v) = r.await;
            if v["error"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("cannot ask")
            {
                Err(v)
            } else {
                Ok((s, v))
            }
        }
    })
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["field"], "backends[0]", "{v}");
    let reason = v["error"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not consent") && reason.contains("stolen.farm.test"),
        "{reason}"
    );
    assert_eq!(get(http, "stolen.farm.test").await, StatusCode::NOT_FOUND);

    // 2. The node consents to alice's host: reserved and served.
    consent.send_replace(Arc::new(vec![host("shop.farm.test")]));
    let (status, v) = reserve(alice.clone(), "shop").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["consent"][0]["state"], "granted", "{v}");
    eventually_ok(Duration::from_secs(5), "shop served", || async {
        match get(http, "shop.farm.test").await {
            StatusCode::OK => Ok(()),
            other => Err(other),
        }
    })
    .await;
    // Consent for one host is not consent for another.
    let (status, _) = reserve(mallory.clone(), "stolen").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // 3. Revocation: the node answers without the consent; the backend is withdrawn within
    // one interval plus one query.
    consent.send_replace(Arc::new(Vec::new()));
    let revoked = Instant::now();
    eventually_ok(
        Duration::from_secs(10),
        "shop withdrawn after revocation",
        || async {
            match get(http, "shop.farm.test").await {
                StatusCode::NOT_FOUND => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    let took = revoked.elapsed();
    let bound = Duration::from_secs(INTERVAL_S) + Duration::from_millis(TIMEOUT_MS);
    assert!(
        took <= bound + Duration::from_secs(1),
        "withdrawn after {took:?}, bound {bound:?}"
    );
    let (_, v) = call(&api, Method::GET, "/v1/names/shop", &alice, None).await;
    assert_eq!(v["consent"][0]["state"], "refused", "{v}");
    assert!(
        v["consent"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not consent"),
        "{v}"
    );

    // 4. Consent again, then the node stops answering: the last-known consent holds for the
    // grace period only.
    consent.send_replace(Arc::new(vec![host("shop.farm.test")]));
    eventually_ok(Duration::from_secs(10), "shop served again", || async {
        match get(http, "shop.farm.test").await {
            StatusCode::OK => Ok(()),
            other => Err(other),
        }
    })
    .await;
    drop(consent_server);
    let silent = Instant::now();
    eventually_ok(
        Duration::from_secs(15),
        "shop withdrawn after the grace",
        || async {
            match get(http, "shop.farm.test").await {
                StatusCode::NOT_FOUND => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    let took = silent.elapsed();
    assert!(
        took >= Duration::from_secs(GRACE_S) - Duration::from_secs(INTERVAL_S),
        "kept only {took:?} of the {GRACE_S} s grace"
    );
    let bound = Duration::from_secs(GRACE_S + INTERVAL_S) + Duration::from_millis(TIMEOUT_MS);
    assert!(
        took <= bound + Duration::from_secs(1),
        "withdrawn after {took:?}, bound {bound:?}"
    );

    serving.stop().await;
    app.shutdown().await;
}

/// The reservations crate's own copy of the overlay range (it does not depend on the overlay)
/// is the overlay's.
#[test]
fn needs_consent_is_exactly_the_overlay_range() {
    use meshgate_reservations::reservation::needs_consent;
    use std::net::{IpAddr, Ipv6Addr};
    for v in [
        0u128,
        0x05ff << 112,
        0x0600 << 112,
        0x06a1 << 112,
        (0x0800 << 112) - 1,
        0x0800 << 112,
        u128::MAX,
    ] {
        let ip = IpAddr::V6(Ipv6Addr::from(v));
        assert_eq!(
            needs_consent(ip),
            meshgate_overlay::is_overlay_address(&ip),
            "{ip}"
        );
    }
    assert!(!needs_consent("10.0.0.1".parse().unwrap()));
}
