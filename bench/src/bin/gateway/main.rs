//! Gateway benchmark: small keep-alive responses through meshgate (TLS → overlay → backend)
//! beside nginx and Caddy terminating TLS and proxying to the same backend directly.
//!
//! Measured side by side in one run, rounds interleaved, medians quoted:
//! - wrk (HTTP/1.1 keep-alive, 50 connections): req/s, p50, p99;
//! - h2load (HTTP/2, 50 connections × 10 streams): req/s;
//! - a rustls client, `Connection: close` per connection: full and resumed TLS 1.3
//!   handshakes/s;
//! - memory per idle TLS connection: RSS growth of the server process(es) with 10k open,
//!   handshaken, idle TLS connections;
//! - memory under load: peak RSS during an h2load run and RSS a minute after it.
//!
//! The backend is an nginx serving a 6-byte body. All three proxies use the same ECDSA P-256
//! certificate and TLS 1.3 only, access logs are off, nginx and Caddy keep more idle backend
//! connections than the load's concurrency and run one worker per core (as the gateway's
//! runtime does). meshgate-direct is the gateway with the backend dialed over the kernel, the
//! row to hold beside nginx. Run:
//! `cargo run --release -p meshgate-bench --bin gateway` (installs wrk, nginx, caddy if missing).
//! `BENCH_QUICK=1`: the memory row, wrk and h2load rounds only, printed, docs untouched (for
//! trying changes).
//! `-- callgrind`: instructions per proxied request under callgrind instead (see the
//! `callgrind` module).
//! `BENCH_MESHGATE=/path`: measure that `meshgate` binary instead of building one.
//! `BENCH_HTTP_FLOOR=/path/to/http_floor`: rows for the lean proxy path, direct and through the
//! TUN workload node (see the `callgrind` module).
//! `BENCH_HOLD=1`: start everything, print ports and pids, and keep it up for 10 minutes (for
//! profiling by hand).

mod callgrind;

use anyhow::{Context, Result, bail};
use meshgate_bench::{median, write_section};
use meshgate_overlay::{Node, NodeConfig};
use meshgate_sockets::Stack;
use meshgate_sockets::tun::Tun;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The workload node runs in this process, with mimalloc (the allocator its figures were
// recorded with; the `meshgate` binary uses jemalloc since r4, see docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HOST: &str = "localhost";
const ROUNDS: usize = 3;
const DURATION: &str = "2s";
const IDLE_CONNS: usize = 10_000;
const HANDSHAKE_SECS: u64 = 2;
/// How long after the h2load run the memory row reads RSS again.
const AFTER_LOAD: Duration = Duration::from_secs(60);

/// nginx's upstream pool as an expert sets it for these loads: more idle connections than the
/// highest concurrency (h2load: 50 × 10 streams), no limit on requests per connection, idle
/// connections kept for a minute (as the gateway's pool). With the stock `keepalive 64`,
/// nginx opened a new backend connection for ~35 % of h2load's requests.
const NGINX_UPSTREAM_KEEPALIVE: &str =
    "keepalive 1024; keepalive_requests 1000000; keepalive_timeout 60s;";
/// Caddy's transport to the backend, likewise: with its default of 32 idle connections per host
/// it reconnected even under wrk's 50 connections.
const CADDY_TRANSPORT: &str = "  transport http {\n   keepalive 60s\n   \
     keepalive_idle_conns 1024\n   keepalive_idle_conns_per_host 1024\n  }\n";

struct Proc {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // nginx: the master stops its workers on SIGQUIT/SIGTERM.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = [
        ("wrk", "wrk"),
        ("nginx", "nginx"),
        ("caddy", "caddy"),
        ("h2load", "nghttp2-client"),
        ("valgrind", "valgrind"),
    ]
    .iter()
    .filter(|(bin, _)| {
        !Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {bin} || test -x /usr/sbin/{bin}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .map(|(_, pkg)| *pkg)
    .collect();
    if !missing.is_empty() {
        eprintln!("installing {missing:?}");
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends {}",
                missing.join(" ")
            ))
            .status()?
            .success();
        if !ok {
            bail!("cannot install {missing:?}");
        }
    }
    Ok(())
}

