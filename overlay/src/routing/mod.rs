//! Babel-derived distance-vector routing (RFC 8966 ideas) over reliable links, sans-IO.
//!
//! * link cost = smoothed one-way latency estimate (RTT/2, µs) + a small per-hop cost;
//! * route metric = sum of link costs;
//! * (seqno, metric) feasibility distances per prefix: an update is usable only if its seqno
//!   is newer, or equal with a strictly smaller metric, than anything we advertised — this
//!   keeps the route graph loop-free at all times;
//! * links are reliable streams (what was sent arrives, or the link dies and both ends know),
//!   so a neighbor's last announcement stays valid until it says otherwise: nothing is
//!   re-sent periodically and nothing expires. Routes change by triggered updates and
//!   retractions only; a link that goes down touches only the routes that used it;
//! * seqno requests when only unfeasible routes remain; the owner bumps its seqno, but only
//!   by at most `MAX_SEQNO_REQUEST_AHEAD` past what it (or, for relays, the newest signed
//!   announcement) has: a hostile neighbor cannot push a seqno to `u64::MAX`. Seqnos change
//!   only then: an owner never re-signs on a timer;
//! * split horizon: a route is not announced to its next hop, which gets a retraction;
//! * a node that loses its last feasible route to a link failure or a neighbor's update holds
//!   its retraction briefly while its seqno request is answered (`retraction_hold`);
//! * hysteresis: a route is replaced only by one better by more than `hysteresis_us`;
//! * every announcement carries the prefix owner's signature over (prefix, seqno, router
//!   key), and the prefix must be the /64 derived from that key: relays cannot originate or
//!   re-sequence another node's route (they can only pass on what the owner signed). A
//!   signed (prefix, seqno) is verified once, however many neighbors pass it on.

mod table;
mod verified;

use std::collections::{BTreeMap, BTreeSet};

use crate::addr::{Prefix, prefix_for_key};
use crate::clock::Micros;
use crate::identity::{Identity, verify};
use crate::wire::{
    Control, MAX_RETRACTIONS_PER_MESSAGE, MAX_UPDATES_PER_MESSAGE, METRIC_INFINITY, RouteUpdate,
    route_signature_input,
};
use table::{
    Dest, Entry, MAX_ENTRY_LAG, NEVER_SENT, NO_SLOT, Slot, Table, pacing_elapsed_ms, pacing_stamp,
};
pub use verified::SharedVerifications;
use verified::{VerifiedCache, digest};

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
    /// A new route must be better than the current one by more than this (µs).
    pub hysteresis_us: u32,
    /// Minimum spacing of seqno requests for one prefix.
    pub request_interval: Micros,
    /// Minimum spacing of broadcast changes of one prefix. The first change goes out at
    /// once; further changes within this interval are held and only the latest state is
    /// sent when it ends. Without it, a dead node's routes are explored path by path
    /// (every intermediate state sent on), which grew without bound under churn.
    pub update_pacing: Micros,
    /// How long a node that lost its last feasible route to a link failure or a neighbor's
    /// update, but still holds unfeasible ones, waits for the answer to its seqno request
    /// before it retracts (0: at once). If a route comes back in time, its neighbors hear one
    /// update instead of a retraction and an update, and the nodes behind them do not
    /// starve and ask in turn. A loss caused by a retraction received is passed on at once
    /// (the node that held it waited already).
    pub retraction_hold: Micros,
    /// How long a worse metric is held back when a retraction received took the selected
    /// route and the node fell back on a worse feasible one (0: sent at once). When a node
    /// dies, its prefix's alternatives are withdrawn one after the other (its neighbors
    /// notice at different times): without the hold, every node passed on each ever-worse
    /// fallback before its retraction. If the fallback goes too within the hold, only the
    /// retraction is sent. Traffic keeps flowing over the fallback meanwhile.
    pub worse_hold: Micros,
    /// Simulator only: verification results shared by all simulated nodes.
    pub(crate) shared_verifications: Option<SharedVerifications>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            hysteresis_us: 500,
            request_interval: 300_000,
            update_pacing: 100_000,
            retraction_hold: 300_000,
            worse_hold: 300_000,
            shared_verifications: None,
        }
    }
}

/// Reasons routing input was refused, counted.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoutingCounters {
    /// Route entries received (in Updates messages) and sent.
    pub updates_received: u64,
    pub updates_sent: u64,
    /// Prefixes retracted by neighbors, and by this node (per neighbor told).
    pub retractions_received: u64,
    pub retractions_sent: u64,
    /// Signature verifications performed.
    pub signatures_verified: u64,
    /// Announcements whose signature was already verified here: not checked again.
    pub signatures_reused: u64,
    pub bad_signature: u64,
    pub forged_prefix: u64,
    pub seqno_requests_sent: u64,
    pub seqno_requests_received: u64,
    /// Seqno requests asking too far ahead (see `MAX_SEQNO_REQUEST_AHEAD`), dropped.
    pub seqno_requests_refused: u64,
    /// Times this node raised its own seqno on request (the new seqno travels back only
    /// along the requests' paths).
    pub seqno_bumps: u64,
    /// Routes sent to neighbors that had asked for a newer seqno (not broadcast).
    pub seqno_answers_sent: u64,
    /// Changes of a prefix held back because the prefix changed less than `update_pacing`
    /// ago (sent, coalesced, when the interval ends).
    pub updates_paced: u64,
    /// Retractions held back while a seqno request was out (see `retraction_hold`), and
    /// those of them never sent because a feasible route came back in time.
    pub retractions_held: u64,
    pub retractions_spared: u64,
    /// Worse metrics held back after a retraction received (see `worse_hold`), and those of
    /// them never sent because a retraction replaced them.
    pub worse_held: u64,
    pub worse_spared: u64,
    /// Seqno requests not forwarded because this node's own request for the prefix, as
    /// new or newer, went out to every neighbor with a route less than a request interval
    /// ago.
    pub seqno_requests_suppressed: u64,
    pub route_switches: u64,
    /// Announcements of new prefixes refused because the table was full (`max_routes`).
    pub routes_refused: u64,
    /// Announcements more than 65,534 seqnos older than the newest one known: dropped.
    pub stale_updates: u64,
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

/// A relay remembers who asked it for a newer seqno this long after the last ask, so the
/// answer goes back along the request's path even when the owner is many hops away.
const REQUESTERS_HOLD: Micros = 5_000_000;

/// Seqno request state of one prefix (kept only while a request is recent).
#[derive(Debug, Clone, Default)]
struct Requests {
    last_sent: Option<Micros>,
    forwarded: Option<(u64, Micros)>,
    /// Neighbors waiting for a route with seqno ≥ `wanted`: at most one entry per
    /// neighbor, so bounded by the link limit. They get the route once it is selected.
    asked_by: Vec<Nbr>,
    wanted: u64,
    asked_at: Micros,
    /// Requests sent for a clearly better but unfeasible route (see `BETTER_ATTEMPTS`).
    better_asked: u8,
    /// Requests sent while the prefix starves (each repeat waits twice as long, up to 8×).
    starving_asked: u8,
    /// No request for this prefix before then: it starves because a retraction took its
    /// route, so it is likely being withdrawn (see `RoutingConfig::worse_hold`).
    quiet_until: Micros,
}

/// A node asks this many times (one request interval apart) for a newer seqno of a
/// clearly better route that is unfeasible, then settles for the route it has.
const BETTER_ATTEMPTS: u8 = 4;

/// How long a prefix with no route left keeps its record and feasibility distance (Babel
/// keeps its source table 3 minutes for the same reason).
const FD_HOLD: Micros = 60_000_000;

