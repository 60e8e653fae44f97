//! Reading a ClientHello off a client connection, bounded in size and time (the bytes read are
//! kept, to be replayed to rustls or to a passthrough backend), and answering with an alert.

use super::hello::{self, ClientHello, HelloError, Parse};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why no ClientHello came.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The first bytes are not a TLS handshake record: close without a word.
    NotTls,
    /// A malformed or oversized ClientHello: answer with a decode-error alert.
    Bad(HelloError),
    /// The deadline passed first.
    Timeout,
    /// The client closed or the socket failed.
    Closed,
}

/// Reads until a whole ClientHello of at most `max` bytes has arrived, or `deadline`. Generic
/// over the stream so the fuzz targets can drive it with chunked in-memory input.
pub(crate) async fn client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
    deadline: Instant,
) -> Result<(ClientHello, Bytes), ReadError> {
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        match hello::parse(&buf, max) {
            Ok(Parse::NeedMore) => {}
            Ok(Parse::Done(h)) => return Ok((h, buf.freeze())),
            Err(HelloError::NotTls) => return Err(ReadError::NotTls),
            Err(e) => return Err(ReadError::Bad(e)),
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadError::Closed),
            Ok(Ok(_)) => {}
            Err(_) => return Err(ReadError::Timeout),
        }
    }
}

/// Sends the TLS alert `description` and closes the connection.
pub(crate) async fn send_alert(stream: &mut TcpStream, description: u8) {
    let _ = stream.write_all(&hello::alert(description)).await;
    let _ = stream.shutdown().await;
}
