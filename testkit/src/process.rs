//! The real `meshgate gateway` binary as a child process, with its listeners on loopback.
//!
//! The binary binds the listeners its config names, so their ports are [`Reserved`] first and
//! held for the life of the fixture: the gateway binds them with `SO_REUSEADDR`, nobody else
//! can get them. The caller passes the binary's path (`env!("CARGO_BIN_EXE_meshgate")` exists
//! only in the tests of the binary's own package).

use crate::curl::{curl, run_curl};
use crate::eventually::eventually_blocking;
use crate::net::Reserved;
use crate::tls::{roots_from_pem_file, tls_connect};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The loopback ports of a gateway's listeners.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub https: u16,
    pub http: u16,
    /// The operator's listener: `/status`, `/metrics`, `POST /reload`.
    pub admin: u16,
    /// The deployers' listener: the reservations API (bound when `domains` is set).
    pub api: u16,
}

/// A running `meshgate gateway` process (killed on drop).
pub struct GatewayProcess {
    pub child: Child,
    pub dir: PathBuf,
    pub https: u16,
    pub http: u16,
    pub admin: u16,
    pub api: u16,
    pub config_path: PathBuf,
    _reserved: [Reserved; 4],
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// Writes `dir/gateway.toml` ([`Self::config_text`]: loopback listeners, `data_dir` and
    /// the dev CA in `dir`, then `body`) and starts `bin gateway --config` on it.
    pub fn start(bin: &Path, dir: &Path, body: &str) -> GatewayProcess {
        Self::start_with(bin, dir, |ports| Self::config_text(dir, ports, body))
    }

    /// Starts the gateway on the config `config` writes for the reserved `ports`.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        config: impl FnOnce(&Ports) -> String,
    ) -> GatewayProcess {
        let reserved = [
            Reserved::loopback(),
            Reserved::loopback(),
            Reserved::loopback(),
            Reserved::loopback(),
        ];
        let ports = Ports {
            https: reserved[0].port(),
            http: reserved[1].port(),
            admin: reserved[2].port(),
            api: reserved[3].port(),
        };
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, config(&ports)).expect("write gateway.toml");
        let log = std::fs::File::create(dir.join("gateway.log")).expect("gateway.log");
        let child = Command::new(bin)
            .args(["gateway", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut g = GatewayProcess {
            child,
            dir: dir.to_path_buf(),
            https: ports.https,
            http: ports.http,
            admin: ports.admin,
            api: ports.api,
            config_path,
            _reserved: reserved,
        };
        g.wait_ready();
        g
    }

    /// The standard config: listeners on `ports`, `data_dir` = `dir` (so the admin token is
    /// `dir/admin.token`), the dev CA in `dir/ca`, then `body`.
    pub fn config_text(dir: &Path, ports: &Ports, body: &str) -> String {
        format!(
            "data_dir = \"{d}\"\n\
             [listen]\nhttps = [\"127.0.0.1:{https}\"]\nhttp = [\"127.0.0.1:{http}\"]\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\n\
             [tls.dev_ca]\ndir = \"{d}/ca\"\n{body}",
            d = dir.display(),
            https = ports.https,
            http = ports.http,
            admin = ports.admin,
            api = ports.api,
        )
    }

    pub fn ports(&self) -> Ports {
        Ports {
            https: self.https,
            http: self.http,
            admin: self.admin,
            api: self.api,
        }
    }

    /// Rewrites the standard config with a new body (same listeners).
    pub fn rewrite(&self, body: &str) {
        let text = Self::config_text(&self.dir, &self.ports(), body);
        std::fs::write(&self.config_path, text).expect("rewrite gateway.toml");
    }

    /// Waits until the admin listener accepts connections (the gateway binds all its
    /// listeners before it serves any); panics with the log if the process exits first.
    fn wait_ready(&mut self) {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, self.admin));
        let log = self.dir.join("gateway.log");
        let child = &mut self.child;
        eventually_blocking(Duration::from_secs(20), "the gateway to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "gateway exited early ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(admin).map(drop)
        });
    }

    /// The process's log (stderr, `RUST_LOG=info`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// The dev CA's certificate (standard config).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca").join("ca.pem")
    }

    pub fn https_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.https))
    }

    /// A TLS connection to the HTTPS listener for `host`, trusting the dev CA, with `alpn`.
    pub async fn tls(&self, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        tls_connect(
            self.https_addr(),
            host,
            &roots_from_pem_file(&self.ca()),
            alpn,
        )
        .await
        .unwrap_or_else(|e| panic!("TLS to {host}: {e}\n{}", self.log()))
    }

    /// An HTTP/1.1 client connection to the HTTPS listener for `host` (hyper, over
    /// [`Self::tls`]), its connection task spawned: the sender and that task's handle.
    pub async fn h1<B>(
        &self,
        host: &str,
    ) -> (
        hyper::client::conn::http1::SendRequest<B>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    )
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tls = self.tls(host, &[b"http/1.1"]).await;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap_or_else(|e| panic!("HTTP/1.1 handshake to {host}: {e}"));
        (send, tokio::spawn(conn))
    }

    /// `curl` against the HTTPS listener for `host` (trusting the dev CA), returning
    /// (status, body).
    pub fn curl(&self, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
        let url = format!("https://{host}:{}{path}", self.https);
        let resolve = format!("{host}:{}:127.0.0.1", self.https);
        let ca = self.ca();
        let ca = ca.to_str().expect("UTF-8 path");
        run_curl(&[&["--cacert", ca, "--resolve", &resolve], extra, &[&url]].concat())
    }

    /// `curl` against the plain HTTP listener with `Host: host`: (status, head and body).
    pub fn curl_plain(&self, host: &str, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.http);
        let out = Command::new("curl")
            .args(["-sS", "-m", "20", "-D", "-", "-H"])
            .arg(format!("Host: {host}"))
            .arg(&url)
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (crate::http::status_of(&text), text)
    }

    /// The farmer's admin token (standard config: `dir/admin.token`, created by the gateway).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap_or_else(|e| panic!("admin token: {e}\n{}", self.log()))
            .trim()
            .to_string()
    }

    /// The deployers' API listener's base URL (plain HTTP).
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api)
    }

    /// GET `path` on the (plain HTTP) operator's listener; the body.
    pub fn admin_get(&self, path: &str) -> String {
        curl(&[
            "-m",
            "10",
            &format!("http://127.0.0.1:{}{path}", self.admin),
        ])
        .body
    }

    /// POST `path` on the (plain HTTP) operator's listener with the admin token; the body.
    pub fn admin_post(&self, path: &str) -> String {
        let auth = format!("Authorization: Bearer {}", self.admin_token());
        curl(&[
            "-m",
            "10",
            "-X",
            "POST",
            "-H",
            &auth,
            &format!("http://127.0.0.1:{}{path}", self.admin),
        ])
        .body
    }
}