/// Builds the release `meshgate` binary.
fn build_meshgate() -> Result<()> {
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "meshgate", "--bin", "meshgate"])
        .current_dir(workspace_root())
        .status()?;
    if !status.success() {
        bail!("cannot build the meshgate binary");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn nginx_bin() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

fn start_nginx(dir: &Path, name: &str, server_block: &str, workers: &str) -> Result<Child> {
    let (conf, prefix) = nginx_conf(
        dir,
        name,
        server_block,
        &format!("worker_processes {workers};"),
    )?;
    Ok(Command::new(nginx_bin())
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&prefix)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Writes an nginx configuration `name.conf` in `dir` with `main` directives (worker
/// processes) and `server_block` inside `http`; returns it and its prefix directory.
fn nginx_conf(
    dir: &Path,
    name: &str,
    server_block: &str,
    main: &str,
) -> Result<(PathBuf, PathBuf)> {
    let conf = dir.join(format!("{name}.conf"));
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs"))?;
    write(
        &conf,
        &format!(
            "daemon off;\n{main}\nworker_rlimit_nofile 40000;\npid {p}/nginx.pid;\n\
             error_log {p}/logs/error.log error;\n\
             events {{ worker_connections 20000; }}\n\
             http {{\n access_log off;\n keepalive_requests 1000000;\n \
             client_body_temp_path {p}/body; proxy_temp_path {p}/proxy;\n \
             fastcgi_temp_path {p}/fcgi; uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;\n\
             {server_block}\n}}\n",
            p = prefix.display()
        ),
    )?;
    Ok((conf, prefix))
}

/// nginx's `server` block proxying TLS on `port` to the backend: TLS 1.3 only, the given
/// certificate, kept-alive upstream connections.
fn nginx_proxy_block(port: u16, backend_port: u16, cert: &Path, key: &Path) -> String {
    format!(
        "upstream b {{ server 127.0.0.1:{backend_port}; {NGINX_UPSTREAM_KEEPALIVE} }}\n\
         server {{ listen 127.0.0.1:{port} ssl http2; listen [::1]:{port} ssl http2;\n\
         ssl_certificate {c}; ssl_certificate_key {k}; ssl_protocols TLSv1.3;\n\
         location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}",
        c = cert.display(),
        k = key.display()
    )
}

/// The backend's `server` block: 6 bytes on `port` (and on `extra_listen`).
fn backend_block(port: u16, extra_listen: &str) -> String {
    format!(
        "server {{ listen 127.0.0.1:{port};{extra_listen} location / {{ default_type text/plain; return 200 \"hello\\n\"; }} }}"
    )
}

/// Writes the configuration of a meshgate gateway `name` serving `HOST` on `port` from
/// `backend`; with `peer`, its embedded overlay node links to that workload node (else the
/// backend is dialed over the kernel and may be private).
fn meshgate_config(
    d: &Path,
    name: &str,
    port: u16,
    backend: SocketAddr,
    peer: Option<SocketAddr>,
    (cert, key): (&Path, &Path),
) -> Result<PathBuf> {
    let config = d.join(format!("{name}.toml"));
    let overlay_section = match peer {
        Some(link) => format!(
            "[overlay]\nkey_file = \"{}/{name}-node.key\"\npeers = [\"{link}\"]\n\
             [overlay.discovery]\nenabled = false\n",
            d.display()
        ),
        None => "[security]\nallow_private_backends = true\n".to_string(),
    };
    // The idle-connection row opens 10,000 connections from one client address; nginx and
    // Caddy cap none, so the gateway's per-address cap (256 by default) is raised to match.
    write(
        &config,
        &format!(
            "data_dir = \"{d}\"\n[listen]\nhttps = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\nhttp = []\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n{overlay_section}\
             [timeouts]\nheader_ms = 60000\nconnect_ms = 60000\n\
             [limits]\nmax_connections_per_ip = 20000\n\
             [[tls.certificates]]\ncert = \"{c}\"\nkey = \"{k}\"\n\
             [[route]]\nhost = \"{HOST}\"\nbackends = [{{ addr = \"{backend}\" }}]\n",
            d = d.display(),
            admin = free_port(),
            c = cert.display(),
            k = key.display()
        ),
    )?;
    Ok(config)
}

/// A self-signed ECDSA P-256 certificate for `HOST` in `d`: (cert, key).
fn make_cert(d: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .stderr(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("openssl could not make the certificate");
    }
    Ok((cert, key))
}

fn wait_ok(port: u16, path: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2"])
            .arg(format!("https://{HOST}:{port}{path}"))
            .output()?;
        if out.stdout == b"200" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("server on port {port} not answering")
}

/// (req/s, p50 ms, p99 ms, requests) from wrk.
fn wrk(port: u16, extra: &[&str]) -> Result<(f64, f64, f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t2", "-c50", "-d", DURATION, "--latency"])
        .args(extra)
        .arg(format!("https://{HOST}:{port}/"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk output: {text}"))?;
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| parse_ms(v.trim())))
            .flatten()
            .unwrap_or(f64::NAN)
    };
    // "  123456 requests in 2.00s, 10.01MB read"
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())
        .with_context(|| format!("wrk output: {text}"))?;
    Ok((rps, pct("50%"), pct("99%"), requests))
}

fn parse_ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

fn h2load(port: u16) -> Result<f64> {
    let out = Command::new("h2load")
        .args(["-c50", "-m10", "-t2", "-D", "2"])
        .arg(format!("https://{HOST}:{port}/"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let l = l.strip_prefix("finished in ")?;
            let rps = l.split(", ").nth(1)?.strip_suffix(" req/s")?;
            rps.parse().ok()
        })
        .with_context(|| {
            format!(
                "h2load output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// `pid` and its children (nginx: the master and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids
}

/// Resident memory (KiB) of `pid` and its children.
fn rss_kib(pid: u32) -> u64 {
    with_children(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// CPU time (user + system, µs) used so far by the processes `pids` (all their threads).
fn cpu_micros(pids: &[u32]) -> f64 {
    // SAFETY: sysconf takes an integer name and no pointers; it only reads a system value.
    #[allow(unsafe_code)]
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): state is field 3, utime
            // and stime are fields 14 and 15.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .sum();
    ticks as f64 * 1e6 / ticks_per_s
}

/// Opens `n` TLS connections (handshake done, no request) and measures the server's RSS growth
/// per connection in bytes.
async fn idle_memory(pid: u32, port: u16, n: usize) -> Result<f64> {
    let mut cfg = client_config()?;
    cfg.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let connector = connector.clone();
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire().await.ok()?;
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            let name = rustls::pki_types::ServerName::try_from(HOST).ok()?;
            connector.connect(name, tcp).await.ok()
        });
    }
    let mut conns = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(c)) = r {
            conns.push(c);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    let open = conns.len();
    drop(conns);
    if open < n * 9 / 10 {
        bail!("only {open} of {n} idle connections opened");
    }
    Ok((after.saturating_sub(before) as f64 * 1024.0) / open as f64)
}

/// TLS handshakes per second: 50 clients in a loop of connect → handshake → one
/// `Connection: close` request → response read to the end, for `HANDSHAKE_SECS`. With
/// `resume`, clients offer the session tickets of earlier connections (TLS 1.3 PSK with
/// (EC)DHE, as browsers do); without, every handshake is a full one (certificate, signature,
/// key exchange).
async fn handshakes(port: u16, resume: bool) -> Result<f64> {
    let mut cfg = client_config()?;
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let deadline = Instant::now() + Duration::from_secs(HANDSHAKE_SECS);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let connector = connector.clone();
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                if one_request(&connector, port).await.is_ok() {
                    done += 1;
                }
            }
            done
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap_or(0);
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn one_request(connector: &tokio_rustls::TlsConnector, port: u16) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(HOST)?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut response = Vec::with_capacity(512);
    // Servers may close without close_notify; what counts is a complete 200 answer.
    let _ = tls.read_to_end(&mut response).await;
    if !response.starts_with(b"HTTP/1.1 200") || !response.ends_with(b"hello\n") {
        bail!("unexpected answer");
    }
    Ok(())
}

fn client_config() -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Default)]
struct Figures {
    wrk_rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    h2_rps: Vec<f64>,
    handshakes: Vec<f64>,
    resumed: Vec<f64>,
    idle_bytes: f64,
    /// CPU µs per request during the wrk run: the proxy, the workload node (this process;
    /// overlay rows only), the backend.
    cpu_proxy: Vec<f64>,
    cpu_node: Vec<f64>,
    cpu_backend: Vec<f64>,
    /// RSS (KiB, process and children) before any load, the highest seen under the memory
    /// phase's h2load run, and `AFTER_LOAD` after that run.
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    rss_after_kib: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    // Tools and the binary are ready before a re-run inside the namespace (which has no
    // network for apt, and needs no second build).
    // BENCH_MESHGATE=/path/to/meshgate: measure that build instead of building one (e.g. a
    // copy kept from before a change, while the next build runs).
    let given = std::env::var_os("BENCH_MESHGATE").map(PathBuf::from);
    if !meshgate_bench::in_netns() {
        ensure_tools()?;
        if given.is_none() {
            build_meshgate()?;
        }
    }
    let meshgate = given.unwrap_or_else(|| workspace_root().join("target/release/meshgate"));
    // With root and /dev/net/tun, everything runs again inside a network namespace of its own,
    // where a workload node can have a TUN interface (the meshgate-tun row).
    if meshgate_bench::can_enter_netns() {
        return meshgate_bench::enter_netns();
    }
    let with_tun = meshgate_bench::in_netns();
    let dir = tempfile_dir()?;
    let d = dir.as_path();
    if std::env::args().nth(1).as_deref() == Some("callgrind") {
        let result = callgrind::run(&meshgate, d).await;
        let _ = std::fs::remove_dir_all(d);
        return result;
    }
    let (cert, key) = make_cert(d)?;

