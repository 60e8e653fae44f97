//! Measures what one leave and one join cost in the simulator, by message kind, against
//! the floor of every node hearing of each change once per neighbor.
//!
//! `cargo run --release -p meshgate-overlay --example churn_cost -- [nodes] [events]`
//! (defaults 1000 and 4). A leave is a node stopping silently (not a cut vertex); a join a
//! new node with links to 2 random live nodes. Each is followed by 10 simulated seconds;
//! keepalives (measured over a quiet 10 s first) are subtracted. Message counts are
//! deterministic for a given size.

use std::collections::BTreeSet;

use meshgate_overlay::core::{CoreConfig, Counters};
use meshgate_overlay::sim::{Sim, SimRng, random_edges, stays_connected_without};

const MS: u64 = 1_000;
const S: u64 = 1_000_000;
/// Simulated time after each leave or join (the dead-peer timeout is 3 s).
const AFTER: u64 = 10 * S;

/// What churn costs, summed over all nodes, by kind (indices below).
#[derive(Debug, Default, Clone, Copy)]
struct Totals([u64; 19]);

const FRAMES: usize = 0;
const BYTES: usize = 1;
const UPD_FRAMES: usize = 2;
const UPD_BYTES: usize = 3;
const RET_FRAMES: usize = 4;
const RET_BYTES: usize = 5;
const REQ_FRAMES: usize = 6;
const REQ_BYTES: usize = 7;
const UPD_ENTRIES: usize = 8;
const RET_ENTRIES: usize = 9;
const ANSWERS: usize = 10;
const BUMPS: usize = 11;
const VERIFIED: usize = 12;
const HELD: usize = 13;
const SPARED: usize = 14;
const SHED: usize = 15;
const WORSE_HELD: usize = 16;
const WORSE_SPARED: usize = 17;
const SUPPRESSED: usize = 18;

impl Totals {
    fn of(sim: &Sim) -> Totals {
        let mut t = [0u64; 19];
        for i in 0..sim.len() {
            let c: Counters = sim.counters(i);
            let r = &c.routing;
            let v = [
                c.control_frames_sent,
                c.control_bytes_sent,
                c.updates_frames_sent,
                c.updates_bytes_sent,
                c.retractions_frames_sent,
                c.retractions_bytes_sent,
                c.seqno_request_frames_sent,
                c.seqno_request_bytes_sent,
                r.updates_sent,
                r.retractions_sent,
                r.seqno_answers_sent,
                r.seqno_bumps,
                r.signatures_verified,
                r.retractions_held,
                r.retractions_spared,
                c.seqno_requests_shed,
                r.worse_held,
                r.worse_spared,
                r.seqno_requests_suppressed,
            ];
            for (a, b) in t.iter_mut().zip(v) {
                *a += b;
            }
        }
        Totals(t)
    }

    fn minus(self, o: Totals) -> Totals {
        let mut t = self.0;
        for (a, b) in t.iter_mut().zip(o.0) {
            *a = a.saturating_sub(b);
        }
        Totals(t)
    }

