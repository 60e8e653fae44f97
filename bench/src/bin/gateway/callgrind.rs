//! The gateway bench's callgrind mode: instructions per proxied request, counted by
//! `valgrind --tool=callgrind`, for the gateway (release `meshgate`) and nginx (one worker, no
//! master) with a direct backend, and for the gateway and its workload node (`meshgate node`,
//! userspace stack and `expose`, or, inside the bench's network namespace, TUN mode) through
//! the overlay; HTTP/1.1 and h2.
//!
//! Wall-clock rates on the shared 2-core machine move by ±25 %; instruction counts repeat to
//! well under 1 %. Per row: a warm-up (backend connections opened, caches filled), then the
//! counters are zeroed (`callgrind_control -z`), h2load sends `N` requests, a dump; zeroed
//! again, `2N` requests, a dump. Instructions per request are `(I(2N) − I(N)) / N`: both runs
//! open the same client connections and TLS handshakes, so those cancel, as does start-up.
//! Run: `cargo run --release -p meshgate-bench --bin gateway -- callgrind`; `BENCH_CALLGRIND_N`
//! sets N (default 2000), `BENCH_BASELINE=/path/to/meshgate` adds direct rows for another build.
//! While iterating: `BENCH_CALLGRIND_ROWS=direct` measures nginx and the direct gateway(s) only
//! and writes no docs; `BENCH_CALLGRIND_KEEP=/dir` keeps the 2N dumps there (the workload
//! node's too) for `callgrind_annotate`. `BENCH_PINGORA=/path/to/pingora-ref` adds a row for a
//! minimal pingora proxy (`bench/pingora-ref`, built on its own: it is not a workspace member),
//! a second well-kept Rust HTTP engine beside hyper. `BENCH_HTTP_FLOOR=target/release/http_floor`
//! adds rows for a lean proxy path (`bench/src/bin/http_floor`: HTTP/1.1 by hand on httparse,
//! h2 on the h2 crate without hyper), direct and through the TUN workload node: what the
//! gateway's per-request work costs without hyper.

use super::{
    HOST, Proc, backend_block, free_port, make_cert, meshgate_config, nginx_bin, nginx_conf,
    nginx_proxy_block, skip_dad, start_nginx, wait_bindable, wait_ok, write,
};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Requests per measured run (the second run sends twice as many). Under callgrind a proxied
/// request takes a few milliseconds.
const DEFAULT_N: u64 = 2000;
/// Client connections h2load opens per run, and h2 streams per connection.
const CONNECTIONS: u32 = 4;
const H2_STREAMS: u32 = 10;
/// Functions listed per profile in `docs/performance.md`.
const TOP_FUNCTIONS: usize = 25;

/// One process under callgrind.
struct Counted {
    proc: Proc,
    /// The callgrind output file; dumps are `out.1`, `out.2`, ...
    out: PathBuf,
    dumps: u32,
}

impl Counted {
    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Zeroes the counters.
    fn zero(&self) -> Result<()> {
        control(self.pid(), "-z")
    }

