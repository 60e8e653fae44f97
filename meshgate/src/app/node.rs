//! A standalone overlay node from `node.toml`: the node, its endpoint (userspace stack with
//! exposed ports, or a TUN device), its consent endpoint on the overlay (see
//! [`super::consent`]) and its JSON status server on `status_listen`.
//!
//! `GET /status` answers `{ "mode", "node": { address, public_key, mtu, listen, peers, routes,
//! counters }, "endpoint": { packets/bytes in and out }, "expose": [{ port, to }],
//! "consent": { allow, answered, cut } }`.

use super::consent::{ConsentServer, serve_on_listener, serve_on_stack};
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshgate_config::node::{CONSENT_PORT, ConsentGrant, NodeFileConfig, NodeMode};
use meshgate_overlay::{L3Event, Node, NodeConfig, UnreachableReason};
use meshgate_sockets::tun::Tun;
use meshgate_sockets::{Exposed, Stack, StackConfig, expose};
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

pub fn mode_name(m: NodeMode) -> &'static str {
    match m {
        NodeMode::Userspace => "userspace",
        NodeMode::Tun => "tun",
    }
}

/// How the node's L3 port is used.
enum Endpoint {
    Userspace {
        stack: Stack,
        _exposed: Vec<Exposed>,
    },
    Tun(Tun),
}

impl Endpoint {
    fn status(&self) -> Value {
        match self {
            Endpoint::Userspace { stack, .. } => {
                meshgate_gateway::admin::overlay::stack_status(stack)
            }
            Endpoint::Tun(t) => {
                let s = t.stats();
                json!({
                    "interface": t.name(),
                    "packets_in": s.packets_from_overlay, "bytes_in": s.bytes_from_overlay,
                    "packets_out": s.packets_to_overlay, "bytes_out": s.bytes_to_overlay,
                    "packets_filtered": s.packets_filtered,
                })
            }
        }
    }
}

/// A node started from `node.toml`: overlay node, endpoint, status server.
pub struct RunningNode {
    pub node: Arc<Node>,
    endpoint: Arc<Endpoint>,
    pub status_addr: SocketAddr,
    status_task: tokio::task::JoinHandle<()>,
    consent: Arc<watch::Sender<Arc<Vec<ConsentGrant>>>>,
    _consent_server: Option<ConsentServer>,
}

/// Userspace-stack tuning from `node.toml`.
fn stack_config(cfg: &NodeFileConfig) -> StackConfig {
    StackConfig {
        socket_buffer: cfg.socket_buffer(),
        ..StackConfig::default()
    }
}

impl RunningNode {
    pub async fn start(cfg: &NodeFileConfig) -> anyhow::Result<RunningNode> {
        let dead = cfg.dead_peer_timeout();
        let node = Node::start(NodeConfig {
            key_path: cfg.key.clone(),
            listen: cfg.listen,
            named_peers: cfg.peers.clone(),
            dead_peer_timeout: dead,
            hello_interval: dead / 5,
            limits: meshgate_gateway::upstream::overlay::overlay_limits(&cfg.limits),
            discovery: meshgate_gateway::upstream::overlay::overlay_discovery(&cfg.discovery),
            ..NodeConfig::default()
        })
        .await
        .context("cannot start the overlay node")?;
        let node = Arc::new(node);
        let port = node
            .take_l3_port()
            .context("the overlay node has no L3 port")?;
        let events = port.events;
        let endpoint = match cfg.mode {
            NodeMode::Userspace => {
                let stack =
                    Stack::with_config(port.address, port.mtu, port.tx, port.rx, stack_config(cfg));
                let s = stack.clone();
                forward_no_route(events, move |dst| {
                    s.destination_unreachable(dst);
                });
                let mut exposed = Vec::new();
                for e in &cfg.expose {
                    exposed.push(
                        expose(&stack, e.port, e.to)
                            .with_context(|| format!("cannot expose overlay port {}", e.port))?,
                    );
                }
                Endpoint::Userspace {
                    stack,
                    _exposed: exposed,
                }
            }
            NodeMode::Tun => {
                let tun = Tun::start(&cfg.tun_name, port.address, port.mtu, port.tx, port.rx)?;
                let icmp = tun.unreachable();
                forward_no_route(events, move |dst| {
                    icmp.no_route(dst);
                });
                Endpoint::Tun(tun)
            }
        };
        let (consent, allow) = watch::channel(Arc::new(cfg.consent.allow.clone()));
        let max = cfg.consent.max_connections;
        let consent_server = match &endpoint {
            Endpoint::Userspace { stack, .. } => Some(
                serve_on_stack(stack, allow, max)
                    .context("cannot listen on the overlay consent port")?,
            ),
            // The TUN interface carries the overlay address, so a kernel socket can bind it.
            Endpoint::Tun(_) => {
                let at = SocketAddr::from((node.address(), CONSENT_PORT));
                match tokio::net::TcpListener::bind(at).await {
                    Ok(l) => Some(serve_on_listener(l, node.address(), allow, max)),
                    Err(e) => {
                        tracing::warn!(%at, "no consent endpoint, gateways will not serve this node: {e}");
                        None
                    }
                }
            }
        };
        let consent_status: StatusFn = {
            let allow = consent.subscribe();
            let stats = consent_server.as_ref().map(|c| c.stats.clone());
            Arc::new(move || {
                let n = |f: fn(&super::consent::ConsentStats) -> u64| stats.as_deref().map(f);
                json!({
                    "allow": allow.borrow().as_ref(),
                    "answered": n(|s| s.answered.load(std::sync::atomic::Ordering::Relaxed)),
                    "cut": n(|s| s.cut.load(std::sync::atomic::Ordering::Relaxed)),
                })
            })
        };
        let endpoint = Arc::new(endpoint);
        let listener = tokio::net::TcpListener::bind(cfg.status_listen)
            .await
            .with_context(|| format!("cannot bind the status endpoint {}", cfg.status_listen))?;
        let status_addr = listener.local_addr()?;
        let extra = json!({
            "mode": mode_name(cfg.mode),
            "expose": cfg.expose.iter().map(|e| json!({"port": e.port, "to": e.to})).collect::<Vec<_>>(),
        });
        let status_task = tokio::spawn(serve_status(
            listener,
            node_status_fn(&node),
            consent_status,
            endpoint.clone(),
            extra,
        ));
        Ok(RunningNode {
            node,
            endpoint,
            status_addr,
            status_task,
            consent: Arc::new(consent),
            _consent_server: consent_server,
        })
    }

