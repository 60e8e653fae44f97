//! Overlay routing at scale, in the simulator (the real `NodeCore` of every node, virtual
//! links and clock): random graphs of 1,000, 2,000 and 5,000 nodes (10,000 when the machine
//! has the memory), average degree 4, links of 1–30 ms, default timers. Per size: cold
//! convergence, steady-state control traffic (keepalives included) and core CPU, heap per
//! route, reroute time after a relay is killed, and control traffic while 1 % of the nodes
//! leave and 1 % join per minute. Also bytes per route in one real node core holding a
//! full table (16,384 routes from 4 neighbors). Writes the `scale` section of
//! `docs/benchmarks.md`, beside the figures measured before (issue 15).
//!
//! `cargo run --release -p meshgate-bench --bin scale [-- --sizes 1000,2000,5000,10000]`
//! (`--max-rss-gb G`, `--max-minutes M`: a size past either is abandoned and reported;
//! `--no-report`: profiling runs, the simulation only, nothing written; `--threads T`: the
//! simulator's threads, one per core by default).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshgate_bench::write_section;
use meshgate_overlay::core::{CoreConfig, LinkOrigin, NodeCore};
use meshgate_overlay::sim::{Sim, SimRng, random_edges};
use meshgate_overlay::wire::Control;
use meshgate_overlay::{Identity, Limits};

/// mimalloc (the `meshgate` binary's allocator), counting the bytes in use.
struct Counting;

/// Bytes in use, counted per thread (the simulator's threads allocate at once; one shared
/// counter was a contended cache line): each thread adds to its own shard, which may go
/// negative when it frees what another allocated; the sum is exact.
static IN_USE: [Shard; SHARDS] = [const { Shard(AtomicIsize::new(0)) }; SHARDS];
const SHARDS: usize = 16;
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[repr(align(128))]
struct Shard(AtomicIsize);

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

fn count(delta: isize) {
    let i = MY_SHARD
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            s.get()
        })
        // A thread being torn down: any shard keeps the sum exact.
        .unwrap_or(0);
    IN_USE[i].0.fetch_add(delta, Ordering::Relaxed);
}

