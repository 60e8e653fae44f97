//! Active health probes: one tokio task per backend sends a probe every interval through the
//! pool's `Dialer` (so over the overlay for overlay backends) and feeds the result to the
//! backend's health state machine.

use super::{ActiveHealthConfig, ProbeKind};
use super::{HealthEvent, Shared};
use crate::upstream::dial::Dialer;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_config::route::BackendProtocol;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

pub(super) fn spawn_all(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    if shared.cfg.active.kind == ProbeKind::None {
        return Vec::new();
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(route = %shared.route, "no async runtime: active health checks not started");
        return Vec::new();
    };
    let n = shared.backends.len().max(1) as u32;
    let interval = Duration::from_millis(shared.cfg.active.interval_ms.max(1));
    (0..shared.backends.len())
        .map(|index| {
            // Spread the backends' probes over the interval.
            let offset = interval / n * index as u32;
            runtime.spawn(probe_loop(Arc::downgrade(shared), index, offset))
        })
        .collect()
}

async fn probe_loop(shared: Weak<Shared>, index: usize, offset: Duration) {
    let Some((cfg, dialer, addr, protocol)) = shared.upgrade().and_then(|s| {
        let addr = s.backends.get(index)?.addr;
        Some((s.cfg.active.clone(), s.dialer.clone(), addr, s.protocol))
    }) else {
        return;
    };
    let interval = Duration::from_millis(cfg.interval_ms.max(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ok = probe_once(dialer.as_ref(), addr, &cfg, protocol).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let event = if ok {
            HealthEvent::ProbeOk
        } else {
            HealthEvent::ProbeFailed
        };
        let now = Instant::now();
        let transition = {
            let mut state = shared.lock();
            let Some(s) = state.backends.get_mut(index) else {
                return;
            };
            s.health.on_event(event, now)
        };
        shared.log_transition(index, transition);
    }
}

/// One probe within `timeout_ms`: a TCP connect, or a GET whose status must be in the
/// expected range, over HTTP/1.1 or h2c (prior knowledge) as the backends speak.
pub(super) async fn probe_once(
    dialer: &dyn Dialer,
    addr: SocketAddr,
    cfg: &ActiveHealthConfig,
    protocol: BackendProtocol,
) -> bool {
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let result = tokio::time::timeout(timeout, async {
        let stream = dialer.dial(addr).await.ok()?;
        match cfg.kind {
            ProbeKind::None | ProbeKind::Tcp => Some(true),
            ProbeKind::Http => http_probe(stream, addr, cfg, protocol).await,
        }
    })
    .await;
    matches!(result, Ok(Some(true)))
}

async fn http_probe(
    stream: crate::upstream::dial::BoxStream,
    addr: SocketAddr,
    cfg: &ActiveHealthConfig,
    protocol: BackendProtocol,
) -> Option<bool> {
    let io = TokioIo::new(stream);
    let host = cfg.host.clone().unwrap_or_else(|| addr.to_string());
    let request = http::Request::get(cfg.path.as_str())
        .header(http::header::USER_AGENT, "meshgate-health-check");
    let (response, driver) = match protocol {
        BackendProtocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
                .await
                .ok()?;
            let driver = tokio::spawn(conn);
            let request = request
                .header(http::header::HOST, host)
                .header(http::header::CONNECTION, "close")
                .body(Empty::new())
                .ok()?;
            (sender.send_request(request).await, driver)
        }
        BackendProtocol::H2c => {
            let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
                TokioExecutor::new(),
                io,
            )
            .await
            .ok()?;
            let driver = tokio::spawn(conn);
            // h2 carries the host as `:authority`, taken from an absolute URI.
            let uri = format!("http://{host}{}", cfg.path)
                .parse::<http::Uri>()
                .ok()?;
            let request = request.uri(uri).body(Empty::new()).ok()?;
            (sender.send_request(request).await, driver)
        }
    };
    driver.abort();
    let status = response.ok()?.status().as_u16();
    Some((cfg.expect_status_min..=cfg.expect_status_max).contains(&status))
}
