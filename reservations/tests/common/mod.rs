//! A real authoritative DNS server (hickory-server, in process, on a loopback port) whose zone
//! tests change while it runs.

#![allow(dead_code)]

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, CNAME, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    serial: AtomicU32,
    _server: Server<Catalog>,
}

fn name(n: &str) -> Name {
    let fq = if n.ends_with('.') {
        n.to_string()
    } else {
        format!("{n}.")
    };
    Name::from_str(&fq).expect("test names are valid")
}

impl TestDns {
    /// Serves zone `origin` on 127.0.0.1 (UDP and TCP on the same port).
    pub async fn start(origin: &str) -> TestDns {
        let origin = name(origin);
        let zone = Arc::new(InMemoryZoneHandler::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        ));
        let soa = SOA::new(
            name(&format!("ns.{origin}")),
            name(&format!("hostmaster.{origin}")),
            1,
            3600,
            600,
            86400,
            0,
        );
        assert!(
            zone.upsert(Record::from_rdata(origin.clone(), 0, RData::SOA(soa)), 1)
                .await
        );
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let mut server = Server::new(catalog);
        // Bind UDP on a free port, then TCP on the same one (retry if TCP's is taken).
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 4096);
        TestDns {
            addr,
            zone,
            serial: AtomicU32::new(2),
            _server: server,
        }
    }

    /// Replaces the records of `rdata`'s type at `owner` (TTL 0: nothing may be cached).
    pub async fn set(&self, owner: &str, rdatas: Vec<RData>) {
        let Some(first) = rdatas.first() else { return };
        let rtype = first.record_type();
        self.remove(owner, rtype).await;
        for rdata in rdatas {
            let serial = self.serial.fetch_add(1, Ordering::SeqCst);
            assert!(
                self.zone
                    .upsert(Record::from_rdata(name(owner), 0, rdata), serial)
                    .await,
                "upsert {owner} {rtype}"
            );
        }
    }

    pub async fn remove(&self, owner: &str, rtype: RecordType) {
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::new(&name(owner)), rtype));
    }

    pub async fn cname(&self, owner: &str, target: &str) {
        for t in [RecordType::A, RecordType::AAAA] {
            self.remove(owner, t).await;
        }
        self.set(owner, vec![RData::CNAME(CNAME(name(target)))])
            .await;
    }

    pub async fn a(&self, owner: &str, addrs: &[Ipv4Addr]) {
        self.remove(owner, RecordType::CNAME).await;
        self.set(owner, addrs.iter().map(|a| RData::A(A(*a))).collect())
            .await;
    }

    pub async fn txt(&self, owner: &str, values: &[&str]) {
        self.set(
            owner,
            values
                .iter()
                .map(|v| RData::TXT(TXT::new(vec![v.to_string()])))
                .collect(),
        )
        .await;
    }
}