/// The routing state machine of one node.
pub(crate) struct Router {
    id: Identity,
    key: [u8; 32],
    prefix: Prefix,
    cfg: RoutingConfig,
    seqno: u64,
    signature: [u8; 64],
    nbrs: BTreeMap<Nbr, Slot>,
    /// By slot: the neighbor and its link cost.
    slots: Vec<Option<(Nbr, u32)>>,
    table: Table,
    /// Signatures of seqnos older than a prefix's newest, while an entry refers to them.
    old_sigs: BTreeMap<(Prefix, u64), [u8; 64]>,
    /// Prefixes in `table` at most: new prefixes beyond it are refused, known ones are
    /// never evicted to make room.
    max_routes: usize,
    /// Prefixes whose advertisement changed, sent at the next `flush`.
    triggered: Vec<Prefix>,
    /// Prefixes with a selected route and a clearly better unfeasible one: requests for
    /// a newer seqno are repeated for them (see `BETTER_ATTEMPTS`).
    improvable: BTreeSet<Prefix>,
    /// Prefixes with no route left, by when they lost it: the record (and its feasibility
    /// distance) is kept for `FD_HOLD`, because stale announcements derived from ours may
    /// still be on their way back to us (a fresh record would accept them: a loop).
    /// At most one per record in the table.
    forgetting: BTreeMap<Prefix, Micros>,
    /// Prefixes whose change waits for the end of its pacing interval: at most one entry per
    /// prefix in the table.
    paced: BTreeSet<Prefix>,
    /// Prefixes whose selected route now answers pending seqno requests: sent at the next
    /// `flush` to the neighbors that asked (a seqno change alone is not broadcast).
    answers: Vec<Prefix>,
    /// Seqno requests to send after the updates and retractions of the same `flush`. A
    /// request may be dropped when a link's queue is full (it is repeated), an update may
    /// not (the link is closed): queued first, one frame per prefix, the requests sent when
    /// a relay died filled the queues and closed every link of the node that saw it die.
    requests_out: Vec<(Nbr, Control)>,
    /// Prefixes reselected since the last `flush` (forgotten there if left empty).
    touched: Vec<Prefix>,
    /// Prefixes with entries but no feasible one: seqno requests are repeated for them.
    starving: BTreeSet<Prefix>,
    /// Starving prefixes whose retraction waits for an answer, until when (see
    /// `RoutingConfig::retraction_hold`). At most one per prefix in the table.
    holding: BTreeMap<Prefix, Micros>,
    /// Prefixes whose worse metric waits, until when (see `RoutingConfig::worse_hold`). At
    /// most one per prefix in the table.
    damped: BTreeMap<Prefix, Micros>,
    requests: BTreeMap<Prefix, Requests>,
    verified: VerifiedCache,
    /// Prefixes with a selected (hence advertised) route.
    selected_count: usize,
    /// Set while the runtime hands over several messages that arrived together: updates
    /// and retractions then wait for `release` and go out as one flush (fewer, fuller
    /// messages; the same rules).
    held: bool,
    pub(crate) counters: RoutingCounters,
}

