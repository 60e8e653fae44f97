//! The farmer's zone `<domain>` as served by every gateway: SOA, NS, CAA at the apex, and
//! A/AAAA for `<domain>` and `*.<domain>` set from the members that look healthy.

use crate::error::CertError;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, CAA, NS, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, ZoneHandler, ZoneType,
};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// What the farmer's zone says besides the members' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmZoneConfig {
    /// The farmer's domain (the zone's apex).
    pub domain: String,
    /// The zone's name servers (NS records; the first is the SOA's primary). The parent
    /// zone delegates to these, with glue when they are inside the zone.
    pub name_servers: Vec<String>,
    /// CAs allowed to issue (CAA `issue` and `issuewild` at the apex), e.g. `letsencrypt.org`.
    pub caa_issuers: Vec<String>,
    /// TTL of the A/AAAA answers, seconds (short: a dropped member leaves resolvers fast).
    pub answer_ttl: u32,
}

impl FarmZoneConfig {
    /// `ns1.<domain>` as the only name server, `letsencrypt.org` as the only CA, 30 s TTL.
    pub fn new(domain: &str) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        FarmZoneConfig {
            name_servers: vec![format!("ns1.{domain}")],
            caa_issuers: vec!["letsencrypt.org".into()],
            answer_ttl: DEFAULT_ANSWER_TTL,
            domain,
        }
    }
}

/// Default TTL of A/AAAA answers.
pub const DEFAULT_ANSWER_TTL: u32 = 30;
/// TTL of the apex's SOA, NS and CAA records.
const APEX_TTL: u32 = 300;

/// The zone; cheap to clone, clones share the records.
#[derive(Clone)]
pub struct FarmZone {
    origin: Name,
    wildcard: Name,
    ttl: u32,
    soa: SOA,
    handler: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    serial: Arc<AtomicU32>,
}

impl std::fmt::Debug for FarmZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FarmZone({})", self.origin)
    }
}

fn fqdn(s: &str, what: &str) -> Result<Name, CertError> {
    let text = format!("{}.", s.trim_end_matches('.'));
    Name::from_ascii(&text).map_err(|e| CertError::InvalidName {
        name: s.to_string(),
        reason: format!("{what}: {e}"),
    })
}

impl FarmZone {
    /// The zone with its apex records and no addresses yet.
    pub fn new(config: &FarmZoneConfig) -> Result<Self, CertError> {
        let origin = fqdn(&config.domain, "farmer domain")?;
        let wildcard = fqdn(&format!("*.{}", config.domain), "farmer domain")?;
        let ns: Vec<Name> = config
            .name_servers
            .iter()
            .map(|n| fqdn(n, "name server"))
            .collect::<Result<_, _>>()?;
        let primary = ns.first().cloned().ok_or_else(|| {
            CertError::Config(format!("zone {origin}: at least one name server is needed"))
        })?;
        let rname = fqdn(&format!("hostmaster.{}", config.domain), "farmer domain")?;
        let serial = 1;
        // Negative answers are cached for the answer TTL too.
        let soa = SOA::new(primary, rname, serial, 300, 60, 86400, config.answer_ttl);
        let mut handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let mut records = vec![Record::from_rdata(
            origin.clone(),
            APEX_TTL,
            RData::SOA(soa.clone()),
        )];
        records.extend(
            ns.into_iter()
                .map(|n| Record::from_rdata(origin.clone(), APEX_TTL, RData::NS(NS(n)))),
        );
        for ca in &config.caa_issuers {
            let ca = fqdn(ca, "CAA issuer")?;
            records.push(Record::from_rdata(
                origin.clone(),
                APEX_TTL,
                RData::CAA(CAA::new_issue(false, Some(ca.clone()), vec![])),
            ));
            records.push(Record::from_rdata(
                origin.clone(),
                APEX_TTL,
                RData::CAA(CAA::new_issuewild(false, Some(ca), vec![])),
            ));
        }
        for r in records {
            if !handler.upsert_mut(r, serial) {
                return Err(CertError::Config(format!("cannot build DNS zone {origin}")));
            }
        }
        Ok(FarmZone {
            origin,
            wildcard,
            ttl: config.answer_ttl,
            soa,
            handler: Arc::new(handler),
            serial: Arc::new(AtomicU32::new(serial)),
        })
    }

    /// The zone's name, `<domain>.`.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// Answers A/AAAA for `<domain>` and `*.<domain>` with `addrs` from now on (and bumps
    /// the SOA serial).
    pub async fn set_addresses(&self, addrs: &[IpAddr]) {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fresh = Vec::new();
        for owner in [&self.origin, &self.wildcard] {
            for a in addrs {
                let rdata = match a {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                };
                fresh.push(Record::from_rdata(owner.clone(), self.ttl, rdata));
            }
        }
        let mut soa = self.soa.clone();
        soa.serial = serial;
        fresh.push(Record::from_rdata(
            self.origin.clone(),
            APEX_TTL,
            RData::SOA(soa),
        ));
        let mut records = self.handler.records_mut().await;
        for owner in [&self.origin, &self.wildcard] {
            for rtype in [RecordType::A, RecordType::AAAA] {
                records.remove(&RrKey::new(LowerName::new(owner), rtype));
            }
        }
        drop(records);
        for r in fresh {
            self.handler.upsert(r, serial).await;
        }
    }

    /// The zone handler, to serve this zone from a catalog.
    pub fn zone_handler(&self) -> Arc<dyn ZoneHandler> {
        Arc::new(WildcardNodata {
            inner: self.handler.clone(),
            origin: LowerName::new(&self.origin),
        })
    }
}

/// Every name below the apex exists through `*.<domain>`, so a query for a type it lacks
/// (AAAA without IPv6 members, CAA, TXT) is NODATA, not the NXDOMAIN the in-memory handler
/// gives (a resolver would cache "no such name" and drop the A answer too).
struct WildcardNodata {
    inner: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    origin: LowerName,
}

impl WildcardNodata {
    fn fix(
        &self,
        name: &LowerName,
        flow: LookupControlFlow<AuthLookup>,
    ) -> LookupControlFlow<AuthLookup> {
        match flow {
            LookupControlFlow::Continue(Err(LookupError::ResponseCode(ResponseCode::NXDomain)))
                if self.origin.zone_of(name) && *name != self.origin =>
            {
                LookupControlFlow::Continue(Err(LookupError::NameExists))
            }
            LookupControlFlow::Break(Err(LookupError::ResponseCode(ResponseCode::NXDomain)))
                if self.origin.zone_of(name) && *name != self.origin =>
            {
                LookupControlFlow::Break(Err(LookupError::NameExists))
            }
            other => other,
        }
    }
}

#[async_trait::async_trait]
impl ZoneHandler for WildcardNodata {
    fn zone_type(&self) -> ZoneType {
        self.inner.zone_type()
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        self.inner.axfr_policy()
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        request_info: Option<&RequestInfo<'_>>,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        let flow = self
            .inner
            .lookup(name, rtype, request_info, lookup_options)
            .await;
        self.fix(name, flow)
    }

    async fn search(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
    ) -> (
        LookupControlFlow<AuthLookup>,
        Option<hickory_server::proto::rr::TSigResponseContext>,
    ) {
        let (flow, tsig) = self.inner.search(request, lookup_options).await;
        let name = request.request_info().map(|i| i.query.name().clone());
        match name {
            Ok(name) => (self.fix(&name, flow), tsig),
            Err(_) => (flow, tsig),
        }
    }

    async fn nsec_records(
        &self,
        name: &LowerName,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.inner.nsec_records(name, lookup_options).await
    }
}
