//! Entry points for the fuzz targets (`fuzz/targets`) into the wire decoders the overlay keeps
//! crate-private: link frame headers and the frame splitter, control messages, routed packets
//! and session inits. Not an API: hidden, and may change with the fuzz targets.

use bytes::{Bytes, BytesMut};

use crate::link::LinkError;
use crate::wire::{self, Control, FrameKind, WireError};

/// [`wire::parse_frame_header`]: the frame kind and body length, or why the link closes.
pub fn parse_frame_header(
    h: &[u8; wire::FRAME_HEADER_LEN],
) -> Result<(FrameKind, usize), WireError> {
    wire::parse_frame_header(h)
}

/// The link's frame splitter (the link machine's framing) on a read buffer.
pub fn decode_frames(
    buf: &mut BytesMut,
    frames: &mut Vec<(FrameKind, BytesMut)>,
) -> Result<(), LinkError> {
    crate::link::decode_frames(buf, frames).map_err(LinkError::from)
}

/// [`Control::decode`].
pub fn decode_control(b: &[u8]) -> Result<Control, WireError> {
    Control::decode(b)
}

/// [`Control::encode`].
pub fn encode_control(c: &Control) -> Vec<u8> {
    c.encode()
}

/// A routed packet decoded by its type's decoder and encoded again (the hop limit the encoders
/// write is the default one). `Ok(None)` for data packets, which are not re-encoded.
pub fn reencode_routed(b: &[u8]) -> Result<Option<Bytes>, WireError> {
    let h = wire::parse_routed(b)?;
    Ok(match h.ptype {
        wire::PKT_SESSION_INIT => Some(wire::SessionInit::decode(b)?.encode()),
        wire::PKT_SESSION_RESP => Some(wire::SessionResp::decode(b)?.encode()),
        wire::PKT_UNKNOWN_SESSION => Some(wire::UnknownSession::decode(b)?.encode()),
        wire::PKT_UNREACHABLE => Some(wire::encode_unreachable(
            &h.src,
            &h.dst,
            &wire::decode_unreachable(b)?,
        )),
        _ => {
            wire::data_fields(b)?;
            None
        }
    })
}

/// The hop limit encoders write.
pub const DEFAULT_HOP_LIMIT: u8 = wire::DEFAULT_HOP_LIMIT;