impl Router {
    /// `first_seqno` must exceed seqnos of this identity's earlier runs (real nodes: Unix ms).
    pub(crate) fn new(
        id: Identity,
        cfg: RoutingConfig,
        max_routes: usize,
        first_seqno: u64,
        _now: Micros,
    ) -> Router {
        let key = id.public_key();
        let prefix = prefix_for_key(&key);
        let signature = id.sign(&route_signature_input(&prefix, first_seqno, &key));
        Router {
            id,
            key,
            prefix,
            cfg,
            seqno: first_seqno,
            signature,
            nbrs: BTreeMap::new(),
            slots: Vec::new(),
            table: Table::default(),
            old_sigs: BTreeMap::new(),
            max_routes,
            triggered: Vec::new(),
            answers: Vec::new(),
            requests_out: Vec::new(),
            paced: BTreeSet::new(),
            improvable: BTreeSet::new(),
            forgetting: BTreeMap::new(),
            touched: Vec::new(),
            starving: BTreeSet::new(),
            holding: BTreeMap::new(),
            damped: BTreeMap::new(),
            requests: BTreeMap::new(),
            verified: VerifiedCache::default(),
            selected_count: 0,
            held: false,
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

    /// Prefixes in the table.
    pub(crate) fn len(&self) -> usize {
        self.table.len() - self.forgetting.len()
    }

    /// Prefixes with a selected route.
    pub(crate) fn selected_count(&self) -> usize {
        self.selected_count
    }

    fn nbr_of(&self, slot: Slot) -> Option<(Nbr, u32)> {
        self.slots.get(usize::from(slot)).copied().flatten()
    }

    /// The neighbor to forward traffic for `prefix` to.
    pub(crate) fn next_hop(&self, prefix: &Prefix) -> Option<Nbr> {
        let d = self.table.get(prefix)?;
        (d.selected != NO_SLOT)
            .then(|| self.nbr_of(d.selected).map(|(n, _)| n))
            .flatten()
    }

    /// The metric of the selected route to `prefix`.
    #[cfg(test)]
    pub(crate) fn metric(&self, prefix: &Prefix) -> Option<u32> {
        let d = self.table.get(prefix)?;
        let e = d.entry(d.selected)?;
        Some(total(e.metric, self.nbr_of(e.slot)?.1))
    }

    fn bump_seqno(&mut self, at_least: u64) {
        self.counters.seqno_bumps += 1;
        self.seqno = self.seqno.max(at_least.saturating_sub(1)).saturating_add(1);
        self.signature = self
            .id
            .sign(&route_signature_input(&self.prefix, self.seqno, &self.key));
    }

    fn own_update(&self) -> RouteUpdate {
        RouteUpdate {
            prefix: self.prefix,
            seqno: self.seqno,
            metric: 0,
            router_key: self.key,
            signature: self.signature,
        }
    }

    /// The announcement of the selected route, if there is one.
    fn advert(&self, prefix: &Prefix, d: &Dest) -> Option<RouteUpdate> {
        let e = d.entry(d.selected)?;
        let seqno = d.seqno_at(e.lag);
        let signature = if e.lag == 0 {
            d.sig
        } else {
            *self.old_sigs.get(&(*prefix, seqno))?
        };
        Some(RouteUpdate {
            prefix: *prefix,
            seqno,
            metric: total(e.metric, self.nbr_of(e.slot)?.1),
            router_key: d.key,
            signature,
        })
    }

    fn full_dump(&self) -> Vec<RouteUpdate> {
        let mut v = vec![self.own_update()];
        v.extend(self.table.iter().filter_map(|(p, d)| self.advert(&p, d)));
        v
    }

    fn send(
        &mut self,
        targets: &[Nbr],
        updates: &[RouteUpdate],
        retractions: &[Prefix],
        out: &mut Vec<(Nbr, Control)>,
    ) {
        for &n in targets {
            for chunk in updates.chunks(MAX_UPDATES_PER_MESSAGE) {
                self.counters.updates_sent += chunk.len() as u64;
                out.push((n, Control::Updates(chunk.to_vec())));
            }
            for chunk in retractions.chunks(MAX_RETRACTIONS_PER_MESSAGE) {
                self.counters.retractions_sent += chunk.len() as u64;
                out.push((n, Control::Retractions(chunk.to_vec())));
            }
        }
    }

    /// A new authenticated link with initial cost (µs): it gets our whole table, once.
    pub(crate) fn neighbor_up(&mut self, nbr: Nbr, cost: u32, out: &mut Vec<(Nbr, Control)>) {
        if self.nbrs.contains_key(&nbr) {
            return;
        }
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        // Links are capped far below 65,535 (`max_links`), but never wrap.
        let Ok(slot16) = Slot::try_from(slot) else {
            return;
        };
        if slot16 == NO_SLOT {
            return;
        }
        self.slots[slot] = Some((nbr, cost.max(1)));
        self.nbrs.insert(nbr, slot16);
        let dump = self.full_dump();
        self.send(&[nbr], &dump, &[], out);
    }

    /// A link went down: the routes it carried are reselected; only those whose
    /// advertisement changes are sent on.
    pub(crate) fn neighbor_down(&mut self, nbr: Nbr, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        let Some(slot) = self.nbrs.remove(&nbr) else {
            return;
        };
        self.slots[usize::from(slot)] = None;
        let affected = self.table.with_entry_from(slot, |d| d.remove_entry(slot));
        for p in affected {
            self.gc_old_sigs(&p);
            self.reselect(p, now, true);
        }
        self.flush(now, out);
    }

    /// The link cost to a neighbor changed.
    pub(crate) fn set_cost(
        &mut self,
        nbr: Nbr,
        cost: u32,
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        let Some(&slot) = self.nbrs.get(&nbr) else {
            return;
        };
        self.slots[usize::from(slot)] = Some((nbr, cost.max(1)));
        let affected = self.table.with_entry_from(slot, |_| true);
        for p in affected {
            self.reselect(p, now, true);
        }
        self.flush(now, out);
    }

    /// Route updates received from a neighbor.
    pub(crate) fn handle_updates(
        &mut self,
        nbr: Nbr,
        list: &[RouteUpdate],
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        let Some(&slot) = self.nbrs.get(&nbr) else {
            return;
        };
        for u in list {
            self.counters.updates_received += 1;
            if u.metric == METRIC_INFINITY {
                self.retract(slot, u.prefix, now);
            } else {
                self.handle_update(slot, u, now);
            }
        }
        if !self.held {
            self.flush(now, out);
        }
    }

    /// Retractions received from a neighbor.
    pub(crate) fn handle_retractions(
        &mut self,
        nbr: Nbr,
        list: &[Prefix],
        now: Micros,
        out: &mut Vec<(Nbr, Control)>,
    ) {
        let Some(&slot) = self.nbrs.get(&nbr) else {
            return;
        };
        for p in list {
            self.counters.retractions_received += 1;
            self.retract(slot, *p, now);
        }
        if !self.held {
            self.flush(now, out);
        }
    }

    /// Whether updates wait for `release` (see `hold`).
    pub(crate) fn is_held(&self) -> bool {
        self.held
    }

    /// Updates and retractions handled from now on are sent at `release`, together.
    pub(crate) fn hold(&mut self) {
        self.held = true;
    }

    /// Sends what changed since `hold`.
    pub(crate) fn release(&mut self, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        if std::mem::take(&mut self.held) {
            self.flush(now, out);
        }
    }

    /// A retraction only withdraws this neighbor's own announcement: no signature needed.
    fn retract(&mut self, slot: Slot, prefix: Prefix, now: Micros) {
        let Some(idx) = self.table.find(&prefix) else {
            return;
        };
        if self.table.at_mut(idx).remove_entry(slot) {
            self.gc_old_sigs(&prefix);
            self.reselect_at(prefix, idx, now, false);
        }
    }

    fn handle_update(&mut self, slot: Slot, u: &RouteUpdate, now: Micros) {
        let idx = self.table.find(&u.prefix);
        let known = idx.map(|i| self.table.at(i));
        // The prefix-key binding (a hash) is already checked for prefixes we know.
        if known.is_some_and(|d| d.key != u.router_key)
            || (known.is_none() && prefix_for_key(&u.router_key) != u.prefix)
        {
            self.counters.forged_prefix += 1;
            return;
        }
        if u.prefix == self.prefix {
            // Our own route from an earlier run may carry a higher seqno: move past it.
            if u.router_key == self.key && u.seqno > self.seqno && self.check_signature(u, None) {
                self.bump_seqno(u.seqno.saturating_add(1));
                self.triggered.push(self.prefix);
            }
            return;
        }
        if idx.is_none() && self.table.len() >= self.max_routes {
            // A full table first lets go of the oldest record kept only for its
            // feasibility distance; else the new prefix is refused.
            let oldest = self
                .forgetting
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(p, _)| *p);
            match oldest {
                Some(p) => {
                    self.forgetting.remove(&p);
                    self.table.remove(&p);
                    self.gc_old_sigs(&p);
                }
                None => {
                    // Checked before the signature: a full table costs no verification.
                    self.counters.routes_refused += 1;
                    return;
                }
            }
        }
        let known = idx.map(|i| self.table.at(i));
        if known.is_some_and(|d| u.seqno < d.seqno && d.seqno - u.seqno > u64::from(MAX_ENTRY_LAG))
        {
            self.counters.stale_updates += 1;
            self.retract(slot, u.prefix, now);
            return;
        }
        if !self.check_signature(u, idx) {
            self.counters.bad_signature += 1;
            return;
        }
        let idx = match idx {
            Some(i) => i,
            None => self.table.insert(
                u.prefix,
                Dest::new(u.prefix, u.router_key, u.seqno, u.signature),
            ),
        };
        let d = self.table.at_mut(idx);
        let mut old_sig = None;
        let advanced = u.seqno > d.seqno;
        if advanced {
            // Entries still on the old newest seqno keep its signature reachable.
            if d.routes.iter().any(|e| e.lag == 0) {
                old_sig = Some((d.seqno, d.sig));
            }
            d.advance(u.seqno, u.signature);
        } else if u.seqno < d.seqno {
            old_sig = Some((u.seqno, u.signature));
        }
        let lag = d.seqno.saturating_sub(u.seqno) as u16;
        let before = d.entry(slot).map(|e| e.lag);
        d.set_entry(Entry {
            slot,
            lag,
            metric: u.metric,
        });
        if let Some((s, sig)) = old_sig {
            self.old_sigs.entry((u.prefix, s)).or_insert(sig);
        }
        if old_sig.is_some() || advanced || before.is_some_and(|l| l != lag) {
            self.gc_old_sigs(&u.prefix);
        }
        self.reselect_at(u.prefix, idx, now, true);
    }

    /// Whether `u`'s signature is good, verifying it only if this node has not already.
    /// `idx`: the prefix's record, if it has one.
    fn check_signature(&mut self, u: &RouteUpdate, idx: Option<u32>) -> bool {
        let known = idx.is_some_and(|i| {
            let d = self.table.at(i);
            d.key == u.router_key
                && ((d.seqno == u.seqno && d.sig == u.signature)
                    || (u.seqno < d.seqno
                        && self.old_sigs.get(&(u.prefix, u.seqno)) == Some(&u.signature)))
        });
        if known {
            self.counters.signatures_reused += 1;
            return true;
        }
        let dg = digest(&u.router_key, &u.prefix, u.seqno, &u.signature);
        if self.verified.contains(&dg) {
            self.counters.signatures_reused += 1;
            return true;
        }
        self.counters.signatures_verified += 1;
        let shared = self.cfg.shared_verifications.as_ref();
        let ok = shared.is_some_and(|s| s.contains(&dg))
            || verify(
                &u.router_key,
                &route_signature_input(&u.prefix, u.seqno, &u.router_key),
                &u.signature,
            );
        if ok {
            self.verified.insert(&dg);
            if let Some(s) = shared {
                s.insert(dg);
            }
        }
        ok
    }

    /// Drops old signatures of `prefix` that no entry refers to any more.
    fn gc_old_sigs(&mut self, prefix: &Prefix) {
        let range = (*prefix, 0)..=(*prefix, u64::MAX);
        if self.old_sigs.range(range.clone()).next().is_none() {
            return;
        }
        let keep: Vec<u64> = match self.table.get(prefix) {
            Some(d) => d
                .routes
                .iter()
                .filter(|e| e.lag > 0)
                .map(|e| d.seqno_at(e.lag))
                .collect(),
            None => Vec::new(),
        };
        let stale: Vec<(Prefix, u64)> = self
            .old_sigs
            .range(range)
            .filter(|((_, s), _)| !keep.contains(s))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.old_sigs.remove(&k);
        }
    }

    /// Picks the best feasible route for a prefix; triggers updates, retractions, requests.
    /// `may_hold`: a retraction this causes may wait for a seqno answer (not when the cause
    /// was a retraction received).
    fn reselect(&mut self, prefix: Prefix, now: Micros, may_hold: bool) {
        if let Some(idx) = self.table.find(&prefix) {
            self.reselect_at(prefix, idx, now, may_hold);
        }
    }

