//! A client connection on :443: read the ClientHello, let [`crate::classify::decide`] choose,
//! and carry the decision out: splice, terminate TLS and serve HTTP, answer a TLS-ALPN-01
//! validation, or refuse with an alert.

use crate::classify::read::{self, ReadError, send_alert};
use crate::classify::{self, Decision, hello};
use crate::http::{self, ConnInfo};
use crate::io::{Activity, FirstRequest, Rewind, Tracked};
use crate::passthrough;
use crate::routes::RouteEntry;
use crate::state::Shared;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

pub(super) async fn serve(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
) {
    let deadline = accepted + shared.timeouts.handshake();
    let max = shared.limits.max_client_hello_bytes;
    let (hello, prefix) = match read::client_hello(&mut stream, max, deadline).await {
        Ok(x) => x,
        Err(ReadError::NotTls) => {
            shared.metrics.error("unknown", "not_tls");
            tracing::debug!("not a TLS client, closing");
            return;
        }
        Err(ReadError::Bad(e)) => {
            shared.metrics.error("unknown", "bad_client_hello");
            tracing::info!(error = %e, "bad ClientHello, closing");
            send_alert(&mut stream, hello::ALERT_DECODE_ERROR).await;
            return;
        }
        Err(ReadError::Timeout) => {
            shared.metrics.error("unknown", "handshake_timeout");
            tracing::info!("ClientHello not received in time, closing");
            return;
        }
        Err(ReadError::Closed) => return,
    };
    match classify::decide(&hello, &shared.routes()) {
        Decision::Reject(why) => {
            shared.metrics.error("unknown", why.kind());
            if let Some(sni) = &hello.sni {
                tracing::info!(sni = %sni, "unknown server name");
            }
            send_alert(&mut stream, why.alert()).await;
        }
        Decision::AcmeTlsAlpn(name) => {
            answer_tls_alpn01(shared, stream, prefix, &name, deadline).await
        }
        Decision::Passthrough(entry) => {
            let span = tracing::info_span!(
                "stream",
                route = %entry.route.host,
                backend = tracing::field::Empty
            );
            passthrough::splice(shared, &entry, stream, prefix, peer)
                .instrument(span)
                .await
        }
        Decision::Terminate(entry) => {
            let first = FirstRequest::by(accepted + shared.timeouts.header());
            terminate(shared, &entry, stream, prefix, peer, deadline, first).await
        }
    }
}

/// Completes the TLS handshake (bounded by the ClientHello's deadline) and serves HTTP (the
/// first request head due by `first`).
async fn terminate(
    shared: &Arc<Shared>,
    entry: &RouteEntry,
    stream: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    deadline: Instant,
    first: FirstRequest,
) {
    let _serving = shared.drain.http.token();
    let activity = Activity::default();
    let io = Tracked::new(Rewind::new(prefix, stream), activity.clone());
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            shared
                .metrics
                .error(entry.route.host.as_str(), "tls_handshake");
            tracing::info!(route = %entry.route.host, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared
                .metrics
                .error(entry.route.host.as_str(), "handshake_timeout");
            return;
        }
    };
    shared.metrics.handshakes.inc();
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let ci = ConnInfo {
        client: peer,
        proto: "https",
        activity,
        span: tracing::Span::current(),
        tls: http::TlsNames::of(shared, tls.get_ref().1),
        closing: shared.drain.closing.clone(),
        client_ip: http::client::ClientIp::of(peer),
        hosts: Default::default(),
    };
    http::serve(shared, tls, ci, h2, first).await;
}

async fn answer_tls_alpn01(
    shared: &Shared,
    mut stream: TcpStream,
    prefix: Bytes,
    name: &str,
    deadline: Instant,
) {
    let cert = shared
        .certs
        .as_ref()
        .and_then(|c| c.challenges().tls_alpn01_cert(name));
    let Some(cert) = cert else {
        send_alert(&mut stream, hello::ALERT_UNRECOGNIZED_NAME).await;
        return;
    };
    let Ok(config) = crate::tls::acme_tls_alpn_config(cert) else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    if let Ok(Ok(mut tls)) =
        tokio::time::timeout_at(deadline, acceptor.accept(Rewind::new(prefix, stream))).await
    {
        let _ = tls.shutdown().await;
    }
}
