//! A lean proxy path, for measuring only: what the gateway's per-request work costs without
//! hyper between the TLS stream and the backend socket (issue 17, item 3a, decision b). It
//! answers one question with a number: would another HTTP engine on the hot path bring the
//! gateway to nginx's instructions per request?
//!
//! It is shaped as nginx is. HTTP/1.1 ([`http1`]): the request head is parsed in place (httparse,
//! the parser hyper uses), checked and rewritten straight into the upstream head, and the
//! backend connection is driven by the client connection's own task, with no hand-off to a
//! connection task; buffers live as long as the connection. h2 ([`http2`]): the h2 crate (hyper's
//! own h2 layer) without hyper around it, each stream served inside the connection's task.
//!
//! Per request it does what the gateway does to a request: one `Host`, a single
//! `Content-Length`, hop-by-hop headers (and those `Connection` names) dropped both ways,
//! client-sent forwarding headers replaced by its own (`X-Forwarded-For`, `-Host`, `-Proto`,
//! `Forwarded`), pooled keep-alive HTTP/1.1 to the backend (at most 1,024 idle). Backends are
//! dialed through the gateway's own seam ([`Dialer`]): kernel TCP, or, given an overlay key and
//! a peer, the gateway's embedded overlay node and userspace stack.
//!
//! It is not a candidate implementation: it refuses what the measurement does not need
//! (chunked bodies, h2 request bodies, HTTP/1.0, upgrades, interim responses) and has no
//! routing, timeouts, metrics or access log.
//!
//! With `--hyper-server` first, clients are served by hyper's server instead, configured as the
//! gateway's, in front of the same upstream path ([`hyper_server`]): that tells hyper's
//! client-facing side from its pooled client.
//!
//! Usage: `http_floor [--hyper-server] LISTEN BACKEND CERT KEY [OVERLAY_KEY PEER]`; the gateway
//! bench's callgrind mode runs it with `BENCH_HTTP_FLOOR=target/release/http_floor`.

mod http1;
mod http2;
mod hyper_server;

use anyhow::{Context, Result};
use meshgate_gateway::upstream::dial::{BoxStream, Dialer, DirectDialer};
use meshgate_gateway::upstream::overlay::EmbeddedNode;
use meshgate_overlay::NodeConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

// The allocator and options the gateway runs with (meshgate/src/main.rs), so the rows differ
// in their HTTP paths, not their allocators.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[allow(unsafe_code)] // The symbol jemalloc reads its options from (a C `const char *`).
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 29] = b"tcache_gc_incr_bytes:1048576\0";

/// Largest request or response head, and most header fields in one.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Idle backend connections kept (nginx's `keepalive` in the bench).
const POOL_CAP: usize = 1024;

/// Headers that belong to one hop and never cross the proxy.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];
/// Forwarding headers a client may not set: the proxy writes its own.
const FORWARDING: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let hyper_server = args.next_if_eq("--hyper-server").is_some();
    let mut next = |what: &str| {
        args.next().with_context(|| {
            format!("usage: http_floor LISTEN BACKEND CERT KEY [OVERLAY_KEY PEER] ({what} missing)")
        })
    };
    let listen: SocketAddr = next("LISTEN")?.parse()?;
    let backend: SocketAddr = next("BACKEND")?.parse()?;
    let certs = CertificateDer::pem_file_iter(next("CERT")?)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(next("KEY")?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let overlay = args.next().zip(args.next());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let (dialer, _node): (Arc<dyn Dialer>, _) = match overlay {
                Some((key_path, peer)) => {
                    let node = EmbeddedNode::start_with(NodeConfig {
                        key_path: key_path.into(),
                        peers: vec![peer.parse()?],
                        discovery: None,
                        ..NodeConfig::default()
                    })
                    .await?;
                    (Arc::new(node.dialer()), Some(node))
                }
                None => (Arc::new(DirectDialer), None),
            };
            let pool = Arc::new(Pool {
                backend,
                dialer,
                idle: Mutex::new(Vec::new()),
            });
            let listener = TcpListener::bind(listen).await?;
            loop {
                let (tcp, peer) = listener.accept().await?;
                let (acceptor, pool) = (acceptor.clone(), pool.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = forwarded_for(peer.ip());
                    if hyper_server {
                        hyper_server::serve(tls, peer, pool).await;
                    } else if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                        let _ = http2::serve(tls, &peer, &pool).await;
                    } else {
                        let _ = http1::Connection::new(tls, peer, &pool).serve().await;
                    }
                });
            }
        })
}

/// The client's address as the forwarding headers' `for` (RFC 7239 quotes IPv6).
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    }
}

