//! Compact storage of the routing table: one fixed-size record per prefix in a chunked slab,
//! a hash index of record numbers (the prefix is in the record), and the per-neighbor
//! entries of each prefix.
//!
//! Memory per route matters (a node holds one record per node of the network), so seqnos
//! of entries, the feasibility distance and the advertised route are stored as small lags
//! behind the newest verified seqno of the prefix, neighbors as 16-bit slots, and the
//! owner's key and signature once per prefix.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::addr::Prefix;
use crate::wire::METRIC_INFINITY;

/// A neighbor as numbered inside the router (see `Router::slots`).
pub(super) type Slot = u16;
/// No neighbor: no selected route.
pub(super) const NO_SLOT: Slot = Slot::MAX;
/// Entries further behind the newest seqno than this are dropped (an owner bumps its seqno
/// by one per honest request; 65,534 bumps that a neighbor never passed on means that
/// neighbor's announcement is long dead).
pub(super) const MAX_ENTRY_LAG: u16 = u16::MAX - 1;
/// Records per slab chunk.
const CHUNK: usize = 256;

/// What one neighbor last announced for a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) slot: Slot,
    /// The announcement's seqno is `Dest::seqno - lag`.
    pub(super) lag: u16,
    /// The neighbor's metric (never `METRIC_INFINITY`: a retraction removes the entry).
    pub(super) metric: u32,
}

/// One prefix.
#[derive(Debug, Clone)]
pub(super) struct Dest {
    /// The prefix itself (the index holds only record numbers).
    pub(super) prefix: Prefix,
    /// The prefix owner's ed25519 key (the prefix is derived from it).
    pub(super) key: [u8; 32],
    /// The owner's signature for `seqno`.
    pub(super) sig: [u8; 64],
    /// Newest seqno whose signature checked out.
    pub(super) seqno: u64,
    pub(super) routes: Box<[Entry]>,
    /// Feasibility distance metric; `METRIC_INFINITY`: no feasibility distance yet.
    pub(super) fd_metric: u32,
    /// What we last told neighbors; `METRIC_INFINITY`: nothing, or a retraction.
    pub(super) adv_metric: u32,
    /// Seqno lags (see `Entry::lag`); saturating at `u16::MAX`, which then means "older
    /// than any entry": exact for feasibility, since no entry lags that far.
    pub(super) fd_lag: u16,
    pub(super) adv_lag: u16,
    /// The selected neighbor, or `NO_SLOT`.
    pub(super) selected: Slot,
    /// When a change of this prefix was last broadcast (see `pacing_stamp`), or
    /// `NEVER_SENT`. Fits in the record's padding.
    pub(super) sent_at: u16,
}

/// `Dest::sent_at` of a prefix never broadcast.
pub(super) const NEVER_SENT: u16 = u16::MAX;

/// A millisecond clock wrapping every 65.535 s, for update pacing: a wrong "recent" after
/// a wrap only delays one update by at most the pacing interval.
pub(super) fn pacing_stamp(now_us: u64) -> u16 {
    ((now_us / 1000) % u64::from(NEVER_SENT)) as u16
}

/// Milliseconds from stamp `then` to stamp `now` (modulo the wrap).
pub(super) fn pacing_elapsed_ms(then: u16, now: u16) -> u64 {
    (u64::from(now) + u64::from(NEVER_SENT) - u64::from(then)) % u64::from(NEVER_SENT)
}

impl Dest {
    pub(super) fn new(prefix: Prefix, key: [u8; 32], seqno: u64, sig: [u8; 64]) -> Dest {
        Dest {
            prefix,
            key,
            sig,
            seqno,
            routes: Box::new([]),
            fd_metric: METRIC_INFINITY,
            adv_metric: METRIC_INFINITY,
            fd_lag: 0,
            adv_lag: 0,
            selected: NO_SLOT,
            sent_at: NEVER_SENT,
        }
    }

    pub(super) fn seqno_at(&self, lag: u16) -> u64 {
        self.seqno.saturating_sub(u64::from(lag))
    }