    // The backend: nginx answering 6 bytes.
    let backend_port = free_port();
    // The workload node in TUN mode, as on a workload host that runs the overlay as a system
    // daemon: the backend listens on the node's overlay address too, and packets go from the
    // node to the backend's kernel socket through the TUN interface (no userspace TCP, no
    // splice, no second kernel connection).
    let tun_workload = if with_tun {
        Some(start_tun_workload(d).await?)
    } else {
        None
    };
    let tun_listen = tun_workload
        .as_ref()
        .map(|(node, _)| format!(" listen [{}]:{backend_port};", node.address()))
        .unwrap_or_default();
    let backend = Proc {
        name: "backend",
        port: backend_port,
        child: start_nginx(d, "backend", &backend_block(backend_port, &tun_listen), "1")?,
    };

    // nginx terminating TLS, keep-alive pool to the backend. As many workers (and Caddy as
    // many Go threads) as the gateway's tokio runtime has threads: one per core.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let nginx_port = free_port();
    let nginx = Proc {
        name: "nginx",
        port: nginx_port,
        child: start_nginx(
            d,
            "proxy",
            &nginx_proxy_block(nginx_port, backend_port, &cert, &key),
            &workers.to_string(),
        )?,
    };

    // Caddy terminating TLS with the same certificate.
    let caddy_port = free_port();
    let caddyfile = d.join("Caddyfile");
    write(
        &caddyfile,
        &format!(
            "{{\n admin off\n auto_https off\n}}\n\
             https://{HOST}:{caddy_port} {{\n bind 127.0.0.1 ::1\n tls {c} {k} {{\n  protocols tls1.3\n }}\n \
             reverse_proxy 127.0.0.1:{backend_port} {{\n{CADDY_TRANSPORT} }}\n}}\n",
            c = cert.display(),
            k = key.display()
        ),
    )?;
    let caddy = Proc {
        name: "caddy",
        port: caddy_port,
        child: Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("HOME", d)
            .env("GOMAXPROCS", workers.to_string())
            .env("XDG_DATA_HOME", d.join("caddy-data"))
            .env("XDG_CONFIG_HOME", d.join("caddy-config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };

    // meshgate: TLS → embedded overlay node → workload node (here) → backend.
    // The workload node runs in this process: no transparent huge pages, as `meshgate` (see
    // gateway/src/main.rs). Set after nginx and Caddy started, which would inherit it.
    // SAFETY: prctl with PR_SET_THP_DISABLE takes only integers (no pointers) and changes
    // only this process's huge-page policy, which no Rust invariant depends on.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
    };
    let workload = start_workload_node(d, "workload.key").await?;
    let port = workload.take_l3_port().context("workload L3 port")?;
    let stack = Stack::new(port.address, port.mtu, port.tx, port.rx);
    let _exposed =
        meshgate_sockets::expose(&stack, 80, SocketAddr::from(([127, 0, 0, 1], backend_port)))?;
    let overlay_backend = SocketAddr::from((workload.address(), 80));
    let link = workload.listen_addr().context("workload link")?;
    // `peer`: the workload node the gateway's embedded overlay node links to; none for a
    // direct backend.
    let start_meshgate =
        |name: &'static str, backend: SocketAddr, peer: Option<SocketAddr>| -> Result<Proc> {
            let port = free_port();
            let config = meshgate_config(d, name, port, backend, peer, (&cert, &key))?;
            Ok(Proc {
                name,
                port,
                child: Command::new(&meshgate)
                    .args(["gateway", "--config"])
                    .arg(&config)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            })
        };
    let gateway = start_meshgate("meshgate", overlay_backend, Some(link))?;
    let direct = start_meshgate(
        "meshgate-direct",
        SocketAddr::from(([127, 0, 0, 1], backend_port)),
        None,
    )?;
    let tun_gateway = match &tun_workload {
        Some((node, _)) => Some(start_meshgate(
            "meshgate-tun",
            SocketAddr::from((node.address(), backend_port)),
            Some(node.listen_addr().context("TUN workload link")?),
        )?),
        None => None,
    };

    // BENCH_HTTP_FLOOR=/path/to/http_floor: the lean proxy path (see the callgrind module) as
    // rows of their own, direct and through the TUN workload node.
    let floor_bin = std::env::var_os("BENCH_HTTP_FLOOR");
    let start_floor = |name: &'static str,
                       backend: SocketAddr,
                       overlay: Option<SocketAddr>|
     -> Result<Option<Proc>> {
        let Some(bin) = &floor_bin else {
            return Ok(None);
        };
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("127.0.0.1:{port}"))
            .arg(backend.to_string())
            .args([&cert, &key]);
        if let Some(peer) = overlay {
            cmd.arg(d.join(format!("{name}-node.key")))
                .arg(peer.to_string());
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(Some(Proc { name, child, port }))
    };
    let floor = start_floor(
        "floor",
        SocketAddr::from(([127, 0, 0, 1], backend_port)),
        None,
    )?;
    let floor_tun = match &tun_workload {
        Some((node, _)) => start_floor(
            "floor-tun",
            SocketAddr::from((node.address(), backend_port)),
            Some(node.listen_addr().context("TUN workload link")?),
        )?,
        None => None,
    };

    let mut servers = vec![&gateway, &nginx, &caddy, &direct];
    servers.extend(tun_gateway.as_ref());
    servers.extend(floor.as_ref());
    servers.extend(floor_tun.as_ref());
    for s in &servers {
        wait_ok(s.port, "/").with_context(|| format!("{} not ready", s.name))?;
    }
    let _ = &backend;
    if std::env::var_os("BENCH_HOLD").is_some() {
        // Keep everything up for profiling by hand.
        for s in &servers {
            eprintln!("{} port {} pid {}", s.name, s.port, s.child.id());
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    let mut figures: Vec<Figures> = servers.iter().map(|_| Figures::default()).collect();
    // Idle RSS: after one request each (wait_ok), before any load.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, s) in servers.iter().enumerate() {
        figures[i].rss_idle_kib = rss_kib(s.child.id());
    }
    // Memory under h2load and after it, one server at a time: each server's RSS is read again
    // AFTER_LOAD after its own run, while the others run theirs (they don't touch it).
    let mut after_reads = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let pid = s.child.id();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak.max(rss_kib(pid))
            })
        };
        let rps = h2load(s.port)?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        figures[i].rss_peak_kib = sampler.join().unwrap_or(0);
        let ended = Instant::now();
        after_reads.push(std::thread::spawn(move || {
            std::thread::sleep(AFTER_LOAD.saturating_sub(ended.elapsed()));
            rss_kib(pid)
        }));
        eprintln!(
            "memory {}: h2load {rps:.0} req/s, RSS idle {} KiB, peak {} KiB",
            s.name, figures[i].rss_idle_kib, figures[i].rss_peak_kib
        );
    }
    for (i, read) in after_reads.into_iter().enumerate() {
        figures[i].rss_after_kib = read.join().unwrap_or(0);
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let memory_rows: Vec<String> = servers
        .iter()
        .zip(&figures)
        .map(|(s, f)| {
            format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.2}× |",
                s.name,
                mib(f.rss_idle_kib),
                mib(f.rss_peak_kib),
                mib(f.rss_after_kib),
                f.rss_after_kib as f64 / f.rss_idle_kib.max(1) as f64
            )
        })
        .collect();
    let memory_table = format!(
        "| server | idle RSS MiB | peak RSS MiB under h2load | RSS MiB {}s after | after / idle |\n\
         |---|---|---|---|---|\n{}",
        AFTER_LOAD.as_secs(),
        memory_rows.join("\n")
    );

    // BENCH_QUICK=1: wrk and h2load only, printed, docs untouched (for trying changes).
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    // Idle memory first, on fresh processes (after one request each), before load has grown
    // the allocators' free lists.
    for (i, s) in servers.iter().enumerate().filter(|_| !quick) {
        figures[i].idle_bytes = idle_memory(s.child.id(), s.port, IDLE_CONNS).await?;
        eprintln!(
            "{}: {:.1} KiB per idle TLS connection",
            s.name,
            figures[i].idle_bytes / 1024.0
        );
    }
    let me = std::process::id();
    for round in 0..ROUNDS {
        for (i, s) in servers.iter().enumerate() {
            let cpu = || {
                [
                    cpu_micros(&with_children(s.child.id())),
                    // This process alone: its children are the servers and load generators.
                    cpu_micros(&[me]),
                    cpu_micros(&with_children(backend.child.id())),
                ]
            };
            let before = cpu();
            let (rps, p50, p99, requests) = wrk(s.port, &[])?;
            let after = cpu();
            let f = &mut figures[i];
            f.cpu_proxy.push((after[0] - before[0]) / requests);
            f.cpu_node.push((after[1] - before[1]) / requests);
            f.cpu_backend.push((after[2] - before[2]) / requests);
            f.wrk_rps.push(rps);
            f.p50.push(p50);
            f.p99.push(p99);
            f.h2_rps.push(h2load(s.port)?);
            if !quick {
                f.handshakes.push(handshakes(s.port, false).await?);
                f.resumed.push(handshakes(s.port, true).await?);
            }
            eprintln!(
                "round {round} {}: wrk {rps:.0} req/s p50 {p50:.2} ms p99 {p99:.2} ms, h2 {:.0} req/s, handshakes {:.0}/s full, {:.0}/s resumed",
                s.name,
                f.h2_rps.last().unwrap_or(&0.0),
                f.handshakes.last().unwrap_or(&0.0),
                f.resumed.last().unwrap_or(&0.0)
            );
        }
    }

    let med = |v: &[f64]| median(&mut v.to_vec());
    // The workload node runs in this process: its CPU counts for the overlay rows only.
    let has_node = |name: &str| matches!(name, "meshgate" | "meshgate-tun" | "floor-tun");
    let cpu_rows: Vec<String> = servers
        .iter()
        .zip(&figures)
        .map(|(s, f)| {
            let node = has_node(s.name).then(|| med(&f.cpu_node));
            let (proxy, backend) = (med(&f.cpu_proxy), med(&f.cpu_backend));
            format!(
                "| {} | {proxy:.1} | {} | {backend:.1} | {:.1} |",
                s.name,
                node.map_or("–".into(), |n| format!("{n:.1}")),
                proxy + node.unwrap_or(0.0) + backend
            )
        })
        .collect();
    let cpu_table = format!(
        "| server | proxy | workload node | backend | sum |\n|---|---|---|---|---|\n{}",
        cpu_rows.join("\n")
    );
    // Each ratio is taken within one round (the servers ran back to back), then the median.
    let ratio = |a: usize, b: usize, pick: fn(&Figures) -> &Vec<f64>| {
        let mut r: Vec<f64> = pick(&figures[a])
            .iter()
            .zip(pick(&figures[b]))
            .map(|(x, y)| x / y)
            .collect();
        median(&mut r)
    };
    let wrk_of: fn(&Figures) -> &Vec<f64> = |f| &f.wrk_rps;
    let h2_of: fn(&Figures) -> &Vec<f64> = |f| &f.h2_rps;
    if quick {
        eprintln!("CPU µs per request (wrk):\n{cpu_table}");
        eprintln!("Memory (process and children):\n{memory_table}");
        // Every other row against nginx (row 1).
        for (i, s) in servers.iter().enumerate().filter(|(i, _)| *i != 1) {
            eprintln!(
                "{} / nginx: wrk {:.2}×, h2load {:.2}×",
                s.name,
                ratio(i, 1, wrk_of),
                ratio(i, 1, h2_of)
            );
        }
        return Ok(());
    }
    let rows: Vec<String> = servers
        .iter()
        .zip(&figures)
        .map(|(s, f)| {
            format!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} |",
                s.name,
                med(&f.wrk_rps),
                med(&f.p50),
                med(&f.p99),
                med(&f.h2_rps),
                med(&f.handshakes),
                med(&f.resumed),
                f.idle_bytes / 1024.0
            )
        })
        .collect();
    let hs_of: fn(&Figures) -> &Vec<f64> = |f| &f.handshakes;
    let res_of: fn(&Figures) -> &Vec<f64> = |f| &f.resumed;
    let tun_note = if tun_gateway.is_some() {
        format!(
            " meshgate-tun (the workload node in TUN mode): wrk req/s {:.2}× nginx, {:.2}× \
             Caddy; h2load req/s {:.2}× nginx, {:.2}× Caddy.",
            ratio(4, 1, wrk_of),
            ratio(4, 2, wrk_of),
            ratio(4, 1, h2_of),
            ratio(4, 2, h2_of),
        )
    } else {
        " meshgate-tun: not run (needs root and /dev/net/tun for its network namespace)."
            .to_string()
    };
    let md = format!(
        "## gateway\n\n\
         Small keep-alive responses (6-byte body) on loopback, 2 cores shared by load generator and \
         servers. meshgate: TLS termination → embedded overlay node → overlay link → workload \
         node (userspace TCP, `expose`d to the backend over loopback TCP) → backend; \
         meshgate-tun: the same, with the workload node in TUN mode and the backend listening on \
         its overlay address (the kernel's TCP talks to the overlay through the TUN interface, as \
         on a workload host running the overlay daemon); meshgate-direct: the same gateway with the backend dialed directly (no \
         overlay), to separate the gateway's cost from the overlay's. nginx 1.22 and Caddy 2.6: \
         TLS termination → backend directly. Same ECDSA P-256 certificate, access logs off, TLS 1.3 \
         everywhere (nginx 1.22 defaults to TLS ≤ 1.2, so its config enables 1.3). wrk: HTTP/1.1, \
         50 connections, {DURATION}; h2load: HTTP/2, 50 connections × 10 streams; handshakes: a \
         rustls client, 50 concurrent loops of connect → TLS 1.3 handshake → one `Connection: \
         close` request for {HANDSHAKE_SECS} s, full (no resumption offered) and resumed (session \
         tickets offered, PSK with ECDHE); idle: RSS growth with {IDLE_CONNS} handshaken idle TLS \
         connections. Medians of {ROUNDS} interleaved rounds; each ratio is taken within a round.\n\n\
         | server | wrk req/s | p50 ms | p99 ms | h2load req/s | full TLS handshakes/s | resumed handshakes/s | KiB per idle TLS conn |\n\
         |---|---|---|---|---|---|---|---|\n{}\n\n\
         Ratios (meshgate / reference): wrk req/s {:.2}× nginx, {:.2}× Caddy; h2load req/s {:.2}× \
         nginx, {:.2}× Caddy; full handshakes/s {:.2}× nginx, {:.2}× Caddy; resumed handshakes/s \
         {:.2}× nginx. Targets: ≥ 0.8× nginx and ≥ 1.5× Caddy req/s; handshakes/s ≥ nginx; \
         ≤ 20 KiB per idle connection. meshgate-direct: wrk req/s {:.2}× nginx, h2load req/s \
         {:.2}× nginx, full handshakes/s {:.2}× nginx.{tun_note} All rows run inside one \
         network namespace made by the benchmark.\n\n\
         CPU time per request during the wrk runs (µs, user + system from /proc, medians of the \
         rounds). The workload node runs inside the benchmark process; the backend is the same \
         nginx for every row.\n\n{cpu_table}\n\n\
         Memory: RSS of the server process and its children (nginx: master and workers; \
         meshgate's overlay row: the gateway process, whose embedded node is in it) before any \
         load, its peak under one h2load run (50 connections × 10 streams, sampled every 20 ms), \
         and {after}s after that run. This runs first, on fresh processes. Target for \
         meshgate: peak ≤ 100 MiB, after ≤ 2× idle.\n\n{memory_table}\n",
        rows.join("\n"),
        ratio(0, 1, wrk_of),
        ratio(0, 2, wrk_of),
        ratio(0, 1, h2_of),
        ratio(0, 2, h2_of),
        ratio(0, 1, hs_of),
        ratio(0, 2, hs_of),
        ratio(0, 1, res_of),
        ratio(3, 1, wrk_of),
        ratio(3, 1, h2_of),
        ratio(3, 1, hs_of),
        after = AFTER_LOAD.as_secs(),
    );
    println!("{md}");
    write_section("gateway", &md)?;
    drop(tun_gateway);
    drop(direct);
    drop(gateway);
    drop(caddy);
    drop(nginx);
    drop(backend);
    workload.shutdown().await;
    if let Some((node, tun)) = tun_workload {
        drop(tun);
        node.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(d);
    Ok(())
}

