//! A minimal pingora reverse proxy: the gateway bench's reference for what another well-kept
//! Rust HTTP engine spends per proxied request beside hyper (issue 17, item 3a). TLS (rustls,
//! HTTP/1.1 and h2 by ALPN) on LISTEN; every request to BACKEND over HTTP/1.1 with pingora's
//! pooled keep-alive; nothing else (no forwarding headers, no logs), so it does less per request
//! than the gateway does.
//!
//! Not a workspace member (its dependencies would add minutes to every build); build it with
//! `cargo build --release --manifest-path bench/pingora-ref/Cargo.toml` and run the callgrind
//! mode with `BENCH_PINGORA=bench/pingora-ref/target/release/pingora-ref`.
//! Usage: `pingora-ref LISTEN BACKEND CERT KEY [THREADS]`.
use async_trait::async_trait;
use pingora::prelude::*;
use std::net::SocketAddr;

// The allocator and options the gateway runs with (meshgate/src/main.rs), so the rows differ
// in their HTTP engines, not their allocators.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 29] = b"tcache_gc_incr_bytes:1048576\0";

struct Ref {
    backend: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Ref {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("listen addr");
    let backend: SocketAddr = args.next().expect("backend").parse().unwrap();
    let cert = args.next().expect("cert");
    let key = args.next().expect("key");
    let threads: usize = args.next().map(|t| t.parse().unwrap()).unwrap_or(1);
    let mut server = Server::new(None).unwrap();
    server.bootstrap();
    let mut svc = http_proxy_service(&server.configuration, Ref { backend });
    let mut tls = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key).unwrap();
    tls.enable_h2();
    svc.add_tls_with_settings(&listen, None, tls);
    svc.threads = Some(threads);
    server.add_service(svc);
    server.run_forever();
}
