//! The reservations admin API over real HTTP (hyper server and client on loopback), and the
//! `meshgate reserve` CLI against it.

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshgate_gateway::admin::api::{self, Api, ApiConfig};
use meshgate_reservations::reservation::{Key, Policy};
use meshgate_reservations::store::redb::RedbStore;
use meshgate_reservations::store::{ReservationStoreExt, SharedStore};
use meshgate_reservations::token::AdminToken;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const FARM: &str = "farm.example";

struct Server {
    addr: SocketAddr,
    store: SharedStore,
    admin: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn start(dir: &Path) -> Server {
    let store: SharedStore = Arc::new(RedbStore::open(&dir.join("data"), FARM).unwrap());
    let (admin_token, admin) = AdminToken::load_or_create(&dir.join("admin.token")).unwrap();
    let cfg = ApiConfig {
        policy: Policy::default(),
        gateway_addrs: vec!["198.51.100.7".parse().unwrap()],
        ..ApiConfig::default()
    };
    let api = Arc::new(Api::new(store.clone(), admin_token, cfg));
    let (listener, addr) = meshgate_testkit::listener().await;
    let task = tokio::spawn(api::serve(api, listener));
    Server {
        addr,
        store,
        admin,
        task,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Server {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let resp = self
            .client
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, value)
    }

    async fn token_for(&self, owner: &str) -> String {
        let (s, v) = self
            .call(
                Method::POST,
                "/v1/tokens",
                Some(&self.admin),
                Some(json!({ "owner": owner })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["owner"], owner);
        v["token"].as_str().unwrap().to_string()
    }

    /// Stops serving and waits until nothing but this handle holds the store, so the same
    /// data directory can be opened again (redb allows one open per file).
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let store = &self.store;
        meshgate_testkit::eventually(
            Duration::from_secs(2),
            "the store released after the server stopped",
            || Arc::strong_count(store) == 1,
        )
        .await;
    }
}

fn name_body(name: &str) -> Value {
    json!({ "name": name, "backends": ["[400:1:2::3]:8080"] })
}

fn assert_error(v: &Value, field: &str, reason_part: &str) {
    assert_eq!(v["error"]["field"], field, "{v}");
    let reason = v["error"]["reason"].as_str().unwrap();
    assert!(reason.contains(reason_part), "{field}: {reason}");
}

#[tokio::test]
async fn deployers_see_and_change_only_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let alice = srv.token_for("alice").await;
    let bob = srv.token_for("bob").await;

    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&alice),
            Some(name_body("shop")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["host"], "shop.farm.example");
    assert_eq!(v["owner"], "alice");
    assert_eq!(v["status"]["state"], "active");
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&bob),
            Some(json!({"fqdn": "blog.bob.test", "backends": ["10.0.0.5:80"], "mode": "passthrough"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // Bob on Alice's name, and Alice on Bob's domain: 403 for each verb.
    // Another's name: 403. Another's domain: a deployer addresses only its own claim on a
    // domain (several deployers may claim one), so there is none: 404.
    for (token, path, expected, reason) in [
        (
            &bob,
            "/v1/names/shop",
            StatusCode::FORBIDDEN,
            "another deployer",
        ),
        (
            &alice,
            "/v1/domains/blog.bob.test",
            StatusCode::NOT_FOUND,
            "claimed by `alice`",
        ),
    ] {
        let (s, v) = srv.call(Method::GET, path, Some(token), None).await;
        assert_eq!(s, expected, "GET {path}: {v}");
        assert!(
            v["error"]["reason"].as_str().unwrap().contains(reason),
            "{v}"
        );
        let (s, _) = srv
            .call(
                Method::PUT,
                path,
                Some(token),
                Some(json!({"backends": ["10.9.9.9:80"]})),
            )
            .await;
        assert_eq!(s, expected, "PUT {path}");
        let (s, _) = srv.call(Method::DELETE, path, Some(token), None).await;
        assert_eq!(s, expected, "DELETE {path}");
        let (s, _) = srv
            .call(
                Method::POST,
                "/v1/domains/blog.bob.test/verify",
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    // Nothing changed.
    let shop = srv.store.get(&Key::name("shop")).unwrap().unwrap();
    assert_eq!(shop.backends, vec!["[400:1:2::3]:8080".parse().unwrap()]);
    assert!(
        srv.store
            .get(&Key::domain("blog.bob.test", "bob"))
            .unwrap()
            .is_some()
    );

    // Lists hold only one's own.
    let (_, v) = srv.call(Method::GET, "/v1/names", Some(&bob), None).await;
    assert_eq!(v["names"], json!([]));
    let (_, v) = srv.call(Method::GET, "/v1/names", Some(&alice), None).await;
    assert_eq!(v["names"].as_array().unwrap().len(), 1);
    let (_, v) = srv
        .call(Method::GET, "/v1/domains", Some(&alice), None)
        .await;
    assert_eq!(v["domains"], json!([]));

    // A taken name conflicts; reserving for someone else is forbidden.
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&bob),
            Some(name_body("shop")),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&v, "name", "already reserved");
    let mut body = name_body("bobs");
    body["owner"] = json!("alice");
    let (s, v) = srv
        .call(Method::POST, "/v1/names", Some(&bob), Some(body))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // Deployers cannot mint tokens; no token or a bad one is 401.
    let (s, _) = srv
        .call(
            Method::POST,
            "/v1/tokens",
            Some(&alice),
            Some(json!({"owner": "eve"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = srv.call(Method::GET, "/v1/names", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["field"], "authorization");
    let forged = format!("{}0", &alice[..alice.len() - 1]);
    let forged = if forged == alice {
        format!("{}1", &alice[..alice.len() - 1])
    } else {
        forged
    };
    let (s, _) = srv
        .call(Method::GET, "/v1/names", Some(&forged), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The owner updates and deletes; the admin sees everything.
    let (s, v) = srv
        .call(
            Method::PUT,
            "/v1/names/shop",
            Some(&alice),
            Some(json!({"backends": ["[400:1:2::4]:8080"], "mode": "passthrough"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["mode"], "passthrough");
    assert_eq!(v["backends"], json!(["[400:1:2::4]:8080"]));
    let (_, v) = srv
        .call(Method::GET, "/v1/names", Some(&srv.admin), None)
        .await;
    assert_eq!(v["names"].as_array().unwrap().len(), 1);
    let (s, _) = srv
        .call(Method::DELETE, "/v1/names/shop", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = srv
        .call(Method::GET, "/v1/names/shop", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "name", "no name reservation");

    // A revoked token stops working.
    let (_, v) = srv
        .call(Method::GET, "/v1/tokens", Some(&srv.admin), None)
        .await;
    let id = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["owner"] == "bob")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        v.to_string().find(&bob).is_none(),
        "secrets are never listed"
    );
    let (s, _) = srv
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{id}"),
            Some(&srv.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = srv.call(Method::GET, "/v1/domains", Some(&bob), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    srv.stop().await;
}

#[tokio::test]
async fn invalid_names_and_domains_get_400_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let t = srv.token_for("alice").await;
    let backends = json!(["10.0.0.1:80"]);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "/v1/names",
            json!({"name": "www", "backends": backends}),
            "name",
            "reserved",
        ),
        (
            "/v1/names",
            json!({"name": "_acme-challenge", "backends": backends}),
            "name",
            "reserved",
        ),
        (
            "/v1/names",
            json!({"name": "-shop", "backends": backends}),
            "name",
            "start or end with `-`",
        ),
        (
            "/v1/names",
            json!({"name": "my_shop", "backends": backends}),
            "name",
            "contains `_`",
        ),
        (
            "/v1/names",
            json!({"name": "a".repeat(64), "backends": backends}),
            "name",
            "at most 63",
        ),
        (
            "/v1/names",
            json!({"name": "a.b", "backends": backends}),
            "name",
            "one DNS label",
        ),
        (
            "/v1/names",
            json!({"backends": backends}),
            "name",
            "is required",
        ),
        (
            "/v1/names",
            json!({"name": "ok"}),
            "backends",
            "is required",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": ["web:80"]}),
            "backends[0]",
            "IP-literal",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": ["127.0.0.1:80"]}),
            "backends[0]",
            "loopback",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": backends, "mode": "tunnel"}),
            "mode",
            "unknown variant",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": backends, "colour": 1}),
            "colour",
            "unknown field",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": backends, "options": {"allow_plain_http": true}}),
            "options.allow_plain_http",
            "redirect",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": backends, "options": {"redirect_https": false}}),
            "options.redirect_https",
            "allow_plain_http",
        ),
        (
            "/v1/names",
            json!({"name": "ok", "backends": backends, "options": {"fast": true}}),
            "options",
            "unknown field",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "shop.farm.example", "backends": backends}),
            "fqdn",
            "gateway's domain",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "*.shop.test", "backends": backends}),
            "fqdn",
            "wildcard",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "192.0.2.1", "backends": backends}),
            "fqdn",
            "IP address",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "bücher.test", "backends": backends}),
            "fqdn",
            "xn--bcher-kva.test",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "xn--a.test", "backends": backends}),
            "fqdn",
            "punycode",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "shop..test", "backends": backends}),
            "fqdn",
            "empty label",
        ),
        (
            "/v1/domains",
            json!({"fqdn": "localhost", "backends": backends}),
            "fqdn",
            "two labels",
        ),
        (
            "/v1/domains",
            json!({"fqdn": 7, "backends": backends}),
            "fqdn",
            "must be a string",
        ),
    ];
    for (path, body, field, reason) in cases {
        let (s, v) = srv
            .call(Method::POST, path, Some(&t), Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {v}");
        assert_error(&v, field, reason);
    }
    // Not JSON at all.
    let req = Request::post(format!("http://{}/v1/names", srv.addr))
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Full::new(Bytes::from_static(b"name=shop")))
        .unwrap();
    let resp = srv.client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Nothing was stored, and valid IDN punycode is accepted.
    assert!(srv.store.list(None, None).unwrap().is_empty());
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&t),
            Some(json!({"fqdn": "XN--BCHER-KVA.test.", "backends": backends})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "xn--bcher-kva.test");
    srv.stop().await;
}