/// Idle keep-alive connections to the one backend.
struct Pool {
    backend: SocketAddr,
    dialer: Arc<dyn Dialer>,
    idle: Mutex<Vec<BoxStream>>,
}

impl Pool {
    /// An idle connection, else a new one.
    async fn take(&self) -> Result<BoxStream, Refusal> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(s) => Ok(s),
            None => self.dial().await,
        }
    }

    /// A new connection (to retry on after an idle one turned out closed).
    async fn dial(&self) -> Result<BoxStream, Refusal> {
        (self.dialer.dial(self.backend).await)
            .map_err(|_| Refusal::BadGateway("backend unreachable"))
    }

    fn give(&self, s: BoxStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOL_CAP {
            idle.push(s);
        }
    }
}

/// Why a request was answered by the proxy itself.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    BadRequest(&'static str),
    NotImplemented(&'static str),
    BadGateway(&'static str),
}

impl Refusal {
    fn status(self) -> (u16, &'static str, &'static str) {
        match self {
            Refusal::BadRequest(w) => (400, "Bad Request", w),
            Refusal::NotImplemented(w) => (501, "Not Implemented", w),
            Refusal::BadGateway(w) => (502, "Bad Gateway", w),
        }
    }
}

/// `Connection` options naming further hop-by-hop headers, at most 8.
#[derive(Default)]
struct Named<'a> {
    names: [&'a [u8]; 8],
    len: usize,
    close: bool,
}

impl<'a> Named<'a> {
    /// Adds the options of one `Connection` value; fails if there are too many.
    fn add(&mut self, value: &'a [u8]) -> Result<(), ()> {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if self.len < self.names.len() {
                self.names[self.len] = token;
                self.len += 1;
            } else {
                return Err(());
            }
        }
        Ok(())
    }

    /// Whether `name` stays on this hop.
    fn drops(&self, name: &[u8]) -> bool {
        is_one_of(name, &HOP_BY_HOP)
            || self.names[..self.len]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Writes the upstream request head: the request line, the client's fields but hop-by-hop and
/// forwarding ones, then the proxy's forwarding fields.
fn upstream_head<'a>(
    out: &mut Vec<u8>,
    (method, path, host): (&[u8], &[u8], &[u8]),
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    named: &Named,
    peer: &[u8],
) {
    out.clear();
    for part in [method, b" ", path, b" HTTP/1.1\r\nhost: ", host, b"\r\n"] {
        out.extend_from_slice(part);
    }
    for (name, value) in fields {
        if named.drops(name) || is_one_of(name, &FORWARDING) || name.eq_ignore_ascii_case(b"host") {
            continue;
        }
        for part in [name, b": ", value, b"\r\n"] {
            out.extend_from_slice(part);
        }
    }
    for part in [
        b"x-forwarded-for: ",
        peer,
        b"\r\nx-forwarded-host: ",
        host,
        b"\r\nx-forwarded-proto: https\r\nforwarded: for=",
        peer,
        b";host=\"",
        host,
        b"\";proto=https\r\n\r\n",
    ] {
        out.extend_from_slice(part);
    }
}

/// Whether `host` may be sent on: a host name or address, with an optional port.
fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// A response head's framing: its `Content-Length` and `Connection` options.
fn response_framing<'a>(
    fields: &[httparse::Header<'a>],
    named: &mut Named<'a>,
) -> Result<Option<u64>, Refusal> {
    let mut length: Option<u64> = None;
    for h in fields {
        if h.name.eq_ignore_ascii_case("content-length") {
            add_length(&mut length, h.value).map_err(Refusal::BadGateway)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::BadGateway("chunked response bodies"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            // Options beyond the eighth are dropped with the rest: nothing is forwarded.
            let _ = named.add(h.value);
        }
    }
    Ok(length)
}

/// Reads until `buf` holds a whole head; returns its length, or `None` if the peer closed
/// before sending a byte of it.
async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buf.len() >= MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// Copies exactly `n` bytes from `from` to `to`.
async fn copy_exact<R, W>(from: &mut R, to: &mut W, n: u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    if tokio::io::copy(&mut from.take(n), to).await? < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Takes one `Content-Length` field: all of a message's must agree.
fn add_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), &'static str> {
    let n = parse_length(value).ok_or("bad Content-Length")?;
    if length.replace(n).is_some_and(|m| m != n) {
        return Err("conflicting Content-Length");
    }
    Ok(())
}

/// A `Content-Length` value: ASCII digits only, at most 19 of them.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

fn is_one_of(name: &[u8], set: &[&str]) -> bool {
    set.iter().any(|s| s.as_bytes().eq_ignore_ascii_case(name))
}