// SAFETY: forwards to mimalloc unchanged; only counts sizes.
#[allow(unsafe_code)] // GlobalAlloc is an unsafe trait: counting needs a wrapper allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { INNER.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as isize));
        // SAFETY: same contract as the caller's.
        unsafe { INNER.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new as isize - l.size() as isize);
        // SAFETY: same contract as the caller's.
        unsafe { INNER.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap() -> usize {
    let sum: isize = IN_USE.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    sum.max(0) as usize
}

const MS: u64 = 1000;
const S: u64 = 1_000_000;

/// Figures for one network size.
#[derive(Debug, Default)]
struct Row {
    nodes: usize,
    converge_s: f64,
    converge_wall: Duration,
    steady_msgs: f64,
    steady_bytes: f64,
    steady_cpu_ms: f64,
    steady_wall_per_s: f64,
    bytes_per_route: f64,
    reroute_ms: u64,
    rerouted_routes: usize,
    /// Sampled routes through the killed relay that its death disconnected (left out).
    cut_off: usize,
    retracted_ms: u64,
    churn_msgs: f64,
    churn_bytes: f64,
    churn_cpu_ms: f64,
    churn_events: usize,
    total_wall: Duration,
    /// The most heap in use (counted) and resident memory seen during the size.
    peak_heap: usize,
    peak_rss: u64,
    /// The most bytes in flight on the simulated links at once.
    peak_flight: usize,
    /// Heap per link end in the cores' link buffers after the steady phase.
    idle_link_bytes: f64,
    /// Where the size's time went, phase by phase.
    phases: Vec<Phase>,
}

/// One phase of a size's run: simulated time, wall time and the process's CPU time (all
/// threads) it took.
#[derive(Debug, Clone, Copy)]
struct Phase {
    name: &'static str,
    simulated_s: f64,
    wall_s: f64,
    cpu_s: f64,
}

/// Marks the end of each phase (see [`Phase`]).
struct PhaseClock {
    sim: u64,
    wall: Instant,
    cpu: f64,
    core: Duration,
    shared: Duration,
    done: Vec<Phase>,
}

impl PhaseClock {
    fn start(sim: &Sim) -> PhaseClock {
        PhaseClock {
            sim: sim.now(),
            wall: Instant::now(),
            cpu: cpu_seconds(),
            core: sim.core_time(),
            shared: sim.shared_core_time(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, n: usize, name: &'static str, sim: &Sim) {
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        let (core, shared) = (sim.core_time(), sim.shared_core_time());
        let p = Phase {
            name,
            simulated_s: (sim.now() - self.sim) as f64 / S as f64,
            wall_s: (wall - self.wall).as_secs_f64(),
            cpu_s: cpu - self.cpu,
        };
        eprintln!(
            "{}: phase {name}: {:.1} s simulated, {:.1} s wall, {:.1} s CPU; {:.1} s in the \
             cores, {:.1} s of it at instants shared among threads",
            n,
            p.simulated_s,
            p.wall_s,
            p.cpu_s,
            (core - self.core).as_secs_f64(),
            (shared - self.shared).as_secs_f64(),
        );
        self.done.push(p);
        (self.sim, self.wall, self.cpu) = (sim.now(), wall, cpu);
        (self.core, self.shared) = (core, shared);
    }
}

/// CPU time this process used so far (user + system, all threads), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    #[allow(unsafe_code)] // libc call: the process's CPU time.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Bytes per route in one node core: 16,384 announcements, each from 4 neighbors.
fn real_node_bytes_per_route() -> (usize, f64) {
    let routes = Limits::default().max_routes;
    let mut rng = SimRng::new(15);
    let owners: Vec<Identity> = (0..routes)
        .map(|_| Identity::from_seed(&rng.bytes32()))
        .collect();
    let mut core = NodeCore::new(
        Identity::from_seed(&[7; 32]),
        CoreConfig::default(),
        1,
        0,
        Box::new(move || [3; 32]),
    );
    let mut out = Vec::new();
    let nbrs = 4u64;
    for n in 0..nbrs {
        let key = Identity::from_seed(&[100 + n as u8; 32]).public_key();
        core.link_up(n, key, LinkOrigin::Outbound, 0, &mut out);
        core.link_rtt(n, 2000, 2000, &mut out);
    }
    out.clear();
    let updates: Vec<_> = owners
        .iter()
        .map(|o| meshgate_overlay::sim::signed_announcement(o, 5, 0))
        .collect();
    let before_routes = heap();
    for n in 0..nbrs {
        for chunk in updates.chunks(500) {
            let list = chunk
                .iter()
                .map(|u| meshgate_overlay::wire::RouteUpdate {
                    metric: 1000 * (n as u32 + 1),
                    ..*u
                })
                .collect();
            core.control(n, Control::Updates(list), 3000, &mut out);
            out.clear();
        }
    }
    let grown = heap() - before_routes;
    assert_eq!(core.routes_selected(), routes, "every route was taken");
    drop(core);
    (routes, grown as f64 / routes as f64)
}

/// One real link between two node cores, its bytes moved the way the node's shell moves them
/// (`overlay/src/link_io.rs`: reads into the core's read buffer, a 64 KiB reserve when less
/// than 1 KiB is left, at most 256 KiB per round): the heap its buffers hold at both ends
/// right after one end sent the other a full table of `routes` routes, and after 3 s of
/// keepalives only. Returns (busy, idle) bytes per link end.
fn real_link_buffers(routes: usize) -> (usize, usize) {
    let mut rng = SimRng::new(16);
    let core = |seed: u8| {
        NodeCore::new(
            Identity::from_seed(&[seed; 32]),
            CoreConfig::default(),
            1,
            0,
            Box::new(move || [seed; 32]),
        )
    };
    let (mut a, mut b) = (core(1), core(2));
    let mut out = Vec::new();
    // `a` learns `routes` routes from a neighbor that has no link machine (fed directly).
    let feeder = 99;
    a.link_up(
        feeder,
        Identity::from_seed(&[3; 32]).public_key(),
        LinkOrigin::Outbound,
        0,
        &mut out,
    );
    a.link_rtt(feeder, 2000, 0, &mut out);
    let updates: Vec<_> = (0..routes)
        .map(|_| {
            meshgate_overlay::sim::signed_announcement(&Identity::from_seed(&rng.bytes32()), 5, 0)
        })
        .collect();
    for chunk in updates.chunks(500) {
        a.control(feeder, Control::Updates(chunk.to_vec()), 0, &mut out);
    }
    out.clear();
    let link = 1;
    assert!(a.open_link(link, LinkOrigin::Outbound, None, 0));
    assert!(b.open_link(
        link,
        LinkOrigin::Inbound("10.0.0.1".parse().expect("ip")),
        None,
        0
    ));
    let mut now = 1000;
    // The handshake, the first Hello exchange and `a`'s full table.
    while shuttle(&mut a, &mut b, link, now) | shuttle(&mut b, &mut a, link, now) {}
    // `a`'s routes and its own prefix.
    assert_eq!(b.routes_selected(), routes + 1, "the full table crossed");
    let busy = (a.link_buffer_bytes(link) + b.link_buffer_bytes(link)) / 2;
    let end = now + 3 * S;
    while now < end {
        now = a
            .poll_timeout()
            .into_iter()
            .chain(b.poll_timeout())
            .min()
            .unwrap_or(end)
            .max(now + 1);
        a.handle_timeout(now, &mut out);
        b.handle_timeout(now, &mut out);
        out.clear();
        while shuttle(&mut a, &mut b, link, now) | shuttle(&mut b, &mut a, link, now) {}
    }
    assert_eq!(a.neighbor_keys().count(), 2, "the link stayed up");
    let idle = (a.link_buffer_bytes(link) + b.link_buffer_bytes(link)) / 2;
    (busy, idle)
}

/// Moves what `from` has waiting on `link` into `to` as the node's shell reads a socket;
/// `true` if anything moved.
fn shuttle(from: &mut NodeCore, to: &mut NodeCore, link: u64, now: u64) -> bool {
    let mut moved = false;
    let mut out = Vec::new();
    while from.link_has_output(link) {
        let mut read = 0;
        while read < 256 * 1024 && from.link_has_output(link) {
            let Some(buf) = to.link_read_buf(link) else {
                return moved;
            };
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(64 * 1024);
            }
            let bytes = from.link_take_output(link, buf.capacity() - buf.len(), now);
            buf.extend_from_slice(&bytes);
            read += bytes.len();
        }
        to.link_input(link, now, &mut out);
        out.clear();
        moved = true;
    }
    moved
}

fn all_converged(sim: &Sim, live: &[usize]) -> bool {
    let want = live.len() - 1;
    live.iter().all(|&i| sim.routes_selected(i) >= want)
}

fn per_node_per_s(v: u64, nodes: usize, secs: u64) -> f64 {
    v as f64 / nodes as f64 / secs as f64
}

/// One line on stderr about a cold start under way: where the time and memory go.
fn progress(sim: &Sim, n: usize, t0: Instant) {
    let routes: usize = (0..sim.len()).map(|i| sim.routes_selected(i)).sum();
    let m = sim.memory();
    eprintln!(
        "{n}: {:.3} s simulated, {:.0} s wall: {:.1} M routes selected, heap {:.2} GB, rss {:.2} GB, \
         {} chunks ({:.0} MB, peak {:.0} MB) in flight, {:.0} MB queued in links, \
         {:.0} MB of link buffers ({} links)",
        sim.now() as f64 / S as f64,
        t0.elapsed().as_secs_f64(),
        routes as f64 / 1e6,
        heap() as f64 / 1e9,
        rss() as f64 / 1e9,
        m.flight_chunks,
        m.flight_bytes as f64 / 1e6,
        m.peak_flight_bytes as f64 / 1e6,
        m.queued_bytes as f64 / 1e6,
        m.link_buffer_bytes as f64 / 1e6,
        m.links,
    );
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Stops a size whose simulation passes `limit` bytes of resident memory (the machine is
/// shared) or its wall-time budget: the caller reports it instead of being killed. Notes
/// the peaks on the way.
struct Watch {
    limit: u64,
    deadline: Instant,
    peak_heap: usize,
    peak_rss: u64,
}

impl Watch {
    fn check(&mut self, phase: &str) -> Result<(), String> {
        let now = rss();
        self.peak_rss = self.peak_rss.max(now);
        self.peak_heap = self.peak_heap.max(heap());
        if Instant::now() > self.deadline {
            return Err(format!(
                "aborted during {phase}: the size's wall-time budget ran out"
            ));
        }
        if now > self.limit {
            return Err(format!(
                "aborted during {phase}: resident memory {:.1} GB passed the {:.1} GB limit",
                now as f64 / 1e9,
                self.limit as f64 / 1e9
            ));
        }
        Ok(())
    }
}

fn measure(
    n: usize,
    steady_secs: u64,
    churn_secs: u64,
    rss_limit: u64,
    budget: Duration,
    threads: Option<usize>,
) -> Result<Row, String> {
    let start = Instant::now();
    let mut watch = Watch {
        limit: rss_limit,
        deadline: start + budget,
        peak_heap: 0,
        peak_rss: 0,
    };
    let mut rng = SimRng::new(n as u64);
    let edges = random_edges(&mut rng, n, 4, 1..=30);
    let heap0 = heap();
    let mut sim = Sim::new(n as u64 + 1, n, CoreConfig::default());
    if let Some(t) = threads {
        sim.set_threads(t);
    }
    for &(a, b, l) in &edges {
        sim.connect(a, b, l);
    }
    let live: Vec<usize> = (0..n).collect();
    let t0 = Instant::now();
    let mut clock = PhaseClock::start(&sim);
    let mut steps = 0u64;
    while !all_converged(&sim, &live) {
        assert!(sim.now() < 120 * S, "{n} nodes not converged in 120 s");
        // Small steps: the whole cold start happens within a few hundred simulated ms,
        // and the guard can only stop the run between steps.
        sim.run_for(5 * MS);
        steps += 1;
        if steps.is_multiple_of(10) {
            progress(&sim, n, t0);
        }
        watch.check("cold convergence").map_err(|e| {
            let routes: usize = (0..n).map(|i| sim.routes_selected(i)).sum();
            format!(
                "{e} ({:.3} s simulated, {:.0} % of the {} routes selected, after {:.0} s wall)",
                sim.now() as f64 / S as f64,
                routes as f64 * 100.0 / (n * (n - 1)) as f64,
                thousands(n * (n - 1)),
                t0.elapsed().as_secs_f64()
            )
        })?;
    }
    let mut row = Row {
        nodes: n,
        converge_s: sim.now() as f64 / S as f64,
        converge_wall: t0.elapsed(),
        ..Row::default()
    };
    eprintln!(
        "{n}: converged in {:.1} s simulated, {:?} wall",
        row.converge_s, row.converge_wall
    );
    clock.mark(n, "cold start", &sim);
    sim.run_for(5 * S);
    clock.mark(n, "settle after the cold start", &sim);
    let routes = n * (n - 1);
    row.bytes_per_route = (heap() - heap0) as f64 / routes as f64;

    // Steady state.
    let (c0, k0, w0) = (sim.control_traffic(), sim.core_time(), Instant::now());
    sim.run_for(steady_secs * S);
    let (c1, k1) = (sim.control_traffic(), sim.core_time());
    row.steady_wall_per_s = w0.elapsed().as_secs_f64() / steady_secs as f64;
    row.steady_msgs = per_node_per_s(c1.messages - c0.messages, n, steady_secs);
    row.steady_bytes = per_node_per_s(c1.bytes - c0.bytes, n, steady_secs);
    row.steady_cpu_ms = (k1 - k0).as_secs_f64() * 1000.0 / n as f64 / steady_secs as f64;
    clock.mark(n, "steady", &sim);
    let m = sim.memory();
    row.idle_link_bytes = m.link_buffer_bytes as f64 / m.links.max(1) as f64;
    eprintln!(
        "{n}: steady {:.1} msgs, {:.0} B, {:.3} ms core CPU per node per s",
        row.steady_msgs, row.steady_bytes, row.steady_cpu_ms
    );

    // Reroute: kill the relay carrying most of 400 sampled routes.
    let pairs: Vec<(usize, usize)> = (0..400)
        .map(|_| (rng.below(n as u64) as usize, rng.below(n as u64) as usize))
        .filter(|(a, b)| a != b)
        .collect();
    let paths: Vec<Vec<usize>> = pairs
        .iter()
        .map(|&(a, b)| sim.path(a, b).expect("converged"))
        .collect();
    let mut load = vec![0usize; n];
    for p in &paths {
        for &v in &p[1..p.len() - 1] {
            load[v] += 1;
        }
    }
    let relay = (0..n).max_by_key(|v| load[*v]).expect("nodes");
    // Pairs the relay's death disconnects (it can be a cut vertex of a random graph) have
    // no other route: they are left out, and counted.
    let component = components_without(n, &edges, relay);
    type Pairs = Vec<(usize, usize)>;
    let (affected, cut_off): (Pairs, Pairs) = pairs
        .iter()
        .zip(&paths)
        .filter(|(_, p)| p[1..p.len() - 1].contains(&relay))
        .map(|(pair, _)| *pair)
        .partition(|&(a, b)| component[a] == component[b]);
    row.cut_off = cut_off.len();
    sim.kill(relay);
    let t_kill = sim.now();
    while let Some(e) = affected.iter().find_map(|&(a, b)| sim.path(a, b).err()) {
        if sim.now() - t_kill >= 60 * S {
            return Err(format!(
                "a route through the killed relay {relay} was not rerouted within 60 s: {e}"
            ));
        }
        sim.run_for(100 * MS);
        watch.check("reroute")?;
    }
    row.reroute_ms = (sim.now() - t_kill) / MS;
    clock.mark(n, "reroute", &sim);
    row.rerouted_routes = affected.len();
    while (0..n).any(|i| i != relay && sim.next_hop_exists(i, relay)) {
        assert!(
            sim.now() - t_kill < 120 * S,
            "dead prefix still routed after 120 s"
        );
        sim.run_for(100 * MS);
    }
    row.retracted_ms = (sim.now() - t_kill) / MS;
    clock.mark(n, "retraction", &sim);
    eprintln!(
        "{n}: {} routes via {relay} rerouted in {} ms, its prefix gone after {} ms",
        row.rerouted_routes, row.reroute_ms, row.retracted_ms
    );
    sim.run_for(5 * S);
    clock.mark(n, "settle after the reroute", &sim);

    // Churn: 1 % of the nodes leave (silently) and 1 % join (2 links each) per minute.
    let per_minute = (n / 100).max(1);
    let events = per_minute as u64 * churn_secs / 60;
    let gap = churn_secs * S / events.max(1);
    let (c0, k0) = (sim.control_traffic(), sim.core_time());
    let t_churn = sim.now();
    let mut alive: Vec<usize> = (0..n).filter(|i| *i != relay).collect();
    for k in 0..events {
        let leaving = alive.swap_remove(rng.below(alive.len() as u64) as usize);
        sim.kill(leaving);
        let joined = sim.add_node();
        for _ in 0..2 {
            let peer = alive[rng.below(alive.len() as u64) as usize];
            sim.connect(peer, joined, (1 + rng.below(30)) * MS);
        }
        alive.push(joined);
        if k % 10 == 9 {
            eprintln!(
                "{n}: churn, {} of {events} leave+join events, {:.0} s wall in all",
                k + 1,
                start.elapsed().as_secs_f64()
            );
        }
        let next = t_churn + (k + 1) * gap;
        while sim.now() < next {
            sim.run_for((next - sim.now()).min(100 * MS));
            watch.check("churn").map_err(|e| {
                // What this size measured before it stopped.
                let c = sim.control_traffic();
                let secs = ((sim.now() - t_churn) as f64 / S as f64).max(1e-6);
                let per_node = |v: u64| v as f64 / alive.len() as f64 / secs;
                format!(
                    "{e} ({k} of {events} leave+join events done in {secs:.0} simulated s, \
                     {:.1} msgs and {:.0} B per node per s so far; cold convergence {:.1} s \
                     simulated, {:.0} s wall; steady {:.1} msgs, {:.0} B per node per s; \
                     reroute {:.1} s; peak heap {:.2} GB, peak resident {:.2} GB, peak \
                     {:.0} MB in flight; {:.0} s wall in all)",
                    per_node(c.messages - c0.messages),
                    per_node(c.bytes - c0.bytes),
                    row.converge_s,
                    row.converge_wall.as_secs_f64(),
                    row.steady_msgs,
                    row.steady_bytes,
                    row.reroute_ms as f64 / 1000.0,
                    watch.peak_heap as f64 / 1e9,
                    watch.peak_rss as f64 / 1e9,
                    sim.memory().peak_flight_bytes as f64 / 1e6,
                    start.elapsed().as_secs_f64()
                )
            })?;
        }
    }
    let secs = (sim.now() - t_churn) / S;
    let (c1, k1) = (sim.control_traffic(), sim.core_time());
    row.churn_events = events as usize * 2;
    row.churn_msgs = per_node_per_s(c1.messages - c0.messages, alive.len(), secs);
    row.churn_bytes = per_node_per_s(c1.bytes - c0.bytes, alive.len(), secs);
    row.churn_cpu_ms = (k1 - k0).as_secs_f64() * 1000.0 / alive.len() as f64 / secs as f64;
    eprintln!(
        "{n}: churn {:.1} msgs, {:.0} B, {:.3} ms per node per s",
        row.churn_msgs, row.churn_bytes, row.churn_cpu_ms
    );
    clock.mark(n, "churn", &sim);
    row.phases = clock.done;
    row.total_wall = start.elapsed();
    watch.check("the end").ok();
    row.peak_heap = watch.peak_heap;
    row.peak_rss = watch.peak_rss;
    row.peak_flight = sim.memory().peak_flight_bytes;
    eprintln!("{n}: done in {:?}", row.total_wall);
    Ok(row)
}

/// Connected components of the graph `edges` on `n` nodes once node `gone` is removed: a
/// component number per node.
fn components_without(n: usize, edges: &[(usize, usize, u64)], gone: usize) -> Vec<usize> {
    let mut adj = vec![Vec::new(); n];
    for &(a, b, _) in edges {
        if a != gone && b != gone {
            adj[a].push(b);
            adj[b].push(a);
        }
    }
    let mut comp = vec![usize::MAX; n];
    for start in 0..n {
        if comp[start] != usize::MAX {
            continue;
        }
        comp[start] = start;
        let mut todo = vec![start];
        while let Some(v) = todo.pop() {
            for &w in &adj[v] {
                if comp[w] == usize::MAX {
                    comp[w] = start;
                    todo.push(w);
                }
            }
        }
    }
    comp
}

/// Memory the kernel says is available, in bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 2000, 5000, 10_000]);
    let (steady_secs, churn_secs) = (30, 120);
    // Other sessions share the machine: a size is abandoned past this much resident memory.
    let rss_limit_gb: f64 = args
        .iter()
        .position(|a| a == "--max-rss-gb")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    let rss_limit = (rss_limit_gb * 1e9) as u64;
    // The target for 5,000 nodes is 15 minutes; a size is abandoned past this.
    let budget_min: u64 = args
        .iter()
        .position(|a| a == "--max-minutes")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let budget = Duration::from_secs(budget_min * 60);
    // Threads the simulator runs one instant's cores on (default: one per core); the
    // figures are the same for any number.
    let threads: Option<usize> = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());

    // Profiling runs (e.g. under callgrind): only the simulation, nothing written.
    let write = !args.iter().any(|a| a == "--no-report");
    // Measured with `--no-report` too: the memory skip below is computed from it.
    let (routes, real_bpr) = real_node_bytes_per_route();
    eprintln!("real node core: {real_bpr:.0} bytes per route ({routes} routes, 4 neighbors)");
    let table = 2000;
    let (link_busy, link_idle) = real_link_buffers(table);
    eprintln!(
        "real link: {link_busy} bytes of buffers per end after a {table}-route full table, \
         {link_idle} after 3 s of keepalives"
    );
    let real = RealNode {
        routes,
        bytes_per_route: real_bpr,
        table,
        link_busy,
        link_idle,
    };

    let mut rows = Vec::new();
    let mut skipped: Vec<(usize, f64, f64, f64)> = Vec::new();
    let mut aborted: Vec<(usize, String)> = Vec::new();
    // The least a simulated route costs: what it costs in one real node core. (The whole
    // simulation's heap per route also carries each node's links and buffers, which do not
    // grow with the network; extrapolating it would skip sizes that fit.)
    let route_bytes = real_bpr;
    for &n in &sizes {
        // The simulation holds n × (n − 1) routes; keep a third of the available memory free.
        let need = (n * n) as f64 * route_bytes * 1.2;
        if need > mem_available() as f64 * 2.0 / 3.0 {
            eprintln!(
                "{n}: skipped, needs about {:.1} GB (available {:.1} GB)",
                need / 1e9,
                mem_available() as f64 / 1e9
            );
            skipped.push((n, need, route_bytes, mem_available() as f64));
            if write {
                write_section("scale", &report(&rows, &skipped, &aborted, &real))?;
            }
            continue;
        }
        match measure(n, steady_secs, churn_secs, rss_limit, budget, threads) {
            Ok(row) => rows.push(row),
            Err(why) => {
                eprintln!("{n}: {why}");
                aborted.push((n, why));
            }
        }
        // After every size: a run stopped later (a guard, a kill) keeps the rows it finished.
        if write {
            write_section("scale", &report(&rows, &skipped, &aborted, &real))?;
        }
    }
    Ok(())
}

/// What one real node core measured: bytes per route, one link's buffers.
struct RealNode {
    routes: usize,
    bytes_per_route: f64,
    /// Routes in the full table sent over the link.
    table: usize,
    link_busy: usize,
    link_idle: usize,
}

fn report(
    rows: &[Row],
    skipped: &[(usize, f64, f64, f64)],
    aborted: &[(usize, String)],
    real: &RealNode,
) -> String {
    let (routes, real_bpr) = (real.routes, real.bytes_per_route);
    let mut md = String::new();
    md.push_str(
        "## Overlay routing at scale (`bench/src/bin/scale.rs`)\n\n\
         Simulator (every node runs the real `NodeCore`; virtual links and clock), random \
         graphs with average degree 4 and one-way link latencies of 1–30 ms, default timers \
         (Hello every 1 s, dead peer after 3 s). Control bytes are counted as on a real link \
         (frame header, plaintext, Noise tag). \"Before\" is the protocol up to issue 15 \
         (full table to every neighbor every 15 s, routes expiring after 60 s), as measured \
         in the issue with the same simulator; \"after\" is this run. Single runs: the \
         steady-state figures are exact counts over 30 simulated seconds.\n\n",
    );
    md.push_str(
        "| nodes | | control msgs / node / s | control bytes / node / s | core CPU / node / simulated s | sim wall / simulated s | reroute after a relay is killed |\n\
         |---|---|---|---|---|---|---|\n\
         | 200 | before | 61 | 12.6 KB | 1.8 ms | 0.35 s | 2.7 s |\n\
         | 1,000 | before | 275 | 62.7 KB | 9.5 ms | 9.5 s | 2.7 s |\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | after | {:.1} | {:.0} B | {:.3} ms | {:.3} s | {:.1} s |\n",
            thousands(r.nodes),
            r.steady_msgs,
            r.steady_bytes,
            r.steady_cpu_ms,
            r.steady_wall_per_s,
            r.reroute_ms as f64 / 1000.0,
        ));
    }
    md.push_str(
        "\n| nodes | cold convergence (simulated) | wall time of it | heap per route (whole sim) | routes via the killed relay | its prefix retracted everywhere | churn: msgs / node / s | churn: bytes / node / s | churn: core CPU / node / s | whole size run (wall) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.1} s | {:.0} s | {:.0} B | {} of 400 sampled{} | {:.1} s | {:.1} | {:.0} B | {:.3} ms | {:.1} min |\n",
            thousands(r.nodes),
            r.converge_s,
            r.converge_wall.as_secs_f64(),
            r.bytes_per_route,
            r.rerouted_routes,
            if r.cut_off > 0 {
                format!(" ({} more cut off by its death)", r.cut_off)
            } else {
                String::new()
            },
            r.retracted_ms as f64 / 1000.0,
            r.churn_msgs,
            r.churn_bytes,
            r.churn_cpu_ms,
            r.total_wall.as_secs_f64() / 60.0,
        ));
    }
    md.push_str(
        "\n| nodes | routes (all nodes) | peak heap in use | peak resident | peak bytes in flight on links | link buffers per link end, steady state |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} GB | {:.2} GB | {:.0} MB | {:.0} B |\n",
            thousands(r.nodes),
            thousands(r.nodes * (r.nodes - 1)),
            r.peak_heap as f64 / 1e9,
            r.peak_rss as f64 / 1e9,
            r.peak_flight as f64 / 1e6,
            r.idle_link_bytes,
        ));
    }
    if let Some(first) = rows.first() {
        md.push_str("\nWhere each size's time went: wall time (process CPU time, all threads) per phase.\n\n| nodes |");
        for p in &first.phases {
            md.push_str(&format!(" {} |", p.name));
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(first.phases.len()));
        md.push('\n');
        for r in rows {
            md.push_str(&format!("| {} |", thousands(r.nodes)));
            for p in &r.phases {
                md.push_str(&format!(" {:.1} s ({:.1} s) |", p.wall_s, p.cpu_s));
            }
            md.push('\n');
        }
    }
    let by = |n: usize| rows.iter().find(|r| r.nodes == n);
    md.push('\n');
    if let (Some(a), Some(b)) = (by(1000), by(5000)) {
        md.push_str(&format!(
            "- Steady control traffic per node, 5,000 vs 1,000 nodes: **{:.2}×** (target ≤ 1.2×); \
             {:.0} B per node per s at 5,000 (target ≤ 2 KB).\n",
            b.steady_bytes / a.steady_bytes,
            b.steady_bytes
        ));
    }
    md.push_str(&format!(
        "- Bytes per route in one real node core holding {} routes, each announced by 4 \
         neighbors: **{real_bpr:.0} B** (heap in use, counted by the allocator; target ≤ 200 B). \
         Before: about 1.7 MB per node at 1,000 nodes in the simulator, i.e. ~1.7 KB per route.\n",
        thousands(routes)
    ));
    md.push_str(&format!(
        "- One real link between two node cores, its bytes moved as the node's shell moves \
         them: its buffers (read buffer, decryption scratch, send queue) hold **{} B** per \
         end after one end sent the other a full table of {} routes, and **{} B** after 3 s \
         of keepalives only (a quiet link gives back its read buffer, grown by 64 KiB reads up to \
         the 256 KiB read round, and reads in 4 KiB \
         steps; the scratch grown for a routing message is given back after the read).\n",
        thousands(real.link_busy),
        thousands(real.table),
        thousands(real.link_idle),
    ));
    md.push_str(
        "- Memory in the simulator: each direction of a link holds at most 256 KiB unread \
         (a socket's buffers; the writer waits, its frames staying in its core's bounded link \
         queue), and a link keeps no read buffer between deliveries unless a frame is \
         incomplete. Heap in use is counted by the allocator (mimalloc); resident memory is \
         the process's.\n",
    );
    md.push_str(
        "- Churn: every minute 1 % of the nodes stop silently (their neighbors notice after \
         3 s) and as many new nodes join with 2 links each, spread evenly over 120 simulated \
         seconds. Each join sends the newcomer two full tables and spreads its prefix \
         network-wide, each leave a retraction wave: that traffic is per event, so it grows \
         with the number of events, i.e. with the network at a fixed churn percentage. \
         Before the churn fixes (issue 15: pacing, seqno answers along the request path, \
         the feasibility-distance hold) this phase did not finish: messages in flight grew \
         until the process was killed for memory at 1,000 nodes (about 70 MB/s of growth \
         at 300 nodes).\n",
    );
    md.push_str(
        "- Signature checks: the simulator verifies each distinct announcement once for all \
         simulated nodes (each node still counts its own check), so \"core CPU\" excludes \
         repeated ed25519 verifications; in the steady state no node verifies anything \
         (seqnos do not change).\n",
    );
    md.push_str(
        "- Batching: each node reads everything that reaches it at one simulated instant \
         before it sends the routing changes this caused (as a node reading all its ready \
         links in one wake-up would), and a core handles all the frames of one read before \
         it sends. Since this round: about 3× fewer messages at a cold start than one send \
         per message received, for the same routes and about the same bytes; the steady \
         state (keepalives only) is unchanged.\n",
    );
    md.push_str(
        "- Threads: the simulator runs the node cores of one simulated instant side by side, \
         one thread per core (rayon). Within an instant the cores are independent (no link \
         carries bytes in zero time); each reads only its own input, and their outputs are \
         carried afterwards in node order, so every figure is the same on any number of \
         threads (`overlay/tests/sim.rs` checks 1, 2 and 4). \"Core CPU\" is summed over \
         the threads. At each instant every receiving node reads all that arrived before \
         any node writes (before: reads and writes interleaved flight by flight); the \
         figures at 1,000 nodes came out the same as before this change. The phase table's \
         CPU time is the process's, all threads.\n",
    );
    for (n, why) in aborted {
        md.push_str(&format!("- {}: not measured, {why}.\n", thousands(*n)));
    }
    for (n, need, bpr, avail) in skipped {
        md.push_str(&format!(
            "- {}: not run: the simulation would need about {:.1} GB ({} routes × {bpr:.0} B \
             per route as in a real node core, + 20 %), more than two thirds \
             of the memory available on this machine ({:.1} GB).\n",
            thousands(*n),
            need / 1e9,
            thousands(n * (n - 1)),
            avail / 1e9,
        ));
    }
    md
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