#[tokio::test]
async fn domain_shows_the_txt_token_to_publish() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let t = srv.token_for("alice").await;
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&t),
            Some(json!({"fqdn": "Shop.Alice.Test", "backends": ["[400::9]:443"], "mode": "passthrough"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = srv
        .call(Method::GET, "/v1/domains/shop.alice.test", Some(&t), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"]["state"], "pending");
    assert_eq!(
        v["dns"]["challenge"]["name"],
        "_meshgate-challenge.shop.alice.test"
    );
    assert_eq!(v["dns"]["challenge"]["type"], "TXT");
    assert_eq!(
        v["dns"]["challenge"]["value"],
        srv.store.challenge_token("alice", "shop.alice.test")
    );
    assert_eq!(v["dns"]["pointing"]["cname"], FARM);
    assert_eq!(v["dns"]["pointing"]["addresses"], json!(["198.51.100.7"]));
    // Pending domains are not routed.
    assert!(srv.store.routes().borrow().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn restart_keeps_reservations_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let t = srv.token_for("alice").await;
    let mut created = Vec::new();
    for i in 0..5 {
        let (s, v) = srv
            .call(
                Method::POST,
                "/v1/names",
                Some(&t),
                Some(name_body(&format!("n{i}"))),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        created.push(v);
    }
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&t),
            Some(json!({"fqdn": "a.alice.test", "backends": ["10.0.0.1:80"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    created.push(v);
    srv.stop().await;

    let srv = start(dir.path()).await;
    let (s, names) = srv.call(Method::GET, "/v1/names", Some(&t), None).await;
    assert_eq!(s, StatusCode::OK, "the deployer token survives: {names}");
    let (_, domains) = srv.call(Method::GET, "/v1/domains", Some(&t), None).await;
    let mut after: Vec<Value> = names["names"].as_array().unwrap().clone();
    after.extend(domains["domains"].as_array().unwrap().iter().cloned());
    assert_eq!(after, created);
    assert_eq!(srv.store.routes().borrow().len(), 5);
    srv.stop().await;
}

#[tokio::test]
async fn api_changes_reach_the_routes_watch() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let t = srv.token_for("alice").await;
    let mut routes = srv.store.routes();
    routes.borrow_and_update();
    let (s, _) = srv
        .call(Method::POST, "/v1/names", Some(&t), Some(name_body("live")))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    tokio::time::timeout(Duration::from_secs(1), routes.changed())
        .await
        .expect("published within a second")
        .unwrap();
    let table = routes.borrow_and_update().clone();
    assert_eq!(table.len(), 1);
    assert_eq!(table[0].host, "live.farm.example");
    assert_eq!(
        table[0].backends[0].addr,
        "[400:1:2::3]:8080".parse().unwrap()
    );
    srv.call(Method::DELETE, "/v1/names/live", Some(&t), None)
        .await;
    tokio::time::timeout(Duration::from_secs(1), routes.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(routes.borrow().is_empty());
    srv.stop().await;
}

/// Runs `meshgate reserve …` against the server.
async fn cli(srv: &Server, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("reserve")
        .args(["--admin", &format!("http://{}", srv.addr)])
        .args(args)
        .env("MESHGATE_TOKEN", token)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_reserves_lists_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;

    let (ok, out, err) = cli(&srv, &srv.admin, &["token", "alice", "--json"]).await;
    assert!(ok, "{err}");
    let token: Value = serde_json::from_str(&out).unwrap();
    let t = token["token"].as_str().unwrap().to_string();

    let (ok, out, err) = cli(
        &srv,
        &t,
        &[
            "name",
            "web",
            "--backend",
            "[400:1::5]:8080",
            "--backend",
            "10.1.1.1:80",
            "--json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["host"], "web.farm.example");
    assert_eq!(v["backends"], json!(["[400:1::5]:8080", "10.1.1.1:80"]));

    let (ok, out, err) = cli(
        &srv,
        &t,
        &[
            "domain",
            "shop.alice.test",
            "--backend",
            "[400:1::5]:443",
            "--mode",
            "passthrough",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let txt = srv.store.challenge_token("alice", "shop.alice.test");
    assert!(
        out.contains(&format!(
            "_meshgate-challenge.shop.alice.test. TXT \"{txt}\""
        )),
        "{out}"
    );
    assert!(
        out.contains("shop.alice.test. CNAME farm.example."),
        "{out}"
    );

    let (ok, out, _) = cli(&srv, &t, &["list"]).await;
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("HOST"), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web.farm.example") && l.contains("active")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("shop.alice.test") && l.contains("pending")),
        "{out}"
    );

    // Refusals come back as field: reason, with a failing exit status.
    let (ok, _, err) = cli(&srv, &t, &["name", "www", "--backend", "10.1.1.1:80"]).await;
    assert!(!ok);
    assert!(
        err.contains("400 Bad Request: name: `www` is reserved"),
        "{err}"
    );

    let (ok, out, err) = cli(
        &srv,
        &t,
        &["update", "web.farm.example", "--backend", "10.1.1.2:80"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("10.1.1.2:80"), "{out}");
    let (ok, out, err) = cli(&srv, &t, &["delete", "web"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "deleted web.farm.example\n");
    let (ok, out, _) = cli(&srv, &t, &["list", "--json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reservations"].as_array().unwrap().len(), 1);
    let (ok, _, err) = cli(&srv, "", &["list"]).await;
    assert!(!ok && err.contains("MESHGATE_TOKEN"), "{err}");
    srv.stop().await;
}

#[tokio::test]
async fn cli_update_turns_options_on_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let (ok, out, err) = cli(&srv, &srv.admin, &["token", "alice", "--json"]).await;
    assert!(ok, "{err}");
    let token: Value = serde_json::from_str(&out).unwrap();
    let t = token["token"].as_str().unwrap().to_string();
    let (ok, _, err) = cli(
        &srv,
        &t,
        &["name", "web", "--backend", "10.1.1.1:80", "--sticky"],
    )
    .await;
    assert!(ok, "{err}");
    let options = || srv.store.get(&Key::name("web")).unwrap().unwrap().options;
    let o = options();
    assert!(o.sticky && !o.allow_plain_http && o.redirect_https);

    // Each flag changes only its own option.
    for (flag, sticky, plain) in [
        ("--allow-plain-http", true, true),
        ("--no-sticky", false, true),
        ("--sticky", true, true),
        ("--no-plain-http", true, false),
        ("--no-sticky", false, false),
    ] {
        let (ok, _, err) = cli(&srv, &t, &["update", "web", flag]).await;
        assert!(ok, "{flag}: {err}");
        let o = options();
        assert_eq!((o.sticky, o.allow_plain_http), (sticky, plain), "{flag}");
        assert_eq!(o.redirect_https, !plain, "{flag}");
    }
    let (ok, _, err) = cli(&srv, &t, &["update", "web", "--sticky", "--no-sticky"]).await;
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    srv.stop().await;
}

#[tokio::test]
async fn certificates_only_for_verified_domains_then_active() {
    use meshgate_config::route::Mode;
    use meshgate_reservations::lifecycle::{Input, Rules, step};
    use meshgate_reservations::reservation::{Options, Reservation, Status};
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(RedbStore::open(&dir.path().join("data"), FARM).unwrap());
    let config = meshgate_certs::CertConfig::new(
        dir.path().join("certs"),
        meshgate_certs::AcmeConfig::new("local-dev-ca", "ops@farm.example"),
    );
    let certs = Arc::new(meshgate_certs::CertManager::new(config).unwrap());
    let driver = certs.spawn();
    for fqdn in ["verified.alice.test", "pending.alice.test"] {
        store
            .create(
                &Reservation::new(
                    Key::domain(fqdn, "alice"),
                    "alice",
                    vec!["10.0.0.1:80".parse().unwrap()],
                    Mode::Terminate,
                    Options::default(),
                    0,
                ),
                100,
            )
            .unwrap();
    }
    let rules = Rules {
        grace_ms: 60_000,
        require_certificate: true,
    };
    store
        .update(&Key::domain("verified.alice.test", "alice"), |r| {
            step(r, Input::Checked(Ok(())), 1, &rules);
            Ok::<(), meshgate_reservations::store::StoreError>(())
        })
        .unwrap();
    let (_routed_tx, routed) = tokio::sync::watch::channel(Arc::new(Default::default()));
    let glue = meshgate::app::certificates::follow_certificates(
        Some(store.clone()),
        certs.clone(),
        routed,
        Duration::from_millis(20),
    );

    let mut routes = store.routes();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if routes
                .borrow_and_update()
                .iter()
                .any(|r| r.host == "verified.alice.test")
            {
                break;
            }
            routes.changed().await.unwrap();
        }
    })
    .await
    .expect("the verified domain gets a certificate and goes active");
    let r = store
        .get(&Key::domain("verified.alice.test", "alice"))
        .unwrap()
        .unwrap();
    assert_eq!(r.status, Status::Active);
    assert!(r.verification.certificate_ready);
    let ordered: Vec<String> = certs.status().into_iter().map(|s| s.name).collect();
    assert_eq!(ordered, vec!["verified.alice.test".to_string()]);
    let pending = store
        .get(&Key::domain("pending.alice.test", "alice"))
        .unwrap()
        .unwrap();
    assert_eq!(pending.status, Status::Pending);
    glue.abort();
    driver.abort();
}

#[test]
fn openapi_overlay_range_and_error_responses_match_the_gateway() {
    use std::net::{IpAddr, Ipv6Addr};
    let text = include_str!("../../docs/admin-api.yaml");
    let overlay = |v: u128| meshgate_overlay::is_overlay_address(&IpAddr::V6(Ipv6Addr::from(v)));
    let ranges: Vec<&str> = text
        .split("overlay addresses (")
        .skip(1)
        .filter_map(|r| r.split(')').next())
        .flat_map(|list| list.split(", "))
        .collect();
    assert!(
        !ranges.is_empty(),
        "the backends schema names the overlay range"
    );
    for cidr in ranges {
        let (net, len) = cidr.split_once('/').unwrap();
        let first = u128::from(net.parse::<Ipv6Addr>().unwrap());
        let len: u32 = len.parse().unwrap();
        let last = first | (u128::MAX >> len);
        assert!(overlay(first) && overlay(last), "{cidr} is the overlay");
        assert!(
            !overlay(first - 1) && !overlay(last + 1),
            "{cidr} is all of it"
        );
    }
    // Every operation documents the wrong-method and internal-error answers.
    let paths = text.split("\ncomponents:").next().unwrap();
    let operations = paths.matches("      responses:").count();
    assert!(operations > 10);
    assert_eq!(paths.matches("\"405\": ").count(), operations);
    assert_eq!(paths.matches("\"500\": ").count(), operations);
}

/// Issue 13, item 11: squatting. A pending domain does not block another deployer's claim;
/// the farmer's mail labels are reserved; mixed-script punycode is refused; and a deployer
/// holds at most `max_per_owner` reservations.
#[tokio::test]
async fn squatting_is_refused_claims_labels_scripts_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(RedbStore::open(&dir.path().join("data"), FARM).unwrap());
    let (admin_token, admin) = AdminToken::load_or_create(&dir.path().join("admin.token")).unwrap();
    let cfg = ApiConfig {
        max_per_owner: 3,
        ..ApiConfig::default()
    };
    let api = Arc::new(Api::new(store.clone(), admin_token, cfg));
    let (listener, addr) = meshgate_testkit::listener().await;
    let srv = Server {
        addr,
        store,
        admin,
        task: tokio::spawn(api::serve(api, listener)),
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let mallory = srv.token_for("mallory").await;
    let owner = srv.token_for("owner").await;
    let domain = |fqdn: &str| json!({ "fqdn": fqdn, "backends": ["[400:1:2::3]:8080"] });

    // A squatter's pending claim used to answer the real owner `409 already reserved`.
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&mallory),
            Some(domain("shop.example.com")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&owner),
            Some(domain("shop.example.com")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Each sees its own claim, with its own TXT token.
    let (_, mine) = srv
        .call(
            Method::GET,
            "/v1/domains/shop.example.com",
            Some(&owner),
            None,
        )
        .await;
    let (_, theirs) = srv
        .call(
            Method::GET,
            "/v1/domains/shop.example.com",
            Some(&mallory),
            None,
        )
        .await;
    assert_eq!(mine["owner"], "owner");
    assert_eq!(theirs["owner"], "mallory");
    assert_ne!(
        mine["dns"]["challenge"]["value"],
        theirs["dns"]["challenge"]["value"]
    );
    // The admin must say which claim it means.
    let (s, v) = srv
        .call(
            Method::GET,
            "/v1/domains/shop.example.com",
            Some(&srv.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = srv
        .call(
            Method::GET,
            "/v1/domains/shop.example.com?owner=owner",
            Some(&srv.admin),
            None,
        )
        .await;
    assert_eq!((s, v["owner"].as_str()), (StatusCode::OK, Some("owner")));

    // Labels mail clients look up under the farmer's domain are the farmer's.
    for label in ["mta-sts", "openpgpkey", "autoconfig", "autodiscover"] {
        let (s, v) = srv
            .call(
                Method::POST,
                "/v1/names",
                Some(&mallory),
                Some(name_body(label)),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{label}");
        assert_error(&v, "name", "reserved");
    }
    // `xn--pypal-4ve` is `pаypal` with a Cyrillic `а`: refused as a name and in a domain.
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&mallory),
            Some(name_body("xn--pypal-4ve")),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "name", "mixes scripts");
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/domains",
            Some(&mallory),
            Some(domain("xn--pypal-4ve.com")),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "fqdn", "mixes scripts");
    // One script is fine, IDN included (`bücher`).
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&mallory),
            Some(name_body("xn--bcher-kva")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // Quota: mallory holds 2 (a claim and a name); the third is the last.
    let (s, _) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&mallory),
            Some(name_body("third")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&mallory),
            Some(name_body("fourth")),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_error(&v, "owner", "reservations.max_per_owner");
    // Other deployers are not affected.
    let (s, _) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&owner),
            Some(name_body("fourth")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    srv.stop().await;
}

/// RFC 9110: every 405 names the methods the path takes, in `Allow`.
#[tokio::test]
async fn a_405_carries_allow_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let cases = [
        ("/v1/whoami", Method::DELETE, "GET"),
        ("/v1/routes", Method::POST, "GET"),
        ("/v1/tokens", Method::PUT, "GET, POST"),
        ("/v1/tokens/abc", Method::GET, "DELETE"),
        ("/v1/names", Method::PATCH, "GET, POST"),
        ("/v1/names/shop", Method::POST, "GET, PUT, DELETE"),
        ("/v1/domains", Method::DELETE, "GET, POST"),
        (
            "/v1/domains/shop.example.com",
            Method::PATCH,
            "GET, PUT, DELETE",
        ),
        ("/v1/domains/shop.example.com/verify", Method::GET, "POST"),
    ];
    for (path, method, allow) in cases {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{path}", srv.addr))
            .header(header::AUTHORIZATION, format!("Bearer {}", srv.admin))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = srv.client.request(req).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(resp.headers()[header::ALLOW], allow, "{method} {path}");
    }
    srv.stop().await;
}

/// What the schema allows is accepted: the admin may leave the owner out (the farmer's own
/// reservation); an empty change is outside the schema (`minProperties: 1`) and refused.
#[tokio::test]
async fn the_admin_reserves_for_the_farmer_without_an_owner() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let (s, v) = srv
        .call(
            Method::POST,
            "/v1/names",
            Some(&srv.admin),
            Some(name_body("shop")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["owner"], "farmer");
    let (s, v) = srv
        .call(
            Method::PUT,
            "/v1/names/shop",
            Some(&srv.admin),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "body", "nothing to change");
    let (s, v) = srv
        .call(
            Method::GET,
            "/v1/names/shop?owner=Not%20an%20id",
            Some(&srv.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_error(&v, "owner", "deployer id");
    srv.stop().await;
}
