//! Custom-domain proof against a real DNS server started by the test: pending → verified →
//! active, the refusals, and deactivation of a repointed domain after the grace period.

use meshgate_config::route::Mode;
use meshgate_reservations::clock::now_unix;
use meshgate_reservations::reservation::{Key, Options, Reservation, Status, challenge_name};
use meshgate_reservations::store::redb::RedbStore;
use meshgate_reservations::store::{ReservationStore, SharedStore};
use meshgate_reservations::verify::{Verifier, VerifierConfig};
use meshgate_testkit::dns::TestDns;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

const FARM: &str = "farm.example";
const GW_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const ELSEWHERE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const SHOP: &str = "shop.customer.test";

struct Setup {
    dns: TestDns,
    store: SharedStore,
    verifier: Verifier,
    _dir: tempfile::TempDir,
}

async fn setup(require_certificate: bool, grace: Duration) -> Setup {
    let dns = TestDns::start("customer.test").await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path(), FARM).unwrap()) as SharedStore;
    let mut cfg = VerifierConfig::new(FARM, vec![IpAddr::V4(GW_IP)]);
    cfg.nameservers = vec![dns.addr];
    cfg.require_certificate = require_certificate;
    cfg.grace = grace;
    cfg.timeout = Duration::from_secs(2);
    let verifier = Verifier::new(store.clone(), cfg).unwrap();
    Setup {
        dns,
        store,
        verifier,
        _dir: dir,
    }
}

fn reserve(store: &dyn ReservationStore, fqdn: &str, owner: &str, mode: Mode) {
    let r = Reservation::new(
        Key::domain(fqdn, owner),
        owner,
        vec!["[400:abcd::1]:8080".parse().unwrap()],
        mode,
        Options::default(),
        now_unix(),
    );
    store.create(&r, 100).unwrap();
}

fn status(store: &dyn ReservationStore, fqdn: &str) -> Reservation {
    let mut claims = store.domain_claims(fqdn).unwrap();
    assert_eq!(claims.len(), 1, "one claim on {fqdn}");
    claims.remove(0)
}

fn routed(store: &dyn ReservationStore, host: &str) -> bool {
    store.routes().borrow().iter().any(|r| r.host == host)
}

#[tokio::test]
async fn verified_flow_pending_verified_active() {
    let s = setup(true, Duration::from_secs(60)).await;
    reserve(&*s.store, SHOP, "alice", Mode::Terminate);
    let mut verified = s.store.verified_domains();

    // Nothing published yet: stays pending, with the reason recorded.
    s.verifier.check_all(1_000).await.unwrap();
    let r = status(&*s.store, SHOP);
    assert_eq!(r.status, Status::Pending);
    let err = r.verification.last_error.unwrap();
    assert!(err.contains("no TXT record"), "{err}");
    assert!(!routed(&*s.store, SHOP));

    s.dns.cname(SHOP, FARM).await;
    let token = s.store.challenge_token("alice", SHOP);
    s.dns.txt(&challenge_name(SHOP), &[&token]).await;
    assert_eq!(s.verifier.check_all(2_000).await.unwrap(), 1);
    let r = status(&*s.store, SHOP);
    assert_eq!(r.status, Status::Verified, "{:?}", r.verification);
    assert!(verified.has_changed().unwrap());
    assert!(verified.borrow_and_update().contains(SHOP));
    assert!(!routed(&*s.store, SHOP), "verified is not yet serving");

    // The certificate layer reports a certificate: active and routed.
    s.store.set_certificate_ready(SHOP, true).unwrap();
    assert_eq!(status(&*s.store, SHOP).status, Status::Active);
    assert!(routed(&*s.store, SHOP));
    // A later re-validation keeps it active.
    s.verifier.check_all(3_000).await.unwrap();
    assert_eq!(status(&*s.store, SHOP).status, Status::Active);
}

#[tokio::test]
async fn a_records_of_only_the_gateway_count_as_pointed() {
    let s = setup(false, Duration::from_secs(60)).await;
    reserve(&*s.store, SHOP, "alice", Mode::Terminate);
    s.dns
        .txt(
            &challenge_name(SHOP),
            &[&s.store.challenge_token("alice", SHOP)],
        )
        .await;

    s.dns.a(SHOP, &[GW_IP, ELSEWHERE_IP]).await;
    s.verifier.check_all(1_000).await.unwrap();
    let r = status(&*s.store, SHOP);
    assert_eq!(r.status, Status::Pending);
    let err = r.verification.last_error.unwrap();
    assert!(
        err.contains("203.0.113.9") && err.contains("not this gateway"),
        "{err}"
    );

    s.dns.a(SHOP, &[GW_IP]).await;
    s.verifier.check_all(2_000).await.unwrap();
    assert_eq!(status(&*s.store, SHOP).status, Status::Active);
    assert!(routed(&*s.store, SHOP));
}

