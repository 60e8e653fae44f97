//! Listening: binding (dual-stack on `[::]`), accepting, the connection limit, and handing
//! each connection to its layer by listener kind: :443 to classification ([`tls`]), :80 to
//! HTTP, the admin port to the admin layer. Each connection runs in a span naming its client.

mod tls;

use crate::admin::{self, Control};
use crate::http::{self, ConnInfo};
use crate::io::{Activity, Tracked};
use crate::state::Shared;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Admin connections open at once.
const ADMIN_CONNECTIONS: usize = 64;

/// Bound listening sockets.
pub struct Bound {
    pub https: Vec<TcpListener>,
    pub http: Vec<TcpListener>,
    pub admin: TcpListener,
}

impl Bound {
    /// Binds every address given.
    pub fn new(https: &[SocketAddr], http: &[SocketAddr], admin: SocketAddr) -> Result<Bound> {
        Ok(Bound {
            https: https.iter().map(|a| bind(*a)).collect::<Result<_>>()?,
            http: http.iter().map(|a| bind(*a)).collect::<Result<_>>()?,
            admin: bind(admin)?,
        })
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

#[derive(Clone, Copy)]
enum Kind {
    Tls,
    Plain,
    Admin,
}

/// Spawns an accept loop per listener into `tasks`. Client connections on :443 and :80 share
/// `[limits] max_connections`; the admin listener has its own small limit.
pub(crate) fn spawn_all(
    tasks: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    control: Arc<dyn Control>,
    bound: Bound,
) {
    let slots = Arc::new(Semaphore::new(shared.limits.max_connections));
    let loops = bound
        .https
        .into_iter()
        .map(|l| (l, slots.clone(), Kind::Tls))
        .chain(
            bound
                .http
                .into_iter()
                .map(|l| (l, slots.clone(), Kind::Plain)),
        )
        .chain(std::iter::once((
            bound.admin,
            Arc::new(Semaphore::new(ADMIN_CONNECTIONS)),
            Kind::Admin,
        )));
    for (listener, slots, kind) in loops {
        tasks.spawn(accept_loop(
            shared.clone(),
            control.clone(),
            listener,
            slots,
            kind,
        ));
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    control: Arc<dyn Control>,
    listener: TcpListener,
    slots: Arc<Semaphore>,
    kind: Kind,
) {
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of file descriptors and the like: give the system a moment.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let control = control.clone();
        let span = match kind {
            Kind::Tls => tracing::info_span!("conn", client = %peer, proto = "https"),
            Kind::Plain => tracing::info_span!("conn", client = %peer, proto = "http"),
            Kind::Admin => tracing::debug_span!("admin", client = %peer),
        };
        let connection = async move {
            let _ = stream.set_nodelay(true);
            shared.metrics.connections.inc();
            match kind {
                Kind::Tls => tls::serve(&shared, stream, peer).await,
                Kind::Plain => {
                    let activity = Activity::default();
                    let ci = ConnInfo {
                        client: peer,
                        proto: "http",
                        activity: activity.clone(),
                        span: tracing::Span::current(),
                        tls: None,
                    };
                    http::serve(&shared, Tracked::new(stream, activity), ci, false).await
                }
                Kind::Admin => admin::serve(&shared, &control, stream).await,
            }
            shared.metrics.connections.dec();
            drop(permit);
        };
        tokio::spawn(connection.instrument(span));
    }
}
