//! Listening: binding (dual-stack on `[::]`), accepting into each listener kind's own slots
//! ([`slots`]: a pool per kind and a cap per client), and handing each connection to its
//! layer by kind: :443 to classification ([`tls`]), :80 to HTTP, the operator's port to the
//! admin layer, the deployers' port to the reservations API. Each connection runs in a span
//! naming its client. On stop the loops end and the connections drain ([`drain`]).

pub(crate) mod drain;
mod slots;
mod tls;

use crate::admin::{self, Control};
use crate::http::{self, ConnInfo};
use crate::io::{Activity, FirstRequest, Tracked};
use crate::observe::metrics::{ListenerLabel, RefusedLabel};
use crate::state::Shared;
use anyhow::{Context, Result};
use slots::{Held, PerClient, Slots};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::TryAcquireError;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

/// Bound listening sockets.
pub struct Bound {
    pub https: Vec<TcpListener>,
    pub http: Vec<TcpListener>,
    /// The operator's listener (`[admin] listen`).
    pub admin: TcpListener,
    /// The deployers' listener (`[api] listen`), when the gateway has the reservations API.
    pub api: Option<TcpListener>,
}

impl Bound {
    /// Binds every address given.
    pub fn new(
        https: &[SocketAddr],
        http: &[SocketAddr],
        admin: SocketAddr,
        api: Option<SocketAddr>,
    ) -> Result<Bound> {
        Ok(Bound {
            https: https.iter().map(|a| bind(*a)).collect::<Result<_>>()?,
            http: http.iter().map(|a| bind(*a)).collect::<Result<_>>()?,
            admin: bind(admin)?,
            api: api.map(bind).transpose()?,
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
    /// The operator's endpoints.
    Admin,
    /// The deployers' reservations API.
    Api,
}

impl Kind {
    /// The `listener` label of its metrics.
    fn name(self) -> &'static str {
        match self {
            Kind::Tls => "https",
            Kind::Plain => "http",
            Kind::Admin => "admin",
            Kind::Api => "api",
        }
    }
}

/// Spawns an accept loop per listener into `tasks`. Each kind has slots of its own: HTTPS
/// `[limits] max_connections`, HTTP `max_http_connections`, the operator's and the deployers'
/// listeners `[admin]`/`[api] max_connections`. One client (IPv4 address, IPv6 /64) holds at
/// most `max_connections_per_ip` of the HTTPS and HTTP slots together, and its listener's
/// own cap of the operator's and the API's.
pub(crate) fn spawn_all(
    tasks: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    control: Arc<dyn Control>,
    bound: Bound,
) {
    let config = shared.config();
    let public_clients = PerClient::new(shared.limits.max_connections_per_ip);
    let https = Slots::new(shared.limits.max_connections, public_clients.clone());
    let http = Slots::new(shared.limits.max_http_connections, public_clients);
    let admin = Slots::new(
        config.admin.max_connections,
        PerClient::new(config.admin.max_connections_per_ip),
    );
    let api = Slots::new(
        config.api.max_connections,
        PerClient::new(config.api.max_connections_per_ip),
    );
    let loops = bound
        .https
        .into_iter()
        .map(|l| (l, https.clone(), Kind::Tls))
        .chain(
            bound
                .http
                .into_iter()
                .map(|l| (l, http.clone(), Kind::Plain)),
        )
        .chain(std::iter::once((bound.admin, admin, Kind::Admin)))
        .chain(bound.api.map(|l| (l, api, Kind::Api)));
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
    slots: Slots,
    kind: Kind,
) {
    let label = ListenerLabel {
        listener: kind.name(),
    };
    loop {
        let permit = match slots.total.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                shared.metrics.listener_full.get_or_create(&label).inc();
                tracing::debug!(
                    listener = kind.name(),
                    "every slot taken; new connections wait"
                );
                let Ok(p) = slots.total.clone().acquire_owned().await else {
                    return;
                };
                p
            }
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
        let accepted = Instant::now();
        let Some(client) = slots.per_client.take(peer.ip()) else {
            shared
                .metrics
                .connections_refused
                .get_or_create(&RefusedLabel {
                    listener: kind.name(),
                    reason: "per_ip_limit",
                })
                .inc();
            tracing::debug!(
                client = %peer,
                listener = kind.name(),
                "client already has its cap of open connections; closing"
            );
            // A reset, not a FIN: nothing lingers here for a client that is over its cap.
            let _ = stream.set_zero_linger();
            continue;
        };
        let held = Held::new(permit, client);
        let shared = shared.clone();
        let control = control.clone();
        let span = match kind {
            Kind::Tls => tracing::info_span!("conn", client = %peer, proto = "https"),
            Kind::Plain => tracing::info_span!("conn", client = %peer, proto = "http"),
            Kind::Admin => tracing::debug_span!("admin", client = %peer),
            Kind::Api => tracing::debug_span!("api", client = %peer),
        };
        let open = shared
            .metrics
            .listener_connections
            .get_or_create(&label)
            .clone();
        // Public connections are waited for by the drain; the operator's and the deployers'
        // simply end with the process.
        let public = match kind {
            Kind::Tls | Kind::Plain => Some(shared.drain.public.token()),
            Kind::Admin | Kind::Api => None,
        };
        let connection = async move {
            let _public = public;
            let _ = stream.set_nodelay(true);
            shared.metrics.connections.inc();
            open.inc();
            match kind {
                Kind::Tls => tls::serve(&shared, stream, peer, accepted).await,
                Kind::Plain => {
                    let _serving = shared.drain.http.token();
                    let activity = Activity::default();
                    let ci = ConnInfo {
                        client: peer,
                        proto: "http",
                        activity: activity.clone(),
                        span: tracing::Span::current(),
                        tls: None,
                        closing: shared.drain.closing.clone(),
                        client_ip: http::client::ClientIp::of(peer),
                        hosts: Default::default(),
                    };
                    let first = FirstRequest::by(accepted + shared.timeouts.header());
                    let io = Tracked::new(stream, activity);
                    http::serve(&shared, io, ci, false, first).await
                }
                Kind::Admin => admin::serve_operator(&shared, &control, stream, accepted).await,
                Kind::Api => admin::serve_api(&shared, stream, accepted).await,
            }
            open.dec();
            shared.metrics.connections.dec();
            drop(held);
        };
        tokio::spawn(connection.instrument(span));
    }
}
