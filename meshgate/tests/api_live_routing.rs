//! A reservation created through the admin API (mounted on the gateway's admin listener)
//! serves traffic through the running gateway within one second, with no restart; deleting it
//! stops the traffic.

mod common;

use common::InProcess;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshgate_config::gateway::GatewayConfig;
use meshgate_gateway::admin::api::{Api, ApiConfig};
use meshgate_gateway::{Gateway, GatewayParts, ReservationParts};
use meshgate_reservations::reservation::Policy;
use meshgate_reservations::store::SharedStore;
use meshgate_reservations::store::redb::RedbStore;
use meshgate_reservations::token::AdminToken;
use meshgate_reservations::verify::{Verifier, VerifierConfig};
use meshgate_testkit::eventually_ok;
use meshgate_testkit::http::{Protocol, Served, serve_http};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A plain HTTP backend answering with its own marker and the request path.
async fn backend() -> Served {
    let (listener, _) = meshgate_testkit::listener().await;
    serve_http(
        listener,
        Protocol::Http1,
        |req: Request<Incoming>| async move {
            Response::new(Full::new(Bytes::from(format!(
                "backend saw {}",
                req.uri().path()
            ))))
        },
    )
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: String,
    host: Option<&str>,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Bytes) {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(h) = host {
        req = req.header(header::HOST, h);
    }
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(req.body(Full::new(body)).unwrap()),
    )
    .await
    .expect("answer within 5 s")
    .unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn gateway_config(dir: &Path) -> GatewayConfig {
    let text = format!(
        r#"
domains = ["farm.example"]
data_dir = "{data}"
[listen]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:0"
token_file = "{token}"
[api]
listen = "127.0.0.1:0"
[security]
allow_private_backends = true
"#,
        data = dir.join("data").display(),
        token = dir.join("admin.token").display(),
    );
    GatewayConfig::parse(&dir.join("gateway.toml"), &text).unwrap()
}

#[tokio::test]
async fn reservation_serves_traffic_within_one_second() {
    let dir = tempfile::tempdir().unwrap();
    let backend_server = backend().await;
    let backend = backend_server.addr();
    let config = gateway_config(dir.path());
    let token_file = config.admin.token_file.clone().unwrap();
    let (admin_token, admin) = AdminToken::load_or_create(&token_file).unwrap();

    let mut verifier = VerifierConfig::new("farm.example", Vec::new());
    // No domains are reserved here, so the verifier never queries; keep it off the network.
    verifier.nameservers = vec!["127.0.0.1:9".parse().unwrap()];
    // Assembled by hand rather than by `meshgate::app`: this API allows loopback backends.
    let store: SharedStore = Arc::new(RedbStore::open(&config.data_dir, "farm.example").unwrap());
    let verifier = Verifier::new(store.clone(), verifier).unwrap().spawn();
    let api = Arc::new(Api::new(
        store.clone(),
        admin_token,
        ApiConfig {
            policy: Policy {
                allow_loopback_backends: true,
                ..Policy::default()
            },
            gateway_addrs: Vec::new(),
            ..ApiConfig::default()
        },
    ));
    let gateway = Gateway::new(GatewayParts {
        reservations: Some(ReservationParts {
            api,
            routes: store.routes(),
        }),
        ..GatewayParts::new(config.clone())
    })
    .unwrap();
    let bound = gateway.bind().unwrap();
    let http = bound.http[0].local_addr().unwrap();
    let api_addr = bound
        .api
        .as_ref()
        .expect("the API listener")
        .local_addr()
        .unwrap();
    let serving = InProcess::serve(&gateway, bound);

    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let host = "web.farm.example";
    let (s, _) = send(
        &client,
        Method::GET,
        format!("http://{http}/x"),
        Some(host),
        None,
        None,
    )
    .await;
    assert_ne!(s, StatusCode::OK, "nothing is reserved yet");

    // Through the gateway's API listener: a deployer token, then a name reservation.
    let (s, v) = send(
        &client,
        Method::POST,
        format!("http://{api_addr}/v1/tokens"),
        None,
        Some(&admin),
        Some(json!({"owner": "alice"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v:?}");
    let v: Value = serde_json::from_slice(&v).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let (s, v) = send(
        &client,
        Method::POST,
        format!("http://{api_addr}/v1/names"),
        None,
        Some(&token),
        Some(json!({
            "name": "web",
            "backends": [backend.to_string()],
            "options": {"redirect_https": false, "allow_plain_http": true},
        })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v:?}");
    let created = Instant::now();

    // Poll (bounded) until the gateway serves it.
    let body = eventually_ok(Duration::from_secs(1), "the reservation served", || async {
        let (s, body) = send(
            &client,
            Method::GET,
            format!("http://{http}/hello"),
            Some(host),
            None,
            None,
        )
        .await;
        if s == StatusCode::OK {
            Ok(body)
        } else {
            Err(format!("last status {s}"))
        }
    })
    .await;
    let served_after = created.elapsed();
    assert_eq!(&body[..], b"backend saw /hello");
    assert!(served_after < Duration::from_secs(1));
    eprintln!("served {served_after:?} after the API answered 201");

    // Deleting the reservation stops the traffic, again without a restart.
    let (s, _) = send(
        &client,
        Method::DELETE,
        format!("http://{api_addr}/v1/names/web"),
        None,
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    eventually_ok(
        Duration::from_secs(1),
        "the deleted reservation unrouted",
        || async {
            let (s, _) = send(
                &client,
                Method::GET,
                format!("http://{http}/hello"),
                Some(host),
                None,
                None,
            )
            .await;
            if s != StatusCode::OK {
                Ok(())
            } else {
                Err("still served")
            }
        },
    )
    .await;

    serving.stop().await;
    verifier.abort();
}
