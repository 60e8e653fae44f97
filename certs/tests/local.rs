//! Tests without an ACME server: the built-in DNS-01 responder, the development CA, the
//! resolver's exact/wildcard lookup, and the manager issuing from the dev CA.

mod common;

use common::*;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use meshgate_certs::{
    AcmeConfig, CertConfig, CertManager, CertMap, CertResolver, CertState, CertStore, DevCa,
};
use meshgate_testkit::eventually_async;
use meshgate_testkit::net::Reserved;
use rustls::pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

async fn query(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bytes = msg.to_vec().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        sock.send_to(&bytes, server).await.unwrap();
        let mut buf = [0u8; 2048];
        match tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => return Message::from_vec(&buf[..n]).unwrap(),
            _ => assert!(Instant::now() < deadline, "no DNS answer from {server}"),
        }
    }
}

/// A manager issuing from the development CA, without DNS responder or farmer domain.
fn dev_config(state: &std::path::Path) -> CertConfig {
    let mut config = CertConfig::new(state, AcmeConfig::new("local-dev-ca", ""));
    config.dns.listen = None;
    config
}

#[tokio::test]
async fn builtin_dns_responder_answers_only_the_challenge_zone() {
    init_tracing();
    let state = tempfile::tempdir().unwrap();
    // The manager binds the responder itself; the TCP port is held for it meanwhile.
    let reserved = Reserved::loopback();
    let server = reserved.addr();
    let mut config = dev_config(state.path());
    config.farmer_domain = Some("farm.test".into());
    config.dns.listen = Some(server);
    config.dns.ns_host = Some("gw.farm.test".into());
    let certs = CertManager::new(config).unwrap();
    let driver = certs.spawn();
    let zone = certs.dns_zone().unwrap();
    zone.add_txt("token-one").await;
    zone.add_txt("token-two").await;

    let r = query(server, "_acme-challenge.farm.test.", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    let mut txt: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
    txt.sort();
    assert_eq!(
        txt,
        vec!["token-one", "token-two"],
        "both wildcard-order values at once"
    );

    let r = query(server, "_acme-challenge.farm.test.", RecordType::NS).await;
    match &r.answers[..] {
        [a] => match &a.data {
            RData::NS(ns) => assert_eq!(ns.0.to_ascii(), "gw.farm.test."),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let r = query(server, "_acme-challenge.farm.test.", RecordType::SOA).await;
    assert!(
        matches!(&r.answers[0].data, RData::SOA(soa) if soa.mname.to_ascii() == "gw.farm.test.")
    );

    // Inside the zone but unknown: NXDOMAIN. Outside: REFUSED (not an open resolver).
    let r = query(server, "x._acme-challenge.farm.test.", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    for name in ["farm.test.", "www.example.com.", "test."] {
        let r = query(server, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
    }

    zone.clear_txt().await;
    let r = query(server, "_acme-challenge.farm.test.", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty(), "cleared challenge values are gone");
    driver.abort();
}

#[tokio::test]
async fn dev_ca_persists_and_issues_leaves_that_verify() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = DevCa::load_or_create(&ca_dir).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca_dir.join("ca.pem")), 0o600);
    let again = DevCa::load_or_create(&ca_dir).unwrap();
    assert_eq!(again.ca_pem(), ca.ca_pem(), "loaded, not recreated");

    // Leaves from the reloaded CA verify against the exported CA PEM (what curl --cacert uses).
    let resolver = Arc::new(CertResolver::default());
    let key = |name: &str| again.certified_key(&[name.to_string()]).unwrap();
    let mut certs = CertMap::from([
        ("demo.test".to_string(), key("demo.test")),
        ("*.apps.test".to_string(), key("*.apps.test")),
    ]);
    resolver.replace(certs.clone());
    let root = CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).unwrap();
    let addr = serve_resolver(resolver.clone()).await;
    tls_connect(addr, "demo.test", &root)
        .await
        .expect("exact name");
    tls_connect(addr, "web.apps.test", &root)
        .await
        .expect("wildcard");
    assert!(
        tls_connect(addr, "a.b.apps.test", &root).await.is_err(),
        "one label only"
    );
    assert!(
        tls_connect(addr, "other.test", &root).await.is_err(),
        "unknown name"
    );
    certs.remove("demo.test");
    resolver.replace(certs);
    assert!(
        tls_connect(addr, "demo.test", &root).await.is_err(),
        "removed live"
    );
}

async fn serve_resolver(resolver: Arc<CertResolver>) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(meshgate_certs::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (listener, addr) = meshgate_testkit::listener().await;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn manager_with_dev_ca_serves_only_desired_names() {
    init_tracing();
    let state = tempfile::tempdir().unwrap();
    let certs = CertManager::new(dev_config(state.path())).unwrap();
    let driver = certs.spawn();
    certs.set_desired(["a.test".to_string(), "b.test".to_string()]);
    wait_for(&certs, "dev issuance", 10, |c| {
        c.status().iter().all(|s| s.state == CertState::Valid) && c.status().len() == 2
    })
    .await;
    let resolver = certs.resolver();
    assert!(resolver.lookup("a.test").is_some());
    assert!(
        resolver.lookup("A.TEST.").is_some(),
        "case and trailing dot"
    );
    assert!(resolver.lookup("c.test").is_none());
    let root = CertificateDer::from_pem_slice(certs.dev_ca().unwrap().ca_pem().as_bytes()).unwrap();
    let addr = serve_resolver(resolver.clone()).await;
    tls_connect(addr, "b.test", &root)
        .await
        .expect("verifies against the dev CA");

    // A name leaving the desired set stops being served at once; the files stay.
    certs.set_desired(["a.test".to_string()]);
    assert!(resolver.lookup("b.test").is_none());
    assert!(tls_connect(addr, "b.test", &root).await.is_err());
    assert_eq!(certs.status().len(), 1);
    let store = CertStore::open(state.path()).unwrap();
    assert!(store.load("b.test").unwrap().is_some());
    assert_eq!(certs.orders_placed(), 2);
    driver.abort();
}

#[test]
fn names_are_checked_before_touching_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = CertStore::open(dir.path()).unwrap();
    for bad in [
        "../etc/passwd",
        "a/b.test",
        "",
        "a..test",
        "-a.test",
        "a b.test",
    ] {
        let err = store.save(bad, "x", "y").unwrap_err().to_string();
        assert!(err.contains("invalid name"), "{bad}: {err}");
    }
    assert!(
        std::fs::read_dir(dir.path().join("certs"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = dev_config(dir.path());
    config.acme.directory = "lets-encrypt".into();
    let err = CertManager::new(config).err().unwrap().to_string();
    assert!(
        err.contains("acme.directory") && err.contains("lets-encrypt"),
        "{err}"
    );
    let config = CertConfig::new(
        dir.path(),
        AcmeConfig::new("letsencrypt-staging", "ops@example.org"),
    );
    assert_eq!(
        config.acme.directory().unwrap(),
        meshgate_certs::Directory::Acme(
            "https://acme-staging-v02.api.letsencrypt.org/directory".into()
        )
    );
    assert_eq!(config.dns.listen, Some("0.0.0.0:53".parse().unwrap()));
    assert_eq!(config.acme.contact().unwrap(), "mailto:ops@example.org");

    let mut config = dev_config(dir.path());
    config.renewal.renew_at_fraction = 1.5;
    let err = CertManager::new(config).err().unwrap().to_string();
    assert!(err.contains("renewal.renew_at_fraction"), "{err}");
}

#[tokio::test]
async fn status_reports_an_expired_certificate_as_expired() {
    init_tracing();
    let state = tempfile::tempdir().unwrap();
    let certs = CertManager::new(dev_config(state.path())).unwrap();
    let driver = certs.spawn();
    certs.set_desired(["a.test".to_string()]);
    wait_for(&certs, "dev issuance", 10, |c| {
        c.status().iter().all(|s| s.state == CertState::Valid) && c.status().len() == 1
    })
    .await;
    driver.abort();
    let status = certs.status().remove(0);
    assert!(status.not_after.is_some() && status.renew_at.is_some());
    // The dev CA issues for 90 days: 91 days on, the certificate is past its not_after.
    let later = std::time::SystemTime::now() + Duration::from_secs(91 * 86400);
    let expired = certs.status_at(later).remove(0);
    assert_eq!(expired.state, CertState::Expired, "{expired:?}");
    assert_eq!(expired.not_after, status.not_after);
}

#[tokio::test]
async fn dns_bind_failure_is_retried_while_other_orders_go_on() {
    init_tracing();
    let state = tempfile::tempdir().unwrap();
    // Another process holds the DNS port.
    let blocker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    let mut config = dev_config(state.path());
    config.farmer_domain = Some("farm.test".into());
    config.dns.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    let certs = CertManager::new(config).unwrap();
    let driver = certs.spawn();
    certs.set_desired(["shop.test".to_string()]);
    wait_for(&certs, "issuance without the DNS responder", 10, |c| {
        c.status().len() == 2 && c.status().iter().all(|s| s.state == CertState::Valid)
    })
    .await;
    assert!(!driver.is_finished(), "the driver keeps running");

    // Once the port is free, a retry binds it.
    drop(blocker);
    eventually_async(
        Duration::from_secs(20),
        "the DNS responder to bind",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let r = query(server, "_acme-challenge.farm.test.", RecordType::SOA).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    driver.abort();
}
