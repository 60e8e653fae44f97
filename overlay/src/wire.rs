//! Wire formats: link frames, link control messages and routed overlay packets.
//! All integers are big-endian. See `docs/protocol.md` for the normative description.

use std::net::Ipv6Addr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::addr::Prefix;

/// Errors decoding untrusted bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{what} too long: {len} bytes (max {max})")]
    Oversized {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("unknown {what} type {value}")]
    UnknownType { what: &'static str, value: u8 },
    #[error("{0} has trailing bytes")]
    Trailing(&'static str),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

// ---------------------------------------------------------------------------------------
// Link frames: u32 body length, u8 kind, body.

/// Bytes before a frame body: u32 length + u8 kind.
pub(crate) const FRAME_HEADER_LEN: usize = 5;
/// Hard maximum of a frame body. Larger announced lengths close the link.
pub(crate) const MAX_FRAME_BODY: usize = 66 * 1024;
/// Largest Noise message (handshake or control ciphertext).
pub(crate) const MAX_NOISE_MESSAGE: usize = 65535;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A Noise handshake message.
    Handshake = 1,
    /// A Noise transport message carrying one [`Control`] message.
    Control = 2,
    /// A routed overlay packet (end-to-end protected; relays forward it as is).
    Packet = 3,
}

/// Parses a frame header; `Err` means the link must be closed.
pub(crate) fn parse_frame_header(
    h: &[u8; FRAME_HEADER_LEN],
) -> Result<(FrameKind, usize), WireError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let kind = match h[4] {
        1 => FrameKind::Handshake,
        2 => FrameKind::Control,
        3 => FrameKind::Packet,
        value => {
            return Err(WireError::UnknownType {
                what: "frame",
                value,
            });
        }
    };
    let max = match kind {
        FrameKind::Packet => MAX_FRAME_BODY,
        _ => MAX_NOISE_MESSAGE,
    };
    if len > max {
        return Err(WireError::Oversized {
            what: "frame",
            len,
            max,
        });
    }
    if len == 0 {
        return Err(WireError::Invalid("empty frame"));
    }
    Ok((kind, len))
}

/// Encodes a frame header for `len` body bytes.
pub(crate) fn frame_header(kind: FrameKind, len: usize) -> [u8; FRAME_HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    [l[0], l[1], l[2], l[3], kind as u8]
}

/// A complete frame (header + body) in one buffer.
pub fn encode_frame(kind: FrameKind, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + body.len());
    b.put_slice(&frame_header(kind, body.len()));
    b.put_slice(body);
    b.freeze()
}

// ---------------------------------------------------------------------------------------
// Control messages (inside Noise transport messages).

/// One signed route announcement as carried in an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteUpdate {
    pub prefix: Prefix,
    pub seqno: u64,
    /// Sender's metric (µs); `METRIC_INFINITY` is a retraction.
    pub metric: u32,
    /// The prefix owner's ed25519 key (router id).
    pub router_key: [u8; 32],
    /// Owner's signature over `route_signature_input`.
    pub signature: [u8; 64],
}

/// Metric of an unreachable (retracted) route.
pub(crate) const METRIC_INFINITY: u32 = u32::MAX;
const UPDATE_ENTRY_LEN: usize = 8 + 8 + 4 + 32 + 64;
/// Updates per control message (keeps messages under the Noise limit).
pub(crate) const MAX_UPDATES_PER_MESSAGE: usize = 500;
// A full Updates message (type, count, entries) plus the Noise tag fits one Noise message.
const _: () = assert!(3 + MAX_UPDATES_PER_MESSAGE * UPDATE_ENTRY_LEN + 16 <= MAX_NOISE_MESSAGE);
/// Prefixes per Retractions message.
pub(crate) const MAX_RETRACTIONS_PER_MESSAGE: usize = 4096;
const _: () = assert!(3 + MAX_RETRACTIONS_PER_MESSAGE * 8 + 16 <= MAX_NOISE_MESSAGE);