    fn add(&mut self, o: Totals) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

/// Next hop of every node towards every node.
fn next_hops(sim: &Sim) -> Vec<Vec<Option<usize>>> {
    (0..sim.len()).map(|j| sim.next_hops_towards(j)).collect()
}

/// (routes whose next hop changed or vanished, the floor in entries: each such route
/// told once to each neighbor of the node holding it).
fn changed(sim: &Sim, before: &[Vec<Option<usize>>], after: &[Vec<Option<usize>>]) -> (u64, u64) {
    let (mut routes, mut floor) = (0, 0);
    for (j, b) in before.iter().enumerate() {
        for (i, hop) in b.iter().enumerate() {
            if !sim.is_alive(i) || !sim.is_alive(j) || i == j {
                continue;
            }
            if after[j].get(i).copied().flatten() != *hop {
                routes += 1;
                floor += sim.links_of(i) as u64;
            }
        }
    }
    (routes, floor)
}

fn print(what: &str, t: &Totals, events: u64, nodes: u64, routes: u64, floor: u64) {
    let t = &t.0;
    let per = |x: u64| x as f64 / events as f64;
    let pn = |x: u64| x as f64 / events as f64 / nodes as f64;
    let routing = t[UPD_FRAMES] + t[RET_FRAMES] + t[REQ_FRAMES];
    let routing_bytes = t[UPD_BYTES] + t[RET_BYTES] + t[REQ_BYTES];
    println!(
        "{what}: per event {:.0} frames, {:.0} B ({:.1} frames, {:.0} B per node)\n\
         \x20 updates      {:>9.0} frames {:>11.0} B  {:>9.0} entries\n\
         \x20 retractions  {:>9.0} frames {:>11.0} B  {:>9.0} entries\n\
         \x20 seqno reqs   {:>9.0} frames {:>11.0} B  (shed {:.0}, not forwarded as duplicates {:.0})\n\
         \x20 other (keepalives beyond the quiet rate) {:.0} frames {:.0} B\n\
         \x20 answers {:.0}, seqno raises {:.0}, signatures verified {:.0}, retractions held {:.0} \
         (spared {:.0}), worse metrics held {:.0} (spared {:.0})\n\
         \x20 routes changed {:.0}; floor (each told once per neighbor) {:.0} entries; \
         update+retraction entries sent {:.2}x the floor",
        per(t[FRAMES]),
        per(t[BYTES]),
        pn(t[FRAMES]),
        pn(t[BYTES]),
        per(t[UPD_FRAMES]),
        per(t[UPD_BYTES]),
        per(t[UPD_ENTRIES]),
        per(t[RET_FRAMES]),
        per(t[RET_BYTES]),
        per(t[RET_ENTRIES]),
        per(t[REQ_FRAMES]),
        per(t[REQ_BYTES]),
        per(t[SHED]),
        per(t[SUPPRESSED]),
        per(t[FRAMES].saturating_sub(routing)),
        per(t[BYTES].saturating_sub(routing_bytes)),
        per(t[ANSWERS]),
        per(t[BUMPS]),
        per(t[VERIFIED]),
        per(t[HELD]),
        per(t[SPARED]),
        per(t[WORSE_HELD]),
        per(t[WORSE_SPARED]),
        per(routes),
        per(floor),
        (t[UPD_ENTRIES] + t[RET_ENTRIES]) as f64 / floor.max(1) as f64,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let mut rng = SimRng::new(n as u64 + 15);
    let edges = random_edges(&mut rng, n, 4, 1..=30);
    let mut sim = Sim::new(n as u64, n, CoreConfig::default());
    let mut adj: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    for &(a, b, l) in &edges {
        sim.connect(a, b, l);
        adj[a].insert(b);
        adj[b].insert(a);
    }
    let t0 = std::time::Instant::now();
    while (0..n).any(|i| sim.routes_selected(i) < n - 1) {
        assert!(sim.now() < 60 * S, "not converged within 60 s");
        sim.run_for(100 * MS);
    }
    sim.run_for(5 * S);
    eprintln!(
        "{n} nodes converged, {:.0} s wall",
        t0.elapsed().as_secs_f64()
    );
    // Keepalives alone, per AFTER.
    let q0 = Totals::of(&sim);
    sim.run_for(AFTER);
    let quiet = Totals::of(&sim).minus(q0);
    let mut alive: Vec<usize> = (0..n).collect();
    let (mut leaves, mut joins) = (Totals::default(), Totals::default());
    let (mut leave_routes, mut leave_floor, mut join_routes, mut join_floor) = (0, 0, 0, 0);
    for k in 0..events {
        // Leave.
        let mut pick = rng.below(alive.len() as u64) as usize;
        while !stays_connected_without(&adj, &alive, alive[pick]) {
            pick = rng.below(alive.len() as u64) as usize;
        }
        let gone = alive.swap_remove(pick);
        let before = next_hops(&sim);
        let c0 = Totals::of(&sim);
        sim.kill(gone);
        for w in std::mem::take(&mut adj[gone]) {
            adj[w].remove(&gone);
        }
        sim.run_for(AFTER);
        // (The dead node's keepalives are missing: `minus` saturates.)
        let d = Totals::of(&sim).minus(c0).minus(quiet);
        let (r, f) = changed(&sim, &before, &next_hops(&sim));
        // Its own prefix: every live node hears its retraction once per neighbor.
        let own: u64 = alive.iter().map(|&i| sim.links_of(i) as u64).sum();
        leaves.add(d);
        leave_routes += r;
        leave_floor += f + own;
        // Join.
        let before = next_hops(&sim);
        let c0 = Totals::of(&sim);
        let joined = sim.add_node();
        adj.push(BTreeSet::new());
        for _ in 0..2 {
            let peer = alive[rng.below(alive.len() as u64) as usize];
            sim.connect(peer, joined, (1 + rng.below(30)) * MS);
            adj[peer].insert(joined);
            adj[joined].insert(peer);
        }
        alive.push(joined);
        sim.run_for(AFTER);
        let d = Totals::of(&sim).minus(c0).minus(quiet);
        let (r, f) = changed(&sim, &before, &next_hops(&sim));
        // Its prefix heard once per neighbor by every node, and a full table from each
        // of its neighbors.
        let own: u64 = alive.iter().map(|&i| sim.links_of(i) as u64).sum();
        joins.add(d);
        join_routes += r;
        join_floor += f + own + 2 * alive.len() as u64;
        let missing = alive
            .iter()
            .filter(|&&i| sim.routes_selected(i) < alive.len() - 1)
            .count();
        eprintln!(
            "event {}: {missing} nodes without full routes, {:.0} s wall",
            k + 1,
            t0.elapsed().as_secs_f64()
        );
    }
    let (ev, nodes) = (events as u64, n as u64);
    println!(
        "{n} nodes, {events} leaves and {events} joins, {} s after each; keepalives subtracted \
         ({} frames, {} B per {} s network-wide)",
        AFTER / S,
        quiet.0[FRAMES],
        quiet.0[BYTES],
        AFTER / S
    );
    print("leave", &leaves, ev, nodes, leave_routes, leave_floor);
    print("join", &joins, ev, nodes, join_routes, join_floor);
}
