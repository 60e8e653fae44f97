//! End-to-end sessions (sans-IO): an authenticated ephemeral X25519 exchange (each side
//! signs its ephemeral key with its node identity), HKDF-SHA256 session keys,
//! AES-256-GCM data packets with the outer header as associated data, a replay window
//! and rekeying after a bounded number of packets or time.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv6Addr;

use bytes::{BufMut, Bytes, BytesMut};
// ring's AES-256-GCM: on machines with AES and carry-less multiply instructions it seals a
// request-sized packet in far fewer instructions than ring's ChaCha20-Poly1305, whose vector
// code pays for 512 bytes of key stream however short the packet (docs/benchmarks.md,
// overlay; docs/performance.md).
use hkdf::Hkdf;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

use crate::addr::{Prefix, prefix_for_key, prefix_of};
use crate::clock::Micros;
use crate::identity::{Identity, verify};
use crate::wire::{self, DATA_HEADER_LEN, SessionInit, SessionResp, TAG_LEN, UnknownSession};

/// Session tuning; defaults suit real nodes.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Start a new key exchange after this many packets sent on a session.
    pub rekey_after_packets: u64,
    /// ... or after this age.
    pub rekey_after: Micros,
    /// A session is never used (either direction) after this age.
    pub reject_after: Micros,
    /// Re-send an unanswered init after this long.
    pub init_retry: Micros,
    /// Give up (drop queued packets) after this many unanswered inits.
    pub init_attempts: u32,
    /// Packets held per destination while a session is being set up.
    pub queue_limit: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            // AES-GCM's usage limit: at most 2^36 blocks under one key keeps an attacker's
            // advantage below 2^-57 (draft-irtf-cfrg-aead-limits), and 2^24 packets of the
            // largest MTU (64 KiB, 2^12 blocks) stay within it.
            rekey_after_packets: 1 << 24,
            rekey_after: 120_000_000,
            reject_after: 180_000_000,
            init_retry: 1_000_000,
            init_attempts: 5,
            queue_limit: 256,
        }
    }
}

/// Why an incoming end-to-end packet was refused (each is counted by the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("malformed packet")]
    Malformed,
    #[error("no session for receiver index")]
    UnknownSession,
    #[error("authentication failed")]
    BadTag,
    #[error("replayed or too old counter")]
    Replayed,
    #[error("session expired")]
    Expired,
    #[error("bad signature")]
    BadSignature,
    #[error("key does not own the source address")]
    KeyMismatch,
    #[error("replayed session init")]
    ReplayedInit,
    #[error("not addressed to this node")]
    NotForUs,
    #[error("weak key exchange")]
    WeakKey,
    #[error("session init timestamp outside the replay window")]
    InitOutsideWindow,
    #[error("replay cache full")]
    ReplayCacheFull,
    #[error("unknown-session notice for a session not in use")]
    StaleNotice,
}

/// What the session layer wants done.
#[derive(Debug)]
pub(crate) enum SessionOut {
    /// Route this packet (init, response or data) towards its destination.
    Send(Bytes),
    /// Packets were dropped: no session to their destination could be set up.
    GaveUp { dropped: usize },
}

const REPLAY_WINDOW: u64 = 4096;
/// An unknown-session notice goes to one peer prefix at most this often: one is enough to
/// make the sender re-initiate, and each costs a signature.
const UNKNOWN_NOTICE_INTERVAL: Micros = 1_000_000;
/// Peer prefixes notified within the last interval at most: bounds the signatures spent on
/// data packets with forged sources to this many per interval.
const UNKNOWN_NOTICE_PEERS: usize = 256;

/// Sliding replay window over packet counters.
#[derive(Debug, Clone)]
pub(crate) struct ReplayWindow {
    /// One more than the highest counter accepted (0: none yet).
    top: u64,
    bits: Box<[u64; (REPLAY_WINDOW / 64) as usize]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: 0,
            bits: Box::new([0; (REPLAY_WINDOW / 64) as usize]),
        }
    }
}

impl ReplayWindow {
    /// Whether `c` would be accepted (not seen, not too old).
    pub(crate) fn check(&self, c: u64) -> bool {
        if c >= self.top {
            return true;
        }
        if self.top - c > REPLAY_WINDOW {
            return false;
        }
        !self.bit(c)
    }