    /// Dumps the counters; returns the dump's total instructions and its file.
    fn dump(&mut self) -> Result<(u64, PathBuf)> {
        control(self.pid(), "-d")?;
        self.dumps += 1;
        let file = PathBuf::from(format!("{}.{}", self.out.display(), self.dumps));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(total) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| total_instructions(&t))
            {
                return Ok((total, file));
            }
            if Instant::now() > deadline {
                bail!("no callgrind dump {}", file.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn control(pid: u32, op: &str) -> Result<()> {
    let out = Command::new("callgrind_control")
        .arg(op)
        .arg(pid.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "callgrind_control {op} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The `totals:` (or `summary:`) line of a complete callgrind dump: instructions executed.
fn total_instructions(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Starts `program args` under callgrind, writing its dumps to `dir/name.cg.N`.
fn under_callgrind(
    dir: &Path,
    name: &'static str,
    port: u16,
    program: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<Counted> {
    let out = dir.join(format!("{name}.cg"));
    let child = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            // Counting starts at the first zeroing; start-up is not measured.
            "--dump-instr=no",
        ])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(
            dir.join(format!("{name}.valgrind.log")),
        )?))
        .spawn()
        .context("valgrind (apt install valgrind)")?;
    Ok(Counted {
        proc: Proc { name, child, port },
        out,
        dumps: 0,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "h2",
        }
    }
}

/// Sends `n` requests with h2load (`CONNECTIONS` connections; h2 with `H2_STREAMS` streams
/// each), checks they all succeeded, and returns the TLS cipher suite negotiated.
fn h2load(port: u16, proto: Proto, n: u64) -> Result<String> {
    let mut cmd = Command::new("h2load");
    cmd.args(["-t1", "-c"])
        .arg(CONNECTIONS.to_string())
        .arg("-n")
        .arg(n.to_string());
    match proto {
        Proto::H1 => cmd.arg("--h1"),
        Proto::H2 => cmd.arg("-m").arg(H2_STREAMS.to_string()),
    };
    let out = cmd.arg(format!("https://{HOST}:{port}/")).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, ..."
    let succeeded = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|f| f.strip_suffix(" succeeded")))
        .and_then(|v| v.parse::<u64>().ok());
    if succeeded != Some(n) {
        bail!("h2load to port {port}: {succeeded:?} of {n} succeeded:\n{text}");
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Cipher: "))
        .unwrap_or("?")
        .to_string())
}

/// One row: a proxy (and, through the overlay, the workload node) under callgrind.
struct Row {
    name: &'static str,
    proto: Proto,
    proxy: f64,
    node: Option<f64>,
    cipher: String,
}

/// What [`measure`] found for one row.
struct Measured {
    proxy: f64,
    node: Option<f64>,
    /// The proxy's 2N dump (for the profile).
    proxy_dump: PathBuf,
    /// The workload node's 2N dump, when there is a node.
    node_dump: Option<PathBuf>,
    cipher: String,
}

/// Measures instructions per request for `proxy` (and `node`) with `proto`.
fn measure(
    proxy: &mut Counted,
    mut node: Option<&mut Counted>,
    proto: Proto,
    n: u64,
) -> Result<Measured> {
    // Warm-up: backend connections opened for this load's concurrency, caches filled.
    let cipher = h2load(proxy.proc.port, proto, n / 4)?;
    let mut totals = Vec::new();
    let mut file = PathBuf::new();
    let mut node_file = None;
    for run in [n, 2 * n] {
        proxy.zero()?;
        if let Some(node) = node.as_deref_mut() {
            node.zero()?;
        }
        h2load(proxy.proc.port, proto, run)?;
        let (p, f) = proxy.dump()?;
        let w = match node.as_deref_mut() {
            Some(node) => {
                let (w, f) = node.dump()?;
                node_file = Some(f);
                Some(w)
            }
            None => None,
        };
        totals.push((p, w));
        file = f;
    }
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / n as f64;
    let proxy_per = per(totals[0].0, totals[1].0);
    let node_per = match (totals[0].1, totals[1].1) {
        (Some(a), Some(b)) => Some(per(a, b)),
        _ => None,
    };
    Ok(Measured {
        proxy: proxy_per,
        node: node_per,
        proxy_dump: file,
        node_dump: node_file,
        cipher,
    })
}

/// The top functions by inclusive (else self) instructions in a dump, as a markdown table.
fn top_functions(dump: &Path, requests: u64, inclusive: bool) -> Result<String> {
    let out = Command::new("callgrind_annotate")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg("--threshold=100")
        .arg(dump)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        let Some((count, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(count) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with("(") && total.is_none() && rest.contains("PROGRAM TOTALS") {
            total = Some(count);
            continue;
        }
        // The threads' entry frames (clone, start_thread, the runtime's worker loop) carry the
        // whole count in both listings, self included (calls still open at the dump): they
        // say nothing about where the instructions went. In a process whose other threads ran
        // a little (the lean path's), they carry nearly all of it.
        let whole = |t: u64| count == t || (!inclusive && count * 1000 >= t * 999);
        if total.is_some_and(whole) {
            continue;
        }
        // "1,234 (12.3%)  file:function [object]"
        let function = rest
            .split_once(')')
            .map_or(rest, |(_, f)| f.trim())
            .rsplit_once(" [")
            .map_or(rest, |(f, _)| f);
        let function = function.split_once(':').map_or(function, |(_, f)| f);
        if function.is_empty() || function.contains("???") && rows.len() > 3 {
            continue;
        }
        let short: String = function.chars().take(110).collect();
        rows.push(format!(
            "| {:.0} | {:.1} % | `{}` |",
            count as f64 / requests as f64,
            count as f64 * 100.0 / total.unwrap_or(count).max(1) as f64,
            short.replace('|', "\\|").replace('`', "'")
        ));
        if rows.len() == TOP_FUNCTIONS {
            break;
        }
    }
    Ok(format!(
        "| instructions per request | {} | function |\n|---|---|---|\n{}",
        if inclusive { "inclusive" } else { "self" },
        rows.join("\n")
    ))
}

/// Runs the callgrind mode: starts the backend (not counted), nginx, the direct gateway, the
/// overlay gateway and its workload node under callgrind, measures every row, and writes the
/// `gateway-callgrind` section of `docs/benchmarks.md` and the profiles in
/// `docs/performance.md`.
pub(crate) async fn run(meshgate: &Path, d: &Path) -> Result<()> {
    let n: u64 = std::env::var("BENCH_CALLGRIND_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_N);
    let (cert, key) = make_cert(d)?;
    let direct_only = std::env::var("BENCH_CALLGRIND_ROWS").as_deref() == Ok("direct");
    let keep = std::env::var_os("BENCH_CALLGRIND_KEEP").map(PathBuf::from);
    // The workload node in TUN mode (inside the bench's own network namespace), the path of
    // the issue's own figures: the backend listens on the node's overlay address and the
    // node's TCP to it is the kernel's, as the direct gateway's is.
    let mut tun_node = if meshgate_bench::in_netns() && !direct_only {
        Some(start_node(d, meshgate, NodeMode::Tun).await?)
    } else {
        None
    };
    let backend_port = free_port();
    let tun_listen = tun_node
        .as_ref()
        .map(|(_, address)| format!(" listen [{address}]:{backend_port};"))
        .unwrap_or_default();
    let _backend = Proc {
        name: "backend",
        port: backend_port,
        child: start_nginx(d, "backend", &backend_block(backend_port, &tun_listen), "1")?,
    };
    let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));

    // nginx as one process: no master, one worker, so the one process counted does all the work.
    let nginx_port = free_port();
    let (conf, prefix) = nginx_conf(
        d,
        "nginx-cg",
        &nginx_proxy_block(nginx_port, backend_port, &cert, &key),
        "master_process off;\nworker_processes 1;",
    )?;
    let mut nginx = under_callgrind(
        d,
        "nginx",
        nginx_port,
        Path::new(nginx_bin()),
        &[
            "-c".as_ref(),
            conf.as_os_str(),
            "-p".as_ref(),
            prefix.as_os_str(),
        ],
    )?;

    let mut node = if direct_only {
        None
    } else {
        Some(start_node(d, meshgate, NodeMode::Expose(backend)).await?)
    };

    let gateway = |name: &'static str, backend: SocketAddr, peer: Option<SocketAddr>| {
        let port = free_port();
        let config = meshgate_config(d, name, port, backend, peer, (&cert, &key))?;
        under_callgrind(
            d,
            name,
            port,
            meshgate,
            &["gateway".as_ref(), "--config".as_ref(), config.as_os_str()],
        )
    };
    let mut direct = gateway("meshgate-direct", backend, None)?;
    // BENCH_BASELINE=/path/to/meshgate: an earlier build beside this one (direct rows), for
    // what a change bought.
    let mut baseline = match std::env::var_os("BENCH_BASELINE") {
        Some(bin) => {
            let port = free_port();
            let config = meshgate_config(d, "baseline", port, backend, None, (&cert, &key))?;
            Some(under_callgrind(
                d,
                "meshgate-direct-baseline",
                port,
                Path::new(&bin),
                &["gateway".as_ref(), "--config".as_ref(), config.as_os_str()],
            )?)
        }
        None => None,
    };
    // A reference proxy from the environment variable `var` (a binary), started under callgrind
    // as `BIN [lead] 127.0.0.1:PORT BACKEND CERT KEY [tail]`.
    let reference = |name: &'static str,
                     var: &str,
                     lead: &[&std::ffi::OsStr],
                     backend: SocketAddr,
                     tail: &[&std::ffi::OsStr]|
     -> Result<Option<Counted>> {
        let Some(bin) = std::env::var_os(var) else {
            return Ok(None);
        };
        let port = free_port();
        let (listen, backend) = (format!("127.0.0.1:{port}"), backend.to_string());
        let mut args = lead.to_vec();
        args.extend([
            listen.as_ref(),
            backend.as_ref(),
            cert.as_os_str(),
            key.as_os_str(),
        ]);
        args.extend(tail);
        Ok(Some(under_callgrind(
            d,
            name,
            port,
            Path::new(&bin),
            &args,
        )?))
    };
    // BENCH_PINGORA=/path/to/pingora-ref: the same load through pingora (rustls, one thread,
    // upstream keep-alive), to tell hyper's cost from what any Rust proxy engine spends.
    let mut pingora = reference("pingora", "BENCH_PINGORA", &[], backend, &[])?;
    // BENCH_HTTP_FLOOR=/path/to/http_floor: the same load through the lean path, through
    // hyper's server in front of the lean path's upstream side, and through the gateway's
    // embedded overlay node to the TUN workload node.
    const FLOOR: &str = "BENCH_HTTP_FLOOR";
    let mut http_floor = reference("floor", FLOOR, &[], backend, &[])?;
    let hyper_server = ["--hyper-server".as_ref()];
    let mut floor_hyper_server =
        reference("floor-hyper-server", FLOOR, &hyper_server, backend, &[])?;
    let mut http_floor_tun = match &tun_node {
        Some((node, node_address)) => reference(
            "floor-tun",
            FLOOR,
            &[],
            SocketAddr::from((*node_address, backend_port)),
            &[
                d.join("floor-tun-node.key").as_os_str(),
                format!("127.0.0.1:{}", node.proc.port).as_ref(),
            ],
        )?,
        None => None,
    };
    let mut overlay = match &node {
        Some((node, node_address)) => Some(gateway(
            "meshgate",
            SocketAddr::from((*node_address, 80)),
            Some(SocketAddr::from(([127, 0, 0, 1], node.proc.port))),
        )?),
        None => None,
    };
    let mut tun_gateway = match &tun_node {
        Some((node, node_address)) => Some(gateway(
            "meshgate-tun",
            SocketAddr::from((*node_address, backend_port)),
            Some(SocketAddr::from(([127, 0, 0, 1], node.proc.port))),
        )?),
        None => None,
    };
    for s in [&nginx, &direct]
        .into_iter()
        .chain(overlay.as_ref())
        .chain(tun_gateway.as_ref())
        .chain(baseline.as_ref())
        .chain(pingora.as_ref())
        .chain(http_floor.as_ref())
        .chain(floor_hyper_server.as_ref())
        .chain(http_floor_tun.as_ref())
    {
        // Valgrind starts slowly (it reads the binary's debug information).
        wait_ok_for(s.proc.port, Duration::from_secs(180))
            .with_context(|| format!("{} not ready under callgrind", s.proc.name))?;
    }

    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        // Each proxy with the workload node it goes through, if any.
        let mut servers: Vec<(&mut Counted, Option<&mut Counted>)> =
            vec![(&mut nginx, None), (&mut direct, None)];
        if let (Some(o), Some((n, _))) = (overlay.as_mut(), node.as_mut()) {
            servers.push((o, Some(n)));
        }
        if let (Some(t), Some((n, _))) = (tun_gateway.as_mut(), tun_node.as_mut()) {
            servers.push((t, Some(n)));
        }
        servers.extend(baseline.as_mut().map(|b| (b, None)));
        servers.extend(pingora.as_mut().map(|p| (p, None)));
        servers.extend(http_floor.as_mut().map(|f| (f, None)));
        servers.extend(floor_hyper_server.as_mut().map(|f| (f, None)));
        for (server, node) in servers {
            measure_row(
                server,
                node,
                (proto, n),
                keep.as_deref(),
                &mut rows,
                &mut profiles,
            )?;
        }
        // The lean path through the TUN workload node: measured on its own because it shares
        // that node with the gateway's TUN row.
        if let (Some(f), Some((t, _))) = (http_floor_tun.as_mut(), tun_node.as_mut()) {
            measure_row(
                f,
                Some(t),
                (proto, n),
                keep.as_deref(),
                &mut rows,
                &mut profiles,
            )?;
        }
    }
    if direct_only {
        return Ok(()); // partial rows: printed above, the docs keep the last full run
    }
    write_docs(&rows, &profiles, n)
}

