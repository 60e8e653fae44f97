//! `meshgate fleet import` against a real 3-member etcd: a standalone gateway's reservations,
//! tokens, challenge key, certificates and ACME account are copied (secrets sealed), a
//! second run copies nothing and overwrites nothing, and what it copied opens with the fleet
//! key as the fleet's gateways read it.

mod fleet_kit;

use fleet_kit::*;
use meshgate_certs::{CertBackend, CertStore};
use meshgate_config::route::Mode;
use meshgate_fleet::acme::{AcmeStoreOptions, EtcdCertBackend};
use meshgate_fleet::{Etcd, EtcdOptions, FleetKey, FleetKeys};
use meshgate_reservations::reservation::{Key, Options, Reservation};
use meshgate_reservations::store::ReservationStore;
use meshgate_reservations::store::redb::RedbStore;
use meshgate_reservations::token::StoredToken;
use meshgate_testkit::tls::TestCa;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const ACCOUNT: &str = r#"{"directory":"https://acme.test/dir","contact":"mailto:ops@farm.example","credentials":{"id":"https://acme.test/acct/1","key_pkcs8":"c2VjcmV0","directory":"https://acme.test/dir"}}"#;

/// A standalone gateway's data directory: two names, one token, a certificate and an account.
fn standalone_state(dir: &Path, leaf_chain: &str, leaf_key: &str) {
    let store = RedbStore::open(dir, FARM).unwrap();
    for name in ["shop", "blog"] {
        let r = Reservation::new(
            Key::name(name),
            &format!("alice@{FARM}"),
            vec![SocketAddr::from(([192, 0, 2, 1], 80))],
            Mode::Terminate,
            Options::default(),
            1,
        );
        store.create(&r, 10).unwrap();
    }
    store
        .insert_token(&StoredToken {
            id: "tok1".into(),
            owner: format!("alice@{FARM}"),
            hash: "00".repeat(32),
            created_at: 1,
        })
        .unwrap();
    let certs = CertStore::open(dir.join("certs")).unwrap();
    certs
        .save(&format!("shop.{FARM}"), leaf_chain, leaf_key)
        .unwrap();
    std::fs::write(dir.join("certs/account.json"), ACCOUNT).unwrap();
}

fn import(config: &Path, from: &Path) -> String {
    let (ok, out, err) = fleet_cli(&[
        "import",
        "--config",
        config.to_str().unwrap(),
        "--from",
        from.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_copies_state_certificates_and_account_once_and_never_overwrites() {
    let etcd = EtcdCluster::start(3).await;
    let root = tempfile::tempdir().unwrap();
    let key_file = root.path().join("fleet.key");
    write_fleet_key(&key_file);
    let standalone = root.path().join("standalone");
    let ca = TestCa::new("import test CA");
    let first = ca.issue(&[&format!("shop.{FARM}")]);
    standalone_state(&standalone, &first.chain_pem, &first.key_pem);

    let config = root.path().join("gateway.toml");
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    std::fs::write(
        &config,
        format!(
            "domains = [\"{FARM}\"]\ndata_dir = \"{}\"\n[fleet]\nname = \"{FLEET}\"\n\
             etcd = [{}]\nkey_file = \"{}\"\nadvertise = [\"127.0.0.1\"]\n",
            root.path().join("fleet-data").display(),
            endpoints.join(", "),
            key_file.display()
        ),
    )
    .unwrap();

    let out = import(&config, &standalone);
    assert!(
        out.contains("reservations: 2 copied, 0 already in etcd"),
        "{out}"
    );
    assert!(out.contains("tokens: 1 copied"), "{out}");
    assert!(out.contains("challenge key: copied (sealed)"), "{out}");
    assert!(
        out.contains(&format!(
            "certificates: 1 copied (sealed) (shop.{FARM}), 0 already"
        )),
        "{out}"
    );
    assert!(out.contains("ACME account: copied (sealed)"), "{out}");

    // Nothing secret in clear in etcd.
    let dump = etcd.dump(&format!("/meshgate/{FLEET}/"));
    assert!(dump.contains("BEGIN CERTIFICATE"), "{dump}");
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    assert!(!dump.contains("key_pkcs8"), "the account is sealed: {dump}");

    // The standalone gateway renews its certificate and changes its account before a
    // second import: etcd keeps what it has.
    let second = ca.issue(&[&format!("shop.{FARM}")]);
    CertStore::open(standalone.join("certs"))
        .unwrap()
        .save(&format!("shop.{FARM}"), &second.chain_pem, &second.key_pem)
        .unwrap();
    std::fs::write(
        standalone.join("certs/account.json"),
        ACCOUNT.replace("acct/1", "acct/2"),
    )
    .unwrap();
    let out = import(&config, &standalone);
    assert!(
        out.contains("reservations: 0 copied, 2 already in etcd (kept)"),
        "{out}"
    );
    assert!(out.contains("tokens: 0 copied, 1 kept"), "{out}");
    assert!(
        out.contains(&format!(
            "certificates: 0 copied (sealed), 1 already in etcd (kept) (shop.{FARM})"
        )),
        "{out}"
    );
    assert!(
        out.contains("ACME account: already in etcd (kept)"),
        "{out}"
    );

    // What etcd holds opens with the fleet key, as a fleet gateway reads it: the first
    // certificate and the first account.
    let client = Etcd::new(EtcdOptions::new(etcd.endpoints())).unwrap();
    let backend = EtcdCertBackend::new(
        client,
        &FleetKeys::new(FLEET).unwrap(),
        FleetKey::load(&key_file).unwrap(),
        CertStore::open(root.path().join("reader-cache")).unwrap(),
        AcmeStoreOptions {
            holder: "reader".into(),
            lock_ttl: Duration::from_secs(5),
            settle: Duration::ZERO,
        },
    );
    let stored = backend
        .load(&format!("shop.{FARM}"))
        .await
        .unwrap()
        .expect("the certificate is in etcd");
    assert_eq!(stored.chain_pem, first.chain_pem);
    assert_eq!(stored.key_pem, first.key_pem);
    assert_eq!(
        backend.read_account().await.unwrap().as_deref(),
        Some(ACCOUNT)
    );
}