    pub(super) fn entry(&self, slot: Slot) -> Option<&Entry> {
        self.routes.iter().find(|e| e.slot == slot)
    }

    /// Inserts or replaces the entry of `e.slot`.
    pub(super) fn set_entry(&mut self, e: Entry) {
        if let Some(old) = self.routes.iter_mut().find(|o| o.slot == e.slot) {
            *old = e;
        } else {
            // One exact allocation (a Vec's push then shrink would reallocate twice).
            self.routes = self.routes.iter().copied().chain([e]).collect();
        }
    }

    /// Removes the entry of `slot`; whether there was one.
    pub(super) fn remove_entry(&mut self, slot: Slot) -> bool {
        if self.entry(slot).is_none() {
            return false;
        }
        let v: Vec<Entry> = self
            .routes
            .iter()
            .filter(|e| e.slot != slot)
            .copied()
            .collect();
        self.routes = v.into_boxed_slice();
        if self.selected == slot {
            self.selected = NO_SLOT;
        }
        true
    }

    /// A newer seqno was verified: every lag grows; entries beyond `MAX_ENTRY_LAG` go.
    pub(super) fn advance(&mut self, seqno: u64, sig: [u8; 64]) {
        let by = seqno.saturating_sub(self.seqno);
        let lag = |l: u16| u16::try_from(u64::from(l) + by).unwrap_or(u16::MAX);
        if self
            .routes
            .iter()
            .any(|e| u64::from(e.lag) + by > u64::from(MAX_ENTRY_LAG))
        {
            let keep: Vec<Entry> = self
                .routes
                .iter()
                .filter(|e| u64::from(e.lag) + by <= u64::from(MAX_ENTRY_LAG))
                .copied()
                .collect();
            if self.entry(self.selected).is_some() && !keep.iter().any(|e| e.slot == self.selected)
            {
                self.selected = NO_SLOT;
            }
            self.routes = keep.into_boxed_slice();
        }
        for e in self.routes.iter_mut() {
            e.lag = lag(e.lag);
        }
        self.fd_lag = lag(self.fd_lag);
        self.adv_lag = lag(self.adv_lag);
        self.seqno = seqno;
        self.sig = sig;
    }
}

/// The index's hash of a prefix. Prefixes are already hash outputs (of the owner's key),
/// so a seeded mix suffices; the seed is random per table, so keys ground to collide in
/// one node's index do not collide in another's.
#[derive(Debug)]
struct PrefixHashing(u64);

impl Default for PrefixHashing {
    fn default() -> Self {
        PrefixHashing(RandomState::new().hash_one(0x5eed_u64))
    }
}

impl PrefixHashing {
    fn hash(&self, p: &Prefix) -> u64 {
        // SplitMix64's finalizer: every input bit reaches the low (bucket) and high (tag) bits.
        let mut z = u64::from_be_bytes(*p) ^ self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The prefix → record map.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// Record numbers, hashed by their record's prefix. A hash table, not an ordered map:
    /// every update received looks its prefix up, and at thousands of prefixes the ordered
    /// map's lookups were the largest cost of a simulated cold start (a cache miss at each
    /// level). 4 bytes a slot plus a control byte; the ordered map took about 20 per prefix.
    index: HashTable<u32>,
    hashing: PrefixHashing,
    chunks: Vec<Vec<Dest>>,
    free: Vec<u32>,
}

impl Table {
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// The record number of a prefix (valid until it is removed).
    pub(super) fn find(&self, p: &Prefix) -> Option<u32> {
        let chunks = &self.chunks;
        self.index
            .find(self.hashing.hash(p), |&i| {
                chunks[i as usize / CHUNK][i as usize % CHUNK].prefix == *p
            })
            .copied()
    }

