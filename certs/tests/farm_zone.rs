//! The farmer's zone over real DNS queries: apex SOA/NS/CAA, A answers for `<domain>` and
//! `*.<domain>` from members whose port accepts connections, a member dropped when it stops
//! answering, all members answered when none does, and the challenge zone alongside.

mod common;

use common::init_tracing;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use meshgate_certs::farm::{FarmZone, FarmZoneConfig, ProbePolicy, follow_members};
use meshgate_certs::{AcmeConfig, CertConfig, CertManager, serve_dns};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

async fn query(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bytes = msg.to_vec().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        sock.send_to(&bytes, server).await.unwrap();
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => return Message::from_vec(&buf[..n]).unwrap(),
            _ => assert!(Instant::now() < deadline, "no DNS answer from {server}"),
        }
    }
}

async fn a_records(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    let r = query(server, name, RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
    assert!(r.metadata.authoritative, "{name}");
    let mut out: Vec<Ipv4Addr> = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

async fn wait_for_a(server: SocketAddr, name: &str, want: &[Ipv4Addr], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = a_records(server, name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: wanted {want:?} within {within:?}, last answer {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Listeners on 127.0.0.2, .3 and .4, all on one port (the probe port).
async fn members() -> (u16, Vec<(Ipv4Addr, Option<TcpListener>)>) {
    for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut out = vec![(Ipv4Addr::new(127, 0, 0, 2), Some(first))];
        for last in [3, 4] {
            let ip = Ipv4Addr::new(127, 0, 0, last);
            if let Ok(l) = TcpListener::bind((ip, port)).await {
                out.push((ip, Some(l)));
            }
        }
        if out.len() == 3 {
            return (port, out);
        }
    }
    panic!("no common free port on 127.0.0.2-4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farm_zone_answers_healthy_members_and_fails_open() {
    init_tracing();
    let (port, mut listeners) = members().await;
    let ips: Vec<Ipv4Addr> = listeners.iter().map(|(ip, _)| *ip).collect();
    let mut config = FarmZoneConfig::new("farm.test");
    config.name_servers = vec!["ns1.farm.test".into(), "ns2.farm.test".into()];
    config.answer_ttl = 15;
    let zone = FarmZone::new(&config).unwrap();
    // The DNS-01 zone is served by the same responder.
    let state = tempfile::tempdir().unwrap();
    let mut cert_config = CertConfig::new(state.path(), AcmeConfig::new("local-dev-ca", ""));
    cert_config.farmer_domain = Some("farm.test".into());
    cert_config.dns.listen = None;
    let certs = CertManager::new(cert_config).unwrap();
    let challenge = certs.dns_zone().unwrap();
    challenge.add_txt("token").await;
    let server = serve_dns(
        "127.0.0.1:0".parse().unwrap(),
        vec![
            (zone.origin().clone(), zone.zone_handler()),
            (challenge.origin().clone(), challenge.zone_handler()),
        ],
    )
    .await
    .unwrap();
    let dns = server.local_addr();

    let (members_tx, members_rx) = watch::channel(ips.iter().map(|ip| IpAddr::V4(*ip)).collect());
    let policy = ProbePolicy {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(300),
        fall: 1,
        rise: 1,
    };
    let follower = tokio::spawn(follow_members(zone.clone(), members_rx, port, policy));

    wait_for_a(dns, "farm.test.", &ips, Duration::from_secs(5)).await;
    wait_for_a(dns, "shop.farm.test.", &ips, Duration::from_secs(5)).await;
    let r = query(dns, "shop.farm.test.", RecordType::A).await;
    assert!(r.answers.iter().all(|a| a.ttl == 15), "short TTL: {r:?}");
    let r = query(dns, "farm.test.", RecordType::AAAA).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty(), "no IPv6 member: NODATA");

    // Apex records.
    let r = query(dns, "farm.test.", RecordType::SOA).await;
    match &r.answers[..] {
        [a] => match &a.data {
            RData::SOA(soa) => {
                assert_eq!(soa.mname.to_ascii(), "ns1.farm.test.");
                assert_eq!(soa.rname.to_ascii(), "hostmaster.farm.test.");
                assert_eq!(soa.minimum, 15);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let r = query(dns, "farm.test.", RecordType::NS).await;
    let mut ns: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
    ns.sort();
    assert_eq!(ns, vec!["ns1.farm.test.", "ns2.farm.test."]);
    let r = query(dns, "farm.test.", RecordType::CAA).await;
    let mut caa: Vec<String> = r.answers.iter().map(|a| a.data.to_string()).collect();
    caa.sort();
    assert_eq!(caa.len(), 2, "{caa:?}");
    assert!(
        caa[0].contains("issue") && caa[0].contains("letsencrypt.org"),
        "{caa:?}"
    );
    assert!(caa[1].contains("issuewild"), "{caa:?}");
    // Below the apex there is no CAA: a CA climbs to the apex's.
    let r = query(dns, "shop.farm.test.", RecordType::CAA).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // The challenge zone alongside; foreign names refused.
    let r = query(dns, "_acme-challenge.farm.test.", RecordType::TXT).await;
    assert_eq!(r.answers.len(), 1);
    let r = query(dns, "www.example.com.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);

    // A member stops accepting connections: it leaves the answers.
    listeners[2].1 = None;
    wait_for_a(dns, "shop.farm.test.", &ips[..2], Duration::from_secs(3)).await;
    wait_for_a(dns, "farm.test.", &ips[..2], Duration::from_secs(1)).await;
    // Every member down: all members are answered (fail open).
    listeners[0].1 = None;
    listeners[1].1 = None;
    wait_for_a(dns, "shop.farm.test.", &ips, Duration::from_secs(3)).await;
    // One comes back: only it.
    listeners[1].1 = Some(TcpListener::bind((ips[1], port)).await.unwrap());
    wait_for_a(dns, "shop.farm.test.", &ips[1..2], Duration::from_secs(3)).await;
    // A member leaving the fleet (its lease lapsed) leaves the answers even while healthy.
    members_tx.send_replace(vec![IpAddr::V4(ips[0]), IpAddr::V4(ips[2])]);
    wait_for_a(
        dns,
        "shop.farm.test.",
        &[ips[0], ips[2]],
        Duration::from_secs(3),
    )
    .await;
    drop(members_tx);
    tokio::time::timeout(Duration::from_secs(2), follower)
        .await
        .expect("the follower ends with its members' sender")
        .unwrap();
}
