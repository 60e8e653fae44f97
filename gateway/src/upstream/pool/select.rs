//! Backend selection policies, sans-IO: given the eligible backends and their load, pick one.
//! Randomness comes from a small seeded generator so tests are deterministic.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What selection needs to know about an eligible backend.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    /// Index of the backend in the pool.
    pub index: usize,
    pub addr: SocketAddr,
    pub weight: u32,
    pub in_flight: u32,
    /// Latency estimate in seconds (`None` before the first sample).
    pub latency: Option<f64>,
    /// Seconds since the last latency sample.
    pub idle: f64,
}

/// SplitMix64: tiny, fast, good enough to pick two backends at random.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub(super) fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The SplitMix64 finaliser: a strong 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Power of two random choices on `(in_flight + 1) × latency / weight` (the peak-EWMA cost
/// of Finagle and Linkerd). Busy or slow backends lose most comparisons. A backend slower than
/// the pool's median that gets no traffic has its estimate drift back to the median within a
/// few seconds (`FORGIVE_AFTER`), so one slow answer (a cold connection, a pause) is forgiven quickly
/// and a recovered backend is noticed, while a backend that stays slow is re-measured as slow
/// each time it is tried. Returns an index into `cands`.
pub(super) fn least_loaded(rng: &mut Rng, cands: &[Candidate]) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => Some(0),
        n => {
            let mut known: Vec<f64> = cands.iter().filter_map(|c| c.latency).collect();
            known.sort_by(f64::total_cmp);
            // Backends with no sample yet are costed at the median, so a new backend neither
            // wins everything nor starves.
            let median = known.get(known.len() / 2).copied().unwrap_or(1.0);
            let cost = |c: &Candidate| {
                let latency = match c.latency {
                    None => median,
                    Some(l) if l > median => {
                        let left = (1.0 - c.idle / FORGIVE_AFTER.as_secs_f64()).max(0.0);
                        median + (l - median) * left
                    }
                    Some(l) => l,
                };
                (c.in_flight as f64 + 1.0) * latency.max(1e-6) / c.weight.max(1) as f64
            };
            let a = rng.below(n);
            let mut b = rng.below(n - 1);
            if b >= a {
                b += 1;
            }
            let (ca, cb) = (cost(&cands[a]), cost(&cands[b]));
            Some(if cb < ca { b } else { a })
        }
    }
}

/// After this long without a sample, a slow backend is costed at the pool's median again
/// (linearly on the way), so it is tried and re-measured.
pub(super) const FORGIVE_AFTER: Duration = Duration::from_secs(5);

/// Smooth weighted round robin (nginx's): spreads each backend's turns evenly through the
/// cycle. `current` holds one running score per pool backend.
pub(super) fn round_robin(current: &mut [i64], cands: &[Candidate]) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (i, c) in cands.iter().enumerate() {
        let w = i64::from(c.weight.max(1));
        let slot = current.get_mut(c.index)?;
        *slot += w;
        total += w;
        if best.is_none_or(|(_, score)| *slot > score) {
            best = Some((i, *slot));
        }
    }
    let (b, _) = best?;
    if let Some(slot) = current.get_mut(cands[b].index) {
        *slot -= total;
    }
    Some(b)
}

