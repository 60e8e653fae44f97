//! The gateway's embedded overlay node and the dialer that opens backend streams through its
//! userspace TCP stack.

use crate::dial::{BoxStream, DialFuture, Dialer};
use anyhow::{Context, Result};
use meshgate_config::gateway::Overlay;
use meshgate_overlay::{Node, NodeConfig};
use meshgate_sockets::Stack;
use std::io;
use std::net::SocketAddr;

/// Dials `[overlay address]:port` through a userspace stack on the overlay.
#[derive(Clone)]
pub struct OverlayDialer {
    pub stack: Stack,
}

impl Dialer for OverlayDialer {
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_> {
        Box::pin(async move {
            let SocketAddr::V6(v6) = addr else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "overlay backends are IPv6 addresses",
                ));
            };
            let stream = self.stack.connect(v6).await?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}

/// A running embedded node with its userspace stack.
pub struct EmbeddedNode {
    pub node: Node,
    pub stack: Stack,
}

impl EmbeddedNode {
    /// Starts the node from `[overlay]` (peers given as `host:port` are resolved once here).
    pub async fn start(cfg: &Overlay) -> Result<Self> {
        let mut peers = Vec::new();
        for p in &cfg.peers {
            let addr = tokio::net::lookup_host(p.as_str())
                .await
                .with_context(|| format!("overlay peer `{p}`: cannot resolve"))?
                .next()
                .with_context(|| format!("overlay peer `{p}`: no address"))?;
            peers.push(addr);
        }
        let node_cfg = NodeConfig {
            key_path: cfg.key_file.clone(),
            listen: cfg.listen,
            peers,
            ..NodeConfig::default()
        };
        Self::start_with(node_cfg).await
    }

    pub async fn start_with(node_cfg: NodeConfig) -> Result<Self> {
        let node = Node::start(node_cfg)
            .await
            .context("cannot start the overlay node")?;
        let port = node.take_l3_port().context("overlay node has no L3 port")?;
        let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
        Ok(EmbeddedNode { node, stack })
    }

    pub fn dialer(&self) -> OverlayDialer {
        OverlayDialer {
            stack: self.stack.clone(),
        }
    }

    pub async fn shutdown(self) {
        self.stack.shutdown();
        self.node.shutdown().await;
    }
}
