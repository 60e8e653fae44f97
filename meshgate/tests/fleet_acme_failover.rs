//! ACME once per fleet with gateways as real processes, a real 3-member etcd and Pebble:
//! the order lock's holder SIGKILLed after publishing its challenges (another gateway
//! completes the order), and a holder paused past its lease (SIGSTOP, then SIGCONT) that
//! cannot overwrite the certificate its successor stored.

mod fleet_kit;

use fleet_kit::write_fleet_key;
use meshgate_fleet::{Etcd, EtcdOptions};
use meshgate_testkit::dns::{DnsSockets, TestDns};
use meshgate_testkit::etcd::EtcdCluster;
use meshgate_testkit::net::{Reserved, common_port, member_ip};
use meshgate_testkit::pebble::{Pebble, PebbleOptions};
use meshgate_testkit::process::GatewayProcess;
use meshgate_testkit::tls::{peer_leaf, roots_of};
use rustls::pki_types::CertificateDer;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NAME: &str = "shop.test";
const FLEET: &str = "acmetest";

fn signal(g: &GatewayProcess, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(g.child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

struct Env {
    etcd_cluster: EtcdCluster,
    etcd: Etcd,
    pebble: Pebble,
    dns: TestDns,
    key_file: PathBuf,
    http_port: u16,
    tls_port: u16,
    root: tempfile::TempDir,
    _held: Vec<Reserved>,
}

impl Env {
    async fn new() -> Env {
        let etcd_cluster = EtcdCluster::start(3).await;
        let etcd = Etcd::new(EtcdOptions::new(etcd_cluster.endpoints())).unwrap();
        let root = tempfile::tempdir().unwrap();
        let key_file = root.path().join("fleet.key");
        write_fleet_key(&key_file);
        // Held until the gateways bind them on their addresses.
        let ((http_port, http_held), (tls_port, tls_held)) = (common_port(3), common_port(3));
        let sockets = DnsSockets::bind().await;
        let pebble = Pebble::start(PebbleOptions {
            http_port,
            tls_port,
            dns: sockets.addr(),
            validity_secs: None,
        })
        .await;
        let dns = TestDns::serve(sockets, "test.", Vec::new()).await;
        Env {
            etcd_cluster,
            etcd,
            pebble,
            dns,
            key_file,
            http_port,
            tls_port,
            root,
            _held: http_held.into_iter().chain(tls_held).collect(),
        }
    }

    /// Gateway `i` on 127.0.0.{i+2}: HTTP-01 and TLS on the common ports, a static
    /// terminate route for [`NAME`], ACME from Pebble, the fleet on etcd.
    fn gateway(&self, i: usize) -> GatewayProcess {
        let dir = self.root.path().join(format!("gw{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let endpoints: Vec<String> = self
            .etcd_cluster
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        GatewayProcess::start_with(Path::new(env!("CARGO_BIN_EXE_meshgate")), &dir, |ports| {
            format!(
                r#"data_dir = "{data}"
[listen]
https = ["{ip}:{tls}"]
http = ["{ip}:{http}"]
[admin]
listen = "127.0.0.1:{admin}"
[security]
allow_private_backends = true
[tls.acme]
directory = "{directory}"
contact = "mailto:ops@meshgate.test"
directory_ca = "{ca}"
dns_responder = false
lock_ttl_secs = 3
order_timeout_secs = 60
[fleet]
name = "{FLEET}"
etcd = [{endpoints}]
key_file = "{key}"
advertise = ["{ip}"]
id = "gw{i}"
member_ttl_secs = 3
[[route]]
host = "{NAME}"
backends = [{{ addr = "127.0.0.1:9" }}]
"#,
                data = dir.display(),
                ip = member_ip(i),
                tls = self.tls_port,
                http = self.http_port,
                admin = ports.admin,
                directory = self.pebble.directory_url,
                ca = self.pebble.https_root.display(),
                endpoints = endpoints.join(", "),
                key = self.key_file.display(),
            )
        })
    }

    fn acme_key(&self, rest: &str) -> String {
        format!("/meshgate/{FLEET}/acme/{rest}")
    }

    async fn lock_holder(&self) -> Option<String> {
        let kv = self
            .etcd
            .get(&self.acme_key(&format!("locks/{NAME}")))
            .await
            .ok()??;
        Some(String::from_utf8_lossy(kv.value()).into_owned())
    }

    async fn challenges(&self) -> usize {
        self.etcd
            .list_prefix(&self.acme_key("challenges/"))
            .await
            .map(|(kvs, _)| kvs.len())
            .unwrap_or(0)
    }

    async fn stored_chain(&self) -> Option<String> {
        let kv = self
            .etcd
            .get(&self.acme_key(&format!("certs/{NAME}")))
            .await
            .ok()??;
        let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
        v["chain_pem"].as_str().map(str::to_string)
    }

    /// Waits for a holder of [`NAME`]'s lock, points the name at the other gateways only
    /// (the holder will be stopped), and waits until the holder has published.
    async fn holder_with_challenges_published(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        let holder = loop {
            if let Some(h) = self.lock_holder().await {
                break h;
            }
            assert!(Instant::now() < deadline, "no gateway took the order lock");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let holder: usize = holder.trim_start_matches("gw").parse().unwrap();
        let others: Vec<Ipv4Addr> = (0..3).filter(|i| *i != holder).map(member_ip).collect();
        self.dns.a(NAME, &others).await;
        while self.challenges().await == 0 {
            assert!(
                Instant::now() < deadline,
                "the holder published no challenge"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        holder
    }

    async fn serial_served_by(&self, i: usize, root: &CertificateDer<'static>) -> Option<String> {
        let addr = SocketAddr::new(member_ip(i).into(), self.tls_port);
        let tls = meshgate_testkit::tls::tls_connect(addr, NAME, &roots_of([root.clone()]), &[])
            .await
            .ok()?;
        // The whole leaf, so equal means the same certificate (same serial).
        let leaf = peer_leaf(&tls);
        Some(leaf.iter().map(|b| format!("{b:02x}")).collect())
    }

    async fn wait_served(
        &self,
        gws: &[usize],
        root: &CertificateDer<'static>,
        within: Duration,
        logs: impl Fn() -> String,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let mut serials = Vec::new();
            for &i in gws {
                serials.push(self.serial_served_by(i, root).await);
            }
            if let Some(Some(first)) = serials.first()
                && serials.iter().all(|s| s.as_ref() == Some(first))
            {
                return first.clone();
            }
            assert!(
                Instant::now() < deadline,
                "gateways {gws:?} serve {serials:?}\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn logs(gws: &[GatewayProcess]) -> String {
    gws.iter()
        .enumerate()
        .map(|(i, g)| format!("--- gw{i}\n{}", g.log()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_killed_after_publishing_its_challenges_another_gateway_completes_the_order() {
    let env = Env::new().await;
    // The name resolves to nobody until the holder is known.
    let mut gws: Vec<GatewayProcess> = (0..3).map(|i| env.gateway(i)).collect();
    let holder = env.holder_with_challenges_published().await;
    gws[holder].child.kill().unwrap();
    gws[holder].child.wait().unwrap();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != holder).collect();
    let root = env.pebble.issuing_root().await;
    let serial = env
        .wait_served(&survivors, &root, Duration::from_secs(90), || logs(&gws))
        .await;
    assert!(!serial.is_empty());
    let all = logs(&gws);
    assert!(
        all.contains("taking over an unfinished order"),
        "a survivor took over the dead holder's order\n{all}"
    );
    // One order when the successor resumed it (pending or ready at the ACME server).
    if all.contains("resuming an unfinished order") {
        assert_eq!(env.pebble.orders_received(), 1, "{all}");
    }
    let dump = env.etcd_cluster.dump("/meshgate/");
    assert!(
        !dump.contains("PRIVATE KEY"),
        "no private key in clear in etcd"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_paused_past_its_lease_cannot_overwrite_the_certificate() {
    let env = Env::new().await;
    let gws: Vec<GatewayProcess> = (0..3).map(|i| env.gateway(i)).collect();
    let holder = env.holder_with_challenges_published().await;
    signal(&gws[holder], "STOP");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != holder).collect();
    let root = env.pebble.issuing_root().await;
    let serial = env
        .wait_served(&survivors, &root, Duration::from_secs(90), || logs(&gws))
        .await;
    let stored = env
        .stored_chain()
        .await
        .expect("the successor stored the certificate");
    // The paused holder wakes up with its order in hand.
    signal(&gws[holder], "CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = gws[holder].log();
        if log.contains("certificate order failed")
            || log.contains("serving the certificate another gateway obtained")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed holder settles\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.stored_chain().await.as_deref(),
        Some(stored.as_str()),
        "the certificate in etcd is the successor's\n{}",
        logs(&gws)
    );
    let everyone: Vec<usize> = (0..3).collect();
    let now = env
        .wait_served(&everyone, &root, Duration::from_secs(20), || logs(&gws))
        .await;
    assert_eq!(
        now, serial,
        "every gateway serves the successor's certificate"
    );
}