/// Weighted rendezvous (highest random weight) hashing: each backend scores
/// `-weight / ln(u)` with `u` a hash of (key, backend) in (0, 1); the highest wins. Chosen over
/// a ring or Maglev because pools are small (an O(n) scan is nanoseconds), there is no table to
/// rebuild when health changes, weights are exact, and when a backend leaves only its own keys
/// move — and they return to it when it comes back.
pub(super) fn rendezvous(key: &[u8], cands: &[Candidate]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in cands.iter().enumerate() {
        let h = hash_key_backend(key, &c.addr);
        // 53 random bits to a float strictly inside (0, 1).
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(c.weight.max(1)) / u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// A hash that is the same on every gateway and every build (FNV-1a, then mixed), so several
/// gateways in front of one pool send a client to the same backend.
fn hash_key_backend(key: &[u8], addr: &SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(key);
    feed(&[0xff]);
    match addr {
        SocketAddr::V4(a) => feed(&a.ip().octets()),
        SocketAddr::V6(a) => feed(&a.ip().octets()),
    }
    feed(&addr.port().to_be_bytes());
    mix64(h)
}

/// Peak-EWMA latency: jumps up to a slower sample at once and decays towards faster samples
/// with time constant `TAU`.
#[derive(Debug, Clone, Default)]
pub(super) struct PeakEwma {
    value: f64,
    stamp: Option<Instant>,
}

const TAU: Duration = Duration::from_secs(5);

impl PeakEwma {
    pub(super) fn observe(&mut self, sample: Duration, now: Instant) {
        let s = sample.as_secs_f64();
        match self.stamp {
            None => self.value = s,
            Some(t) => {
                let decay =
                    (-now.saturating_duration_since(t).as_secs_f64() / TAU.as_secs_f64()).exp();
                self.value = if s > self.value {
                    s
                } else {
                    self.value * decay + s * (1.0 - decay)
                };
            }
        }
        self.stamp = Some(now);
    }

    /// The estimate in seconds, `None` before the first sample.
    pub(super) fn value(&self) -> Option<f64> {
        self.stamp.map(|_| self.value)
    }

    /// Time since the last sample.
    pub(super) fn idle(&self, now: Instant) -> Duration {
        self.stamp
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                index: i,
                addr: SocketAddr::from(([127, 0, 0, 1], 8000 + i as u16)),
                weight: 1,
                in_flight: 0,
                latency: None,
                idle: 0.0,
            })
            .collect()
    }

    #[test]
    fn least_loaded_spreads_evenly_among_equals() {
        let mut rng = Rng::new(7);
        let c = cands(3);
        let mut hits = [0u32; 3];
        for _ in 0..30_000 {
            hits[least_loaded(&mut rng, &c).unwrap_or(9)] += 1;
        }
        for h in hits {
            assert!((9000..11000).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn least_loaded_avoids_a_ten_times_slower_backend() {
        let mut rng = Rng::new(1);
        let mut c = cands(3);
        c[0].latency = Some(0.001);
        c[1].latency = Some(0.001);
        c[2].latency = Some(0.010);
        let mut hits = [0u32; 3];
        for _ in 0..30_000 {
            hits[least_loaded(&mut rng, &c).unwrap_or(9)] += 1;
        }
        // Idle pool: the slow one loses every comparison it is in.
        assert_eq!(hits[2], 0, "{hits:?}");
        // Under load it gets a share again once the fast ones queue 10 deep.
        c[0].in_flight = 12;
        c[1].in_flight = 12;
        let slow = (0..1000)
            .filter(|_| least_loaded(&mut rng, &c) == Some(2))
            .count();
        assert!(slow > 500, "{slow}");
    }

    #[test]
    fn least_loaded_prefers_fewer_outstanding_requests() {
        let mut rng = Rng::new(3);
        let mut c = cands(2);
        c[0].in_flight = 5;
        for _ in 0..100 {
            assert_eq!(least_loaded(&mut rng, &c), Some(1));
        }
        assert_eq!(least_loaded(&mut rng, &c[..1]), Some(0));
        assert_eq!(least_loaded(&mut rng, &[]), None);
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let mut c = cands(3);
        c[0].weight = 5;
        let mut current = vec![0i64; 3];
        let picks: Vec<usize> = (0..7)
            .map(|_| round_robin(&mut current, &c).unwrap_or(9))
            .collect();
        // nginx's classic example: a a b a c a a (5:1:1), interleaved rather than bunched.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_skips_ineligible_backends() {
        let c = cands(3);
        let mut current = vec![0i64; 3];
        let eligible = [c[0], c[2]];
        let picks: Vec<usize> = (0..4)
            .map(|_| eligible[round_robin(&mut current, &eligible).unwrap_or(0)].index)
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }

    #[test]
    fn rendezvous_is_sticky_and_moves_only_the_lost_backends_keys() {
        let c = cands(4);
        let key = |i: u32| format!("client-{i}").into_bytes();
        let before: Vec<usize> = (0..1000)
            .map(|i| rendezvous(&key(i), &c).unwrap_or(9))
            .collect();
        // Same answer every time.
        for i in 0..1000 {
            assert_eq!(rendezvous(&key(i), &c), Some(before[i as usize]));
        }
        // Reasonably balanced.
        for b in 0..4 {
            let n = before.iter().filter(|x| **x == b).count();
            assert!((170..330).contains(&n), "backend {b}: {n}");
        }
        // Drop backend 1: only its keys move.
        let without: Vec<Candidate> = c.iter().copied().filter(|x| x.index != 1).collect();
        for i in 0..1000u32 {
            let now = without[rendezvous(&key(i), &without).unwrap_or(0)].index;
            if before[i as usize] != 1 {
                assert_eq!(now, before[i as usize]);
            }
        }
    }

    #[test]
    fn rendezvous_honours_weights() {
        let mut c = cands(2);
        c[1].weight = 3;
        let heavy = (0..4000u32)
            .filter(|i| rendezvous(&i.to_be_bytes(), &c) == Some(1))
            .count();
        assert!((2800..3200).contains(&heavy), "{heavy}");
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        assert_eq!(e.value(), None);
        e.observe(Duration::from_millis(1), t0);
        e.observe(Duration::from_millis(50), t0 + Duration::from_millis(10));
        assert!((e.value().unwrap_or(0.0) - 0.050).abs() < 1e-9);
        // Fast samples pull it back down over a few time constants.
        let now = t0 + Duration::from_millis(10);
        for i in 1..=100u64 {
            e.observe(
                Duration::from_millis(1),
                now + Duration::from_millis(200 * i),
            );
        }
        assert!(e.value().unwrap_or(1.0) < 0.005);
        assert_eq!(
            e.idle(now + Duration::from_millis(20_500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn one_slow_answer_is_forgiven_within_seconds() {
        let mut rng = Rng::new(5);
        let mut c = cands(3);
        c[0].latency = Some(0.002);
        c[1].latency = Some(0.002);
        // A cold first request took a second.
        c[2].latency = Some(1.0);
        let share = |rng: &mut Rng, c: &[Candidate]| {
            (0..3000)
                .filter(|_| least_loaded(rng, c) == Some(2))
                .count()
        };
        assert_eq!(share(&mut rng, &c), 0, "just after the slow answer");
        c[2].idle = 20.0;
        let later = share(&mut rng, &c);
        assert!(
            later > 300,
            "idle 20 s: back in rotation, got {later} of 3000"
        );
    }
}
