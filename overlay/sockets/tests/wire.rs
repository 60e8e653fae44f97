//! The userspace stack on an in-memory wire: two stacks joined by bounded channels, as an
//! overlay node's L3 port would join them.

mod common;

use common::{join_within, pattern};
use meshgate_sockets::{Stack, StackConfig};
use std::io::ErrorKind;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const A: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0xa);
const B: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0xb);

fn wire(mtu: usize, config: StackConfig) -> (Stack, Stack) {
    let (a_tx, b_rx) = mpsc::channel(256);
    let (b_tx, a_rx) = mpsc::channel(256);
    (
        Stack::with_config(A, mtu, a_tx, a_rx, config.clone()),
        Stack::with_config(B, mtu, b_tx, b_rx, config),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_intact() {
    let (a, b) = wire(16384, StackConfig::default());
    let listener = b.listen(7000).unwrap();
    let data = pattern(1, 32 << 20);
    let want = blake3::hash(&data);
    let server = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        assert_eq!(*peer.ip(), A);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            hasher.update(&buf[..n]);
        }
        s.write_all(b"done").await.unwrap();
        s.shutdown().await.unwrap();
        (total, hasher.finalize())
    });
    let mut c = a.connect(SocketAddrV6::new(B, 7000, 0, 0)).await.unwrap();
    assert_eq!(c.peer_addr().port(), 7000);
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"done");
    let (total, got) = server.await.unwrap();
    assert_eq!(total, data.len());
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_directions() {
    let (a, b) = wire(1400, StackConfig::default());
    let listener = b.listen(80).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        // Read the whole request: the client's FIN ends it.
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        // Our direction is still open after the peer's FIN.
        s.write_all(b"response after your FIN").await.unwrap();
        s.shutdown().await.unwrap();
        // A write after shutdown is refused locally.
        assert_eq!(
            s.write(b"x").await.unwrap_err().kind(),
            ErrorKind::BrokenPipe
        );
    });
    let mut c = a.connect(SocketAddrV6::new(B, 80, 0, 0)).await.unwrap();
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).await.unwrap();
    assert_eq!(resp, b"response after your FIN");
    // EOF is sticky.
    assert_eq!(c.read(&mut [0u8; 8]).await.unwrap(), 0);
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reaches_reader_and_writer() {
    let (a, b) = wire(1400, StackConfig::default());
    let listener = b.listen(81).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.abort();
    });
    let mut c = a.connect(SocketAddrV6::new(B, 81, 0, 0)).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    server.await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), c.read(&mut [0u8; 16]))
        .await
        .expect("reset not delivered")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let err = c.write(b"more").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_data_on_drop_resets() {
    let (a, b) = wire(1400, StackConfig::default());
    let listener = b.listen(82).unwrap();
    let mut c = a.connect(SocketAddrV6::new(B, 82, 0, 0)).await.unwrap();
    let (mut s, _) = listener.accept().await.unwrap();
    // One write, so one segment: once its first byte is read, the rest is in the receive
    // buffer. Then drop the server side without reading it.
    c.write_all(b"xnever read").await.unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"x");
    drop(s);
    let err = tokio::time::timeout(Duration::from_secs(5), c.read(&mut [0u8; 16]))
        .await
        .expect("reset not delivered")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listener_refuses() {
    let (a, _b) = wire(1400, StackConfig::default());
    let err = a.connect(SocketAddrV6::new(B, 9, 0, 0)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // Listening twice on one port is an error.
    let _l = a.listen(9).unwrap();
    assert_eq!(a.listen(9).unwrap_err().kind(), ErrorKind::AddrInUse);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams() {
    let config = StackConfig {
        socket_buffer: 64 * 1024,
        ..StackConfig::default()
    };
    let (a, b) = wire(16384, config);
    let listener = b.listen(8080).unwrap();
    const STREAMS: usize = 1000;
    const SIZE: usize = 1 << 20;
    // The server echoes a hash of what it read, so the client checks integrity end to end.
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut hasher = blake3::Hasher::new();
                let mut buf = vec![0u8; 32768];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                s.write_all(hasher.finalize().as_bytes()).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let data = std::sync::Arc::new(pattern(7, SIZE + STREAMS));
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let a = a.clone();
        let data = data.clone();
        clients.push(tokio::spawn(async move {
            let mut c = a.connect(SocketAddrV6::new(B, 8080, 0, 0)).await.unwrap();
            let mine = &data[i..i + SIZE];
            c.write_all(mine).await.unwrap();
            c.shutdown().await.unwrap();
            let mut digest = Vec::new();
            c.read_to_end(&mut digest).await.unwrap();
            assert_eq!(
                digest,
                blake3::hash(mine).as_bytes(),
                "stream {i} corrupted"
            );
        }));
    }
    join_within(Duration::from_secs(120), clients, server, || {
        format!("\n a {:?}\n b {:?}", a.stats(), b.stats())
    })
    .await;
}

/// Readers slower than the wire: receive windows close and reopen all the time (zero-window
/// probes, window updates, FIN behind a closed window). Every stream must still arrive whole,
/// its last byte included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_get_every_byte() {
    const STREAMS: usize = 200;
    let config = StackConfig {
        socket_buffer: 16 * 1024,
        ..StackConfig::default()
    };
    let (a, b) = wire(16384, config);
    let listener = b.listen(7100).unwrap();
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 3000];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    // The slowness under test, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                s.write_all(&(got.len() as u64).to_be_bytes())
                    .await
                    .unwrap();
                s.write_all(blake3::hash(&got).as_bytes()).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let a = a.clone();
        clients.push(tokio::spawn(async move {
            let data = pattern(i as u64, 100_000 + i * 37);
            let mut c = a.connect(SocketAddrV6::new(B, 7100, 0, 0)).await.unwrap();
            c.write_all(&data).await.unwrap();
            c.shutdown().await.unwrap();
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).await.unwrap();
            let len = u64::from_be_bytes(answer[..8].try_into().unwrap());
            assert_eq!(len, data.len() as u64, "stream {i}: length");
            assert_eq!(
                &answer[8..],
                blake3::hash(&data).as_bytes(),
                "stream {i}: bytes"
            );
        }));
    }
    let all = async {
        for c in clients {
            c.await.unwrap();
        }
        server.await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("slow readers: streams done within 120 s");
}