/// What the prefix owner signs: label, prefix, seqno, router key.
pub(crate) fn route_signature_input(
    prefix: &Prefix,
    seqno: u64,
    router_key: &[u8; 32],
) -> [u8; 65] {
    let mut m = [0u8; 65];
    m[..17].copy_from_slice(b"meshgate-route-v1");
    m[17..25].copy_from_slice(prefix);
    m[25..33].copy_from_slice(&seqno.to_be_bytes());
    m[33..].copy_from_slice(router_key);
    m
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Keepalive and RTT probe; the receiver echoes `timestamp_us`.
    Hello {
        timestamp_us: u64,
    },
    HelloAck {
        echo_us: u64,
    },
    Updates(Vec<RouteUpdate>),
    /// The sender no longer has a route to these prefixes (withdraws its own earlier
    /// announcements, so nothing needs signing).
    Retractions(Vec<Prefix>),
    /// Ask for an update of `prefix` with a seqno of at least `seqno`.
    SeqnoRequest {
        prefix: Prefix,
        seqno: u64,
        hop_count: u8,
    },
}

impl Control {
    /// Routing state (updates, retractions) is sent once: it must arrive, or the link must
    /// close. Keepalives and seqno requests are repeated, so losing one is harmless.
    pub(crate) fn must_arrive(&self) -> bool {
        matches!(self, Control::Updates(_) | Control::Retractions(_))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Control::Hello { timestamp_us } => {
                b.push(1);
                b.extend_from_slice(&timestamp_us.to_be_bytes());
            }
            Control::HelloAck { echo_us } => {
                b.push(2);
                b.extend_from_slice(&echo_us.to_be_bytes());
            }
            Control::Updates(list) => {
                b.reserve(3 + list.len() * UPDATE_ENTRY_LEN);
                b.push(3);
                b.extend_from_slice(&(list.len() as u16).to_be_bytes());
                for u in list {
                    b.extend_from_slice(&u.prefix);
                    b.extend_from_slice(&u.seqno.to_be_bytes());
                    b.extend_from_slice(&u.metric.to_be_bytes());
                    b.extend_from_slice(&u.router_key);
                    b.extend_from_slice(&u.signature);
                }
            }
            Control::Retractions(list) => {
                b.reserve(3 + list.len() * 8);
                b.push(5);
                b.extend_from_slice(&(list.len() as u16).to_be_bytes());
                for p in list {
                    b.extend_from_slice(p);
                }
            }
            Control::SeqnoRequest {
                prefix,
                seqno,
                hop_count,
            } => {
                b.push(4);
                b.extend_from_slice(prefix);
                b.extend_from_slice(&seqno.to_be_bytes());
                b.push(*hop_count);
            }
        }
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Control, WireError> {
        let mut r = Reader::new(b, "control message");
        let msg = match r.u8()? {
            1 => Control::Hello {
                timestamp_us: r.u64()?,
            },
            2 => Control::HelloAck { echo_us: r.u64()? },
            3 => {
                let n = r.u16()? as usize;
                if n > MAX_UPDATES_PER_MESSAGE {
                    return Err(WireError::Oversized {
                        what: "update list",
                        len: n,
                        max: MAX_UPDATES_PER_MESSAGE,
                    });
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(RouteUpdate {
                        prefix: r.array()?,
                        seqno: r.u64()?,
                        metric: r.u32()?,
                        router_key: r.array()?,
                        signature: r.array()?,
                    });
                }
                Control::Updates(list)
            }
            4 => Control::SeqnoRequest {
                prefix: r.array()?,
                seqno: r.u64()?,
                hop_count: r.u8()?,
            },
            5 => {
                let n = r.u16()? as usize;
                if n > MAX_RETRACTIONS_PER_MESSAGE {
                    return Err(WireError::Oversized {
                        what: "retraction list",
                        len: n,
                        max: MAX_RETRACTIONS_PER_MESSAGE,
                    });
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(r.array()?);
                }
                Control::Retractions(list)
            }
            value => {
                return Err(WireError::UnknownType {
                    what: "control",
                    value,
                });
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

// ---------------------------------------------------------------------------------------
// Routed packets: type, hop limit, source, destination, type-specific fields.

pub const PKT_DATA: u8 = 1;
pub(crate) const PKT_SESSION_INIT: u8 = 2;
pub(crate) const PKT_SESSION_RESP: u8 = 3;
pub(crate) const PKT_UNREACHABLE: u8 = 4;
pub(crate) const PKT_UNKNOWN_SESSION: u8 = 5;

/// type(1) hop_limit(1) src(16) dst(16).
pub(crate) const ROUTED_HEADER_LEN: usize = 34;
/// Data header: routed header + receiver index(4) + counter(8).
pub(crate) const DATA_HEADER_LEN: usize = ROUTED_HEADER_LEN + 12;
/// Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Hop limit set by the originator.
pub(crate) const DEFAULT_HOP_LIMIT: u8 = 64;
const INIT_LEN: usize = ROUTED_HEADER_LEN + 4 + 32 + 32 + 8 + 64;
const RESP_LEN: usize = ROUTED_HEADER_LEN + 4 + 4 + 32 + 32 + 64;
const UNREACHABLE_LEN: usize = ROUTED_HEADER_LEN + 16;
const UNKNOWN_SESSION_LEN: usize = ROUTED_HEADER_LEN + 4 + 64;

/// The common header of a routed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RoutedHeader {
    pub(crate) ptype: u8,
    pub(crate) hop_limit: u8,
    pub(crate) src: Ipv6Addr,
    pub(crate) dst: Ipv6Addr,
}

/// Validates a routed packet's header and its type-specific length.
pub(crate) fn parse_routed(b: &[u8]) -> Result<RoutedHeader, WireError> {
    if b.len() < ROUTED_HEADER_LEN {
        return Err(WireError::Truncated("routed packet"));
    }
    let ptype = b[0];
    let (min, exact) = match ptype {
        PKT_DATA => (DATA_HEADER_LEN + TAG_LEN, false),
        PKT_SESSION_INIT => (INIT_LEN, true),
        PKT_SESSION_RESP => (RESP_LEN, true),
        PKT_UNREACHABLE => (UNREACHABLE_LEN, true),
        PKT_UNKNOWN_SESSION => (UNKNOWN_SESSION_LEN, true),
        value => {
            return Err(WireError::UnknownType {
                what: "routed packet",
                value,
            });
        }
    };
    if b.len() < min {
        return Err(WireError::Truncated("routed packet"));
    }
    if exact && b.len() != min {
        return Err(WireError::Trailing("routed packet"));
    }
    if b.len() > MAX_FRAME_BODY {
        return Err(WireError::Oversized {
            what: "routed packet",
            len: b.len(),
            max: MAX_FRAME_BODY,
        });
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&b[2..18]);
    dst.copy_from_slice(&b[18..34]);
    Ok(RoutedHeader {
        ptype,
        hop_limit: b[1],
        src: Ipv6Addr::from(src),
        dst: Ipv6Addr::from(dst),
    })
}

fn put_routed_header(b: &mut BytesMut, ptype: u8, src: &Ipv6Addr, dst: &Ipv6Addr) {
    b.put_u8(ptype);
    b.put_u8(DEFAULT_HOP_LIMIT);
    b.put_slice(&src.octets());
    b.put_slice(&dst.octets());
}

/// Fields of a data packet header after the routed header.
pub(crate) fn data_fields(b: &[u8]) -> Result<(u32, u64), WireError> {
    let mut r = Reader::new(b.get(ROUTED_HEADER_LEN..).unwrap_or(&[]), "data packet");
    Ok((r.u32()?, r.u64()?))
}

/// Associated data of a data packet: the header without the hop limit (relays change it).
pub(crate) fn data_aad(header: &[u8]) -> [u8; DATA_HEADER_LEN - 1] {
    let mut aad = [0u8; DATA_HEADER_LEN - 1];
    if header.len() >= DATA_HEADER_LEN {
        aad[0] = header[0];
        aad[1..].copy_from_slice(&header[2..DATA_HEADER_LEN]);
    }
    aad
}

/// Writes a data packet header (hop limit = default).
pub fn put_data_header(
    b: &mut BytesMut,
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    receiver_idx: u32,
    counter: u64,
) {
    put_routed_header(b, PKT_DATA, src, dst);
    b.put_u32(receiver_idx);
    b.put_u64(counter);
}

/// End-to-end session initiation (initiator → responder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionInit {
    pub(crate) src: Ipv6Addr,
    pub(crate) dst: Ipv6Addr,
    pub(crate) sender_idx: u32,
    pub(crate) initiator_key: [u8; 32],
    pub(crate) ephemeral: [u8; 32],
    /// Strictly increasing per initiator (replayed inits are refused).
    pub(crate) timestamp: u64,
    pub(crate) signature: [u8; 64],
}

impl SessionInit {
    /// What the initiator signs.
    pub(crate) fn signed_input(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(20 + 16 + 16 + 4 + 32 + 32 + 8);
        m.extend_from_slice(b"meshgate-e2e-init-v1");
        m.extend_from_slice(&self.src.octets());
        m.extend_from_slice(&self.dst.octets());
        m.extend_from_slice(&self.sender_idx.to_be_bytes());
        m.extend_from_slice(&self.initiator_key);
        m.extend_from_slice(&self.ephemeral);
        m.extend_from_slice(&self.timestamp.to_be_bytes());
        m
    }

    pub(crate) fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(INIT_LEN);
        put_routed_header(&mut b, PKT_SESSION_INIT, &self.src, &self.dst);
        b.put_u32(self.sender_idx);
        b.put_slice(&self.initiator_key);
        b.put_slice(&self.ephemeral);
        b.put_u64(self.timestamp);
        b.put_slice(&self.signature);
        b.freeze()
    }

    pub(crate) fn decode(b: &[u8]) -> Result<SessionInit, WireError> {
        let h = parse_routed(b)?;
        if h.ptype != PKT_SESSION_INIT {
            return Err(WireError::Invalid("not a session init"));
        }
        let mut r = Reader::new(&b[ROUTED_HEADER_LEN..], "session init");
        let m = SessionInit {
            src: h.src,
            dst: h.dst,
            sender_idx: r.u32()?,
            initiator_key: r.array()?,
            ephemeral: r.array()?,
            timestamp: r.u64()?,
            signature: r.array()?,
        };
        r.finish()?;
        Ok(m)
    }
}

/// End-to-end session response (responder → initiator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionResp {
    pub(crate) src: Ipv6Addr,
    pub(crate) dst: Ipv6Addr,
    pub(crate) sender_idx: u32,
    pub(crate) receiver_idx: u32,
    pub(crate) responder_key: [u8; 32],
    pub(crate) ephemeral: [u8; 32],
    pub(crate) signature: [u8; 64],
}

