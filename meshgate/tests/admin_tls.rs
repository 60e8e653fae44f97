//! The admin listener over TLS (`[admin] tls`): the real `meshgate gateway` binary, the real
//! `meshgate reserve` CLI with `--cacert`, curl, and a raw plain-HTTP client that must fail.

use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `meshgate gateway` process (killed on drop).
struct Gateway {
    child: Child,
    dir: PathBuf,
    admin: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts the binary with loopback listeners, reservations for `gw.test`, a name server
    /// nobody answers on (the verifier stays on this machine) and `admin_tls` as `[admin] tls`.
    fn start(dir: &Path, admin_tls: &str, extra: &str) -> Gateway {
        let (https, http, admin, dns) = (free_port(), free_port(), free_port(), free_port());
        let config = format!(
            "domains = [\"gw.test\"]\ndata_dir = \"{d}/data\"\n\
             [listen]\nhttps = [\"127.0.0.1:{https}\"]\nhttp = [\"127.0.0.1:{http}\"]\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\ntls = {admin_tls}\n\
             [reservations]\nnameservers = [\"127.0.0.1:{dns}\"]\nquery_timeout_ms = 200\n{extra}",
            d = dir.display()
        );
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
            .args(["gateway", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut g = Gateway {
            child,
            dir: dir.to_path_buf(),
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!("gateway exited early ({status}): {}", g.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "gateway not ready: {}", g.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        g
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `meshgate reserve --admin <url> <args…>` with `MESHGATE_TOKEN=token`.
    fn reserve(&self, url: &str, token: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshgate"));
        cmd.arg("reserve")
            .args(["--admin", url])
            .args(args)
            .env("MESHGATE_TOKEN", token)
            .env_remove("MESHGATE_CACERT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

/// curl; returns (exit success, HTTP status, body).
fn curl(args: &[&str]) -> (bool, u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.success(),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
    )
}

fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A CA and an admin certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
fn write_admin_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (ca, cert, key_path) = (
        dir.join("admin-ca.pem"),
        dir.join("admin.pem"),
        dir.join("admin.key"),
    );
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (ca, cert, key_path)
}

#[test]
fn reserve_cli_over_admin_tls_and_plain_http_refused() {
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
    let https = format!("https://127.0.0.1:{}", gw.admin);
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

    // `/status` and `/metrics` are on the TLS listener too.
    let (ok, code, body) = curl(&["--cacert", ca_s, &format!("{https}/status")]);
    assert!(ok && code == 200, "{code} {body}");
    assert!(body.contains("\"routes\""), "{body}");
    let (ok, code, _) = curl(&["--cacert", ca_s, &format!("{https}/metrics")]);
    assert!(ok && code == 200, "{code}");

    // Plain HTTP to the TLS port gets no HTTP answer: not from curl, not from the CLI, not
    // from a raw request.
    let http = format!("http://127.0.0.1:{}", gw.admin);
    let (_, code, body) = curl(&[&format!("{http}/status")]);
    assert_eq!(code, 0, "plain HTTP was answered: {body}");
    let out = gw.reserve(&http, &alice, &["list"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("use an https:// URL"),
        "{}",
        text(&out)
    );
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", gw.admin)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
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
fn admin_tls_from_the_dev_ca() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(
        dir.path(),
        "{ dev_ca = true }",
        &format!("[tls.dev_ca]\ndir = \"{}/ca\"\n", dir.path().display()),
    );
    let ca = dir.path().join("ca/ca.pem");
    let ca_s = ca.to_str().unwrap();
    let https = format!("https://127.0.0.1:{}", gw.admin);
    let (ok, code, body) = curl(&["--cacert", ca_s, &format!("{https}/status")]);
    assert!(ok && code == 200, "{code} {body}\n{}", gw.log());
    // `localhost` is on the certificate as well.
    let (ok, code, body) = curl(&[
        "--cacert",
        ca_s,
        &format!("https://localhost:{}/v1/whoami", gw.admin),
        "-H",
        &format!("Authorization: Bearer {}", gw.admin_token()),
    ]);
    assert!(ok && code == 200, "{code} {body}");
    let out = gw.reserve(&https, &gw.admin_token(), &["--cacert", ca_s, "list"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no reservations"),
        "{}",
        text(&out)
    );
}