/// A read copies what the socket holds into the caller's unfilled space and initializes
/// nothing beyond it (hyper reads small responses into buffers of tens of KiB: zeroing the
/// rest on every read was most of a proxied request's cost over the overlay), also when the
/// data wraps around the end of the socket's receive ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fill_without_initializing_the_rest_and_cross_the_ring_end() {
    let config = StackConfig {
        socket_buffer: 4096,
        ..StackConfig::default()
    };
    let (a, b) = wire(1400, config);
    let listener = b.listen(81).unwrap();
    let mut c = a.connect(SocketAddrV6::new(B, 81, 0, 0)).await.unwrap();
    let (mut s, _) = listener.accept().await.unwrap();
    let data = pattern(7, 4096 * 3);
    let mut off = 0;
    // Chunks of 3000 bytes through a 4096-byte ring: the second chunk wraps around its end.
    for chunk in data.chunks(3000) {
        c.write_all(chunk).await.unwrap();
        let mut got = Vec::new();
        while got.len() < chunk.len() {
            let mut storage = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 * 1024];
            let mut buf = tokio::io::ReadBuf::uninit(&mut storage);
            std::future::poll_fn(|cx| {
                use tokio::io::AsyncRead;
                std::pin::Pin::new(&mut s).poll_read(cx, &mut buf)
            })
            .await
            .unwrap();
            let n = buf.filled().len();
            assert!(n > 0, "read returned 0 bytes before the data arrived");
            assert_eq!(
                buf.initialized().len(),
                n,
                "a read of {n} bytes initialized {} bytes of the buffer",
                buf.initialized().len()
            );
            got.extend_from_slice(buf.filled());
        }
        assert_eq!(&got[..], chunk, "chunk at offset {off} intact");
        off += chunk.len();
    }
}

