//! Memory the userspace stack holds per connection: heap (a counting allocator) plus the socket
//! buffers' resident pages (`Stack::buffer_memory`, from the kernel). Buffers are committed as
//! data passes and given back when a connection goes quiet, without losing a byte.

mod common;

use common::pattern;
use meshgate_sockets::{Stack, StackConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Live heap bytes of the whole test process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const A: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0xa);
const B: Ipv6Addr = Ipv6Addr::new(0x400, 0, 0, 0, 0, 0, 0, 0xb);
const KIB: usize = 1024;

fn wire(config: StackConfig) -> (Stack, Stack) {
    let (a_tx, b_rx) = mpsc::channel(256);
    let (b_tx, a_rx) = mpsc::channel(256);
    (
        Stack::with_config(A, 16384, a_tx, a_rx, config.clone()),
        Stack::with_config(B, 16384, b_tx, b_rx, config),
    )
}

/// The heap count is the whole process's: the tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// 64 keep-alive connections (256 KiB buffers each way) carry 20 request/response exchanges
/// each, 1 KiB up and 16 KiB down: 320 KiB down per connection, more than a receive ring, so
/// every page of the client's receive buffers has been touched. Once they are idle, each
/// socket (client and server side) holds at most 32 KiB of heap and buffer memory together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_at_most_32_kib_each() {
    let _serial = SERIAL.lock().await;
    const CONNS: usize = 64;
    const EXCHANGES: usize = 20;
    const REQUEST: usize = KIB;
    const RESPONSE: usize = 16 * KIB;
    let config = StackConfig {
        release_interval: Duration::from_millis(50),
        ..StackConfig::default()
    };
    assert_eq!(config.socket_buffer, 256 * KIB);
    let (a, b) = wire(config);
    let listener = b.listen(8080).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (heap0, buffers0) = (heap(), a.buffer_memory() + b.buffer_memory());

    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..CONNS {
            let (mut s, _) = listener.accept().await.unwrap();
            held.push(tokio::spawn(async move {
                let mut req = vec![0u8; REQUEST];
                let resp = pattern(2, RESPONSE);
                for _ in 0..EXCHANGES {
                    s.read_exact(&mut req).await.unwrap();
                    s.write_all(&resp).await.unwrap();
                }
                // Stays open (idle) until the client closes.
                let mut end = [0u8; 1];
                assert_eq!(s.read(&mut end).await.unwrap(), 0);
            }));
        }
        (listener, held)
    });
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        let a = a.clone();
        clients.push(tokio::spawn(async move {
            let mut c = a.connect(SocketAddrV6::new(B, 8080, 0, 0)).await.unwrap();
            let req = pattern(1, REQUEST);
            let want = pattern(2, RESPONSE);
            let mut resp = vec![0u8; RESPONSE];
            for _ in 0..EXCHANGES {
                c.write_all(&req).await.unwrap();
                c.read_exact(&mut resp).await.unwrap();
                assert!(resp == want, "response intact");
            }
            c
        }));
    }
    let mut streams = Vec::new();
    for c in clients {
        streams.push(c.await.unwrap());
    }
    // Idle now: a few release intervals pass.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let buffers = a.buffer_memory() + b.buffer_memory();
    let heap_grown = heap() - heap0;
    let per_socket =
        (heap_grown.max(0) as u64 + buffers.saturating_sub(buffers0)) / (2 * CONNS as u64);
    println!(
        "{CONNS} idle connections: heap +{} KiB, resident buffers {} KiB (before {} KiB): {:.1} KiB per socket",
        heap_grown / 1024,
        buffers / 1024,
        buffers0 / 1024,
        per_socket as f64 / 1024.0
    );
    assert!(
        per_socket <= 32 * KIB as u64,
        "an idle socket holds {per_socket} bytes"
    );

    // The measure sees memory that is really held: a connection with 200 KiB received and
    // unread keeps it (and its pages) through the releases.
    let (listener, held) = server.await.unwrap();
    let unread = 200 * KIB;
    let bulk = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&pattern(3, unread)).await.unwrap();
        s
    });
    let mut c = a.connect(SocketAddrV6::new(B, 8080, 0, 0)).await.unwrap();
    let _server_side = bulk.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holding = a.buffer_memory();
    println!(
        "with 200 KiB unread: client stack buffers {} KiB",
        holding / 1024
    );
    assert!(
        holding >= unread as u64,
        "unread data is resident: {holding}"
    );
    let mut got = vec![0u8; unread];
    c.read_exact(&mut got).await.unwrap();
    assert!(
        got == pattern(3, unread),
        "unread data survived the releases"
    );

    drop(streams);
    for h in held {
        h.await.unwrap();
    }
}

