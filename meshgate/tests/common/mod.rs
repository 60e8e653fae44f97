//! Test harness: the real `meshgate` binary as the gateway (the kit's process fixture), a
//! workload overlay node in the test process exposing loopback backends, and real clients
//! (curl, openssl, hyper, tungstenite). Backends, clients and waiting come from the test kit.
// Each test binary uses part of the harness.
#![allow(dead_code, unused_imports)]

use meshgate_gateway::upstream::overlay::EmbeddedNode;
use meshgate_overlay::NodeConfig;
pub use meshgate_testkit::http::{Served, h2c_backend, http_backend};
pub use meshgate_testkit::pattern::{pattern, pattern_chunk};
pub use meshgate_testkit::process::GatewayProcess;
pub use meshgate_testkit::tls::{TestCa, TlsBackend, tls_backend};
pub use meshgate_testkit::ws::ws_backend;
pub use meshgate_testkit::{curl::run_curl, eventually};
use std::net::SocketAddr;
use std::path::Path;

/// Starts `meshgate gateway` (this package's binary) with the kit's standard config + `body`.
pub fn start_gateway(dir: &Path, body: &str) -> GatewayProcess {
    GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_meshgate")), dir, body)
}

/// A gateway serving its listeners on a task of its own, in this test process, until
/// [`InProcess::stop`].
pub struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub fn serve(
        gateway: &meshgate_gateway::Gateway,
        bound: meshgate_gateway::listen::Bound,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = gateway.clone();
        let task = tokio::spawn(async move {
            gateway
                .serve(bound, async {
                    let _ = stopped.await;
                })
                .await
        });
        InProcess { stop, task }
    }

    /// Stops serving and waits (up to 5 s) for the listeners to close.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}

/// A workload overlay node in the test process exposing loopback services on overlay ports.
pub struct Workload {
    pub node: EmbeddedNode,
    pub link: SocketAddr,
    exposed: Vec<meshgate_sockets::Exposed>,
}

impl Workload {
    pub async fn start(dir: &Path) -> Workload {
        let node = EmbeddedNode::start_with(NodeConfig {
            key_path: dir.join("workload.key"),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let link = node.node.listen_addr().unwrap();
        Workload {
            node,
            link,
            exposed: Vec::new(),
        }
    }

    /// Exposes `local` on `overlay_port`; returns the overlay backend address.
    pub fn expose(&mut self, overlay_port: u16, local: SocketAddr) -> SocketAddr {
        let e = meshgate_sockets::expose(&self.node.stack, overlay_port, local).unwrap();
        self.exposed.push(e);
        SocketAddr::from((self.node.node.address(), overlay_port))
    }

    /// The `[overlay]` section for a gateway peering with this node.
    pub fn gateway_overlay_section(&self, dir: &Path) -> String {
        format!(
            "[overlay]\nkey_file = \"{}\"\npeers = [\"{}\"]\n",
            dir.join("gateway-node.key").display(),
            self.link
        )
    }
}