/// Measures one row (a proxy and the workload node it goes through, if any) and records its
/// figures, kept dumps and profiles.
fn measure_row(
    server: &mut Counted,
    node: Option<&mut Counted>,
    (proto, n): (Proto, u64),
    keep: Option<&Path>,
    rows: &mut Vec<Row>,
    profiles: &mut Vec<Profile<'static>>,
) -> Result<()> {
    let name = server.proc.name;
    let Measured {
        proxy,
        node: node_per,
        proxy_dump: dump,
        node_dump,
        cipher,
    } = measure(server, node, proto, n)?;
    eprintln!(
        "callgrind {name} {}: {proxy:.0} instructions per request{}",
        proto.name(),
        node_per.map_or(String::new(), |w| format!(", workload node {w:.0}"))
    );
    if let Some(keep) = &keep {
        std::fs::create_dir_all(keep)?;
        let p = if proto == Proto::H1 { "h1" } else { "h2" };
        std::fs::copy(&dump, keep.join(format!("{name}-{p}.cg")))?;
        if let Some(node_dump) = &node_dump {
            std::fs::copy(node_dump, keep.join(format!("{name}-{p}-node.cg")))?;
        }
    }
    if matches!(name, "nginx" | "meshgate-direct" | "pingora" | "floor") {
        profiles.push((
            if name == "floor" {
                "the lean path (`http_floor`)"
            } else {
                name
            },
            proto,
            top_functions(&dump, 2 * n, true)?,
            top_functions(&dump, 2 * n, false)?,
        ));
    }
    // Through the overlay, HTTP/1.1 only (h2 spends the same way): the gateway and
    // the workload node, which together are the overlay's extra cost.
    if name == "meshgate" && proto == Proto::H1 {
        profiles.push((
            "meshgate through the overlay, gateway",
            proto,
            top_functions(&dump, 2 * n, true)?,
            top_functions(&dump, 2 * n, false)?,
        ));
        if let Some(node_dump) = &node_dump {
            profiles.push((
                "meshgate through the overlay, workload node",
                proto,
                top_functions(node_dump, 2 * n, true)?,
                top_functions(node_dump, 2 * n, false)?,
            ));
        }
    }
    // The TUN node's profile: what the workload side costs without a userspace TCP.
    if name == "meshgate-tun"
        && proto == Proto::H1
        && let Some(node_dump) = &node_dump
    {
        profiles.push((
            "meshgate through the overlay, workload node in TUN mode",
            proto,
            top_functions(node_dump, 2 * n, true)?,
            top_functions(node_dump, 2 * n, false)?,
        ));
    }
    rows.push(Row {
        name,
        proto,
        proxy,
        node: node_per,
        cipher,
    });
    Ok(())
}

