//! One link's protocol state as a sans-IO state machine: the Noise XX handshake that proves
//! both identities, Noise transport for control frames, framing, the bounded send queue,
//! keepalives (Hello/HelloAck, which also measure the RTT) and the timers that declare a link
//! dead. It is fed received bytes and the time, and hands back bytes to write and events;
//! the tokio shell and the simulator move the bytes.

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};

use super::frames::next_frame;
use super::queue::{OutFrame, OutQueue};
use super::{NOISE_PARAMS, PROLOGUE};
use crate::clock::Micros;
use crate::identity::{Identity, x25519_for_ed25519};
use crate::wire::{self, Control, FRAME_HEADER_LEN, FrameKind, MAX_NOISE_MESSAGE, WireError};

/// A link's timers and queue bounds.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// The handshake must finish within this long of the link opening.
    pub handshake_timeout: Micros,
    /// A Hello (keepalive and RTT probe) goes out this often.
    pub hello_interval: Micros,
    /// A link on which no frame arrived for this long is dead.
    pub dead_timeout: Micros,
    /// A link that has not answered a Hello this long after it came up is closed.
    pub hello_timeout: Micros,
    /// A link whose transport took no byte for this long while frames wait is closed.
    pub write_stall_timeout: Micros,
    /// Send queue bounds (frames, bytes).
    pub queue_frames: usize,
    pub queue_bytes: usize,
}

/// Why a link went down. Each is counted by the core under the counter named in the docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// The transport ended (peer closed, socket error) or the node shut the link.
    Closed,
    /// The handshake did not finish within the handshake timeout.
    HandshakeTimeout,
    /// A handshake message did not check out (bad Noise message, unexpected frame).
    HandshakeFailed,
    /// The peer's ed25519 key does not match its Noise static key.
    IdentityMismatch,
    /// The peer authenticated, but not as the node this link was dialed for.
    UnexpectedKey,
    /// A frame header was invalid, or a handshake frame came after the handshake.
    BadFrame,
    /// A frame announced a body longer than the limit.
    Oversized,
    /// A control frame failed Noise authentication (corrupted or forged).
    DecryptFailed,
    /// No frame arrived for the dead-link timeout.
    Dead,
    /// No Hello was answered within the hello timeout of the link coming up.
    HelloTimeout,
    /// The transport took no byte for the write-stall timeout.
    WriteStall,
    /// A routing message found the send queue full (routing re-sends nothing).
    ControlQueueFull,
    /// Refused by the node's link limits.
    Refused,
    /// The peer is this node itself.
    SelfLink,
    /// A newer link from the same peer replaced it.
    Replaced,
}

/// What a link reports as it processes input.
#[derive(Debug)]
pub enum LinkEvent {
    /// The handshake is done; the peer is the node with this ed25519 key.
    Up { key: [u8; 32] },
    /// A new smoothed RTT (µs), after a Hello was answered.
    Rtt(u32),
    /// A control message for the core (Hello/HelloAck are handled by the link).
    Control(Control),
    /// A routed packet.
    Packet(BytesMut),
    /// A control frame authenticated but did not decode (counted; the link stays).
    ControlMalformed,
}

/// Per-link counts the core folds into its counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LinkStats {
    pub control_frames_sent: u64,
    pub control_bytes_sent: u64,
    /// Control frames dropped because the send queue was full.
    pub control_drops: u64,
    /// Packets dropped because the send queue was full.
    pub packet_drops: u64,
}

enum State {
    Handshake(Box<snow::HandshakeState>),
    Up {
        transport: Box<snow::TransportState>,
        key: [u8; 32],
    },
    Down(DownReason),
}

/// Read buffer step of a busy link: several small frames per read, one read per large frame.
const READ_CHUNK: usize = 64 * 1024;
/// Read buffer step of a quiet link (keepalives are 30-byte frames): one page.
const READ_QUIET: usize = 4 * 1024;
/// A link that received fewer bytes than this in a keepalive interval is quiet: it gives
/// back its large read buffer and reads in small steps until traffic comes back.
const QUIET_BYTES: usize = 16 * 1024;
/// Decryption scratch kept between reads (a keepalive's fits); a larger one, grown for a
/// routing message, is given back once the read is handled.
const SCRATCH_KEEP: usize = 256;

