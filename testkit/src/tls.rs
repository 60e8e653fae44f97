//! TLS for tests: a throwaway CA for servers that are not the gateway (backends, Pebble's
//! HTTPS, an admin certificate), a TLS backend for passthrough, and TLS clients.
//!
//! The gateway's own dev CA lives in the product; this one only signs what the tests stand up
//! around it. Everything uses rustls with ring, like the gateway.

use crate::http::Served;
use crate::net;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA made for one test (in memory; write its certificate where a client needs a file).
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: rcgen::Certificate,
}

/// A certificate issued by a [`TestCa`], in DER (for rustls) and PEM (for files).
pub struct Leaf {
    /// Leaf first, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub chain_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A new CA whose subject is `CN=<common_name>`.
    pub fn new(common_name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            cert,
        }
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate as PEM to `path` (creating its directory).
    pub fn write_pem(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("CA directory");
        }
        std::fs::write(path, self.cert_pem()).expect("write CA PEM");
    }

    /// Roots trusting only this CA.
    pub fn roots(&self) -> RootCertStore {
        roots_of([self.cert_der()])
    }

    /// A leaf for `names` (DNS names or IP addresses), subject `CN=<first name>`.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *first);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            chain: vec![cert.der().clone(), self.cert_der()],
            key: PrivateKeyDer::try_from(key.serialize_der()).expect("leaf key DER"),
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem()),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Leaf {
    /// Writes the chain and the key (mode 0600) as PEM files.
    pub fn write_pem(&self, cert: &Path, key: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(cert, &self.chain_pem).expect("write certificate");
        std::fs::write(key, &self.key_pem).expect("write key");
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    }

    /// A rustls server config serving this certificate.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .expect("server certificate");
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// Roots trusting the certificates in a PEM file.
pub fn roots_from_pem_file(path: &Path) -> RootCertStore {
    let certs = CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .map(|c| c.expect("PEM certificate"));
    roots_of(certs)
}

/// Roots trusting exactly `certs`.
pub fn roots_of(certs: impl IntoIterator<Item = CertificateDer<'static>>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).expect("root certificate");
    }
    roots
}

/// A client config trusting `roots` and offering `alpn`.
pub fn client_config(roots: &RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// A TLS connection to `addr` with server name `sni`, trusting `roots`, offering `alpn`.
/// Errors (refused, handshake failure, untrusted certificate) are returned, not panicked on.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: &RootCertStore,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(client_config(roots, alpn))
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .expect("peer certificate")
}

/// Writes `msg` and expects it back (on a connection to an echo server).
pub async fn echo_roundtrip<S>(stream: &mut S, msg: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf).await.expect("read echo");
    assert_eq!(buf, msg);
}

/// GET `path` over HTTPS from `addr` (server name `127.0.0.1`), trusting `roots`; the body of
/// a 2xx answer (panics on anything else).
pub async fn https_get(addr: SocketAddr, path: &str, roots: &RootCertStore) -> String {
    use http_body_util::{BodyExt, Empty};
    let tls = tls_connect(addr, &addr.ip().to_string(), roots, &[])
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr}: {e}"));
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8 body")
}

/// A TLS backend for passthrough routes (see [`tls_backend`]).
pub struct TlsBackend {
    pub served: Served,
    /// The PROXY v2 header of each connection, when the backend expects one.
    pub proxy_headers: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

impl TlsBackend {
    pub fn addr(&self) -> SocketAddr {
        self.served.addr()
    }
}

/// A TLS backend serving `leaf`: reads a PROXY v2 header first when `expect_proxy` (sent on
/// [`TlsBackend::proxy_headers`]), then answers one HTTP request with `passthrough-ok`.
pub async fn tls_backend(leaf: &Leaf, expect_proxy: bool) -> TlsBackend {
    let acceptor = tokio_rustls::TlsAcceptor::from(leaf.server_config(&[]));
    let (l, _) = net::listener().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let served = crate::http::serve_tcp(l, move |mut s, _| {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        async move {
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
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\nconnection: close\r\n\r\npassthrough-ok",
                )
                .await;
            let _ = tls.shutdown().await;
        }
    });
    TlsBackend {
        served,
        proxy_headers: rx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tls_backend_serves_its_leaf_to_a_client_trusting_the_ca() {
        let ca = TestCa::new("kit test CA");
        let leaf = ca.issue(&["pass.test"]);
        let backend = tls_backend(&leaf, false).await;
        let mut tls = tls_connect(backend.addr(), "pass.test", &ca.roots(), &[b"http/1.1"])
            .await
            .expect("trusted");
        assert_eq!(peer_leaf(&tls), leaf.chain[0]);
        tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        let _ = tls.read_to_string(&mut answer).await;
        assert!(answer.ends_with("passthrough-ok"), "{answer}");
        // Another CA is not trusted.
        let other = TestCa::new("other");
        assert!(
            tls_connect(backend.addr(), "pass.test", &other.roots(), &[])
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn https_get_on_an_ip_certificate() {
        let ca = TestCa::new("kit test CA");
        let leaf = ca.issue(&["localhost", "127.0.0.1"]);
        let (l, addr) = net::listener().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(leaf.server_config(&[b"http/1.1"]));
        let _served = crate::http::serve_tcp(l, move |s, _| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(crate::http::full_body(
                        "root pem",
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            }
        });
        assert_eq!(https_get(addr, "/roots/0", &ca.roots()).await, "root pem");
    }
}
