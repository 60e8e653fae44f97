//! Benchmark `sockets`: TCP over the overlay (userspace stack and TUN) beside plain loopback
//! TCP, measured in one run. Writes section `sockets` of docs/benchmarks.md.
//!
//! Run as root to include the TUN rows: the benchmark re-executes itself inside a network
//! namespace it creates (so the TUN interface and its `600::/7` route never touch the host),
//! and everything, the loopback reference included, is measured inside that namespace.
//!
//! `cargo run --release -p meshgate-bench --bin sockets`
//!
//! `... --bin sockets -- idle`, `-- many`, `-- single` or `-- tun` measures only the
//! idle-connections row, the 1000-stream aggregate, the single-stream rows without TUN, or the
//! 1-hop TUN row, and prints it without touching docs/benchmarks.md.

use meshgate_overlay::addr::{prefix_of, prefix_string};
use meshgate_overlay::{Identity, Node, NodeConfig};
use meshgate_sockets::tun::Tun;
use meshgate_sockets::{Stack, StackConfig};
use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

// The nodes run in this process; they use the allocator the `meshgate` binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 3;
/// Each single-stream run sends this much or stops after `RUN_TIME`.
const STREAM_BYTES: u64 = 1 << 30;
const RUN_TIME: Duration = Duration::from_secs(4);
const MANY_STREAMS: usize = 1000;
const MANY_BYTES: usize = 1 << 20;
const PINGS: usize = 2000;
/// Idle established connections held open beside the ping-pong stream (a gateway's pool).
const IDLE_CONNECTIONS: usize = 1000;

type BoxIo = Pin<Box<dyn AsyncRw>>;
trait AsyncRw: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncRw for T {}

fn main() -> anyhow::Result<()> {
    if meshgate_bench::can_enter_netns() {
        return meshgate_bench::enter_netns();
    }
    let with_tun = meshgate_bench::in_netns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A partial run prints its rows only: the report is written by full runs.
    match std::env::args().nth(1).as_deref() {
        Some("idle") => {
            println!("{}", rt.block_on(idle_section())?);
            return Ok(());
        }
        Some("many") => {
            println!("{}", rt.block_on(many_section())?);
            return Ok(());
        }
        Some("single") => {
            println!("{}", rt.block_on(single_section())?);
            return Ok(());
        }
        Some("tun") if with_tun => {
            println!("{}", rt.block_on(tun_section())?);
            return Ok(());
        }
        Some(other) => {
            anyhow::bail!(
                "unknown part {other:?} (idle, many, single, tun as root, or none for all)"
            )
        }
        None => {}
    }
    let mut md = rt.block_on(bench(with_tun))?;
    drop(rt);
    // The same 1-hop stream with everything (both stacks, both nodes, the application) on
    // one thread: what the second core buys.
    let one_core = std::thread::spawn(|| -> anyhow::Result<f64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let p = userspace_path(1, StackConfig::default()).await?;
            Ok(median_of(|| stream_once(&p)).await)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("one-core run panicked"))??;
    md.push_str(&format!(
        "\n### Cores\n\nOne stream over one hop with the whole process (both stacks, both \
         nodes, the application) on one thread: {one_core:.2} Gbit/s; compare the two-worker \
         1-hop row above. Each stack runs one poll task and the application copies into and \
         out of smoltcp's buffers on its own tasks, so work already spreads over both cores; \
         polling the stack's shards from several tasks was not built because the stack alone \
         (in-memory wire row) runs several times faster than the overlay path: the limit is \
         the overlay's per-packet work (end-to-end AEAD at both ends, link framing and task hand-offs at every node).\n"
    ));
    println!("{md}");
    meshgate_bench::write_section("sockets", &md)?;
    Ok(())
}

async fn start_node(peers: Vec<SocketAddr>) -> anyhow::Result<Node> {
    Ok(Node::start(NodeConfig {
        identity: Some(Identity::generate()),
        listen: Some("127.0.0.1:0".parse()?),
        peers,
        ..NodeConfig::default()
    })
    .await?)
}