impl SessionResp {
    /// What the responder signs; binds the whole init via its hash.
    pub(crate) fn signed_input(&self, init_hash: &[u8; 32]) -> Vec<u8> {
        let mut m = Vec::with_capacity(20 + 32 + 16 + 16 + 8 + 64);
        m.extend_from_slice(b"meshgate-e2e-resp-v1");
        m.extend_from_slice(init_hash);
        m.extend_from_slice(&self.src.octets());
        m.extend_from_slice(&self.dst.octets());
        m.extend_from_slice(&self.sender_idx.to_be_bytes());
        m.extend_from_slice(&self.receiver_idx.to_be_bytes());
        m.extend_from_slice(&self.responder_key);
        m.extend_from_slice(&self.ephemeral);
        m
    }

    pub(crate) fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(RESP_LEN);
        put_routed_header(&mut b, PKT_SESSION_RESP, &self.src, &self.dst);
        b.put_u32(self.sender_idx);
        b.put_u32(self.receiver_idx);
        b.put_slice(&self.responder_key);
        b.put_slice(&self.ephemeral);
        b.put_slice(&self.signature);
        b.freeze()
    }

    pub(crate) fn decode(b: &[u8]) -> Result<SessionResp, WireError> {
        let h = parse_routed(b)?;
        if h.ptype != PKT_SESSION_RESP {
            return Err(WireError::Invalid("not a session response"));
        }
        let mut r = Reader::new(&b[ROUTED_HEADER_LEN..], "session response");
        let m = SessionResp {
            src: h.src,
            dst: h.dst,
            sender_idx: r.u32()?,
            receiver_idx: r.u32()?,
            responder_key: r.array()?,
            ephemeral: r.array()?,
            signature: r.array()?,
        };
        r.finish()?;
        Ok(m)
    }
}

