//! `meshgate node`: a standalone overlay node (TUN or userspace), and `meshgate node status`.
//!
//! The node serves its status as JSON on `GET /status` at `status_listen` (loopback only):
//! `{ "mode", "node": { address, public_key, mtu, listen, peers, routes, counters },
//!    "endpoint": { packets/bytes in and out }, "expose": [{ port, to }] }`.

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshgate::app::node::{self, RunningNode};
use meshgate::app::process;
use meshgate_config::node::NodeFileConfig;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    /// The node's configuration file (node.toml).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum NodeCommand {
    /// Show a running node's address, peers, routes and traffic counters.
    Status {
        /// The node's status endpoint (`status_listen` in node.toml).
        #[arg(long, default_value = "127.0.0.1:9652")]
        status: SocketAddr,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    match (args.command, args.config) {
        (Some(NodeCommand::Status { status, json }), _) => {
            let doc = fetch_status(status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", render_status(&doc));
            }
            Ok(())
        }
        (None, Some(path)) => {
            let cfg = NodeFileConfig::load(&path)?;
            let running = RunningNode::start(&cfg).await?;
            eprintln!(
                "meshgate node: address {} ({} mode), links on {}, status on http://{}/status",
                running.node.address(),
                node::mode_name(cfg.mode),
                running
                    .node
                    .listen_addr()
                    .map_or("outbound only".to_string(), |a| a.to_string()),
                running.status_addr,
            );
            reload_consent_on_sighup(path, running.consent())?;
            running.run_until(process::shutdown_signal()).await;
            Ok(())
        }
        (None, None) => anyhow::bail!("`meshgate node` needs --config node.toml (or `status`)"),
    }
}

/// On SIGHUP, re-reads `node.toml` and applies its `[consent] allow` list (the rest of the
/// file needs a restart). A file that does not parse is refused and the list kept.
fn reload_consent_on_sighup(path: PathBuf, consent: node::ConsentHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match NodeFileConfig::load(&path) {
                Ok(cfg) => {
                    tracing::info!(
                        grants = cfg.consent.allow.len(),
                        "consent reloaded on SIGHUP"
                    );
                    consent.set(cfg.consent.allow);
                }
                Err(e) => tracing::error!("consent reload refused, previous list kept: {e}"),
            }
        }
    });
    Ok(())
}

/// `GET /status` from a running node.
pub async fn fetch_status(addr: SocketAddr) -> anyhow::Result<Value> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("no node status endpoint at {addr} (is the node running?)"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/status")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let code = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            code.is_success(),
            "status endpoint at {addr} answered {code}"
        );
        serde_json::from_slice::<Value>(&body)
            .with_context(|| format!("status endpoint at {addr} sent invalid JSON"))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .with_context(|| format!("status endpoint at {addr} did not answer in 10 s"))?
}