/// A workload node in this process, with its key in `d` and links on a loopback port.
async fn start_workload_node(d: &Path, key_file: &str) -> Result<Node> {
    Ok(Node::start(NodeConfig {
        key_path: d.join(key_file),
        listen: Some("127.0.0.1:0".parse()?),
        ..NodeConfig::default()
    })
    .await?)
}

/// A workload node whose L3 port is a TUN interface (inside the benchmark's namespace), ready
/// once its overlay address can be bound.
async fn start_tun_workload(d: &Path) -> Result<(Node, Tun)> {
    skip_dad();
    let node = start_workload_node(d, "workload-tun.key").await?;
    let port = node.take_l3_port().context("TUN workload L3 port")?;
    let tun = Tun::start("mgbench0", port.address, port.mtu, port.tx, port.rx)?;
    wait_bindable(node.address(), Duration::from_secs(10)).await?;
    Ok((node, tun))
}

/// Waits until a TUN node's overlay address can be bound (its interface is up and carries it).
async fn wait_bindable(address: std::net::Ipv6Addr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while std::net::TcpListener::bind((address, 0)).is_err() {
        if Instant::now() > deadline {
            bail!("TUN address {address} never became usable");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// In the bench's own namespace: no duplicate address detection, so a TUN node's overlay
/// address is usable as soon as its interface is up instead of staying tentative.
fn skip_dad() {
    for key in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/accept_dad"), "0");
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("meshgate-bench-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