async fn chain(n: usize) -> anyhow::Result<Vec<Node>> {
    let mut nodes: Vec<Node> = Vec::new();
    for _ in 0..n {
        let peers = nodes
            .last()
            .and_then(|p| p.listen_addr())
            .map(|a| vec![a])
            .unwrap_or_default();
        nodes.push(start_node(peers).await?);
    }
    for (a, b) in [(0, n - 1), (n - 1, 0)] {
        wait_route(&nodes[a], nodes[b].address()).await?;
    }
    Ok(nodes)
}

async fn wait_route(node: &Node, to: Ipv6Addr) -> anyhow::Result<()> {
    let want = prefix_string(&prefix_of(&to));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node
        .status()
        .routes
        .iter()
        .any(|r| r.prefix == want && r.next_hop.is_some())
    {
        anyhow::ensure!(Instant::now() < deadline, "no route to {to}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn stack_on(node: &Node, config: StackConfig) -> Stack {
    let port = node.take_l3_port().expect("fresh node has its L3 port");
    Stack::with_config(port.address, port.mtu, port.tx, port.rx, config)
}

/// A way to open client streams to a server that runs `serve` on each accepted stream.
struct Path {
    label: String,
    connect: Box<dyn Fn() -> Pin<Box<dyn Future<Output = BoxIo> + Send>> + Send + Sync>,
    _keep: Vec<Box<dyn Send>>,
}

/// Server side: for each stream, echo single bytes (ping) or sink bulk data, chosen by the
/// first byte the client sends.
async fn serve(mut s: BoxIo) {
    let mut kind = [0u8; 1];
    if s.read_exact(&mut kind).await.is_err() {
        return;
    }
    if kind[0] == b'p' {
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).await.is_ok() {
            if s.write_all(&b).await.is_err() {
                return;
            }
        }
    } else {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = s.write_all(&total.to_le_bytes()).await;
        let _ = s.shutdown().await;
    }
}

async fn loopback_path() -> anyhow::Result<Path> {
    // A backlog that takes all concurrent streams' SYNs at once, like the overlay listener.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let l = socket.listen(4096)?;
    let addr = l.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(Box::pin(s)));
        }
    });
    Ok(Path {
        label: "loopback TCP (kernel)".into(),
        connect: Box::new(move || {
            Box::pin(async move {
                let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let _ = s.set_nodelay(true);
                Box::pin(s) as BoxIo
            })
        }),
        _keep: vec![Box::new(AbortOnDrop(server))],
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Userspace stack ↔ userspace stack over `hops` overlay links.
async fn userspace_path(hops: usize, config: StackConfig) -> anyhow::Result<Path> {
    let nodes = chain(hops + 1).await?;
    let client = stack_on(&nodes[0], config.clone());
    let server = stack_on(&nodes[hops], config);
    let listener = server.listen(9000)?;
    let target = SocketAddrV6::new(server.address(), 9000, 0, 0);
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(Box::pin(s)));
        }
    });
    Ok(Path {
        label: format!("overlay userspace↔userspace, {hops} hop(s)"),
        connect: Box::new(move || {
            let client = client.clone();
            Box::pin(
                async move { Box::pin(client.connect(target).await.expect("connect")) as BoxIo },
            )
        }),
        _keep: vec![
            Box::new(AbortOnDrop(accept)),
            Box::new(server),
            Box::new(nodes),
        ],
    })
}