/// Human-readable status.
pub fn render_status(doc: &Value) -> String {
    use std::fmt::Write as _;
    let n = &doc["node"];
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "address     {}", s(&n["address"]));
    let _ = writeln!(out, "public key  {}", s(&n["public_key"]));
    let _ = writeln!(out, "mode        {}", s(&doc["mode"]));
    let _ = writeln!(out, "links on    {}", s(&n["listen"]));
    let _ = writeln!(out, "mtu         {}", s(&n["mtu"]));
    let empty = Vec::new();
    let peers = n["peers"].as_array().unwrap_or(&empty);
    let _ = writeln!(out, "peers ({}):", peers.len());
    for p in peers {
        let rtt = p["rtt_us"].as_u64().map_or("-".to_string(), |us| {
            format!("{:.2} ms", us as f64 / 1000.0)
        });
        let _ = writeln!(
            out,
            "  {:<22} {:<40} rtt {:<10} cost {:<6} {} {}",
            s(&p["remote"]),
            s(&p["address"]),
            rtt,
            s(&p["cost"]),
            s(&p["state"]),
            if p["outbound"].as_bool() == Some(true) {
                "out"
            } else {
                "in"
            },
        );
    }
    let routes = n["routes"].as_array().unwrap_or(&empty);
    let _ = writeln!(out, "routes ({}):", routes.len());
    for r in routes {
        let _ = writeln!(
            out,
            "  {:<28} via {:<6} metric {:<6} seqno {}",
            s(&r["prefix"]),
            s(&r["next_hop"]),
            s(&r["metric"]),
            s(&r["seqno"]),
        );
    }
    let c = &n["counters"];
    let _ = writeln!(
        out,
        "traffic: sent {} packets / {} bytes, delivered {} / {}, forwarded {} / {}, no route {}",
        s(&c["packets_sent"]),
        s(&c["bytes_sent"]),
        s(&c["packets_delivered"]),
        s(&c["bytes_delivered"]),
        s(&c["packets_forwarded"]),
        s(&c["bytes_forwarded"]),
        s(&c["no_route"]),
    );
    let e = &doc["endpoint"];
    let _ = writeln!(
        out,
        "endpoint: in {} packets / {} bytes, out {} / {}",
        s(&e["packets_in"]),
        s(&e["bytes_in"]),
        s(&e["packets_out"]),
        s(&e["bytes_out"]),
    );
    if let Some(ex) = doc["expose"].as_array() {
        for x in ex {
            let _ = writeln!(
                out,
                "expose: overlay port {} -> {}",
                s(&x["port"]),
                s(&x["to"])
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_overlay::addr::{prefix_of, prefix_string};
    use meshgate_overlay::{Identity, Node, NodeConfig};
    use meshgate_sockets::Stack;
    use std::net::SocketAddrV6;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `meshgate node` from a node.toml: exposes an overlay port to a local service, and its
    /// status endpoint shows the peer, the route and the traffic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_toml_exposes_service_and_reports_status() {
        // The local service: echoes one line, uppercased.
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service_addr = service.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = service.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf).await;
                    let _ = s.write_all(&buf.to_ascii_uppercase()).await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "key = \"{}\"\nlisten = \"127.0.0.1:0\"\nstatus_listen = \"127.0.0.1:0\"\n\
                 dead_peer_timeout_ms = 2000\nsocket_buffer_kib = 128\n\
                 expose = [{{ port = 8080, to = \"{service_addr}\" }}]\n",
                dir.path().join("node.key").display()
            ),
        )
        .unwrap();
        let cfg = NodeFileConfig::load(&path).unwrap();
        let running = RunningNode::start(&cfg).await.unwrap();
        let workload = running.node.address();

        // A client node with its own userspace stack, linked to the workload node.
        let client = Node::start(NodeConfig {
            identity: Some(Identity::generate()),
            peers: vec![running.node.listen_addr().unwrap()],
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let port = client.take_l3_port().unwrap();
        let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
        let want = prefix_string(&prefix_of(&workload));
        meshgate_testkit::eventually(
            Duration::from_secs(20),
            "a route to the workload node",
            || client.status().routes.iter().any(|r| r.prefix == want),
        )
        .await;
        let mut s = stack
            .connect(SocketAddrV6::new(workload, 8080, 0, 0))
            .await
            .unwrap();
        s.write_all(b"through the overlay").await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"THROUGH THE OVERLAY");

        let doc = fetch_status(running.status_addr).await.unwrap();
        assert_eq!(doc["mode"], "userspace");
        assert_eq!(doc["node"]["address"], workload.to_string());
        assert_eq!(doc["node"]["peers"].as_array().unwrap().len(), 1);
        assert!(doc["endpoint"]["packets_in"].as_u64().unwrap() > 0);
        assert_eq!(doc["expose"][0]["port"], 8080);
        let text = render_status(&doc);
        assert!(text.contains("peers (1):"), "{text}");
        assert!(text.contains(&workload.to_string()), "{text}");

        let status_addr = running.status_addr;
        running.run_until(async {}).await;
        // Stopped: the status endpoint is gone.
        assert!(fetch_status(status_addr).await.is_err());
        client.shutdown().await;
    }

    /// Issue 15, item 7: `meshgate node` refused `peers = ["localhost:9651"]` ("invalid socket
    /// address syntax"). A peer given by host name links up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_toml_peer_given_by_host_name_links_up() {
        let peer = Node::start(NodeConfig {
            identity: Some(Identity::generate()),
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "key = \"{}\"\nstatus_listen = \"127.0.0.1:0\"\npeers = [\"localhost:{}\"]\n",
                dir.path().join("node.key").display(),
                peer.listen_addr().unwrap().port()
            ),
        )
        .unwrap();
        let cfg = NodeFileConfig::load(&path).unwrap();
        let running = RunningNode::start(&cfg).await.unwrap();
        let want = prefix_string(&prefix_of(&running.node.address()));
        meshgate_testkit::eventually(
            Duration::from_secs(20),
            "a route from the peer to the node that named it",
            || peer.status().routes.iter().any(|r| r.prefix == want),
        )
        .await;
        let doc = fetch_status(running.status_addr).await.unwrap();
        assert_eq!(doc["node"]["peers"].as_array().unwrap().len(), 1);
        running.run_until(async {}).await;
        peer.shutdown().await;
    }
}
