//! ACME against a real Pebble: issuance with each challenge, fallback, renewal swap with an open
//! connection, failure reporting with backoff, bad contact, restart without orders, and no
//! order for an unreserved SNI.

mod common;

use common::*;
use meshgate_certs::{CertManager, CertState, CustomChallenge};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn san_names(leaf: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Issues `name` with the configured challenge and checks the served chain against Pebble's root.
async fn issue_and_verify(challenge: CustomChallenge, name: &str) {
    let mut env = Env::new(&[(name, LO)], None).await;
    let certs = CertManager::new(env.config(challenge)).unwrap();
    env.start_dns(&certs).await;
    let _gw = env.gateway(&certs, true).await;
    let driver = certs.spawn();
    certs.set_desired([name.to_string()]);
    wait_for(&certs, "issuance", 40, |c| {
        state_of(c, name) == Some(CertState::Valid)
    })
    .await;

    let root = env.pebble.issuing_root().await;
    let (mut tls, leaf) = tls_connect(env.tls_addr, name, &root)
        .await
        .expect("served chain verifies against Pebble's root");
    assert_eq!(san_names(&leaf), vec![name.to_string()]);
    echo(&mut tls, b"hello").await;
    assert_eq!(certs.orders_placed(), 1);
    assert_eq!(env.pebble.orders_received(), 1);

    // Key material on disk is private.
    let dir = env.state.path().join("certs").join(name);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(mode(&dir.join("cert.pem")), 0o600);
    assert_eq!(mode(&env.state.path().join("account.json")), 0o600);
    assert!(certs.status()[0].last_error.is_none());
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_a_verifiable_certificate() {
    issue_and_verify(CustomChallenge::Http01, "shop.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_a_verifiable_certificate() {
    issue_and_verify(CustomChallenge::TlsAlpn01, "alpn.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_issues_the_farmer_wildcard() {
    let mut env = Env::new(&[("farm.test", LO), ("web.farm.test", LO)], None).await;
    let mut config = env.config(CustomChallenge::Http01);
    config.farmer_domain = Some("farm.test".into());
    let certs = CertManager::new(config).unwrap();
    env.start_dns(&certs).await;
    // No HTTP-01 responder at all: only DNS-01 can succeed.
    let _gw = env.gateway(&certs, false).await;
    let driver = certs.spawn();
    // Names under the farmer domain ride on the wildcard; no order of their own.
    certs.set_desired(["web.farm.test".to_string(), "farm.test".to_string()]);
    wait_for(&certs, "wildcard issuance", 40, |c| {
        state_of(c, "*.farm.test") == Some(CertState::Valid)
    })
    .await;
    assert_eq!(certs.status().len(), 1, "{:?}", certs.status());
    let root = env.pebble.issuing_root().await;
    for sni in ["farm.test", "web.farm.test", "anything.farm.test"] {
        let (_, leaf) = tls_connect(env.tls_addr, sni, &root)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        let mut sans = san_names(&leaf);
        sans.sort();
        assert_eq!(
            sans,
            vec!["*.farm.test".to_string(), "farm.test".to_string()]
        );
    }
    // Nested names are not covered by `*.farm.test`.
    assert!(
        tls_connect(env.tls_addr, "a.b.farm.test", &root)
            .await
            .is_err()
    );
    assert_eq!(env.pebble.orders_received(), 1);
    assert!(
        env.state
            .path()
            .join("certs/_wildcard.farm.test/key.pem")
            .exists()
    );
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_tls_alpn01_when_http01_fails() {
    let name = "fallback.test";
    let mut env = Env::new(&[(name, LO)], None).await;
    let certs = CertManager::new(env.config(CustomChallenge::Http01)).unwrap();
    env.start_dns(&certs).await;
    // Port 80 is not answering: HTTP-01 fails, TLS-ALPN-01 on 443 works.
    let _gw = env.gateway(&certs, false).await;
    let driver = certs.spawn();
    certs.set_desired([name.to_string()]);
    wait_for(&certs, "fallback issuance", 60, |c| {
        state_of(c, name) == Some(CertState::Valid)
    })
    .await;
    assert_eq!(
        certs.orders_placed(),
        2,
        "one failed http-01 order, one tls-alpn-01 order"
    );
    let root = env.pebble.issuing_root().await;
    tls_connect(env.tls_addr, name, &root)
        .await
        .expect("verifies");
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_validity_renews_and_swaps_while_a_connection_stays_open() {
    let name = "renew.test";
    // 12 s certificates: renewal falls due at ~2/3 (7.4–8 s with jitter).
    let mut env = Env::new(&[(name, LO)], Some(12)).await;
    let certs = CertManager::new(env.config(CustomChallenge::Http01)).unwrap();
    env.start_dns(&certs).await;
    let _gw = env.gateway(&certs, true).await;
    let driver = certs.spawn();
    certs.set_desired([name.to_string()]);
    wait_for(&certs, "issuance", 40, |c| {
        state_of(c, name) == Some(CertState::Valid)
    })
    .await;
    let root = env.pebble.issuing_root().await;
    let (mut open, first) = tls_connect(env.tls_addr, name, &root).await.unwrap();
    echo(&mut open, b"before").await;

    wait_for(&certs, "automatic renewal", 20, |c| c.orders_placed() >= 2).await;
    wait_for(&certs, "renewed cert installed", 20, |c| {
        state_of(c, name) == Some(CertState::Valid)
    })
    .await;
    let (_, second) = tls_connect(env.tls_addr, name, &root).await.unwrap();
    assert_ne!(first, second, "new handshakes get the renewed certificate");
    // The connection opened before the swap is untouched.
    echo(&mut open, b"after the swap").await;

    // Forced renewal swaps again, with the same open connection still alive.
    assert!(certs.renew_now(name));
    wait_for(&certs, "forced renewal", 20, |c| c.orders_placed() >= 3).await;
    wait_for(&certs, "forced cert installed", 20, |c| {
        state_of(c, name) == Some(CertState::Valid)
    })
    .await;
    let (_, third) = tls_connect(env.tls_addr, name, &root).await.unwrap();
    assert_ne!(second, third);
    echo(&mut open, b"still open").await;
    assert!(
        !certs.renew_now("not-reserved.test"),
        "renew_now never adds names"
    );
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_challenge_reports_the_problem_and_backs_off() {
    let name = "dead.test";
    // The name resolves to an address where nothing answers :80 or :443.
    let mut env = Env::new(&[(name, Ipv4Addr::new(127, 0, 0, 9))], None).await;
    let certs = CertManager::new(env.config(CustomChallenge::Http01)).unwrap();
    env.start_dns(&certs).await;
    let _gw = env.gateway(&certs, true).await;
    let mut registry = prometheus_client::registry::Registry::default();
    certs.register_metrics(&mut registry);
    let driver = certs.spawn();
    let t0 = Instant::now();
    certs.set_desired([name.to_string()]);
    wait_for(&certs, "failure", 60, |c| {
        state_of(c, name) == Some(CertState::Failed)
    })
    .await;

    let status = certs.status().into_iter().find(|s| s.name == name).unwrap();
    let err = status.last_error.clone().unwrap();
    // Both challenges were tried, and the server's problem detail is reported.
    assert!(err.contains("Http01") && err.contains("TlsAlpn01"), "{err}");
    assert!(
        err.contains("urn:ietf:params:acme:error:connection"),
        "{err}"
    );
    assert!(err.contains("127.0.0.9"), "{err}");
    assert_eq!(status.failures, 1);
    assert!(status.next_retry.is_some());
    let json = serde_json::to_string(&status).unwrap();
    assert!(json.contains("\"state\":\"failed\""), "{json}");

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("meshgate_cert_orders_total{result=\"failure\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("meshgate_cert_renewal_failures{name=\"dead.test\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("problem_type=\"urn:ietf:params:acme:error:"),
        "{text}"
    );
    assert!(text.contains("connection refused"), "{text}");

    // Backoff (30 s initial): no new order while waiting. An order that must not happen
    // cannot be awaited; the driver gets 1.5 s in which it would have placed it.
    let placed = certs.orders_placed();
    assert_eq!(placed, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(certs.orders_placed(), placed);
    assert!(t0.elapsed() < Duration::from_secs(30));
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_contact_is_a_clear_error() {
    let env = Env::new(&[], None).await;
    // Rejected locally: not an address at all.
    let mut config = env.config(CustomChallenge::Http01);
    config.acme.contact_email = "ops team@example.com".into();
    let err = CertManager::new(config)
        .err()
        .expect("rejected")
        .to_string();
    assert!(
        err.contains("acme.contact_email") && err.contains("ops team@example.com"),
        "{err}"
    );

    // Rejected by the ACME server: the problem type and detail come back.
    let mut config = env.config(CustomChallenge::Http01);
    config.acme.contact_email = "not-an-email-address".into();
    let certs = CertManager::new(config).unwrap();
    let err = certs.connect_account().await.unwrap_err().to_string();
    assert!(err.contains("mailto:not-an-email-address"), "{err}");
    assert!(
        err.contains("urn:ietf:params:acme:error:invalidContact"),
        "{err}"
    );
    assert!(
        !env.state.path().join("account.json").exists(),
        "no account stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_stored_certificates_without_ordering() {
    let name = "restart.test";
    let mut env = Env::new(&[(name, LO)], None).await;
    let first = CertManager::new(env.config(CustomChallenge::Http01)).unwrap();
    env.start_dns(&first).await;
    let gw = env.gateway(&first, true).await;
    let driver = first.spawn();
    first.set_desired([name.to_string()]);
    wait_for(&first, "issuance", 40, |c| {
        state_of(c, name) == Some(CertState::Valid)
    })
    .await;
    let root = env.pebble.issuing_root().await;
    let (_, issued) = tls_connect(env.tls_addr, name, &root).await.unwrap();
    driver.abort();
    gw.stop().await;
    drop(first);
    assert_eq!(env.pebble.orders_received(), 1);

    // "Restart": a new manager on the same state directory.
    let second = CertManager::new(env.config(CustomChallenge::Http01)).unwrap();
    let _gw = env.gateway(&second, true).await;
    let driver = second.spawn();
    second.set_desired([name.to_string()]);
    assert_eq!(state_of(&second, name), Some(CertState::Valid));
    // No order must follow: the driver gets a second in which it would have placed one.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, served) = tls_connect(env.tls_addr, name, &root).await.unwrap();
    assert_eq!(served, issued, "the stored certificate is served");
    assert_eq!(second.orders_placed(), 0);
    assert_eq!(
        env.pebble.orders_received(),
        1,
        "Pebble received no new order"
    );
    // The stored account was reused: Pebble saw one registration only.
    assert_eq!(env.pebble.log_text().matches("POST /sign-me-up").count(), 1);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreserved_sni_triggers_no_order() {
    let mut env = Env::new(&[("reserved.test", LO), ("stranger.test", LO)], None).await;
    let certs = CertManager::new(env.config(CustomChallenge::TlsAlpn01)).unwrap();
    env.start_dns(&certs).await;
    let _gw = env.gateway(&certs, true).await;
    let driver = certs.spawn();
    certs.set_desired(["reserved.test".to_string()]);
    wait_for(&certs, "issuance", 40, |c| {
        state_of(c, "reserved.test") == Some(CertState::Valid)
    })
    .await;
    let root = env.pebble.issuing_root().await;
    for _ in 0..3 {
        assert!(
            tls_connect(env.tls_addr, "stranger.test", &root)
                .await
                .is_err()
        );
    }
    // No order must follow: the driver gets half a second in which it would have placed one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(certs.orders_placed(), 1);
    assert_eq!(env.pebble.orders_received(), 1);
    assert_eq!(certs.status().len(), 1);
    driver.abort();
}