/// Bulk data both ways at once through small channels and small outbound queues, so both
/// channels and both stacks' outbound queues fill up together. A stack that stopped taking
/// inbound packets while its own outbound queue was full deadlocked with its peer here: each
/// waited for room the other would only make by reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooded_both_ways_delivers_every_byte() {
    const STREAMS: usize = 256;
    const SIZE: usize = 256 << 10;
    let config = StackConfig {
        socket_buffer: 64 * 1024,
        outbound_queue: 4,
        ..StackConfig::default()
    };
    let (a_tx, b_rx) = mpsc::channel(4);
    let (b_tx, a_rx) = mpsc::channel(4);
    let channels = [("a->b", a_tx.downgrade()), ("b->a", b_tx.downgrade())];
    let a = Stack::with_config(A, 1400, a_tx, a_rx, config.clone());
    let b = Stack::with_config(B, 1400, b_tx, b_rx, config);
    let listener = b.listen(7200).unwrap();
    // The server echoes every byte back as it reads it.
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 32768];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
                s.shutdown().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let a = a.clone();
        clients.push(tokio::spawn(async move {
            let data = pattern(100 + i as u64, SIZE);
            let want = blake3::hash(&data);
            let c = a.connect(SocketAddrV6::new(B, 7200, 0, 0)).await.unwrap();
            let (mut r, mut w) = tokio::io::split(c);
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let mut got = Vec::with_capacity(SIZE);
            r.read_to_end(&mut got).await.unwrap();
            let _w = writer.await.unwrap();
            assert_eq!(got.len(), SIZE, "stream {i}: length");
            assert_eq!(blake3::hash(&got), want, "stream {i}: bytes");
        }));
    }
    join_within(Duration::from_secs(60), clients, server, || {
        let queued: Vec<String> = channels
            .iter()
            .map(|(name, w)| match w.upgrade() {
                Some(s) => format!(
                    "{name} {}/{}",
                    s.max_capacity() - s.capacity(),
                    s.max_capacity()
                ),
                None => format!("{name} closed"),
            })
            .collect();
        format!(
            "channels {queued:?}\n a {:?}\n b {:?}",
            a.stats(),
            b.stats()
        )
    })
    .await;
    // Counters, ingress replies dropped at the hard limit among them.
    eprintln!("a {:?}\nb {:?}", a.stats(), b.stats());
}

/// A write sends its own segments on the writer's task: a small echo exchange costs the two
/// poll tasks about one round per packet they receive, no longer also one per write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_echo_exchange_costs_few_poll_rounds() {
    const EXCHANGES: u64 = 300;
    let (a, b) = wire(1400, StackConfig::default());
    let listener = b.listen(7300).unwrap();
    let mut c = a.connect(SocketAddrV6::new(B, 7300, 0, 0)).await.unwrap();
    let (mut s, _) = listener.accept().await.unwrap();
    let server = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
    });
    let rounds = || a.stats().poll_rounds + b.stats().poll_rounds;
    async fn exchange(c: &mut meshgate_sockets::TcpStream, i: u64) {
        let msg = i.to_be_bytes();
        c.write_all(&msg).await.unwrap();
        let mut got = [0u8; 8];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }
    // Handshake and first timers settled.
    for i in 0..20 {
        exchange(&mut c, i).await;
    }
    let before = rounds();
    for i in 0..EXCHANGES {
        exchange(&mut c, i).await;
    }
    let per_exchange = (rounds() - before) as f64 / EXCHANGES as f64;
    eprintln!("poll rounds per echo exchange (both stacks): {per_exchange:.2}");
    // Two packets received per exchange (request, response): two rounds. A round per write as
    // well made it four. The slack is for a loaded machine (CI runs tests side by side): an
    // exchange slower than smoltcp's 10 ms delayed-ACK timer adds a round on each side.
    assert!(
        per_exchange <= 3.0,
        "{per_exchange:.2} poll rounds per exchange"
    );
    drop(c);
    server.await.unwrap();
}
