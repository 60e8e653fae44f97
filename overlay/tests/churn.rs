//! Simulator tests of the rules that keep churn cheap and control messages flowing: split
//! horizon, the short hold of a retraction while a seqno request is answered, and the
//! headroom that droppable seqno requests and packets leave in a link's queue.

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

/// Split horizon: a node does not announce a route to the neighbor it goes through (that
/// neighbor could never use it: it would be a loop), it sends that neighbor a retraction
/// (8 bytes instead of 116). A node joining at the end of a line learns every route from
/// its one neighbor and used to announce them all back.
#[test]
fn a_route_is_not_announced_back_to_its_next_hop() {
    const LINE: usize = 10;
    let edges: Vec<(usize, usize, u64)> = (1..LINE).map(|i| (i - 1, i, 5 * MS)).collect();
    let mut sim = build(7, LINE, &edges, cfg());
    let line: Vec<usize> = (0..LINE).collect();
    converge(&mut sim, &line, 5_000 * MS);
    let joined = sim.add_node();
    sim.connect(LINE - 1, joined, 5 * MS);
    let all: Vec<usize> = (0..=LINE).collect();
    converge(&mut sim, &all, 5_000 * MS);
    sim.run_for(1_000 * MS);
    let c = sim.counters(joined).routing;
    // Its own announcement, in the full table it sent when the link came up; every route
    // it learnt goes through its one neighbor.
    assert_eq!(
        c.updates_sent, 1,
        "the newcomer announced {} routes to its only neighbor",
        c.updates_sent
    );
    assert!(c.retractions_sent >= LINE as u64 - 1, "{c:?}");
    // The rest of the line heard of the newcomer once per link.
    let end = sim.counters(0).routing;
    assert!(end.updates_received >= LINE as u64, "{end:?}");
}

/// A node that loses its last feasible route to a link failure keeps quiet for up to one
/// request interval while it asks for a newer seqno (DUAL's "active" state, briefly): when
/// the answer comes in time, the nodes behind it hear one update instead of a retraction
/// followed by an update, and never lose the route. Here x's link to the owner resets; x's
/// other route (via w) is loop-free but unfeasible (w's metric is not below x's
/// feasibility distance), so x asks; the owner's answer is back in about 10 ms.
#[test]
fn a_quick_seqno_answer_spares_the_nodes_behind_a_retraction() {
    let (owner, x, w, d1, d2, d3) = (0, 1, 2, 3, 4, 5);
    let edges = vec![
        (owner, x, 2 * MS),
        (owner, w, 3 * MS),
        (x, w, 2 * MS),
        (x, d1, MS),
        (d1, d2, MS),
        (d2, d3, MS),
    ];
    let mut sim = build(8, 6, &edges, cfg());
    let all: Vec<usize> = (0..6).collect();
    converge(&mut sim, &all, 5_000 * MS);
    sim.run_for(2_000 * MS);
    assert_eq!(sim.path(d3, owner).unwrap(), vec![d3, d2, d1, x, owner]);
    let retractions_before = sim.counters(d3).routing.retractions_received;
    // The owner's next bytes to x reset the link: both ends see it go down.
    sim.truncate_after(owner, x, 0);
    for _ in 0..1_000 {
        sim.run_for(MS);
        assert!(
            sim.next_hop_exists(d3, owner),
            "d3 lost its route to the owner at {} ms",
            sim.now() / MS
        );
    }
    assert!(!sim.linked(owner, x), "the link did not go down");
    assert_eq!(sim.path(d3, owner).unwrap(), vec![d3, d2, d1, x, w, owner]);
    assert_eq!(
        sim.counters(d3).routing.retractions_received,
        retractions_before
    );
    assert!(sim.counters(x).routing.retractions_held >= 1);
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

/// Routed packets may be dropped when a link's queue is full; an update may not (the link is
/// closed: routing re-sends nothing). Packets used to fill the whole queue, so an update that
/// found a link's queue full of packets closed the link. Packets now use at most ¾ of it, as
/// seqno requests do.
#[test]
fn a_link_flooded_with_packets_still_carries_a_new_route() {
    let (a, b) = (0, 1);
    let mut c = cfg();
    // b stops reading for a while: it must not take a for dead meanwhile.
    c.dead_peer_timeout = 10_000_000;
    c.limits.link_queue_frames = 64;
    let mut sim = build(47, 2, &[(a, b, MS)], c);
    converge(&mut sim, &[a, b], 5_000 * MS);
    // b stops reading from a; a's socket buffer (the simulator's 256 KiB window) fills with
    // packets, then its link queue, and the rest are dropped.
    sim.set_reading(b, a, false);
    for _ in 0..400 {
        sim.inject(a, b, Bytes::from(vec![0u8; 1019]));
    }
    assert!(
        sim.counters(a).link_queue_drops > 0,
        "the flood filled the queue"
    );
    // A new neighbor of a: its route is an update a must queue for b.
    let newcomer = sim.add_node();
    sim.connect(a, newcomer, MS);
    sim.run_for(1_000 * MS);
    assert!(sim.linked(a, newcomer));
    assert!(
        sim.linked(a, b),
        "a closed its link to b: an update found the queue full of packets"
    );
    sim.set_reading(b, a, true);
    converge(&mut sim, &[a, b, newcomer], 5_000 * MS);
    assert_eq!(sim.path(b, newcomer).unwrap(), vec![b, a, newcomer]);
    assert_eq!(sim.counters(a).link_control_drops, 0);
}
