//! The embedded overlay node on the admin listener: its status in `/status` and its counters
//! in `/metrics`, read from the node's latest published status at scrape time (nothing is
//! counted twice, and the packet path pays nothing).

use crate::observe::collector::encode;
use meshgate_overlay::StatusSource;
use meshgate_sockets::Stack;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use serde_json::{Value, json};

/// Reads the embedded node's status and its userspace stack's counters.
#[derive(Clone)]
pub struct OverlayObserver {
    node: StatusSource,
    stack: Stack,
}

impl std::fmt::Debug for OverlayObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OverlayObserver")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
    remote: String,
}

impl OverlayObserver {
    pub fn new(node: StatusSource, stack: Stack) -> Self {
        OverlayObserver { node, stack }
    }

    /// The node's status (address, peers, routes, counters) and the stack's counters.
    pub fn status_json(&self) -> Value {
        let mut doc = serde_json::to_value(self.node.get()).unwrap_or(Value::Null);
        doc["stack"] = stack_status(&self.stack);
        doc
    }
}

/// A userspace stack's counters as shown in status documents (gateway and `meshgate node`).
/// `socket_buffer_bytes`: the sockets' buffer pages resident now (committed as data passes,
/// given back when a connection goes quiet).
pub fn stack_status(stack: &Stack) -> Value {
    let s = stack.stats();
    json!({
        "packets_in": s.packets_in, "bytes_in": s.bytes_in,
        "packets_out": s.packets_out, "bytes_out": s.bytes_out,
        "tcp_sockets": s.sockets,
        "socket_buffer_bytes": stack.buffer_memory(),
    })
}

/// Flattens the node's counters (`routing.*` becomes `routing_*`) into (name, value) pairs.
fn counter_pairs(counters: &Value, prefix: &str, out: &mut Vec<(String, u64)>) {
    let Some(map) = counters.as_object() else {
        return;
    };
    for (k, v) in map {
        match v {
            Value::Object(_) => counter_pairs(v, &format!("{prefix}{k}_"), out),
            _ => {
                if let Some(n) = v.as_u64() {
                    out.push((format!("{prefix}{k}"), n));
                }
            }
        }
    }
}

impl Collector for OverlayObserver {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.node.get();
        let up = status.peers.iter().filter(|p| p.state == "up").count();
        encode(
            &mut encoder,
            "meshgate_overlay_peers",
            "Overlay links with a measured round trip (up)",
            &ConstGauge::new(up as i64),
        )?;
        encode(
            &mut encoder,
            "meshgate_overlay_routes",
            "Routes in the overlay node's table",
            &ConstGauge::new(status.routes.len() as i64),
        )?;
        let rtt = Family::<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for p in &status.peers {
            if let Some(us) = p.rtt_us {
                rtt.get_or_create(&PeerLabel {
                    peer: p.address.to_string(),
                    remote: p.remote.to_string(),
                })
                .set(f64::from(us) / 1e6);
            }
        }
        encode(
            &mut encoder,
            "meshgate_overlay_link_rtt_seconds",
            "Smoothed round trip per overlay link",
            &rtt,
        )?;
        let mut pairs = Vec::new();
        counter_pairs(
            &serde_json::to_value(&status.counters).unwrap_or(Value::Null),
            "",
            &mut pairs,
        );
        // Rebuilt at each scrape from the node's own totals, so they only ever grow.
        let events = Family::<EventLabel, Counter>::default();
        let bytes = Family::<EventLabel, Counter>::default();
        for (name, value) in pairs {
            let family = if name.starts_with("bytes_") {
                &bytes
            } else {
                &events
            };
            family
                .get_or_create(&EventLabel { event: name })
                .inc_by(value);
        }
        encode(
            &mut encoder,
            "meshgate_overlay_events",
            "Overlay node events: packets sent, delivered, forwarded, and each reason a packet, \
             frame or handshake was refused",
            &events,
        )?;
        encode(
            &mut encoder,
            "meshgate_overlay_bytes",
            "Overlay data bytes sent, delivered and forwarded by the node",
            &bytes,
        )?;
        let stack = self.stack.stats();
        encode(
            &mut encoder,
            "meshgate_overlay_tcp_sockets",
            "TCP sockets held by the gateway's userspace stack on the overlay",
            &ConstGauge::new(stack.sockets as i64),
        )?;
        encode(
            &mut encoder,
            "meshgate_overlay_socket_buffer_bytes",
            "Resident bytes of the userspace stack's TCP socket buffers (pages data touched and \
             not yet given back)",
            &ConstGauge::new(i64::try_from(self.stack.buffer_memory()).unwrap_or(i64::MAX)),
        )?;
        Ok(())
    }
}
