//! Fleet test harness: a real 3-member etcd (the kit's cluster), real `meshgate gateway`
//! processes configured with `[fleet]`, a workload overlay node in the test process whose
//! service the reservations route to, the deployers' API driven over HTTP, and a steady
//! request loop that counts every failed request.
// Each test binary uses part of the harness.
#![allow(dead_code, unused_imports)]

#[path = "../common/mod.rs"]
mod common;

use bytes::Bytes;
pub use common::{GatewayProcess, Workload, start_gateway};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
pub use meshgate_testkit::etcd::{EtcdCluster, EtcdRelay};
use meshgate_testkit::http::{Served, host_echo_backend};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const FARM: &str = "farm.example";
pub const FLEET: &str = "testfleet";

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// Creates a fleet key (0600) at `path` with `meshgate fleet keygen`.
pub fn write_fleet_key(path: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["fleet", "keygen"])
        .arg(path)
        .output()
        .expect("meshgate fleet keygen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `meshgate fleet <args>`: (success, stdout, stderr).
pub fn fleet_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .arg("fleet")
        .args(args)
        .output()
        .expect("meshgate fleet runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `[fleet]` table and what goes with it for a test gateway.
pub fn fleet_body(
    workload: &Workload,
    dir: &Path,
    key_file: &Path,
    etcd: &[String],
    extra: &str,
) -> String {
    let endpoints: Vec<String> = etcd.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[reservations]\nnameservers = [\"127.0.0.1:9\"]\n\
         {overlay}\
         [fleet]\nname = \"{FLEET}\"\netcd = [{endpoints}]\nkey_file = \"{key}\"\n\
         advertise = [\"127.0.0.1\"]\nmember_ttl_secs = 3\n{extra}",
        overlay = workload.gateway_overlay_section(dir),
        endpoints = endpoints.join(", "),
        key = key_file.display(),
    )
}

/// A fleet: etcd, the fleet key, the workload node with one HTTP service, and gateways.
pub struct Fleet {
    pub etcd: EtcdCluster,
    pub key_file: PathBuf,
    pub workload: Workload,
    /// The workload service's overlay address.
    pub backend: std::net::SocketAddr,
    pub gateways: Vec<GatewayProcess>,
    /// Each gateway's config body (for a restart).
    pub bodies: Vec<String>,
    pub root: tempfile::TempDir,
    _service: Served,
    /// The workload node's consent answers: it consents to every reservation of `alice`.
    _consent: meshgate::app::consent::ConsentServer,
}

impl Fleet {
    /// etcd (3 members), the workload, and `n` gateways on the members' endpoints.
    pub async fn start(n: usize) -> Fleet {
        let etcd = EtcdCluster::start(3).await;
        let endpoints = etcd.endpoints();
        Self::start_on(etcd, n, |_| endpoints.clone()).await
    }

    /// As [`Fleet::start`], gateway `i` reaching etcd at `endpoints(i)`.
    pub async fn start_on(
        etcd: EtcdCluster,
        n: usize,
        endpoints: impl Fn(usize) -> Vec<String>,
    ) -> Fleet {
        let root = tempfile::tempdir().unwrap();
        let key_file = root.path().join("fleet.key");
        write_fleet_key(&key_file);
        let mut workload = Workload::start(root.path()).await;
        let (service, local) = host_echo_backend().await;
        let backend = workload.expose(8080, local);
        let grant = meshgate_config::node::ConsentGrant {
            host: None,
            owner: Some(format!("alice@{FARM}")),
            ports: Vec::new(),
        };
        let (_, allow) = tokio::sync::watch::channel(Arc::new(vec![grant]));
        let consent =
            meshgate::app::consent::serve_on_stack(&workload.node.stack, allow, 4).unwrap();
        let mut fleet = Fleet {
            etcd,
            key_file,
            workload,
            backend,
            gateways: Vec::new(),
            bodies: Vec::new(),
            root,
            _service: service,
            _consent: consent,
        };
        for i in 0..n {
            let eps = endpoints(i);
            fleet.add_gateway(&eps, "");
        }
        fleet
    }

    /// Starts another gateway reaching etcd at `endpoints`, with `extra` in its `[fleet]`.
    pub fn add_gateway(&mut self, endpoints: &[String], extra: &str) -> usize {
        let i = self.gateways.len();
        let dir = self.root.path().join(format!("gw{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let body = fleet_body(
            &self.workload,
            &dir,
            &self.key_file,
            endpoints,
            &format!("id = \"gw{i}\"\n{extra}"),
        );
        self.gateways.push(start_fleet_gateway(&dir, &body));
        self.bodies.push(body);
        i
    }

    pub fn gw(&self, i: usize) -> &GatewayProcess {
        &self.gateways[i]
    }
}

/// A call to a gateway's deployers' API: (status, JSON body or Null).
pub async fn api(
    client: &HttpClient,
    g: &GatewayProcess,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", g.api_url()))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(
            body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
        ))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), client.request(req))
        .await
        .expect("API answer within 15 s")
        .expect("API call");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Mints a deployer token for `owner` through `g` (with its admin token); (id, token).