    /// As `reselect`, for the prefix's record number (one index lookup less per update).
    fn reselect_at(&mut self, prefix: Prefix, idx: u32, now: Micros, may_hold: bool) {
        let hyst = self.cfg.hysteresis_us;
        let slots = &self.slots;
        // Pending requests are answered once the selected route satisfies them. (Switching
        // to a worse route just to answer them made relays flap: it is not done.)
        let wanted = self
            .requests
            .get(&prefix)
            .filter(|r| !r.asked_by.is_empty())
            .map(|r| r.wanted);
        let d = self.table.at_mut(idx);
        self.touched.push(prefix);
        let has_fd = d.fd_metric != METRIC_INFINITY;
        let (fd_lag, fd_metric) = (d.fd_lag, d.fd_metric);
        // Lower lag = newer seqno.
        let feasible =
            |e: &Entry| !has_fd || e.lag < fd_lag || (e.lag == fd_lag && e.metric < fd_metric);
        let mut best: Option<(u32, Nbr, Slot)> = None;
        let mut current = None;
        for e in d.routes.iter().filter(|e| feasible(e)) {
            let Some((nbr, cost)) = slots.get(usize::from(e.slot)).copied().flatten() else {
                continue;
            };
            let t = total(e.metric, cost);
            if best.is_none_or(|b| (t, nbr) < (b.0, b.1)) {
                best = Some((t, nbr, e.slot));
            }
            if e.slot == d.selected {
                current = Some((t, nbr, e.slot));
            }
        }
        let chosen = match (current, best) {
            (Some(c), Some(b)) if b.0.saturating_add(hyst) >= c.0 => Some(c),
            (_, b) => b,
        };
        let old = d.selected;
        let was_advertised = d.adv_metric != METRIC_INFINITY;
        d.selected = chosen.map_or(NO_SLOT, |c| c.2);
        // `adv_metric` is finite exactly while a route is selected.
        match (was_advertised, chosen.is_some()) {
            (false, true) => self.selected_count += 1,
            (true, false) => self.selected_count -= 1,
            _ => {}
        }
        if old != NO_SLOT && d.selected != NO_SLOT && old != d.selected {
            self.counters.route_switches += 1;
        }
        match chosen {
            Some((t, _, slot)) => {
                let lag = d.entry(slot).map_or(0, |e| e.lag);
                if has_fd && d.fd_lag == lag {
                    d.fd_metric = d.fd_metric.min(t);
                } else {
                    (d.fd_lag, d.fd_metric) = (lag, t);
                }
                // Neighbors hear of a new route or a new metric. A newer seqno alone (same
                // metric) goes only to those who asked for it: broadcasting every seqno an
                // owner raises made each request a network-wide wave. Loop freedom does not
                // need the broadcast: it rests on our feasibility distance, which only ever
                // improves and is at least as good as anything we told anyone.
                // A new next hop with the same metric is broadcast too: the old next hop
                // was sent a retraction (split horizon) and must hear the route again.
                if d.adv_metric != t || old != d.selected {
                    self.triggered.push(prefix);
                    // A retraction received took the route and we fell back on a worse one:
                    // when a node died, that one is likely withdrawn next (see `worse_hold`).
                    let worse = was_advertised && t > d.adv_metric;
                    let hold = self.cfg.worse_hold;
                    if worse && !may_hold && hold > 0 {
                        if let std::collections::btree_map::Entry::Vacant(v) =
                            self.damped.entry(prefix)
                        {
                            v.insert(now.saturating_add(hold));
                            self.counters.worse_held += 1;
                        }
                    } else if !worse && !self.damped.is_empty() {
                        self.damped.remove(&prefix);
                    }
                }
                (d.adv_lag, d.adv_metric) = (lag, t);
                if wanted.is_some_and(|w| d.seqno_at(lag) >= w) {
                    self.answers.push(prefix);
                }
                if self.starving.remove(&prefix)
                    && let Some(r) = self.requests.get_mut(&prefix)
                {
                    (r.starving_asked, r.quiet_until) = (0, 0);
                }
                if !self.holding.is_empty() && self.holding.remove(&prefix).is_some() {
                    self.counters.retractions_spared += 1;
                }
                // A neighbor offering a clearly better route that is unfeasible here may
                // well have a newer seqno by now (newer seqnos alone are not broadcast):
                // ask it for one that would be feasible (Babel, RFC 8966 §3.8.2.2).
                if better_unfeasible(d, slots, hyst).next().is_none() {
                    if self.improvable.remove(&prefix)
                        && let Some(r) = self.requests.get_mut(&prefix)
                    {
                        r.better_asked = 0;
                    }
                } else {
                    self.improvable.insert(prefix);
                    self.request_better(prefix, now);
                }
            }
            None => {
                let no_routes = d.routes.is_empty();
                if !self.damped.is_empty() && self.damped.remove(&prefix).is_some() {
                    self.counters.worse_spared += 1;
                }
                if d.adv_metric != METRIC_INFINITY {
                    d.adv_metric = METRIC_INFINITY;
                    self.triggered.push(prefix);
                    // DUAL's "active" state, briefly: the unfeasible routes left may become
                    // feasible once the request just sent is answered.
                    let hold = self.cfg.retraction_hold;
                    if may_hold && !no_routes && hold > 0 {
                        self.holding.insert(prefix, now.saturating_add(hold));
                        self.counters.retractions_held += 1;
                    }
                }
                self.improvable.remove(&prefix);
                if no_routes {
                    self.starving.remove(&prefix);
                    // Nothing left to wait for: the retraction goes now.
                    if !self.holding.is_empty() && self.holding.remove(&prefix).is_some() {
                        self.triggered.push(prefix);
                    }
                } else {
                    if self.starving.insert(prefix) && !may_hold {
                        // Starving because a neighbor retracted: its own request went out
                        // (or it had no route left), and the routes left are likely being
                        // withdrawn too. Ask only if they are still there after the hold.
                        let hold = self.cfg.worse_hold;
                        self.requests.entry(prefix).or_default().quiet_until =
                            now.saturating_add(hold);
                    }
                    self.request_if_unfeasible(prefix, now);
                }
            }
        }
    }

    /// Neighbors whose route to `prefix` is unfeasible here but clearly better than the
    /// selected one, each with the seqno that would make it feasible.
    fn better_unfeasible(&self, prefix: Prefix) -> Vec<(Nbr, u64)> {
        match self.table.get(&prefix) {
            Some(d) => better_unfeasible(d, &self.slots, self.cfg.hysteresis_us).collect(),
            None => Vec::new(),
        }
    }

    /// Asks the neighbors of `better_unfeasible` for a newer seqno: once per request
    /// interval, at most `BETTER_ATTEMPTS` times while the prefix stays improvable.
    fn request_better(&mut self, prefix: Prefix, now: Micros) {
        // While a worse metric is held, the prefix is likely being withdrawn: asked after.
        if self.damped.contains_key(&prefix) {
            return;
        }
        let interval = self.cfg.request_interval;
        let better = self.better_unfeasible(prefix);
        let req = self.requests.entry(prefix).or_default();
        if better.is_empty()
            || req.better_asked >= BETTER_ATTEMPTS
            || req.last_sent.is_some_and(|at| now < at + interval)
        {
            return;
        }
        req.last_sent = Some(now);
        req.better_asked += 1;
        for (n, seqno) in better {
            self.counters.seqno_requests_sent += 1;
            self.requests_out.push((
                n,
                Control::SeqnoRequest {
                    prefix,
                    seqno,
                    hop_count: 64,
                },
            ));
        }
    }

