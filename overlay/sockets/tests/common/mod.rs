//! Test helpers: deterministic data and network namespaces the tests create.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Deterministic test data: cheap to generate, differs at every offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&x.to_le_bytes()[..take]);
    }
    out
}

/// Awaits every task, then `last`. Past `limit` the test panics with `report()` (the stacks'
/// counters, say) instead of hanging the suite.
pub async fn join_within<A, B>(
    limit: std::time::Duration,
    tasks: Vec<tokio::task::JoinHandle<A>>,
    last: tokio::task::JoinHandle<B>,
    report: impl FnOnce() -> String,
) {
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
        last.await.unwrap();
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        panic!("stalled after {limit:?}: {}", report());
    }
}

/// A network namespace created for one test and deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up, or says why it cannot (then the test skips).
    pub fn create(tag: &str) -> Result<Netns, String> {
        // SAFETY: geteuid takes no arguments, touches no memory of ours and cannot fail.
        #[allow(unsafe_code)]
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err("not root: network namespaces and TUN need root".into());
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mgs-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a new thread inside the namespace (sockets and TUN devices it creates
    /// live there; threads it spawns inherit the namespace).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: `file` is open for the whole call, so the fd is valid; setns takes no
            // pointers and moves only this (fresh, test-owned) thread into the namespace.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Like [`Netns::run`] without waiting: the thread's handle.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: as in `run`: a valid fd for the call, only this fresh thread moves.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Links this namespace's interface `ours` to `other`'s interface `theirs` with a veth
    /// pair, both up (IPv6 link-local addresses without duplicate address detection, so they
    /// are usable at once).
    pub fn veth_to(&self, ours: &str, other: &Netns, theirs: &str) -> Result<(), String> {
        for ns in [self, other] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns.name,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
        }
        run(
            "ip",
            &[
                "-n",
                &self.name,
                "link",
                "add",
                ours,
                "type",
                "veth",
                "peer",
                "name",
                theirs,
                "netns",
                &other.name,
            ],
        )?;
        run("ip", &["-n", &self.name, "link", "set", ours, "up"])?;
        run("ip", &["-n", &other.name, "link", "set", theirs, "up"])?;
        Ok(())
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c.kill_on_drop(true);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether a test that needs namespaces may skip: never in CI (`CI` set, as root there), so a
/// broken namespace setup fails the run instead of passing silently.
pub fn may_skip_netns() -> bool {
    std::env::var_os("CI").is_none()
}

/// A namespace, or a skip with a printed reason outside CI (a failure in CI).
#[macro_export]
macro_rules! netns_or_skip {
    ($tag:expr) => {
        match common::Netns::create($tag) {
            Ok(ns) => ns,
            Err(why) if common::may_skip_netns() => {
                eprintln!("SKIPPED: {why}");
                return;
            }
            Err(why) => panic!("network namespace needed in CI: {why}"),
        }
    };
}