/// "I have no session with receiver index `receiver_idx`", signed by the node that received
/// a data packet it cannot open (e.g. it restarted): the data's sender starts a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownSession {
    /// The node that has no such session.
    pub(crate) src: Ipv6Addr,
    /// The sender of the data packet.
    pub(crate) dst: Ipv6Addr,
    /// The receiver index the data packet carried.
    pub(crate) receiver_idx: u32,
    /// `src`'s signature over [`UnknownSession::signed_input`].
    pub(crate) signature: [u8; 64],
}

impl UnknownSession {
    /// What the sender signs.
    pub(crate) fn signed_input(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(23 + 16 + 16 + 4);
        m.extend_from_slice(b"meshgate-e2e-unknown-v1");
        m.extend_from_slice(&self.src.octets());
        m.extend_from_slice(&self.dst.octets());
        m.extend_from_slice(&self.receiver_idx.to_be_bytes());
        m
    }

    pub(crate) fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(UNKNOWN_SESSION_LEN);
        put_routed_header(&mut b, PKT_UNKNOWN_SESSION, &self.src, &self.dst);
        b.put_u32(self.receiver_idx);
        b.put_slice(&self.signature);
        b.freeze()
    }

    pub(crate) fn decode(b: &[u8]) -> Result<UnknownSession, WireError> {
        let h = parse_routed(b)?;
        if h.ptype != PKT_UNKNOWN_SESSION {
            return Err(WireError::Invalid("not an unknown-session packet"));
        }
        let mut r = Reader::new(&b[ROUTED_HEADER_LEN..], "unknown-session packet");
        let m = UnknownSession {
            src: h.src,
            dst: h.dst,
            receiver_idx: r.u32()?,
            signature: r.array()?,
        };
        r.finish()?;
        Ok(m)
    }
}