pub async fn deployer_token(
    client: &HttpClient,
    g: &GatewayProcess,
    owner: &str,
) -> (String, String) {
    let (s, v) = api(
        client,
        g,
        Method::POST,
        "/v1/tokens",
        &g.admin_token(),
        Some(json!({"owner": owner})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}\n{}", g.log());
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

/// Reserves `name` (plain HTTP allowed) to `backend` through `g`: the API's status and body.
pub async fn reserve(
    client: &HttpClient,
    g: &GatewayProcess,
    token: &str,
    name: &str,
    backend: std::net::SocketAddr,
) -> (StatusCode, Value) {
    api(
        client,
        g,
        Method::POST,
        "/v1/names",
        token,
        Some(json!({
            "name": name,
            "backends": [backend.to_string()],
            "options": {"redirect_https": false, "allow_plain_http": true},
        })),
    )
    .await
}

/// One plain-HTTP request for `host` through `g`: the status, or an error text.
pub async fn get(
    client: &HttpClient,
    g: &GatewayProcess,
    host: &str,
) -> Result<(StatusCode, String), String> {
    let req = Request::builder()
        .uri(format!("http://127.0.0.1:{}/", g.http))
        .header(header::HOST, host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }
        Ok(Err(e)) => Err(format!("request failed: {e}")),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// Waits until `g` serves `host` (200); how long that took.
pub async fn served_within(
    client: &HttpClient,
    g: &GatewayProcess,
    host: &str,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    meshgate_testkit::eventually_ok(
        limit,
        &format!("{host} served by gateway :{}", g.http),
        || async {
            match get(client, g, host).await {
                Ok((StatusCode::OK, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    started.elapsed()
}

/// A steady request loop against some gateways for existing hosts: every failed request
/// (no answer, or a status other than 200) is counted with its reason.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `per_gateway` requests per second to each of `targets` (http port, host); runs until
    /// [`Load::finish`] or `limit`, whichever comes first.
    pub fn start(targets: Vec<(u16, String)>, per_second: u32, limit: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let tasks = targets
            .into_iter()
            .map(|(port, host)| {
                let (stop, sent, failed, failures) =
                    (stop.clone(), sent.clone(), failed.clone(), failures.clone());
                tokio::spawn(async move {
                    let c = client();
                    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                        tick.tick().await;
                        let req = Request::builder()
                            .uri(format!("http://127.0.0.1:{port}/"))
                            .header(header::HOST, host.as_str())
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        sent.fetch_add(1, Ordering::Relaxed);
                        let outcome = match tokio::time::timeout(
                            Duration::from_secs(5),
                            c.request(req),
                        )
                        .await
                        {
                            Ok(Ok(r)) if r.status() == StatusCode::OK => {
                                match r.into_body().collect().await {
                                    Ok(_) => None,
                                    Err(e) => Some(format!("body: {e}")),
                                }
                            }
                            Ok(Ok(r)) => Some(format!("status {}", r.status())),
                            Ok(Err(e)) => Some(format!("error {e}")),
                            Err(_) => Some("timeout".into()),
                        };
                        if let Some(why) = outcome {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut f = failures.lock().unwrap();
                            if f.len() < 20 {
                                f.push(format!(":{port} {host} at {:?}: {why}", started.elapsed()));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failed,
            failures,
            tasks,
        }
    }

    /// Stops the loop; (sent, failed, first failures).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let f = self.failures.lock().unwrap().clone();
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            f,
        )
    }
}

/// Three gateways serving `steady.<farm>` (reserved through A by `alice`) under a steady
/// load of 20 requests/s per gateway, the setup of the etcd failure tests.
pub struct Steady {
    pub fleet: Fleet,
    pub client: HttpClient,
    /// alice's deployer token.
    pub token: String,
    pub load: Load,
}

impl Steady {
    pub async fn start() -> Steady {
        let fleet = Fleet::start(3).await;
        let c = client();
        let (_, token) = deployer_token(&c, fleet.gw(0), "alice").await;
        let (s, v) = reserve(&c, fleet.gw(0), &token, "steady", fleet.backend).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let host = format!("steady.{FARM}");
        for g in &fleet.gateways {
            served_within(&c, g, &host, Duration::from_secs(2)).await;
        }
        let targets = fleet
            .gateways
            .iter()
            .map(|g| (g.http, host.clone()))
            .collect();
        let load = Load::start(targets, 20, Duration::from_secs(120));
        Steady {
            fleet,
            client: c,
            token,
            load,
        }
    }
}

/// The `/status` document of `g`.
pub fn status(g: &GatewayProcess) -> Value {
    serde_json::from_str(&g.admin_get("/status")).unwrap_or(Value::Null)
}

/// Runs `meshgate gateway` on the standard config with `body` in `dir` and expects it to exit
/// within 30 s: (success, its log).
pub fn run_to_exit(dir: &Path, body: &str) -> (bool, String) {
    use meshgate_testkit::net::Reserved;
    let reserved = [
        Reserved::loopback(),
        Reserved::loopback(),
        Reserved::loopback(),
        Reserved::loopback(),
    ];
    let ports = meshgate_testkit::process::Ports {
        https: reserved[0].port(),
        http: reserved[1].port(),
        admin: reserved[2].port(),
        api: reserved[3].port(),
    };
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "domains = [\"{FARM}\"]\n{}",
            GatewayProcess::config_text(dir, &ports, body)
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["gateway", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut log = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut log)
                .unwrap();
            return (status.success(), log);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway kept running; expected it to refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `meshgate gateway` with `domains` first (top-level keys precede the standard
/// config's tables), then the standard config and `body`.
pub fn start_fleet_gateway(dir: &Path, body: &str) -> GatewayProcess {
    GatewayProcess::start_with(Path::new(env!("CARGO_BIN_EXE_meshgate")), dir, |ports| {
        format!(
            "domains = [\"{FARM}\"]\n{}",
            GatewayProcess::config_text(dir, ports, body)
        )
    })
}