    fn request_if_unfeasible(&mut self, prefix: Prefix, now: Micros) {
        let interval = self.cfg.request_interval;
        let Some(d) = self.table.get(&prefix) else {
            return;
        };
        let targets: Vec<Nbr> = d
            .routes
            .iter()
            .filter_map(|e| self.nbr_of(e.slot).map(|(n, _)| n))
            .collect();
        let req = self.requests.entry(prefix).or_default();
        // Repeats back off (×2 each, up to ×8): a dead owner's prefix starves everywhere
        // until its retraction arrives, and every repeat travels towards the owner.
        let interval = interval << req.starving_asked.min(3);
        if targets.is_empty()
            || now < req.quiet_until
            || req.last_sent.is_some_and(|t| now < t + interval)
        {
            return;
        }
        req.last_sent = Some(now);
        req.starving_asked = req.starving_asked.saturating_add(1);
        let fd_seqno = if d.fd_metric == METRIC_INFINITY {
            0
        } else {
            d.seqno_at(d.fd_lag)
        };
        let seqno = fd_seqno.saturating_add(1);
        // It covers requests neighbors send us meanwhile: they are not forwarded again.
        if req.forwarded.is_none_or(|(s, _)| s <= seqno) {
            req.forwarded = Some((seqno, now));
        }
        for n in targets {
            self.counters.seqno_requests_sent += 1;
            self.requests_out.push((
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
            // Only the asker needs the newer seqno: it travels back along the request's path.
            if self.seqno < seqno {
                self.bump_seqno(seqno);
            }
            let u = self.own_update();
            self.counters.seqno_answers_sent += 1;
            self.send(&[nbr], &[u], &[], out);
            return;
        }
        let interval = self.cfg.request_interval;
        let Some(d) = self.table.get(&prefix) else {
            return;
        };
        // Relays apply the same bound against the newest seqno the owner signed, so a
        // far-ahead request never reaches the owner.
        if seqno > d.seqno.saturating_add(MAX_SEQNO_REQUEST_AHEAD) {
            self.counters.seqno_requests_refused += 1;
            return;
        }
        if d.entry(d.selected)
            .is_some_and(|e| d.seqno_at(e.lag) >= seqno)
        {
            if let Some(u) = self.advert(&prefix, d) {
                self.send(&[nbr], &[u], &[], out);
            }
            return;
        }
        // Forward towards the owner: the selected next hop, else any other neighbor with a route.
        let next = d
            .entry(d.selected)
            .into_iter()
            .chain(d.routes.iter())
            .filter_map(|e| self.nbr_of(e.slot).map(|(n, _)| n))
            .find(|n| *n != nbr);
        // Remember the asker (once per neighbor) so the answer finds its way back.
        let req = self.requests.entry(prefix).or_default();
        if !req.asked_by.contains(&nbr) {
            req.asked_by.push(nbr);
        }
        req.wanted = req.wanted.max(seqno);
        req.asked_at = now;
        // One forwarded request per (prefix, seqno) per interval: duplicates from other
        // askers wait for the same answer.
        if hop_count <= 1 {
            return;
        }
        if req
            .forwarded
            .is_some_and(|(s, t)| s >= seqno && now < t + interval)
        {
            self.counters.seqno_requests_suppressed += 1;
            return;
        }
        if let Some(n) = next {
            req.forwarded = Some((seqno, now));
            self.counters.seqno_requests_sent += 1;
            self.requests_out.push((
                n,
                Control::SeqnoRequest {
                    prefix,
                    seqno,
                    hop_count: hop_count - 1,
                },
            ));
            // While input is held, after the updates `release` sends.
            if !self.held {
                out.append(&mut self.requests_out);
            }
        }
    }

    /// A seqno request for `prefix` was not queued (its link's queue was ¾ full): it is sent
    /// again at the next `tick` instead of after the request interval and its back-off.
    pub(crate) fn request_not_sent(&mut self, prefix: &Prefix) {
        if let Some(r) = self.requests.get_mut(prefix) {
            r.last_sent = None;
            r.forwarded = None;
            r.starving_asked = r.starving_asked.saturating_sub(1);
            r.better_asked = r.better_asked.saturating_sub(1);
        }
    }

    /// Sends pending triggered updates and retractions to all neighbors, then forgets
    /// prefixes left with no route.
    pub(crate) fn flush(&mut self, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        let mut sent = Vec::new();
        if !self.triggered.is_empty() {
            let mut prefixes = std::mem::take(&mut self.triggered);
            prefixes.sort_unstable();
            prefixes.dedup();
            // With the next hop of each update: that neighbor gets a retraction instead.
            let mut updates: Vec<(RouteUpdate, Option<Nbr>)> = Vec::new();
            let mut retractions = Vec::new();
            let stamp = pacing_stamp(now);
            let pacing_ms = self.cfg.update_pacing / 1000;
            for &p in &prefixes {
                if p == self.prefix {
                    updates.push((self.own_update(), None));
                } else if let Some(idx) = self.table.find(&p) {
                    let d = self.table.at_mut(idx);
                    if d.adv_metric != METRIC_INFINITY && !self.damped.is_empty() {
                        match self.damped.get(&p) {
                            // Sent by `tick` when the hold ends, if not replaced before.
                            Some(&until) if now < until => continue,
                            Some(_) => {
                                self.damped.remove(&p);
                            }
                            None => {}
                        }
                    }
                    if d.adv_metric == METRIC_INFINITY && !self.holding.is_empty() {
                        match self.holding.get(&p) {
                            // Waits for the seqno answer (sent by `tick` when the hold ends).
                            Some(&until) if now < until => continue,
                            Some(_) => {
                                self.holding.remove(&p);
                            }
                            None => {}
                        }
                    }
                    if d.sent_at != NEVER_SENT && pacing_elapsed_ms(d.sent_at, stamp) < pacing_ms {
                        if self.paced.insert(p) {
                            self.counters.updates_paced += 1;
                        }
                        continue;
                    }
                    d.sent_at = stamp;
                    if !self.paced.is_empty() {
                        self.paced.remove(&p);
                    }
                    sent.push(p);
                    let d = self.table.at(idx);
                    match self.advert(&p, d) {
                        Some(u) => updates.push((u, self.nbr_of(d.selected).map(|(n, _)| n))),
                        None => retractions.push(p),
                    }
                } else {
                    self.paced.remove(&p);
                }
            }
            // Split horizon: a route is not announced to the neighbor it goes through (that
            // neighbor could only use it in a loop); it gets a retraction instead (8 bytes,
            // not 116), which also withdraws what it heard from us before we switched.
            let targets: Vec<Nbr> = self.nbrs.keys().copied().collect();
            let (mut ups, mut rets) = (Vec::new(), Vec::new());
            for n in targets {
                ups.clear();
                rets.clear();
                rets.extend_from_slice(&retractions);
                for (u, hop) in &updates {
                    if *hop == Some(n) {
                        rets.push(u.prefix);
                    } else {
                        ups.push(*u);
                    }
                }
                self.send(&[n], &ups, &rets, out);
            }
        }
        let mut answers = std::mem::take(&mut self.answers);
        answers.sort_unstable();
        answers.dedup();
        // One message per asker for all its answers (a frame per prefix filled queues too).
        let mut answered: BTreeMap<Nbr, Vec<RouteUpdate>> = BTreeMap::new();
        for p in answers {
            let Some(r) = self.requests.get_mut(&p) else {
                continue;
            };
            let asked = std::mem::take(&mut r.asked_by);
            r.wanted = 0;
            if sent.binary_search(&p).is_ok() {
                continue; // the broadcast told everyone
            }
            let Some(u) = self.table.get(&p).and_then(|d| self.advert(&p, d)) else {
                continue;
            };
            let targets: Vec<Nbr> = asked
                .into_iter()
                .filter(|n| self.nbrs.contains_key(n))
                .collect();
            self.counters.seqno_answers_sent += targets.len() as u64;
            for n in targets {
                answered.entry(n).or_default().push(u);
            }
        }
        for (n, updates) in answered {
            self.send(&[n], &updates, &[], out);
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for p in touched {
            // One index lookup per prefix: this runs for every update handled.
            let Some(d) = self.table.get(&p) else {
                continue;
            };
            let (no_routes, never_sent) = (d.routes.is_empty(), d.sent_at == NEVER_SENT);
            let empty = no_routes && d.adv_metric == METRIC_INFINITY && !self.paced.contains(&p);
            if empty {
                self.starving.remove(&p);
                self.improvable.remove(&p);
                self.requests.remove(&p);
                // Never announced: nothing of ours can come back, forget it now.
                if never_sent {
                    self.table.remove(&p);
                    self.gc_old_sigs(&p);
                } else {
                    self.forgetting.entry(p).or_insert(now);
                }
            } else if !no_routes && !self.forgetting.is_empty() {
                self.forgetting.remove(&p);
            }
        }
        out.append(&mut self.requests_out);
    }

    /// Repeats seqno requests for prefixes with only unfeasible routes. Costs nothing when
    /// no prefix is starving: no work here grows with the table.
    pub(crate) fn tick(&mut self, now: Micros, out: &mut Vec<(Nbr, Control)>) {
        let interval = self.cfg.request_interval;
        let starving: Vec<Prefix> = self.starving.iter().copied().collect();
        for p in starving {
            self.request_if_unfeasible(p, now);
        }
        let improvable: Vec<Prefix> = self.improvable.iter().copied().collect();
        for p in improvable {
            self.request_better(p, now);
        }
        let (improvable, starving) = (&self.improvable, &self.starving);
        self.requests.retain(|p, r| {
            improvable.contains(p)
                || starving.contains(p)
                || r.last_sent.is_some_and(|t| now < t + interval)
                || r.forwarded.is_some_and(|(_, t)| now < t + interval)
                || (!r.asked_by.is_empty() && now < r.asked_at + REQUESTERS_HOLD)
        });
        // Records kept only for their feasibility distance go after `FD_HOLD`.
        let expired: Vec<Prefix> = self
            .forgetting
            .iter()
            .filter(|(_, at)| now >= **at + FD_HOLD)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.forgetting.remove(&p);
            if self.table.get(&p).is_some_and(|d| d.routes.is_empty()) {
                self.table.remove(&p);
                self.gc_old_sigs(&p);
            }
        }
        // Retractions whose hold ended without an answer go out now.
        if !self.holding.is_empty() {
            let due: Vec<Prefix> = self
                .holding
                .iter()
                .filter(|(_, until)| now >= **until)
                .map(|(p, _)| *p)
                .collect();
            for p in due {
                self.holding.remove(&p);
                self.triggered.push(p);
                self.touched.push(p);
            }
        }
        // Worse metrics whose hold ended go out now (their latest state).
        if !self.damped.is_empty() {
            let due: Vec<Prefix> = self
                .damped
                .iter()
                .filter(|(_, until)| now >= **until)
                .map(|(p, _)| *p)
                .collect();
            for p in due {
                self.damped.remove(&p);
                self.triggered.push(p);
                self.touched.push(p);
            }
        }
        // Held changes whose pacing interval ended go out now (their latest state).
        if !self.paced.is_empty() {
            let stamp = pacing_stamp(now);
            let pacing_ms = self.cfg.update_pacing / 1000;
            let due: Vec<Prefix> = self
                .paced
                .iter()
                .filter(|p| {
                    self.table
                        .get(p)
                        .is_none_or(|d| pacing_elapsed_ms(d.sent_at, stamp) >= pacing_ms)
                })
                .copied()
                .collect();
            for p in due {
                self.triggered.push(p);
                // Forgotten after sending if it has no route left.
                self.touched.push(p);
            }
        }
        self.flush(now, out);
    }

    /// Whether `tick` has work: seqno requests pending or to repeat, or paced changes
    /// waiting (the core then runs routing's maintenance at short intervals).
    pub(crate) fn has_timers(&self) -> bool {
        !self.starving.is_empty()
            || !self.holding.is_empty()
            || !self.damped.is_empty()
            || !self.requests.is_empty()
            || !self.improvable.is_empty()
            || !self.paced.is_empty()
    }

    /// The routing table, for status.
    pub(crate) fn routes(&self, nbr_name: impl Fn(Nbr) -> Option<Nbr>) -> Vec<RouteInfo> {
        self.table
            .iter()
            .map(|(p, d)| {
                let sel = d
                    .entry(d.selected)
                    .and_then(|e| self.nbr_of(e.slot).map(|(n, c)| (n, c, e)));
                RouteInfo {
                    prefix: crate::addr::prefix_string(&p),
                    next_hop: sel.and_then(|(n, _, _)| nbr_name(n)),
                    via: None,
                    metric: sel.map_or(METRIC_INFINITY, |(_, c, e)| total(e.metric, c)),
                    seqno: sel.map_or(d.seqno, |(_, _, e)| d.seqno_at(e.lag)),
                    feasible: sel.is_some(),
                    candidates: d.routes.len(),
                }
            })
            .collect()
    }
}

/// `Router::better_unfeasible` on a record (`slots`: the router's), lazily: reselection
/// only asks whether there is one, for every update it handles.
fn better_unfeasible<'a>(
    d: &'a Dest,
    slots: &'a [Option<(Nbr, u32)>],
    hysteresis_us: u32,
) -> impl Iterator<Item = (Nbr, u64)> + 'a {
    let nbr_of = |slot: Slot| slots.get(usize::from(slot)).copied().flatten();
    let selected = d
        .entry(d.selected)
        .and_then(|sel| nbr_of(sel.slot).map(|(_, c)| total(sel.metric, c)));
    let fd_seqno = d.seqno_at(d.fd_lag);
    d.routes
        .iter()
        .filter(move |_| selected.is_some())
        .filter(|e| e.lag >= d.fd_lag && e.slot != d.selected)
        .filter(|e| e.lag > d.fd_lag || e.metric >= d.fd_metric)
        .filter_map(move |e| {
            let (n, c) = nbr_of(e.slot)?;
            let t = selected?;
            // Same seqno as the FD: only a newer one can make it feasible.
            let want = fd_seqno.saturating_add(u64::from(e.lag == d.fd_lag));
            (total(e.metric, c).saturating_add(hysteresis_us) < t).then_some((n, want))
        })
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

