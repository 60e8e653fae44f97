//! The store survives restarts and publishes every change on the routes watch channel.

use meshgate_config::route::Mode;
use meshgate_reservations::clock::now_unix;
use meshgate_reservations::reservation::{Key, Kind, Options, Reservation, Status};
use meshgate_reservations::store::redb::RedbStore as Store;
use meshgate_reservations::store::{ReservationStore, ReservationStoreExt, StoreError};
use meshgate_reservations::token::{StoredToken, new_token};
use std::time::Duration;

const FARM: &str = "farm.example";

fn name(n: &str, owner: &str) -> Reservation {
    Reservation::new(
        Key::name(n),
        owner,
        vec!["[400::1]:80".parse().unwrap()],
        Mode::Terminate,
        Options::default(),
        now_unix(),
    )
}

#[tokio::test]
async fn restart_keeps_every_reservation_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    let token = new_token();
    let challenge;
    {
        let store = Store::open(dir.path(), FARM).unwrap();
        for i in 0..20 {
            let r = name(&format!("svc{i}"), if i % 2 == 0 { "alice" } else { "bob" });
            store.create(&r, 100).unwrap();
            expected.push(r);
        }
        let mut d = Reservation::new(
            Key::domain("shop.customer.test", "alice"),
            "alice",
            vec!["10.1.2.3:443".parse().unwrap()],
            Mode::Passthrough,
            Options::default(),
            now_unix(),
        );
        d.status = Status::Active;
        store.create(&d, 100).unwrap();
        expected.push(d);
        challenge = store.challenge_token("alice", "x.test");
        store
            .insert_token(&StoredToken {
                id: token.id.clone(),
                owner: "alice".into(),
                hash: token.hash.clone(),
                created_at: now_unix(),
            })
            .unwrap();
    }
    let store = Store::open(dir.path(), FARM).unwrap();
    let mut all = store.list(None, None).unwrap();
    all.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    expected.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    assert_eq!(all, expected);
    assert_eq!(store.list(Some("bob"), Some(Kind::Name)).unwrap().len(), 10);
    // Routes are published at open, before any change.
    let routes = store.routes();
    assert_eq!(routes.borrow().len(), 21);
    assert!(
        routes
            .borrow()
            .iter()
            .any(|r| r.host == "svc3.farm.example")
    );
    assert!(
        routes
            .borrow()
            .iter()
            .any(|r| r.host == "shop.customer.test")
    );
    let stored = store.token(&token.id).unwrap().unwrap();
    assert_eq!(stored.owner, "alice");
    let parsed = meshgate_reservations::token::parse_token(&token.token).unwrap();
    assert!(parsed.matches(&stored.hash));
    // The same challenge key survives, so published TXT records stay valid; another data
    // directory (another gateway) has another key.
    assert_eq!(store.challenge_token("alice", "x.test"), challenge);
    let again = Store::open(tempfile::tempdir().unwrap().path(), FARM).unwrap();
    assert_ne!(
        store.challenge_token("alice", "x.test"),
        again.challenge_token("alice", "x.test")
    );
}

#[tokio::test]
async fn changes_appear_on_the_routes_watch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), FARM).unwrap();
    let mut routes = store.routes();
    assert!(routes.borrow_and_update().is_empty());

    store.create(&name("alice", "alice"), 100).unwrap();
    tokio::time::timeout(Duration::from_secs(1), routes.changed())
        .await
        .unwrap()
        .unwrap();
    let r = routes.borrow_and_update().clone();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].host, "alice.farm.example");

    let new_backend = "[400::2]:8080".parse().unwrap();
    store
        .update(&Key::name("alice"), |r| {
            r.backends = vec![new_backend];
            Ok::<(), StoreError>(())
        })
        .unwrap()
        .unwrap();
    assert!(routes.has_changed().unwrap());
    assert_eq!(routes.borrow_and_update()[0].backends[0].addr, new_backend);

    // A refused update writes nothing and publishes nothing.
    let refused = store.update(&Key::name("alice"), |r| {
        r.backends.clear();
        Err(StoreError::Db("refused".into()))
    });
    assert!(refused.is_err());
    assert!(!routes.has_changed().unwrap());
    assert_eq!(
        store.get(&Key::name("alice")).unwrap().unwrap().backends,
        vec![new_backend]
    );

    // Taken names conflict, whoever asks.
    match store.create(&name("alice", "bob"), 100) {
        Err(StoreError::Conflict { owner, .. }) => assert_eq!(owner, "alice"),
        other => panic!("expected conflict, got {other:?}"),
    }

    // A pending domain is not routed.
    store
        .create(
            &Reservation::new(
                Key::domain("shop.customer.test", "alice"),
                "alice",
                vec!["10.0.0.1:80".parse().unwrap()],
                Mode::Terminate,
                Options::default(),
                now_unix(),
            ),
            100,
        )
        .unwrap();
    assert!(!routes.has_changed().unwrap());

    store
        .delete(&Key::name("alice"), |_| Ok::<(), StoreError>(()))
        .unwrap()
        .unwrap();
    assert!(routes.has_changed().unwrap());
    assert!(routes.borrow_and_update().is_empty());
    assert!(store.get(&Key::name("alice")).unwrap().is_none());
}

/// Child half of `killed_writer_loses_no_acknowledged_reservation`: writes reservations until
/// killed, printing each one after its commit returned. Does nothing in a normal test run.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var("MESHGATE_CRASH_CHILD_DIR") else {
        return;
    };
    let store = Store::open(std::path::Path::new(&dir), FARM).unwrap();
    for i in 0..100_000 {
        store.create(&name(&format!("c{i}"), "alice"), 100).unwrap();
        println!("committed {i}");
    }
}

#[test]
fn killed_writer_loses_no_acknowledged_reservation() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_writer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MESHGATE_CRASH_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acknowledged = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("committed ") {
            let n: usize = n.parse().unwrap();
            acknowledged = Some(n);
            if n >= 40 {
                // SIGKILL mid-stream: no destructor, no flush, possibly inside a commit.
                child.kill().unwrap();
                break;
            }
        }
    }
    child.wait().unwrap();
    let acknowledged = acknowledged.expect("the child committed reservations");
    let store = Store::open(dir.path(), FARM).unwrap();
    for i in 0..=acknowledged {
        assert!(
            store.get(&Key::name(format!("c{i}"))).unwrap().is_some(),
            "c{i} was acknowledged but is lost"
        );
    }
    // The store is fully usable after the crash.
    store.create(&name("after-crash", "alice"), 100).unwrap();
    assert!(store.list(None, None).unwrap().len() > acknowledged + 1);
}
