//! Babel-derived distance-vector routing (RFC 8966 ideas), sans-IO.
//!
//! * link cost = smoothed one-way latency estimate (RTT/2, µs) + a small per-hop cost;
//! * route metric = sum of link costs; metric `METRIC_INFINITY` retracts a route;
//! * (seqno, metric) feasibility distances per prefix: an update is usable only if its seqno
//!   is newer, or equal with a strictly smaller metric, than anything we advertised — this
//!   keeps the route graph loop-free at all times;
//! * triggered updates and retractions on change, periodic full updates, expiry;
//! * seqno requests when only unfeasible routes remain; the owner bumps its seqno, but only
//!   by at most `MAX_SEQNO_REQUEST_AHEAD` past what it (or, for relays, the newest signed
//!   announcement) has: a hostile neighbor cannot push a seqno to `u64::MAX`;
//! * hysteresis: a route is replaced only by one better by more than `hysteresis_us`;
//! * every announcement carries the prefix owner's signature over (prefix, seqno, router
//!   key), and the prefix must be the /64 derived from that key: relays cannot originate or
//!   re-sequence another node's route (they can only pass on what the owner signed).

use std::collections::BTreeMap;

use crate::addr::{Prefix, prefix_for_key};
use crate::clock::Micros;
use crate::identity::{Identity, verify};
use crate::wire::{
    Control, MAX_UPDATES_PER_MESSAGE, METRIC_INFINITY, RouteUpdate, route_signature_input,
};

/// A neighbor (one authenticated link), numbered by the runtime.
pub type Nbr = u64;

/// A seqno request is honoured (by the owner) or forwarded (by a relay) only if it asks for
/// at most this much more than the newest seqno the node knows for the prefix. Legitimate
/// requests ask for `FD.seqno + 1` where FD came from a signed announcement, so they are at
/// most 1 ahead of the owner; a far-ahead request can only be an attempt to exhaust the
/// owner's seqno space (after which it could never announce a newer route).
pub(crate) const MAX_SEQNO_REQUEST_AHEAD: u64 = 256;

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    /// Full routing table sent to every neighbor this often (and the own seqno bumped).
    pub update_interval: Micros,
    /// A route not refreshed for this long is dropped.
    pub route_hold: Micros,
    /// A new route must be better than the current one by more than this (µs).
    pub hysteresis_us: u32,
    /// Minimum spacing of seqno requests for one prefix.
    pub request_interval: Micros,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            update_interval: 15_000_000,
            route_hold: 60_000_000,
            hysteresis_us: 500,
            request_interval: 300_000,
        }
    }
}

/// Reasons routing input was refused, counted.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoutingCounters {
    pub updates_received: u64,
    pub updates_sent: u64,
    pub signatures_verified: u64,
    pub bad_signature: u64,
    pub forged_prefix: u64,
    pub seqno_requests_sent: u64,
    pub seqno_requests_received: u64,
    /// Seqno requests asking too far ahead (see `MAX_SEQNO_REQUEST_AHEAD`), dropped.
    pub seqno_requests_refused: u64,
    pub route_switches: u64,
    /// Announcements of new prefixes refused because the table was full (`max_routes`).
    pub routes_refused: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    seqno: u64,
    metric: u32,
    signature: [u8; 64],
    expires: Micros,
}

#[derive(Debug, Clone)]
struct Dest {
    key: [u8; 32],
    routes: BTreeMap<Nbr, Entry>,
    selected: Option<Nbr>,
    /// Feasibility distance (seqno, metric).
    fd: Option<(u64, u32)>,
    /// Newest (seqno, signature) whose signature checked out.
    verified: Option<(u64, [u8; 64])>,
    /// What we last told neighbors (seqno, metric); None: nothing or a retraction.
    advertised: Option<(u64, u32)>,
    last_request: Option<Micros>,
    forwarded_request: Option<(u64, Micros)>,
}

/// One row of the routing table, for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteInfo {
    pub prefix: String,
    /// Link id of the next hop (see the node's peers).
    pub next_hop: Option<Nbr>,
    /// Overlay address of the next hop (filled in by the node runtime).
    pub via: Option<std::net::Ipv6Addr>,
    pub metric: u32,
    pub seqno: u64,
    pub feasible: bool,
    pub candidates: usize,
}

