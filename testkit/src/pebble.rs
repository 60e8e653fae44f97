//! Pebble, the ACME test server, as a child process on loopback.
//!
//! Its ACME and management ports are [`Reserved`](crate::net::Reserved) until it listens
//! (Go's listeners set `SO_REUSEADDR`, so it binds them while they are held). The ports it
//! validates on (HTTP-01, TLS-ALPN-01) and its DNS server are the test's own, bound before.

use crate::eventually::eventually_ok;
use crate::net::Reserved;
use crate::tls::{TestCa, https_get, roots_from_pem_file};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Pebble is installed (`scripts/install-test-deps.sh`).
pub const PEBBLE: &str = "/usr/bin/pebble";

/// What Pebble validates against.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Port Pebble connects to for HTTP-01 (on the address the test names resolve to).
    pub http_port: u16,
    /// Port Pebble connects to for TLS-ALPN-01.
    pub tls_port: u16,
    /// The DNS server Pebble resolves names with.
    pub dns: SocketAddr,
    /// Certificate lifetime in seconds (Pebble's `certificateValidityPeriod`).
    pub validity_secs: Option<u64>,
}

/// A Pebble process, killed when dropped (and when the test process dies).
pub struct Pebble {
    child: Child,
    pub dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory_url: String,
    pub management: SocketAddr,
    /// PEM root that signs Pebble's own HTTPS certificate (for `acme.ca_root`).
    pub https_root: PathBuf,
    pub log: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// Starts Pebble and waits until both its ports accept connections.
    pub async fn start(opts: PebbleOptions) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("pebble https test CA");
        let https_root = dir.path().join("https-ca.pem");
        ca.write_pem(&https_root);
        let leaf = ca.issue(&["localhost", "127.0.0.1"]);
        leaf.write_pem(&dir.path().join("cert.pem"), &dir.path().join("key.pem"));
        let (acme, mgmt) = (Reserved::loopback(), Reserved::loopback());
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": acme.addr().to_string(),
                "managementListenAddress": mgmt.addr().to_string(),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": opts.http_port,
                "tlsPort": opts.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        if let Some(v) = opts.validity_secs {
            config["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).expect("write pebble config");
        let log = dir.path().join("pebble.log");
        let log_file = std::fs::File::create(&log).expect("pebble log");
        let mut cmd = Command::new(PEBBLE);
        die_with_parent(&mut cmd);
        let child = cmd
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(opts.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::from(log_file.try_clone().expect("log file")))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("pebble is installed (scripts/install-test-deps.sh)");
        let mut pebble = Pebble {
            child,
            https_root,
            directory_url: format!("https://{}/dir", acme.addr()),
            management: mgmt.addr(),
            log,
            dir,
        };
        let ports = [acme.addr(), mgmt.addr()];
        eventually_ok(Duration::from_secs(20), "pebble to listen", || {
            let exited = pebble.child.try_wait().ok().flatten();
            let log = &pebble.log;
            async move {
                if let Some(status) = exited {
                    panic!(
                        "pebble exited ({status}): {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
                for p in ports {
                    tokio::net::TcpStream::connect(p)
                        .await
                        .map_err(|e| format!("{p}: {e}"))?;
                }
                Ok::<_, String>(())
            }
        })
        .await;
        // Pebble's listeners hold the ports now.
        drop((acme, mgmt));
        pebble
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Accounts Pebble was asked to register (`newAccount`), counted from its own log.
    pub fn accounts_registered(&self) -> usize {
        self.log_text().matches("POST /sign-me-up").count()
    }

    /// Orders Pebble received, counted from its own log.
    pub fn orders_received(&self) -> usize {
        self.log_text().matches("POST /order-plz").count()
    }

    /// Pebble's issuing root (`/roots/0` on the management interface).
    pub async fn issuing_root(&self) -> CertificateDer<'static> {
        let roots = roots_from_pem_file(&self.https_root);
        let pem = https_get(self.management, "/roots/0", &roots).await;
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("root PEM")
    }
}

/// The child gets SIGKILL when the test process dies, even when that is killed outright.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; prctl is async-signal-safe and touches
    // no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pebble_starts_on_reserved_ports_and_serves_its_root() {
        let dns = crate::dns::TestDns::start("test.").await;
        // No validation happens here: the challenge ports are never dialed.
        let pebble = Pebble::start(PebbleOptions {
            http_port: 5002,
            tls_port: 5001,
            dns: dns.addr,
            validity_secs: None,
        })
        .await;
        let root = pebble.issuing_root().await;
        assert!(!root.is_empty());
        let dir = crate::tls::https_get(
            pebble
                .directory_url
                .trim_start_matches("https://")
                .trim_end_matches("/dir")
                .parse()
                .unwrap(),
            "/dir",
            &roots_from_pem_file(&pebble.https_root),
        )
        .await;
        assert!(dir.contains("newOrder"), "{dir}");
    }
}
