//! The overlay's parsers of peer bytes: link frames (and the Noise handshake read from them),
//! control messages, routed packets, and a node core fed a hostile neighbor's traffic.

use crate::{XorShift, block_on};
use bytes::{Bytes, BytesMut};
use meshgate_overlay::core::{CoreConfig, CoreOut, LinkOrigin, NodeCore};
use meshgate_overlay::fuzzing::{
    DEFAULT_HOP_LIMIT, decode_control, decode_frames, encode_control, reencode_routed,
};
use meshgate_overlay::identity::Identity;
use meshgate_overlay::link;
use meshgate_overlay::routing::Nbr;
use meshgate_overlay::wire::{FrameKind, encode_frame};

/// A link's read side: the bytes arrive in chunks and are split into frames as the node does,
/// and the async frame reader reads the same frames. What was consumed re-encodes to the same
/// bytes. Then the same bytes drive the responder side of a Noise handshake.
pub fn link_frames(data: &[u8]) {
    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    let mut sizes = XorShift::new(u64::from(seed) + 1);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut failed = false;
    while fed < bytes.len() {
        let n = (1 + sizes.next() as usize % 512).min(bytes.len() - fed);
        buf.extend_from_slice(&bytes[fed..fed + n]);
        fed += n;
        if decode_frames(&mut buf, &mut frames).is_err() {
            failed = true;
            break;
        }
    }
    let consumed: Vec<u8> = frames
        .iter()
        .flat_map(|(kind, body)| encode_frame(*kind, body).to_vec())
        .collect();
    assert_eq!(&bytes[..consumed.len()], &consumed[..], "frames re-encode");
    if !failed {
        assert_eq!(consumed.len() + buf.len(), bytes.len(), "nothing lost");
    }
    // The async reader (handshake path) sees the same frames.
    let mut reader = bytes;
    block_on(async {
        for (kind, body) in &frames {
            let Ok(Some((k, b))) = link::read_frame(&mut reader).await else {
                panic!("read_frame disagrees with decode_frames");
            };
            assert_eq!((k, &b[..]), (*kind, &body[..]));
        }
        let _ = link::read_frame(&mut reader).await;
    });
    // A responder's handshake with these bytes as the initiator's messages.
    if seed % 8 == 0 {
        let id = Identity::from_seed(&[7; 32]);
        let mut peer = Peer {
            input: bytes,
            output: Vec::new(),
        };
        let _ = block_on(link::handshake(&mut peer, &id, false));
    }
}

/// A peer's side of a stream: fixed input, output swallowed.
struct Peer<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl tokio::io::AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.input).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Peer<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.output.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// `Control::decode`: what it accepts re-encodes to the same bytes (one encoding per message).
pub fn control(data: &[u8]) {
    if let Ok(c) = decode_control(data) {
        assert_eq!(encode_control(&c), data, "{c:?}");
    }
}

/// Routed packets and session inits, responses, unknown-session notices and unreachables:
/// what decodes re-encodes to the same bytes (hop limit aside).
pub fn routed(data: &[u8]) {
    if let Ok(Some(again)) = reencode_routed(data) {
        let mut expected = data.to_vec();
        expected[1] = DEFAULT_HOP_LIMIT;
        assert_eq!(&again[..], &expected[..]);
    }
}

// ---------------------------------------------------------------------------------------
// A node core fed a neighbor's traffic.

/// An event for the node under test, as read from fuzz input: `op`, u16 length, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A decrypted control message from the neighbor (the payload is its encoding).
    Control(Vec<u8>),
    /// A routed packet from the neighbor.
    Packet(Vec<u8>),
    /// A packet from the node's own L3 port.
    Local(Vec<u8>),
    /// Time passes (payload byte × 100 ms), then the timers run.
    Tick(u8),
}

impl Event {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let (op, payload): (u8, &[u8]) = match self {
            Event::Control(p) => (0, p),
            Event::Packet(p) => (1, p),
            Event::Local(p) => (2, p),
            Event::Tick(t) => (3, std::slice::from_ref(t)),
        };
        out.push(op);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
    }
}

fn events(mut data: &[u8]) -> impl Iterator<Item = Event> + '_ {
    std::iter::from_fn(move || {
        let [op, a, b, rest @ ..] = data else {
            return None;
        };
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
        let (payload, rest) = rest.split_at(len);
        data = rest;
        Some(match op % 4 {
            0 => Event::Control(payload.to_vec()),
            1 => Event::Packet(payload.to_vec()),
            2 => Event::Local(payload.to_vec()),
            _ => Event::Tick(payload.first().copied().unwrap_or(1)),
        })
    })
}

