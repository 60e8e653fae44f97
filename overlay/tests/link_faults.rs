//! Link faults on real Noise frames, in the simulator: every node runs the real core, and the
//! links carry the encrypted byte streams the cores produce. A corrupted, truncated or stalled
//! stream must take its link down at both ends (and be counted), routes must move to the
//! remaining path, and a new link between the same two nodes must take over from the old one.

use meshgate_overlay::core::CoreConfig;
use meshgate_overlay::sim::Sim;

const MS: u64 = 1000;

fn cfg() -> CoreConfig {
    CoreConfig {
        dead_peer_timeout: 2_000 * MS,
        hello_interval: 500 * MS,
        ..CoreConfig::default()
    }
}

/// 0 - 1 directly (5 ms), and 0 - 2 - 1 (20 ms a link): 0 reaches 1 directly until that link
/// goes.
fn triangle(c: CoreConfig) -> Sim {
    let mut sim = Sim::new(7, 3, c);
    sim.connect(0, 1, 5 * MS);
    sim.connect(0, 2, 20 * MS);
    sim.connect(2, 1, 20 * MS);
    sim.run_for(3_000 * MS);
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 1]);
    assert!(sim.linked(0, 1) && sim.linked(1, 0));
    sim
}

/// Sends `n` packets from `a` to `b` and returns how many arrived within a second.
fn delivered(sim: &mut Sim, a: usize, b: usize, n: usize) -> usize {
    sim.take_delivered(b);
    for k in 0..n {
        sim.send(a, b, format!("packet {k}").as_bytes());
    }
    sim.run_for(1_000 * MS);
    sim.take_delivered(b).len()
}

#[test]
fn a_corrupted_control_frame_is_counted_and_both_ends_drop_the_link() {
    let mut sim = triangle(cfg());
    assert_eq!(delivered(&mut sim, 0, 1, 5), 5);
    sim.corrupt_next_control(0, 1);
    // The next Hello from 0 is corrupted within a hello interval; 1 refuses it and closes,
    // and 0 sees its stream end one latency later.
    sim.run_for(600 * MS);
    assert_eq!(sim.counters(1).control_decrypt_failed, 1);
    assert!(!sim.linked(1, 0), "the receiver dropped the link");
    assert!(
        !sim.linked(0, 1),
        "the sender learned it from the stream's end"
    );
    assert_eq!(
        (sim.counters(0).dead_peers, sim.counters(1).dead_peers),
        (0, 0)
    );
    // Routes moved to the path through 2, and traffic flows on it.
    sim.run_for(500 * MS);
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 2, 1]);
    assert_eq!(sim.path(1, 0).unwrap(), vec![1, 2, 0]);
    assert_eq!(delivered(&mut sim, 0, 1, 5), 5);
    assert_eq!(delivered(&mut sim, 1, 0, 5), 5);
}

#[test]
fn a_corrupted_frame_header_is_counted_as_a_bad_frame() {
    let mut sim = triangle(cfg());
    sim.corrupt_next_header(1, 0);
    sim.run_for(600 * MS);
    assert_eq!(sim.counters(0).bad_frame, 1);
    assert!(!sim.linked(0, 1) && !sim.linked(1, 0));
    sim.run_for(500 * MS);
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 2, 1]);
}

#[test]
fn a_stream_truncated_mid_frame_ends_the_link_at_both_ends() {
    let mut sim = triangle(cfg());
    assert_eq!(delivered(&mut sim, 0, 1, 1), 1, "session up");
    // A large packet's frame is cut after 100 bytes and the stream is reset.
    sim.truncate_after(0, 1, 100);
    let before = sim.counters(1).packets_delivered;
    sim.send(0, 1, &[0xab; 4000]);
    sim.run_for(100 * MS);
    assert!(
        !sim.linked(0, 1) && !sim.linked(1, 0),
        "both ends saw the reset"
    );
    assert_eq!(
        sim.counters(1).packets_delivered,
        before,
        "no partial frame was handed on"
    );
    sim.run_for(500 * MS);
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 2, 1]);
    assert_eq!(delivered(&mut sim, 0, 1, 5), 5);
}

#[test]
fn a_reader_that_stops_holds_back_only_its_own_link_until_the_writer_gives_up() {
    // The dead-link timeout is longer than the write-stall timeout (5 s), so the writer's
    // stall detection is what ends the link.
    let mut sim = triangle(CoreConfig {
        dead_peer_timeout: 8_000 * MS,
        ..cfg()
    });
    assert_eq!(delivered(&mut sim, 0, 1, 1), 1, "session up");
    assert_eq!(delivered(&mut sim, 0, 2, 1), 1, "session up");
    sim.set_reading(1, 0, false);
    for k in 0..3000u32 {
        sim.send(0, 1, &[k as u8; 1000]);
    }
    // The window fills, then 0's queue for the link; the rest is dropped and counted.
    sim.run_for(1_000 * MS);
    let drops = sim.counters(0).link_queue_drops;
    assert!(drops >= 1000, "{drops} packets dropped at the full link");
    // Other links of 0 are not held back.
    assert_eq!(delivered(&mut sim, 0, 2, 20), 20);
    sim.run_for(4_000 * MS);
    assert_eq!(sim.counters(0).link_write_stalls, 1);
    assert!(!sim.linked(0, 1), "the writer closed the stuck link");
    // The reader resumes: it reads what was sent, then the stream's end.
    sim.set_reading(1, 0, true);
    sim.run_for(100 * MS);
    assert!(!sim.linked(1, 0), "the reader learned the link is gone");
    assert!(sim.take_delivered(1).len() >= 100, "the backlog was read");
    sim.run_for(500 * MS);
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 2, 1]);
    assert_eq!(delivered(&mut sim, 0, 1, 5), 5);
}

#[test]
fn a_new_link_between_the_same_nodes_replaces_the_old_one() {
    let mut sim = triangle(cfg());
    assert_eq!(delivered(&mut sim, 0, 1, 5), 5);
    // 0 connects to 1 again (it lost track of its link, e.g. after a network change).
    sim.connect(0, 1, 5 * MS);
    sim.run_for(200 * MS);
    assert_eq!(
        sim.counters(1).links_replaced,
        1,
        "1 closed the older inbound link"
    );
    assert_eq!(sim.links_of(0), 2, "0 runs the new link and the one to 2");
    assert_eq!(sim.links_of(1), 2);
    assert!(sim.linked(0, 1) && sim.linked(1, 0));
    sim.run_for(500 * MS);
    // The route to 1 is the direct one, over the new link, and it carries traffic.
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 1]);
    assert_eq!(delivered(&mut sim, 0, 1, 10), 10);
    assert_eq!(delivered(&mut sim, 1, 0, 10), 10);
    assert_eq!(sim.counters(0).dead_peers + sim.counters(1).dead_peers, 0);
}

#[test]
fn a_half_open_old_link_gives_way_to_the_new_one() {
    let mut sim = triangle(cfg());
    // The old link goes silent (no end is told), and 0 connects again.
    sim.cut(0, 1);
    sim.connect(0, 1, 5 * MS);
    sim.run_for(200 * MS);
    assert_eq!(sim.counters(1).links_replaced, 1);
    // 0 finds out about the old one by its timeout; the new link carries the traffic.
    sim.run_for(2_500 * MS);
    assert_eq!(sim.counters(0).dead_peers, 1);
    assert_eq!(sim.path(0, 1).unwrap(), vec![0, 1]);
    assert_eq!(delivered(&mut sim, 0, 1, 10), 10);
}
