//! A real authoritative DNS server (hickory-server, in process, on loopback) for tests: one
//! zone the test changes while it runs, plus any fixed zones (e.g. a DNS-01 responder's).
//!
//! The sockets can be bound before the zones exist ([`DnsSockets`]), so a process that needs
//! the server's address at start (Pebble) can be started first.

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, CNAME, NS, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A zone to serve: its origin and its handler.
pub type Zone = (Name, Arc<dyn ZoneHandler>);

/// `n` as a fully qualified name (a trailing dot is added when missing).
pub fn dns_name(n: &str) -> Name {
    let fq = if n.ends_with('.') {
        n.to_string()
    } else {
        format!("{n}.")
    };
    Name::from_str(&fq).unwrap_or_else(|e| panic!("DNS name {n}: {e}"))
}

/// UDP and TCP sockets bound on the same loopback port, not served yet.
pub struct DnsSockets {
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl DnsSockets {
    /// Binds UDP on a port of the kernel's choosing, then TCP on the same port (another port
    /// if TCP's is taken).
    pub async fn bind() -> DnsSockets {
        loop {
            let udp = tokio::net::UdpSocket::bind(crate::net::LOOPBACK_ANY)
                .await
                .expect("bind udp 127.0.0.1:0");
            let addr = udp.local_addr().expect("udp address");
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                return DnsSockets { udp, tcp, addr };
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(self, zones: Vec<Zone>) -> Server<Catalog> {
        let mut catalog = Catalog::new();
        for (origin, handler) in zones {
            catalog.upsert(LowerName::new(&origin), vec![handler]);
        }
        let mut server = Server::new(catalog);
        server.register_socket(self.udp);
        server.register_listener(self.tcp, Duration::from_secs(5), 4096);
        server
    }
}

/// A running DNS server with one zone the test edits (records get TTL 0: nothing may be
/// cached) and any fixed zones given at start. Stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    serial: AtomicU32,
    _server: Server<Catalog>,
}

impl TestDns {
    /// Serves zone `origin` on a new loopback port (UDP and TCP).
    pub async fn start(origin: &str) -> TestDns {
        Self::serve(DnsSockets::bind().await, origin, Vec::new()).await
    }

    /// Serves zone `origin` and the fixed `zones` on `sockets`.
    pub async fn serve(sockets: DnsSockets, origin: &str, mut zones: Vec<Zone>) -> TestDns {
        let origin = dns_name(origin);
        let zone = Arc::new(InMemoryZoneHandler::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        ));
        let soa = SOA::new(
            dns_name(&format!("ns.{origin}")),
            dns_name(&format!("hostmaster.{origin}")),
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
        zones.push((origin, zone.clone() as Arc<dyn ZoneHandler>));
        let addr = sockets.addr();
        TestDns {
            addr,
            zone,
            serial: AtomicU32::new(2),
            _server: sockets.serve(zones),
        }
    }

    /// Replaces the records of `rdatas`' type at `owner`.
    pub async fn set(&self, owner: &str, rdatas: Vec<RData>) {
        let Some(first) = rdatas.first() else { return };
        let rtype = first.record_type();
        self.remove(owner, rtype).await;
        for rdata in rdatas {
            let serial = self.serial.fetch_add(1, Ordering::SeqCst);
            assert!(
                self.zone
                    .upsert(Record::from_rdata(dns_name(owner), 0, rdata), serial)
                    .await,
                "upsert {owner} {rtype}"
            );
        }
    }

    pub async fn remove(&self, owner: &str, rtype: RecordType) {
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::new(&dns_name(owner)), rtype));
    }

    /// `owner CNAME target` (its A and AAAA records removed).
    pub async fn cname(&self, owner: &str, target: &str) {
        for t in [RecordType::A, RecordType::AAAA] {
            self.remove(owner, t).await;
        }
        self.set(owner, vec![RData::CNAME(CNAME(dns_name(target)))])
            .await;
    }

    /// `owner A addrs` (its CNAME removed).
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

/// A fixed zone `origin` answering `name A ip` for `records` (TTL 60), with SOA and NS.
pub fn a_zone(origin: &str, records: &[(&str, Ipv4Addr)]) -> Zone {
    let origin = dns_name(origin);
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let ns = dns_name("ns.test.");
    let soa = SOA::new(ns.clone(), dns_name("hostmaster.test."), 1, 60, 60, 60, 5);
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1));
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::NS(NS(ns))), 1));
    for (name, ip) in records {
        assert!(zone.upsert_mut(Record::from_rdata(dns_name(name), 60, RData::A(A(*ip))), 1));
    }
    (origin, Arc::new(zone))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal A query over UDP; returns the answer's IPv4 addresses (RFC 1035 wire format).
    async fn query_a(server: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend(label.as_bytes());
        }
        q.extend([0, 0, 1, 0, 1]);
        sock.send_to(&q, server).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("DNS answer")
            .unwrap();
        let answers = u16::from_be_bytes([buf[6], buf[7]]);
        // Skip the question, then read the answers.
        let skip_name = |mut at: usize| loop {
            match buf[at] {
                0 => return at + 1,
                len if len & 0xc0 == 0xc0 => return at + 2,
                len => at += 1 + len as usize,
            }
        };
        let mut at = q.len();
        let mut out = Vec::new();
        for _ in 0..answers {
            at = skip_name(at);
            let rtype = u16::from_be_bytes([buf[at], buf[at + 1]]);
            let len = u16::from_be_bytes([buf[at + 8], buf[at + 9]]) as usize;
            at += 10;
            if rtype == 1 && len == 4 {
                out.push(Ipv4Addr::new(
                    buf[at],
                    buf[at + 1],
                    buf[at + 2],
                    buf[at + 3],
                ));
            }
            at += len;
        }
        assert!(n >= at);
        out
    }

    #[tokio::test]
    async fn serves_edited_and_fixed_zones() {
        let sockets = DnsSockets::bind().await;
        let fixed = a_zone(
            "fixed.test.",
            &[("www.fixed.test", Ipv4Addr::new(192, 0, 2, 1))],
        );
        let dns = TestDns::serve(sockets, "zone.test", vec![fixed]).await;
        dns.a("x.zone.test", &[Ipv4Addr::new(192, 0, 2, 7)]).await;
        assert_eq!(
            query_a(dns.addr, "x.zone.test").await,
            [Ipv4Addr::new(192, 0, 2, 7)]
        );
        assert_eq!(
            query_a(dns.addr, "www.fixed.test").await,
            [Ipv4Addr::new(192, 0, 2, 1)]
        );
        dns.a("x.zone.test", &[Ipv4Addr::new(192, 0, 2, 8)]).await;
        assert_eq!(
            query_a(dns.addr, "x.zone.test").await,
            [Ipv4Addr::new(192, 0, 2, 8)]
        );
    }
}