    fn entry_seqno(r: &Router, p: &Prefix, nbr: Nbr) -> Option<u64> {
        let d = r.table.get(p)?;
        let e = d.entry(*r.nbrs.get(&nbr)?)?;
        Some(d.seqno_at(e.lag))
    }

    /// A router with neighbors 1–3 (cost 1,000 each) that heard `owner`'s seqno 5 via 1 at
    /// metric 100 and via 2 at `via_2`: the routes the churn rules' tests start from.
    fn two_routes(owner: &Identity, via_2: u32) -> Router {
        let mut r = router();
        let mut out = Vec::new();
        for n in 1..=3 {
            r.neighbor_up(n, 1000, &mut out);
        }
        r.handle_updates(1, &[signed(owner, 5, 100)], 0, &mut out);
        r.handle_updates(2, &[signed(owner, 5, via_2)], 0, &mut out);
        r
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
        assert_eq!(entry_seqno(&r, &good.prefix, 1), Some(5));
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
        // (Times a second apart: changes of one prefix are paced, see `update_pacing`.)
        out.clear();
        r.neighbor_down(2, 1_000_000, &mut out);
        assert_eq!(r.next_hop(&p), None);
        assert!(
            out.iter()
                .any(|(n, c)| *n == 1 && matches!(c, Control::SeqnoRequest { seqno: 6, .. }))
        );
        // The retraction waits `retraction_hold` for the answer, then goes.
        let retracted = |out: &[(Nbr, Control)]| {
            out.iter()
                .any(|(_, c)| matches!(c, Control::Retractions(l) if l.contains(&p)))
        };
        assert!(!retracted(&out), "{out:?}");
        r.tick(1_200_000, &mut out);
        assert!(!retracted(&out), "{out:?}");
        r.tick(1_300_000, &mut out);
        assert!(retracted(&out), "{out:?}");
        assert_eq!(r.counters.retractions_held, 1);
        // The owner's newer seqno makes the old path feasible again.
        r.handle_updates(1, &[signed(&owner, 6, 10_000)], 2_000_000, &mut out);
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
        top.tick(15_000_000, &mut out);
        assert_eq!(top.own_seqno(), u64::MAX);
        // Our own announcement from an "earlier run" at u64::MAX is handled too.
        let mut low = router();
        low.neighbor_up(1, 100, &mut out);
        let me = Identity::from_seed(&[9; 32]);
        low.handle_updates(1, &[signed(&me, u64::MAX, 0)], 0, &mut out);
        assert_eq!(low.own_seqno(), u64::MAX);
    }

