//! (fleet_acme) ACME once per fleet, against a real 3-member etcd cluster and Pebble: three certificate
//! managers ("gateways", each with its own loopback address and listeners) share one etcd
//! backend. One order for a name wanted by all three; validations answered by a gateway that
//! does not hold the lock (HTTP-01, TLS-ALPN-01, DNS-01); a lock lost before commit stores
//! nothing; no private key in clear in etcd.

use meshgate_certs::{
    AcmeConfig, CertBackend, CertConfig, CertManager, CertState, CertStore, CustomChallenge,
    LockAttempt,
};
use meshgate_fleet::acme::{AcmeStoreOptions, EtcdCertBackend, follow_challenges};
use meshgate_fleet::{Etcd, EtcdOptions, FleetKey, FleetKeys};
use meshgate_testkit::acme::{serve_http01, serve_tls};
use meshgate_testkit::dns::{DnsSockets, TestDns};
use meshgate_testkit::etcd::EtcdCluster;
use meshgate_testkit::eventually_ok;
use meshgate_testkit::net::{common_listeners, member_ip};
use meshgate_testkit::pebble::{Pebble, PebbleOptions};
use meshgate_testkit::tls::{peer_leaf, roots_of};
use rustls_pki_types::CertificateDer;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "meshgate_certs=info,meshgate_fleet=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A gateway of the fleet: a certificate manager on the shared etcd backend, its challenge
/// follower, and (when listening) HTTP-01 and TLS listeners on its own address.
struct Gw {
    certs: CertManager,
    backend: EtcdCertBackend,
    addr: Ipv4Addr,
    http_hits: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
    driver: Option<JoinHandle<Result<(), meshgate_certs::CertError>>>,
    _state: tempfile::TempDir,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
        if let Some(d) = &self.driver {
            d.abort();
        }
    }
}

impl Gw {
    fn start_driver(&mut self) {
        self.driver = Some(self.certs.spawn());
    }

    fn serves(&self, name: &str) -> bool {
        self.certs
            .status()
            .iter()
            .any(|s| s.name == name && s.state == CertState::Valid)
    }
}

struct Fleet {
    etcd_cluster: EtcdCluster,
    etcd: Etcd,
    keys: FleetKeys,
    fleet_key: FleetKey,
    pebble: Pebble,
    dns_sockets: Option<DnsSockets>,
    dns: Option<TestDns>,
    tls_port: u16,
    http: Vec<Option<TcpListener>>,
    tls: Vec<Option<TcpListener>>,
}

impl Fleet {
    async fn new() -> Fleet {
        Self::with_validity(None).await
    }

    /// A fleet whose certificates from Pebble last `validity_secs`.
    async fn with_validity(validity_secs: Option<u64>) -> Fleet {
        init_tracing();
        let etcd_cluster = EtcdCluster::start(3).await;
        let etcd = Etcd::new(EtcdOptions::new(etcd_cluster.endpoints())).unwrap();
        let (http_port, http) = common_listeners(3);
        let (tls_port, tls) = common_listeners(3);
        let dns_sockets = DnsSockets::bind().await;
        let pebble = Pebble::start(PebbleOptions {
            http_port,
            tls_port,
            dns: dns_sockets.addr(),
            validity_secs,
        })
        .await;
        Fleet {
            etcd_cluster,
            etcd,
            keys: FleetKeys::new("farm").unwrap(),
            fleet_key: FleetKey::generate(),
            pebble,
            dns_sockets: Some(dns_sockets),
            dns: None,
            tls_port,
            http: http.into_iter().map(Some).collect(),
            tls: tls.into_iter().map(Some).collect(),
        }
    }

    fn config(&self, state: &std::path::Path, challenge: CustomChallenge) -> CertConfig {
        let mut acme = AcmeConfig::new(self.pebble.directory_url.clone(), "ops@meshgate.test");
        acme.ca_root = Some(self.pebble.https_root.clone());
        acme.challenge = challenge;
        acme.order_timeout_secs = 40.0;
        let mut config = CertConfig::new(state, acme);
        config.dns.listen = None;
        config.renewal.backoff_initial_secs = 60.0;
        config
    }