/// "No route to `unreachable`", sent by a relay back to the packet's source.
pub fn encode_unreachable(src: &Ipv6Addr, dst: &Ipv6Addr, unreachable: &Ipv6Addr) -> Bytes {
    let mut b = BytesMut::with_capacity(UNREACHABLE_LEN);
    put_routed_header(&mut b, PKT_UNREACHABLE, src, dst);
    b.put_slice(&unreachable.octets());
    b.freeze()
}

/// The unreachable address in an unreachable packet.
pub(crate) fn decode_unreachable(b: &[u8]) -> Result<Ipv6Addr, WireError> {
    let h = parse_routed(b)?;
    if h.ptype != PKT_UNREACHABLE {
        return Err(WireError::Invalid("not an unreachable"));
    }
    let mut r = Reader::new(&b[ROUTED_HEADER_LEN..], "unreachable");
    let a: [u8; 16] = r.array()?;
    r.finish()?;
    Ok(Ipv6Addr::from(a))
}

// ---------------------------------------------------------------------------------------

/// Bounds-checked reader over untrusted bytes.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u8 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 56) as u8
    }

    fn controls() -> Vec<Control> {
        // Distinct entries for every index of a full message.
        let u = |i: usize| RouteUpdate {
            prefix: [6, (i >> 8) as u8, i as u8, 3, 4, 5, 6, 7],
            seqno: 1 << 40 | i as u64,
            metric: if i == 0 {
                METRIC_INFINITY
            } else {
                1000 * i as u32
            },
            router_key: [i as u8; 32],
            signature: [(i as u8) ^ 0x5a; 64],
        };
        vec![
            Control::Hello {
                timestamp_us: 123_456_789,
            },
            Control::HelloAck { echo_us: u64::MAX },
            Control::Updates(vec![]),
            Control::Updates((0..MAX_UPDATES_PER_MESSAGE).map(u).collect()),
            Control::SeqnoRequest {
                prefix: [7; 8],
                seqno: 9,
                hop_count: 64,
            },
            Control::Retractions(vec![]),
            Control::Retractions(
                (0..MAX_RETRACTIONS_PER_MESSAGE)
                    .map(|i| [6, (i >> 8) as u8, i as u8, 0, 0, 0, 0, 1])
                    .collect(),
            ),
        ]
    }

    #[test]
    fn a_full_updates_message_round_trips() {
        let full = controls()
            .into_iter()
            .find(|c| matches!(c, Control::Updates(l) if !l.is_empty()))
            .unwrap();
        let Control::Updates(list) = &full else {
            unreachable!()
        };
        assert_eq!(list.len(), MAX_UPDATES_PER_MESSAGE);
        let b = full.encode();
        assert_eq!(b.len(), 3 + MAX_UPDATES_PER_MESSAGE * UPDATE_ENTRY_LEN);
        assert!(b.len() + 16 <= MAX_NOISE_MESSAGE, "fits one Noise message");
        assert_eq!(Control::decode(&b).unwrap(), full);
    }

    #[test]
    fn control_round_trip_and_truncation() {
        for c in controls() {
            let b = c.encode();
            assert!(b.len() + 16 <= MAX_NOISE_MESSAGE);
            assert_eq!(Control::decode(&b).unwrap(), c);
            for cut in 0..b.len().min(300) {
                assert!(Control::decode(&b[..cut]).is_err(), "{c:?} cut at {cut}");
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(
                Control::decode(&long),
                Err(WireError::Trailing("control message"))
            );
        }
        // An update count above the limit is refused before reading entries.
        let mut b = vec![3u8];
        b.extend_from_slice(&(MAX_UPDATES_PER_MESSAGE as u16 + 1).to_be_bytes());
        assert!(matches!(
            Control::decode(&b),
            Err(WireError::Oversized { .. })
        ));
        let mut b = vec![5u8];
        b.extend_from_slice(&(MAX_RETRACTIONS_PER_MESSAGE as u16 + 1).to_be_bytes());
        assert!(matches!(
            Control::decode(&b),
            Err(WireError::Oversized { .. })
        ));
        assert!(matches!(
            Control::decode(&[9]),
            Err(WireError::UnknownType { .. })
        ));
    }

    #[test]
    fn routed_packets_round_trip_and_reject_bad_lengths() {
        let src: Ipv6Addr = "600::1".parse().unwrap();
        let dst: Ipv6Addr = "7ff::2".parse().unwrap();
        let init = SessionInit {
            src,
            dst,
            sender_idx: 7,
            initiator_key: [1; 32],
            ephemeral: [2; 32],
            timestamp: 99,
            signature: [3; 64],
        };
        let resp = SessionResp {
            src: dst,
            dst: src,
            sender_idx: 8,
            receiver_idx: 7,
            responder_key: [4; 32],
            ephemeral: [5; 32],
            signature: [6; 64],
        };
        let ib = init.encode();
        let rb = resp.encode();
        let ub = encode_unreachable(&src, &dst, &"600::9".parse().unwrap());
        let unknown = UnknownSession {
            src: dst,
            dst: src,
            receiver_idx: 0xdead_beef,
            signature: [7; 64],
        };
        let kb = unknown.encode();
        assert_eq!(kb.len(), 102);
        assert_eq!(UnknownSession::decode(&kb).unwrap(), unknown);
        assert!(UnknownSession::decode(&ub).is_err());
        assert_eq!(SessionInit::decode(&ib).unwrap(), init);
        assert_eq!(SessionResp::decode(&rb).unwrap(), resp);
        assert_eq!(
            decode_unreachable(&ub).unwrap(),
            "600::9".parse::<Ipv6Addr>().unwrap()
        );
        assert!(SessionInit::decode(&rb).is_err());
        for b in [&ib, &rb, &ub, &kb] {
            let h = parse_routed(b).unwrap();
            assert_eq!(
                (h.hop_limit, h.src == src || h.src == dst),
                (DEFAULT_HOP_LIMIT, true)
            );
            for cut in 0..b.len() {
                assert!(parse_routed(&b[..cut]).is_err());
            }
            let mut long = b.to_vec();
            long.push(0);
            assert!(parse_routed(&long).is_err());
        }
        let mut d = BytesMut::new();
        put_data_header(&mut d, &src, &dst, 5, 6);
        d.extend_from_slice(&[0; TAG_LEN]);
        assert_eq!(data_fields(&d).unwrap(), (5, 6));
        assert!(parse_routed(&d[..d.len() - 1]).is_err());
        let huge = vec![PKT_DATA; MAX_FRAME_BODY + 1];
        assert!(matches!(
            parse_routed(&huge),
            Err(WireError::Oversized { .. })
        ));
        assert!(matches!(
            parse_routed(&[99; 64]),
            Err(WireError::UnknownType { .. })
        ));
    }

    #[test]
    fn frame_headers() {
        for kind in [FrameKind::Handshake, FrameKind::Control, FrameKind::Packet] {
            let h = frame_header(kind, 1000);
            assert_eq!(parse_frame_header(&h).unwrap(), (kind, 1000));
        }
        assert!(parse_frame_header(&frame_header(FrameKind::Packet, MAX_FRAME_BODY)).is_ok());
        assert!(matches!(
            parse_frame_header(&frame_header(FrameKind::Packet, MAX_FRAME_BODY + 1)),
            Err(WireError::Oversized { .. })
        ));
        assert!(
            parse_frame_header(&frame_header(FrameKind::Control, MAX_NOISE_MESSAGE + 1)).is_err()
        );
        assert!(parse_frame_header(&frame_header(FrameKind::Control, 0)).is_err());
        assert!(parse_frame_header(&[0, 0, 0, 1, 0]).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 42;
        for round in 0..20_000 {
            let len = (lcg(&mut seed) as usize) % 300;
            let mut b: Vec<u8> = (0..len).map(|_| lcg(&mut seed)).collect();
            if let Some(first) = b.first_mut() {
                *first = (round % 7) as u8; // hit every type byte often
            }
            let _ = Control::decode(&b);
            let _ = parse_routed(&b);
            let _ = SessionInit::decode(&b);
            let _ = SessionResp::decode(&b);
            let _ = decode_unreachable(&b);
            let _ = UnknownSession::decode(&b);
            let _ = data_fields(&b);
            if b.len() >= 5 {
                let _ = parse_frame_header(&b[..5].try_into().unwrap());
            }
        }
    }
}
