//! In a network namespace the test creates: a TUN node and a userspace node linked over the
//! namespace's loopback; `curl` on the TUN side fetches a page from an HTTP server that the
//! userspace side exposes on its overlay address.

mod common;

use meshgate_overlay::addr::{prefix_of, prefix_string};
use meshgate_overlay::{Identity, Node, NodeConfig};
use meshgate_sockets::tun::Tun;
use meshgate_sockets::{Stack, expose};
use meshgate_testkit::{eventually, listener};
use std::net::Ipv6Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_node(peers: Vec<std::net::SocketAddr>) -> Node {
    Node::start(NodeConfig {
        identity: Some(Identity::generate()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        peers,
        ..NodeConfig::default()
    })
    .await
    .unwrap()
}

async fn wait_route(node: &Node, to: Ipv6Addr) {
    let want = prefix_string(&prefix_of(&to));
    eventually(Duration::from_secs(20), &format!("a route to {to}"), || {
        node.status()
            .routes
            .iter()
            .any(|r| r.prefix == want && r.next_hop.is_some())
    })
    .await;
}

/// A minimal HTTP/1.1 server: answers every request with `page` and closes.
async fn http_server(page: &'static [u8]) -> std::net::SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    page.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.write_all(page).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[test]
fn curl_on_tun_node_fetches_page_exposed_by_userspace_node() {
    let ns = netns_or_skip!("curl");
    let ns_name = ns.name.clone();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            static PAGE: &[u8] =
                b"<html><body>hello from a workload behind the overlay</body></html>\n";
            let service = http_server(PAGE).await;

            // Workload side: userspace node exposing overlay port 8080 to the HTTP server.
            let workload = start_node(vec![]).await;
            let port = workload.take_l3_port().unwrap();
            let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
            let _exposed = expose(&stack, 8080, service).unwrap();

            // Client side: TUN node; the kernel routes 600::/7 into it.
            let client = start_node(vec![workload.listen_addr().unwrap()]).await;
            let port = client.take_l3_port().unwrap();
            let tun = Tun::start("mgcurl0", port.address, port.mtu, port.tx, port.rx).unwrap();
            wait_route(&client, workload.address()).await;
            wait_route(&workload, client.address()).await;

            let url = format!("http://[{}]:8080/index.html", workload.address());
            let out = tokio::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns_name,
                    "curl",
                    "-sS",
                    "-g",
                    "--max-time",
                    "20",
                    &url,
                ])
                .kill_on_drop(true)
                .output()
                .await
                .expect("curl runs");
            assert!(
                out.status.success(),
                "curl {url} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.stdout, PAGE);
            assert!(tun.stats().packets_to_overlay > 0);
            assert!(stack.stats().packets_in > 0);

            // A closed overlay port is refused (RST through the overlay), not left hanging.
            let refused = tokio::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns_name,
                    "curl",
                    "-sS",
                    "-g",
                    "--max-time",
                    "20",
                ])
                .arg(format!("http://[{}]:8081/", workload.address()))
                .kill_on_drop(true)
                .output()
                .await
                .unwrap();
            // curl exit code 7: could not connect (the RST arrived, no timeout).
            assert_eq!(
                refused.status.code(),
                Some(7),
                "{}",
                String::from_utf8_lossy(&refused.stderr)
            );
        });
    });
}

/// Issue 15, item 5: TUN mode lost its fast "no route" failure when the core stopped building
/// ICMPv6. The TUN endpoint now turns the node's typed event into an ICMPv6 error for the
/// kernel: `curl` to an overlay address without a route fails to connect at once (exit 7)
/// instead of retrying SYNs until its time limit (exit 28).
#[test]
fn curl_to_an_overlay_address_without_a_route_fails_at_once() {
    let ns = netns_or_skip!("noroute");
    let ns_name = ns.name.clone();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let node = start_node(vec![]).await;
            let mut port = node.take_l3_port().unwrap();
            let events = std::mem::replace(&mut port.events, tokio::sync::mpsc::channel(1).1);
            let tun = Tun::start("mgnoroute0", port.address, port.mtu, port.tx, port.rx).unwrap();
            // What `meshgate node` does with the node's events in TUN mode.
            let icmp = tun.unreachable();
            let mut events = events;
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    if let meshgate_overlay::L3Event::Unreachable {
                        dst,
                        reason: meshgate_overlay::UnreachableReason::NoRoute,
                    } = ev
                    {
                        icmp.no_route(dst);
                    }
                }
            });
            let started = std::time::Instant::now();
            let out = tokio::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns_name,
                    "curl",
                    "-sS",
                    "-g",
                    "--max-time",
                    "15",
                    "http://[600:dead:beef::1]:80/",
                ])
                .kill_on_drop(true)
                .output()
                .await
                .expect("curl runs");
            let elapsed = started.elapsed();
            assert_eq!(
                out.status.code(),
                Some(7),
                "curl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
            assert!(tun.stats().unreachable_sent >= 1);
            eventually(Duration::from_secs(2), "no_route counted", || {
                node.status().counters.no_route >= 1
            })
            .await;
        });
    });
}