    fn bit(&self, c: u64) -> bool {
        let i = c % REPLAY_WINDOW;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set_bit(&mut self, c: u64, v: bool) {
        let i = c % REPLAY_WINDOW;
        let w = &mut self.bits[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Marks `c` as seen; call only after the packet authenticated.
    pub(crate) fn accept(&mut self, c: u64) {
        if c >= self.top {
            let advance = c + 1 - self.top;
            if advance >= REPLAY_WINDOW {
                self.bits.fill(0);
            } else {
                for n in self.top..=c {
                    self.set_bit(n, false);
                }
            }
            self.top = c + 1;
        }
        self.set_bit(c, true);
    }
}

struct Session {
    /// The peer's ed25519 key (verifies its unknown-session notices).
    peer_key: [u8; 32],
    local_idx: u32,
    remote_idx: u32,
    send: LessSafeKey,
    recv: LessSafeKey,
    send_counter: u64,
    replay: ReplayWindow,
    created: Micros,
    /// When a data packet last opened on this session.
    last_received: Option<Micros>,
}

struct Pending {
    idx: u32,
    eph: x25519_dalek::StaticSecret,
    init: SessionInit,
    init_hash: [u8; 32],
    sent_at: Micros,
    attempts: u32,
}

#[derive(Default)]
struct Peer {
    addr: Option<Ipv6Addr>,
    current: Option<Session>,
    previous: Option<Session>,
    pending: Option<Pending>,
    queue: VecDeque<Bytes>,
    /// Last time this entry was used (sealed for, opened from, init or response): the least
    /// recently used entry is evicted when the table is full.
    last_used: Micros,
}

/// All end-to-end sessions of one node.
pub(crate) struct Sessions {
    id: Identity,
    addr: Ipv6Addr,
    prefix: Prefix,
    cfg: SessionConfig,
    /// Peer entries at most (`Limits::max_session_peers`).
    max_peers: usize,
    peers: BTreeMap<Prefix, Peer>,
    by_idx: BTreeMap<u32, Prefix>,
    next_timestamp: u64,
    /// Unix µs at core time 0: init timestamps are wall-clock times.
    clock_offset: u64,
    /// Inits from outside `now ± window` are refused.
    init_window: Micros,
    /// Highest init timestamp accepted per initiator, kept while inside the window: the
    /// replay protection. At most `replay_cache_limit` entries.
    replay_cache: BTreeMap<Prefix, u64>,
    replay_cache_limit: usize,
    /// Peer entries evicted to make room.
    pub(crate) evicted: u64,
    rng: Box<dyn FnMut() -> [u8; 32] + Send>,
    /// When each peer prefix was last sent an unknown-session notice.
    notified: BTreeMap<Prefix, Micros>,
    /// Sessions established (both roles), for status.
    pub(crate) established: u64,
}

impl Sessions {
    /// `clock_offset` is the Unix time in µs at core time 0 (init timestamps are wall-clock
    /// µs, checked against a window by responders); `rng` supplies key material (seeded in
    /// the simulator).
    pub(crate) fn new(
        id: Identity,
        cfg: SessionConfig,
        limits: &crate::limits::Limits,
        clock_offset: u64,
        rng: Box<dyn FnMut() -> [u8; 32] + Send>,
    ) -> Sessions {
        let addr = id.address();
        Sessions {
            prefix: prefix_of(&addr),
            addr,
            id,
            cfg,
            max_peers: limits.max_session_peers.max(1),
            peers: BTreeMap::new(),
            by_idx: BTreeMap::new(),
            next_timestamp: 0,
            clock_offset,
            init_window: limits.session_init_window,
            replay_cache: BTreeMap::new(),
            replay_cache_limit: limits.session_init_replay_cache,
            evicted: 0,
            rng,
            notified: BTreeMap::new(),
            established: 0,
        }
    }

    fn wall(&self, now: Micros) -> u64 {
        self.clock_offset.saturating_add(now)
    }

    /// Makes room for `prefix`'s entry: a full table evicts its least recently used entry
    /// (its sessions end; the peer re-initiates when it needs one). No lookup while the
    /// table has room, as on every sealed packet.
    fn make_room(&mut self, prefix: Prefix) {
        if self.peers.len() >= self.max_peers && !self.peers.contains_key(&prefix) {
            let lru = self
                .peers
                .iter()
                .min_by_key(|(_, p)| p.last_used)
                .map(|(k, _)| *k);
            if let Some(old) = lru.and_then(|k| self.peers.remove(&k)) {
                self.evicted += 1;
                let idxs = [old.current.as_ref(), old.previous.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|s| s.local_idx)
                    .chain(old.pending.as_ref().map(|p| p.idx));
                for idx in idxs {
                    self.by_idx.remove(&idx);
                }
            }
        }
    }

    fn new_idx(&mut self) -> u32 {
        loop {
            let r = (self.rng)();
            let idx = u32::from_be_bytes([r[0], r[1], r[2], r[3]]);
            if idx != 0 && !self.by_idx.contains_key(&idx) {
                return idx;
            }
        }
    }

    /// Encrypts a local IPv6 packet for `dst` or queues it while a session is set up.
    pub(crate) fn seal(
        &mut self,
        now: Micros,
        dst: Ipv6Addr,
        packet: Bytes,
        out: &mut Vec<SessionOut>,
    ) {
        let prefix = prefix_of(&dst);
        let cfg = self.cfg.clone();
        self.make_room(prefix);
        let peer = used(&mut self.peers, prefix, now);
        peer.addr = Some(dst);
        let usable = peer
            .current
            .as_ref()
            .is_some_and(|s| now.saturating_sub(s.created) < cfg.reject_after);
        let needs_rekey = peer.current.as_ref().is_none_or(|s| {
            s.send_counter >= cfg.rekey_after_packets
                || now.saturating_sub(s.created) >= cfg.rekey_after
        });
        let start_init = needs_rekey && peer.pending.is_none();
        if usable {
            if let Some(s) = peer.current.as_mut() {
                out.push(SessionOut::Send(seal_data(s, &self.addr, &dst, &packet)));
            }
        } else if peer.queue.len() < cfg.queue_limit {
            peer.queue.push_back(packet);
        } else {
            out.push(SessionOut::GaveUp { dropped: 1 });
        }
        if start_init {
            self.start_init(now, prefix, dst, out);
        }
    }

    fn start_init(
        &mut self,
        now: Micros,
        prefix: Prefix,
        dst: Ipv6Addr,
        out: &mut Vec<SessionOut>,
    ) {
        let idx = self.new_idx();
        let eph = x25519_dalek::StaticSecret::from((self.rng)());
        // Wall-clock µs, strictly increasing even if the clock stalls.
        let timestamp = self.next_timestamp.max(self.wall(now));
        self.next_timestamp = timestamp + 1;
        let mut init = SessionInit {
            src: self.addr,
            dst,
            sender_idx: idx,
            initiator_key: self.id.public_key(),
            ephemeral: x25519_dalek::PublicKey::from(&eph).to_bytes(),
            timestamp,
            signature: [0; 64],
        };
        init.signature = self.id.sign(&init.signed_input());
        let encoded = init.encode();
        let init_hash = transcript_hash(&encoded);
        self.by_idx.insert(idx, prefix);
        self.make_room(prefix);
        let peer = used(&mut self.peers, prefix, now);
        if let Some(old) = peer.pending.take() {
            self.by_idx.remove(&old.idx);
        }
        peer.pending = Some(Pending {
            idx,
            eph,
            init,
            init_hash,
            sent_at: now,
            attempts: 1,
        });
        out.push(SessionOut::Send(encoded));
    }

    /// Handles a session init addressed to this node; returns the response to route back.
    pub(crate) fn handle_init(
        &mut self,
        now: Micros,
        packet: &[u8],
        out: &mut Vec<SessionOut>,
    ) -> Result<(), SessionError> {
        let init = SessionInit::decode(packet).map_err(|_| SessionError::Malformed)?;
        if prefix_of(&init.dst) != self.prefix {
            return Err(SessionError::NotForUs);
        }
        let peer_prefix = prefix_of(&init.src);
        if prefix_for_key(&init.initiator_key) != peer_prefix {
            return Err(SessionError::KeyMismatch);
        }
        if !verify(&init.initiator_key, &init.signed_input(), &init.signature) {
            return Err(SessionError::BadSignature);
        }
        let wall = self.wall(now);
        if init.timestamp.abs_diff(wall) > self.init_window {
            return Err(SessionError::InitOutsideWindow);
        }
        if self
            .replay_cache
            .get(&peer_prefix)
            .is_some_and(|last| init.timestamp <= *last)
        {
            return Err(SessionError::ReplayedInit);
        }
        if self.replay_cache.len() >= self.replay_cache_limit
            && !self.replay_cache.contains_key(&peer_prefix)
        {
            self.expire_replay_cache(wall);
            if self.replay_cache.len() >= self.replay_cache_limit {
                return Err(SessionError::ReplayCacheFull);
            }
        }
        let idx = self.new_idx();
        let eph = x25519_dalek::StaticSecret::from((self.rng)());
        let mut resp = SessionResp {
            src: self.addr,
            dst: init.src,
            sender_idx: idx,
            receiver_idx: init.sender_idx,
            responder_key: self.id.public_key(),
            ephemeral: x25519_dalek::PublicKey::from(&eph).to_bytes(),
            signature: [0; 64],
        };
        let init_hash = transcript_hash(packet);
        resp.signature = self.id.sign(&resp.signed_input(&init_hash));
        let (i2r, r2i) = derive_keys(&eph, &init.ephemeral, &init_hash, &resp)?;
        let session = Session {
            peer_key: init.initiator_key,
            local_idx: idx,
            remote_idx: init.sender_idx,
            send: r2i,
            recv: i2r,
            send_counter: 0,
            replay: ReplayWindow::default(),
            created: now,
            last_received: None,
        };
        self.by_idx.insert(idx, peer_prefix);
        // The response must precede data sent on the new session.
        out.push(SessionOut::Send(resp.encode()));
        self.replay_cache.insert(peer_prefix, init.timestamp);
        self.install(peer_prefix, init.src, session, now, out);
        Ok(())
    }

    /// Forgets initiators whose last init left the window: an init that old is refused by
    /// the window check anyway.
    fn expire_replay_cache(&mut self, wall: u64) {
        let window = self.init_window;
        self.replay_cache
            .retain(|_, ts| ts.saturating_add(window) >= wall);
    }

    /// Handles a session response to one of our inits.
    pub(crate) fn handle_resp(
        &mut self,
        now: Micros,
        packet: &[u8],
        out: &mut Vec<SessionOut>,
    ) -> Result<(), SessionError> {
        let resp = SessionResp::decode(packet).map_err(|_| SessionError::Malformed)?;
        if resp.dst != self.addr {
            return Err(SessionError::NotForUs);
        }
        let peer_prefix = prefix_of(&resp.src);
        if prefix_for_key(&resp.responder_key) != peer_prefix {
            return Err(SessionError::KeyMismatch);
        }
        let Some(peer) = self.peers.get_mut(&peer_prefix) else {
            return Err(SessionError::UnknownSession);
        };
        let Some(pending) = peer.pending.as_ref().filter(|p| p.idx == resp.receiver_idx) else {
            return Err(SessionError::UnknownSession);
        };
        if !verify(
            &resp.responder_key,
            &resp.signed_input(&pending.init_hash),
            &resp.signature,
        ) {
            return Err(SessionError::BadSignature);
        }
        let (i2r, r2i) = derive_keys(&pending.eph, &resp.ephemeral, &pending.init_hash, &resp)?;
        let local_idx = pending.idx;
        peer.pending = None;
        let session = Session {
            peer_key: resp.responder_key,
            local_idx,
            remote_idx: resp.sender_idx,
            send: i2r,
            recv: r2i,
            send_counter: 0,
            replay: ReplayWindow::default(),
            created: now,
            last_received: None,
        };
        self.install(peer_prefix, resp.src, session, now, out);
        Ok(())
    }

    fn install(
        &mut self,
        prefix: Prefix,
        addr: Ipv6Addr,
        s: Session,
        now: Micros,
        out: &mut Vec<SessionOut>,
    ) {
        self.established += 1;
        self.make_room(prefix);
        let peer = used(&mut self.peers, prefix, now);
        if let Some(old) = peer.previous.take() {
            self.by_idx.remove(&old.local_idx);
        }
        peer.previous = peer.current.take();
        peer.current = Some(s);
        let dst = peer.addr.unwrap_or(addr);
        if let Some(cur) = peer.current.as_mut() {
            while let Some(p) = peer.queue.pop_front() {
                let to = packet_dst(&p).unwrap_or(dst);
                out.push(SessionOut::Send(seal_data(cur, &self.addr, &to, &p)));
            }
        }
    }

    /// Whether an authenticated data packet from `addr`'s /64 opened within `within` µs
    /// before `now` (the peer is demonstrably reachable).
    pub(crate) fn heard_from_within(&self, addr: &Ipv6Addr, now: Micros, within: Micros) -> bool {
        self.peers.get(&prefix_of(addr)).is_some_and(|p| {
            [p.current.as_ref(), p.previous.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|s| s.last_received)
                .any(|t| now.saturating_sub(t) < within)
        })
    }

    /// Decrypts a data packet addressed to this node. Returns the peer's address (outer
    /// source, authenticated) and the inner IPv6 packet.
    pub(crate) fn open(
        &mut self,
        now: Micros,
        mut packet: BytesMut,
    ) -> Result<(Ipv6Addr, Bytes), SessionError> {
        let h = wire::parse_routed(&packet).map_err(|_| SessionError::Malformed)?;
        let (idx, counter) = wire::data_fields(&packet).map_err(|_| SessionError::Malformed)?;
        let prefix = *self.by_idx.get(&idx).ok_or(SessionError::UnknownSession)?;
        if prefix_of(&h.src) != prefix {
            return Err(SessionError::UnknownSession);
        }
        let reject_after = self.cfg.reject_after;
        let peer = self
            .peers
            .get_mut(&prefix)
            .ok_or(SessionError::UnknownSession)?;
        let s = [peer.current.as_mut(), peer.previous.as_mut()]
            .into_iter()
            .flatten()
            .find(|s| s.local_idx == idx)
            .ok_or(SessionError::UnknownSession)?;
        if now.saturating_sub(s.created) >= reject_after {
            return Err(SessionError::Expired);
        }
        if !s.replay.check(counter) {
            return Err(SessionError::Replayed);
        }
        let aad = wire::data_aad(&packet);
        let len = packet.len();
        if len < DATA_HEADER_LEN + TAG_LEN {
            return Err(SessionError::Malformed);
        }
        s.recv
            .open_in_place(
                nonce(counter),
                Aad::from(aad),
                &mut packet[DATA_HEADER_LEN..],
            )
            .map_err(|_| SessionError::BadTag)?;
        s.replay.accept(counter);
        s.last_received = Some(now);
        peer.last_used = peer.last_used.max(now);
        packet.truncate(len - TAG_LEN);
        let inner = packet.split_off(DATA_HEADER_LEN).freeze();
        Ok((h.src, inner))
    }

    /// A data packet from `src` carried receiver index `idx`, which names no session here
    /// (typically: this node restarted and the sender still uses the old session). Answers
    /// with a signed unknown-session notice so the sender sets up a new session at once
    /// instead of black-holing traffic until its session expires. Rate-limited per peer
    /// prefix and in total; returns whether a notice was sent.
    pub(crate) fn answer_unknown(
        &mut self,
        now: Micros,
        src: Ipv6Addr,
        idx: u32,
        out: &mut Vec<SessionOut>,
    ) -> bool {
        let prefix = prefix_of(&src);
        if self.by_idx.contains_key(&idx)
            || prefix == self.prefix
            || !crate::addr::is_overlay_v6(&src)
        {
            return false;
        }
        if self
            .notified
            .get(&prefix)
            .is_some_and(|t| now.saturating_sub(*t) < UNKNOWN_NOTICE_INTERVAL)
        {
            return false;
        }
        if self.notified.len() >= UNKNOWN_NOTICE_PEERS {
            self.notified
                .retain(|_, t| now.saturating_sub(*t) < UNKNOWN_NOTICE_INTERVAL);
            if self.notified.len() >= UNKNOWN_NOTICE_PEERS {
                return false;
            }
        }
        self.notified.insert(prefix, now);
        let mut notice = UnknownSession {
            src: self.addr,
            dst: src,
            receiver_idx: idx,
            signature: [0; 64],
        };
        notice.signature = self.id.sign(&notice.signed_input());
        out.push(SessionOut::Send(notice.encode()));
        true
    }

    /// An unknown-session notice: if it names the session we currently send on and is signed
    /// by that session's peer, the session is dropped and a new one initiated (packets queue
    /// meanwhile). Notices about any other index are ignored, so a relay can neither forge
    /// one nor replay an old one against a live session.
    pub(crate) fn handle_unknown(
        &mut self,
        now: Micros,
        packet: &[u8],
        out: &mut Vec<SessionOut>,
    ) -> Result<(), SessionError> {
        let m = UnknownSession::decode(packet).map_err(|_| SessionError::Malformed)?;
        if m.dst != self.addr {
            return Err(SessionError::NotForUs);
        }
        let prefix = prefix_of(&m.src);
        let peer = self
            .peers
            .get_mut(&prefix)
            .ok_or(SessionError::StaleNotice)?;
        let cur = peer
            .current
            .as_ref()
            .filter(|s| s.remote_idx == m.receiver_idx)
            .ok_or(SessionError::StaleNotice)?;
        if !verify(&cur.peer_key, &m.signed_input(), &m.signature) {
            return Err(SessionError::BadSignature);
        }
        if let Some(s) = peer.current.take() {
            self.by_idx.remove(&s.local_idx);
        }
        let dst = peer.addr.unwrap_or(m.src);
        if peer.pending.is_none() {
            self.start_init(now, prefix, dst, out);
        }
        Ok(())
    }

    /// Retries unanswered inits, gives up on dead ones, drops expired sessions.
    pub(crate) fn tick(&mut self, now: Micros, out: &mut Vec<SessionOut>) {
        let cfg = self.cfg.clone();
        let mut retry = Vec::new();
        for peer in self.peers.values_mut() {
            for slot in [&mut peer.current, &mut peer.previous] {
                if slot
                    .as_ref()
                    .is_some_and(|s| now.saturating_sub(s.created) >= cfg.reject_after)
                    && let Some(s) = slot.take()
                {
                    self.by_idx.remove(&s.local_idx);
                }
            }
            if let Some(p) = peer.pending.as_mut()
                && now.saturating_sub(p.sent_at) >= cfg.init_retry
            {
                if p.attempts >= cfg.init_attempts {
                    self.by_idx.remove(&p.idx);
                    peer.pending = None;
                    if !peer.queue.is_empty() {
                        out.push(SessionOut::GaveUp {
                            dropped: peer.queue.len(),
                        });
                        peer.queue.clear();
                    }
                } else {
                    p.attempts += 1;
                    p.sent_at = now;
                    retry.push(p.init.encode());
                }
            }
        }
        self.notified
            .retain(|_, t| now.saturating_sub(*t) < UNKNOWN_NOTICE_INTERVAL);
        self.peers
            .retain(|_, p| p.current.is_some() || p.previous.is_some() || p.pending.is_some());
        let wall = self.wall(now);
        self.expire_replay_cache(wall);
        out.extend(retry.into_iter().map(SessionOut::Send));
    }

    /// Whether an init waits for its answer (the core then runs maintenance at short
    /// intervals, for the retry). Scans the peers: called on the maintenance timer only.
    pub(crate) fn has_pending(&self) -> bool {
        self.peers.values().any(|p| p.pending.is_some())
    }

    /// Whether there is nothing to expire or retry (the core then needs no maintenance).
    pub(crate) fn is_idle(&self) -> bool {
        self.peers.is_empty() && self.notified.is_empty() && self.replay_cache.is_empty()
    }

    /// Forgets pending inits and queued packets for a destination (e.g. it became unreachable).
    pub(crate) fn abandon(&mut self, dst: &Ipv6Addr) -> usize {
        let prefix = prefix_of(dst);
        let Some(peer) = self.peers.get_mut(&prefix) else {
            return 0;
        };
        if let Some(p) = peer.pending.take() {
            self.by_idx.remove(&p.idx);
        }
        let n = peer.queue.len();
        peer.queue.clear();
        n
    }
}

impl Sessions {
    /// Our own routing has no path to `dst` (its node is gone, or routing is moving): drops
    /// pending inits and queued packets, and stops sending on the current session, so the
    /// first packet after the route returns starts a new handshake and waits behind it. Sending
    /// it under the old keys would lose it if the peer restarted meanwhile. The old session
    /// stays as `previous`, still accepting what the peer sends on it until the new one is up.
    pub(crate) fn forget(&mut self, dst: &Ipv6Addr) -> usize {
        let dropped = self.abandon(dst);
        if let Some(peer) = self.peers.get_mut(&prefix_of(dst))
            && let Some(current) = peer.current.take()
            && let Some(older) = peer.previous.replace(current)
        {
            self.by_idx.remove(&older.local_idx);
        }
        dropped
    }
}

fn packet_dst(p: &[u8]) -> Option<Ipv6Addr> {
    let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
    Some(Ipv6Addr::from(d))
}

fn transcript_hash(init_packet: &[u8]) -> [u8; 32] {
    // The hop limit (byte 1) changes in flight: hash the packet without it.
    let mut h = Sha256::new();
    h.update(init_packet.first().map_or(&[][..], std::slice::from_ref));
    h.update(init_packet.get(2..).unwrap_or(&[]));
    h.finalize().into()
}

fn derive_keys(
    own_eph: &x25519_dalek::StaticSecret,
    peer_eph: &[u8; 32],
    init_hash: &[u8; 32],
    resp: &SessionResp,
) -> Result<(LessSafeKey, LessSafeKey), SessionError> {
    let shared = own_eph.diffie_hellman(&x25519_dalek::PublicKey::from(*peer_eph));
    if !shared.was_contributory() {
        return Err(SessionError::WeakKey);
    }
    let mut salt = Sha256::new();
    salt.update(init_hash);
    salt.update(resp.signed_input(init_hash));
    salt.update(resp.signature);
    let salt: [u8; 32] = salt.finalize().into();
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes());
    let mut i2r = zeroize::Zeroizing::new([0u8; 32]);
    let mut r2i = zeroize::Zeroizing::new([0u8; 32]);
    hk.expand(b"meshgate-e2e-v2 initiator to responder", &mut *i2r)
        .map_err(|_| SessionError::WeakKey)?;
    hk.expand(b"meshgate-e2e-v2 responder to initiator", &mut *r2i)
        .map_err(|_| SessionError::WeakKey)?;
    let k = |b: &[u8; 32]| {
        UnboundKey::new(&AES_256_GCM, b)
            .map(LessSafeKey::new)
            .map_err(|_| SessionError::WeakKey)
    };
    Ok((k(&i2r)?, k(&r2i)?))
}

/// Nonce: 4 zero bytes then the 64-bit packet counter (big-endian).
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    // Unique: the counter never repeats within a session (one key per session and direction).
    Nonce::assume_unique_for_key(n)
}

fn seal_data(s: &mut Session, src: &Ipv6Addr, dst: &Ipv6Addr, packet: &[u8]) -> Bytes {
    let counter = s.send_counter;
    s.send_counter += 1;
    let mut b = BytesMut::with_capacity(DATA_HEADER_LEN + packet.len() + TAG_LEN);
    wire::put_data_header(&mut b, src, dst, s.remote_idx, counter);
    b.put_slice(packet);
    let aad = wire::data_aad(&b[..DATA_HEADER_LEN]);
    let body = &mut b[DATA_HEADER_LEN..];
    // Sealing cannot fail for packets below the AEAD's 256 GiB limit.
    match s
        .send
        .seal_in_place_separate_tag(nonce(counter), Aad::from(aad), body)
    {
        Ok(tag) => b.put_slice(tag.as_ref()),
        Err(_) => b.put_bytes(0, TAG_LEN),
    }
    b.freeze()
}

/// A signed session init from `from` to `dst` (tests play throwaway-key initiators).
/// `prefix`'s entry in `peers` (made if absent), marked used at `now`.
fn used(peers: &mut BTreeMap<Prefix, Peer>, prefix: Prefix, now: Micros) -> &mut Peer {
    let peer = peers.entry(prefix).or_default();
    peer.last_used = peer.last_used.max(now);
    peer
}

#[cfg(test)]
pub(crate) fn test_init(from: &Identity, dst: Ipv6Addr, timestamp: u64) -> Bytes {
    let eph = x25519_dalek::StaticSecret::from([5u8; 32]);
    let mut init = SessionInit {
        src: from.address(),
        dst,
        sender_idx: 7,
        initiator_key: from.public_key(),
        ephemeral: x25519_dalek::PublicKey::from(&eph).to_bytes(),
        timestamp,
        signature: [0; 64],
    };
    init.signature = from.sign(&init.signed_input());
    init.encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn responder(limits: &Limits) -> Sessions {
        let mut n = 0u8;
        Sessions::new(
            Identity::from_seed(&[2; 32]),
            SessionConfig::default(),
            limits,
            0,
            Box::new(move || {
                n = n.wrapping_add(1);
                [n; 32]
            }),
        )
    }

    fn throwaway(k: u8) -> Identity {
        Identity::from_seed(&[k; 32])
    }

    const DAY: Micros = 86_400_000_000;

    /// Issue 13, item 3: throwaway keys filled the table; two days later, with every session
    /// expired, an honest newcomer still got `TooManyPeers`.
    #[test]
    fn idle_and_least_recently_used_peers_make_room_for_newcomers() {
        let limits = Limits {
            max_session_peers: 4,
            ..Limits::default()
        };
        let mut b = responder(&limits);
        let mut out = Vec::new();
        for k in 0..4 {
            b.handle_init(0, &test_init(&throwaway(100 + k), b.addr, 0), &mut out)
                .unwrap();
        }
        assert_eq!(b.peers.len(), 4);
        // Two simulated days later every session has expired: the entries are gone.
        let later = 2 * DAY;
        b.tick(later, &mut out);
        assert!(b.peers.is_empty(), "idle entries kept: {}", b.peers.len());
        let honest = throwaway(1);
        b.handle_init(later, &test_init(&honest, b.addr, later), &mut out)
            .unwrap();
        // A table full of live entries: a newcomer evicts the least recently used one.
        for k in 0..3 {
            let t = later + 1 + k as u64;
            b.handle_init(t, &test_init(&throwaway(110 + k), b.addr, t), &mut out)
                .unwrap();
        }
        let t = later + 10;
        b.handle_init(t, &test_init(&throwaway(120), b.addr, t), &mut out)
            .unwrap();
        assert_eq!((b.peers.len(), b.evicted), (4, 1));
        assert!(
            !b.peers.contains_key(&prefix_of(&honest.address())),
            "the least recently used entry is the one evicted"
        );
        // Evicted sessions leave no index behind.
        assert_eq!(b.by_idx.len(), 4);
    }

    #[test]
    fn inits_outside_the_window_or_replayed_inside_it_are_refused() {
        let limits = Limits {
            session_init_window: 60_000_000,
            session_init_replay_cache: 2,
            ..Limits::default()
        };
        let mut b = responder(&limits);
        let mut out = Vec::new();
        let now = DAY;
        let a = throwaway(1);
        for ts in [now - 61_000_000, now + 61_000_000] {
            assert_eq!(
                b.handle_init(now, &test_init(&a, b.addr, ts), &mut out),
                Err(SessionError::InitOutsideWindow)
            );
        }
        let init = test_init(&a, b.addr, now - 30_000_000);
        b.handle_init(now, &init, &mut out).unwrap();
        assert_eq!(
            b.handle_init(now + 1, &init, &mut out),
            Err(SessionError::ReplayedInit)
        );
        // The replay cache is bounded: full of initiators inside the window, newcomers wait.
        b.handle_init(now, &test_init(&throwaway(2), b.addr, now), &mut out)
            .unwrap();
        let c = throwaway(3);
        assert_eq!(
            b.handle_init(now, &test_init(&c, b.addr, now), &mut out),
            Err(SessionError::ReplayCacheFull)
        );
        // Once those entries leave the window, there is room again (and their old inits
        // are refused by the window).
        let later = now + 61_000_000;
        b.tick(later, &mut out);
        b.handle_init(later, &test_init(&c, b.addr, later), &mut out)
            .unwrap();
        assert_eq!(
            b.handle_init(later, &init, &mut out),
            Err(SessionError::InitOutsideWindow)
        );
    }

    fn pair(cfg: SessionConfig) -> (Sessions, Sessions) {
        let mut n = 0u8;
        let rng = move || {
            n = n.wrapping_add(1);
            [n; 32]
        };
        let mut m = 100u8;
        let rng2 = move || {
            m = m.wrapping_add(1);
            [m; 32]
        };
        (
            Sessions::new(
                Identity::from_seed(&[1; 32]),
                cfg.clone(),
                &crate::limits::Limits::default(),
                10,
                Box::new(rng),
            ),
            Sessions::new(
                Identity::from_seed(&[2; 32]),
                cfg,
                &crate::limits::Limits::default(),
                10,
                Box::new(rng2),
            ),
        )
    }

    fn sends(out: &mut Vec<SessionOut>) -> Vec<Bytes> {
        out.drain(..)
            .filter_map(|o| match o {
                SessionOut::Send(b) => Some(b),
                _ => None,
            })
            .collect()
    }

    /// Runs the handshake; returns the data packets a queued for b.
    fn connect(a: &mut Sessions, b: &mut Sessions, now: Micros, payloads: &[&[u8]]) -> Vec<Bytes> {
        let mut out = Vec::new();
        for p in payloads {
            a.seal(now, b.addr, Bytes::copy_from_slice(p), &mut out);
        }
        let init = sends(&mut out);
        assert_eq!(init.len(), 1);
        b.handle_init(now, &init[0], &mut out).unwrap();
        let resp = sends(&mut out);
        a.handle_resp(now, &resp[0], &mut out).unwrap();
        sends(&mut out)
    }

    #[test]
    fn seal_open_replay_and_tamper() {
        let (mut a, mut b) = pair(SessionConfig::default());
        let data = connect(&mut a, &mut b, 0, &[b"one", b"two"]);
        assert_eq!(data.len(), 2);
        let (src, inner) = b.open(1, BytesMut::from(&data[1][..])).unwrap();
        assert_eq!((src, &inner[..]), (a.addr, &b"two"[..]));
        assert_eq!(
            &b.open(1, BytesMut::from(&data[0][..])).unwrap().1[..],
            b"one"
        );
        // Replays are refused.
        assert_eq!(
            b.open(1, BytesMut::from(&data[0][..])),
            Err(SessionError::Replayed)
        );
        // Any flipped bit outside the hop limit is refused.
        let mut out = Vec::new();
        a.seal(2, b.addr, Bytes::from_static(b"three"), &mut out);
        let p = sends(&mut out).remove(0);
        for i in (0..p.len()).filter(|i| *i != 1) {
            let mut t = BytesMut::from(&p[..]);
            t[i] ^= 1;
            assert!(b.open(3, t).is_err(), "flipped byte {i} accepted");
        }
        // Every truncation is refused, down to a header without a whole tag.
        for n in 0..p.len() {
            assert!(
                b.open(3, BytesMut::from(&p[..n])).is_err(),
                "{n} bytes accepted"
            );
        }
        let mut hop = BytesMut::from(&p[..]);
        hop[1] = 3;
        assert_eq!(&b.open(3, hop).unwrap().1[..], b"three");
        // Replies flow the other way on the same session.
        b.seal(4, a.addr, Bytes::from_static(b"reply"), &mut out);
        let r = sends(&mut out).remove(0);
        assert_eq!(&a.open(5, BytesMut::from(&r[..])).unwrap().1[..], b"reply");
    }

    #[test]
    fn replayed_init_is_refused() {
        let (mut a, mut b) = pair(SessionConfig::default());
        let mut out = Vec::new();
        a.seal(0, b.addr, Bytes::from_static(b"x"), &mut out);
        let init = sends(&mut out).remove(0);
        b.handle_init(0, &init, &mut out).unwrap();
        assert_eq!(
            b.handle_init(1, &init, &mut out),
            Err(SessionError::ReplayedInit)
        );
        // A forged init (bad signature) is refused.
        let mut bad = init.to_vec();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let (_, mut c) = pair(SessionConfig::default());
        assert_eq!(
            c.handle_init(0, &bad, &mut out),
            Err(SessionError::BadSignature)
        );
    }

    #[test]
    fn window_accepts_reordering_and_rejects_old() {
        let mut w = ReplayWindow::default();
        for c in [5, 3, 4, 0, 10_000] {
            assert!(w.check(c));
            w.accept(c);
            assert!(!w.check(c));
        }
        assert!(!w.check(5), "older than the window");
        assert!(w.check(10_000 - 100));
    }

    #[test]
    fn rekeys_after_the_packet_limit_without_loss() {
        let cfg = SessionConfig {
            rekey_after_packets: 3,
            ..SessionConfig::default()
        };
        let (mut a, mut b) = pair(cfg);
        let _ = connect(&mut a, &mut b, 0, &[b"0"]);
        let mut out = Vec::new();
        for i in 0..4u8 {
            a.seal(1, b.addr, Bytes::from(vec![i]), &mut out);
        }
        let mut delivered = 0;
        let mut inits = 0;
        for p in sends(&mut out) {
            match p[0] {
                wire::PKT_SESSION_INIT => {
                    inits += 1;
                    b.handle_init(2, &p, &mut out).unwrap();
                    let resp = sends(&mut out).remove(0);
                    a.handle_resp(2, &resp, &mut out).unwrap();
                }
                _ => {
                    b.open(2, BytesMut::from(&p[..])).unwrap();
                    delivered += 1;
                }
            }
        }
        assert_eq!((inits, delivered), (1, 4));
        assert_eq!(a.established, 2);
        // Data on the new session works; the old one still opens in-flight packets.
        a.seal(3, b.addr, Bytes::from_static(b"new"), &mut out);
        let p = sends(&mut out).remove(0);
        assert_eq!(&b.open(3, BytesMut::from(&p[..])).unwrap().1[..], b"new");
    }

    #[test]
    fn unanswered_init_is_retried_then_abandoned() {
        let (mut a, b) = pair(SessionConfig::default());
        let mut out = Vec::new();
        a.seal(0, b.addr, Bytes::from_static(b"1"), &mut out);
        a.seal(0, b.addr, Bytes::from_static(b"2"), &mut out);
        assert_eq!(sends(&mut out).len(), 1, "one init, packets queued");
        let mut inits = 1;
        let mut dropped = 0;
        for s in 1..=6u64 {
            a.tick(s * 1_000_000, &mut out);
            for o in out.drain(..) {
                match o {
                    SessionOut::Send(_) => inits += 1,
                    SessionOut::GaveUp { dropped: d, .. } => dropped += d,
                }
            }
        }
        assert_eq!((inits, dropped), (5, 2));
    }

    #[test]
    fn restarted_peer_with_the_same_key_gets_a_new_session() {
        let (mut a, mut b) = pair(SessionConfig::default());
        let _ = connect(&mut a, &mut b, 0, &[b"before"]);
        // b restarts with the same identity: no sessions, a later init timestamp.
        let mut m = 200u8;
        let mut b = Sessions::new(
            Identity::from_seed(&[2; 32]),
            SessionConfig::default(),
            &crate::limits::Limits::default(),
            1_000,
            Box::new(move || {
                m = m.wrapping_add(1);
                [m; 32]
            }),
        );
        let mut out = Vec::new();
        a.seal(1_000, b.addr, Bytes::from_static(b"lost"), &mut out);
        let data = sends(&mut out).remove(0);
        let (idx, _) = wire::data_fields(&data).unwrap();
        assert_eq!(
            b.open(1_000, BytesMut::from(&data[..])),
            Err(SessionError::UnknownSession)
        );
        assert!(b.answer_unknown(1_000, a.addr, idx, &mut out));
        let notice = sends(&mut out).remove(0);
        // Rate-limited per peer: no second notice within the interval.
        assert!(!b.answer_unknown(2_000, a.addr, idx, &mut out));
        assert!(out.is_empty());

        // A notice naming another index, or not signed by the peer, changes nothing.
        let mut other = UnknownSession::decode(&notice).unwrap();
        other.receiver_idx ^= 1;
        other.signature = b.id.sign(&other.signed_input());
        assert_eq!(
            a.handle_unknown(3_000, &other.encode(), &mut out),
            Err(SessionError::StaleNotice)
        );
        let mut forged = UnknownSession::decode(&notice).unwrap();
        forged.signature = Identity::from_seed(&[3; 32]).sign(&forged.signed_input());
        assert_eq!(
            a.handle_unknown(3_000, &forged.encode(), &mut out),
            Err(SessionError::BadSignature)
        );
        assert!(out.is_empty());

        // The genuine notice makes a re-initiate; data flows on the new session.
        a.handle_unknown(3_000, &notice, &mut out).unwrap();
        let init = sends(&mut out).remove(0);
        assert_eq!(init[0], wire::PKT_SESSION_INIT);
        a.seal(3_000, b.addr, Bytes::from_static(b"queued"), &mut out);
        assert!(out.is_empty(), "queued while the new session is set up");
        b.handle_init(3_000, &init, &mut out).unwrap();
        let resp = sends(&mut out).remove(0);
        a.handle_resp(3_000, &resp, &mut out).unwrap();
        let data = sends(&mut out).remove(0);
        assert_eq!(
            &b.open(3_000, BytesMut::from(&data[..])).unwrap().1[..],
            b"queued"
        );
        // Replaying the old notice later does not tear the new session down.
        assert_eq!(
            a.handle_unknown(4_000, &notice, &mut out),
            Err(SessionError::StaleNotice)
        );
    }

    /// The receiver index a data packet names (which session it was sealed on).
    fn receiver_idx(data: &[u8]) -> u32 {
        wire::data_fields(data).unwrap().0
    }

    #[test]
    fn rekeys_after_the_time_limit_and_stops_accepting_old_keys_after_their_grace() {
        let cfg = SessionConfig::default();
        let (rekey, reject) = (cfg.rekey_after, cfg.reject_after);
        let (mut a, mut b) = pair(cfg);
        let first = connect(&mut a, &mut b, 0, &[b"hello"]);
        let old_idx = receiver_idx(&first[0]);
        b.open(0, BytesMut::from(&first[0][..])).unwrap();
        let mut out = Vec::new();

        // Just before the rekey interval: data only, still on the first session.
        a.seal(rekey - 1, b.addr, Bytes::from_static(b"young"), &mut out);
        let sent = sends(&mut out);
        assert_eq!(sent.len(), 1, "no init before the rekey interval");
        assert_eq!(receiver_idx(&sent[0]), old_idx);
        b.open(rekey - 1, BytesMut::from(&sent[0][..])).unwrap();

        // At the rekey interval: the packet still goes out on the old session (no stall),
        // and a new key exchange starts.
        a.seal(rekey, b.addr, Bytes::from_static(b"in flight"), &mut out);
        let sent = sends(&mut out);
        assert_eq!(sent.len(), 2, "data and an init: {sent:?}");
        let in_flight = sent
            .iter()
            .find(|p| p[0] != wire::PKT_SESSION_INIT)
            .expect("data packet");
        assert_eq!(receiver_idx(in_flight), old_idx);
        let init = sent
            .iter()
            .find(|p| p[0] == wire::PKT_SESSION_INIT)
            .expect("init");
        // One more packet sealed on the old session, delivered only after its grace.
        a.seal(rekey, b.addr, Bytes::from_static(b"late"), &mut out);
        let late = sends(&mut out);
        assert_eq!(late.len(), 1, "one init per rekey, not one per packet");
        assert_eq!(receiver_idx(&late[0]), old_idx);

        b.handle_init(rekey, init, &mut out).unwrap();
        let resp = sends(&mut out).remove(0);
        a.handle_resp(rekey, &resp, &mut out).unwrap();
        assert_eq!((a.established, b.established), (2, 2));

        // Traffic continues on the new session, both ways.
        a.seal(rekey + 1, b.addr, Bytes::from_static(b"fresh"), &mut out);
        let fresh = sends(&mut out).remove(0);
        let new_idx = receiver_idx(&fresh);
        assert_ne!(new_idx, old_idx, "new session after the rekey interval");
        assert_eq!(
            &b.open(rekey + 1, BytesMut::from(&fresh[..])).unwrap().1[..],
            b"fresh"
        );
        b.seal(rekey + 1, a.addr, Bytes::from_static(b"reply"), &mut out);
        let reply = sends(&mut out).remove(0);
        assert_eq!(
            &a.open(rekey + 1, BytesMut::from(&reply[..])).unwrap().1[..],
            b"reply"
        );
        // Within its grace the old session still opens packets that were in flight.
        assert_eq!(
            &b.open(rekey + 2, BytesMut::from(&in_flight[..])).unwrap().1[..],
            b"in flight"
        );

        // Once the old session is `reject_after` old its keys are refused, whether or not
        // the periodic tick has dropped it yet; the new session keeps working.
        assert_eq!(
            b.open(reject, BytesMut::from(&late[0][..])),
            Err(SessionError::Expired)
        );
        b.tick(reject, &mut out);
        assert_eq!(
            b.open(reject, BytesMut::from(&late[0][..])),
            Err(SessionError::UnknownSession)
        );
        a.seal(reject, b.addr, Bytes::from_static(b"still up"), &mut out);
        let sent = sends(&mut out);
        assert_eq!(sent.len(), 1, "the new session is not due for a rekey yet");
        assert_eq!(receiver_idx(&sent[0]), new_idx);
        assert_eq!(
            &b.open(reject, BytesMut::from(&sent[0][..])).unwrap().1[..],
            b"still up"
        );
    }
}