/// Two userspace stacks joined by an in-memory L3 wire (no overlay, no crypto): the stack's
/// own ceiling.
async fn wire_path() -> anyhow::Result<Path> {
    let a_addr: Ipv6Addr = "600::a".parse()?;
    let b_addr: Ipv6Addr = "600::b".parse()?;
    let (a_tx, b_rx) = tokio::sync::mpsc::channel(1024);
    let (b_tx, a_rx) = tokio::sync::mpsc::channel(1024);
    let mtu = meshgate_overlay::DEFAULT_MTU;
    let client = Stack::new(a_addr, mtu, a_tx, a_rx);
    let server = Stack::new(b_addr, mtu, b_tx, b_rx);
    let listener = server.listen(9000)?;
    let target = SocketAddrV6::new(b_addr, 9000, 0, 0);
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(Box::pin(s)));
        }
    });
    Ok(Path {
        label: "userspace stacks on an in-memory wire (no overlay)".into(),
        connect: Box::new(move || {
            let client = client.clone();
            Box::pin(
                async move { Box::pin(client.connect(target).await.expect("connect")) as BoxIo },
            )
        }),
        _keep: vec![Box::new(AbortOnDrop(accept)), Box::new(server)],
    })
}

/// Kernel socket on a TUN node ↔ userspace stack over `hops` overlay links.
async fn tun_path(hops: usize, index: usize) -> anyhow::Result<Path> {
    let nodes = chain(hops + 1).await?;
    let port = nodes[0].take_l3_port().expect("L3 port");
    let tun = Tun::start(
        &format!("mgbench{index}"),
        port.address,
        port.mtu,
        port.tx,
        port.rx,
    )?;
    let server = stack_on(&nodes[hops], StackConfig::default());
    let listener = server.listen(9000)?;
    let target = SocketAddrV6::new(server.address(), 9000, 0, 0);
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(Box::pin(s)));
        }
    });
    // Let the kernel finish configuring the interface.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Path {
        label: format!("overlay TUN (kernel)↔userspace, {hops} hop(s)"),
        connect: Box::new(move || {
            Box::pin(async move {
                let s = tokio::net::TcpStream::connect(target)
                    .await
                    .expect("connect");
                let _ = s.set_nodelay(true);
                Box::pin(s) as BoxIo
            })
        }),
        _keep: vec![
            Box::new(AbortOnDrop(accept)),
            Box::new(server),
            Box::new(tun),
            Box::new(nodes),
        ],
    })
}

/// One bulk stream; returns Gbit/s.
async fn stream_once(path: &Path) -> f64 {
    let mut s = (path.connect)().await;
    let buf = vec![0x5au8; 256 * 1024];
    s.write_all(b"b").await.expect("write");
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < STREAM_BYTES && start.elapsed() < RUN_TIME {
        s.write_all(&buf).await.expect("write");
        sent += buf.len() as u64;
    }
    s.shutdown().await.expect("shutdown");
    let mut total = [0u8; 8];
    s.read_exact(&mut total).await.expect("server total");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_le_bytes(total),
        sent,
        "server saw a different byte count"
    );
    sent as f64 * 8.0 / secs / 1e9
}

