//! The operator's and the deployers' listeners over TLS (`[admin] tls`, `[api] tls`): the real
//! `meshgate gateway` binary, the real `meshgate reserve` CLI with `--cacert`, curl, and a raw
//! plain-HTTP client that must fail.

use meshgate_testkit::curl::curl;
use meshgate_testkit::net::silent_udp;
use meshgate_testkit::process::GatewayProcess;
use meshgate_testkit::tls::TestCa;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A `meshgate gateway` process (killed on drop) and the name server it never hears from.
struct Gateway {
    process: GatewayProcess,
    admin: u16,
    api: u16,
    _dns: std::net::UdpSocket,
}

impl Gateway {
    /// Starts the binary with loopback listeners, reservations for `gw.test`, a name server
    /// nobody answers on (the verifier stays on this machine) and `tls` as both `[admin] tls`
    /// and `[api] tls`.
    fn start(dir: &Path, tls: &str, extra: &str) -> Gateway {
        let (dns_socket, dns) = silent_udp();
        let process =
            GatewayProcess::start_with(Path::new(env!("CARGO_BIN_EXE_meshgate")), dir, |p| {
                format!(
                    "domains = [\"gw.test\"]\ndata_dir = \"{d}/data\"\n\
                     [listen]\nhttps = [\"127.0.0.1:{https}\"]\nhttp = [\"127.0.0.1:{http}\"]\n\
                     [admin]\nlisten = \"127.0.0.1:{admin}\"\ntls = {tls}\n\
                     [api]\nlisten = \"127.0.0.1:{api}\"\ntls = {tls}\n\
                     [reservations]\nnameservers = [\"{dns}\"]\nquery_timeout_ms = 200\n{extra}",
                    d = dir.display(),
                    https = p.https,
                    http = p.http,
                    admin = p.admin,
                    api = p.api,
                )
            });
        Gateway {
            admin: process.admin,
            api: process.api,
            process,
            _dns: dns_socket,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.process.dir.join("data/admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `meshgate reserve --api <url> <args…>` with `MESHGATE_TOKEN=token`.
    fn reserve(&self, url: &str, token: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshgate"));
        cmd.arg("reserve")
            .args(["--api", url])
            .args(args)
            .env("MESHGATE_TOKEN", token)
            .env_remove("MESHGATE_CACERT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
fn write_admin_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = TestCa::new("admin test CA");
    let (ca_path, cert, key) = (
        dir.join("admin-ca.pem"),
        dir.join("admin.pem"),
        dir.join("admin.key"),
    );
    ca.write_pem(&ca_path);
    ca.issue(&["127.0.0.1"]).write_pem(&cert, &key);
    (ca_path, cert, key)
}

#[test]
fn reserve_cli_over_api_tls_and_plain_http_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = write_admin_cert(dir.path());
    let gw = Gateway::start(
        dir.path(),
        &format!(
            "{{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        ),
        "",
    );
    let https = format!("https://127.0.0.1:{}", gw.api);
    let operator = format!("https://127.0.0.1:{}", gw.admin);
    let ca_s = ca.to_str().unwrap();

    // The farmer creates a deployer token over TLS.
    let out = gw.reserve(
        &https,
        &gw.admin_token(),
        &["--cacert", ca_s, "token", "alice", "--json"],
        &[],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), gw.log());
    let token: Value = serde_json::from_slice(&out.stdout).unwrap();
    let alice = token["token"].as_str().unwrap().to_string();

    // The deployer reserves a name (CA from `MESHGATE_CACERT`) and lists it.
    let out = gw.reserve(
        &https,
        &alice,
        &["name", "web", "--backend", "[400:1::5]:8080", "--json"],
        &[("MESHGATE_CACERT", &ca)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["host"], "web.gw.test");
    let out = gw.reserve(&https, &alice, &["--cacert", ca_s, "list"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("web.gw.test") && listing.contains("[400:1::5]:8080"),
        "{listing}"
    );

    // Without our CA the server certificate is not trusted.
    let out = gw.reserve(&https, &alice, &["list"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid peer certificate"),
        "{}",
        text(&out)
    );

    // `/status` and `/metrics` are on the operator's TLS listener.
    let c = curl(&["--cacert", ca_s, &format!("{operator}/status")]);
    let (ok, code, body) = (c.success, c.status, c.body);
    assert!(ok && code == 200, "{code} {body}");
    assert!(body.contains("\"routes\""), "{body}");
    let c = curl(&["--cacert", ca_s, &format!("{operator}/metrics")]);
    let (ok, code) = (c.success, c.status);
    assert!(ok && code == 200, "{code}");

    // Plain HTTP to either TLS port gets no HTTP answer: not from curl, not from the CLI, not
    // from a raw request.
    let c = curl(&[&format!("http://127.0.0.1:{}/status", gw.admin)]);
    let (code, body) = (c.status, c.body);
    assert_eq!(code, 0, "plain HTTP was answered: {body}");
    let http = format!("http://127.0.0.1:{}", gw.api);
    let c = curl(&[&format!("{http}/v1/whoami")]);
    let (code, body) = (c.status, c.body);
    assert_eq!(code, 0, "plain HTTP was answered: {body}");
    let out = gw.reserve(&http, &alice, &["list"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("use an https:// URL"),
        "{}",
        text(&out)
    );
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", gw.api)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // What came back, if anything, is a TLS alert record.
    if let Some(first) = answer.first() {
        assert_eq!(*first, 0x15, "not a TLS alert: {answer:?}");
    }
}

#[test]
fn admin_and_api_tls_from_the_dev_ca() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(
        dir.path(),
        "{ dev_ca = true }",
        &format!("[tls.dev_ca]\ndir = \"{}/ca\"\n", dir.path().display()),
    );
    let ca = dir.path().join("ca/ca.pem");
    let ca_s = ca.to_str().unwrap();
    let operator = format!("https://127.0.0.1:{}", gw.admin);
    let c = curl(&["--cacert", ca_s, &format!("{operator}/status")]);
    let (ok, code, body) = (c.success, c.status, c.body);
    assert!(ok && code == 200, "{code} {body}\n{}", gw.log());
    let https = format!("https://127.0.0.1:{}", gw.api);
    // `localhost` is on the certificate as well.
    let c = curl(&[
        "--cacert",
        ca_s,
        &format!("https://localhost:{}/v1/whoami", gw.api),
        "-H",
        &format!("Authorization: Bearer {}", gw.admin_token()),
    ]);
    let (ok, code, body) = (c.success, c.status, c.body);
    assert!(ok && code == 200, "{code} {body}");
    let out = gw.reserve(&https, &gw.admin_token(), &["--cacert", ca_s, "list"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no reservations"),
        "{}",
        text(&out)
    );
}