/// One link: handshake, transport, framing, queue and timers.
pub struct Link {
    state: State,
    own_key: [u8; 32],
    expect_key: Option<[u8; 32]>,
    cfg: LinkConfig,
    rbuf: BytesMut,
    /// The read buffer's allocation when last grown (its `capacity()` falls as frames are
    /// split off its front, while the allocation stays until it is reclaimed or given back).
    rbuf_alloc: usize,
    /// How much [`Link::read_buf`] reserves at a time: [`READ_CHUNK`], or [`READ_QUIET`]
    /// once a keepalive interval passed with little received.
    read_step: usize,
    /// Frame bytes handled since the last keepalive tick (tells a quiet link).
    read_since_tick: usize,
    out: OutQueue,
    opened_at: Micros,
    up_at: Micros,
    last_heard: Micros,
    last_hello: Micros,
    srtt: Option<u32>,
    /// Handshake messages read and written so far.
    hs_messages: u8,
    /// Decryption scratch, kept across frames.
    scratch: Vec<u8>,
    pub(crate) stats: LinkStats,
}

impl Link {
    /// Opens a link; the initiator (the side that connected) writes the first handshake
    /// message at once. `expect_key`: the node this link was dialed for, if known.
    pub fn new(
        id: &Identity,
        initiator: bool,
        expect_key: Option<[u8; 32]>,
        cfg: LinkConfig,
        now: Micros,
    ) -> Link {
        let mut link = Link {
            state: State::Down(DownReason::HandshakeFailed),
            own_key: id.public_key(),
            expect_key,
            cfg,
            rbuf: BytesMut::new(),
            rbuf_alloc: 0,
            read_step: READ_CHUNK,
            read_since_tick: 0,
            out: OutQueue::new(cfg.queue_frames, cfg.queue_bytes),
            opened_at: now,
            up_at: now,
            last_heard: now,
            last_hello: now,
            srtt: None,
            hs_messages: 0,
            scratch: Vec::new(),
            stats: LinkStats::default(),
        };
        let secret = id.x25519_secret();
        let hs = NOISE_PARAMS
            .parse()
            .and_then(|p| {
                let b = snow::Builder::new(p)
                    .local_private_key(&secret[..])?
                    .prologue(PROLOGUE)?;
                if initiator {
                    b.build_initiator()
                } else {
                    b.build_responder()
                }
            })
            .map(Box::new);
        if let Ok(hs) = hs {
            link.state = State::Handshake(hs);
            if initiator && link.write_handshake(now).is_err() {
                link.state = State::Down(DownReason::HandshakeFailed);
            }
        }
        link
    }

    /// The peer's key once the handshake is done.
    pub fn peer_key(&self) -> Option<[u8; 32]> {
        match &self.state {
            State::Up { key, .. } => Some(*key),
            _ => None,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Why the link is down, if it is.
    pub fn down_reason(&self) -> Option<DownReason> {
        match self.state {
            State::Down(r) => Some(r),
            _ => None,
        }
    }

    /// The smoothed RTT (µs) once a Hello was answered.
    pub fn srtt(&self) -> Option<u32> {
        self.srtt
    }

    /// The buffer the transport reads into (room for at least one more read is reserved).
    /// Read at most the shell's read budget before calling [`Link::process`].
    pub fn read_buf(&mut self) -> &mut BytesMut {
        if self.rbuf.capacity() - self.rbuf.len() < FRAME_HEADER_LEN + 1024 {
            self.rbuf.reserve(self.read_step);
            // Reserving reclaims the whole allocation or makes a new one.
            self.rbuf_alloc = self.rbuf.capacity();
        }
        &mut self.rbuf
    }

    /// Received bytes (copied into the read buffer).
    pub fn receive(&mut self, bytes: &[u8]) {
        self.rbuf.extend_from_slice(bytes);
        self.rbuf_alloc = self.rbuf_alloc.max(self.rbuf.capacity());
    }

    /// Received bytes handed over: they become the read buffer without a copy when it holds
    /// nothing (and no one else holds them), else they are appended.
    pub fn receive_bytes(&mut self, bytes: Bytes) {
        if !self.rbuf.is_empty() {
            self.receive(&bytes);
            return;
        }
        match bytes.try_into_mut() {
            Ok(b) => {
                self.rbuf = b;
                self.rbuf_alloc = self.rbuf.capacity();
            }
            Err(b) => self.receive(&b),
        }
    }

    /// Gives the read buffer back unless it holds part of a frame. For transports that hand
    /// bytes over ([`Link::receive`]) rather than read into [`Link::read_buf`]: between
    /// their deliveries the link then holds no read buffer at all.
    pub fn release_read_buf(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
            self.rbuf_alloc = 0;
        }
    }

    /// Heap bytes this link's buffers hold now: read buffer, decryption scratch and the send
    /// queue (frames waiting and the queue's own slots).
    pub fn buffer_bytes(&self) -> usize {
        self.rbuf_alloc.max(self.rbuf.capacity()) + self.scratch.capacity() + self.out.heap_bytes()
    }

    /// Handles the complete frames in the read buffer. `Err`: the link is down (the reason
    /// stays in [`Link::down_reason`]); events produced before that are in `events`.
    pub fn process(&mut self, now: Micros, events: &mut Vec<LinkEvent>) -> Result<(), DownReason> {
        if let State::Down(r) = self.state {
            return Err(r);
        }
        let res = loop {
            let frame = match next_frame(&mut self.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(WireError::Oversized { .. }) => break Err(self.down(DownReason::Oversized)),
                Err(_) => break Err(self.down(DownReason::BadFrame)),
            };
            self.read_since_tick += FRAME_HEADER_LEN + frame.1.len();
            if let Err(r) = self.frame(frame.0, frame.1, now, events) {
                break Err(self.down(r));
            }
        };
        // An incomplete frame had room reserved for the rest of it.
        self.rbuf_alloc = self.rbuf_alloc.max(self.rbuf.capacity());
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::new();
        }
        res
    }