    /// Gateway `i` (address 127.0.0.{i+2}); listening on the validation ports when `listen`.
    fn gateway(
        &mut self,
        i: usize,
        challenge: CustomChallenge,
        farmer: Option<&str>,
        listen: bool,
    ) -> Gw {
        let state = tempfile::tempdir().unwrap();
        let mut config = self.config(state.path(), challenge);
        config.farmer_domain = farmer.map(str::to_string);
        let backend = EtcdCertBackend::new(
            self.etcd.clone(),
            &self.keys,
            self.fleet_key.clone(),
            CertStore::open(state.path().join("fleet-cache")).unwrap(),
            AcmeStoreOptions {
                holder: format!("gw-{i}"),
                lock_ttl: Duration::from_secs(3),
                settle: Duration::from_millis(300),
            },
        );
        let certs = CertManager::with_backend(config, Arc::new(backend.clone())).unwrap();
        let mut tasks = vec![
            backend.follow(),
            follow_challenges(&self.etcd, backend.keys(), certs.clone()),
        ];
        let http_hits = Arc::new(AtomicU64::new(0));
        if listen {
            let http = self.http[i].take().expect("listeners taken once");
            let tls = self.tls[i].take().expect("listeners taken once");
            tasks.extend(serve(&certs, http, tls, http_hits.clone()));
        }
        Gw {
            certs,
            backend,
            addr: member_ip(i),
            http_hits,
            tasks,
            driver: None,
            _state: state,
        }
    }

    /// Pebble's DNS: `records` (name → address) and `gw`'s DNS-01 challenge zone.
    async fn start_dns(&mut self, records: &[(&str, Vec<Ipv4Addr>)], zone_of: Option<&Gw>) {
        let zones = zone_of
            .and_then(|g| g.certs.dns_zone())
            .map(|z| (z.origin().clone(), z.zone_handler()))
            .into_iter()
            .collect();
        let dns = TestDns::serve(self.dns_sockets.take().unwrap(), "test.", zones).await;
        for (name, addrs) in records {
            dns.a(name, addrs).await;
        }
        self.dns = Some(dns);
    }

    /// The holder recorded in etcd for `name`'s order lock, if locked.
    async fn lock_holder(&self, name: &str) -> Option<String> {
        let key = format!("{}locks/{name}", self.keys.acme());
        self.etcd
            .get(&key)
            .await
            .unwrap()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }
}

/// HTTP-01 on `http` (counting requests) and TLS (the resolver, or `acme-tls/1`) on `tls`.
fn serve(
    certs: &CertManager,
    http: TcpListener,
    tls: TcpListener,
    hits: Arc<AtomicU64>,
) -> Vec<JoinHandle<()>> {
    let (c, a) = (certs.clone(), certs.clone());
    vec![
        serve_http01(http, move |t| c.http01_response(t), hits),
        serve_tls(tls, certs.server_config(Vec::new()), move || {
            a.tls_alpn01_config()
        }),
    ]
}

async fn served_leaf(addr: SocketAddr, sni: &str, root: &CertificateDer<'static>) -> Vec<u8> {
    let tls = meshgate_testkit::tls::tls_connect(addr, sni, &roots_of([root.clone()]), &[])
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr} for {sni}: {e}"));
    peer_leaf(&tls).to_vec()
}

fn serial(leaf: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    cert.raw_serial_as_string()
}