/// `MANY_STREAMS` concurrent streams of `MANY_BYTES`; returns aggregate Gbit/s.
async fn many_once(path: &Path) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..MANY_STREAMS {
        let fut = (path.connect)();
        tasks.push(tokio::spawn(async move {
            let mut s = fut.await;
            let buf = vec![0x33u8; MANY_BYTES];
            s.write_all(b"b").await.expect("write");
            s.write_all(&buf).await.expect("write");
            s.shutdown().await.expect("shutdown");
            let mut total = [0u8; 8];
            s.read_exact(&mut total).await.expect("server total");
            assert_eq!(u64::from_le_bytes(total), MANY_BYTES as u64);
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }
    (MANY_STREAMS * MANY_BYTES) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// 1-byte ping-pong; returns the median round trip in microseconds.
async fn rtt(path: &Path) -> f64 {
    let mut s = (path.connect)().await;
    s.write_all(b"p").await.expect("write");
    let mut samples = Vec::with_capacity(PINGS);
    let mut b = [0u8; 1];
    for i in 0..PINGS + 100 {
        let t = Instant::now();
        s.write_all(&[i as u8]).await.expect("write");
        s.read_exact(&mut b).await.expect("read");
        if i >= 100 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    meshgate_bench::median(&mut samples)
}

async fn median_of<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = f64>,
{
    let mut v = Vec::new();
    for _ in 0..RUNS {
        v.push(f().await);
    }
    meshgate_bench::median(&mut v)
}

/// The median single-stream Gbit/s and median ping-pong µs of one path.
async fn stream_and_rtt(p: &Path) -> (f64, f64) {
    (
        median_of(|| stream_once(p)).await,
        median_of(|| rtt(p)).await,
    )
}

/// Single stream and ping-pong over the in-memory wire and one userspace hop, beside
/// loopback: the rows a change to the stack's write path moves first.
async fn single_section() -> anyhow::Result<String> {
    Ok(stream_table(vec![
        loopback_path().await?,
        wire_path().await?,
        userspace_path(1, StackConfig::default()).await?,
    ])
    .await)
}

/// The TUN rows' single stream and round trip, 1 hop, alone (for trying a change).
async fn tun_section() -> anyhow::Result<String> {
    Ok(stream_table(vec![tun_path(1, 1).await?]).await)
}

/// One stream and the round trip over each path, one table row per path.
async fn stream_table(paths: Vec<Path>) -> String {
    let mut md = String::from("| path | Gbit/s | median RTT µs |\n|---|---|---|\n");
    for p in paths {
        let (g, r) = stream_and_rtt(&p).await;
        md.push_str(&format!("| {} | {g:.2} | {r:.1} |\n", p.label));
    }
    md
}

async fn bench(with_tun: bool) -> anyhow::Result<String> {
    let loopback = loopback_path().await?;
    // Each overlay path is built, measured and torn down before the next (one TUN at a time:
    // every TUN interface claims the whole overlay prefix).
    let mut results = Vec::new();
    for (kind, hops) in [
        ("wire", 0),
        ("userspace", 1),
        ("userspace", 3),
        ("tun", 1),
        ("tun", 3),
    ] {
        if kind == "tun" && !with_tun {
            continue;
        }
        let p = match kind {
            "tun" => tun_path(hops, hops).await?,
            "wire" => wire_path().await?,
            _ => userspace_path(hops, StackConfig::default()).await?,
        };
        let (g, r) = stream_and_rtt(&p).await;
        results.push((p.label.clone(), hops as f64, g, r));
        drop(p);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut md = String::new();
    md.push_str("## sockets: TCP over the overlay\n\n");
    md.push_str(&format!(
        "Release build, 2-core machine shared with other builds, one process, every overlay \
         node on loopback TCP links (default overlay MTU {} bytes, AES-256-GCM end to end). \
         Medians of {RUNS} runs; single-stream runs send up to {} MiB or {} s. The \
         loopback reference is kernel TCP in the same run{}.\n\n",
        meshgate_overlay::DEFAULT_MTU,
        STREAM_BYTES >> 20,
        RUN_TIME.as_secs(),
        if with_tun {
            ", inside the network namespace the TUN rows use"
        } else {
            " (TUN rows skipped: needs root and /dev/net/tun)"
        }
    ));

    md.push_str("### Single stream throughput\n\n| path | Gbit/s | vs loopback |\n|---|---|---|\n");
    let lo = median_of(|| stream_once(&loopback)).await;
    md.push_str(&format!("| {} | {lo:.2} | 1.00 |\n", loopback.label));
    let mut one_hop = 0.0;
    for (label, _, g, _) in &results {
        if label.contains("userspace↔userspace, 1 hop") {
            one_hop = *g;
        }
        md.push_str(&format!("| {label} | {g:.2} | {:.2} |\n", g / lo));
    }
    md.push_str(&format!(
        "\nTarget: one stream over one hop ≥ 2.5 Gbit/s: **{}** ({one_hop:.2} Gbit/s).\n\n",
        if one_hop >= 2.5 { "met" } else { "missed" }
    ));

    md.push_str(&many_section().await?);

    md.push_str(&idle_section().await?);

    md.push_str("### 1-byte ping-pong round trip\n\n| path | median RTT µs | added per hop µs |\n|---|---|---|\n");
    let lo_rtt = median_of(|| rtt(&loopback)).await;
    md.push_str(&format!("| {} | {lo_rtt:.1} | – |\n", loopback.label));
    let mut worst_per_hop: f64 = 0.0;
    for (label, hops, _, r) in &results {
        if *hops == 0.0 {
            md.push_str(&format!("| {label} | {r:.1} | – |\n"));
            continue;
        }
        let per_hop = (r - lo_rtt) / hops;
        worst_per_hop = worst_per_hop.max(per_hop);
        md.push_str(&format!("| {label} | {r:.1} | {per_hop:.1} |\n"));
    }
    md.push_str(&format!(
        "\nTarget: added RTT ≤ 100 µs per hop: **{}** (worst {worst_per_hop:.1} µs).\n",
        if worst_per_hop <= 100.0 {
            "met"
        } else {
            "missed"
        }
    ));
    Ok(md)
}

/// The 1000-stream aggregate, kernel loopback beside one overlay hop.
async fn many_section() -> anyhow::Result<String> {
    let mut md = String::new();
    let loopback = loopback_path().await?;
    md.push_str(&format!(
        "### {MANY_STREAMS} concurrent streams × {} MiB, aggregate\n\n| path | Gbit/s | vs loopback |\n|---|---|---|\n",
        MANY_BYTES >> 20
    ));
    let lo_many = median_of(|| many_once(&loopback)).await;
    md.push_str(&format!("| {} | {lo_many:.2} | 1.00 |\n", loopback.label));
    // 64 KiB buffers: 1000 streams × 2 ends × 2 buffers stay well inside memory.
    let many = userspace_path(
        1,
        StackConfig {
            socket_buffer: 64 * 1024,
            ..StackConfig::default()
        },
    )
    .await?;
    let g = median_of(|| many_once(&many)).await;
    md.push_str(&format!(
        "| {} (64 KiB socket buffers) | {g:.2} | {:.2} |\n\n",
        many.label,
        g / lo_many
    ));
    drop(many);
    Ok(md)
}

/// CPU time of every thread of this process so far (scheduler statistics, nanoseconds).
fn process_cpu() -> Duration {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

/// Ping-pong over one hop with none and then `IDLE_CONNECTIONS` idle established streams on
/// the same two stacks: what idle sockets cost every packet. Returns (median RTT µs, process
/// CPU µs per round trip: both stacks, both nodes, the application).
async fn idle_rtt(path: &Path) -> (f64, f64) {
    let cpu = process_cpu();
    let r = rtt(path).await;
    let cpu = (process_cpu() - cpu).as_secs_f64() * 1e6 / (PINGS + 100) as f64;
    (r, cpu)
}

async fn idle_section() -> anyhow::Result<String> {
    let p = userspace_path(1, StackConfig::default()).await?;
    let mut rows = Vec::new();
    let mut idle = Vec::new();
    for target in [0, IDLE_CONNECTIONS] {
        while idle.len() < target {
            let mut s = (p.connect)().await;
            // Ping mode: the server waits in a read, like a pooled keep-alive connection.
            s.write_all(b"p").await.expect("write");
            idle.push(s);
        }
        // Let handshakes and ACKs settle before measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut rtts = Vec::new();
        let mut cpus = Vec::new();
        for _ in 0..RUNS {
            let (r, c) = idle_rtt(&p).await;
            rtts.push(r);
            cpus.push(c);
        }
        rows.push((
            target,
            meshgate_bench::median(&mut rtts),
            meshgate_bench::median(&mut cpus),
        ));
    }
    drop(idle);
    let mut md = format!(
        "### 1-byte ping-pong beside idle connections\n\n{}; the idle streams \
         are established between the same two stacks and wait in a read. CPU is the whole \
         process's (both stacks, both nodes, the application) per round trip.\n\n\
         | idle connections | median RTT µs | CPU µs per round trip |\n|---|---|---|\n",
        p.label
    );
    for (n, r, c) in rows {
        md.push_str(&format!("| {n} | {r:.1} | {c:.1} |\n"));
    }
    md.push('\n');
    Ok(md)
}