    pub(super) fn at(&self, i: u32) -> &Dest {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    pub(super) fn at_mut(&mut self, i: u32) -> &mut Dest {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    pub(super) fn get(&self, p: &Prefix) -> Option<&Dest> {
        self.find(p).map(|i| self.at(i))
    }

    /// Adds a prefix (the caller checked the size limit and that it is new); its record
    /// number.
    pub(super) fn insert(&mut self, p: Prefix, d: Dest) -> u32 {
        let i = match self.free.pop() {
            Some(i) => {
                *self.at_mut(i) = d;
                i
            }
            None => {
                if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                let n = self.chunks.len() - 1;
                let c = &mut self.chunks[n];
                c.push(d);
                (n * CHUNK + c.len() - 1) as u32
            }
        };
        let (chunks, hashing) = (&self.chunks, &self.hashing);
        self.index.insert_unique(hashing.hash(&p), i, |&j| {
            hashing.hash(&chunks[j as usize / CHUNK][j as usize % CHUNK].prefix)
        });
        i
    }

    pub(super) fn remove(&mut self, p: &Prefix) {
        let chunks = &self.chunks;
        let found = self.index.find_entry(self.hashing.hash(p), |&i| {
            chunks[i as usize / CHUNK][i as usize % CHUNK].prefix == *p
        });
        if let Ok(entry) = found {
            let (i, _) = entry.remove();
            // The record stays allocated for reuse; its entries are freed now.
            self.at_mut(i).routes = Box::new([]);
            self.free.push(i);
        }
    }

    /// All prefixes, in order (sorted here: whole-table walks are rare, lookups are not).
    pub(super) fn iter(&self) -> impl Iterator<Item = (Prefix, &Dest)> {
        let mut all: Vec<(Prefix, u32)> =
            self.index.iter().map(|&i| (self.at(i).prefix, i)).collect();
        all.sort_unstable();
        all.into_iter().map(|(p, i)| (p, self.at(i)))
    }

    /// Every prefix with an entry from `slot` for which `f` (applied to its record) is true, in
    /// order.
    pub(super) fn with_entry_from(
        &mut self,
        slot: Slot,
        mut f: impl FnMut(&mut Dest) -> bool,
    ) -> Vec<Prefix> {
        let mut hit = Vec::new();
        for &i in &self.index {
            let d = &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK];
            if d.entry(slot).is_some() && f(d) {
                hit.push(d.prefix);
            }
        }
        // In prefix order, whatever the hash seed: the simulator stays deterministic.
        hit.sort_unstable();
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_small() {
        // Key and signature (96 bytes) are irreducible; the rest must stay small for the
        // 200-byte-per-route budget (the benchmark measures the real figure). The prefix
        // (8 bytes) is here so that the index holds only 4-byte record numbers.
        assert!(
            std::mem::size_of::<Dest>() <= 144,
            "{}",
            std::mem::size_of::<Dest>()
        );
        assert_eq!(std::mem::size_of::<Entry>(), 8);
    }

    #[test]
    fn lags_follow_the_newest_seqno_and_very_old_entries_go() {
        let mut d = Dest::new([0; 8], [1; 32], 10, [2; 64]);
        d.set_entry(Entry {
            slot: 1,
            lag: 0,
            metric: 5,
        });
        d.set_entry(Entry {
            slot: 2,
            lag: 3,
            metric: 5,
        });
        d.selected = 2;
        d.fd_lag = 3;
        d.fd_metric = 7;
        d.advance(12, [3; 64]);
        assert_eq!(d.entry(1).map(|e| e.lag), Some(2));
        assert_eq!(d.seqno_at(d.entry(2).unwrap().lag), 7);
        assert_eq!(d.fd_lag, 5);
        d.advance(12 + u64::from(MAX_ENTRY_LAG) - 3, [4; 64]);
        assert!(d.entry(1).is_some() && d.entry(2).is_none());
        assert_eq!((d.selected, d.fd_lag), (NO_SLOT, u16::MAX));
        let mut t = Table::default();
        for k in 0..600u32 {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&k.to_be_bytes());
            t.insert(p, Dest::new(p, [1; 32], 1, [0; 64]));
        }
        t.remove(&[0, 0, 0, 5, 0, 0, 0, 0]);
        t.insert([9; 8], Dest::new([9; 8], [7; 32], 1, [0; 64]));
        assert_eq!(t.len(), 600);
        assert_eq!(t.get(&[9; 8]).map(|d| d.key), Some([7; 32]));
        assert_eq!(t.chunks.len(), 3);
    }
}
