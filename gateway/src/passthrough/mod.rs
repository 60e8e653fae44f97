//! TLS passthrough: the client's stream, ClientHello replayed first, spliced to a backend of
//! the route (optionally after a PROXY v2 header), until either side closes or it idles.

pub(crate) mod proxy_protocol;

use crate::classify::hello;
use crate::classify::read::send_alert;
use crate::io::{Activity, Tracked};
use crate::observe::log::{self, Outcome};
use crate::routes::RouteEntry;
use crate::state::Shared;
use crate::upstream::pool::ClientInfo;
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Splices `stream` (whose first bytes, `prefix`, were read while classifying) to a backend.
pub(crate) async fn splice(
    shared: &Shared,
    entry: &RouteEntry,
    mut stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
) {
    let start = Instant::now();
    let route = &entry.route;
    let client = ClientInfo::from_ip(peer.ip().to_canonical());
    let (mut b, lease) = match entry.pool.connect(&client).await {
        Ok(x) => x,
        Err(e) => {
            shared.metrics.error(route.host.as_str(), "backend_connect");
            tracing::warn!(error = %e, "no backend for passthrough stream");
            send_alert(&mut stream, hello::ALERT_INTERNAL_ERROR).await;
            return;
        }
    };
    let backend = lease.backend();
    tracing::Span::current().record("backend", tracing::field::display(backend));
    let local = stream.local_addr().unwrap_or(peer);
    if route.options.proxy_protocol {
        let header = proxy_protocol::header_v2(peer, local);
        if b.write_all(&header).await.is_err() {
            return;
        }
    }
    if b.write_all(&prefix).await.is_err() {
        return;
    }
    let activity = Activity::default();
    let mut c = Tracked::new(stream, activity.clone());
    let moved = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut b) => r.ok(),
        _ = activity.idle(shared.timeouts.idle()) => None,
        // The gateway is stopping and its drain has ended.
        _ = shared.drain.closing.cancelled() => None,
    };
    drop(lease);
    let (up, down) = moved.unwrap_or((0, 0));
    log::finished(
        &shared.metrics,
        shared.access_log,
        route.host.as_str(),
        &log::Parties {
            client: peer,
            backend: Some(backend),
        },
        start.elapsed(),
        Outcome::Stream {
            up: up + prefix.len() as u64,
            down,
        },
    );
}