    fn down(&mut self, r: DownReason) -> DownReason {
        self.state = State::Down(r);
        r
    }

    /// Marks the link down (the core refused it, or its transport ended).
    pub fn close(&mut self, r: DownReason) {
        if !matches!(self.state, State::Down(_)) {
            self.state = State::Down(r);
        }
    }

    fn frame(
        &mut self,
        kind: FrameKind,
        body: BytesMut,
        now: Micros,
        events: &mut Vec<LinkEvent>,
    ) -> Result<(), DownReason> {
        let transport = match &mut self.state {
            State::Down(r) => return Err(*r),
            State::Handshake(_) if kind == FrameKind::Handshake => {
                return self.read_handshake(&body, now, events);
            }
            State::Handshake(_) => return Err(DownReason::HandshakeFailed),
            State::Up { transport, .. } => transport,
        };
        match kind {
            FrameKind::Handshake => Err(DownReason::BadFrame),
            FrameKind::Packet => {
                self.last_heard = now;
                events.push(LinkEvent::Packet(body));
                Ok(())
            }
            FrameKind::Control => {
                self.scratch.resize(body.len(), 0);
                let n = transport
                    .read_message(&body, &mut self.scratch)
                    .map_err(|_| DownReason::DecryptFailed)?;
                self.last_heard = now;
                match Control::decode(&self.scratch[..n]) {
                    Ok(msg) => self.control(msg, now, events),
                    Err(_) => events.push(LinkEvent::ControlMalformed),
                }
                Ok(())
            }
        }
    }

    fn control(&mut self, msg: Control, now: Micros, events: &mut Vec<LinkEvent>) {
        match msg {
            Control::Hello { timestamp_us } => {
                // Lost when the queue is full: the peer sends another within a second.
                let _ = self.send_control(
                    &Control::HelloAck {
                        echo_us: timestamp_us,
                    },
                    now,
                );
            }
            Control::HelloAck { echo_us } => {
                if echo_us > now {
                    return;
                }
                let sample = (now - echo_us).min(60_000_000) as u32;
                let srtt = match self.srtt {
                    None => sample,
                    Some(s) => ((s as u64 * 7 + sample as u64) / 8) as u32,
                };
                self.srtt = Some(srtt);
                events.push(LinkEvent::Rtt(srtt));
            }
            msg => events.push(LinkEvent::Control(msg)),
        }
    }