#[tokio::test]
async fn refusals_wrong_cname_missing_txt_foreign_token() {
    let s = setup(false, Duration::from_secs(60)).await;
    let wrong = "wrong.customer.test";
    let notxt = "notxt.customer.test";
    let stolen = "stolen.customer.test";
    for d in [wrong, notxt, stolen] {
        reserve(&*s.store, d, "alice", Mode::Passthrough);
    }
    // Wrong CNAME (to a host elsewhere), with a correct TXT.
    s.dns.a("other.customer.test", &[ELSEWHERE_IP]).await;
    s.dns.cname(wrong, "other.customer.test").await;
    s.dns
        .txt(
            &challenge_name(wrong),
            &[&s.store.challenge_token("alice", wrong)],
        )
        .await;
    // Correct CNAME, no TXT.
    s.dns.cname(notxt, FARM).await;
    // Correct CNAME, TXT holding bob's token for the same domain.
    s.dns.cname(stolen, FARM).await;
    s.dns
        .txt(
            &challenge_name(stolen),
            &[&s.store.challenge_token("bob", stolen)],
        )
        .await;

    for now in [1_000, 2_000] {
        assert_eq!(s.verifier.check_all(now).await.unwrap(), 0);
    }
    let reason = |d| {
        let r = status(&*s.store, d);
        assert_eq!(r.status, Status::Pending, "{d}");
        assert!(!routed(&*s.store, d), "{d}");
        r.verification.last_error.unwrap()
    };
    let e = reason(wrong);
    assert!(
        e.contains("CNAME to other.customer.test") && e.contains("203.0.113.9"),
        "{e}"
    );
    let e = reason(notxt);
    assert!(
        e.contains("no TXT record at _meshgate-challenge.notxt.customer.test"),
        "{e}"
    );
    let e = reason(stolen);
    assert!(e.contains("does not hold the owner's token"), "{e}");
    assert!(s.store.verified_domains().borrow().is_empty());
}

#[tokio::test]
async fn repointed_domain_is_deactivated_after_grace() {
    let grace = Duration::from_secs(30);
    let s = setup(false, grace).await;
    reserve(&*s.store, SHOP, "alice", Mode::Terminate);
    s.dns.cname(SHOP, FARM).await;
    s.dns
        .txt(
            &challenge_name(SHOP),
            &[&s.store.challenge_token("alice", SHOP)],
        )
        .await;
    let t0 = 1_000_000;
    s.verifier.check_all(t0).await.unwrap();
    assert_eq!(status(&*s.store, SHOP).status, Status::Active);
    let mut routes = s.store.routes();
    routes.borrow_and_update();

    // Repointed to another provider.
    s.dns.a("other.customer.test", &[ELSEWHERE_IP]).await;
    s.dns.cname(SHOP, "other.customer.test").await;
    s.verifier.check_all(t0 + 1_000).await.unwrap();
    let r = status(&*s.store, SHOP);
    assert_eq!(r.status, Status::Active, "within grace it keeps serving");
    assert_eq!(r.verification.failing_since_ms, Some(t0 + 1_000));
    s.verifier.check_all(t0 + 30_999).await.unwrap();
    assert_eq!(status(&*s.store, SHOP).status, Status::Active);
    assert!(!routes.has_changed().unwrap());

    s.verifier.check_all(t0 + 31_000).await.unwrap();
    match status(&*s.store, SHOP).status {
        Status::Deactivated { reason } => {
            assert!(
                reason.contains("grace") && reason.contains("203.0.113.9"),
                "{reason}"
            )
        }
        other => panic!("expected deactivated, got {other:?}"),
    }
    assert!(routes.has_changed().unwrap());
    assert!(!routes.borrow_and_update().iter().any(|r| r.host == SHOP));
    assert!(!s.store.verified_domains().borrow().contains(SHOP));
}

#[tokio::test]
async fn running_verifier_activates_on_request_and_routes_follow() {
    let dns = TestDns::start("customer.test").await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path(), FARM).unwrap()) as SharedStore;
    let mut cfg = VerifierConfig::new(FARM, vec![IpAddr::V4(GW_IP)]);
    cfg.nameservers = vec![dns.addr];
    cfg.interval = Duration::from_secs(3600);
    let task = Verifier::new(store.clone(), cfg).unwrap().spawn();

    let mut routes = store.routes();
    routes.borrow_and_update();
    dns.cname(SHOP, FARM).await;
    dns.txt(
        &challenge_name(SHOP),
        &[&store.challenge_token("alice", SHOP)],
    )
    .await;
    reserve(&*store, SHOP, "alice", Mode::Terminate);
    store.request_verification();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            routes.changed().await.unwrap();
            if routes.borrow_and_update().iter().any(|r| r.host == SHOP) {
                break;
            }
        }
    })
    .await
    .expect("the domain is routed after an on-demand verification");
    task.abort();
}

