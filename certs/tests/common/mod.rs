//! Harness of the certificate tests: the test kit's Pebble (ACME test server) and DNS server on
//! loopback, answering the test names and the DNS-01 zone, and the gateway-side responders
//! (:80-style HTTP-01 server, :443-style TLS server with `acme-tls/1` handling) on listeners
//! bound before Pebble learns their ports.
#![allow(dead_code)]

use meshgate_certs::{AcmeConfig, CertConfig, CertManager, CertState, CustomChallenge};
use meshgate_testkit::acme::{serve_http01, serve_tls};
use meshgate_testkit::dns::{DnsSockets, TestDns};
use meshgate_testkit::eventually_ok;
use meshgate_testkit::net::{Reserved, rebind};
use meshgate_testkit::tls::{echo_roundtrip, peer_leaf, roots_of};
use rustls_pki_types::CertificateDer;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub use meshgate_testkit::pebble::{Pebble, PebbleOptions};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "meshgate_certs=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The gateway side: HTTP-01 (when asked for) and TLS (resolver + `acme-tls/1`) for a manager.
pub struct Gateway {
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
    /// Serves HTTP-01 for `certs` on `http` (when given) and TLS on `tls` (echoing).
    pub fn start(certs: &CertManager, http: Option<TcpListener>, tls: TcpListener) -> Gateway {
        let mut tasks = Vec::new();
        if let Some(listener) = http {
            let c = certs.clone();
            tasks.push(serve_http01(
                listener,
                move |t| c.http01_response(t),
                Arc::default(),
            ));
        }
        let c = certs.clone();
        tasks.push(serve_tls(tls, certs.server_config(Vec::new()), move || {
            c.tls_alpn01_config()
        }));
        Gateway { tasks }
    }

    /// Stops serving and returns once the listeners are closed (their ports can be bound again).
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

/// A TLS client that trusts only `root`: connects to `addr` with `sni` and returns the stream
/// and the served leaf certificate.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    root: &CertificateDer<'static>,
) -> std::io::Result<(
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
)> {
    let tls = meshgate_testkit::tls::tls_connect(addr, sni, &roots_of([root.clone()]), &[]).await?;
    let leaf = peer_leaf(&tls);
    Ok((tls, leaf))
}

/// Echo round trip on an established connection.
pub async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    echo_roundtrip(tls, msg).await
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
    eventually_ok(Duration::from_secs(secs), what, || {
        let result = if cond(certs) {
            Ok(())
        } else {
            Err(format!("status: {:#?}", certs.status()))
        };
        async move { result }
    })
    .await
}

pub fn state_of(certs: &CertManager, name: &str) -> Option<CertState> {
    certs
        .status()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.state)
}

/// Everything one ACME test needs. The ports Pebble validates on are held from the start:
/// a gateway listens on them, or (HTTP-01 not served) they refuse connections.
pub struct Env {
    pub pebble: Pebble,
    dns_sockets: Option<DnsSockets>,
    pub dns: Option<TestDns>,
    pub records: Vec<(String, Ipv4Addr)>,
    pub http_addr: SocketAddr,
    pub tls_addr: SocketAddr,
    http: Option<Reserved>,
    tls: Option<Reserved>,
    pub state: tempfile::TempDir,
}

impl Env {
    /// Starts Pebble; DNS for it comes from [`Env::start_dns`] (test names' A records).
    pub async fn new(records: &[(&str, Ipv4Addr)], validity_secs: Option<u64>) -> Env {
        init_tracing();
        let (http, tls) = (Reserved::loopback(), Reserved::loopback());
        let dns_sockets = DnsSockets::bind().await;
        let pebble = Pebble::start(PebbleOptions {
            http_port: http.port(),
            tls_port: tls.port(),
            dns: dns_sockets.addr(),
            validity_secs,
        })
        .await;
        Env {
            pebble,
            dns_sockets: Some(dns_sockets),
            dns: None,
            records: records.iter().map(|(n, ip)| (n.to_string(), *ip)).collect(),
            http_addr: http.addr(),
            tls_addr: tls.addr(),
            http: Some(http),
            tls: Some(tls),
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// Serves the test names' A records and, for DNS-01, the manager's challenge zone.
    pub async fn start_dns(&mut self, certs: &CertManager) {
        let sockets = self.dns_sockets.take().expect("DNS started once");
        let zones = certs
            .dns_zone()
            .map(|z| (z.origin().clone(), z.zone_handler()))
            .into_iter()
            .collect();
        let dns = TestDns::serve(sockets, "test.", zones).await;
        for (name, ip) in &self.records {
            dns.a(name, &[*ip]).await;
        }
        self.dns = Some(dns);
    }

    /// Serves `certs` on the validation ports: TLS always, HTTP-01 when `http` (otherwise that
    /// port refuses connections). A second gateway (after [`Gateway::stop`]) binds them again.
    pub async fn gateway(&mut self, certs: &CertManager, http: bool) -> Gateway {
        let http = match (http, self.http.take()) {
            (false, reserved) => {
                self.http = reserved;
                None
            }
            (true, Some(reserved)) => Some(reserved.listen()),
            (true, None) => Some(rebind(self.http_addr).await),
        };
        let tls = match self.tls.take() {
            Some(reserved) => reserved.listen(),
            None => rebind(self.tls_addr).await,
        };
        Gateway::start(certs, http, tls)
    }

    pub fn config(&self, challenge: CustomChallenge) -> CertConfig {
        config(self.state.path(), &self.pebble, challenge)
    }
}
