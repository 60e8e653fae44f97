//! Test harness: a real Pebble (ACME test server) on loopback, a real DNS server (hickory,
//! in process) answering the test names and the DNS-01 zone, and the gateway-side responders
//! (:80-style HTTP-01 server, :443-style TLS server with `acme-tls/1` handling).
#![allow(dead_code)]

use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, NS, SOA};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, ZoneHandler, ZoneType};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshgate_certs::{
    AcmeConfig, CertConfig, CertManager, CertState, CustomChallenge, DevCa, DnsServer,
    offers_acme_tls, serve_dns,
};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "meshgate_certs=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A Pebble process, killed when dropped.
pub struct Pebble {
    child: Child,
    pub dir: tempfile::TempDir,
    pub directory_url: String,
    pub management: SocketAddr,
    /// PEM root that signs Pebble's own HTTPS certificate (for `acme.ca_root`).
    pub https_root: PathBuf,
    pub log: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct PebbleOptions {
    pub http_port: u16,
    pub tls_port: u16,
    pub dns: SocketAddr,
    /// Certificate lifetime in seconds (Pebble's `certificateValidityPeriod`).
    pub validity_secs: Option<u64>,
}

impl Pebble {
    pub async fn start(opts: PebbleOptions) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        // Pebble's HTTPS certificate, from a throwaway CA made with rcgen.
        let ca = DevCa::load_or_create(dir.path().join("https-ca")).expect("https CA");
        let leaf = ca
            .issue(
                &["localhost".to_string(), "127.0.0.1".to_string()],
                Duration::from_secs(86400),
            )
            .expect("https leaf");
        std::fs::write(dir.path().join("cert.pem"), &leaf.chain_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).unwrap();
        let (acme_port, mgmt_port) = (free_port(), free_port());
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": opts.http_port,
                "tlsPort": opts.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        if let Some(v) = opts.validity_secs {
            config["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.path().join("pebble.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("/usr/bin/pebble");
        // Pebble dies with the test process even when that is killed outright.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        #[allow(unsafe_code)]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(opts.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("pebble is installed (scripts/install-test-deps.sh)");
        let pebble = Pebble {
            child,
            https_root: ca.ca_pem_path(),
            directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
            management: SocketAddr::from((Ipv4Addr::LOCALHOST, mgmt_port)),
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [acme_port, mgmt_port] {
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "pebble did not start: {}",
                    pebble.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        pebble
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Orders Pebble received, counted from its own log.
    pub fn orders_received(&self) -> usize {
        self.log_text().matches("POST /order-plz").count()
    }

    /// Pebble's issuing root (`/roots/0` on the management interface).
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let pem = https_get(self.management, "/roots/0", &self.https_root).await;
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("root PEM")
    }
}

/// GET over HTTPS with hyper, trusting `root_pem` only.
pub async fn https_get(addr: SocketAddr, path: &str, root_pem: &Path) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(root_pem).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(meshgate_certs::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// A zone answering `name A ip` for test names (what a real resolver would say about them).
pub fn a_zone(origin: &str, records: &[(&str, Ipv4Addr)]) -> (Name, Arc<dyn ZoneHandler>) {
    let origin = Name::from_ascii(origin).unwrap();
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let ns = Name::from_ascii("ns.test.").unwrap();
    let soa = SOA::new(
        ns.clone(),
        Name::from_ascii("hostmaster.test.").unwrap(),
        1,
        60,
        60,
        60,
        5,
    );
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1));
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::NS(NS(ns))), 1));
    for (name, ip) in records {
        let name = Name::from_ascii(format!("{name}.")).unwrap();
        assert!(zone.upsert_mut(Record::from_rdata(name, 60, RData::A(A(*ip))), 1));
    }
    (origin, Arc::new(zone))
}

/// The gateway side: HTTP-01 on `http_port`, TLS (resolver + `acme-tls/1`) on `tls_port`.
pub struct Gateway {
    pub http_port: u16,
    pub tls_port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    pub fn ports() -> (u16, u16) {
        (free_port(), free_port())
    }

