//! Splitting a link's received byte stream into frames (sans-IO): a bad header is an error
//! (the link closes), an incomplete frame waits in the buffer for the rest.

use bytes::{Buf, BytesMut};

use crate::wire::{self, FRAME_HEADER_LEN, FrameKind, WireError};

/// Splits the first complete frame off the front of `buf`; `Ok(None)` when the buffer holds
/// only part of one (room for the rest is reserved, so the next read completes it in place).
pub(crate) fn next_frame(buf: &mut BytesMut) -> Result<Option<(FrameKind, BytesMut)>, WireError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let mut h = [0u8; FRAME_HEADER_LEN];
    h.copy_from_slice(&buf[..FRAME_HEADER_LEN]);
    let (kind, len) = wire::parse_frame_header(&h)?;
    if buf.len() < FRAME_HEADER_LEN + len {
        buf.reserve(FRAME_HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(FRAME_HEADER_LEN + len);
    frame.advance(FRAME_HEADER_LEN);
    Ok(Some((kind, frame)))
}

/// Splits every complete frame off the front of `buf` into `frames`.
pub(crate) fn decode_frames(
    buf: &mut BytesMut,
    frames: &mut Vec<(FrameKind, BytesMut)>,
) -> Result<(), WireError> {
    while let Some(f) = next_frame(buf)? {
        frames.push(f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode_frame;

    #[test]
    fn frames_split_at_every_boundary_and_partial_frames_wait() {
        let mut stream = Vec::new();
        let bodies: Vec<Vec<u8>> = (1..40).map(|n| vec![n as u8; n * 37]).collect();
        for b in &bodies {
            stream.extend_from_slice(&encode_frame(FrameKind::Packet, b));
        }
        // Feed the stream in every chunk size from 1 byte up: frames come out whole, in order.
        for chunk in [1, 2, 3, 5, 7, 64, 1000, stream.len()] {
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                decode_frames(&mut buf, &mut frames).unwrap();
            }
            assert!(buf.is_empty(), "chunk {chunk}: {} bytes left", buf.len());
            let got: Vec<Vec<u8>> = frames.iter().map(|(_, b)| b.to_vec()).collect();
            assert_eq!(got, bodies, "chunk {chunk}");
        }
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        for header in [
            [0, 0, 0, 0, 3],               // empty frame
            [0, 0, 0, 4, 9],               // unknown kind
            [0, 0x10, 0, 0, 3],            // packet of 1 MiB
            [0xff, 0xff, 0xff, 0xff, 2u8], // control of 4 GiB
        ] {
            let mut buf = BytesMut::from(&header[..]);
            buf.extend_from_slice(&[0u8; 16]);
            let mut frames = Vec::new();
            assert!(
                decode_frames(&mut buf, &mut frames).is_err(),
                "{header:?} accepted"
            );
            assert!(frames.is_empty());
        }
        let mut buf = BytesMut::from(&[0, 0x10, 0, 0, 3][..]);
        match decode_frames(&mut buf, &mut Vec::new()) {
            Err(WireError::Oversized { .. }) => {}
            other => panic!("oversized frame: {other:?}"),
        }
    }
}
