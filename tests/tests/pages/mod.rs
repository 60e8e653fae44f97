//! What both page tests share: a real gateway from a config text, plain HTTP/1.1 calls, and
//! running the blocking browser driver from an async test.
#![allow(dead_code)] // Each test binary uses its own part of this module.

use meshgate::app::{self, GatewaySetup};
use meshgate_config::gateway::GatewayConfig;
use meshgate_gateway::Gateway;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The real gateway (`meshgate::app::gateway`, the code behind `meshgate gateway`) serving
/// its listeners on loopback.
pub struct RealGateway {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub api: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    _app: app::AppGateway,
    _gateway: Gateway,
    task: JoinHandle<()>,
}

impl RealGateway {
    /// `top` holds top-level keys (e.g. `domains`), `body` the tables after the listeners
    /// and `data_dir` (which this writes).
    pub async fn start(top: &str, body: &str, with_api: bool) -> RealGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = if with_api {
            "[api]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        let text = format!(
            "{top}\ndata_dir = \"{d}/data\"\n\
             [listen]\nhttps = [\"127.0.0.1:0\"]\nhttp = [\"127.0.0.1:0\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{d}/admin.token\"\n\
             {api}\
             [tls.dev_ca]\ndir = \"{d}/ca\"\n\
             {body}\n",
            d = dir.path().display(),
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).expect("write config");
        let config = GatewayConfig::parse(&path, &text).expect("valid gateway.toml");
        let app = app::gateway(GatewaySetup {
            config_path: Some(path),
            ..GatewaySetup::new(config)
        })
        .await
        .expect("gateway");
        let gateway = app.gateway.clone();
        let bound = gateway.bind().expect("bind");
        let http = bound.http[0].local_addr().expect("addr");
        let admin = bound.admin.local_addr().expect("addr");
        let api = bound.api.as_ref().map(|l| l.local_addr().expect("addr"));
        let g = gateway.clone();
        let task = tokio::spawn(async move {
            let _ = g.serve(bound, std::future::pending()).await;
        });
        RealGateway {
            http,
            admin,
            api,
            dir,
            _app: app,
            _gateway: gateway,
            task,
        }
    }

    /// The farmer's admin token (the gateway wrote it on start).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_string()
    }
}

impl Drop for RealGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an answer within 10 s");
    let status = meshgate_testkit::http::status_of(&text);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `call` for JSON answers.
pub async fn call_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let (status, text) = call(addr, method, "localhost", path, Some(token), body).await;
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, value)
}

/// Runs blocking browser steps on this multi-threaded runtime's worker.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}
