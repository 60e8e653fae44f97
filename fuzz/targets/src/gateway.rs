//! The gateway's parsers of client bytes: the ClientHello (alone and through the bounded reader)
//! and the PROXY v2 header it writes for passthrough backends.

use crate::{XorShift, block_on};
use meshgate_gateway::fuzzing::{
    HelloOutcome, parse_client_hello, parse_client_hello_in_steps, proxy_v2_header,
    read_client_hello,
};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// The `limits.max_client_hello_bytes` chosen by an input's first byte (512 is the least the
/// configuration allows, 16384 the default).
fn max_for(b: u8) -> usize {
    match b % 4 {
        0 => 16384,
        1 => 512,
        2 => 1024 + usize::from(b) * 16,
        _ => 65536,
    }
}

/// The ClientHello reader on all bytes at once. A hello it accepts has a clean server name and
/// non-empty ALPN protocols, and where rustls accepts the same bytes, both read the same name
/// and protocols (the gateway routes by its reading, rustls terminates by its own).
pub fn client_hello(data: &[u8]) {
    let Some((&b, buf)) = data.split_first() else {
        return;
    };
    let max = max_for(b);
    let whole = parse_client_hello(buf, max);
    // Fed in pieces (as the reader feeds it), each answer is the one for that prefix.
    let mut sizes = XorShift::new(u64::from(b) + buf.len() as u64);
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < buf.len() && cuts.len() < 64 {
        at += 1 + sizes.next() as usize % 64;
        cuts.push(at.min(buf.len()));
    }
    let steps = parse_client_hello_in_steps(buf, max, &cuts);
    for (outcome, cut) in steps.iter().zip(cuts.iter().chain([&buf.len()])) {
        assert_eq!(
            outcome,
            &parse_client_hello(&buf[..*cut], max),
            "cut at {cut}"
        );
    }
    let HelloOutcome::Done { sni, alpn } = whole else {
        return;
    };
    if let Some(name) = &sni {
        assert!(!name.is_empty() && !name.ends_with('.'), "{name:?}");
        assert!(
            name.bytes()
                .all(|c| c.is_ascii_graphic() && !c.is_ascii_uppercase())
        );
    }
    assert!(alpn.iter().all(|p| !p.is_empty()));
    if let Some((theirs, their_alpn)) = rustls_reading(buf) {
        if let (Some(ours), Some(theirs)) = (&sni, &theirs) {
            let theirs = theirs.strip_suffix('.').unwrap_or(theirs);
            assert!(
                ours.eq_ignore_ascii_case(theirs),
                "SNI: gateway {ours:?}, rustls {theirs:?}"
            );
        }
        if let Some(their_alpn) = their_alpn {
            assert_eq!(alpn, their_alpn, "ALPN differs from rustls'");
        }
    }
}

/// (server name, ALPN) as rustls' acceptor reads `buf`, if it accepts it.
#[allow(clippy::type_complexity)]
fn rustls_reading(mut buf: &[u8]) -> Option<(Option<String>, Option<Vec<Vec<u8>>>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    loop {
        match acceptor.read_tls(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                return Some((
                    hello.server_name().map(str::to_string),
                    hello.alpn().map(|a| a.map(<[u8]>::to_vec).collect()),
                ));
            }
            Ok(None) if !buf.is_empty() => {}
            _ => return None,
        }
    }
}

/// Input read in chunks of varying size, then end of stream.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: XorShift,
    max_chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let want = 1 + (self.sizes.next() as usize) % self.max_chunk;
        let n = want.min(out.remaining()).min(self.data.len());
        let mut taken = vec![0; n];
        let read = self.data.read(&mut taken)?;
        out.put_slice(&taken[..read]);
        Poll::Ready(Ok(()))
    }
}

/// Largest read the chunked stream returns.
const MAX_CHUNK: usize = 300;

/// The bounded reader (`classify::read`) fed in chunks: it keeps at most one read past the
/// bound, and its answer is the parser's answer on the bytes it kept.
pub fn client_hello_reader(data: &[u8]) {
    let [b, seed, rest @ ..] = data else {
        return;
    };
    let max = max_for(*b);
    let mut stream = Chunked {
        data: rest,
        sizes: XorShift::new(u64::from(*seed) * 0x9E37_79B9),
        max_chunk: 1 + usize::from(*seed) % MAX_CHUNK,
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    let (outcome, kept) = block_on(read_client_hello(&mut stream, max, deadline));
    assert!(
        kept <= max + 5 + MAX_CHUNK,
        "kept {kept} bytes for max {max}"
    );
    if let HelloOutcome::Done { .. } = outcome {
        assert_eq!(parse_client_hello(&rest[..kept], max), outcome);
    }
}

/// The PROXY v2 header for addresses taken from the input, read back by the `ppp` crate's
/// parser: same addresses and ports, and the header's length field covers exactly the header.
pub fn proxy_v2(data: &[u8]) {
    if data.len() < 37 {
        return;
    }
    let ip = |kind: u8, b: &[u8]| -> IpAddr {
        let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).expect("16 bytes"));
        match kind % 3 {
            0 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            1 => IpAddr::V6(v6),
            _ => IpAddr::V6(Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_ipv6_mapped()),
        }
    };
    let kind = data[0];
    let client = SocketAddr::new(
        ip(kind, &data[1..17]),
        u16::from_be_bytes([data[33], data[34]]),
    );
    let local = SocketAddr::new(
        ip(kind / 3, &data[17..33]),
        u16::from_be_bytes([data[35], data[36]]),
    );
    let mut stream = proxy_v2_header(client, local);
    let header_len = stream.len();
    stream.extend_from_slice(&data[37..]);
    let header = ppp::v2::Header::try_from(&stream[..])
        .unwrap_or_else(|e| panic!("ppp refuses the header for {client} -> {local}: {e:?}"));
    assert_eq!(header.len(), header_len);
    assert_eq!(header.command, ppp::v2::Command::Proxy);
    assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, l) = (canonical(client), canonical(local));
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(SocketAddr::from((a.source_address, a.source_port)), c);
            assert_eq!(
                SocketAddr::from((a.destination_address, a.destination_port)),
                l
            );
        }
        ppp::v2::Addresses::IPv6(a) => {
            // Mixed families travel as IPv6, the IPv4 side mapped.
            assert!(c.is_ipv6() || l.is_ipv6());
            let v6 = |s: SocketAddr| match s.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            assert_eq!((a.source_address, a.source_port), (v6(c), c.port()));
            assert_eq!(
                (a.destination_address, a.destination_port),
                (v6(l), l.port())
            );
        }
        other => panic!("unexpected addresses {other:?}"),
    }
}