    /// XX: -> e ; <- e, ee, s, es (payload: responder's ed25519 key) ;
    /// -> s, se (payload: initiator's ed25519 key).
    fn read_handshake(
        &mut self,
        body: &[u8],
        now: Micros,
        events: &mut Vec<LinkEvent>,
    ) -> Result<(), DownReason> {
        let State::Handshake(hs) = &mut self.state else {
            return Err(DownReason::HandshakeFailed);
        };
        let mut payload = vec![0u8; MAX_NOISE_MESSAGE];
        let n = hs
            .read_message(body, &mut payload)
            .map_err(|_| DownReason::HandshakeFailed)?;
        self.hs_messages += 1;
        // The message that carries the peer's static key also carries its ed25519 key.
        let Some(stat) = hs.get_remote_static() else {
            if n != 0 {
                return Err(DownReason::HandshakeFailed);
            }
            return self.write_handshake(now);
        };
        let key: [u8; 32] = payload[..n]
            .try_into()
            .map_err(|_| DownReason::IdentityMismatch)?;
        if x25519_for_ed25519(&key).as_ref().map(|k| &k[..]) != Some(stat) {
            return Err(DownReason::IdentityMismatch);
        }
        if self.expect_key.is_some_and(|k| k != key) {
            return Err(DownReason::UnexpectedKey);
        }
        if !hs.is_handshake_finished() && hs.is_my_turn() {
            self.write_handshake(now)?;
        }
        self.finish_handshake(key, now, events)
    }

    fn write_handshake(&mut self, now: Micros) -> Result<(), DownReason> {
        let State::Handshake(hs) = &mut self.state else {
            return Err(DownReason::HandshakeFailed);
        };
        // The first message carries nothing; the other two carry our ed25519 key.
        let payload: &[u8] = if self.hs_messages == 0 {
            &[]
        } else {
            &self.own_key
        };
        let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
        let n = hs
            .write_message(payload, &mut buf)
            .map_err(|_| DownReason::HandshakeFailed)?;
        buf.truncate(n);
        self.hs_messages += 1;
        self.queue_frame(FrameKind::Handshake, Bytes::from(buf), now);
        Ok(())
    }

    fn finish_handshake(
        &mut self,
        key: [u8; 32],
        now: Micros,
        events: &mut Vec<LinkEvent>,
    ) -> Result<(), DownReason> {
        let State::Handshake(hs) =
            std::mem::replace(&mut self.state, State::Down(DownReason::Closed))
        else {
            return Err(DownReason::HandshakeFailed);
        };
        if !hs.is_handshake_finished() {
            // Responder after message 2 is impossible in XX (it learns our key in message 3).
            return Err(DownReason::HandshakeFailed);
        }
        let transport = hs
            .into_transport_mode()
            .map_err(|_| DownReason::HandshakeFailed)?;
        self.state = State::Up {
            transport: Box::new(transport),
            key,
        };
        self.up_at = now;
        self.last_heard = now;
        self.last_hello = now;
        events.push(LinkEvent::Up { key });
        let _ = self.send_control(&Control::Hello { timestamp_us: now }, now);
        Ok(())
    }

    /// Handshake frames are never dropped: the queue is empty or nearly so then.
    fn queue_frame(&mut self, kind: FrameKind, body: Bytes, now: Micros) {
        let head = wire::frame_header(kind, body.len());
        let f = OutFrame { head, body };
        if let Err(f) = self.out.push(f, now) {
            // Only possible with a zero-sized queue bound: go anyway, alone.
            let _ = f;
        }
    }

    /// Encrypts and queues a control message. `false` when the queue is full (the message is
    /// dropped, counted) or the link is not up. Room is checked before sealing: a sealed frame
    /// that was then dropped would put the peer's Noise nonce out of step.
    pub fn send_control(&mut self, msg: &Control, now: Micros) -> bool {
        let plain = msg.encode();
        let State::Up { transport, .. } = &mut self.state else {
            return false;
        };
        let len = plain.len() + 16;
        if len > MAX_NOISE_MESSAGE || !self.out.has_room(FRAME_HEADER_LEN + len) {
            self.stats.control_drops += 1;
            return false;
        }
        let mut buf = vec![0u8; len];
        let Ok(n) = transport.write_message(&plain, &mut buf) else {
            self.stats.control_drops += 1;
            return false;
        };
        buf.truncate(n);
        self.stats.control_frames_sent += 1;
        self.stats.control_bytes_sent += (FRAME_HEADER_LEN + n) as u64;
        let head = wire::frame_header(FrameKind::Control, n);
        // Room was checked above.
        let _ = self.out.push(
            OutFrame {
                head,
                body: Bytes::from(buf),
            },
            now,
        );
        true
    }

