//! The core work of one simulated instant, run side by side: what every node reads at that
//! instant, or every node's timers due then. Nothing crosses a link in zero time, so the
//! cores are independent within an instant; each gets only its own inputs, and the
//! simulator carries their outputs afterwards in node order. The outcome is the same for
//! any number of threads.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::{Carried, SimNode};
use crate::clock::Micros;
use crate::core::CoreOut;

/// Below this many nodes an instant runs on the calling thread: handing a handful of small
/// jobs to another thread costs more than it saves.
const PARALLEL_MIN: usize = 8;

/// What one node's core does at one instant.
pub(super) enum Job {
    /// Reads what arrived on its links (in arrival order), routing changes held until all
    /// is read.
    Read(Vec<(u64, Carried)>),
    /// Runs its timers.
    Timeout,
}

/// One node's work at one instant, and what its core answered.
pub(super) struct Work {
    pub node: usize,
    pub job: Job,
    pub out: Vec<CoreOut>,
    /// Time spent in the core.
    pub took: Duration,
}

impl Work {
    pub fn new(node: usize, job: Job) -> Work {
        Work {
            node,
            job,
            out: Vec::new(),
            took: Duration::ZERO,
        }
    }
}

/// Runs every work's core at `now`, on `pool` when there is enough to share (none: on the
/// calling thread). Sorts `works` by node (one work per node at most). `true`: there was
/// enough to share.
pub(super) fn run(
    nodes: &mut [SimNode],
    works: &mut [Work],
    now: Micros,
    pool: Option<&rayon::ThreadPool>,
) -> bool {
    works.sort_unstable_by_key(|w| w.node);
    let at: Vec<usize> = works.iter().map(|w| w.node).collect();
    let count = at.len();
    let mut jobs: Vec<(&mut SimNode, &mut Work)> = disjoint(nodes, at.into_iter())
        .zip(works.iter_mut())
        .collect();
    debug_assert_eq!(jobs.len(), count, "one work per node");
    let share = jobs.len() >= PARALLEL_MIN;
    match pool {
        Some(pool) if share => {
            pool.install(|| jobs.par_iter_mut().for_each(|(n, w)| step(n, w, now)));
        }
        _ => jobs.iter_mut().for_each(|(n, w)| step(n, w, now)),
    }
    share
}

fn step(node: &mut SimNode, w: &mut Work, now: Micros) {
    let t = Instant::now();
    let core = &mut node.core;
    match &mut w.job {
        Job::Read(reads) => {
            core.hold_routing();
            for (link, what) in reads.drain(..) {
                match what {
                    Carried::Bytes(b) => core.link_receive(link, b, now, &mut w.out),
                    Carried::Eof => core.link_closed(link, now, &mut w.out),
                }
            }
            core.release_routing(now, &mut w.out);
        }
        Job::Timeout => core.handle_timeout(now, &mut w.out),
    }
    w.took = t.elapsed();
}

/// Mutable references to `items` at the strictly increasing positions `at` (positions out
/// of range or out of order end the walk).
fn disjoint<'a, T>(
    items: &'a mut [T],
    at: impl Iterator<Item = usize> + 'a,
) -> impl Iterator<Item = &'a mut T> + 'a {
    let mut rest = items;
    let mut base = 0;
    at.map_while(move |i| {
        let tail = std::mem::take(&mut rest).get_mut(i.checked_sub(base)?..)?;
        let (item, tail) = tail.split_first_mut()?;
        rest = tail;
        base = i + 1;
        Some(item)
    })
}

#[cfg(test)]
mod tests {
    use super::disjoint;

    #[test]
    fn disjoint_picks_the_positions_asked_for() {
        let mut v: Vec<u32> = (0..10).collect();
        for x in disjoint(&mut v, [0, 3, 4, 9].into_iter()) {
            *x += 100;
        }
        assert_eq!(v, [100, 1, 2, 103, 104, 5, 6, 7, 8, 109]);
        // Out of order or out of range: the walk ends there.
        assert_eq!(disjoint(&mut v, [2, 1].into_iter()).count(), 1);
        assert_eq!(disjoint(&mut v, [10].into_iter()).count(), 0);
    }
}
