//! The built-in authoritative DNS responder for DNS-01. It serves exactly the zone
//! `_acme-challenge.<domain>` (SOA, NS, and the TXT records of pending challenges); any other
//! name is REFUSED, unknown names inside the zone get NXDOMAIN.

use crate::error::CertError;
use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{NS, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;

/// TTL of challenge records: short, validators must not cache stale tokens.
const TXT_TTL: u32 = 10;

/// The `_acme-challenge.<domain>` zone; TXT values are set and cleared by the ACME flow.
#[derive(Clone)]
pub struct ChallengeZone {
    origin: Name,
    handler: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    serial: Arc<AtomicU32>,
}

impl std::fmt::Debug for ChallengeZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChallengeZone({})", self.origin)
    }
}

fn parse_name(s: &str) -> Result<Name, CertError> {
    let fqdn = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(&fqdn).map_err(|e| CertError::InvalidName {
        name: s.to_string(),
        reason: e.to_string(),
    })
}

impl ChallengeZone {
    /// The zone for `domain` whose SOA/NS name `ns_host` (the gateway host the farmer's
    /// `_acme-challenge.<domain> NS` record points at).
    pub(crate) fn new(domain: &str, ns_host: &str) -> Result<Self, CertError> {
        let origin = parse_name(&format!("_acme-challenge.{}", domain.trim_end_matches('.')))?;
        let ns = parse_name(ns_host)?;
        let rname = parse_name(&format!("hostmaster.{}", domain.trim_end_matches('.')))?;
        let mut handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let serial = 1;
        let soa = SOA::new(ns.clone(), rname, serial, 300, 60, 86400, TXT_TTL);
        let ok = handler.upsert_mut(
            Record::from_rdata(origin.clone(), 300, RData::SOA(soa)),
            serial,
        ) && handler.upsert_mut(
            Record::from_rdata(origin.clone(), 300, RData::NS(NS(ns))),
            serial,
        );
        if !ok {
            return Err(CertError::Config(format!("cannot build DNS zone {origin}")));
        }
        Ok(ChallengeZone {
            origin,
            handler: Arc::new(handler),
            serial: Arc::new(AtomicU32::new(serial)),
        })
    }

    /// The zone's name, `_acme-challenge.<domain>.`.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// Adds a TXT value (a DNS-01 `dns_value`). A wildcard order needs two at once.
    pub async fn add_txt(&self, value: &str) {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let record = Record::from_rdata(
            self.origin.clone(),
            TXT_TTL,
            RData::TXT(TXT::new(vec![value.to_string()])),
        );
        self.handler.upsert(record, serial).await;
    }

    /// Removes one TXT value (others stay: two orders may be pending).
    pub async fn remove_txt(&self, value: &str) {
        let key = RrKey::new(LowerName::new(&self.origin), RecordType::TXT);
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let mut records = self.handler.records_mut().await;
        let Some(set) = records.get(&key) else {
            return;
        };
        let keep: Vec<Record> = set
            .records_without_rrsigs()
            .filter(|r| !matches!(&r.data, RData::TXT(t) if t.txt_data.iter().any(|d| &**d == value.as_bytes())))
            .cloned()
            .collect();
        records.remove(&key);
        drop(records);
        for r in keep {
            self.handler.upsert(r, serial).await;
        }
    }

    /// Removes all TXT values.
    pub async fn clear_txt(&self) {
        let key = RrKey::new(LowerName::new(&self.origin), RecordType::TXT);
        self.handler.records_mut().await.remove(&key);
    }

    /// The zone handler, to serve this zone from a catalog alongside others.
    pub fn zone_handler(&self) -> Arc<dyn ZoneHandler> {
        self.handler.clone()
    }
}

/// A running DNS server (UDP and TCP on one address); stops when dropped.
pub struct DnsServer {
    stop: Option<oneshot::Sender<()>>,
    local_addr: SocketAddr,
}

impl DnsServer {
    /// Where it listens (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `zones` authoritatively on `listen` (UDP and TCP); other names are REFUSED.
pub async fn serve_dns(
    listen: SocketAddr,
    zones: Vec<(Name, Arc<dyn ZoneHandler>)>,
) -> Result<DnsServer, CertError> {
    let err = |e: std::io::Error| CertError::Dns {
        addr: listen.to_string(),
        message: e.to_string(),
    };
    let udp = UdpSocket::bind(listen).await.map_err(err)?;
    let local_addr = udp.local_addr().map_err(err)?;
    let tcp = TcpListener::bind(local_addr).await.map_err(err)?;
    let mut catalog = Catalog::new();
    for (name, handler) in zones {
        catalog.upsert(LowerName::new(&name), vec![handler]);
    }
    let mut server = Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(async move {
        tokio::select! {
            _ = stopped => { let _ = server.shutdown_gracefully().await; }
            r = server.block_until_done() => {
                if let Err(e) = r { tracing::warn!("DNS responder stopped: {e}"); }
            }
        }
    });
    tracing::info!(%local_addr, "DNS responder listening");
    Ok(DnsServer {
        stop: Some(stop),
        local_addr,
    })
}