async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let mut check = || if cond() { Ok(()) } else { Err(String::new()) };
    let mut last = Err(String::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        last = check();
        if last.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {secs} s ({last:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_wanting_one_certificate_place_one_order_and_serve_one_serial() {
    let mut fleet = Fleet::new().await;
    let name = "shop.test";
    let gws: Vec<Gw> = (0..3)
        .map(|i| fleet.gateway(i, CustomChallenge::Http01, None, true))
        .collect();
    fleet
        .start_dns(&[(name, gws.iter().map(|g| g.addr).collect())], None)
        .await;
    let mut gws = gws;
    for g in &mut gws {
        g.certs.set_desired([name.to_string()]);
    }
    for g in &mut gws {
        g.start_driver();
    }
    wait_until("all three serve the certificate", 60, || {
        gws.iter().all(|g| g.serves(name))
    })
    .await;
    assert_eq!(fleet.pebble.orders_received(), 1, "Pebble saw one order");
    let placed: u64 = gws.iter().map(|g| g.certs.orders_placed()).sum();
    assert_eq!(placed, 1);
    let root = fleet.pebble.issuing_root().await;
    let mut serials = Vec::new();
    for g in &gws {
        let leaf = served_leaf(SocketAddr::new(g.addr.into(), fleet.tls_port), name, &root).await;
        serials.push(serial(&leaf));
    }
    assert!(serials.iter().all(|s| *s == serials[0]), "{serials:?}");

    // etcd holds the certificate with its key sealed: no PEM private key in clear.
    let dump = fleet.etcd_cluster.dump("/meshgate/");
    assert!(dump.contains("BEGIN CERTIFICATE"), "the chain is stored");
    assert!(
        !dump.contains("PRIVATE KEY"),
        "no private key in clear in etcd"
    );
    // No lock or order is left behind.
    assert_eq!(fleet.lock_holder(name).await, None);
    assert!(!dump.contains("/acme/orders/"), "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_starting_without_an_account_register_one_and_all_use_it() {
    let mut fleet = Fleet::new().await;
    let gws: Vec<Gw> = (0..3)
        .map(|i| fleet.gateway(i, CustomChallenge::Http01, None, false))
        .collect();
    // All three connect at the same moment, with no account stored anywhere.
    let (a, b, c) = tokio::join!(
        gws[0].certs.account_id(),
        gws[1].certs.account_id(),
        gws[2].certs.account_id()
    );
    let ids = [a.unwrap(), b.unwrap(), c.unwrap()];
    assert_eq!(
        fleet.pebble.accounts_registered(),
        1,
        "Pebble registered one account:\n{}",
        fleet.pebble.log_text()
    );
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    // Stored sealed, and the lock is released.
    let dump = fleet.etcd_cluster.dump("/meshgate/");
    assert!(dump.contains("/acme/account"), "{dump}");
    assert!(
        !dump.contains("credentials"),
        "the account is sealed:\n{dump}"
    );
    assert!(!dump.contains("PRIVATE KEY"));
    eventually_ok(Duration::from_secs(10), "the account lock released", || {
        let f = &fleet;
        async move {
            match f.lock_holder("@account").await {
                None => Ok(()),
                Some(h) => Err(h),
            }
        }
    })
    .await;
    // A gateway joining later uses the stored account too.
    let late = fleet.gateway(0, CustomChallenge::Http01, None, false);
    assert_eq!(late.certs.account_id().await.unwrap(), ids[0]);
    assert_eq!(fleet.pebble.accounts_registered(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_once_for_the_fleet_and_served_by_all() {
    // 30 s certificates: renewal falls due at about 2/3 of that on every gateway.
    let mut fleet = Fleet::with_validity(Some(30)).await;
    let name = "renew.test";
    let mut gws: Vec<Gw> = (0..3)
        .map(|i| fleet.gateway(i, CustomChallenge::Http01, None, true))
        .collect();
    fleet
        .start_dns(&[(name, gws.iter().map(|g| g.addr).collect())], None)
        .await;
    for g in &mut gws {
        g.certs.set_desired([name.to_string()]);
        g.start_driver();
    }
    wait_until("all three serve the certificate", 60, || {
        gws.iter().all(|g| g.serves(name))
    })
    .await;
    assert_eq!(fleet.pebble.orders_received(), 1);
    let root = fleet.pebble.issuing_root().await;
    let serials = |fleet: &Fleet, gws: &[Gw]| {
        let root = root.clone();
        let port = fleet.tls_port;
        let addrs: Vec<_> = gws.iter().map(|g| g.addr).collect();
        async move {
            let mut out = Vec::new();
            for a in addrs {
                out.push(serial(
                    &served_leaf(SocketAddr::new(a.into(), port), name, &root).await,
                ));
            }
            out
        }
    };
    let first = serials(&fleet, &gws).await;
    assert!(first.iter().all(|s| *s == first[0]), "{first:?}");

    // Renewed once, and every gateway serves the renewed certificate.
    let renewed = eventually_ok(
        Duration::from_secs(45),
        "all serve a renewed serial",
        || {
            let (fleet, gws, first) = (&fleet, &gws, &first[0]);
            async move {
                let now = serials(fleet, gws).await;
                if now.iter().all(|s| s != first && *s == now[0]) {
                    Ok(now)
                } else {
                    Err(format!("{now:?}"))
                }
            }
        },
    )
    .await;
    assert_eq!(
        fleet.pebble.orders_received(),
        2,
        "one issuance and one renewal for the fleet ({renewed:?})"
    );
    let placed: u64 = gws.iter().map(|g| g.certs.orders_placed()).sum();
    assert_eq!(placed, 2, "orders placed by the three gateways together");
}

/// The lock holder has no listeners at all; the name resolves to another gateway, which
/// answers the challenge it learned from etcd.
async fn validation_reaches_a_gateway_without_the_lock(challenge: CustomChallenge, name: &str) {
    let mut fleet = Fleet::new().await;
    let mut holder = fleet.gateway(0, challenge, None, false);
    let other = fleet.gateway(1, challenge, None, true);
    fleet.start_dns(&[(name, vec![other.addr])], None).await;
    holder.certs.set_desired([name.to_string()]);
    holder.start_driver();
    wait_until("the holder's order completes", 60, || holder.serves(name)).await;
    assert_eq!(holder.certs.orders_placed(), 1);
    assert_eq!(other.certs.orders_placed(), 0);
    assert_eq!(fleet.pebble.orders_received(), 1);
    if challenge == CustomChallenge::Http01 {
        assert!(
            other.http_hits.load(Ordering::Relaxed) > 0,
            "Pebble asked the other gateway"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_validation_reaches_a_gateway_without_the_lock() {
    validation_reaches_a_gateway_without_the_lock(CustomChallenge::Http01, "http.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_validation_reaches_a_gateway_without_the_lock() {
    validation_reaches_a_gateway_without_the_lock(CustomChallenge::TlsAlpn01, "alpn.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_validation_reaches_a_gateway_without_the_lock() {
    let mut fleet = Fleet::new().await;
    let farm = "farm.test";
    let mut holder = fleet.gateway(0, CustomChallenge::Http01, Some(farm), false);
    let mut other = fleet.gateway(1, CustomChallenge::Http01, Some(farm), false);
    // Pebble's DNS serves the *other* gateway's challenge zone only.
    fleet
        .start_dns(&[(farm, vec![other.addr])], Some(&other))
        .await;
    holder.start_driver();
    let wildcard = format!("*.{farm}");
    eventually_ok(Duration::from_secs(20), "the holder takes the lock", || {
        let f = &fleet;
        let w = wildcard.clone();
        async move {
            match f.lock_holder(&w).await {
                Some(h) if h == "gw-0" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    // The other gateway wants the wildcard too: it waits for the holder's certificate.
    other.start_driver();
    wait_until("both serve the wildcard", 60, || {
        holder.serves(&wildcard) && other.serves(&wildcard)
    })
    .await;
    assert_eq!(holder.certs.orders_placed(), 1);
    assert_eq!(other.certs.orders_placed(), 0);
    assert_eq!(fleet.pebble.orders_received(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lock_lapsed_cannot_commit() {
    let mut fleet = Fleet::new().await;
    let a = fleet.gateway(0, CustomChallenge::Http01, None, false);
    let b = fleet.gateway(1, CustomChallenge::Http01, None, false);
    let name = "fenced.test";
    let LockAttempt::Acquired(guard_a) = a.backend.lock_order(name).await.unwrap() else {
        panic!("a takes the free lock")
    };
    assert!(matches!(
        b.backend.lock_order(name).await.unwrap(),
        LockAttempt::Busy { holder } if holder == "gw-0"
    ));
    // A's lock disappears as when its lease expires while A is paused.
    let lock_key = format!("{}locks/{name}", fleet.keys.acme());
    fleet.etcd.delete(&lock_key).await.unwrap();
    let LockAttempt::Acquired(guard_b) = b.backend.lock_order(name).await.unwrap() else {
        panic!("b takes the lapsed lock")
    };
    let ca = meshgate_testkit::tls::TestCa::new("fencing test CA");
    let (leaf_a, leaf_b) = (ca.issue(&[name]), ca.issue(&[name]));
    guard_b
        .commit(name, &leaf_b.chain_pem, &leaf_b.key_pem)
        .await
        .unwrap();
    let e = guard_a
        .commit(name, &leaf_a.chain_pem, &leaf_a.key_pem)
        .await
        .unwrap_err();
    assert!(matches!(e, meshgate_certs::CertError::Fenced { .. }), "{e}");
    assert!(e.to_string().contains("lock"), "{e}");
    assert!(guard_a.record_order("https://x/order/1").await.is_err());
    let stored = b.backend.load(name).await.unwrap().expect("stored");
    assert_eq!(stored.chain_pem, leaf_b.chain_pem, "B's certificate stands");
    // A (paused past its lease) gets the lock back only once B's is released.
    drop(guard_b);
    eventually_ok(Duration::from_secs(10), "the lock is free again", || {
        let f = &fleet;
        async move {
            match f.lock_holder(name).await {
                None => Ok(()),
                Some(h) => Err(h),
            }
        }
    })
    .await;
}