    /// Queues a routed packet; `false` when the queue is full (dropped, counted).
    pub fn send_packet(&mut self, packet: Bytes, now: Micros) -> bool {
        if !self.is_up() {
            return false;
        }
        let head = wire::frame_header(FrameKind::Packet, packet.len());
        let ok = self.out.push(OutFrame { head, body: packet }, now).is_ok();
        if !ok {
            self.stats.packet_drops += 1;
        }
        ok
    }

    /// Whether bytes wait for the transport.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes waiting for the transport.
    pub fn pending_bytes(&self) -> usize {
        self.out.pending_bytes()
    }

    /// Whether the transport took bytes less than `window` before `now`.
    pub fn draining(&self, now: Micros, window: Micros) -> bool {
        self.out.progressed_within(now, window)
    }

    /// Frames waiting for the transport.
    pub fn queued_frames(&self) -> usize {
        self.out.len()
    }

    /// The bytes waiting, as slices for one vectored write; how many slices were set.
    pub fn output<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        self.out.slices(slices)
    }

    /// The transport took `n` bytes of [`Link::output`].
    pub fn written(&mut self, n: usize, now: Micros) {
        self.out.written(n, now);
    }

    /// Up to `max` waiting bytes, taken as written (for transports that copy).
    pub fn take_output(&mut self, max: usize, now: Micros) -> Bytes {
        self.out.take(max, now)
    }

    /// The next time [`Link::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Micros> {
        let stall = self.out.stall_deadline(self.cfg.write_stall_timeout);
        let t = match self.state {
            State::Down(_) => return None,
            State::Handshake(_) => self.opened_at.saturating_add(self.cfg.handshake_timeout),
            State::Up { .. } => {
                let mut t = (self.last_hello.saturating_add(self.cfg.hello_interval))
                    .min(self.last_heard.saturating_add(self.cfg.dead_timeout));
                if self.srtt.is_none() {
                    t = t.min(self.up_at.saturating_add(self.cfg.hello_timeout));
                }
                t
            }
        };
        Some(stall.map_or(t, |s| s.min(t)))
    }

    /// Runs the timers due at `now`: keepalives, and the checks that declare a link down.
    pub fn handle_timeout(&mut self, now: Micros) -> Result<(), DownReason> {
        let since = |t: Micros| now.saturating_sub(t);
        let verdict = match self.state {
            State::Down(r) => return Err(r),
            State::Handshake(_) if since(self.opened_at) >= self.cfg.handshake_timeout => {
                Err(DownReason::HandshakeTimeout)
            }
            _ if self.out.stalled(now, self.cfg.write_stall_timeout) => Err(DownReason::WriteStall),
            State::Handshake(_) => Ok(()),
            State::Up { .. } if since(self.last_heard) >= self.cfg.dead_timeout => {
                Err(DownReason::Dead)
            }
            // Heard from, but never answered a Hello: not a working link.
            State::Up { .. }
                if self.srtt.is_none() && since(self.up_at) >= self.cfg.hello_timeout =>
            {
                Err(DownReason::HelloTimeout)
            }
            State::Up { .. } => {
                if since(self.last_hello) >= self.cfg.hello_interval {
                    self.last_hello = now;
                    self.send_control(&Control::Hello { timestamp_us: now }, now);
                    self.tidy();
                }
                Ok(())
            }
        };
        verdict.map_err(|r| self.down(r))
    }

    /// Once per keepalive interval: a link that received little since the last one gives
    /// back its large read buffer and reads in small steps; an empty send queue gives back
    /// the slots a burst left. Busy links keep theirs, so their reads cost no allocation.
    fn tidy(&mut self) {
        let quiet = self.read_since_tick < QUIET_BYTES;
        self.read_since_tick = 0;
        self.read_step = if quiet { READ_QUIET } else { READ_CHUNK };
        if quiet && self.rbuf.is_empty() && self.rbuf_alloc > READ_QUIET {
            self.rbuf = BytesMut::new();
            self.rbuf_alloc = 0;
        }
        self.out.shrink_if_empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: LinkConfig = LinkConfig {
        handshake_timeout: 5_000_000,
        hello_interval: 1_000_000,
        dead_timeout: 3_000_000,
        hello_timeout: 10_000_000,
        write_stall_timeout: 5_000_000,
        queue_frames: 64,
        queue_bytes: 1 << 20,
    };

    fn id(k: u8) -> Identity {
        Identity::from_seed(&[k; 32])
    }

    /// Moves every waiting byte from `from` to `to` in `chunk`-byte pieces.
    fn carry(
        from: &mut Link,
        to: &mut Link,
        chunk: usize,
        now: Micros,
    ) -> Result<Vec<LinkEvent>, DownReason> {
        let mut events = Vec::new();
        while from.has_output() {
            let b = from.take_output(chunk, now);
            to.receive(&b);
            to.process(now, &mut events)?;
        }
        Ok(events)
    }

    fn pair(chunk: usize) -> (Link, Link, Vec<LinkEvent>, Vec<LinkEvent>) {
        let mut a = Link::new(&id(1), true, Some(id(2).public_key()), CFG, 0);
        let mut b = Link::new(&id(2), false, None, CFG, 0);
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            eb.extend(carry(&mut a, &mut b, chunk, 1000).unwrap());
            ea.extend(carry(&mut b, &mut a, chunk, 2000).unwrap());
        }
        (a, b, ea, eb)
    }

    /// A frame sealed with `l`'s transport and not queued (a peer that sends what it likes).
    fn sealed(l: &mut Link, msg: &Control) -> Bytes {
        let State::Up { transport, .. } = &mut l.state else {
            panic!("link not up");
        };
        let plain = msg.encode();
        let mut buf = vec![0u8; plain.len() + 16];
        let n = transport.write_message(&plain, &mut buf).unwrap();
        wire::encode_frame(FrameKind::Control, &buf[..n])
    }

    #[test]
    fn two_links_handshake_in_any_chunking_and_measure_the_rtt() {
        for chunk in [1, 3, 7, 100, 1 << 20] {
            let (a, b, ea, eb) = pair(chunk);
            assert_eq!(a.peer_key(), Some(id(2).public_key()), "chunk {chunk}");
            assert_eq!(b.peer_key(), Some(id(1).public_key()), "chunk {chunk}");
            let ups = |e: &[LinkEvent]| {
                e.iter()
                    .filter(|e| matches!(e, LinkEvent::Up { .. }))
                    .count()
            };
            assert_eq!((ups(&ea), ups(&eb)), (1, 1));
            // Each side's first Hello was answered: an RTT sample on both.
            assert!(
                ea.iter().any(|e| matches!(e, LinkEvent::Rtt(_))),
                "chunk {chunk}"
            );
            assert!(
                eb.iter().any(|e| matches!(e, LinkEvent::Rtt(_))),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn control_messages_and_packets_cross_and_corruption_closes_the_link() {
        let (mut a, mut b, _, _) = pair(1 << 20);
        let msg = Control::SeqnoRequest {
            prefix: [7; 8],
            seqno: 9,
            hop_count: 3,
        };
        assert!(a.send_control(&msg, 3000));
        assert!(a.send_packet(Bytes::from_static(b"routed packet"), 3000));
        let ev = carry(&mut a, &mut b, 5, 3000).unwrap();
        assert!(matches!(&ev[0], LinkEvent::Control(m) if *m == msg));
        assert!(matches!(&ev[1], LinkEvent::Packet(p) if &p[..] == b"routed packet"));
        // A flipped tag byte: Noise refuses the frame, and the link is down for good.
        assert!(a.send_control(&msg, 4000));
        let mut frame = BytesMut::from(&a.take_output(1 << 20, 4000)[..]);
        let last = frame.len() - 1;
        frame[last] ^= 1;
        b.receive(&frame);
        assert_eq!(
            b.process(4000, &mut Vec::new()),
            Err(DownReason::DecryptFailed)
        );
        assert_eq!(b.down_reason(), Some(DownReason::DecryptFailed));
        assert!(b.handle_timeout(5000).is_err() && b.poll_timeout().is_none());
    }

    #[test]
    fn bad_frames_and_handshakes_are_errors_not_panics() {
        let (_, mut b, _, _) = pair(1 << 20);
        b.receive(&[0, 0, 0, 4, 9, 1, 2, 3, 4]);
        assert_eq!(b.process(0, &mut Vec::new()), Err(DownReason::BadFrame));
        let (_, mut b, _, _) = pair(1 << 20);
        b.receive(&[0, 0x10, 0, 0, 3]);
        assert_eq!(b.process(0, &mut Vec::new()), Err(DownReason::Oversized));
        let (_, mut b, _, _) = pair(1 << 20);
        b.receive(&wire::encode_frame(FrameKind::Handshake, &[0; 48]));
        assert_eq!(b.process(0, &mut Vec::new()), Err(DownReason::BadFrame));
        // Garbage instead of a handshake message, and a packet before the handshake.
        let mut r = Link::new(&id(2), false, None, CFG, 0);
        r.receive(&wire::encode_frame(FrameKind::Handshake, &[1; 31]));
        assert_eq!(
            r.process(0, &mut Vec::new()),
            Err(DownReason::HandshakeFailed)
        );
        let mut r = Link::new(&id(2), false, None, CFG, 0);
        r.receive(&wire::encode_frame(FrameKind::Packet, &[1; 60]));
        assert_eq!(
            r.process(0, &mut Vec::new()),
            Err(DownReason::HandshakeFailed)
        );
    }

    #[test]
    fn a_dialer_refuses_a_peer_that_is_not_the_node_it_dialed() {
        let mut a = Link::new(&id(1), true, Some(id(3).public_key()), CFG, 0);
        let mut b = Link::new(&id(2), false, None, CFG, 0);
        carry(&mut a, &mut b, 1 << 20, 0).unwrap();
        assert_eq!(
            carry(&mut b, &mut a, 1 << 20, 0).err(),
            Some(DownReason::UnexpectedKey)
        );
    }

    #[test]
    fn timers_keepalive_and_declare_dead_silent_and_mute_links() {
        // Handshake timeout: the responder never hears more than the first message.
        let mut a = Link::new(&id(1), true, None, CFG, 0);
        let mut b = Link::new(&id(2), false, None, CFG, 0);
        carry(&mut a, &mut b, 1 << 20, 0).unwrap();
        assert_eq!(b.poll_timeout(), Some(5_000_000));
        assert!(b.handle_timeout(4_999_999).is_ok());
        assert_eq!(
            b.handle_timeout(5_000_000),
            Err(DownReason::HandshakeTimeout)
        );

        // Keepalives every interval; silence for the dead timeout kills the link.
        let (mut a, _b, _, _) = pair(1 << 20);
        let mut hellos = 0;
        let t = loop {
            let t = a.poll_timeout().unwrap();
            if a.handle_timeout(t).is_err() {
                break t;
            }
            if a.has_output() {
                hellos += 1;
                a.take_output(1 << 20, t);
            }
        };
        assert_eq!(a.down_reason(), Some(DownReason::Dead));
        assert_eq!(t, 2000 + 3_000_000, "dead 3 s after the last frame heard");
        assert_eq!(hellos, 2, "a Hello each second until then (at 1 s and 2 s)");

        // A peer that keeps talking but never answers a Hello: closed at the hello timeout.
        let mut a = Link::new(&id(1), true, None, CFG, 0);
        let mut b = Link::new(&id(2), false, None, CFG, 0);
        carry(&mut a, &mut b, 1 << 20, 0).unwrap();
        carry(&mut b, &mut a, 1 << 20, 0).unwrap();
        // Only the last handshake message reaches b; a's first Hello is lost, so b has
        // nothing to answer.
        let head = a.take_output(FRAME_HEADER_LEN, 0);
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        b.receive(&head);
        b.receive(&a.take_output(len, 0));
        b.process(0, &mut Vec::new()).unwrap();
        a.take_output(1 << 20, 0);
        carry(&mut b, &mut a, 1 << 20, 0).unwrap();
        let mut t = 0;
        while t < 12_000_000 {
            t += 500_000;
            let hello = sealed(&mut b, &Control::Hello { timestamp_us: t });
            a.receive(&hello);
            a.process(t, &mut Vec::new()).unwrap();
            a.take_output(1 << 20, t);
            if let Err(r) = a.handle_timeout(t) {
                assert_eq!(r, DownReason::HelloTimeout);
                break;
            }
        }
        assert_eq!(t, 10_000_000);

        // A transport that takes no byte: the write stall closes the link.
        let (mut a, _b, _, _) = pair(1 << 20);
        assert!(a.send_packet(Bytes::from_static(b"stuck"), 3000));
        a.last_heard = u64::MAX / 2; // not dead meanwhile
        assert!(a.handle_timeout(5_002_999).is_ok());
        assert_eq!(a.handle_timeout(5_003_000), Err(DownReason::WriteStall));
    }

    /// Moves what `from` has waiting into `to` the way the node's shell reads a socket:
    /// into [`Link::read_buf`], as much as it has room for, then [`Link::process`].
    fn read_like_a_socket(from: &mut Link, to: &mut Link, now: Micros) -> Vec<LinkEvent> {
        let mut events = Vec::new();
        while from.has_output() {
            let buf = to.read_buf();
            let room = buf.capacity() - buf.len();
            buf.extend_from_slice(&from.take_output(room, now));
            to.process(now, &mut events).unwrap();
        }
        events
    }

    fn full_updates() -> Control {
        let entry = |k: usize| wire::RouteUpdate {
            prefix: [k as u8; 8],
            seqno: k as u64,
            metric: 1000,
            router_key: [7; 32],
            signature: [9; 64],
        };
        Control::Updates((0..500).map(entry).collect())
    }

    #[test]
    fn a_quiet_link_gives_back_its_buffers_and_a_busy_one_keeps_them() {
        let (mut a, mut b, _, _) = pair(1 << 20);
        // A routing message of 500 entries (58 KB): the reader's buffers grow for it.
        assert!(a.send_control(&full_updates(), 3000));
        let ev = read_like_a_socket(&mut a, &mut b, 3000);
        assert!(matches!(&ev[..], [LinkEvent::Control(Control::Updates(l))] if l.len() == 500));
        assert!(b.buffer_bytes() >= READ_CHUNK, "{}", b.buffer_bytes());
        assert_eq!(b.scratch.capacity(), 0, "scratch kept after the read");
        // The keepalive tick after a busy interval keeps the large read buffer.
        let mut t = 2000 + CFG.hello_interval;
        b.handle_timeout(t).unwrap();
        assert!(b.buffer_bytes() >= READ_CHUNK);
        // A whole interval with only keepalives: the link is quiet and holds little.
        for _ in 0..2 {
            read_like_a_socket(&mut b, &mut a, t);
            a.handle_timeout(t).unwrap();
            read_like_a_socket(&mut a, &mut b, t);
            t += CFG.hello_interval;
            b.handle_timeout(t).unwrap();
            read_like_a_socket(&mut a, &mut b, t);
        }
        assert!(b.is_up());
        assert!(
            b.buffer_bytes() <= READ_QUIET + SCRATCH_KEEP + 16 * 64,
            "{} bytes held by a quiet link",
            b.buffer_bytes()
        );
        // Traffic again: the large step comes back at the next tick.
        for _ in 0..2 {
            assert!(a.send_control(&full_updates(), t));
        }
        read_like_a_socket(&mut a, &mut b, t);
        t += CFG.hello_interval;
        b.handle_timeout(t).unwrap();
        assert_eq!(b.read_step, READ_CHUNK);
    }

    #[test]
    fn a_copying_transport_leaves_no_read_buffer_but_a_partial_frame() {
        let (mut a, mut b, _, _) = pair(1 << 20);
        assert!(a.send_control(&full_updates(), 3000));
        let bytes = a.take_output(1 << 20, 3000);
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        b.receive(head);
        b.process(3000, &mut Vec::new()).unwrap();
        b.release_read_buf();
        assert_eq!(b.rbuf.len(), head.len(), "the partial frame is kept");
        let mut ev = Vec::new();
        b.receive(tail);
        b.process(3000, &mut ev).unwrap();
        b.release_read_buf();
        assert!(matches!(&ev[..], [LinkEvent::Control(Control::Updates(_))]));
        assert_eq!((b.rbuf.capacity(), b.scratch.capacity()), (0, 0));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let cfg = LinkConfig {
            queue_frames: 4,
            ..CFG
        };
        let mut a = Link::new(&id(1), true, None, cfg, 0);
        let mut b = Link::new(&id(2), false, None, cfg, 0);
        carry(&mut a, &mut b, 1 << 20, 0).unwrap();
        carry(&mut b, &mut a, 1 << 20, 0).unwrap();
        carry(&mut a, &mut b, 1 << 20, 0).unwrap();
        let sent = (0..10)
            .filter(|_| a.send_packet(Bytes::from_static(b"p"), 0))
            .count();
        assert_eq!(sent, 4);
        assert_eq!(a.stats.packet_drops, 6);
        assert!(!a.send_control(&Control::Hello { timestamp_us: 0 }, 0));
        assert_eq!(a.stats.control_drops, 1);
    }
}
