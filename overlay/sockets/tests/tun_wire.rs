//! A kernel TCP socket on a TUN interface talks to the userspace stack, joined by an in-memory
//! L3 wire, inside a network namespace the test creates.

mod common;

use meshgate_sockets::Stack;
use meshgate_sockets::tun::Tun;
use std::net::{Ipv6Addr, SocketAddrV6};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const KERNEL: Ipv6Addr = Ipv6Addr::new(0x600, 0, 0, 0, 0, 0, 0, 0xa);
const USERSPACE: Ipv6Addr = Ipv6Addr::new(0x601, 0, 0, 0, 0, 0, 0, 0xb);

#[test]
fn kernel_socket_through_tun_to_userspace_stack() {
    let ns = netns_or_skip!("tunwire");
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mtu = 16384;
            let (k_tx, u_rx) = mpsc::channel(256);
            let (u_tx, k_rx) = mpsc::channel(256);
            let tun = Tun::start("mgtun0", KERNEL, mtu, k_tx, k_rx).unwrap();
            assert_eq!(tun.name(), "mgtun0");
            let stack = Stack::new(USERSPACE, mtu, u_tx, u_rx);
            let data = common::pattern(3, 64 << 20);
            let want = blake3::hash(&data);

            // Kernel client → userspace server: bulk upload, the server answers with a digest.
            let listener = stack.listen(5000).unwrap();
            let server = tokio::spawn(async move {
                let (mut s, peer) = listener.accept().await.unwrap();
                assert_eq!(*peer.ip(), KERNEL);
                let mut hasher = blake3::Hasher::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                s.write_all(hasher.finalize().as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
            let mut c = tokio::net::TcpStream::connect(SocketAddrV6::new(USERSPACE, 5000, 0, 0))
                .await
                .unwrap();
            c.write_all(&data).await.unwrap();
            c.shutdown().await.unwrap();
            let mut digest = Vec::new();
            c.read_to_end(&mut digest).await.unwrap();
            assert_eq!(digest, want.as_bytes());
            server.await.unwrap();

            // Userspace client → kernel server: bulk download.
            let kl = tokio::net::TcpListener::bind(SocketAddrV6::new(KERNEL, 5001, 0, 0))
                .await
                .unwrap();
            let sent = data.clone();
            let kserver = tokio::spawn(async move {
                let (mut s, _) = kl.accept().await.unwrap();
                s.write_all(&sent).await.unwrap();
                s.shutdown().await.unwrap();
            });
            let mut u = stack
                .connect(SocketAddrV6::new(KERNEL, 5001, 0, 0))
                .await
                .unwrap();
            let mut got = Vec::new();
            u.read_to_end(&mut got).await.unwrap();
            assert_eq!(blake3::hash(&got), want);
            kserver.await.unwrap();
            assert!(tun.stats().packets_to_overlay > 0);
        });
    });
}
