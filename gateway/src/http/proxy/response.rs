//! Phase 5, the backend's response to the client: hop-by-hop headers removed, the body
//! streamed with the backend's slot held until it ends, and an accepted upgrade (one the
//! client offered and the route allows) turned into a tunnel between the two upgraded
//! connections; a route's `options.hsts` header on HTTPS responses.

use super::error;
use super::request::{strip_hop_by_hop, upgrade_accepted};
use crate::http::ConnInfo;
use crate::http::body::{Body, empty};
use crate::upstream::pool::Lease;
use http::header::HeaderValue;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use std::time::Duration;
use tracing::Instrument;

/// The backend's response to the client. A `101` becomes a tunnel only when the client
/// offered an upgrade the route allows and the backend switched to one of those protocols.
pub(crate) fn relay(
    mut resp: Response<Incoming>,
    client_upgrade: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
    conn: &ConnInfo,
    idle: Duration,
    lease: Lease,
    bytes_out: Counter,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some((client_upgrade, offered)) = client_upgrade else {
            return counted(error::unexpected_upgrade(), bytes_out);
        };
        if !upgrade_accepted(&offered, resp.headers().get(header::UPGRADE)) {
            tracing::warn!(
                offered = ?offered,
                answered = ?resp.headers().get(header::UPGRADE),
                "backend switched to a protocol that was not offered"
            );
            return counted(error::unexpected_upgrade(), bytes_out);
        }
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        let activity = conn.activity.clone();
        let closing = conn.closing.clone();
        let tunnel = async move {
            // The lease (the backend's in-flight slot) lives as long as the tunnel.
            let _lease = lease;
            let (c, b) = match tokio::join!(client_upgrade, backend_upgrade) {
                (Ok(c), Ok(b)) => (c, b),
                _ => return,
            };
            let mut c = TokioIo::new(c);
            let mut b = TokioIo::new(b);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut c, &mut b) => {
                    if let Ok((up, down)) = r {
                        tracing::debug!(up, down, "upgraded stream closed");
                    }
                }
                _ = activity.idle(idle) => {
                    tracing::debug!("upgraded stream idle, closing");
                }
                _ = closing.cancelled() => {
                    tracing::debug!("gateway stopping, upgraded stream closed");
                }
            }
        };
        tokio::spawn(tunnel.in_current_span());
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, empty());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::TE);
    // The lease is released when the response body ends (or the client goes away); the
    // body's bytes are counted in the same wrapper (one box per response).
    let body = body.map_frame(move |f| {
        let _ = &lease;
        if let Some(d) = f.data_ref() {
            bytes_out.inc_by(d.len() as u64);
        }
        f
    });
    Response::from_parts(parts, body.boxed())
}

/// `resp` with its body's bytes counted in `out` (the gateway's own answers).
fn counted(resp: Response<Body>, out: Counter) -> Response<Body> {
    resp.map(|b| {
        b.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                out.inc_by(d.len() as u64);
            }
            f
        })
        .boxed()
    })
}

/// Puts the route's `Strict-Transport-Security` on a response sent over HTTPS (replacing the
/// backend's, so the route's setting is what clients see); plain HTTP gets none (RFC 6797
/// §7.2: browsers ignore it there, and an active attacker could strip or forge it).
pub(crate) fn add_hsts(
    resp: &mut Response<Body>,
    options: &meshgate_config::route::RouteOptions,
    conn: &ConnInfo,
) {
    let Some(hsts) = &options.hsts else {
        return;
    };
    if conn.proto != "https" {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&hsts.header_value()) {
        resp.headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, v);
    }
}
