//! Simulator tests of the rules that keep churn cheap and control messages flowing: the
//! headroom that droppable seqno requests leave in a link's queue.

use bytes::Bytes;
use meshgate_overlay::core::CoreConfig;
use meshgate_overlay::sim::Sim;

const MS: u64 = 1_000;

fn build(seed: u64, n: usize, edges: &[(usize, usize, u64)], cfg: CoreConfig) -> Sim {
    let mut sim = Sim::new(seed, n, cfg);
    for &(a, b, l) in edges {
        sim.connect(a, b, l);
    }
    sim
}

fn cfg() -> CoreConfig {
    CoreConfig {
        hello_interval: 500_000,
        dead_peer_timeout: 2_000_000,
        ..CoreConfig::default()
    }
}

/// Runs until every live node in `nodes` has a route to every other, at most `limit` µs.
fn converge(sim: &mut Sim, nodes: &[usize], limit: u64) {
    let deadline = sim.now() + limit;
    while nodes
        .iter()
        .any(|&i| nodes.iter().any(|&j| i != j && !sim.next_hop_exists(i, j)))
    {
        assert!(
            sim.now() < deadline,
            "not converged within {} ms",
            limit / MS
        );
        sim.run_for(10 * MS);
    }
}

/// A seqno request may be dropped when its link's queue is full (it is repeated); an update
/// or retraction may not (the link is closed: routing re-sends nothing). On a link whose
/// socket drains slowly, requests from several flushes used to fill the queue; the next
/// update then closed the link. Requests now use at most ¾ of the queue.
#[test]
fn seqno_requests_leave_room_for_updates_on_a_slow_link() {
    const LEAVES: usize = 30;
    let (a, r, b) = (0, 1, 2);
    // a reaches the leaves through r (short); b offers them too, but its routes are longer
    // than a's feasibility distances: once the a–r link goes, a asks b for every leaf, and
    // asks again while b does not answer.
    let mut edges = vec![(a, r, MS), (a, b, 10 * MS)];
    for leaf in 3..3 + LEAVES {
        edges.push((r, leaf, MS));
        edges.push((b, leaf, 5 * MS));
    }
    let mut c = cfg();
    // b stops reading for a while: it must not take a for dead meanwhile.
    c.dead_peer_timeout = 10_000_000;
    c.limits.link_queue_frames = 64;
    let n = 3 + LEAVES;
    let mut sim = build(46, n, &edges, c);
    let all: Vec<usize> = (0..n).collect();
    converge(&mut sim, &all, 5_000 * MS);
    sim.run_for(1_000 * MS);
    // b stops reading from a, and a's socket buffer (the simulator's 256 KiB window) fills
    // with packets: what a queues now stays in its link queue (2 frames are left over).
    sim.set_reading(b, a, false);
    for _ in 0..258 {
        sim.inject(a, b, Bytes::from(vec![0u8; 1019]));
    }
    // a's link to r resets: a starves on r and the leaves and asks b, 31 requests a round.
    sim.truncate_after(r, a, 0);
    sim.run_for(1_500 * MS);
    assert!(!sim.linked(a, r));
    // A new neighbor of a: its route is an update a must queue for b.
    let newcomer = sim.add_node();
    sim.connect(a, newcomer, MS);
    sim.run_for(1_000 * MS);
    assert!(sim.linked(a, newcomer));
    assert!(
        sim.linked(a, b),
        "a closed its link to b: an update found the queue full"
    );
    sim.set_reading(b, a, true);
    let mut all: Vec<usize> = (0..n).collect();
    all.push(newcomer);
    converge(&mut sim, &all, 10_000 * MS);
    assert!(sim.linked(a, b), "a closed its link to b");
    let ca = sim.counters(a);
    assert!(ca.seqno_requests_shed > 0, "no request was held back");
    eprintln!(
        "a: {} seqno requests held back, {} control frames dropped",
        ca.seqno_requests_shed, ca.link_control_drops
    );
}