/// Releases as often as possible while streams run over a wire that holds back every 5th
/// packet for 2 ms: the receive rings hold out-of-order segments while they are otherwise
/// empty, the case a careless release would zero. Every byte must arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_buffers_mid_transfer_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const STREAMS: usize = 8;
    const BYTES: usize = 4 << 20;
    // Each direction: stack → reordering relay → other stack.
    let (a_tx, relay_ab_rx) = mpsc::channel::<bytes::Bytes>(256);
    let (relay_ab_tx, b_rx) = mpsc::channel(256);
    let (b_tx, relay_ba_rx) = mpsc::channel::<bytes::Bytes>(256);
    let (relay_ba_tx, a_rx) = mpsc::channel(256);
    for (mut rx, tx) in [(relay_ab_rx, relay_ab_tx), (relay_ba_rx, relay_ba_tx)] {
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(p) = rx.recv().await {
                n += 1;
                if n.is_multiple_of(5) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let _ = tx.send(p).await;
                    });
                } else if tx.send(p).await.is_err() {
                    break;
                }
            }
        });
    }
    let config = StackConfig::default();
    let a = Stack::with_config(A, 16384, a_tx, a_rx, config.clone());
    let b = Stack::with_config(B, 16384, b_tx, b_rx, config);
    let stop = Arc::new(AtomicBool::new(false));
    let released = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut released = 0;
            while !stop.load(Ordering::Relaxed) {
                released += a.release_buffers() + b.release_buffers();
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            released
        })
    };
    let listener = b.listen(9000).unwrap();
    let server = tokio::spawn(async move {
        let mut readers = Vec::new();
        for _ in 0..STREAMS {
            let (mut s, _) = listener.accept().await.unwrap();
            readers.push(tokio::spawn(async move {
                let mut seed = [0u8; 8];
                s.read_exact(&mut seed).await.unwrap();
                let mut got = Vec::with_capacity(BYTES);
                s.read_to_end(&mut got).await.unwrap();
                (u64::from_le_bytes(seed), got)
            }));
        }
        let mut out = Vec::new();
        for r in readers {
            out.push(r.await.unwrap());
        }
        out
    });
    let mut writers = Vec::new();
    for i in 0..STREAMS as u64 {
        let a = a.clone();
        writers.push(tokio::spawn(async move {
            let mut c = a.connect(SocketAddrV6::new(B, 9000, 0, 0)).await.unwrap();
            c.write_all(&i.to_le_bytes()).await.unwrap();
            c.write_all(&pattern(100 + i, BYTES)).await.unwrap();
            c.shutdown().await.unwrap();
            let mut end = [0u8; 1];
            let _ = c.read(&mut end).await;
        }));
    }
    let received = tokio::time::timeout(Duration::from_secs(120), server)
        .await
        .expect("transfers finish")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let released = released.await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    println!("{released} buffer releases during the transfers");
    assert!(released > 10, "releases happened mid-transfer: {released}");
    for (seed, got) in received {
        assert_eq!(got.len(), BYTES);
        assert!(got == pattern(100 + seed, BYTES), "stream {seed} intact");
    }
}