/// The routing state machine of one node.
pub(crate) struct Router {
    id: Identity,
    prefix: Prefix,
    cfg: RoutingConfig,
    seqno: u64,
    signature: [u8; 64],
    nbrs: BTreeMap<Nbr, u32>,
    table: BTreeMap<Prefix, Dest>,
    /// Prefixes in `table` at most: new prefixes beyond it are refused, known ones are
    /// never evicted to make room.
    max_routes: usize,
    triggered: Vec<Prefix>,
    last_periodic: Micros,
    pub(crate) counters: RoutingCounters,
}

impl Router {
    /// `first_seqno` must exceed seqnos of this identity's earlier runs (real nodes: Unix ms).
    pub(crate) fn new(
        id: Identity,
        cfg: RoutingConfig,
        max_routes: usize,
        first_seqno: u64,
        now: Micros,
    ) -> Router {
        let key = id.public_key();
        let prefix = prefix_for_key(&key);
        let signature = id.sign(&route_signature_input(&prefix, first_seqno, &key));
        Router {
            id,
            prefix,
            cfg,
            seqno: first_seqno,
            signature,
            nbrs: BTreeMap::new(),
            table: BTreeMap::new(),
            max_routes,
            triggered: Vec::new(),
            last_periodic: now,
            counters: RoutingCounters::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn own_prefix(&self) -> Prefix {
        self.prefix
    }

    #[cfg(test)]
    pub(crate) fn own_seqno(&self) -> u64 {
        self.seqno
    }

    /// The neighbor to forward traffic for `prefix` to.
    pub(crate) fn next_hop(&self, prefix: &Prefix) -> Option<Nbr> {
        self.table.get(prefix).and_then(|d| d.selected)
    }

    /// The metric of the selected route to `prefix`.
    #[cfg(test)]
    pub(crate) fn metric(&self, prefix: &Prefix) -> Option<u32> {
        let d = self.table.get(prefix)?;
        let n = d.selected?;
        Some(total(d.routes.get(&n)?.metric, *self.nbrs.get(&n)?))
    }

    fn bump_seqno(&mut self, at_least: u64) {
        self.seqno = self.seqno.max(at_least.saturating_sub(1)).saturating_add(1);
        let key = self.id.public_key();
        self.signature = self
            .id
            .sign(&route_signature_input(&self.prefix, self.seqno, &key));
    }

    fn own_update(&self) -> RouteUpdate {
        RouteUpdate {
            prefix: self.prefix,
            seqno: self.seqno,
            metric: 0,
            router_key: self.id.public_key(),
            signature: self.signature,
        }
    }

    fn advert(&self, prefix: &Prefix, d: &Dest) -> Option<RouteUpdate> {
        match d.selected {
            Some(n) => {
                let e = d.routes.get(&n)?;
                Some(RouteUpdate {
                    prefix: *prefix,
                    seqno: e.seqno,
                    metric: total(e.metric, *self.nbrs.get(&n)?),
                    router_key: d.key,
                    signature: e.signature,
                })
            }
            None => {
                let (seqno, signature) = d.verified?;
                Some(RouteUpdate {
                    prefix: *prefix,
                    seqno,
                    metric: METRIC_INFINITY,
                    router_key: d.key,
                    signature,
                })
            }
        }
    }

    fn full_dump(&self) -> Vec<RouteUpdate> {
        let mut v = vec![self.own_update()];
        v.extend(
            self.table
                .iter()
                .filter(|(_, d)| d.selected.is_some())
                .filter_map(|(p, d)| self.advert(p, d)),
        );
        v
    }

    fn send_updates(
        &mut self,
        to: Option<Nbr>,
        list: Vec<RouteUpdate>,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        if list.is_empty() {
            return;
        }
        let targets: Vec<Nbr> = match to {
            Some(n) => vec![n],
            None => self.nbrs.keys().copied().collect(),
        };
        for chunk in list.chunks(MAX_UPDATES_PER_MESSAGE) {
            for &n in &targets {
                self.counters.updates_sent += chunk.len() as u64;
                out.push((n, Control::Updates(chunk.to_vec())));
            }
        }
    }

    /// A new authenticated link with initial cost (µs).
    pub(crate) fn neighbor_up(&mut self, nbr: Nbr, cost: u32, out: &mut Vec<(Nbr, Control)>) {
        self.nbrs.insert(nbr, cost.max(1));
        let dump = self.full_dump();
        self.send_updates(Some(nbr), dump, out);
    }

    /// A link went down: its routes are gone.
    pub(crate) fn neighbor_down(&mut self, nbr: Nbr, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        self.nbrs.remove(&nbr);
        let affected: Vec<Prefix> = self
            .table
            .iter_mut()
            .filter_map(|(p, d)| d.routes.remove(&nbr).map(|_| *p))
            .collect();
        for p in affected {
            self.reselect(p, now, out);
        }
        self.flush(out);
    }

    /// The link cost to a neighbor changed.
    pub(crate) fn set_cost(
        &mut self,
        nbr: Nbr,
        cost: u32,
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        let Some(c) = self.nbrs.get_mut(&nbr) else {
            return;
        };
        *c = cost.max(1);
        let affected: Vec<Prefix> = self
            .table
            .iter()
            .filter(|(_, d)| d.routes.contains_key(&nbr))
            .map(|(p, _)| *p)
            .collect();
        for p in affected {
            self.reselect(p, now, out);
        }
        self.flush(out);
    }

    /// Route updates received from a neighbor.
    pub(crate) fn handle_updates(
        &mut self,
        nbr: Nbr,
        list: &[RouteUpdate],
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        if !self.nbrs.contains_key(&nbr) {
            return;
        }
        for u in list {
            self.counters.updates_received += 1;
            self.handle_update(nbr, u, now, out);
        }
        self.flush(out);
    }

    fn handle_update(
        &mut self,
        nbr: Nbr,
        u: &RouteUpdate,
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        // The prefix-key binding (a hash) is already checked for prefixes we know.
        let known = self
            .table
            .get(&u.prefix)
            .is_some_and(|d| d.key == u.router_key);
        if !known && prefix_for_key(&u.router_key) != u.prefix {
            self.counters.forged_prefix += 1;
            return;
        }
        if u.prefix == self.prefix {
            // Our own route from an earlier run may carry a higher seqno: move past it.
            if u.router_key == self.id.public_key() && u.seqno > self.seqno && self.verify(u) {
                self.bump_seqno(u.seqno.saturating_add(1));
                self.triggered.push(self.prefix);
            }
            return;
        }
        if !self.table.contains_key(&u.prefix)
            && u.metric != METRIC_INFINITY
            && self.table.len() >= self.max_routes
        {
            // Checked before the signature: a full table costs no verification.
            self.counters.routes_refused += 1;
            return;
        }
        if u.metric == METRIC_INFINITY {
            // A retraction only withdraws this neighbor's own announcement: no signature needed.
            let removed = self
                .table
                .get_mut(&u.prefix)
                .and_then(|d| d.routes.remove(&nbr))
                .is_some();
            if removed {
                self.reselect(u.prefix, now, out);
            }
            return;
        }
        if self
            .table
            .get(&u.prefix)
            .is_some_and(|d| d.key != u.router_key)
        {
            self.counters.forged_prefix += 1;
            return;
        }
        let cached = self
            .table
            .get(&u.prefix)
            .and_then(|d| d.verified)
            .is_some_and(|(s, sig)| s == u.seqno && sig == u.signature);
        if !cached && !self.verify(u) {
            self.counters.bad_signature += 1;
            return;
        }
        let hold = self.cfg.route_hold;
        let d = self.table.entry(u.prefix).or_insert_with(|| Dest {
            key: u.router_key,
            routes: BTreeMap::new(),
            selected: None,
            fd: None,
            verified: None,
            advertised: None,
            last_request: None,
            forwarded_request: None,
        });
        if d.verified.is_none_or(|(s, _)| u.seqno > s) {
            d.verified = Some((u.seqno, u.signature));
        }
        d.routes.insert(
            nbr,
            Entry {
                seqno: u.seqno,
                metric: u.metric,
                signature: u.signature,
                expires: now + hold,
            },
        );
        self.reselect(u.prefix, now, out);
    }

    fn verify(&mut self, u: &RouteUpdate) -> bool {
        self.counters.signatures_verified += 1;
        verify(
            &u.router_key,
            &route_signature_input(&u.prefix, u.seqno, &u.router_key),
            &u.signature,
        )
    }

    /// Picks the best feasible route for a prefix; triggers updates, retractions, requests.
    fn reselect(&mut self, prefix: Prefix, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        let hyst = self.cfg.hysteresis_us;
        let nbrs = &self.nbrs;
        let Some(d) = self.table.get_mut(&prefix) else {
            return;
        };
        let feasible = |fd: Option<(u64, u32)>, e: &Entry| match fd {
            None => true,
            Some((s, m)) => e.seqno > s || (e.seqno == s && e.metric < m),
        };
        let cands: Vec<(Nbr, u32)> = d
            .routes
            .iter()
            .filter(|(n, e)| {
                e.metric != METRIC_INFINITY && nbrs.contains_key(n) && feasible(d.fd, e)
            })
            .map(|(n, e)| (*n, total(e.metric, nbrs[n])))
            .collect();
        let best = cands.iter().min_by_key(|(n, t)| (*t, *n)).copied();
        let current = d
            .selected
            .and_then(|s| cands.iter().find(|(n, _)| *n == s).copied());
        let chosen = match (current, best) {
            (Some(c), Some(b)) if b.1.saturating_add(hyst) >= c.1 => Some(c),
            (_, b) => b,
        };
        let old = d.selected;
        d.selected = chosen.map(|c| c.0);
        if old.is_some() && d.selected.is_some() && old != d.selected {
            self.counters.route_switches += 1;
        }
        match chosen {
            Some((n, t)) => {
                let seqno = d.routes[&n].seqno;
                d.fd = Some(match d.fd {
                    Some((s, m)) if s == seqno => (s, m.min(t)),
                    _ => (seqno, t),
                });
                let changed = match d.advertised {
                    None => true,
                    // Link costs are already smoothed and change only on material RTT
                    // shifts, so every metric change is worth telling.
                    Some((s, m)) => s != seqno || old != d.selected || t != m,
                };
                if changed {
                    d.advertised = Some((seqno, t));
                    self.triggered.push(prefix);
                }
            }
            None => {
                if d.advertised.is_some() {
                    d.advertised = None;
                    self.triggered.push(prefix);
                }
                self.request_if_unfeasible(prefix, now, out);
            }
        }
    }

    fn request_if_unfeasible(
        &mut self,
        prefix: Prefix,
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        let interval = self.cfg.request_interval;
        let Some(d) = self.table.get_mut(&prefix) else {
            return;
        };
        let targets: Vec<Nbr> = d
            .routes
            .iter()
            .filter(|(n, e)| e.metric != METRIC_INFINITY && self.nbrs.contains_key(n))
            .map(|(n, _)| *n)
            .collect();
        if targets.is_empty() || d.last_request.is_some_and(|t| now < t + interval) {
            return;
        }
        d.last_request = Some(now);
        let seqno = d.fd.map_or(0, |(s, _)| s).saturating_add(1);
        for n in targets {
            self.counters.seqno_requests_sent += 1;
            out.push((
                n,
                Control::SeqnoRequest {
                    prefix,
                    seqno,
                    hop_count: 64,
                },
            ));
        }
    }

    /// A seqno request from a neighbor.
    pub(crate) fn handle_request(
        &mut self,
        nbr: Nbr,
        prefix: Prefix,
        seqno: u64,
        hop_count: u8,
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        self.counters.seqno_requests_received += 1;
        if !self.nbrs.contains_key(&nbr) {
            return;
        }
        if prefix == self.prefix {
            if seqno > self.seqno.saturating_add(MAX_SEQNO_REQUEST_AHEAD) {
                self.counters.seqno_requests_refused += 1;
                return;
            }
            if self.seqno < seqno {
                self.bump_seqno(seqno);
                self.triggered.push(self.prefix);
                self.flush(out);
            } else {
                let u = self.own_update();
                self.send_updates(Some(nbr), vec![u], out);
            }
            return;
        }
        let interval = self.cfg.request_interval;
        let Some(d) = self.table.get_mut(&prefix) else {
            return;
        };
        // Relays apply the same bound against the newest seqno the owner signed, so a
        // far-ahead request never reaches the owner.
        let newest = d.verified.map_or(0, |(s, _)| s);
        if seqno > newest.saturating_add(MAX_SEQNO_REQUEST_AHEAD) {
            self.counters.seqno_requests_refused += 1;
            return;
        }
        if d.selected
            .and_then(|sel| d.routes.get(&sel))
            .is_some_and(|e| e.seqno >= seqno)
        {
            if let Some(u) = self.advert(&prefix, &self.table[&prefix]) {
                self.send_updates(Some(nbr), vec![u], out);
            }
            return;
        }
        if hop_count <= 1
            || d.forwarded_request
                .is_some_and(|(s, t)| s >= seqno && now < t + interval)
        {
            return;
        }
        // Forward towards the owner: the selected next hop, else any other neighbor with a route.
        let next = d.selected.filter(|n| *n != nbr).or_else(|| {
            d.routes
                .iter()
                .find(|(n, e)| **n != nbr && e.metric != METRIC_INFINITY)
                .map(|(n, _)| *n)
        });
        if let Some(n) = next {
            d.forwarded_request = Some((seqno, now));
            self.counters.seqno_requests_sent += 1;
            out.push((
                n,
                Control::SeqnoRequest {
                    prefix,
                    seqno,
                    hop_count: hop_count - 1,
                },
            ));
        }
    }

    /// Sends pending triggered updates to all neighbors.
    pub(crate) fn flush(&mut self, out: &mut Vec<(Nbr, Control)>) {
        if self.triggered.is_empty() {
            return;
        }
        let mut prefixes = std::mem::take(&mut self.triggered);
        prefixes.sort_unstable();
        prefixes.dedup();
        let list: Vec<RouteUpdate> = prefixes
            .iter()
            .filter_map(|p| {
                if *p == self.prefix {
                    Some(self.own_update())
                } else {
                    self.table.get(p).and_then(|d| self.advert(p, d))
                }
            })
            .collect();
        self.send_updates(None, list, out);
    }

    /// Expiry, periodic updates and repeated seqno requests.
    pub(crate) fn tick(&mut self, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        let mut affected = Vec::new();
        for (p, d) in self.table.iter_mut() {
            let before = d.routes.len();
            d.routes.retain(|_, e| e.expires > now);
            if d.routes.len() != before || (d.selected.is_none() && !d.routes.is_empty()) {
                affected.push(*p);
            }
        }
        for p in affected {
            self.reselect(p, now, out);
        }
        // Send the retractions of expired routes first: `flush` builds them from the table
        // entries that the next line forgets.
        self.flush(out);
        // Forget prefixes with no routes once their retraction went out.
        self.table
            .retain(|_, d| !d.routes.is_empty() || d.advertised.is_some());
        if now >= self.last_periodic + self.cfg.update_interval {
            self.last_periodic = now;
            self.bump_seqno(self.seqno.saturating_add(1));
            let dump = self.full_dump();
            self.send_updates(None, dump, out);
        }
        self.flush(out);
    }

    /// The routing table, for status.
    pub(crate) fn routes(&self, nbr_name: impl Fn(Nbr) -> Option<Nbr>) -> Vec<RouteInfo> {
        self.table
            .iter()
            .map(|(p, d)| {
                let sel = d.selected.and_then(|n| d.routes.get(&n).map(|e| (n, e)));
                RouteInfo {
                    prefix: crate::addr::prefix_string(p),
                    next_hop: sel.and_then(|(n, _)| nbr_name(n)),
                    via: None,
                    metric: sel.map_or(METRIC_INFINITY, |(n, e)| {
                        total(
                            e.metric,
                            self.nbrs.get(&n).copied().unwrap_or(METRIC_INFINITY),
                        )
                    }),
                    seqno: sel.map_or(d.verified.map_or(0, |v| v.0), |(_, e)| e.seqno),
                    feasible: sel.is_some(),
                    candidates: d.routes.len(),
                }
            })
            .collect()
    }
}

fn total(metric: u32, cost: u32) -> u32 {
    metric.saturating_add(cost).min(METRIC_INFINITY - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(owner: &Identity, seqno: u64, metric: u32) -> RouteUpdate {
        let key = owner.public_key();
        let prefix = prefix_for_key(&key);
        RouteUpdate {
            prefix,
            seqno,
            metric,
            router_key: key,
            signature: owner.sign(&route_signature_input(&prefix, seqno, &key)),
        }
    }

    fn router() -> Router {
        Router::new(
            Identity::from_seed(&[9; 32]),
            RoutingConfig::default(),
            16_384,
            1,
            0,
        )
    }

    #[test]
    fn relays_cannot_resequence_or_originate_foreign_routes() {
        let owner = Identity::from_seed(&[1; 32]);
        let mut r = router();
        let mut out = Vec::new();
        r.neighbor_up(1, 100, &mut out);
        let good = signed(&owner, 5, 1000);
        r.handle_updates(1, &[good], 0, &mut out);
        assert_eq!(r.next_hop(&good.prefix), Some(1));
        // Re-sequenced by a relay: the signature no longer matches.
        let mut reseq = good;
        reseq.seqno = 6;
        r.handle_updates(1, &[reseq], 0, &mut out);
        assert_eq!(r.counters.bad_signature, 1);
        // Originated by someone else for the owner's prefix.
        let mallory = Identity::from_seed(&[2; 32]);
        let mut forged = signed(&mallory, 7, 0);
        forged.prefix = good.prefix;
        r.handle_updates(1, &[forged], 0, &mut out);
        assert_eq!(r.counters.forged_prefix, 1);
        assert_eq!(r.table[&good.prefix].routes[&1].seqno, 5);
    }

    #[test]
    fn feasibility_hysteresis_and_seqno_requests() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        let mut r = router();
        let mut out = Vec::new();
        r.neighbor_up(1, 1000, &mut out);
        r.neighbor_up(2, 1000, &mut out);
        r.handle_updates(1, &[signed(&owner, 5, 10_000)], 0, &mut out);
        assert_eq!((r.next_hop(&p), r.metric(&p)), (Some(1), Some(11_000)));
        // Better by less than the hysteresis: keep the current route.
        r.handle_updates(2, &[signed(&owner, 5, 9_700)], 0, &mut out);
        assert_eq!(r.next_hop(&p), Some(1));
        // Clearly better: switch.
        r.handle_updates(2, &[signed(&owner, 5, 5_000)], 0, &mut out);
        assert_eq!((r.next_hop(&p), r.metric(&p)), (Some(2), Some(6_000)));
        // The new route's link dies; the old one (metric 10 000 ≥ FD 6 000) is unfeasible:
        // no route is selected, a retraction goes out and a seqno request asks for seqno 6.
        out.clear();
        r.neighbor_down(2, 1, &mut out);
        assert_eq!(r.next_hop(&p), None);
        assert!(
            out.iter()
                .any(|(n, c)| *n == 1 && matches!(c, Control::SeqnoRequest { seqno: 6, .. }))
        );
        assert!(out.iter().any(|(_, c)| matches!(c, Control::Updates(l)
            if l.iter().any(|u| u.prefix == p && u.metric == METRIC_INFINITY))));
        // The owner's newer seqno makes the old path feasible again.
        r.handle_updates(1, &[signed(&owner, 6, 10_000)], 2, &mut out);
        assert_eq!(r.next_hop(&p), Some(1));
    }

    #[test]
    fn owner_answers_requests_with_a_higher_signed_seqno() {
        let mut r = router();
        let mut out = Vec::new();
        r.neighbor_up(1, 100, &mut out);
        out.clear();
        let own = r.own_prefix();
        r.handle_request(1, own, 50, 64, 0, &mut out);
        assert_eq!(r.own_seqno(), 50);
        let sent = out.iter().find_map(|(_, c)| match c {
            Control::Updates(l) => l.iter().find(|u| u.prefix == own).copied(),
            _ => None,
        });
        let u = sent.expect("announced");
        assert_eq!(u.seqno, 50);
        assert!(verify(
            &u.router_key,
            &route_signature_input(&own, 50, &u.router_key),
            &u.signature
        ));
    }

    #[test]
    fn far_ahead_seqno_requests_are_refused_and_max_seqno_does_not_panic() {
        let mut r = router();
        let mut out = Vec::new();
        r.neighbor_up(1, 100, &mut out);
        let own = r.own_prefix();
        // A hostile neighbor asks the owner to jump to the end of the seqno space.
        r.handle_request(1, own, u64::MAX, 64, 0, &mut out);
        r.handle_request(1, own, 1 + MAX_SEQNO_REQUEST_AHEAD + 1, 64, 0, &mut out);
        assert_eq!(r.own_seqno(), 1);
        assert_eq!(r.counters.seqno_requests_refused, 2);
        // At the bound the request is honoured.
        r.handle_request(1, own, 1 + MAX_SEQNO_REQUEST_AHEAD, 64, 0, &mut out);
        assert_eq!(r.own_seqno(), 1 + MAX_SEQNO_REQUEST_AHEAD);

        // A relay does not forward a far-ahead request for another node's prefix.
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        r.neighbor_up(2, 100, &mut out);
        r.handle_updates(2, &[signed(&owner, 5, 1000)], 0, &mut out);
        out.clear();
        r.handle_request(1, p, u64::MAX, 64, 0, &mut out);
        r.handle_request(1, p, 5 + MAX_SEQNO_REQUEST_AHEAD + 1, 64, 0, &mut out);
        assert!(
            !out.iter()
                .any(|(_, c)| matches!(c, Control::SeqnoRequest { .. })),
            "far-ahead request forwarded: {out:?}"
        );
        assert_eq!(r.counters.seqno_requests_refused, 4);
        r.handle_request(1, p, 6, 64, 0, &mut out);
        assert!(
            out.iter()
                .any(|(n, c)| *n == 2 && matches!(c, Control::SeqnoRequest { seqno: 6, .. }))
        );

        // Seqnos at the end of the space saturate instead of overflowing.
        let mut top = Router::new(
            Identity::from_seed(&[9; 32]),
            RoutingConfig::default(),
            16_384,
            u64::MAX,
            0,
        );
        top.neighbor_up(1, 100, &mut out);
        let own = top.own_prefix();
        top.handle_request(1, own, u64::MAX, 64, 0, &mut out);
        top.tick(RoutingConfig::default().update_interval, &mut out);
        assert_eq!(top.own_seqno(), u64::MAX);
        // Our own announcement from an "earlier run" at u64::MAX is handled too.
        let mut low = router();
        low.neighbor_up(1, 100, &mut out);
        let me = Identity::from_seed(&[9; 32]);
        low.handle_updates(1, &[signed(&me, u64::MAX, 0)], 0, &mut out);
        assert_eq!(low.own_seqno(), u64::MAX);
    }

    /// Every update this router sent for `p`, as (neighbor, metric).
    fn sent_for(out: &[(Nbr, Control)], p: &Prefix) -> Vec<(Nbr, u32)> {
        out.iter()
            .filter_map(|(n, c)| match c {
                Control::Updates(l) => {
                    Some(l.iter().filter(|u| u.prefix == *p).map(|u| (*n, u.metric)))
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn unrefreshed_routes_expire_after_the_hold_time_and_are_retracted() {
        let hold = RoutingConfig::default().route_hold;
        let kept_owner = Identity::from_seed(&[1; 32]);
        let stale_owner = Identity::from_seed(&[2; 32]);
        let kept = prefix_for_key(&kept_owner.public_key());
        let stale = prefix_for_key(&stale_owner.public_key());
        let mut r = router();
        let mut out = Vec::new();
        r.neighbor_up(1, 100, &mut out);
        r.neighbor_up(2, 100, &mut out);
        r.handle_updates(
            1,
            &[signed(&kept_owner, 5, 1000), signed(&stale_owner, 5, 1000)],
            0,
            &mut out,
        );
        assert_eq!((r.next_hop(&kept), r.next_hop(&stale)), (Some(1), Some(1)));
        // Only `kept` is refreshed (same seqno and metric, as a periodic update would be).
        r.handle_updates(1, &[signed(&kept_owner, 5, 1000)], hold / 2, &mut out);

        // Just before the hold time runs out both routes are still there.
        out.clear();
        r.tick(hold - 1, &mut out);
        assert_eq!((r.next_hop(&kept), r.next_hop(&stale)), (Some(1), Some(1)));
        assert!(
            sent_for(&out, &stale)
                .iter()
                .all(|(_, m)| *m != METRIC_INFINITY)
        );

        // At the hold time the unrefreshed route is gone, and every neighbor is told so.
        out.clear();
        r.tick(hold, &mut out);
        assert_eq!(r.next_hop(&stale), None);
        assert!(
            r.routes(Some)
                .iter()
                .all(|ri| ri.prefix != crate::addr::prefix_string(&stale))
        );
        let retractions = sent_for(&out, &stale);
        assert_eq!(
            retractions,
            vec![(1, METRIC_INFINITY), (2, METRIC_INFINITY)],
            "expired route must be retracted to all neighbors"
        );
        // The refreshed route is kept (its hold runs from the refresh).
        assert_eq!(r.next_hop(&kept), Some(1));
        assert_eq!(r.metric(&kept), Some(1100));
        assert!(
            sent_for(&out, &kept)
                .iter()
                .all(|(_, m)| *m != METRIC_INFINITY)
        );

        // Without a further refresh it expires one hold after the refresh.
        out.clear();
        r.tick(hold / 2 + hold - 1, &mut out);
        assert_eq!(r.next_hop(&kept), Some(1));
        r.tick(hold / 2 + hold, &mut out);
        assert_eq!(r.next_hop(&kept), None);
        assert!(sent_for(&out, &kept).contains(&(2, METRIC_INFINITY)));
    }

    /// Issue 13, item 4: self-made keys could each announce a prefix that every node stores.
    #[test]
    fn a_full_table_refuses_new_prefixes_and_keeps_the_routes_it_has() {
        let owners: Vec<Identity> = (1..=3).map(|k| Identity::from_seed(&[k; 32])).collect();
        let prefix = |o: &Identity| prefix_for_key(&o.public_key());
        let mut r = Router::new(
            Identity::from_seed(&[9; 32]),
            RoutingConfig::default(),
            2,
            1,
            0,
        );
        let mut out = Vec::new();
        r.neighbor_up(1, 100, &mut out);
        let updates: Vec<RouteUpdate> = owners.iter().map(|o| signed(o, 5, 1000)).collect();
        r.handle_updates(1, &updates, 0, &mut out);
        assert_eq!(r.table.len(), 2);
        assert_eq!(r.next_hop(&prefix(&owners[2])), None, "refused");
        assert_eq!(r.counters.routes_refused, 1);
        let verified = r.counters.signatures_verified;
        // Known prefixes still update; a refused one costs no signature check.
        r.handle_updates(
            1,
            &[signed(&owners[0], 6, 900), signed(&owners[2], 6, 1000)],
            1,
            &mut out,
        );
        assert_eq!(r.counters.signatures_verified, verified + 1);
        assert_eq!(r.metric(&prefix(&owners[0])), Some(1000));
        assert_eq!(r.counters.routes_refused, 2);
        // Once a prefix is retracted and forgotten, there is room again.
        let mut gone = signed(&owners[1], 5, 1000);
        gone.metric = METRIC_INFINITY;
        r.handle_updates(1, &[gone], 2, &mut out);
        r.tick(3, &mut out);
        r.handle_updates(1, &[signed(&owners[2], 6, 1000)], 4, &mut out);
        assert_eq!(r.next_hop(&prefix(&owners[2])), Some(1));
    }
}