/// How the workload node reaches the backend.
enum NodeMode {
    /// Userspace stack, the overlay's port 80 `expose`d to this backend over kernel TCP.
    Expose(SocketAddr),
    /// A TUN interface: the backend listens on the node's overlay address.
    Tun,
}

/// The workload node under callgrind, and its overlay address.
async fn start_node(
    d: &Path,
    meshgate: &Path,
    mode: NodeMode,
) -> Result<(Counted, std::net::Ipv6Addr)> {
    let tun = matches!(mode, NodeMode::Tun);
    // Top-level keys (TUN) or a table of their own (`[[expose]]`), before `[discovery]`.
    let (name, tag, mode_lines) = match mode {
        NodeMode::Expose(backend) => (
            "workload-node",
            "cg-node",
            format!("[[expose]]\nport = 80\nto = \"{backend}\"\n"),
        ),
        NodeMode::Tun => {
            skip_dad();
            (
                "workload-node-tun",
                "cg-node-tun",
                "mode = \"tun\"\ntun_name = \"mgcg0\"\n".to_string(),
            )
        }
    };
    let link_port = free_port();
    let status = format!("127.0.0.1:{}", free_port());
    let node_config = d.join(format!("{tag}.toml"));
    write(
        &node_config,
        &format!(
            "key = \"{d}/{tag}.key\"\nlisten = \"127.0.0.1:{link_port}\"\n\
             status_listen = \"{status}\"\n{mode_lines}\
             [discovery]\nenabled = false\n",
            d = d.display(),
        ),
    )?;
    let node = under_callgrind(
        d,
        name,
        link_port,
        meshgate,
        &[
            "node".as_ref(),
            "--config".as_ref(),
            node_config.as_os_str(),
        ],
    )?;
    let address = node_address(&status, &node)?;
    // In TUN mode the backend binds the address (the node starts slowly under valgrind).
    if tun {
        wait_bindable(address, Duration::from_secs(60)).await?;
    }
    Ok((node, address))
}

