//! HSTS per route and the JSON access log, on the real `meshgate gateway` process with real
//! clients (curl over HTTP/1.1 and h2, a hyper h2 client): `options.hsts` puts the route's
//! `Strict-Transport-Security` on HTTPS responses only; `[log] access = "json"` writes one
//! JSON object per request on stdout with the documented fields, and never a token, an
//! `Authorization` or `Cookie` value, or a query string.

mod common;

use bytes::Bytes;
use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_testkit::http::{Protocol, full_body, serve_http};
use meshgate_testkit::net::Reserved;
use meshgate_testkit::process::Ports;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECRETS: [&str; 3] = [
    "SECRET-TOKEN-4711",
    "SECRET-COOKIE-0815",
    "SECRET-QUERY-1234",
];

/// The gateway binary with stdout (the JSON access log) and stderr kept in files; the kit's
/// fixture discards stdout, so this test starts the process itself.
struct Gateway {
    child: Child,
    dir: std::path::PathBuf,
    ports: Ports,
    _reserved: [Reserved; 4],
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(dir: &Path, body: &str) -> Gateway {
        let reserved = [
            Reserved::loopback(),
            Reserved::loopback(),
            Reserved::loopback(),
            Reserved::loopback(),
        ];
        let ports = Ports {
            https: reserved[0].port(),
            http: reserved[1].port(),
            admin: reserved[2].port(),
            api: reserved[3].port(),
        };
        let config = dir.join("gateway.toml");
        std::fs::write(&config, GatewayProcess::config_text(dir, &ports, body)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["gateway", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,meshgate=debug,meshgate_gateway=debug")
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let gw = Gateway {
            child,
            dir: dir.to_path_buf(),
            ports,
            _reserved: reserved,
        };
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], ports.admin));
        meshgate_testkit::eventually::eventually_blocking(
            Duration::from_secs(20),
            "the gateway to listen",
            || std::net::TcpStream::connect(admin).map(drop),
        );
        gw
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// curl to `https://host/path` with the dev CA: the response head (lowercased names).
    fn curl_https(&self, host: &str, path: &str, extra: &[&str]) -> String {
        let ca = self.dir.join("ca/ca.pem");
        let out = Command::new("curl")
            .args(["-sS", "-m", "20", "-o", "/dev/null", "-D", "-", "--cacert"])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("{host}:{}:127.0.0.1", self.ports.https))
            .args(extra)
            .arg(format!("https://{host}:{}{path}", self.ports.https))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    }

    fn curl_http(&self, host: &str, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "-m", "20", "-o", "/dev/null", "-D", "-", "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("http://127.0.0.1:{}{path}", self.ports.http))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    }
}

fn sts(head: &str) -> Vec<&str> {
    head.lines()
        .filter_map(|l| l.strip_prefix("strict-transport-security:"))
        .map(str::trim)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_on_https_only_and_json_access_log_without_secrets() {
    // The backend sends its own weak HSTS header: the route's setting replaces it.
    let (l, _) = meshgate_testkit::listener().await;
    let backend = serve_http(l, Protocol::Http1, |_req| async {
        http::Response::builder()
            .header("strict-transport-security", "max-age=1")
            .body(full_body("hello"))
            .unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let b = backend.addr();
    let gw = Gateway::start(
        dir.path(),
        &format!(
            "[log]\naccess = \"json\"\n\
             [security]\nallow_private_backends = true\n\
             [[route]]\nhost = \"secure.meshgate.test\"\nbackends = [{{ addr = \"{b}\" }}]\n\
             [route.options]\nallow_plain_http = true\n\
             [route.options.hsts]\nmax_age = 63072000\ninclude_subdomains = true\npreload = true\n\
             [[route]]\nhost = \"plain.meshgate.test\"\nbackends = [{{ addr = \"{b}\" }}]\n\
             [[route]]\nhost = \"short.meshgate.test\"\nbackends = [{{ addr = \"{b}\" }}]\n\
             options = {{ hsts = {{ max_age = 600 }} }}\n"
        ),
    );
    let secret_args = [
        "-H",
        "Authorization: Bearer SECRET-TOKEN-4711",
        "-H",
        "Cookie: session=SECRET-COOKIE-0815",
    ];

    // HTTPS over HTTP/1.1 and h2 (curl): the route's header, replacing the backend's.
    let full = "max-age=63072000; includesubdomains; preload";
    for version in ["--http1.1", "--http2"] {
        let head = gw.curl_https(
            "secure.meshgate.test",
            "/a/b?token=SECRET-QUERY-1234",
            &[&secret_args[..], &[version]].concat(),
        );
        assert!(head.contains(" 200"), "{head}\n{}", gw.stderr());
        assert_eq!(sts(&head), vec![full], "{version}: {head}");
    }
    let head = gw.curl_https("short.meshgate.test", "/", &[]);
    assert_eq!(sts(&head), vec!["max-age=600"], "{head}");
    // A route without `hsts`: the gateway adds nothing (the backend's header passes).
    let head = gw.curl_https("plain.meshgate.test", "/", &[]);
    assert_eq!(sts(&head), vec!["max-age=1"], "{head}");
    // Plain HTTP on the same route: never an HSTS header from the gateway.
    let head = gw.curl_http("secure.meshgate.test", "/plain");
    assert!(head.contains(" 200"), "{head}");
    assert_eq!(sts(&head), vec!["max-age=1"], "plain HTTP: {head}");

    // A hyper h2 client sees it too.
    let tls = meshgate_testkit::tls::tls_connect(
        std::net::SocketAddr::from(([127, 0, 0, 1], gw.ports.https)),
        "secure.meshgate.test",
        &meshgate_testkit::tls::roots_from_pem_file(&dir.path().join("ca/ca.pem")),
        &[b"h2"],
    )
    .await
    .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("https://secure.meshgate.test/h2")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=63072000; includeSubDomains; preload"
    );

    // The JSON access log: one object per line, every request, the documented fields.
    let records: Vec<serde_json::Value> = meshgate_testkit::eventually::eventually_blocking(
        Duration::from_secs(5),
        "six access records",
        || {
            let out = gw.stdout();
            let records: Vec<serde_json::Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            if records.len() >= 6 {
                Ok(records)
            } else {
                Err(out)
            }
        },
    );
    assert_eq!(records.len(), 6, "{records:#?}");
    let secure: Vec<_> = records
        .iter()
        .filter(|r| r["route"] == "secure.meshgate.test")
        .collect();
    assert_eq!(secure.len(), 4, "{records:#?}");
    let versions: Vec<_> = secure
        .iter()
        .filter(|r| r["path"] == "/a/b")
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, vec!["HTTP/1.1", "HTTP/2.0"]);
    let first = secure[0];
    assert_eq!(first["kind"], "request");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "secure.meshgate.test");
    assert_eq!(first["status"], 200);
    assert_eq!(first["proto"], "https");
    assert_eq!(first["backend"], b.to_string());
    assert!(first["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(first["ms"].is_u64() && first["ts_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let plain = secure
        .iter()
        .find(|r| r["path"] == "/plain")
        .expect("plain record");
    assert_eq!(plain["proto"], "http");

    // No secret anywhere: not in the access log, not in the diagnostics (at debug level).
    let (out, err) = (gw.stdout(), gw.stderr());
    for s in SECRETS {
        assert!(!out.contains(s), "{s} in the access log:\n{out}");
        assert!(!err.contains(s), "{s} in the diagnostics:\n{err}");
    }
    // JSON mode: the access records are not repeated as text among the diagnostics.
    assert!(!err.contains("access: request"), "{err}");
    drop(backend);
}