    /// Serves HTTP-01 (unless `http` is false) and TLS for `certs` on the given ports.
    pub async fn start(certs: &CertManager, http_port: u16, tls_port: u16, http: bool) -> Gateway {
        let mut tasks = Vec::new();
        if http {
            let listener = bind(http_port).await;
            let certs = certs.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let certs = certs.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let body = req
                                    .uri()
                                    .path()
                                    .strip_prefix("/.well-known/acme-challenge/")
                                    .and_then(|t| certs.http01_response(t));
                                async move {
                                    let resp = match body {
                                        Some(b) => hyper::Response::new(Full::new(Bytes::from(b))),
                                        None => hyper::Response::builder()
                                            .status(404)
                                            .body(Full::new(Bytes::new()))
                                            .unwrap(),
                                    };
                                    Ok::<_, std::convert::Infallible>(resp)
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
        }
        let listener = bind(tls_port).await;
        let certs = certs.clone();
        tasks.push(tokio::spawn(async move {
            let normal = certs.server_config(Vec::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (certs, normal) = (certs.clone(), normal.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        stream,
                    );
                    let Ok(start) = acceptor.await else { return };
                    let config = if offers_acme_tls(&start.client_hello()) {
                        certs.tls_alpn01_config()
                    } else {
                        normal
                    };
                    let Ok(mut tls) = start.into_stream(config).await else {
                        return;
                    };
                    // Echo, so a test can tell a connection is still alive.
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        Gateway {
            http_port,
            tls_port,
            tasks,
        }
    }
}

/// Binds a loopback port, waiting briefly for a previous (aborted) listener to let go.
async fn bind(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
}

/// A TLS client that trusts only `root`: connects with `sni` and returns the stream and the
/// served leaf certificate.
pub async fn tls_connect(
    port: u16,
    sni: &str,
    root: &CertificateDer<'static>,
) -> Result<
    (
        tokio_rustls::client::TlsStream<TcpStream>,
        CertificateDer<'static>,
    ),
    std::io::Error,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(meshgate_certs::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .expect("peer certificate");
    Ok((tls, leaf))
}

/// Echo round trip on an established connection.
pub async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

pub fn config(state_dir: &Path, pebble: &Pebble, challenge: CustomChallenge) -> CertConfig {
    let mut acme = AcmeConfig::new(pebble.directory_url.clone(), "ops@meshgate.test");
    acme.ca_root = Some(pebble.https_root.clone());
    acme.challenge = challenge;
    acme.order_timeout_secs = 30.0;
    let mut config = CertConfig::new(state_dir, acme);
    config.dns.listen = None;
    config.renewal.backoff_initial_secs = 30.0;
    config.renewal.backoff_max_secs = 300.0;
    config
}

/// Waits until `cond` holds on the manager's status, or panics with the status.
pub async fn wait_for(
    certs: &CertManager,
    what: &str,
    secs: u64,
    cond: impl Fn(&CertManager) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond(certs) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {:#?}",
            certs.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn state_of(certs: &CertManager, name: &str) -> Option<CertState> {
    certs
        .status()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.state)
}

/// Everything one ACME test needs.
pub struct Env {
    pub pebble: Pebble,
    pub dns_port: u16,
    pub dns: Option<DnsServer>,
    pub records: Vec<(String, Ipv4Addr)>,
    pub http_port: u16,
    pub tls_port: u16,
    pub state: tempfile::TempDir,
}

impl Env {
    /// Starts Pebble; DNS for it comes from [`Env::start_dns`] (test names' A records).
    pub async fn new(records: &[(&str, Ipv4Addr)], validity_secs: Option<u64>) -> Env {
        init_tracing();
        let (http_port, tls_port) = Gateway::ports();
        let dns_port = free_port();
        let pebble = Pebble::start(PebbleOptions {
            http_port,
            tls_port,
            dns: SocketAddr::from((Ipv4Addr::LOCALHOST, dns_port)),
            validity_secs,
        })
        .await;
        Env {
            pebble,
            dns_port,
            dns: None,
            records: records.iter().map(|(n, ip)| (n.to_string(), *ip)).collect(),
            http_port,
            tls_port,
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// Serves the test names' A records and, for DNS-01, the manager's challenge zone.
    pub async fn start_dns(&mut self, certs: &CertManager) {
        let recs: Vec<(&str, Ipv4Addr)> = self
            .records
            .iter()
            .map(|(n, ip)| (n.as_str(), *ip))
            .collect();
        let mut zones = vec![a_zone("test.", &recs)];
        if let Some(z) = certs.dns_zone() {
            zones.push((z.origin().clone(), z.zone_handler()));
        }
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.dns_port));
        self.dns = Some(serve_dns(listen, zones).await.unwrap());
    }

    pub fn config(&self, challenge: CustomChallenge) -> CertConfig {
        config(self.state.path(), &self.pebble, challenge)
    }
}
