//! Test harness: the real `meshgate` binary as the gateway, a workload overlay node in the test
//! process exposing loopback backends, and real clients (curl, openssl, hyper, tungstenite).
#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_gateway::tls::DevCa;
use meshgate_gateway::upstream::overlay::EmbeddedNode;
use meshgate_overlay::NodeConfig;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The byte at offset `i` of test payloads: position-dependent, so any loss, duplication or
/// reordering is caught.
pub fn pattern(i: u64) -> u8 {
    ((i ^ (i >> 9) ^ (i >> 17)) % 251) as u8
}

pub fn pattern_chunk(start: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|k| pattern(start + k))
        .collect::<Vec<u8>>()
        .into()
}

/// A running `meshgate gateway` process (killed on drop).
pub struct GatewayProcess {
    pub child: Child,
    pub dir: PathBuf,
    pub https: u16,
    pub http: u16,
    pub admin: u16,
    pub config_path: PathBuf,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// Writes `gateway.toml` (listeners on free loopback ports + `body`) and starts the binary.
    pub fn start(dir: &Path, body: &str) -> GatewayProcess {
        let (https, http, admin) = (free_port(), free_port(), free_port());
        let config_path = dir.join("gateway.toml");
        let text = Self::config_text(dir, https, http, admin, body);
        std::fs::write(&config_path, text).unwrap();
        let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["gateway", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut g = GatewayProcess {
            child,
            dir: dir.to_path_buf(),
            https,
            http,
            admin,
            config_path,
        };
        g.wait_ready();
        g
    }

    pub fn config_text(dir: &Path, https: u16, http: u16, admin: u16, body: &str) -> String {
        format!(
            "data_dir = \"{d}\"\n\
             [listen]\nhttps = [\"127.0.0.1:{https}\"]\nhttp = [\"127.0.0.1:{http}\"]\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [tls.dev_ca]\ndir = \"{d}/ca\"\n{body}",
            d = dir.display()
        )
    }

    /// Rewrites the config with a new body (same listeners).
    pub fn rewrite(&self, body: &str) {
        let text = Self::config_text(&self.dir, self.https, self.http, self.admin, body);
        std::fs::write(&self.config_path, text).unwrap();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gateway exited early ({status}): {}", self.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.admin)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gateway not ready: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca").join("ca.pem")
    }

    /// `curl` against the HTTPS listener for `host`, returning (status, body).
    pub fn curl(&self, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
        let url = format!("https://{host}:{}{path}", self.https);
        let resolve = format!("{host}:{}:127.0.0.1", self.https);
        run_curl(
            &[
                &[
                    "--cacert",
                    self.ca().to_str().unwrap(),
                    "--resolve",
                    &resolve,
                ],
                extra,
                &[&url],
            ]
            .concat(),
        )
    }

    pub fn curl_plain(&self, host: &str, path: &str) -> (u16, String, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.http);
        let out = Command::new("curl")
            .args(["-sS", "-m", "20", "-D", "-", "-H"])
            .arg(format!("Host: {host}"))
            .arg(&url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text.clone(), text)
    }

    pub fn admin_get(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "-m", "10"])
            .arg(format!("http://127.0.0.1:{}{path}", self.admin))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn admin_post(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "-m", "10", "-X", "POST"])
            .arg(format!("http://127.0.0.1:{}{path}", self.admin))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

/// Runs curl with `args`; returns (HTTP status, body). Status 0 = no HTTP response.
pub fn run_curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-m", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A workload overlay node in the test process exposing loopback services on overlay ports.
pub struct Workload {
    pub node: EmbeddedNode,
    pub link: SocketAddr,
    exposed: Vec<meshgate_sockets::Exposed>,
}

impl Workload {
    pub async fn start(dir: &Path) -> Workload {
        let node = EmbeddedNode::start_with(NodeConfig {
            key_path: dir.join("workload.key"),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let link = node.node.listen_addr().unwrap();
        Workload {
            node,
            link,
            exposed: Vec::new(),
        }
    }

    /// Exposes `local` on `overlay_port`; returns the overlay backend address.
    pub fn expose(&mut self, overlay_port: u16, local: SocketAddr) -> SocketAddr {
        let e = meshgate_sockets::expose(&self.node.stack, overlay_port, local).unwrap();
        self.exposed.push(e);
        SocketAddr::from((self.node.node.address(), overlay_port))
    }

    /// The `[overlay]` section for a gateway peering with this node.
    pub fn gateway_overlay_section(&self, dir: &Path) -> String {
        format!(
            "[overlay]\nkey_file = \"{}\"\npeers = [\"{}\"]\n",
            dir.join("gateway-node.key").display(),
            self.link
        )
    }
}

async fn serve_loop<F, Fut>(listener: TcpListener, h2c: bool, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let h = handler.clone();
                async move { Ok::<_, Infallible>(h(req).await) }
            });
            let io = TokioIo::new(stream);
            if h2c {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            }
        });
    }
}

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn full_body(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into())
        .map_err(|n: Infallible| match n {})
        .boxed()
}