/// Deterministic identities and randomness: a recorded exchange replays exactly, so session
/// inits and data packets in the seeds verify and open.
pub(crate) const NODE_SEED: [u8; 32] = [2; 32];
pub(crate) const NEIGHBOR_SEED: [u8; 32] = [1; 32];
/// The neighbor as the node under test numbers it.
pub(crate) const NEIGHBOR: Nbr = 1;
const START: u64 = 1_000_000;
/// The round-trip time both ends of the recorded link report (µs).
pub(crate) const LINK_RTT_US: u32 = 1_000;

pub(crate) fn core_config() -> CoreConfig {
    CoreConfig::default()
}

pub(crate) fn new_core(seed: [u8; 32], rng_seed: u64) -> NodeCore {
    let mut rng = XorShift::new(rng_seed);
    NodeCore::new(
        Identity::from_seed(&seed),
        core_config(),
        1,
        START,
        Box::new(move || {
            let mut b = [0u8; 32];
            for c in b.chunks_mut(8) {
                c.copy_from_slice(&rng.next().to_be_bytes());
            }
            b
        }),
    )
}

/// The node under test with one linked neighbor, and its clock.
pub(crate) struct NodeUnderTest {
    pub(crate) core: NodeCore,
    pub(crate) now: u64,
}

impl NodeUnderTest {
    pub(crate) fn new() -> NodeUnderTest {
        Self::linked().0
    }

    /// The node linked to its neighbor, with what that made it send (its first updates).
    /// The link's keepalives run in the link state machine, outside the core's plaintext API,
    /// so the link's round-trip time is given here, as a link that came up would report it.
    pub(crate) fn linked() -> (NodeUnderTest, Vec<CoreOut>) {
        let mut core = new_core(NODE_SEED, 2);
        let mut out = Vec::new();
        let key = Identity::from_seed(&NEIGHBOR_SEED).public_key();
        core.link_up(NEIGHBOR, key, LinkOrigin::Outbound, START, &mut out);
        core.link_rtt(NEIGHBOR, LINK_RTT_US, START, &mut out);
        (NodeUnderTest { core, now: START }, out)
    }

    /// Applies one event (1 ms after the previous one) and returns what the node wants done.
    pub(crate) fn apply(&mut self, e: &Event) -> Vec<CoreOut> {
        let mut out = Vec::new();
        self.now += 1_000;
        match e {
            Event::Control(b) => {
                if let Ok(c) = decode_control(b) {
                    self.core.control(NEIGHBOR, c, self.now, &mut out);
                }
            }
            Event::Packet(b) => {
                self.core
                    .packet(NEIGHBOR, BytesMut::from(&b[..]), self.now, &mut out)
            }
            Event::Local(b) => self
                .core
                .local(Bytes::copy_from_slice(b), self.now, &mut out),
            Event::Tick(t) => {
                self.now += 100_000 * u64::from(*t);
                self.core.tick(self.now, &mut out);
            }
        }
        out
    }
}

/// A node core whose neighbor sends anything: control messages, routed packets (session inits,
/// responses, data, notices), with local packets and timers in between. The seeds are recorded
/// exchanges with a real neighbor, so mutations start from established routes and sessions.
pub fn overlay_node(data: &[u8]) {
    let mut node = NodeUnderTest::new();
    for e in events(data).take(256) {
        for o in node.apply(&e) {
            if let CoreOut::Packet(_, p) | CoreOut::Deliver(p) = &o {
                assert!(!p.is_empty());
            }
        }
    }
}

/// The kind of a frame the seeds write.
pub(crate) fn frame(kind: FrameKind, body: &[u8]) -> Vec<u8> {
    encode_frame(kind, body).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorded exchange replays exactly into a fresh node: its session init verifies and
    /// its data opens, so the seeds reach deep into the core.
    #[test]
    fn a_recorded_exchange_replays_into_delivered_data() {
        let ex = crate::seeds::exchange();
        let mut node = NodeUnderTest::new();
        let mut delivered = 0;
        let mut sent = 0;
        for e in &ex.events {
            for o in node.apply(e) {
                match o {
                    CoreOut::Deliver(_) => delivered += 1,
                    CoreOut::Packet(..) => sent += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(delivered, 3, "A's three packets reach B");
        assert!(
            sent >= 3,
            "B answers the init and sends its own data: {sent}"
        );
        // Decoding the script gives back the events.
        let mut bytes = Vec::new();
        for e in &ex.events {
            e.encode(&mut bytes);
        }
        assert_eq!(events(&bytes).collect::<Vec<_>>(), ex.events);
    }
}
