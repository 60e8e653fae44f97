//! The farmer zone served by gateway processes of a fleet (real 3-member etcd): A answers
//! from the live members' `advertise` addresses, a SIGKILLed gateway dropped within the
//! member lease TTL plus the probe interval, and a responder that finds no member healthy
//! answering them all (fail open).

mod fleet_kit;

use fleet_kit::write_fleet_key;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use meshgate_testkit::etcd::EtcdCluster;
use meshgate_testkit::net::{common_port, member_ip};
use meshgate_testkit::process::GatewayProcess;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

const MEMBER_TTL: Duration = Duration::from_secs(3);
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

fn free_udp_port() -> u16 {
    // The TCP side must be free as well: try a few ports the kernel hands out.
    (0..50)
        .find_map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = s.local_addr().unwrap().port();
            std::net::TcpListener::bind(("127.0.0.1", port))
                .ok()
                .map(|_| port)
        })
        .unwrap_or(0)
}

async fn a_records(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bytes = msg.to_vec().unwrap();
    for _ in 0..20 {
        sock.send_to(&bytes, server).await.unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
        {
            let r = Message::from_vec(&buf[..n]).unwrap();
            if r.metadata.response_code != ResponseCode::NoError {
                return Vec::new();
            }
            let mut out: Vec<Ipv4Addr> = r
                .answers
                .iter()
                .filter_map(|a| match &a.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect();
            out.sort();
            return out;
        }
    }
    panic!("no DNS answer from {server}");
}

async fn wait_for_a(
    server: SocketAddr,
    want: &[Ipv4Addr],
    within: Duration,
    logs: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = a_records(server, "www.farm.test.").await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{server}: wanted {want:?} within {within:?}, got {got:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farmer_zone_drops_a_killed_gateway_and_fails_open() {
    let etcd = EtcdCluster::start(3).await;
    let root = tempfile::tempdir().unwrap();
    let key_file = root.path().join("fleet.key");
    write_fleet_key(&key_file);
    // Held until the gateways bind it on their addresses.
    let (https, _held) = common_port(3);
    let closed = meshgate_testkit::net::refusing();
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let mut dns = Vec::new();
    let mut gws = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("gw{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let dns_port = free_udp_port();
        assert_ne!(dns_port, 0);
        dns.push(SocketAddr::from(([127, 0, 0, 1], dns_port)));
        // Gateway 0 probes a port nobody listens on: to it, no member looks healthy.
        let probe = if i == 0 { closed.port() } else { https };
        let endpoints = endpoints.join(", ");
        let key = key_file.display().to_string();
        gws.push(GatewayProcess::start_with(
            Path::new(env!("CARGO_BIN_EXE_meshgate")),
            &dir,
            |ports| {
                format!(
                    r#"data_dir = "{data}"
domains = ["farm.test"]
[listen]
https = ["{ip}:{https}"]
http = ["127.0.0.1:{http}"]
[admin]
listen = "127.0.0.1:{admin}"
[api]
listen = "127.0.0.1:{api}"
[tls.acme]
directory = "local-dev-ca"
contact = "mailto:ops@farm.test"
dns_listen = "127.0.0.1:{dns_port}"
probe_port = {probe}
probe_interval_ms = {interval}
zone_name_servers = ["ns1.farm.test"]
[reservations]
nameservers = ["127.0.0.1:9"]
interval_secs = 3600
[fleet]
name = "dnstest"
etcd = [{endpoints}]
key_file = "{key}"
advertise = ["{ip}"]
id = "gw{i}"
member_ttl_secs = {ttl}
"#,
                    data = dir.display(),
                    ip = member_ip(i),
                    http = ports.http,
                    admin = ports.admin,
                    api = ports.api,
                    interval = PROBE_INTERVAL.as_millis(),
                    ttl = MEMBER_TTL.as_secs(),
                )
            },
        ));
    }
    let logs = |gws: &Vec<GatewayProcess>| -> String {
        gws.iter()
            .enumerate()
            .map(|(i, g)| format!("--- gw{i}\n{}", g.log()))
            .collect()
    };
    let all: Vec<Ipv4Addr> = (0..3).map(member_ip).collect();
    wait_for_a(dns[1], &all, Duration::from_secs(30), || logs(&gws)).await;
    wait_for_a(dns[0], &all, Duration::from_secs(30), || logs(&gws)).await;

    gws[2].child.kill().unwrap();
    gws[2].child.wait().unwrap();
    // Dropped by gateway 1's probes (or the lapsed lease) in time.
    let bound = MEMBER_TTL + PROBE_INTERVAL + Duration::from_secs(1);
    let took = wait_for_a(dns[1], &all[..2], bound, || logs(&gws)).await;
    assert!(took <= bound, "{took:?}");
    // Gateway 0 finds nobody healthy: it answers every live member, and drops the dead one
    // once its member record lapses.
    wait_for_a(dns[0], &all[..2], bound, || logs(&gws)).await;
    assert_eq!(a_records(dns[0], "farm.test.").await, all[..2].to_vec());
}