    /// What replaces the node's consent list (`[consent] allow`, re-read on SIGHUP) while it
    /// runs. Gateways see a change at their next consent round.
    pub fn consent(&self) -> ConsentHandle {
        ConsentHandle(self.consent.clone())
    }

    /// Runs until `stop` completes, then shuts everything down.
    pub async fn run_until(self, stop: impl Future<Output = ()>) {
        stop.await;
        self.status_task.abort();
        if let Endpoint::Userspace { stack, .. } = &*self.endpoint {
            stack.shutdown();
        }
        // Dropping the endpoint (last reference) closes the TUN interface.
        drop(self.endpoint);
        match Arc::try_unwrap(self.node) {
            Ok(node) => node.shutdown().await,
            // A status request still holds it: dropping cancels the node's tasks as well.
            Err(node) => drop(node),
        }
    }
}

/// Hands the node's own "no route" events to the endpoint (the userspace stack fails pending
/// connects to the destination; a TUN endpoint gives the kernel an ICMPv6 error), so a connect
/// to a destination without a route fails at once instead of timing out. A relay's report is
/// an unauthenticated claim and is not acted on (routing withdraws a really lost destination
/// here too). The task ends with the node.
fn forward_no_route(
    mut events: tokio::sync::mpsc::Receiver<L3Event>,
    on_no_route: impl Fn(std::net::Ipv6Addr) + Send + 'static,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let L3Event::Unreachable {
                dst,
                reason: UnreachableReason::NoRoute,
            } = ev
            {
                on_no_route(dst);
            }
        }
    });
}

/// Replaces a running node's consent list.
#[derive(Clone)]
pub struct ConsentHandle(Arc<watch::Sender<Arc<Vec<ConsentGrant>>>>);

impl ConsentHandle {
    pub fn set(&self, allow: Vec<ConsentGrant>) {
        self.0.send_replace(Arc::new(allow));
    }
}

type StatusFn = Arc<dyn Fn() -> Value + Send + Sync>;

fn node_status_fn(node: &Arc<Node>) -> StatusFn {
    let node = node.clone();
    Arc::new(move || serde_json::to_value(node.status()).unwrap_or(Value::Null))
}

async fn serve_status(
    listener: tokio::net::TcpListener,
    status: StatusFn,
    consent: StatusFn,
    endpoint: Arc<Endpoint>,
    extra: Value,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let consent = consent.clone();
        let endpoint = endpoint.clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut doc = extra.clone();
                doc["node"] = status();
                doc["endpoint"] = endpoint.status();
                doc["consent"] = consent();
                let (code, body) = if req.uri().path() == "/status" {
                    (200, serde_json::to_vec_pretty(&doc).unwrap_or_default())
                } else {
                    (404, b"try GET /status\n".to_vec())
                };
                async move {
                    hyper::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_buffer_kib_reaches_the_stack_config() {
        let parse =
            |text: &str| NodeFileConfig::parse(std::path::Path::new("node.toml"), text).unwrap();
        assert_eq!(
            stack_config(&parse("socket_buffer_kib = 1024\n")).socket_buffer,
            1024 * 1024
        );
        // Absent: the stack's own default, which the config crate's constant mirrors.
        assert_eq!(
            stack_config(&parse("")).socket_buffer,
            StackConfig::default().socket_buffer
        );
        assert_eq!(
            meshgate_config::node::DEFAULT_SOCKET_BUFFER_KIB * 1024,
            StackConfig::default().socket_buffer as u64
        );
    }
}
