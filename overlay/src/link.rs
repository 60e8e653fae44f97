//! Link layer: length-prefixed frames over TCP and the Noise XX handshake that proves both
//! node identities. The node runs links through the sans-IO state machine in [`machine`]
//! (inside its core); the async helpers here drive one handshake and frames by hand on a
//! stream (tests play misbehaving peers with them).
//!
//! Pattern `Noise_XX_25519_ChaChaPoly_BLAKE2s`, prologue `meshgate-link-v1`. Each side's
//! Noise static key is the X25519 key derived from its ed25519 identity
//! ([`Identity::x25519_secret`]). The second and third handshake messages carry the sender's
//! ed25519 public key as payload; the receiver accepts it only if its Montgomery form equals
//! the Noise static key the handshake just authenticated. Control messages travel as Noise
//! transport messages; routed packets (already end-to-end encrypted and authenticated) travel
//! in plain frames so relays add no second cipher pass.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

mod frames;
pub mod machine;
pub(crate) mod queue;

pub(crate) use frames::decode_frames;
pub use machine::{DownReason, Link, LinkConfig, LinkEvent};

use crate::identity::{Identity, x25519_for_ed25519};
use crate::wire::{self, FRAME_HEADER_LEN, FrameKind, MAX_NOISE_MESSAGE, WireError};

pub(crate) const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
pub(crate) const PROLOGUE: &[u8] = b"meshgate-link-v1";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] WireError),
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    #[error("peer's ed25519 key does not match its Noise static key")]
    IdentityMismatch,
    #[error("unexpected frame during handshake")]
    Unexpected,
}

/// Reads one frame; `Ok(None)` on clean EOF at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(FrameKind, BytesMut)>, LinkError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    match r.read_exact(&mut h[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut h[1..]).await?;
    let (kind, len) = wire::parse_frame_header(&h)?;
    // Read straight into the buffer (no zero-fill: bodies are up to 66 KiB per packet).
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        let want = len - body.len();
        if r.read_buf(&mut bytes::BufMut::limit(&mut body, want))
            .await?
            == 0
        {
            return Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Some((kind, body)))
}

/// Writes one frame.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    body: &[u8],
) -> Result<(), LinkError> {
    w.write_all(&wire::encode_frame(kind, body)).await?;
    Ok(())
}

/// Encrypts a control message into a complete frame.
pub fn seal_control(t: &mut snow::TransportState, msg: &wire::Control) -> Result<Bytes, LinkError> {
    let plain = msg.encode();
    let mut buf = vec![0u8; plain.len() + 16];
    if buf.len() > MAX_NOISE_MESSAGE {
        return Err(WireError::Oversized {
            what: "control message",
            len: buf.len(),
            max: MAX_NOISE_MESSAGE,
        }
        .into());
    }
    let n = t.write_message(&plain, &mut buf)?;
    Ok(wire::encode_frame(FrameKind::Control, &buf[..n]))
}

/// Decrypts and decodes a control frame body.
pub fn open_control(t: &mut snow::TransportState, body: &[u8]) -> Result<wire::Control, LinkError> {
    let mut buf = vec![0u8; body.len()];
    let n = t.read_message(body, &mut buf)?;
    Ok(wire::Control::decode(&buf[..n])?)
}

/// Runs the Noise XX handshake on a fresh stream. Returns the transport state and the
/// peer's verified ed25519 public key.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &Identity,
    initiator: bool,
) -> Result<(snow::TransportState, [u8; 32]), LinkError> {
    handshake_claiming(s, id, &id.public_key(), initiator).await
}

/// [`handshake`] with an arbitrary claimed ed25519 key (tests use it to play an impostor).
pub async fn handshake_claiming<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &Identity,
    claimed_key: &[u8; 32],
    initiator: bool,
) -> Result<(snow::TransportState, [u8; 32]), LinkError> {
    let params = NOISE_PARAMS.parse()?;
    let secret = id.x25519_secret();
    let b = snow::Builder::new(params)
        .local_private_key(&secret[..])?
        .prologue(PROLOGUE)?;
    let mut hs = if initiator {
        b.build_initiator()?
    } else {
        b.build_responder()?
    };
    let mut buf = vec![0u8; MAX_NOISE_MESSAGE];
    let mut payload = vec![0u8; MAX_NOISE_MESSAGE];
    let mut remote_key: Option<[u8; 32]> = None;
    // XX: -> e ; <- e, ee, s, es (payload: responder key) ; -> s, se (payload: initiator key)
    for step in 0..3 {
        let ours = (step % 2 == 0) == initiator;
        if ours {
            let p: &[u8] = if step == 0 { &[] } else { claimed_key };
            let n = hs.write_message(p, &mut buf)?;
            write_frame(s, FrameKind::Handshake, &buf[..n]).await?;
        } else {
            let Some((kind, body)) = read_frame(s).await? else {
                return Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            };
            if kind != FrameKind::Handshake {
                return Err(LinkError::Unexpected);
            }
            let n = hs.read_message(&body, &mut payload)?;
            if step > 0 {
                let key: [u8; 32] = payload[..n]
                    .try_into()
                    .map_err(|_| LinkError::IdentityMismatch)?;
                let stat = hs.get_remote_static().ok_or(LinkError::IdentityMismatch)?;
                if x25519_for_ed25519(&key).as_ref().map(|k| &k[..]) != Some(stat) {
                    return Err(LinkError::IdentityMismatch);
                }
                remote_key = Some(key);
            } else if n != 0 {
                return Err(LinkError::Unexpected);
            }
        }
    }
    let key = remote_key.ok_or(LinkError::IdentityMismatch)?;
    Ok((hs.into_transport_mode()?, key))
}