#[tokio::test]
async fn dns_outage_is_inconclusive_and_keeps_the_domain_active() {
    // No grace at all: any failed proof would deactivate at once.
    let s = setup(false, Duration::ZERO).await;
    reserve(&*s.store, SHOP, "alice", Mode::Terminate);
    s.dns.cname(SHOP, FARM).await;
    let token = s.store.challenge_token("alice", SHOP);
    s.dns.txt(&challenge_name(SHOP), &[&token]).await;
    s.verifier.check_all(1_000).await.unwrap();
    assert_eq!(status(&*s.store, SHOP).status, Status::Active);

    let verifier_via = |nameserver| {
        let mut cfg = VerifierConfig::new(FARM, vec![IpAddr::V4(GW_IP)]);
        cfg.nameservers = vec![nameserver];
        cfg.grace = Duration::ZERO;
        cfg.timeout = Duration::from_millis(300);
        Verifier::new(s.store.clone(), cfg).unwrap()
    };
    // The name server is down (nothing listens on its port).
    let down = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    verifier_via(down).check_all(2_000).await.unwrap();
    let r = status(&*s.store, SHOP);
    assert_eq!(r.status, Status::Active, "{:?}", r.verification);
    assert_eq!(r.verification.failing_since_ms, None);
    let err = r.verification.last_error.unwrap();
    assert!(err.contains("inconclusive"), "{err}");
    assert!(routed(&*s.store, SHOP));

    // A server that answers with an error code (REFUSED: not authoritative for the name).
    let other = TestDns::start("elsewhere.test").await;
    verifier_via(other.addr).check_all(3_000).await.unwrap();
    let r = status(&*s.store, SHOP);
    assert_eq!(r.status, Status::Active, "{:?}", r.verification);
    assert_eq!(r.verification.failing_since_ms, None);

    // DNS back and the domain really repointed: that is a failure, deactivated (no grace).
    s.dns.a(SHOP, &[ELSEWHERE_IP]).await;
    s.verifier.check_all(4_000).await.unwrap();
    assert!(matches!(
        status(&*s.store, SHOP).status,
        Status::Deactivated { .. }
    ));
}

/// Issue 13, item 11: a squatter's pending claim does not block the real owner. Both may
/// claim; the first to prove the domain holds it and the squatter's claim is dropped, with
/// the reason kept for it; claims left unproven expire.
#[tokio::test]
async fn a_pending_claim_does_not_block_the_owner_who_proves_first() {
    use meshgate_reservations::store::StoreError;
    let s = setup(false, Duration::from_secs(60)).await;
    reserve(&*s.store, SHOP, "squatter", Mode::Terminate);
    // Before: `409 already reserved`. Now a second claim is accepted.
    reserve(&*s.store, SHOP, "owner", Mode::Terminate);
    assert_eq!(s.store.domain_claims(SHOP).unwrap().len(), 2);

    s.dns.cname(SHOP, FARM).await;
    let token = s.store.challenge_token("owner", SHOP);
    s.dns.txt(&challenge_name(SHOP), &[&token]).await;
    let now_ms = now_unix() * 1000;
    s.verifier.check_all(now_ms).await.unwrap();
    let claim = |owner: &str| {
        s.store
            .get(&Key::domain(SHOP, owner))
            .unwrap()
            .expect("claim kept")
    };
    assert_eq!(claim("owner").status, Status::Active);
    assert!(routed(&*s.store, SHOP));
    match claim("squatter").status {
        Status::Dropped { reason } => assert!(reason.contains("proved ownership"), "{reason}"),
        other => panic!("expected the squatter's claim dropped, got {other:?}"),
    }
    // While the owner holds it, nobody else may claim it.
    let late = Reservation::new(
        Key::domain(SHOP, "late"),
        "late",
        vec!["[400:abcd::1]:8080".parse().unwrap()],
        Mode::Terminate,
        Options::default(),
        now_unix(),
    );
    assert!(matches!(
        s.store.create(&late, 100),
        Err(StoreError::Held { .. })
    ));

    // A claim nobody proves expires after the pending expiry (3 days by default); the
    // dropped claim is deleted as long after it was dropped.
    let old = Reservation::new(
        Key::domain("idle.customer.test", "squatter"),
        "squatter",
        vec!["[400:abcd::1]:8080".parse().unwrap()],
        Mode::Terminate,
        Options::default(),
        now_unix() - 259_200,
    );
    s.store.create(&old, 100).unwrap();
    s.verifier.check_all(now_ms + 1_000).await.unwrap();
    assert!(
        s.store
            .domain_claims("idle.customer.test")
            .unwrap()
            .is_empty()
    );
    s.verifier.check_all(now_ms + 259_200_000).await.unwrap();
    assert!(
        s.store
            .get(&Key::domain(SHOP, "squatter"))
            .unwrap()
            .is_none()
    );
    assert_eq!(claim("owner").status, Status::Active);
}