    /// Issue 15, item 1: links are reliable, so a quiet network sends nothing but keepalives
    /// (which the core sends), and a lost link changes only the routes that used it.
    #[test]
    fn nothing_is_resent_and_a_lost_link_updates_only_its_routes() {
        let owners: Vec<Identity> = (1..=4).map(|k| Identity::from_seed(&[k; 32])).collect();
        let p: Vec<Prefix> = owners
            .iter()
            .map(|o| prefix_for_key(&o.public_key()))
            .collect();
        let mut r = router();
        let mut out = Vec::new();
        for n in 1..=3 {
            r.neighbor_up(n, 1000, &mut out);
        }
        // 0 and 1 are reached via neighbor 1 only; 2 via 2 (3 offers a worse route); 3 via 3.
        r.handle_updates(
            1,
            &[signed(&owners[0], 5, 100), signed(&owners[1], 5, 100)],
            0,
            &mut out,
        );
        r.handle_updates(2, &[signed(&owners[2], 5, 100)], 0, &mut out);
        // (3's route is worse but feasible: 1050 < the 1100 we advertise.)
        r.handle_updates(
            3,
            &[signed(&owners[2], 5, 1050), signed(&owners[3], 5, 100)],
            0,
            &mut out,
        );
        out.clear();
        // An hour of ticks: no seqno bump, no re-send, no expiry.
        for s in 1..=3600 {
            r.tick(s * 1_000_000, &mut out);
        }
        assert!(out.is_empty(), "steady state sent {out:?}");
        assert_eq!(r.own_seqno(), 1);
        assert!(p.iter().all(|p| r.next_hop(p).is_some()));
        // Neighbor 2 goes: prefix 2 moves to neighbor 3 (a changed metric, sent to the others),
        // nothing else is sent.
        r.neighbor_down(2, 3_601_000_000, &mut out);
        assert_eq!(r.next_hop(&p[2]), Some(3));
        let mut sent: Vec<(Nbr, Prefix, u32)> = Vec::new();
        let mut poisoned: Vec<(Nbr, Prefix)> = Vec::new();
        for (n, c) in &out {
            match c {
                Control::Updates(l) => sent.extend(l.iter().map(|u| (*n, u.prefix, u.metric))),
                Control::Retractions(l) => poisoned.extend(l.iter().map(|p| (*n, *p))),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sent, vec![(1, p[2], 2050)]);
        // Split horizon: the neighbor the route now goes through hears a retraction.
        assert_eq!(poisoned, vec![(3, p[2])]);
        // Neighbor 1 goes: its two prefixes have no other route and are retracted.
        out.clear();
        r.neighbor_down(1, 3_602_000_000, &mut out);
        assert_eq!(r.next_hop(&p[0]), None);
        assert_eq!(r.len(), 2, "routeless prefixes are forgotten");
        let mut ret: Vec<(Nbr, Vec<Prefix>)> = out
            .iter()
            .map(|(n, c)| match c {
                Control::Retractions(l) => (*n, l.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        ret.sort();
        let mut both = vec![p[0], p[1]];
        both.sort();
        assert_eq!(ret, vec![(3, both)]);
    }

    /// Issue 15, item 3: one signed (prefix, seqno) heard from several neighbors is verified
    /// once, also when it comes back after the prefix was forgotten.
    #[test]
    fn an_announcement_heard_from_several_neighbors_is_verified_once() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        let mut r = router();
        let mut out = Vec::new();
        for n in 1..=4 {
            r.neighbor_up(n, 1000, &mut out);
        }
        for n in 1..=4 {
            r.handle_updates(n, &[signed(&owner, 5, 100 * n as u32)], 0, &mut out);
        }
        assert_eq!(r.counters.signatures_verified, 1);
        assert_eq!(r.counters.signatures_reused, 3);
        // A newer seqno from two neighbors, while the others still announce the old one:
        // both signatures are kept (an old-seqno route may be selected and passed on).
        for n in 1..=2 {
            r.handle_updates(n, &[signed(&owner, 6, 100 * n as u32)], 1, &mut out);
        }
        r.handle_updates(3, &[signed(&owner, 5, 50)], 1, &mut out);
        assert_eq!(r.counters.signatures_verified, 2);
        assert_eq!(entry_seqno(&r, &p, 3), Some(5));
        // All retract; the prefix is forgotten; the same announcement again costs nothing.
        for n in 1..=4 {
            r.handle_retractions(n, &[p], 2, &mut out);
        }
        // The retraction waits for the end of the prefix's pacing interval; then the prefix
        // is forgotten.
        assert_eq!(r.len(), 1);
        r.tick(200_000, &mut out);
        assert_eq!(r.len(), 0);
        assert!(r.old_sigs.is_empty());
        r.handle_updates(1, &[signed(&owner, 6, 100)], 3, &mut out);
        assert_eq!(r.counters.signatures_verified, 2);
        assert_eq!(r.next_hop(&p), Some(1));
        // A forged signature on a known seqno is still refused.
        let mut bad = signed(&owner, 7, 100);
        bad.signature[0] ^= 1;
        r.handle_updates(2, &[bad], 4, &mut out);
        assert_eq!(r.counters.bad_signature, 1);
    }

    /// A route selected on an older seqno is passed on with that seqno's own signature.
    #[test]
    fn a_route_on_an_older_seqno_is_advertised_with_its_signature() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        let mut r = router();
        let mut out = Vec::new();
        r.neighbor_up(1, 100, &mut out);
        r.neighbor_up(2, 100, &mut out);
        r.handle_updates(1, &[signed(&owner, 5, 100)], 0, &mut out);
        r.handle_updates(2, &[signed(&owner, 6, 90_000)], 0, &mut out);
        // Neighbor 1 has not passed seqno 6 on yet; its route stays feasible and best.
        assert_eq!(r.next_hop(&p), Some(1));
        out.clear();
        r.neighbor_up(3, 100, &mut out);
        let dump: Vec<RouteUpdate> = out
            .iter()
            .flat_map(|(_, c)| match c {
                Control::Updates(l) => l.clone(),
                _ => Vec::new(),
            })
            .filter(|u| u.prefix == p)
            .collect();
        assert_eq!((dump.len(), dump[0].seqno), (1, 5));
        assert!(verify(
            &dump[0].router_key,
            &route_signature_input(&p, dump[0].seqno, &dump[0].router_key),
            &dump[0].signature
        ));
    }

    /// Issue 15, churn: a raised seqno goes back only to the neighbor that asked for it, and
    /// a prefix's changes within the pacing interval are held and sent as its latest state.
    #[test]
    fn a_raised_seqno_goes_only_to_the_asker_and_changes_are_paced() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        let mut r = router();
        let mut out = Vec::new();
        for n in 1..=3 {
            r.neighbor_up(n, 1000, &mut out);
        }
        r.handle_updates(1, &[signed(&owner, 5, 100)], 0, &mut out);
        assert_eq!(r.next_hop(&p), Some(1));
        let updates_to = |out: &[(Nbr, Control)]| -> Vec<(Nbr, u64, u32)> {
            out.iter()
                .flat_map(|(n, c)| match c {
                    Control::Updates(l) => l.iter().map(|u| (*n, u.seqno, u.metric)).collect(),
                    _ => Vec::new(),
                })
                .collect()
        };
        // Neighbor 2 asks for seqno 6: forwarded to the next hop only, 2 remembered.
        out.clear();
        r.handle_request(2, p, 6, 64, 1_000_000, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(
            out[0],
            (1, Control::SeqnoRequest { seqno: 6, .. })
        ));
        // The answer (same metric): sent to neighbor 2 alone, not broadcast.
        out.clear();
        r.handle_updates(1, &[signed(&owner, 6, 100)], 1_050_000, &mut out);
        assert_eq!(updates_to(&out), vec![(2, 6, 1100)]);
        assert_eq!(r.counters.seqno_answers_sent, 1);
        // A new metric is broadcast at once; a second change 30 ms later is held...
        out.clear();
        r.handle_updates(1, &[signed(&owner, 6, 200)], 2_000_000, &mut out);
        // (Not to neighbor 1, the next hop: split horizon.)
        assert_eq!(updates_to(&out), vec![(2, 6, 1200), (3, 6, 1200)]);
        out.clear();
        r.handle_updates(1, &[signed(&owner, 6, 300)], 2_030_000, &mut out);
        r.handle_updates(1, &[signed(&owner, 6, 400)], 2_060_000, &mut out);
        assert!(updates_to(&out).is_empty(), "{out:?}");
        assert_eq!(r.counters.updates_paced, 1);
        // ... and its latest state goes out once the interval is over.
        r.tick(2_200_000, &mut out);
        assert_eq!(updates_to(&out), vec![(2, 6, 1400), (3, 6, 1400)]);
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
        r.tick(200_000, &mut out);
        r.handle_updates(1, &[signed(&owners[2], 6, 1000)], 300_000, &mut out);
        assert_eq!(r.next_hop(&prefix(&owners[2])), Some(1));
    }

    /// Updates (`Some(metric)`) and retractions (`None`) of `p` in `out`, by neighbor.
    fn sent_for(out: &[(Nbr, Control)], p: &Prefix) -> Vec<(Nbr, Option<u32>)> {
        let mut v: Vec<(Nbr, Option<u32>)> = out
            .iter()
            .flat_map(|(n, c)| match c {
                Control::Updates(l) => l
                    .iter()
                    .filter(|u| u.prefix == *p)
                    .map(|u| (*n, Some(u.metric)))
                    .collect(),
                Control::Retractions(l) => {
                    l.iter().filter(|q| *q == p).map(|_| (*n, None)).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        v.sort();
        v
    }

    fn requests_in(out: &[(Nbr, Control)]) -> Vec<(Nbr, u64)> {
        out.iter()
            .filter_map(|(n, c)| match c {
                Control::SeqnoRequest { seqno, .. } => Some((*n, *seqno)),
                _ => None,
            })
            .collect()
    }

    /// Issue 15, path hunting: when a node dies, its prefix's fallbacks are withdrawn one
    /// after the other, and every node used to announce each ever-worse fallback before its
    /// retraction. A worse metric after a retraction received is now held `worse_hold`: if
    /// the fallback goes too meanwhile, only the retraction is sent.
    #[test]
    fn a_worse_fallback_after_a_retraction_waits_and_a_retraction_replaces_it() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        // Via 1: 1,100 (selected, the feasibility distance); via 2: 1,600, feasible.
        let mut r = two_routes(&owner, 600);
        let mut out = Vec::new();
        assert_eq!(r.next_hop(&p), Some(1));
        // 1 retracts: traffic moves to 2 at once, its worse metric waits.
        out.clear();
        r.handle_retractions(1, &[p], 1_000_000, &mut out);
        assert_eq!(r.next_hop(&p), Some(2));
        assert_eq!(
            sent_for(&out, &p),
            vec![],
            "the worse metric went out at once"
        );
        assert_eq!(r.counters.worse_held, 1);
        r.tick(1_100_000, &mut out);
        assert_eq!(sent_for(&out, &p), vec![]);
        // 2 retracts within the hold: everyone hears one retraction, no worse metric.
        r.handle_retractions(2, &[p], 1_200_000, &mut out);
        r.tick(1_600_000, &mut out);
        assert_eq!(sent_for(&out, &p), vec![(1, None), (2, None), (3, None)]);
        assert_eq!(r.counters.worse_spared, 1);
        // A fallback that stays is announced when the hold ends (not to its next hop).
        r.handle_updates(1, &[signed(&owner, 6, 100)], 10_000_000, &mut out);
        r.handle_updates(2, &[signed(&owner, 6, 600)], 10_000_000, &mut out);
        assert_eq!(r.next_hop(&p), Some(1));
        out.clear();
        r.handle_retractions(1, &[p], 11_000_000, &mut out);
        r.tick(11_200_000, &mut out);
        assert_eq!(sent_for(&out, &p), vec![]);
        r.tick(11_300_000, &mut out);
        assert_eq!(
            sent_for(&out, &p),
            vec![(1, Some(1600)), (2, None), (3, Some(1600))]
        );
    }

    /// Issue 15, seqno requests on a leave: a starving node's own request already went to
    /// every neighbor with a route, so a neighbor's request for the same seqno is not
    /// forwarded again (Babel's duplicate suppression, RFC 8966 §3.8.1.2).
    #[test]
    fn a_starving_node_does_not_forward_a_request_its_own_covers() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        // Via 1: 1,100 (the feasibility distance); via 2: unfeasible (5,000 ≥ 1,100).
        let mut r = two_routes(&owner, 5000);
        let mut out = Vec::new();
        // The link to 1 goes: r starves and asks 2 for seqno 6 at once.
        r.neighbor_down(1, 1_000_000, &mut out);
        assert_eq!(requests_in(&out), vec![(2, 6)]);
        // 3 asks r for seqno 6 meanwhile: r's own request covers it.
        out.clear();
        r.handle_request(3, p, 6, 64, 1_050_000, &mut out);
        assert_eq!(requests_in(&out), vec![], "forwarded again");
        assert_eq!(r.counters.seqno_requests_suppressed, 1);
        // The answer reaches 3 too.
        r.handle_updates(2, &[signed(&owner, 6, 5000)], 1_100_000, &mut out);
        assert!(sent_for(&out, &p).contains(&(3, Some(6000))), "{out:?}");
    }

    /// Issue 15, seqno requests on a leave: a node that starves because a neighbor
    /// retracted (that neighbor waited for its own request's answer already) asks only if
    /// its remaining routes are still there after `worse_hold`; when a node died they are
    /// withdrawn meanwhile, and every such request travelled towards the dead node.
    #[test]
    fn a_node_starving_after_a_retraction_asks_only_if_its_routes_stay() {
        let owner = Identity::from_seed(&[1; 32]);
        let p = prefix_for_key(&owner.public_key());
        let setup = || two_routes(&owner, 5000);
        // The unfeasible route is withdrawn within the hold: no request at all.
        let mut r = setup();
        let mut out = Vec::new();
        r.handle_retractions(1, &[p], 1_000_000, &mut out);
        assert_eq!(r.next_hop(&p), None);
        assert_eq!(sent_for(&out, &p), vec![(1, None), (2, None), (3, None)]);
        assert_eq!(requests_in(&out), vec![], "asked at once");
        r.tick(1_100_000, &mut out);
        r.handle_retractions(2, &[p], 1_200_000, &mut out);
        for t in 13..30 {
            r.tick(t * 100_000, &mut out);
        }
        assert_eq!(requests_in(&out), vec![]);
        // It stays: asked when the hold ends.
        let mut r = setup();
        out.clear();
        r.handle_retractions(1, &[p], 1_000_000, &mut out);
        r.tick(1_200_000, &mut out);
        assert_eq!(requests_in(&out), vec![]);
        r.tick(1_300_000, &mut out);
        assert_eq!(requests_in(&out), vec![(2, 6)]);
    }
}
