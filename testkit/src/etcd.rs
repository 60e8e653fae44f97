//! A real etcd cluster for tests: Debian's etcd 3.4 (`/usr/bin/etcd`) members as child
//! processes on loopback ports of the kernel's choosing (never 2379/2380, where the package's
//! own service may listen), each in a temporary data directory; single members can be killed,
//! stopped, paused and restarted on the same ports. [`EtcdRelay`] stands between a gateway
//! and the cluster so a test can cut that one gateway off and let it back.
//!
//! Ports are [`Reserved`] for the cluster's whole life (etcd's Go listeners set
//! `SO_REUSEADDR`, so a member binds them while they are held), so a restarted member finds
//! its ports free and nobody else takes them meanwhile.

use crate::eventually::eventually_ok;
use crate::net::Reserved;
use crate::tls::TestCa;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where Debian's `etcd-server` installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";
/// Where Debian's `etcd-client` installs etcdctl.
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// How long a cluster may take to elect its first leader on a busy machine.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// What a cluster serves its clients with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientSecurity {
    /// Plain HTTP/2 on the client port.
    #[default]
    Plain,
    /// TLS with the cluster's test CA; clients must show a certificate from that CA.
    TlsClientCerts,
}

/// TLS material of a [`ClientSecurity::TlsClientCerts`] cluster, as files.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// The CA that signs the members' and the clients' certificates.
    pub ca: PathBuf,
    /// A client certificate and its key (0600) the cluster accepts.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A certificate from another CA, which the cluster refuses.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

struct Member {
    name: String,
    client: Reserved,
    peer: Reserved,
    child: Option<Child>,
}