/// HTTP/1.1 backend: `/echo` (request headers as JSON), `/upload` (checks the pattern),
/// `/download?n=` (streams the pattern).
pub async fn start_http_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_loop(l, false, |req: Request<Incoming>| async move {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/upload" => {
                let mut body = req.into_body();
                let mut n: u64 = 0;
                let mut bad = None;
                while let Some(f) = body.frame().await {
                    let Ok(f) = f else {
                        bad = Some(u64::MAX);
                        break;
                    };
                    if let Some(d) = f.data_ref() {
                        for (k, b) in d.iter().enumerate() {
                            if bad.is_none() && *b != pattern(n + k as u64) {
                                bad = Some(n + k as u64);
                            }
                        }
                        n += d.len() as u64;
                    }
                }
                let text = match bad {
                    None => format!("ok {n}"),
                    Some(at) => format!("corrupt at {at} of {n}"),
                };
                Response::new(full_body(text))
            }
            "/download" => {
                let total: u64 = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("n="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                const CHUNK: u64 = 256 * 1024;
                let stream = futures_util::stream::unfold(0u64, move |at| async move {
                    if at >= total {
                        return None;
                    }
                    let len = CHUNK.min(total - at);
                    let chunk = pattern_chunk(at, len as usize);
                    Some((Ok::<_, std::io::Error>(Frame::data(chunk)), at + len))
                });
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
            _ => {
                let mut map = serde_json::Map::new();
                for (k, v) in req.headers() {
                    map.insert(
                        k.as_str().to_string(),
                        serde_json::Value::String(v.to_str().unwrap_or("?").to_string()),
                    );
                }
                map.insert("_path".into(), path.into());
                Response::new(full_body(serde_json::Value::Object(map).to_string()))
            }
        }
    }));
    addr
}

/// h2c backend in the style of gRPC: echoes the request body and ends with trailers.
pub async fn start_h2c_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_loop(l, true, |req: Request<Incoming>| async move {
        // What the gateway sent as `:authority` (and Host, if any), answered as headers.
        let authority = req.uri().authority().map(|a| a.to_string());
        let host = req.headers().get("host").cloned();
        let ct = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let data = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert(
            "grpc-message",
            format!("echoed-{}", data.len()).parse().unwrap(),
        );
        let frames = vec![
            Ok::<_, std::io::Error>(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))));
        resp.headers_mut().insert(
            "content-type",
            ct.parse()
                .unwrap_or(http::HeaderValue::from_static("application/grpc")),
        );
        if let Some(v) = authority.and_then(|a| a.parse().ok()) {
            resp.headers_mut().insert("x-seen-authority", v);
        }
        if let Some(v) = host {
            resp.headers_mut().insert("x-seen-host", v);
        }
        resp
    }));
    addr
}

/// WebSocket echo backend.
pub async fn start_ws_backend() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        if ws.send(m).await.is_err() {
                            return;
                        }
                    } else if m.is_close() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// TLS backend for passthrough: optionally reads a PROXY v2 header first (reported on the
/// channel), then answers one HTTP request with `passthrough-ok`.
pub async fn start_tls_backend(
    ca: &DevCa,
    name: &str,
    expect_proxy: bool,
) -> (SocketAddr, Vec<u8>, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chain, key) = ca.issue_der(&[name.to_string()]).unwrap();
    let cert_der = chain[0].to_vec();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if expect_proxy {
                    let mut head = [0u8; 16];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                    let mut rest = vec![0u8; len];
                    if s.read_exact(&mut rest).await.is_err() {
                        return;
                    }
                    let mut all = head.to_vec();
                    all.extend(rest);
                    let _ = tx.send(all).await;
                }
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\nconnection: close\r\n\r\npassthrough-ok")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, cert_der, rx)
}

/// A TLS client connection to the gateway for `host` trusting `ca`, with `alpn`.
pub async fn tls_connect(
    port: u16,
    host: &str,
    ca: &Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Polls until `f` returns true or `secs` pass.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}
