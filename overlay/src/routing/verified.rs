//! Route announcements whose signature already checked out, so that one signed
//! (prefix, seqno) heard from several neighbors, or again later, costs one verification.
//!
//! The routing table keeps the signature of every seqno its entries refer to, which covers
//! the common case; this small direct-mapped cache of digests covers announcements for
//! prefixes the table no longer (or not yet) holds, e.g. a route that flapped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::addr::Prefix;

/// Digests remembered per node (16 bytes each).
const SLOTS: usize = 256;

/// BLAKE3 over everything the verification depends on: key, prefix, seqno and signature.
pub(super) fn digest(key: &[u8; 32], prefix: &Prefix, seqno: u64, sig: &[u8; 64]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(prefix);
    h.update(&seqno.to_be_bytes());
    h.update(sig);
    *h.finalize().as_bytes()
}

/// A bounded cache of verified announcements (allocated on first use).
#[derive(Debug, Default)]
pub(super) struct VerifiedCache {
    slots: Option<Box<[[u8; 16]; SLOTS]>>,
}

impl VerifiedCache {
    fn split(d: &[u8; 32]) -> (usize, [u8; 16]) {
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&d[..16]);
        (usize::from(d[16]) % SLOTS, tag)
    }

    pub(super) fn contains(&self, d: &[u8; 32]) -> bool {
        let (i, tag) = Self::split(d);
        self.slots.as_ref().is_some_and(|s| s[i] == tag)
    }

    pub(super) fn insert(&mut self, d: &[u8; 32]) {
        let (i, tag) = Self::split(d);
        self.slots.get_or_insert_with(|| Box::new([[0; 16]; SLOTS]))[i] = tag;
    }
}

/// Verification results shared by all the nodes of one simulation: the simulator runs
/// thousands of nodes that each verify the same announcements once; sharing the result
/// keeps the simulation's own cost linear. Each node still counts the verification it
/// performs (`signatures_verified`) as a real node would. Real nodes never share this.
#[derive(Debug, Clone, Default)]
pub struct SharedVerifications(Arc<Mutex<HashSet<[u8; 32]>>>);

impl SharedVerifications {
    pub(super) fn contains(&self, d: &[u8; 32]) -> bool {
        self.0.lock().map(|s| s.contains(d)).unwrap_or(false)
    }

    pub(super) fn insert(&self, d: [u8; 32]) {
        if let Ok(mut s) = self.0.lock() {
            s.insert(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_what_it_saw_and_nothing_else() {
        let mut c = VerifiedCache::default();
        let a = digest(&[1; 32], &[2; 8], 3, &[4; 64]);
        let b = digest(&[1; 32], &[2; 8], 4, &[4; 64]);
        assert!(!c.contains(&a));
        c.insert(&a);
        assert!(c.contains(&a) && !c.contains(&b));
    }
}