/// A running etcd cluster; every member is killed when it is dropped (and when the test
/// process dies).
pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    members: Vec<Member>,
    token: String,
    security: ClientSecurity,
    tls: Option<EtcdTlsFiles>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts `n` members over plain HTTP and waits until they have elected a leader.
    pub async fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, ClientSecurity::Plain).await
    }

    /// Starts `n` members serving clients as `security` says, and waits for a leader.
    pub async fn start_with(n: usize, security: ClientSecurity) -> EtcdCluster {
        assert!(n >= 1, "an etcd cluster needs a member");
        let dir = tempfile::tempdir().expect("etcd tempdir");
        let token = format!(
            "meshgate-test-{}-{}",
            std::process::id(),
            dir.path().display().to_string().len() + n
        );
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: Reserved::loopback(),
                peer: Reserved::loopback(),
                child: None,
            })
            .collect();
        let tls = (security == ClientSecurity::TlsClientCerts).then(|| write_tls(dir.path()));
        let mut cluster = EtcdCluster {
            dir,
            members,
            token,
            security,
            tls,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_for_leader(START_LIMIT).await;
        cluster
    }

    /// The TLS files of a [`ClientSecurity::TlsClientCerts`] cluster.
    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    fn scheme(&self) -> &'static str {
        match self.security {
            ClientSecurity::Plain => "http",
            ClientSecurity::TlsClientCerts => "https",
        }
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}://{}", self.scheme(), self.members[i].client.addr())
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client address (for a relay in front of it).
    pub fn client_addr(&self, i: usize) -> std::net::SocketAddr {
        self.members[i].client.addr()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether member `i`'s process is running (not killed or stopped; a paused one is).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let client_url = self.endpoint(i);
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = self.dir.path().join(format!("{}.log", m.name));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("etcd log");
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer.addr()))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer.addr()))
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            // etcd's defaults (100 ms / 1 s): shorter ones elect spuriously on a busy machine.
            .arg("--heartbeat-interval=100")
            .arg("--election-timeout=1000")
            .arg("--logger=zap")
            .arg("--log-level=info")
            .env_remove("ETCD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(self.dir.path().join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.path().join("server.key"))
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {ETCD}: {e} (install etcd-server)"));
        self.members[i].child = Some(child);
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` cleanly (SIGTERM) and reaps it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            signal(&c, libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP): its sockets stay open and nothing answers.
    pub fn pause(&self, i: usize) {
        if let Some(c) = &self.members[i].child {
            signal(c, libc::SIGSTOP);
        }
    }

    /// Thaws a paused member (SIGCONT).
    pub fn resume(&self, i: usize) {
        if let Some(c) = &self.members[i].child {
            signal(c, libc::SIGCONT);
        }
    }

    /// Starts a killed or stopped member again on its ports and data, and waits until its
    /// client port accepts connections (it rejoins the quorum on its own).
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        let addr = self.client_addr(i);
        eventually_ok(
            START_LIMIT,
            &format!("etcd member {i} listening"),
            || async move { tokio::net::TcpStream::connect(addr).await.map(|_| ()) },
        )
        .await;
    }

    /// Runs etcdctl against the running members with `args`; its stdout, or its stderr as
    /// the error.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let running: Vec<String> = (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.endpoint(i))
            .collect();
        self.etcdctl_at(&running, args)
    }

    /// Runs etcdctl against `endpoints` with `args`.
    pub fn etcdctl_at(&self, endpoints: &[String], args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(ETCDCTL);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--command-timeout=3s")
            .arg("--dial-timeout=2s");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {ETCDCTL}: {e} (install etcd-client)"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "etcdctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    /// The index of the current leader, asked of the running members (None without one).
    pub fn leader(&self) -> Option<usize> {
        let mut ids = vec![None; self.members.len()];
        let mut leader = None;
        for (i, id) in ids.iter_mut().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let Ok(out) =
                self.etcdctl_at(&[self.endpoint(i)], &["endpoint", "status", "-w", "json"])
            else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
                continue;
            };
            let status = &v[0]["Status"];
            *id = status["header"]["member_id"].as_u64();
            if let Some(l) = status["leader"].as_u64().filter(|&l| l != 0) {
                leader = Some(l);
            }
        }
        let leader = leader?;
        ids.iter().position(|id| *id == Some(leader))
    }

    /// Waits until a running member reports a leader that is running; returns its index.
    pub async fn wait_for_leader(&self, limit: Duration) -> usize {
        eventually_ok(limit, "an etcd leader", || async {
            match self.leader() {
                Some(l) if self.is_running(l) => Ok(l),
                other => Err(format!(
                    "leader {other:?}; logs in {}",
                    self.dir.path().display()
                )),
            }
        })
        .await
    }

    /// Turns on etcd's user authentication with a `root` user (all rights) and a `gateway`
    /// user with read-write access to `prefix`, both with `password`.
    pub fn enable_auth(&self, prefix: &str, password: &str) {
        let run = |args: &[&str]| {
            self.etcdctl(args)
                .unwrap_or_else(|e| panic!("enable etcd auth: {e}"))
        };
        run(&["user", "add", &format!("root:{password}")]);
        run(&["user", "grant-role", "root", "root"]);
        run(&["role", "add", "gateway"]);
        run(&[
            "role",
            "grant-permission",
            "gateway",
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        run(&["user", "add", &format!("gateway:{password}")]);
        run(&["user", "grant-role", "gateway", "gateway"]);
        run(&["auth", "enable"]);
    }

    /// Runs etcdctl as `root` (after [`EtcdCluster::enable_auth`]).
    pub fn etcdctl_root(&self, password: &str, args: &[&str]) -> Result<String, String> {
        let user = format!("--user=root:{password}");
        let mut all = vec![user.as_str()];
        all.extend_from_slice(args);
        self.etcdctl(&all)
    }

    /// Every key and value under `prefix` as etcdctl prints them (key line, value line).
    pub fn dump(&self, prefix: &str) -> String {
        self.etcdctl(&["get", "--prefix", prefix])
            .unwrap_or_else(|e| panic!("dump {prefix}: {e}"))
    }

    /// The log file of member `i`.
    pub fn log(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }
}

fn write_tls(dir: &Path) -> EtcdTlsFiles {
    let ca = TestCa::new("etcd test CA");
    let ca_path = dir.join("ca.pem");
    ca.write_pem(&ca_path);
    ca.issue(&["localhost", "127.0.0.1"])
        .write_pem(&dir.join("server.pem"), &dir.join("server.key"));
    let client_cert = dir.join("client.pem");
    let client_key = dir.join("client.key");
    ca.issue(&["meshgate-gateway"])
        .write_pem(&client_cert, &client_key);
    let stranger = TestCa::new("not the etcd CA");
    let stranger_cert = dir.join("stranger.pem");
    let stranger_key = dir.join("stranger.key");
    stranger
        .issue(&["meshgate-gateway"])
        .write_pem(&stranger_cert, &stranger_key);
    EtcdTlsFiles {
        ca: ca_path,
        client_cert,
        client_key,
        stranger_cert,
        stranger_key,
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SIGTERM/SIGSTOP/SIGCONT to our own child: kill(2) needs no unsafe memory access, but
    // libc's binding is unsafe.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
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

/// TCP relays in front of a cluster's members, one per member, so that a single client (a
/// gateway) can be cut off from etcd while the cluster and the other clients carry on.
pub struct EtcdRelay {
    addrs: Vec<std::net::SocketAddr>,
    scheme: &'static str,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for EtcdRelay {
    fn drop(&mut self) {
        for t in &self.accept_tasks {
            t.abort();
        }
        for h in self.live.lock().expect("relay connections").drain(..) {
            h.abort();
        }
    }
}

impl EtcdRelay {
    /// Relays to every member of `cluster`.
    pub async fn start(cluster: &EtcdCluster) -> EtcdRelay {
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let mut addrs = Vec::new();
        let mut accept_tasks = Vec::new();
        for i in 0..cluster.len() {
            let target = cluster.client_addr(i);
            let (listener, addr) = crate::net::listener().await;
            addrs.push(addr);
            let (cut, live) = (cut.clone(), live.clone());
            accept_tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    // The check and the registration under the lock `cut` takes: a connection
                    // accepted while the relay is being cut is either refused here or aborted
                    // there, never left relaying (a full run once saw a write pass a cut).
                    let mut live = live.lock().expect("relay connections");
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        let mut client = client;
                        if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    live.retain(|h| !h.is_finished());
                    live.push(task.abort_handle());
                }
            }));
        }
        EtcdRelay {
            addrs,
            scheme: cluster.scheme(),
            cut,
            live,
            accept_tasks,
        }
    }

    /// The relays' URLs, one per member, to give the client instead of the members'.
    pub fn endpoints(&self) -> Vec<String> {
        self.addrs
            .iter()
            .map(|a| format!("{}://{a}", self.scheme))
            .collect()
    }

    /// Cuts the client off: open connections are closed and new ones closed at once.
    pub fn cut(&self) {
        let mut live = self.live.lock().expect("relay connections");
        self.cut.store(true, Ordering::SeqCst);
        for h in live.drain(..) {
            h.abort();
        }
    }

    /// Lets the client reach etcd again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_three_member_cluster_survives_losing_its_leader_and_takes_it_back() {
        let mut etcd = EtcdCluster::start(3).await;
        etcd.etcdctl(&["put", "/t/k", "v1"]).expect("put");
        let leader = etcd.wait_for_leader(START_LIMIT).await;
        etcd.kill(leader);
        let next = etcd.wait_for_leader(START_LIMIT).await;
        assert_ne!(next, leader);
        etcd.etcdctl(&["put", "/t/k", "v2"])
            .expect("put without the old leader");
        etcd.restart(leader).await;
        let got = eventually_ok(START_LIMIT, "the restarted member serving v2", || async {
            let out = etcd.etcdctl_at(&[etcd.endpoint(leader)], &["get", "/t/k"])?;
            if out.contains("v2") {
                Ok(out)
            } else {
                Err(out)
            }
        })
        .await;
        assert!(got.contains("/t/k"), "{got}");
    }
}
