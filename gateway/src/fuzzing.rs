//! Entry points for the fuzz targets (`fuzz/targets`) into parsers the gateway keeps private:
//! the ClientHello reader and the PROXY v2 header writer. Not an API: hidden, and may change
//! with the fuzz targets.

use crate::classify::{hello, read};
use std::net::SocketAddr;
use tokio::io::AsyncRead;
use tokio::time::Instant;

/// What the ClientHello reader made of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloOutcome {
    /// A whole ClientHello: its server name and ALPN protocols.
    Done {
        sni: Option<String>,
        alpn: Vec<Vec<u8>>,
    },
    /// Not enough bytes yet.
    NeedMore,
    /// Not a TLS handshake record.
    NotTls,
    /// Malformed or over `max`.
    Bad,
    /// (reader only) the stream closed or the deadline passed first.
    Closed,
}

/// [`hello::parse`] on all bytes received so far.
pub fn parse_client_hello(buf: &[u8], max: usize) -> HelloOutcome {
    outcome(hello::parse(buf, max))
}

fn outcome(parsed: Result<hello::Parse, hello::HelloError>) -> HelloOutcome {
    match parsed {
        Ok(hello::Parse::Done(h)) => HelloOutcome::Done {
            sni: h.sni,
            alpn: h.alpn,
        },
        Ok(hello::Parse::NeedMore) => HelloOutcome::NeedMore,
        Err(hello::HelloError::NotTls) => HelloOutcome::NotTls,
        Err(_) => HelloOutcome::Bad,
    }
}

/// The bounded reader ([`read::client_hello`]) on `stream`: the outcome and the bytes it kept.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
    deadline: Instant,
) -> (HelloOutcome, usize) {
    match read::client_hello(stream, max, deadline).await {
        Ok((h, kept)) => (
            HelloOutcome::Done {
                sni: h.sni,
                alpn: h.alpn,
            },
            kept.len(),
        ),
        Err(read::ReadError::NotTls) => (HelloOutcome::NotTls, 0),
        Err(read::ReadError::Bad(_)) => (HelloOutcome::Bad, 0),
        Err(read::ReadError::Timeout | read::ReadError::Closed) => (HelloOutcome::Closed, 0),
    }
}

/// The PROXY v2 header the gateway sends before a passthrough stream.
pub fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    crate::passthrough::proxy_protocol::header_v2(client, local)
}

/// The reader's incremental parse, fed `buf` cut at each of `cuts` (ascending) and then whole:
/// the outcome after each feed, up to the first that is not [`HelloOutcome::NeedMore`].
pub fn parse_client_hello_in_steps(buf: &[u8], max: usize, cuts: &[usize]) -> Vec<HelloOutcome> {
    let mut r = hello::Reassembly::default();
    let mut out = Vec::new();
    for &cut in cuts.iter().chain([&buf.len()]) {
        let outcome = outcome(r.parse(&buf[..cut.min(buf.len())], max));
        let done = outcome != HelloOutcome::NeedMore;
        out.push(outcome);
        if done {
            break;
        }
    }
    out
}