/// The workload node's overlay address, read from its status endpoint.
fn node_address(status: &str, node: &Counted) -> Result<std::net::Ipv6Addr> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-m", "5"])
            .arg(format!("http://{status}/status"))
            .output()?;
        if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            && let Some(a) = doc["node"]["address"].as_str()
        {
            return Ok(a.parse()?);
        }
        if Instant::now() > deadline {
            bail!("workload node (pid {}) never served its status", node.pid());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_ok_for(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match wait_ok(port, "/") {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
    }
}

/// A profile: server, protocol, top functions inclusive and by self cost.
type Profile<'a> = (&'a str, Proto, String, String);

fn write_docs(rows: &[Row], profiles: &[Profile], n: u64) -> Result<()> {
    let find = |name: &str, proto: Proto| rows.iter().find(|r| r.name == name && r.proto == proto);
    let mut table = String::from(
        "| path | protocol | TLS cipher suite | proxy process | workload node | sum | proxy / nginx | sum / nginx |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let nginx = find("nginx", r.proto).map_or(f64::NAN, |x| x.proxy);
        let sum = r.proxy + r.node.unwrap_or(0.0);
        let path = match r.name {
            "nginx" => "nginx → backend",
            "meshgate-direct" => "meshgate → backend (kernel TCP, no overlay)",
            "meshgate-direct-baseline" => "meshgate (baseline build) → backend",
            "pingora" => "pingora (rustls, `bench/pingora-ref`) → backend",
            "floor" => "lean path (`http_floor`: rustls; httparse, h2 crate) → backend",
            "floor-tun" => "lean path → overlay → workload node (TUN) → backend",
            "floor-hyper-server" => {
                "hyper's server (as the gateway's) → lean path's upstream side → backend"
            }
            "meshgate-tun" => "meshgate → overlay → workload node (TUN) → backend",
            _ => "meshgate → overlay → workload node (userspace, `expose`) → backend",
        };
        table.push_str(&format!(
            "| {path} | {} | {} | {:.0} | {} | {sum:.0} | {:.2}× | {:.2}× |\n",
            r.proto.name(),
            r.cipher,
            r.proxy,
            r.node.map_or("–".to_string(), |w| format!("{w:.0}")),
            r.proxy / nginx,
            sum / nginx,
        ));
    }
    // What `row` adds over `direct`, counting the workload node.
    let overlay_note = |direct: &str, row: &str| -> String {
        [Proto::H1, Proto::H2]
            .iter()
            .filter_map(|&p| {
                let (d, o) = (find(direct, p)?, find(row, p)?);
                Some(format!(
                    "{}: {:+.0} %",
                    p.name(),
                    ((o.proxy + o.node.unwrap_or(0.0)) / d.proxy - 1.0) * 100.0
                ))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tun_note = if find("meshgate-tun", Proto::H1).is_some() {
        format!(
            " With the workload node in TUN mode (its TCP to the backend is the kernel's, as \
             the direct gateway's is): {}.",
            overlay_note("meshgate-direct", "meshgate-tun")
        )
    } else {
        String::new()
    };
    let floor_note = if find("floor-tun", Proto::H1).is_some() {
        format!(
            " The lean path through the TUN workload node over the lean path direct: {}.",
            overlay_note("floor", "floor-tun")
        )
    } else {
        String::new()
    };
    let md = format!(
        "### gateway: instructions per proxied request (callgrind)\n\n\
         Counted by `valgrind --tool=callgrind` (cargo run --release -p meshgate-bench --bin \
         gateway -- callgrind), so the figures repeat run to run, unlike the rates above. Each \
         server is one process under callgrind: the release `meshgate` binary (`gateway`; \
         through the overlay also the workload node, `meshgate node` with the userspace stack \
         and `expose`, or in TUN mode with the backend listening on its overlay address), nginx with `master_process off` and one worker; the backend nginx is \
         not counted. h2load sends {n} and then {n2} requests over {CONNECTIONS} TLS 1.3 \
         connections (HTTP/1.1 with `--h1`, one request at a time per connection; h2 with \
         {H2_STREAMS} streams per connection) after a warm-up; instructions per request are \
         the difference of the two runs' counts divided by {n}, so connection set-up and TLS \
         handshakes cancel out. 6-byte responses.\n\n{table}\n\
         The overlay's instructions over the direct gateway (gateway and workload node \
         together): {}.{tun_note}{floor_note} Profiles (top functions) are in \
         `docs/performance.md`.\n",
        overlay_note("meshgate-direct", "meshgate"),
        n2 = 2 * n,
    );
    println!("{md}");
    meshgate_bench::write_section("gateway-callgrind", &md)?;
    let mut perf = format!(
        "## Where a proxied request's instructions go (callgrind)\n\n\
         Written by the gateway bench's callgrind mode (see `docs/benchmarks.md`, \
         gateway-callgrind): the top functions over a run of {n2} requests (4 TLS handshakes \
         included), per request, by inclusive instructions (thread entry points and the \
         runtime's poll loop include everything they call) and by their own (self) \
         instructions.\n",
        n2 = 2 * n
    );
    for (name, proto, inclusive, own) in profiles {
        perf.push_str(&format!(
            "\n### {name}, {}\n\n{inclusive}\n\n{own}\n",
            proto.name()
        ));
    }
    meshgate_bench::write_doc_section("performance.md", "callgrind-profiles", &perf)?;
    Ok(())
}
